//! The admin API under `/admin` (no auth, JSON): what tests and benchmarks assert on —
//! state, bill, calls, executions — and the knobs: faults, catalogue, timing, kill, reset.
//!
//! Nothing here ever shows an API key, session token or instance env.

use std::sync::Arc;

use axum::{
    Router,
    body::Bytes,
    extract::{Path, State},
    http::StatusCode,
    response::Response,
    routing::{get, post},
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    config::{DataCenterSpec, GpuPoolSpec, GpuTypeSpec, RateLimitSpec, Timing, VastOfferSpec},
    faults::Faults,
    instances, serverless,
    state::{Provider, Sim, State as SimState, instance_summary},
    util,
};

pub fn routes() -> Router<Arc<Sim>> {
    Router::new()
        .route("/admin/state", get(state))
        .route("/admin/bill", get(bill))
        .route("/admin/calls", get(calls))
        .route("/admin/executions", get(executions))
        .route("/admin/faults", get(get_faults).put(put_faults))
        .route("/admin/catalogue", get(get_catalogue).put(put_catalogue))
        .route("/admin/timing", get(get_timing).put(put_timing))
        .route("/admin/rate-limit", get(get_rate_limit).put(put_rate_limit))
        .route("/admin/instances/{id}/kill", post(kill))
        .route("/admin/reset", post(reset))
}

fn ok(v: &Value) -> Response {
    util::json(StatusCode::OK, v)
}

fn bad(msg: impl std::fmt::Display) -> Response {
    util::json(StatusCode::BAD_REQUEST, &json!({"error": msg.to_string()}))
}

async fn state(State(sim): State<Arc<Sim>>) -> Response {
    let now = util::now_ms();
    let st = sim.lock();
    ok(&json!({
        "now": util::rfc3339(now),
        "started_at": util::rfc3339(st.started_at),
        "instances": st.instances.iter().map(|i| instance_summary(i, now)).collect::<Vec<_>>(),
        "endpoints": st.endpoints.iter().map(|e| serverless::admin_endpoint(e, now)).collect::<Vec<_>>(),
        "jobs": st.jobs.iter().map(serverless::admin_job).collect::<Vec<_>>(),
    }))
}

async fn bill(State(sim): State<Arc<Sim>>) -> Response {
    let now = util::now_ms();
    let st = sim.lock();
    let (mut vast, mut runpod) = (0.0, 0.0);
    let instances: Vec<Value> = st
        .instances
        .iter()
        .map(|i| {
            let cost = i.cost(now);
            match i.provider {
                Provider::Vast => vast += cost,
                Provider::RunPod => runpod += cost,
            }
            json!({
                "provider": i.provider.name(),
                "id": i.id,
                "label": i.label,
                "alive": !i.is_destroyed(),
                "price_per_hour": i.price_per_hour,
                "billed_seconds": i.billed_seconds(now),
                "cost": cost,
            })
        })
        .collect();
    let mut serverless_total = 0.0;
    let endpoints: Vec<Value> = st
        .endpoints
        .iter()
        .map(|e| {
            let cost = e.cost(now);
            serverless_total += cost;
            let seconds = e.workers.iter().fold(0.0, |sum, w| {
                sum + util::seconds_between(w.started_at, w.stopped_at.unwrap_or(now))
            });
            json!({"id": e.spec.id, "price_per_hour": e.spec.price_per_hour, "worker_seconds": seconds, "cost": cost})
        })
        .collect();
    ok(&json!({
        "now": util::rfc3339(now),
        "total": vast + runpod + serverless_total,
        "by_provider": {"vast": vast, "runpod": runpod, "serverless": serverless_total},
        "instances": instances,
        "endpoints": endpoints,
    }))
}

async fn calls(State(sim): State<Arc<Sim>>) -> Response {
    let st = sim.lock();
    let recent: Vec<Value> = st
        .calls
        .recent
        .iter()
        .map(|c| {
            json!({
                "time": util::rfc3339(c.time),
                "method": c.method,
                "path": c.path,
                "operation": c.operation,
                "status": c.status,
                "instance": c.instance,
                "duration_ms": c.duration_ms,
            })
        })
        .collect();
    ok(&json!({"total": st.calls.total, "counts": st.calls.counts, "recent": recent}))
}

async fn executions(State(sim): State<Arc<Sim>>) -> Response {
    let st = sim.lock();
    let total: u64 = st.executions.values().map(|e| e.count).sum();
    let jobs: serde_json::Map<String, Value> = st
        .executions
        .iter()
        .map(|(k, e)| {
            (
                k.clone(),
                json!({"count": e.count, "instances": e.instances,
                       "first_at": e.first_at.map(|t| format!("{t:.6}"))}),
            )
        })
        .collect();
    ok(&json!({"total": total, "jobs": jobs}))
}

async fn get_faults(State(sim): State<Arc<Sim>>) -> Response {
    ok(&serde_json::to_value(&sim.lock().faults).unwrap_or(Value::Null))
}

async fn put_faults(State(sim): State<Arc<Sim>>, body: Bytes) -> Response {
    match serde_json::from_slice::<Faults>(&body) {
        Ok(f) => {
            let v = serde_json::to_value(&f).unwrap_or(Value::Null);
            sim.lock().faults = f;
            ok(&v)
        }
        Err(e) => bad(format!("invalid faults: {e}")),
    }
}

/// What `PUT /admin/catalogue` may replace; absent lists stay as they are.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Catalogue {
    vast_offers: Option<Vec<VastOfferSpec>>,
    runpod_gpu_types: Option<Vec<GpuTypeSpec>>,
    runpod_data_centers: Option<Vec<DataCenterSpec>>,
    runpod_gpu_pools: Option<Vec<GpuPoolSpec>>,
}

fn catalogue_json(st: &SimState) -> Value {
    json!({"vast_offers": st.offers, "runpod_gpu_types": st.gpu_types,
           "runpod_data_centers": st.data_centers, "runpod_gpu_pools": st.gpu_pools})
}

async fn get_catalogue(State(sim): State<Arc<Sim>>) -> Response {
    ok(&catalogue_json(&sim.lock()))
}

async fn put_catalogue(State(sim): State<Arc<Sim>>, body: Bytes) -> Response {
    match serde_json::from_slice::<Catalogue>(&body) {
        Ok(c) => {
            let mut st = sim.lock();
            if let Some(o) = c.vast_offers {
                st.offers = o;
            }
            if let Some(g) = c.runpod_gpu_types {
                st.gpu_types = g;
            }
            if let Some(d) = c.runpod_data_centers {
                st.data_centers = d;
            }
            if let Some(p) = c.runpod_gpu_pools {
                st.gpu_pools = p;
            }
            ok(&catalogue_json(&st))
        }
        Err(e) => bad(format!("invalid catalogue: {e}")),
    }
}

async fn get_timing(State(sim): State<Arc<Sim>>) -> Response {
    ok(&serde_json::to_value(&sim.lock().timing).unwrap_or(Value::Null))
}

async fn put_timing(State(sim): State<Arc<Sim>>, body: Bytes) -> Response {
    match serde_json::from_slice::<Timing>(&body) {
        Ok(t) => {
            let v = serde_json::to_value(&t).unwrap_or(Value::Null);
            sim.lock().timing = t;
            ok(&v)
        }
        Err(e) => bad(format!("invalid timing: {e}")),
    }
}

async fn get_rate_limit(State(sim): State<Arc<Sim>>) -> Response {
    ok(&serde_json::to_value(&sim.lock().rate_limit).unwrap_or(Value::Null))
}

/// Replaces RunPod REST v2's quota; the requests already counted in the current windows stay.
async fn put_rate_limit(State(sim): State<Arc<Sim>>, body: Bytes) -> Response {
    match serde_json::from_slice::<RateLimitSpec>(&body) {
        Ok(r) => {
            let v = serde_json::to_value(&r).unwrap_or(Value::Null);
            sim.lock().rate_limit = r;
            ok(&v)
        }
        Err(e) => bad(format!("invalid rate limit: {e}")),
    }
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct KillRequest {
    /// `now` (default), `next_job` (die half-way through the next job) or `outbid` (an
    /// interruptible instance is stopped by a higher bid, as Vast.ai does).
    when: Option<String>,
}

async fn kill(State(sim): State<Arc<Sim>>, Path(id): Path<String>, body: Bytes) -> Response {
    let req = if body.iter().all(u8::is_ascii_whitespace) {
        KillRequest::default()
    } else {
        match serde_json::from_slice::<KillRequest>(&body) {
            Ok(r) => r,
            Err(e) => return bad(format!("invalid kill request: {e}")),
        }
    };
    let provider = {
        let mut st = sim.lock();
        let Some(i) = st.any_instance_mut(&id).filter(|i| !i.is_destroyed()) else {
            return util::json(
                StatusCode::NOT_FOUND,
                &json!({"error": format!("no live instance {id}")}),
            );
        };
        if req.when.as_deref() == Some("next_job") {
            i.die_on_next_job = true;
            return ok(&json!({"armed": id}));
        }
        i.provider
    };
    match req.when.as_deref() {
        Some("outbid") => match instances::outbid(&sim, provider, &id) {
            Some(task) => {
                instances::reap(task).await;
                ok(&json!({"outbid": id}))
            }
            None => bad(format!("instance {id} cannot be outbid")),
        },
        None | Some("now") => {
            let task = instances::die(&sim, provider, &id, "killed by the admin API");
            instances::reap(task).await;
            ok(&json!({"killed": id}))
        }
        Some(other) => bad(format!("when must be now or next_job, not {other:?}")),
    }
}

/// Back to the starting configuration: every instance and worker gone, bill, calls,
/// executions, jobs cleared, faults/catalogue/timing from the config, RNG re-seeded.
pub async fn reset(State(sim): State<Arc<Sim>>) -> Response {
    reset_all(&sim).await;
    ok(&json!({"reset": true}))
}

pub async fn reset_all(sim: &Arc<Sim>) {
    let tasks = instances::stop_all_workers(sim);
    {
        let mut st = sim.lock();
        for ep in &st.endpoints {
            ep.notify.notify_one();
        }
        let epoch = st.epoch + 1;
        *st = SimState::new(&sim.initial, epoch);
    }
    for t in tasks {
        instances::reap(Some(t)).await;
    }
    for spec in sim.initial.endpoints.clone() {
        serverless::install(sim, spec);
    }
    sim.notify_jobs();
}
