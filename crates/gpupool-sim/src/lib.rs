//! The provider simulator: a faithful local stand-in for the Vast.ai and RunPod HTTP APIs
//! (DESIGN.md §4, providers.md), for tests and demos.
//!
//! One loopback port serves everything, routed by path: Vast (`/api/v0/...`,
//! `/api/v1/instances/`), RunPod GraphQL (`/graphql`), RunPod REST v1 (`/v1/pods...`),
//! RunPod REST v2 (`/v2/pods...`, `/v2/catalog/gpus...`, `/v2/serverless...`), RunPod
//! Serverless jobs (`/v2/{endpointId}/...`), the RunPod HTTP proxy stand-in
//! (`/proxy/{podId}-{port}/...`) and the admin API (`/admin/...`). Every created machine gets
//! a real worker HTTP server on its own loopback port. Start it in-process with [`start`]
//! (tests) or through the `gpupool-sim` binary. docs/simulator.md is the manual.
//!
//! It must never listen on anything but loopback, and never log keys or tokens. It does not
//! depend on the operator's crate: it knows the providers' APIs and the worker contract
//! (docs/worker-api.md) from their documents, as a real provider would.

// Handlers return `Result<_, Response>` so that any step can answer with the provider's own
// error; a Response is built at most once per request, so boxing it would buy nothing.
#![allow(clippy::result_large_err)]

mod admin;
mod config;
mod faults;
mod graphql;
mod http;
mod instances;
mod pods;
mod process;
mod proxy;
mod query;
mod ratelimit;
mod runpod;
mod runpod_rest;
mod runpod_v2;
mod serve;
mod serverless;
mod state;
mod storage;
mod util;
mod vast;
mod worker;

use std::{net::SocketAddr, sync::Arc};

/// The worker contract's environment (docs/worker-api.md): the session token, the API key and
/// the port the operator asks a machine's worker to use.
pub const ENV_SESSION_TOKEN: &str = "GPUPOOL_SESSION_TOKEN";
pub const ENV_API_KEY: &str = "GPUPOOL_API_KEY";
pub const ENV_WORKER_PORT: &str = "GPUPOOL_WORKER_PORT";

use axum::{Router, extract::DefaultBodyLimit, http::StatusCode, middleware, response::Response};
use serde_json::json;
use tokio::{net::TcpListener, task::JoinHandle};

pub use config::{
    ApiKeys, DataCenterSpec, EndpointSpec, GpuPoolSpec, GpuTypeSpec, RateLimitSpec, SimConfig,
    Timing, VastOfferSpec, WorkerProcessSpec,
};
pub use faults::{Faults, Trigger};

use state::Sim;

/// Why the simulator could not start.
#[derive(thiserror::Error, Debug)]
pub enum SimError {
    #[error("the simulator only listens on loopback, not {0}")]
    NotLoopback(SocketAddr),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A running simulator. Dropping it stops everything too; [`SimHandle::shutdown`] also
/// waits until the port is closed.
pub struct SimHandle {
    /// `http://127.0.0.1:PORT`: the Vast base URL, RunPod GraphQL/REST host, and admin API.
    pub base_url: String,
    pub addr: SocketAddr,
    sim: Arc<Sim>,
    task: Option<JoinHandle<()>>,
}

impl SimHandle {
    /// RunPod Serverless base (`RUNPOD_ENDPOINT_BASE_URL`): `{base_url}/v2`.
    pub fn serverless_url(&self) -> String {
        format!("{}/v2", self.base_url)
    }

    /// RunPod REST v1 base (`RUNPOD_API_URL`): `{base_url}/v1`.
    pub fn rest_url(&self) -> String {
        format!("{}/v1", self.base_url)
    }

    /// RunPod REST v2 base including `/v2` (the MCP server's `RUNPOD_REST_V2_API_URL`):
    /// `{base_url}/v2`, the same prefix as the serverless jobs API, told apart by path.
    pub fn rest_v2_url(&self) -> String {
        format!("{}/v2", self.base_url)
    }

    /// Stops the API server, every worker and every background task.
    pub async fn shutdown(mut self) {
        self.signal();
        let workers = instances::stop_all_workers(&self.sim);
        for w in workers {
            instances::reap(Some(w)).await;
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }

    fn signal(&self) {
        self.sim.shutdown.send_replace(true);
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        self.signal();
        for w in instances::stop_all_workers(&self.sim) {
            drop(w);
        }
    }
}

/// Starts a simulator on `127.0.0.1:0`.
pub async fn start(config: SimConfig) -> Result<SimHandle, SimError> {
    start_on(config, SocketAddr::from(([127, 0, 0, 1], 0))).await
}

/// Starts a simulator on `addr`, which must be a loopback address.
pub async fn start_on(config: SimConfig, addr: SocketAddr) -> Result<SimHandle, SimError> {
    if !addr.ip().is_loopback() {
        return Err(SimError::NotLoopback(addr));
    }
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| SimError::Bind { addr, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| SimError::Bind { addr, source })?;
    let sim = Sim::new(config);
    let _ = sim.base_url.set(format!("http://{addr}"));
    for spec in sim.initial.endpoints.clone() {
        serverless::install(&sim, spec);
    }
    let app = router(sim.clone());
    let task = tokio::spawn(serve::serve(listener, app, sim.shutdown.subscribe()));
    tracing::info!(%addr, "provider simulator listening");
    Ok(SimHandle {
        base_url: format!("http://{addr}"),
        addr,
        sim,
        task: Some(task),
    })
}

async fn not_found() -> Response {
    util::json(
        StatusCode::NOT_FOUND,
        &json!({"error": "not_found", "msg": "no such route in the provider simulator"}),
    )
}

fn router(sim: Arc<Sim>) -> Router {
    Router::new()
        .merge(vast::routes())
        .merge(runpod::routes())
        .merge(runpod_rest::routes())
        .merge(runpod_v2::routes(sim.clone()))
        .merge(serverless::routes())
        .merge(proxy::routes())
        .merge(admin::routes())
        .fallback(not_found)
        // Serverless accepts 20 MB payloads (/runsync); keep the same ceiling everywhere.
        .layer(DefaultBodyLimit::max(20 * 1024 * 1024))
        // The storage stand-in has its own, larger limit.
        .merge(storage::routes())
        .layer(middleware::from_fn_with_state(
            sim.clone(),
            http::record_calls,
        ))
        .with_state(sim)
}
