//! Writing status: server-side apply under the `gpupool` field manager, always of the whole
//! status (an apply that omitted a field would remove it), with the object's resourceVersion
//! as a precondition so two writers never overwrite each other; plus conditions and money.

use std::fmt::Debug;

use jiff::Timestamp;
use kube::{
    Api, Resource,
    api::{Patch, PatchParams},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::json;

pub use crate::crd::common::{remove_condition, set_condition};
use crate::crd::{MANAGER, Money};

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

/// The price per hour of an instance's offer, once known.
pub fn offer_price(status: &crate::crd::GpuInstanceStatus) -> Option<Money> {
    status.offer.as_ref()?.price_per_hour
}

/// Seconds from `from` to `to` (negative when `to` is earlier).
pub fn seconds_between(from: Timestamp, to: Timestamp) -> f64 {
    to.duration_since(from).as_secs_f64()
}
