//! Types shared by the three kinds: Secret references, conditions, money strings.
//!
//! Only types, schema helpers and constants live here; no I/O.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::KubeSchema;
use schemars::{Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// A non-negative decimal amount of US dollars, at most six digits on either side of the point
/// (`"0.18"`, `"5"`, `"12.500000"`). Money is a string, never a float, as Kubernetes API
/// conventions ask.
pub const MONEY_PATTERN: &str = r"^(0|[1-9][0-9]{0,5})(\.[0-9]{1,6})?$";

/// RFC 1123 label: the shape of Kubernetes object names used as references here.
pub const DNS_LABEL_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$";

/// RFC 1123 subdomain, the shape of a Secret name.
pub const DNS_SUBDOMAIN_PATTERN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// A key inside a Secret's `data`.
pub const SECRET_KEY_PATTERN: &str = r"^[-._a-zA-Z0-9]+$";

/// A reference to one key of a Secret in the resource's own namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret, in the same namespace as the resource that refers to it.
    #[schemars(length(min = 1, max = 253), pattern(DNS_SUBDOMAIN_PATTERN))]
    pub name: String,
    /// Key within the Secret's data whose value is used.
    #[schemars(length(min = 1, max = 253), pattern(SECRET_KEY_PATTERN))]
    pub key: String,
}

impl SecretKeyRef {
    pub fn new(name: impl Into<String>, key: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            key: key.into(),
        }
    }
}

/// Schema for a `conditions` list: standard `metav1.Condition` entries, a list-map keyed by
/// `type` so that server-side apply merges one condition at a time.
pub fn conditions_schema(generator: &mut SchemaGenerator) -> Schema {
    let item = generator.subschema_for::<Condition>();
    json_schema!({
        "type": "array",
        "description": "Standard conditions, one per type, each with the generation it was computed from.",
        "items": item,
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
    })
}

/// Schema for a free-form JSON object (the job input): any fields, kept as sent.
pub fn free_form_object(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

/// Schema for any JSON value (the worker's output may be an object, list, string or number).
pub fn any_json_value(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

/// Schema for an optional timestamp written by the operator (RFC 3339).
pub fn optional_timestamp(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "format": "date-time",
    })
}

/// The condition types gpupool writes, one name per meaning. GpuPool: `Ready` (some provider
/// entry can rent). GpuInstance: `Ready` (the worker answers), `TeardownFailing` (the provider
/// keeps refusing the destroy). VideoJob: `Scheduled` (bound, or why it waits), `Complete`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionType {
    Ready,
    Scheduled,
    Complete,
    TeardownFailing,
}

impl ConditionType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "Ready",
            Self::Scheduled => "Scheduled",
            Self::Complete => "Complete",
            Self::TeardownFailing => "TeardownFailing",
        }
    }
}
