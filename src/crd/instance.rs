//! `GpuInstance`: one rented machine, the record that makes sure it is never forgotten.
//!
//! Types and schema only. Everything learned from the provider is status.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{
    ConditionType, DNS_LABEL_PATTERN, MONEY_PATTERN, Money, conditions_schema, set_condition,
};
use super::pool::CapacityType;
use jiff::{SignedDuration, Timestamp};

/// One GPU machine rented for a GpuPool.
///
/// The operator creates these for pending VideoJobs; a user may create one to pre-warm a
/// machine. Deleting it destroys the machine at the provider before the object goes away.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "gpupool.dev",
    version = "v1alpha1",
    kind = "GpuInstance",
    plural = "gpuinstances",
    shortname = "gi",
    category = "gpupool",
    namespaced,
    status = "GpuInstanceStatus",
    derive = "PartialEq",
    doc = "One GPU machine rented from a provider of a GpuPool.",
    printcolumn(
        name = "Pool",
        type_ = "string",
        json_path = ".spec.pool",
        description = "Pool the instance belongs to"
    ),
    printcolumn(
        name = "Provider",
        type_ = "string",
        json_path = ".spec.provider",
        description = "Provider entry of the pool"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Pending, Provisioning, Ready, Terminating or Failed"
    ),
    printcolumn(
        name = "GPU",
        type_ = "string",
        json_path = ".status.offer.gpuName",
        description = "GPU model rented"
    ),
    printcolumn(
        name = "$/h",
        type_ = "string",
        json_path = ".status.offer.pricePerHour",
        description = "Price per hour in USD"
    ),
    printcolumn(
        name = "Capacity",
        type_ = "string",
        json_path = ".spec.capacityType",
        description = "OnDemand, or Interruptible (the provider may take the machine back)"
    ),
    printcolumn(
        name = "Job",
        type_ = "string",
        json_path = ".status.currentJob",
        description = "VideoJob running now"
    ),
    printcolumn(
        name = "Idle-Since",
        type_ = "date",
        json_path = ".status.idleSince",
        description = "When the instance last became idle"
    ),
    printcolumn(
        name = "Cost",
        type_ = "string",
        json_path = ".status.accruedCost",
        priority = 1,
        description = "USD billed so far"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct GpuInstanceSpec {
    /// Name of the GpuPool, in the same namespace, this instance belongs to. Immutable.
    #[schemars(length(min = 1, max = 63), pattern(DNS_LABEL_PATTERN))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("pool is immutable"))]
    pub pool: String,

    /// Name of the vast or runpod entry of the pool's providers this machine is rented from.
    /// Immutable.
    #[schemars(length(min = 1, max = 63), pattern(DNS_LABEL_PATTERN))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("provider is immutable"))]
    pub provider: String,

    /// The entry's capacityType when the instance was created: an Interruptible machine
    /// may be taken back by the provider. Immutable.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("capacityType is immutable"))]
    pub capacity_type: CapacityType,
}

/// Life-cycle phase of a GpuInstance.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum InstancePhase {
    /// Recorded; the provider has not been asked yet.
    #[default]
    Pending,
    /// Rented; waiting for the provider to report running and the worker to answer health.
    Provisioning,
    /// Running and healthy: takes jobs.
    Ready,
    /// Being destroyed at the provider.
    Terminating,
    /// Could not be rented or broke; destroyed at the provider if it exists.
    Failed,
}

/// The offer a machine was rented from.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct OfferInfo {
    /// Provider's id of the offer or GPU type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offer_id: Option<String>,
    /// GPU model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_name: Option<String>,
    /// GPUs on the machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_gpus: Option<i32>,
    /// Price per hour in USD, decimal string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(MONEY_PATTERN))]
    pub price_per_hour: Option<Money>,
    /// Region or data centre.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
}

/// Observed state of a rented machine, written by the operator.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GpuInstanceStatus {
    /// The metadata.generation this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Pending, Provisioning, Ready, Terminating or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<InstancePhase>,

    /// The provider's id of the machine, recorded as soon as the provider answers create.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_instance_id: Option<String>,

    /// The offer the machine was rented from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offer: Option<OfferInfo>,

    /// Base URL of the worker HTTP API on the machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,

    /// Name of the VideoJob running on the machine now; empty when idle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_job: Option<String>,

    /// Jobs finished on this machine, whatever their outcome.
    #[serde(default)]
    pub jobs_completed: i64,

    /// When the machine started billing: the provider's creation time once it reports one,
    /// until then the moment the provider was asked for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provisioning_started_at: Option<MicroTime>,

    /// When the machine first became Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_at: Option<MicroTime>,

    /// When the last job on the machine finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_job_finished_at: Option<MicroTime>,

    /// Since when the machine has been idle (last job finished, or Ready).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_since: Option<MicroTime>,

    /// idleSince plus the pool's idleTimeoutSeconds: when the machine is destroyed if still idle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_deadline: Option<MicroTime>,

    /// USD billed for the machine so far (price times seconds alive), decimal string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(MONEY_PATTERN))]
    pub accrued_cost: Option<Money>,

    /// Human-readable note on the current phase, without credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,

    /// Ready, TeardownFailing and similar conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}

impl GpuInstanceStatus {
    /// Failed with `message`; the reconciler then deletes the object, whose finalizer
    /// destroys the machine.
    pub fn fail(&mut self, reason: &str, message: String, generation: Option<i64>, now: Timestamp) {
        self.phase = Some(InstancePhase::Failed);
        set_condition(
            &mut self.conditions,
            ConditionType::Ready,
            false,
            reason,
            &message,
            generation,
            now,
        );
        self.message = Some(message);
    }

    /// Idle from `since`, to be destroyed `idle_timeout_seconds` later if still idle.
    pub fn idle_from(&mut self, since: Timestamp, idle_timeout_seconds: i64) {
        self.idle_since = Some(MicroTime(since));
        self.idle_deadline = Some(MicroTime(
            since
                .saturating_add(SignedDuration::from_secs(idle_timeout_seconds.max(0)))
                .unwrap_or(since),
        ));
    }

    /// The job on the machine finished at `now`: nothing runs on it any more, one more job
    /// is counted, and a Ready machine is idle from now.
    pub fn free(&mut self, now: Timestamp, idle_timeout_seconds: i64) {
        self.current_job = None;
        self.jobs_completed += 1;
        self.last_job_finished_at = Some(MicroTime(now));
        if self.phase == Some(InstancePhase::Ready) {
            self.idle_from(now, idle_timeout_seconds);
        }
    }

    /// When the machine started being idle: its last job's end, else when it became Ready.
    pub fn idle_start(&self) -> Option<Timestamp> {
        self.idle_since
            .as_ref()
            .or(self.ready_at.as_ref())
            .map(|t| t.0)
    }

    /// Ready with no job on it.
    pub fn is_idle(&self) -> bool {
        self.phase == Some(InstancePhase::Ready) && self.current_job.is_none()
    }
}

#[cfg(test)]
mod transitions {
    use super::*;

    #[test]
    fn freeing_a_ready_instance_starts_its_idle_clock() {
        let t0: Timestamp = "2026-12-01T10:00:00Z".parse().unwrap();
        let mut s = GpuInstanceStatus {
            phase: Some(InstancePhase::Ready),
            current_job: Some("job-1".into()),
            ready_at: Some(MicroTime(t0)),
            ..Default::default()
        };
        assert!(!s.is_idle());
        assert_eq!(s.idle_start(), Some(t0));
        let t1 = t0 + SignedDuration::from_secs(42);
        s.free(t1, 300);
        assert!(s.is_idle());
        assert_eq!(s.jobs_completed, 1);
        assert_eq!(s.idle_start(), Some(t1));
        assert_eq!(
            s.idle_deadline.as_ref().map(|t| t.0),
            Some(t1 + SignedDuration::from_secs(300))
        );
        // Freed while Terminating: counted, but no idle clock.
        let mut t = GpuInstanceStatus {
            phase: Some(InstancePhase::Terminating),
            current_job: Some("job-2".into()),
            ..Default::default()
        };
        t.free(t1, 300);
        assert_eq!(
            (t.current_job.clone(), t.idle_deadline.clone()),
            (None, None)
        );
        t.fail("MachineLost", "gone".into(), Some(2), t1);
        assert_eq!(t.phase, Some(InstancePhase::Failed));
        assert_eq!(t.message.as_deref(), Some("gone"));
        assert_eq!(t.conditions[0].reason, "MachineLost");
    }
}
