//! Writing status: server-side apply under the `gpupool` field manager, always of the whole
//! status (an apply that omitted a field would remove it), with the object's resourceVersion
//! as a precondition so two writers never overwrite each other; plus conditions and money.

use std::fmt::Debug;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{
    Api, Resource,
    api::{Patch, PatchParams},
};
use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::json;

use crate::crd::{ConditionType, MANAGER};

use super::Result;

/// Applies `status` as the whole status of `obj`, failing with 409 if `obj` changed since it
/// was read.
pub async fn apply_status<K, S>(api: &Api<K>, obj: &K, status: &S) -> Result<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    S: Serialize,
{
    apply(api, obj, status, true).await
}

/// Applies `status` as the whole status of an object only one reconciler writes (its own
/// pool), without a resourceVersion precondition.
pub async fn apply_own_status<K, S>(api: &Api<K>, obj: &K, status: &S) -> Result<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    S: Serialize,
{
    apply(api, obj, status, false).await
}

async fn apply<K, S>(api: &Api<K>, obj: &K, status: &S, precondition: bool) -> Result<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    S: Serialize,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    let mut metadata = json!({"name": name});
    if precondition {
        metadata["resourceVersion"] = json!(obj.meta().resource_version);
    }
    let patch = json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": metadata,
        "status": status,
    });
    Ok(api
        .patch_status(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?)
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

/// Money as the API writes it: six decimals at most, no trailing zeros, never negative.
pub fn money(amount: Decimal) -> String {
    let rounded = amount
        .max(Decimal::ZERO)
        .round_dp_with_strategy(6, RoundingStrategy::MidpointAwayFromZero)
        .normalize();
    rounded.to_string()
}

/// What `price_per_hour` costs over `seconds`.
pub fn cost(price_per_hour: Decimal, seconds: f64) -> Decimal {
    let secs = Decimal::from_f64_retain(seconds.max(0.0)).unwrap_or_default();
    price_per_hour * secs / Decimal::from(3600)
}

/// Parses a money string written by the API (validated by the schema); zero when absent.
pub fn parse_money(s: Option<&str>) -> Decimal {
    s.and_then(|s| s.parse().ok()).unwrap_or_default()
}

/// The price per hour of an instance's offer, once known.
pub fn offer_price(status: &crate::crd::GpuInstanceStatus) -> Option<Decimal> {
    status
        .offer
        .as_ref()?
        .price_per_hour
        .as_deref()?
        .parse()
        .ok()
}

/// Seconds from `from` to `to` (negative when `to` is earlier).
pub fn seconds_between(from: Timestamp, to: Timestamp) -> f64 {
    to.duration_since(from).as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_is_rounded_and_normalized() {
        assert_eq!(money("0.1800000".parse().unwrap()), "0.18");
        assert_eq!(money("0.0000005".parse().unwrap()), "0.000001");
        assert_eq!(money("-3".parse().unwrap()), "0");
        assert_eq!(money(cost("0.18".parse().unwrap(), 300.0)), "0.015");
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
