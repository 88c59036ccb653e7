//! The [`Redactor`]: keeps configured secrets (API keys, worker tokens) out of every message,
//! and the short, single-line quotes of response bodies that errors carry.

use std::fmt;

use crate::provider::Credentials;

/// Longest excerpt of a response body quoted in an error message, in characters.
const EXCERPT_CHARS: usize = 200;
/// How much of a body is scanned (and redacted) to build an excerpt.
const EXCERPT_SCAN_BYTES: usize = 4096;

/// Replaces every configured secret in `text` with `<redacted>`.
#[derive(Clone, Default)]
pub(crate) struct Redactor {
    secrets: Vec<Credentials>,
}

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Redactor({} secrets)", self.secrets.len())
    }
}

impl Redactor {
    pub(crate) fn new<'a>(secrets: impl IntoIterator<Item = &'a Credentials>) -> Self {
        Self {
            secrets: secrets
                .into_iter()
                .filter(|s| !s.expose().is_empty())
                .cloned()
                .collect(),
        }
    }

    pub(crate) fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        for secret in &self.secrets {
            if out.contains(secret.expose()) {
                out = out.replace(secret.expose(), "<redacted>");
            }
        }
        out
    }

    /// A provider's or worker's own message, kept for the user: redacted, on one line, at
    /// most `max_chars` characters.
    pub(crate) fn message(&self, text: &str, max_chars: usize) -> String {
        let clean: String = self
            .redact(text)
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(max_chars)
            .collect();
        clean.trim().to_string()
    }

    /// A short, single-line, redacted quote of a body for an error message. Redaction runs
    /// before truncation so that a cut can never leave part of a secret behind.
    pub(crate) fn excerpt(&self, body: &[u8]) -> String {
        let scanned = &body[..self.scan_end(body)];
        let text = String::from_utf8_lossy(scanned);
        let redacted = self.redact(&text);
        let mut out = String::with_capacity(EXCERPT_CHARS + 3);
        let mut last_space = false;
        for c in redacted.chars() {
            let c = if c.is_control() || c.is_whitespace() {
                ' '
            } else {
                c
            };
            if c == ' ' && (last_space || out.is_empty()) {
                continue;
            }
            last_space = c == ' ';
            if out.chars().count() >= EXCERPT_CHARS {
                out.push('…');
                break;
            }
            out.push(c);
        }
        let trimmed = out.trim_end().to_string();
        if trimmed.is_empty() {
            "<empty body>".into()
        } else {
            trimmed
        }
    }

    /// The length of `prefix`, a body cut at a limit, without a trailing start of a secret:
    /// redaction cannot recognise a secret whose end was not read.
    pub(crate) fn uncut_len(&self, prefix: &[u8]) -> usize {
        let cut = self
            .secrets
            .iter()
            .filter_map(|secret| {
                let secret = secret.expose().as_bytes();
                (1..secret.len())
                    .rev()
                    .find(|&k| prefix.ends_with(&secret[..k]))
            })
            .max()
            .unwrap_or(0);
        prefix.len() - cut
    }

    /// Where an excerpt stops scanning `body`: at [`EXCERPT_SCAN_BYTES`], or just past a
    /// secret that straddles that point, so that redaction sees the whole of it. (Blanks
    /// collapse, so a body of 4000 spaces shows the end of the scanned window.)
    fn scan_end(&self, body: &[u8]) -> usize {
        let mut end = body.len().min(EXCERPT_SCAN_BYTES);
        loop {
            let before = end;
            for secret in &self.secrets {
                let secret = secret.expose().as_bytes();
                let first = end.saturating_sub(secret.len() - 1);
                if let Some(at) = body[first..]
                    .windows(secret.len())
                    .take(end - first)
                    .position(|w| w == secret)
                {
                    end = end.max(first + at + secret.len());
                }
            }
            if end == before {
                return end;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpt_redacts_before_truncating_and_flattens() {
        let key = Credentials::new("sk-SECRET-123");
        let r = Redactor::new([&key]);
        let body = format!(
            "{{\"error\":\"bad key sk-SECRET-123\"}}\n\n{}",
            "x".repeat(500)
        );
        let e = r.excerpt(body.as_bytes());
        assert!(!e.contains("SECRET"), "{e}");
        assert!(e.contains("<redacted>"));
        assert!(!e.contains('\n'));
        assert!(e.chars().count() <= EXCERPT_CHARS + 1);
        assert_eq!(r.excerpt(b"  \n "), "<empty body>");
    }

    #[test]
    fn secret_straddling_the_excerpt_end_is_not_shown() {
        let key = Credentials::new("sk-SECRET-123");
        let r = Redactor::new([&key]);
        let body = format!("{}sk-SECRET-123", "a".repeat(EXCERPT_CHARS - 3));
        let e = r.excerpt(body.as_bytes());
        assert!(!e.contains("sk-"), "{e}");
    }

    #[test]
    fn secret_straddling_the_scan_limit_is_not_shown() {
        let key = Credentials::new("sk-SECRET-123");
        let r = Redactor::new([&key]);
        // Blanks collapse, so the excerpt reaches the end of the scanned window.
        for pad in EXCERPT_SCAN_BYTES - 13..=EXCERPT_SCAN_BYTES {
            let body = format!("{}sk-SECRET-123 tail", " ".repeat(pad));
            let e = r.excerpt(body.as_bytes());
            assert!(!e.contains("sk-"), "{pad}: {e}");
        }
        let body = format!("{}sk-SECRET-123", "\n".repeat(EXCERPT_SCAN_BYTES - 5));
        assert_eq!(r.excerpt(body.as_bytes()), "<redacted>");
    }

    #[test]
    fn a_cut_secret_is_dropped_from_a_prefix() {
        let key = Credentials::new("sk-SECRET-123");
        let r = Redactor::new([&key]);
        assert_eq!(r.uncut_len(b"error: sk-SEC"), 7);
        assert_eq!(r.uncut_len(b"error: s"), 7);
        assert_eq!(r.uncut_len(b"error: sk-SECRET-123"), 20);
        assert_eq!(r.uncut_len(b"error: none"), 11);
    }

    #[test]
    fn messages_are_redacted_flattened_and_bounded() {
        let key = Credentials::new("sk-SECRET-123");
        let r = Redactor::new([&key]);
        let m = r.message(&format!(" bad\nkey sk-SECRET-123 {}", "é".repeat(5000)), 50);
        assert!(m.starts_with("bad key <redacted> éé"), "{m}");
        assert_eq!(m.chars().count(), 49);
    }
}
