//! Types shared by the three kinds: Secret references, conditions, money strings.
//!
//! Only types, schema helpers and constants live here; no I/O.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::KubeSchema;
use rust_decimal::{Decimal, RoundingStrategy};
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

/// Sets condition `type_` in `conditions`, keeping its lastTransitionTime when the status
/// did not change. Returns whether anything changed.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: ConditionType,
    ok: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> bool {
    let status = if ok { "True" } else { "False" };
    let type_ = type_.as_str();
    if let Some(c) = conditions.iter_mut().find(|c| c.type_ == type_) {
        let changed = c.status != status
            || c.reason != reason
            || c.message != message
            || c.observed_generation != generation;
        if c.status != status {
            c.last_transition_time = Time(now);
        }
        c.status = status.into();
        c.reason = reason.into();
        c.message = message.into();
        c.observed_generation = generation;
        return changed;
    }
    conditions.push(Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: Time(now),
    });
    true
}

/// Removes condition `type_`; returns whether it was there.
pub fn remove_condition(conditions: &mut Vec<Condition>, type_: ConditionType) -> bool {
    let before = conditions.len();
    conditions.retain(|c| c.type_ != type_.as_str());
    before != conditions.len()
}

/// An amount of US dollars as the API stores it: a decimal string matching [`MONEY_PATTERN`]
/// on the wire, a [`Decimal`] in memory, so no caller parses a string back into money.
/// Amounts are kept non-negative and rounded to six decimals (the pattern's precision) when
/// made, and written without trailing zeros (`"0.015"`, not `"0.015000"`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Money(Decimal);

impl Money {
    pub const ZERO: Money = Money(Decimal::ZERO);

    /// `amount` rounded half away from zero to six decimals; negative amounts become zero.
    pub fn new(amount: Decimal) -> Self {
        Money(
            amount
                .max(Decimal::ZERO)
                .round_dp_with_strategy(6, RoundingStrategy::MidpointAwayFromZero)
                .normalize(),
        )
    }

    /// What `price_per_hour` costs over `seconds` (negative spans cost nothing).
    pub fn for_seconds(price_per_hour: Money, seconds: f64) -> Self {
        let secs = Decimal::from_f64_retain(seconds.max(0.0)).unwrap_or_default();
        Money::new(price_per_hour.0 * secs / Decimal::from(3600))
    }

    pub fn amount(self) -> Decimal {
        self.0
    }
}

impl std::ops::Add for Money {
    type Output = Money;
    fn add(self, other: Money) -> Money {
        Money::new(self.0 + other.0)
    }
}

impl std::iter::Sum for Money {
    fn sum<I: Iterator<Item = Money>>(iter: I) -> Money {
        iter.fold(Money::ZERO, |a, b| a + b)
    }
}

impl From<Decimal> for Money {
    fn from(amount: Decimal) -> Self {
        Money::new(amount)
    }
}

impl std::fmt::Display for Money {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.normalize().fmt(f)
    }
}

impl std::str::FromStr for Money {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let d: Decimal = s
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not a decimal amount of USD"))?;
        if d < Decimal::ZERO {
            return Err(format!("{s:?} is negative"));
        }
        Ok(Money::new(d))
    }
}

impl Serialize for Money {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Money {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // The schema's pattern has already held the stored value to a decimal string.
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl schemars::JsonSchema for Money {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Money".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({"type": "string"})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(s: &str) -> Money {
        s.parse().unwrap()
    }

    #[test]
    fn money_is_rounded_normalized_and_never_negative() {
        assert_eq!(m("0.1800000").to_string(), "0.18");
        assert_eq!(m("0.0000005").to_string(), "0.000001");
        assert_eq!(Money::new(Decimal::from(-3)).to_string(), "0");
        assert!("-3".parse::<Money>().is_err());
        assert!("abc".parse::<Money>().is_err());
        assert_eq!(Money::for_seconds(m("0.18"), 300.0).to_string(), "0.015");
        assert_eq!(Money::for_seconds(m("0.18"), -5.0), Money::ZERO);
        assert_eq!((m("0.1") + m("0.2")).to_string(), "0.3");
        assert_eq!(
            [m("1"), m("2.5")].into_iter().sum::<Money>().to_string(),
            "3.5"
        );
    }

    #[test]
    fn money_is_a_string_on_the_wire_matching_the_pattern() {
        let pattern = regex_lite_match;
        for s in ["0", "0.18", "12.5", "999999.999999"] {
            let v = serde_json::to_value(m(s)).unwrap();
            assert!(v.is_string(), "{v}");
            assert!(pattern(v.as_str().unwrap()), "{v}");
            let back: Money = serde_json::from_value(v).unwrap();
            assert_eq!(back, m(s));
        }
        assert_eq!(serde_json::to_value(m("12.500000")).unwrap(), "12.5");
        assert!(serde_json::from_value::<Money>(serde_json::json!(0.5)).is_err());
    }

    /// MONEY_PATTERN checked by hand (no regex crate in the operator).
    fn regex_lite_match(s: &str) -> bool {
        let (int, frac) = s.split_once('.').unwrap_or((s, ""));
        let int_ok = int == "0"
            || (!int.is_empty()
                && int.len() <= 6
                && !int.starts_with('0')
                && int.bytes().all(|b| b.is_ascii_digit()));
        let frac_ok = !s.contains('.')
            || (!frac.is_empty() && frac.len() <= 6 && frac.bytes().all(|b| b.is_ascii_digit()));
        int_ok && frac_ok
    }

    #[test]
    fn conditions_keep_transition_time_when_status_holds() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let t1: Timestamp = "2026-01-01T00:01:00Z".parse().unwrap();
        let mut c = Vec::new();
        assert!(set_condition(
            &mut c,
            ConditionType::Ready,
            true,
            "A",
            "",
            Some(1),
            t0
        ));
        assert!(!set_condition(
            &mut c,
            ConditionType::Ready,
            true,
            "A",
            "",
            Some(1),
            t1
        ));
        assert_eq!(c[0].last_transition_time.0, t0);
        assert!(set_condition(
            &mut c,
            ConditionType::Ready,
            false,
            "B",
            "x",
            Some(2),
            t1
        ));
        assert_eq!(c[0].last_transition_time.0, t1);
        assert!(remove_condition(&mut c, ConditionType::Ready));
        assert!(c.is_empty());
    }
}
