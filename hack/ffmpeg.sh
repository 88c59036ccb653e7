#!/usr/bin/env bash
# Make sure ffmpeg and ffprobe are on this machine, for the reference worker's tests
# (crates/gpupool-worker). Uses the ones on PATH when there are; otherwise installs Debian's
# `ffmpeg` package (apt keeps its download in /var/cache/apt, so a second install on the same
# machine reads no network), as root or through a password-less sudo.
# Prints the directory of ffmpeg as the last line of stdout; everything else goes to stderr.
set -euo pipefail

log() { echo "ffmpeg.sh: $*" >&2; }

# The caption operation burns subtitles with libass, which needs at least one font.
has_font() { command -v fc-list >/dev/null && [ -n "$(fc-list 2>/dev/null | head -n 1)" ]; }
if ! command -v ffmpeg >/dev/null || ! command -v ffprobe >/dev/null || ! has_font; then
  if [ "$(id -u)" = 0 ]; then
    SUDO=()
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
  else
    log "ffmpeg is missing and this user cannot install Debian packages; install ffmpeg (apt-get install ffmpeg) or put ffmpeg and ffprobe on PATH"
    exit 1
  fi
  log "installing Debian's ffmpeg and fonts-dejavu-core packages"
  "${SUDO[@]}" apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends ffmpeg fonts-dejavu-core fontconfig >&2
fi
log "$(ffmpeg -hide_banner -version | head -n 1)"
dirname "$(command -v ffmpeg)"
