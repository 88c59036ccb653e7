//! Outputs to S3-compatible storage configured by environment, as an alternative to the
//! presigned URLs a job can give: the job names object keys (`s3Key`, `s3Keys`), the worker
//! signs a short-lived PUT for each with `rusty-s3` (AWS Signature V4, query-string form)
//! and uploads it like any presigned URL. The credentials never leave the worker: outputs are
//! shown as `s3://{bucket}/{key}`.
//!
//! | variable | meaning |
//! |---|---|
//! | `GPUPOOL_WORKER_S3_BUCKET` | the bucket; S3 outputs are off without it |
//! | `GPUPOOL_WORKER_S3_ENDPOINT` | e.g. `https://s3.eu-west-1.amazonaws.com` or a MinIO URL (default: AWS in the region) |
//! | `GPUPOOL_WORKER_S3_REGION` | default `us-east-1` |
//! | `GPUPOOL_WORKER_S3_URL_STYLE` | `path` or `virtual-host` (default: virtual-host on amazonaws.com, path elsewhere) |
//! | `GPUPOOL_WORKER_S3_PREFIX` | prepended to every key (e.g. `renders/`) |
//! | `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN` | the credentials (the last optional) |

use std::time::Duration;

use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
use serde_json::Value;

use crate::{OpError, media::invalid};

/// How long a signed PUT stays valid: long enough for a slow upload to start.
const SIGNED_FOR: Duration = Duration::from_secs(900);

pub struct S3 {
    bucket: Bucket,
    credentials: Credentials,
    name: String,
    prefix: String,
}

impl std::fmt::Debug for S3 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3")
            .field("bucket", &self.name)
            .field("endpoint", &self.bucket.base_url().as_str())
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl S3 {
    /// The S3 settings, or `None` when `GPUPOOL_WORKER_S3_BUCKET` is unset.
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, String> {
        let get = |k: &str| get(k).filter(|v| !v.is_empty());
        let Some(name) = get("GPUPOOL_WORKER_S3_BUCKET") else {
            return Ok(None);
        };
        let region = get("GPUPOOL_WORKER_S3_REGION").unwrap_or_else(|| "us-east-1".into());
        let endpoint = get("GPUPOOL_WORKER_S3_ENDPOINT")
            .unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
        let endpoint: reqwest::Url = endpoint
            .parse()
            .map_err(|_| format!("GPUPOOL_WORKER_S3_ENDPOINT is not a URL: {endpoint:?}"))?;
        if !matches!(endpoint.scheme(), "http" | "https") {
            return Err("GPUPOOL_WORKER_S3_ENDPOINT must be an http(s) URL".into());
        }
        let aws = endpoint
            .host_str()
            .is_some_and(|h| h.ends_with(".amazonaws.com"));
        let style = match get("GPUPOOL_WORKER_S3_URL_STYLE").as_deref() {
            None if aws => UrlStyle::VirtualHost,
            None | Some("path") => UrlStyle::Path,
            Some("virtual-host") => UrlStyle::VirtualHost,
            Some(other) => {
                return Err(format!(
                    "GPUPOOL_WORKER_S3_URL_STYLE must be path or virtual-host, not {other:?}"
                ));
            }
        };
        let key = get("AWS_ACCESS_KEY_ID")
            .ok_or("GPUPOOL_WORKER_S3_BUCKET is set but AWS_ACCESS_KEY_ID is not")?;
        let secret = get("AWS_SECRET_ACCESS_KEY")
            .ok_or("GPUPOOL_WORKER_S3_BUCKET is set but AWS_SECRET_ACCESS_KEY is not")?;
        let credentials = match get("AWS_SESSION_TOKEN") {
            Some(token) => Credentials::new_with_token(key, secret, token),
            None => Credentials::new(key, secret),
        };
        let bucket = Bucket::new(endpoint, style, name.clone(), region)
            .map_err(|e| format!("S3 bucket settings: {e}"))?;
        Ok(Some(Self {
            bucket,
            credentials,
            name,
            prefix: get("GPUPOOL_WORKER_S3_PREFIX").unwrap_or_default(),
        }))
    }

    /// A signed PUT URL for `key` (already checked), and the key as shown.
    pub fn put(&self, key: &str) -> (reqwest::Url, String) {
        let full = format!("{}{key}", self.prefix);
        let url = self
            .bucket
            .put_object(Some(&self.credentials), &full)
            .sign(SIGNED_FOR);
        (url, format!("s3://{}/{full}", self.name))
    }
}

/// An object key given in `field`: 1 to 512 bytes of letters, digits and `/._-`, not starting
/// with `/`, with no `..` segment.
pub fn checked_key(raw: &Value, field: &str) -> Result<String, OpError> {
    let key = raw
        .as_str()
        .ok_or_else(|| invalid(field, "an object key must be a string"))?;
    let ok_chars = key
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '_' | '-'));
    if key.is_empty() || key.len() > 512 || !ok_chars {
        return Err(invalid(
            field,
            "an object key is 1 to 512 characters of letters, digits and / . _ -",
        ));
    }
    if key.starts_with('/') || key.split('/').any(|s| s == ".." || s == ".") {
        return Err(invalid(
            field,
            "an object key must not start with / or hold . or .. segments",
        ));
    }
    Ok(key.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_env as env;
    use serde_json::json;

    #[test]
    fn settings_come_from_the_environment_and_the_secret_never_shows() {
        assert!(S3::from_env(env(&[])).unwrap().is_none());
        let err = S3::from_env(env(&[("GPUPOOL_WORKER_S3_BUCKET", "b")])).unwrap_err();
        assert!(err.contains("AWS_ACCESS_KEY_ID"), "{err}");
        let s3 = S3::from_env(env(&[
            ("GPUPOOL_WORKER_S3_BUCKET", "media"),
            ("GPUPOOL_WORKER_S3_ENDPOINT", "http://127.0.0.1:9000"),
            ("GPUPOOL_WORKER_S3_PREFIX", "renders/"),
            ("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE"),
            ("AWS_SECRET_ACCESS_KEY", "very-secret-value"),
        ]))
        .unwrap()
        .unwrap();
        let (url, shown) = s3.put("a/b.mp4");
        assert_eq!(shown, "s3://media/renders/a/b.mp4");
        assert!(
            url.as_str()
                .starts_with("http://127.0.0.1:9000/media/renders/a/b.mp4?"),
            "{url}"
        );
        assert!(url.as_str().contains("X-Amz-Signature="), "{url}");
        assert!(!url.as_str().contains("very-secret-value"));
        assert!(!format!("{s3:?}").contains("very-secret-value"));
        let aws = S3::from_env(env(&[
            ("GPUPOOL_WORKER_S3_BUCKET", "media"),
            ("GPUPOOL_WORKER_S3_REGION", "eu-west-1"),
            ("AWS_ACCESS_KEY_ID", "k"),
            ("AWS_SECRET_ACCESS_KEY", "s"),
        ]))
        .unwrap()
        .unwrap();
        let (url, _) = aws.put("x.jpg");
        assert!(
            url.as_str()
                .starts_with("https://media.s3.eu-west-1.amazonaws.com/x.jpg?"),
            "{url}"
        );
    }

    #[test]
    fn keys_are_checked() {
        assert_eq!(
            checked_key(&json!("out/1.jpg"), "s3Key").unwrap(),
            "out/1.jpg"
        );
        for bad in [
            json!(""),
            json!("/abs"),
            json!("a/../b"),
            json!("sp ace"),
            json!(3),
        ] {
            let e = checked_key(&bad, "s3Key").unwrap_err();
            assert!(
                matches!(e, OpError::Invalid { ref field, .. } if field == "s3Key"),
                "{bad}: {e:?}"
            );
        }
    }
}
