//! What a request becomes: one VideoJob, found again by its Idempotency-Key, and the wait for
//! its outcome.
//!
//! Idempotency rests on the API server's name uniqueness: a request with a key creates the job
//! `gw-<hash of client and key>`, so a retry (after a dropped connection, on another replica,
//! after a restart) gets AlreadyExists and attaches to the job instead of starting another.
//! The job carries the hash of what was asked, so the same key with another request is told
//! apart and refused.

use std::{sync::Arc, time::Duration};

use kube::{
    ResourceExt,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams, Preconditions},
};
use serde_json::{Map, Value, json};
use tokio::time::Instant;
use tracing::{info, warn};

use super::{
    CALLBACK_FINALIZER, CALLBACK_STATE_ANNOTATION, CALLBACK_URL_ANNOTATION, CLIENT_LABEL,
    GatewayState, REQUEST_HASH_ANNOTATION,
    auth::{hex, sha256},
    callback::Delivery,
    routes::ApiError,
};
use crate::crd::{ConditionType, JobPhase, TIMED_OUT_REASON, VideoJob, VideoJobSpec};

/// Why a pending job cannot be placed and will not be soon: the pool's providers have no
/// capacity or are misconfigured. The pool's own limits (maxInstances, maxHourlySpend) are not
/// among them: a job behind them is queued behind busy machines and runs when one frees.
pub const NO_CAPACITY_REASONS: &[&str] =
    &["NoProviderAvailable", "UnknownProvider", "PoolNotFound"];

/// A validated request.
#[derive(Debug, Clone)]
pub struct Submission {
    pub client: String,
    pub operation: String,
    pub input: Map<String, Value>,
    pub pool: String,
    pub timeout_seconds: Option<i64>,
    pub max_retries: Option<i32>,
    pub callback_url: Option<String>,
    pub idempotency_key: Option<String>,
}

impl Submission {
    /// sha256 of everything that decides what runs (not the callback, not the wait).
    pub fn request_hash(&self) -> String {
        let canonical = json!({
            "operation": self.operation,
            "input": canonical(&Value::Object(self.input.clone())),
            "pool": self.pool,
            "timeoutSeconds": self.timeout_seconds,
            "maxRetries": self.max_retries,
        });
        hex(&sha256(canonical.to_string().as_bytes()))
    }

    /// The job name for an Idempotency-Key: the same for every replica and restart.
    pub fn job_name(&self) -> Option<String> {
        let key = self.idempotency_key.as_ref()?;
        let mut material = self.client.as_bytes().to_vec();
        material.push(0);
        material.extend_from_slice(key.as_bytes());
        Some(format!("gw-{}", &hex(&sha256(&material))[..20]))
    }

    /// The VideoJob to create.
    pub fn to_job(&self, ttl_seconds: i64) -> VideoJob {
        let mut labels = std::collections::BTreeMap::new();
        labels.insert(CLIENT_LABEL.to_string(), self.client.clone());
        let mut annotations = std::collections::BTreeMap::new();
        annotations.insert(REQUEST_HASH_ANNOTATION.to_string(), self.request_hash());
        let mut finalizers = None;
        if let Some(url) = &self.callback_url {
            annotations.insert(CALLBACK_URL_ANNOTATION.to_string(), url.clone());
            annotations.insert(
                CALLBACK_STATE_ANNOTATION.to_string(),
                serde_json::to_string(&Delivery::default()).unwrap_or_default(),
            );
            finalizers = Some(vec![CALLBACK_FINALIZER.to_string()]);
        }
        let name = self.job_name();
        let metadata = ObjectMeta {
            generate_name: name.is_none().then(|| "gw-".to_string()),
            name,
            labels: Some(labels),
            annotations: Some(annotations),
            finalizers,
            ..ObjectMeta::default()
        };
        // Omitted fields take the CRD's defaults, as for a job written by hand.
        let mut spec = json!({
            "pool": self.pool,
            "operation": self.operation,
            "input": self.input,
        });
        if let Some(t) = self.timeout_seconds {
            spec["timeoutSeconds"] = json!(t);
        }
        if let Some(r) = self.max_retries {
            spec["maxRetries"] = json!(r);
        }
        if ttl_seconds > 0 {
            spec["ttlSecondsAfterFinished"] = json!(ttl_seconds);
        }
        let spec: VideoJobSpec = serde_json::from_value(spec).expect("a valid VideoJobSpec");
        VideoJob {
            metadata,
            spec,
            status: None,
        }
    }
}

/// `v` with every object's keys sorted, so equal JSON hashes equal.
fn canonical(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            let mut out = Map::new();
            for k in keys {
                out.insert(k.clone(), canonical(&m[k]));
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

/// Creates the job, or attaches to the one its Idempotency-Key made before.
/// Returns the job and whether it already existed.
pub async fn create_or_attach(
    state: &GatewayState,
    sub: &Submission,
) -> Result<(VideoJob, bool), ApiError> {
    let job = sub.to_job(state.config.job_ttl_seconds);
    let api = state.jobs();
    match api.create(&PostParams::default(), &job).await {
        Ok(created) => {
            info!(client = %sub.client, job = %created.name_any(), operation = %sub.operation, "job created");
            Ok((created, false))
        }
        Err(kube::Error::Api(e)) if e.code == 409 && sub.idempotency_key.is_some() => {
            let name = job.metadata.name.clone().unwrap_or_default();
            let existing = api.get(&name).await.map_err(ApiError::kube)?;
            let hash = existing
                .annotations()
                .get(REQUEST_HASH_ANNOTATION)
                .cloned()
                .unwrap_or_default();
            if hash != sub.request_hash() {
                return Err(ApiError::new(
                    422,
                    "IdempotencyKeyReused",
                    "this Idempotency-Key was used with a different request",
                )
                .field("Idempotency-Key"));
            }
            if existing.metadata.deletion_timestamp.is_some() && !is_finished(&existing) {
                return Err(ApiError::new(
                    409,
                    "JobCancelled",
                    "the job of this Idempotency-Key was cancelled; retry with a new key",
                )
                .field("Idempotency-Key"));
            }
            info!(client = %sub.client, job = %name, "retry attached to its job");
            Ok((existing, true))
        }
        Err(kube::Error::Api(e)) if e.code == 422 || e.code == 400 => Err(ApiError::new(
            400,
            "InvalidRequest",
            &format!("the API server refused the job: {}", e.message),
        )),
        Err(e) => Err(ApiError::kube(e)),
    }
}

pub fn is_finished(job: &VideoJob) -> bool {
    job.status
        .as_ref()
        .and_then(|s| s.phase)
        .is_some_and(JobPhase::is_finished)
}

/// The reason the job cannot be placed now, when it is one of [`NO_CAPACITY_REASONS`].
pub fn no_capacity_reason(job: &VideoJob) -> Option<String> {
    let s = job.status.as_ref()?;
    if !matches!(s.phase, None | Some(JobPhase::Pending)) {
        return None;
    }
    let c = s
        .conditions
        .iter()
        .find(|c| c.type_ == ConditionType::Scheduled.as_str() && c.status == "False")?;
    NO_CAPACITY_REASONS
        .contains(&c.reason.as_str())
        .then(|| c.reason.clone())
}

/// How a wait ended.
#[derive(Debug)]
pub enum Waited {
    /// Succeeded or Failed.
    Finished(VideoJob),
    /// The wait limit passed first; the job goes on.
    StillRunning(VideoJob),
    /// No capacity for `capacity_wait`: the job was withdrawn (deleted before it started).
    NoCapacity(VideoJob, String),
    /// Deleted (cancelled) while waiting.
    Gone(VideoJob),
}

/// Waits for the job `created` to finish, at most `limit`; withdraws it when it stays
/// without capacity for `capacity_wait` (only if `may_withdraw`).
pub async fn wait(
    state: &Arc<GatewayState>,
    created: VideoJob,
    limit: Duration,
    capacity_wait: Duration,
    may_withdraw: bool,
) -> Waited {
    let name = created.name_any();
    let uid = created.uid();
    // Subscribe before reading, so no change between the read and the wait is missed.
    let mut waiter = state.waiters.subscribe(&name);
    let mut draining = state.draining.subscribe();
    let start = Instant::now();
    let deadline = start + limit;
    let capacity_deadline = start + capacity_wait;
    let mut last = created;
    let mut seen = false;
    state.metrics.waits_in_flight.inc();
    let _in_flight = scopeguard(|| {
        state.metrics.waits_in_flight.dec();
    });
    loop {
        match state.job(&name) {
            Some(job) if job.uid() == uid => {
                seen = true;
                last = (*job).clone();
                if is_finished(&last) {
                    return Waited::Finished(last);
                }
            }
            // Another job of the same name: ours is gone.
            Some(_) => return Waited::Gone(last),
            None if seen => return Waited::Gone(last),
            None => {}
        }
        let now = Instant::now();
        if may_withdraw
            && now >= capacity_deadline
            && let Some(reason) = no_capacity_reason(&last)
        {
            match withdraw(state, &last).await {
                Ok(true) => return Waited::NoCapacity(last, reason),
                Ok(false) => {}
                Err(e) => {
                    warn!(job = %name, error = %e, "could not withdraw a job without capacity")
                }
            }
        }
        if now >= deadline {
            return Waited::StillRunning(last);
        }
        let next = if may_withdraw && now < capacity_deadline {
            capacity_deadline.min(deadline)
        } else if may_withdraw {
            // Without capacity but the withdrawal lost a race: look again soon.
            (now + Duration::from_secs(1)).min(deadline)
        } else {
            deadline
        };
        tokio::select! {
            r = waiter.rx.changed() => if r.is_err() { return Waited::StillRunning(last) },
            () = tokio::time::sleep_until(next) => {}
            // The gateway is stopping: the caller gets the job's Location now.
            _ = draining.wait_for(|d| *d) => return Waited::StillRunning(last),
        }
    }
}

/// Deletes a job that never started, with the resourceVersion it was seen at as the
/// precondition: if the operator bound it meanwhile, nothing is deleted (false).
async fn withdraw(state: &GatewayState, job: &VideoJob) -> Result<bool, kube::Error> {
    let api = state.jobs();
    let name = job.name_any();
    let mut rv = job.resource_version();
    if job.finalizers().iter().any(|f| f == CALLBACK_FINALIZER) {
        // The caller hears the outcome now, as a 503: no callback for a withdrawn job.
        let rest: Vec<&String> = job
            .finalizers()
            .iter()
            .filter(|f| *f != CALLBACK_FINALIZER)
            .collect();
        let patch = json!({"metadata": {
            "resourceVersion": rv,
            "finalizers": rest,
            "annotations": {CALLBACK_STATE_ANNOTATION: serde_json::to_string(&Delivery::withdrawn()).unwrap_or_default()},
        }});
        match api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(patched) => rv = patched.resource_version(),
            Err(kube::Error::Api(e)) if e.code == 409 => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            uid: job.uid(),
            resource_version: rv,
        }),
        ..DeleteParams::default()
    };
    match api.delete(&name, &dp).await {
        Ok(_) => {
            info!(job = %name, "withdrew a job the pool has no capacity for");
            Ok(true)
        }
        Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Runs `f` when dropped.
fn scopeguard<F: FnMut()>(f: F) -> impl Drop {
    struct Guard<F: FnMut()>(F);
    impl<F: FnMut()> Drop for Guard<F> {
        fn drop(&mut self) {
            (self.0)()
        }
    }
    Guard(f)
}

/// What the gateway shows of a job: to its client, and in callbacks.
pub fn view(job: &VideoJob) -> Value {
    let s = job.status.clone().unwrap_or_default();
    let cancelled = job.metadata.deletion_timestamp.is_some() && !is_finished(job);
    let phase = if cancelled {
        "Cancelled".to_string()
    } else {
        s.phase
            .map(|p| format!("{p:?}"))
            .unwrap_or_else(|| "Pending".into())
    };
    let reason = s.finish_reason().map(str::to_string).or_else(|| {
        s.conditions
            .iter()
            .find(|c| c.type_ == ConditionType::Scheduled.as_str() && c.status == "False")
            .map(|c| c.reason.clone())
    });
    let mut v = json!({
        "name": job.name_any(),
        "uid": job.uid(),
        "client": job.labels().get(CLIENT_LABEL),
        "operation": job.spec.operation,
        "pool": job.spec.pool,
        "phase": phase,
        "attempts": s.attempts,
        "createdAt": job.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string()),
        "location": format!("/jobs/{}", job.name_any()),
    });
    let m = v.as_object_mut().expect("an object");
    let mut put = |k: &str, val: Option<Value>| {
        if let Some(val) = val {
            m.insert(k.to_string(), val);
        }
    };
    put("reason", reason.map(Value::from));
    put(
        "startedAt",
        s.started_at.map(|t| Value::from(t.0.to_string())),
    );
    put(
        "finishedAt",
        s.finished_at.map(|t| Value::from(t.0.to_string())),
    );
    put("instance", s.instance.map(Value::from));
    put("provider", s.provider.map(Value::from));
    put("cost", s.cost.map(|c| Value::from(c.to_string())));
    put("output", s.output);
    put("error", s.error.map(Value::from));
    v
}

/// The HTTP status a finished job answers with.
pub fn finished_status(job: &VideoJob) -> u16 {
    let s = job.status.as_ref();
    match s.and_then(|s| s.phase) {
        Some(JobPhase::Succeeded) => 200,
        _ if s.and_then(|s| s.finish_reason()) == Some(TIMED_OUT_REASON) => 504,
        _ => 502,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(key: Option<&str>, input: Value) -> Submission {
        Submission {
            client: "vps".into(),
            operation: "caption".into(),
            input: input.as_object().unwrap().clone(),
            pool: "default".into(),
            timeout_seconds: None,
            max_retries: Some(1),
            callback_url: None,
            idempotency_key: key.map(str::to_string),
        }
    }

    #[test]
    fn the_same_key_names_the_same_job_for_the_same_client_only() {
        let a = sub(Some("k1"), json!({}));
        assert_eq!(a.job_name(), sub(Some("k1"), json!({"x": 1})).job_name());
        assert_ne!(a.job_name(), sub(Some("k2"), json!({})).job_name());
        let mut other = a.clone();
        other.client = "vps2".into();
        assert_ne!(a.job_name(), other.job_name());
        let name = a.job_name().unwrap();
        assert!(name.starts_with("gw-") && name.len() == 23, "{name}");
        assert_eq!(sub(None, json!({})).job_name(), None);
    }

    #[test]
    fn the_request_hash_ignores_key_order_but_not_values() {
        let a = sub(
            None,
            json!({"a": 1, "b": {"c": 2, "d": [1, {"y": 1, "x": 2}]}}),
        );
        let b = sub(
            None,
            json!({"b": {"d": [1, {"x": 2, "y": 1}], "c": 2}, "a": 1}),
        );
        assert_eq!(a.request_hash(), b.request_hash());
        assert_ne!(a.request_hash(), sub(None, json!({"a": 2})).request_hash());
        let mut t = a.clone();
        t.timeout_seconds = Some(5);
        assert_ne!(a.request_hash(), t.request_hash());
        // The callback does not change what runs.
        let mut c = a.clone();
        c.callback_url = Some("https://example.com/cb".into());
        assert_eq!(a.request_hash(), c.request_hash());
    }

    #[test]
    fn the_job_carries_the_client_the_hash_and_a_pending_callback() {
        let mut s = sub(Some("k"), json!({"videoUrl": "https://x/v.mp4"}));
        s.callback_url = Some("https://example.com/cb".into());
        let job = s.to_job(3600);
        assert_eq!(job.labels()[CLIENT_LABEL], "vps");
        assert_eq!(job.annotations()[REQUEST_HASH_ANNOTATION], s.request_hash());
        assert_eq!(job.finalizers(), [CALLBACK_FINALIZER]);
        assert_eq!(job.spec.ttl_seconds_after_finished, Some(3600));
        assert_eq!(job.spec.max_retries, 1);
        assert_eq!(
            job.spec.timeout_seconds,
            crate::crd::job::DEFAULT_JOB_TIMEOUT_SECONDS
        );
        assert!(job.metadata.generate_name.is_none());
        let anon = sub(None, json!({})).to_job(0);
        assert_eq!(anon.metadata.generate_name.as_deref(), Some("gw-"));
        assert_eq!(anon.spec.ttl_seconds_after_finished, None);
        assert!(anon.finalizers().is_empty());
    }

    fn job_with(status: Value) -> VideoJob {
        let mut job = sub(None, json!({})).to_job(0);
        job.metadata.name = Some("gw-x".into());
        job.status = Some(serde_json::from_value(status).unwrap());
        job
    }

    #[test]
    fn a_finished_job_answers_200_502_or_504_and_only_no_capacity_withdraws() {
        let cond = |t: &str, s: &str, r: &str| {
            json!({"type": t, "status": s, "reason": r, "message": "m",
                   "lastTransitionTime": "2026-01-01T00:00:00Z"})
        };
        let ok = job_with(json!({"phase": "Succeeded", "output": {"a": 1},
            "conditions": [cond("Complete", "True", "WorkerSucceeded")]}));
        assert_eq!(finished_status(&ok), 200);
        assert_eq!(view(&ok)["output"], json!({"a": 1}));
        let timed_out = job_with(json!({"phase": "Failed",
            "conditions": [cond("Complete", "False", "TimedOut")]}));
        assert_eq!(finished_status(&timed_out), 504);
        let rejected = job_with(json!({"phase": "Failed", "error": "422 from the worker",
            "conditions": [cond("Complete", "False", "Rejected")]}));
        assert_eq!(finished_status(&rejected), 502);
        assert_eq!(view(&rejected)["reason"], "Rejected");
        let waiting = |r: &str| {
            job_with(json!({"phase": "Pending", "conditions": [cond("Scheduled", "False", r)]}))
        };
        assert_eq!(
            no_capacity_reason(&waiting("NoProviderAvailable")).as_deref(),
            Some("NoProviderAvailable")
        );
        for queued in [
            "MaxInstances",
            "MaxHourlySpend",
            "InstanceStarting",
            "Waiting",
        ] {
            assert_eq!(no_capacity_reason(&waiting(queued)), None, "{queued}");
        }
        assert_eq!(view(&waiting("MaxInstances"))["reason"], "MaxInstances");
    }
}
