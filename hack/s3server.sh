#!/usr/bin/env bash
# Build or reuse the S3-compatible server the reference worker's S3 test uploads to:
# `s3s-fs` (crates.io, Apache-2.0: an S3 server on a directory, with SigV4 authentication),
# built once by `cargo install` into $GPUPOOL_TESTBINS/tools/s3s-fs-VERSION (cold: 3-6 min
# on 2 cores). Prints the binary's path as the last line of stdout; logs go to stderr.
set -euo pipefail
VERSION=${S3S_FS_VERSION:-0.14.1}
CACHE=${GPUPOOL_TESTBINS:-$HOME/.cache/gpupool-testbins}
ROOT=$CACHE/tools/s3s-fs-$VERSION
BIN=$ROOT/bin/s3s-fs
log() { echo "s3server.sh: $*" >&2; }
if [ ! -x "$BIN" ]; then
  mkdir -p "$CACHE/tools"
  exec 9>"$CACHE/tools/.s3s-fs.lock"
  flock 9
  if [ ! -x "$BIN" ]; then
    log "building s3s-fs $VERSION with cargo install (cold: 3-6 min on 2 cores)"
    # Its own target directory, removed after: only the binary is kept.
    tmp=$(mktemp -d "$CACHE/tools/.s3s-fs-build.XXXXXX")
    CARGO_TARGET_DIR=$tmp cargo install --quiet --locked s3s-fs --version "$VERSION" \
      --features binary --root "$ROOT" >&2
    rm -rf "$tmp"
  fi
fi
log "s3s-fs $VERSION at $BIN"
echo "$BIN"
