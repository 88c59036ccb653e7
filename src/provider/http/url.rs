//! Base URLs of the providers: parsing and checking a configured one, and appending escaped
//! path segments to it.

use url::Url;

use crate::provider::{ProviderError, ProviderResult};

/// Parses a configured base URL: http or https, no credentials, query or fragment.
pub fn parse_base_url(what: &str, raw: &str) -> ProviderResult<Url> {
    let url = Url::parse(raw.trim())
        .map_err(|e| ProviderError::Permanent(format!("invalid {what} base URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ProviderError::Permanent(format!(
            "invalid {what} base URL: scheme must be http or https"
        )));
    }
    if url.cannot_be_a_base() || url.host_str().is_none() {
        return Err(ProviderError::Permanent(format!(
            "invalid {what} base URL: no host"
        )));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ProviderError::Permanent(format!(
            "invalid {what} base URL: credentials do not belong in a URL"
        )));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(ProviderError::Permanent(format!(
            "invalid {what} base URL: no query or fragment allowed"
        )));
    }
    Ok(url)
}

/// `base` with `segments` appended, each percent-encoded as one path segment (so an id can
/// never add a path level). An empty last segment gives a trailing slash.
pub(crate) fn join_segments(base: &Url, segments: &[&str]) -> ProviderResult<Url> {
    let mut url = base.clone();
    url.path_segments_mut()
        .map_err(|_| ProviderError::Permanent("base URL cannot take a path".into()))?
        .pop_if_empty()
        .extend(segments);
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_are_checked_and_segments_escaped() {
        assert!(parse_base_url("x", "ftp://h").is_err());
        assert!(parse_base_url("x", "https://user:pw@h").is_err());
        assert!(parse_base_url("x", "https://h/?api_key=1").is_err());
        let base =
            parse_base_url("x", "https://api.runpod.ai/v2").unwrap_or_else(|e| panic!("{e}"));
        let url = join_segments(&base, &["ab/../c", "run"]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(url.as_str(), "https://api.runpod.ai/v2/ab%2F..%2Fc/run");
        let base = parse_base_url("x", "http://127.0.0.1:1/").unwrap_or_else(|e| panic!("{e}"));
        let url = join_segments(&base, &["api", "v0", "instances", "7", ""])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(url.as_str(), "http://127.0.0.1:1/api/v0/instances/7/");
    }
}
