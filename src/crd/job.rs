//! `VideoJob`: one unit of video work sent to a worker.
//!
//! Types and schema only. The job's identity fields are immutable once created, as for a
//! batch/v1 Job: what ran is what was asked.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::common::{
    ConditionType, DNS_LABEL_PATTERN, MONEY_PATTERN, Money, any_json_value, conditions_schema,
    free_form_object, set_condition,
};
use super::pool::MAX_TIMEOUT_SECONDS;
use jiff::Timestamp;

/// Shape of an operation name; the worker serves it at `/video/{operation}`.
pub const OPERATION_PATTERN: &str = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$";
/// Default per-attempt timeout.
pub const DEFAULT_JOB_TIMEOUT_SECONDS: i64 = 600;
/// Default retries after infrastructure failures.
pub const DEFAULT_MAX_RETRIES: i32 = 2;
/// The `Complete=False` reason of a job whose last attempt ran out of its timeoutSeconds.
pub const TIMED_OUT_REASON: &str = "TimedOut";
/// Preemptions a job survives; the next one fails it (a bound apart from maxRetries, so a
/// job on machines that keep being taken back does not loop for ever).
pub const MAX_PREEMPTIONS: i32 = 5;

/// A unit of video work: the operator runs it on a warm instance of the pool, or rents one.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "gpupool.dev",
    version = "v1alpha1",
    kind = "VideoJob",
    plural = "videojobs",
    shortname = "vj",
    category = "gpupool",
    namespaced,
    status = "VideoJobStatus",
    derive = "PartialEq",
    doc = "One unit of video work run on a GPU machine of a GpuPool.",
    printcolumn(
        name = "Pool",
        type_ = "string",
        json_path = ".spec.pool",
        description = "Pool the job runs in"
    ),
    printcolumn(
        name = "Operation",
        type_ = "string",
        json_path = ".spec.operation",
        description = "Worker operation"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Pending, Scheduled, Running, Succeeded or Failed"
    ),
    printcolumn(
        name = "Instance",
        type_ = "string",
        json_path = ".status.instance",
        description = "GpuInstance or serverless job running it"
    ),
    printcolumn(
        name = "Attempts",
        type_ = "integer",
        json_path = ".status.attempts",
        description = "Attempts made"
    ),
    printcolumn(
        name = "Cost",
        type_ = "string",
        json_path = ".status.cost",
        priority = 1,
        description = "USD share of the machine bill"
    ),
    printcolumn(
        name = "Error",
        type_ = "string",
        json_path = ".status.error",
        priority = 1,
        description = "Why the job failed"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.provider) == has(oldSelf.provider) && (!has(self.provider) || self.provider == oldSelf.provider)").message("provider is immutable").field_path(".provider"))]
pub struct VideoJobSpec {
    /// Name of the GpuPool, in the same namespace, that runs the job. Immutable.
    #[serde(default = "default_pool")]
    #[schemars(length(min = 1, max = 63), pattern(DNS_LABEL_PATTERN))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("pool is immutable"))]
    pub pool: String,

    /// Worker operation, sent as `POST /video/{operation}`: lower-case letters, digits and
    /// dashes, at most 63 characters. Immutable.
    #[schemars(length(min = 1, max = 63), pattern(OPERATION_PATTERN))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("operation is immutable"))]
    pub operation: String,

    /// The job's input: any JSON object, sent to the worker as the request body (and as
    /// `input` to a serverless endpoint). Immutable.
    #[serde(default)]
    #[schemars(schema_with = "free_form_object")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("input is immutable"))]
    pub input: Map<String, Value>,

    /// Seconds one attempt may run before it counts as failed and is retried.
    /// Between 1 and 86400.
    #[serde(default = "default_timeout")]
    #[schemars(range(min = 1, max = MAX_TIMEOUT_SECONDS))]
    pub timeout_seconds: i64,

    /// Retries after infrastructure failures (5xx, timeouts, lost machines). A 4xx answer
    /// from the worker fails the job without retry.
    #[serde(default = "default_max_retries")]
    #[schemars(range(min = 0, max = 10))]
    pub max_retries: i32,

    /// Run only on this provider entry of the pool. Unset: any. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), pattern(DNS_LABEL_PATTERN))]
    pub provider: Option<String>,

    /// Seconds after the job finished when it is deleted, as for batch/v1 Job. Unset: kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 31_536_000))]
    pub ttl_seconds_after_finished: Option<i64>,
}

fn default_pool() -> String {
    "default".into()
}
fn default_timeout() -> i64 {
    DEFAULT_JOB_TIMEOUT_SECONDS
}
fn default_max_retries() -> i32 {
    DEFAULT_MAX_RETRIES
}

/// Life-cycle phase of a VideoJob.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum JobPhase {
    /// Waiting for an instance.
    #[default]
    Pending,
    /// Bound to an instance or serverless endpoint, not yet sent.
    Scheduled,
    /// Sent; the worker is running it.
    Running,
    /// The worker answered 2xx; the output is in status.
    Succeeded,
    /// The worker refused it, or every attempt failed.
    Failed,
}

impl JobPhase {
    /// Succeeded and Failed are final.
    pub fn is_finished(self) -> bool {
        matches!(self, JobPhase::Succeeded | JobPhase::Failed)
    }
}

/// Observed state of a job, written by the operator.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VideoJobStatus {
    /// The metadata.generation this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Pending, Scheduled, Running, Succeeded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<JobPhase>,

    /// Name of the GpuInstance running the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,

    /// Provider entry of the pool that runs the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,

    /// Job id at a RunPod Serverless endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_job_id: Option<String>,

    /// Attempts made so far, the current one included.
    #[serde(default)]
    pub attempts: i32,

    /// When the job was bound to an instance or endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_at: Option<MicroTime>,

    /// When the current attempt was sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<MicroTime>,

    /// When the job reached Succeeded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<MicroTime>,

    /// The worker's JSON response, when it fits the output cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_json_value")]
    pub output: Option<Value>,

    /// Why the job failed, or the last attempt's error while it is retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,

    /// Attempts lost because an interruptible machine was taken back by its provider. They
    /// do not count against maxRetries; a job preempted more than 5 times fails.
    #[serde(default)]
    pub preemptions: i32,

    /// This job's share of the machine bill in USD, decimal string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(MONEY_PATTERN))]
    pub cost: Option<Money>,

    /// Scheduled, Complete, Failed and similar conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}

impl VideoJobStatus {
    /// Scheduled on `instance` of provider entry `provider` (no instance: a serverless entry),
    /// at `now`. A remote job id of an earlier attempt is forgotten.
    pub fn bind(&mut self, instance: Option<&str>, provider: &str, now: jiff::Timestamp) {
        self.phase = Some(JobPhase::Scheduled);
        self.instance = instance.map(String::from);
        self.provider = Some(provider.to_string());
        self.remote_job_id = None;
        self.scheduled_at = Some(MicroTime(now));
    }

    /// Back to Pending, bound to nothing, for the pool to place again.
    pub fn requeue(&mut self) {
        self.phase = Some(JobPhase::Pending);
        self.instance = None;
        self.provider = None;
        self.remote_job_id = None;
    }

    /// The next attempt is under way from `now`: Running on `instance` (`None`: at a
    /// serverless entry) of provider entry `provider`, `Scheduled=True` with `reason`.
    pub fn start_attempt(
        &mut self,
        instance: Option<&str>,
        provider: &str,
        reason: &str,
        message: &str,
        generation: Option<i64>,
        now: Timestamp,
    ) {
        if self.phase != Some(JobPhase::Scheduled) {
            self.scheduled_at = Some(MicroTime(now));
        }
        self.phase = Some(JobPhase::Running);
        self.observed_generation = generation;
        self.instance = instance.map(String::from);
        self.provider = Some(provider.to_string());
        self.remote_job_id = None;
        self.attempts += 1;
        self.started_at = Some(MicroTime(now));
        set_condition(
            &mut self.conditions,
            ConditionType::Scheduled,
            true,
            reason,
            message,
            generation,
            now,
        );
    }

    /// The attempt failed and another is allowed: back to Pending with `error` kept.
    pub fn retry(
        &mut self,
        error: String,
        reason: &str,
        message: &str,
        generation: Option<i64>,
        now: Timestamp,
    ) {
        self.requeue();
        self.error = Some(error);
        set_condition(
            &mut self.conditions,
            ConditionType::Scheduled,
            false,
            reason,
            message,
            generation,
            now,
        );
    }

    /// Finished with `output`: Succeeded, `Complete=True` with `reason`.
    pub fn succeed(
        &mut self,
        output: serde_json::Value,
        reason: &str,
        message: &str,
        generation: Option<i64>,
        now: Timestamp,
    ) {
        self.phase = Some(JobPhase::Succeeded);
        self.output = Some(output);
        self.error = None;
        self.finished_at = Some(MicroTime(now));
        set_condition(
            &mut self.conditions,
            ConditionType::Complete,
            true,
            reason,
            message,
            generation,
            now,
        );
    }

    /// Finished without a result: Failed, `Complete=False` with `reason` and `error`.
    pub fn fail(&mut self, reason: &str, error: String, generation: Option<i64>, now: Timestamp) {
        self.phase = Some(JobPhase::Failed);
        self.finished_at = Some(MicroTime(now));
        set_condition(
            &mut self.conditions,
            ConditionType::Complete,
            false,
            reason,
            &error,
            generation,
            now,
        );
        self.error = Some(error);
    }

    /// Attempts that count against maxRetries: all but those lost to a preemption.
    pub fn charged_attempts(&self) -> i32 {
        self.attempts - self.preemptions
    }

    /// Whether another attempt is allowed after this one failed through the job's own fault
    /// (or its machine's), given `max_retries`.
    pub fn may_retry(&self, max_retries: i32) -> bool {
        self.charged_attempts() <= max_retries
    }

    /// The attempt was lost because the provider took an interruptible machine back: back to
    /// Pending without spending a retry, unless the job was preempted too often already. The
    /// event reason comes back.
    pub fn preempt(
        &mut self,
        why: String,
        generation: Option<i64>,
        now: Timestamp,
    ) -> &'static str {
        self.preemptions += 1;
        if self.preemptions > MAX_PREEMPTIONS {
            let error = format!("{why} (preempted {} times)", self.preemptions);
            self.fail("PreemptedTooOften", error, generation, now);
            "Failed"
        } else {
            self.retry(why.clone(), "Preempted", &why, generation, now);
            "Preempted"
        }
    }

    /// The reason of the `Complete` condition once the job is finished: `WorkerSucceeded`,
    /// [`TIMED_OUT_REASON`], `RetriesExhausted`, a worker error's label, `PreemptedTooOften`.
    pub fn finish_reason(&self) -> Option<&str> {
        self.phase.filter(|p| p.is_finished())?;
        self.conditions
            .iter()
            .find(|c| c.type_ == ConditionType::Complete.as_str())
            .map(|c| c.reason.as_str())
    }

    /// The outcome's name for metrics and events, once the job is finished.
    pub fn outcome(&self) -> Option<&'static str> {
        match self.phase {
            Some(JobPhase::Succeeded) => Some("Succeeded"),
            Some(JobPhase::Failed) => Some("Failed"),
            _ => None,
        }
    }
}

#[cfg(test)]
mod transitions {
    use super::{JobPhase, VideoJobStatus};
    use crate::crd::ConditionType;

    fn cond(s: &VideoJobStatus, t: ConditionType) -> (String, String) {
        let c = s.conditions.iter().find(|c| c.type_ == t.as_str()).unwrap();
        (c.status.clone(), c.reason.clone())
    }

    #[test]
    fn an_attempt_runs_then_retries_then_fails_or_succeeds() {
        let t0: jiff::Timestamp = "2026-12-01T10:00:00Z".parse().unwrap();
        let t1: jiff::Timestamp = "2026-12-01T10:01:00Z".parse().unwrap();
        let mut s = VideoJobStatus::default();
        s.bind(Some("gi-1"), "vast", t0);
        s.start_attempt(Some("gi-1"), "vast", "Dispatched", "sent", Some(3), t1);
        assert_eq!(s.phase, Some(JobPhase::Running));
        assert_eq!(s.attempts, 1);
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!(
            s.scheduled_at.as_ref().map(|t| t.0),
            Some(t0),
            "kept from the bind"
        );
        assert_eq!(s.started_at.as_ref().map(|t| t.0), Some(t1));
        assert_eq!(
            cond(&s, ConditionType::Scheduled),
            ("True".into(), "Dispatched".into())
        );

        s.retry("boom".into(), "Retrying", "attempt 1 failed", Some(3), t1);
        assert_eq!(s.phase, Some(JobPhase::Pending));
        assert_eq!(
            (s.instance.clone(), s.error.as_deref()),
            (None, Some("boom"))
        );
        assert_eq!(
            cond(&s, ConditionType::Scheduled),
            ("False".into(), "Retrying".into())
        );
        assert_eq!(s.outcome(), None);

        // Restarted from Pending (no bind in between): scheduled now.
        s.start_attempt(None, "rp", "Submitted", "queued", Some(3), t1);
        assert_eq!(s.attempts, 2);
        assert_eq!(s.scheduled_at.as_ref().map(|t| t.0), Some(t1));

        let mut failed = s.clone();
        failed.fail("RetriesExhausted", "boom again".into(), Some(3), t1);
        assert_eq!(failed.outcome(), Some("Failed"));
        assert_eq!(failed.error.as_deref(), Some("boom again"));
        assert_eq!(failed.finished_at.as_ref().map(|t| t.0), Some(t1));
        assert_eq!(
            cond(&failed, ConditionType::Complete),
            ("False".into(), "RetriesExhausted".into())
        );

        s.succeed(
            serde_json::json!({"ok": true}),
            "WorkerSucceeded",
            "2xx",
            Some(3),
            t1,
        );
        assert_eq!(s.outcome(), Some("Succeeded"));
        assert_eq!(
            s.error, None,
            "a retried error does not outlive the success"
        );
        assert_eq!(
            cond(&s, ConditionType::Complete),
            ("True".into(), "WorkerSucceeded".into())
        );
    }

    #[test]
    fn bind_then_requeue_leaves_nothing_bound() {
        let now: jiff::Timestamp = "2026-12-01T10:00:00Z".parse().unwrap();
        let mut s = VideoJobStatus {
            remote_job_id: Some("old".into()),
            attempts: 1,
            ..Default::default()
        };
        s.bind(Some("gi-1"), "vast", now);
        assert_eq!(s.phase, Some(JobPhase::Scheduled));
        assert_eq!(
            (s.instance.as_deref(), s.provider.as_deref()),
            (Some("gi-1"), Some("vast"))
        );
        assert_eq!(s.remote_job_id, None);
        assert_eq!(s.scheduled_at.as_ref().map(|t| t.0), Some(now));
        s.remote_job_id = Some("r-1".into());
        s.requeue();
        assert_eq!(s.phase, Some(JobPhase::Pending));
        assert_eq!(
            (
                s.instance.clone(),
                s.provider.clone(),
                s.remote_job_id.clone()
            ),
            (None, None, None)
        );
        assert_eq!(s.attempts, 1, "an attempt used stays used");
        s.bind(None, "rp-serverless", now);
        assert_eq!(s.instance, None);
    }

    #[test]
    fn preemptions_do_not_spend_retries_but_are_bounded() {
        let now: jiff::Timestamp = "2026-12-01T10:00:00Z".parse().unwrap();
        let mut s = VideoJobStatus::default();
        for n in 1..=super::MAX_PREEMPTIONS {
            s.start_attempt(Some("gi"), "vast", "Dispatched", "sent", None, now);
            assert_eq!(s.preempt("outbid".into(), None, now), "Preempted");
            assert_eq!(s.preemptions, n);
            assert_eq!(s.charged_attempts(), 0);
            assert!(s.may_retry(0), "a job with no retries still runs again");
            assert_eq!(s.phase, Some(JobPhase::Pending));
        }
        s.start_attempt(Some("gi"), "vast", "Dispatched", "sent", None, now);
        assert_eq!(s.preempt("outbid".into(), None, now), "Failed");
        assert_eq!(s.phase, Some(JobPhase::Failed));
        assert_eq!(cond(&s, ConditionType::Complete).1, "PreemptedTooOften");
    }
}
