//! `GET /pool/stats`: the shape a video app's orchestrator answered (`total`, `busy`, `idle`,
//! and per instance `id`, `status`, `idleMinutes`, `ageMinutes`), from the GpuInstance cache,
//! plus what gpupool knows besides: machines starting, jobs waiting and spend per hour.

use jiff::Timestamp;
use kube::ResourceExt;
use serde_json::{Value, json};

use crate::crd::{GpuInstance, GpuPool, InstancePhase, Money};

/// What one instance is doing, in the orchestrator's words.
fn status_of(inst: &GpuInstance) -> &'static str {
    if inst.metadata.deletion_timestamp.is_some() {
        return "terminating";
    }
    let s = inst.status.as_ref();
    match s.and_then(|s| s.phase).unwrap_or_default() {
        InstancePhase::Pending | InstancePhase::Provisioning => "starting",
        InstancePhase::Ready
            if s.and_then(|s| s.current_job.as_deref())
                .is_some_and(|j| !j.is_empty()) =>
        {
            "busy"
        }
        InstancePhase::Ready => "idle",
        InstancePhase::Terminating => "terminating",
        InstancePhase::Failed => "failed",
    }
}

fn minutes_since(t: Option<Timestamp>, now: Timestamp) -> f64 {
    t.map(|t| (now.duration_since(t).as_secs_f64() / 60.0).max(0.0))
        .map(|m| (m * 10.0).round() / 10.0)
        .unwrap_or(0.0)
}

/// The stats of `pool` (every pool when `None`) at `now`.
pub fn pool_stats(
    instances: &[std::sync::Arc<GpuInstance>],
    pools: &[std::sync::Arc<GpuPool>],
    pool: Option<&str>,
    now: Timestamp,
) -> Value {
    let mut rows = Vec::new();
    let (mut busy, mut idle, mut starting) = (0, 0, 0);
    let mut spend = Money::ZERO;
    let mut sorted: Vec<&GpuInstance> = instances
        .iter()
        .map(|i| i.as_ref())
        .filter(|i| pool.is_none_or(|p| i.spec.pool == p))
        .collect();
    sorted.sort_by_key(|i| i.name_any());
    for inst in sorted {
        let status = status_of(inst);
        match status {
            "busy" => busy += 1,
            "idle" => idle += 1,
            "starting" => starting += 1,
            // Being destroyed or broken: not part of the pool's capacity, still listed.
            _ => {}
        }
        let s = inst.status.clone().unwrap_or_default();
        let price = s.offer.as_ref().and_then(|o| o.price_per_hour);
        if matches!(status, "busy" | "idle" | "starting") && s.provider_instance_id.is_some() {
            spend = spend + price.unwrap_or_default();
        }
        let idle_minutes = if status == "idle" {
            minutes_since(s.idle_since.map(|t| t.0), now)
        } else {
            0.0
        };
        let age_minutes = minutes_since(
            s.provisioning_started_at
                .map(|t| t.0)
                .or_else(|| inst.metadata.creation_timestamp.as_ref().map(|t| t.0)),
            now,
        );
        rows.push(json!({
            "id": inst.name_any(),
            "status": status,
            "idleMinutes": idle_minutes,
            "ageMinutes": age_minutes,
            "pool": inst.spec.pool,
            "provider": inst.spec.provider,
            "gpu": s.offer.as_ref().and_then(|o| o.gpu_name.clone()),
            "pricePerHour": price.map(|p| p.to_string()),
            "currentJob": s.current_job.filter(|j| !j.is_empty()),
        }));
    }
    let pending_jobs: i64 = pools
        .iter()
        .filter(|p| pool.is_none_or(|name| p.name_any() == name))
        .filter_map(|p| p.status.as_ref()?.pending_jobs)
        .map(i64::from)
        .sum();
    json!({
        "total": busy + idle + starting,
        "busy": busy,
        "idle": idle,
        "starting": starting,
        "pendingJobs": pending_jobs,
        "spendPerHour": spend.to_string(),
        "instances": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn inst(name: &str, pool: &str, status: Value) -> Arc<GpuInstance> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "gpupool.dev/v1alpha1", "kind": "GpuInstance",
                "metadata": {"name": name, "namespace": "ns",
                             "creationTimestamp": "2026-12-01T10:00:00Z"},
                "spec": {"pool": pool, "provider": "vast"},
                "status": status,
            }))
            .unwrap(),
        )
    }

    #[test]
    fn instances_are_counted_busy_idle_or_starting_with_their_minutes_and_spend() {
        let now: Timestamp = "2026-12-01T10:30:00Z".parse().unwrap();
        let offer = json!({"pricePerHour": "0.5", "gpuName": "RTX 4090"});
        let instances = vec![
            inst(
                "a",
                "p",
                json!({"phase": "Ready", "currentJob": "j1", "providerInstanceId": "1",
                "offer": offer, "provisioningStartedAt": "2026-12-01T10:00:00Z"}),
            ),
            inst(
                "b",
                "p",
                json!({"phase": "Ready", "providerInstanceId": "2", "offer": offer,
                "idleSince": "2026-12-01T10:27:00Z", "provisioningStartedAt": "2026-12-01T10:10:00Z"}),
            ),
            inst(
                "c",
                "p",
                json!({"phase": "Provisioning", "providerInstanceId": "3", "offer": offer}),
            ),
            inst("d", "p", json!({"phase": "Failed"})),
            inst(
                "e",
                "other",
                json!({"phase": "Ready", "providerInstanceId": "5", "offer": offer}),
            ),
        ];
        let pools: Vec<Arc<GpuPool>> = vec![Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "gpupool.dev/v1alpha1", "kind": "GpuPool",
                "metadata": {"name": "p", "namespace": "ns"},
                "spec": {"providers": [{"name": "vast", "type": "VastAi",
                    "credentialsSecretRef": {"name": "s", "key": "k"}}]},
                "status": {"pendingJobs": 4},
            }))
            .unwrap(),
        )];
        let s = pool_stats(&instances, &pools, Some("p"), now);
        assert_eq!(
            (
                s["total"].as_i64(),
                s["busy"].as_i64(),
                s["idle"].as_i64(),
                s["starting"].as_i64()
            ),
            (Some(3), Some(1), Some(1), Some(1))
        );
        assert_eq!(s["pendingJobs"], 4);
        assert_eq!(s["spendPerHour"], "1.5");
        let rows = s["instances"].as_array().unwrap();
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[0]["status"], "busy");
        assert_eq!(rows[0]["currentJob"], "j1");
        assert_eq!(rows[1]["idleMinutes"], 3.0);
        assert_eq!(rows[1]["ageMinutes"], 20.0);
        assert_eq!(rows[3]["status"], "failed");
        let all = pool_stats(&instances, &pools, None, now);
        assert_eq!(all["total"], 4);
    }
}
