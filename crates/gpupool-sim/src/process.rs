//! A machine's worker as a real process (`worker_process` in the configuration): the
//! simulator starts the configured binary when the machine reaches running, with the
//! environment the provider would give its container, and keeps its own port for the machine
//! in front of it. That port still counts executions, applies the worker faults and the
//! `simulate` hooks (which it removes from the input, since a real worker refuses fields it
//! does not know), and forwards everything else to the process. `die` is a real SIGKILL.

use std::{
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
};

use axum::{
    body::{Body, Bytes},
    http::{HeaderMap, Method, StatusCode, Uri, header},
    response::Response,
};
use serde_json::{Map, Value, json};
use tokio::process::{Child, Command};
use tracing::{info, warn};

use super::{config::WorkerProcessSpec, instances, state::Instance, util, worker::WorkerCtx};

/// The process behind a machine's port: where it listens and its pid (0 once gone).
#[derive(Clone, Debug)]
pub struct Backend {
    pub port: u16,
    pub pid: Arc<AtomicU32>,
}

/// A free loopback port for the process (bound, read, released: the process binds it next).
pub fn free_port() -> std::io::Result<u16> {
    std::net::TcpListener::bind(("127.0.0.1", 0))?
        .local_addr()
        .map(|a| a.port())
}

/// Starts the worker process of `inst` on `port`. Killed when the returned child is dropped.
pub fn spawn(spec: &WorkerProcessSpec, inst: &Instance, port: u16) -> std::io::Result<Child> {
    let mut cmd = Command::new(&spec.command);
    cmd.args(&spec.args)
        .envs(inst.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .envs(&spec.env)
        .env(crate::ENV_WORKER_PORT, port.to_string())
        .env("GPUPOOL_WORKER_BIND", "127.0.0.1")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    log_output(&mut cmd, spec, &format!("worker-{}", inst.id))?;
    let child = cmd.spawn()?;
    info!(instance = %inst.id, port, pid = child.id().unwrap_or(0), "worker process started");
    Ok(child)
}

/// Sends a worker's stdout and stderr to `{log_dir}/{name}.log` when the spec has a log
/// directory (they stay the simulator's otherwise).
pub fn log_output(cmd: &mut Command, spec: &WorkerProcessSpec, name: &str) -> std::io::Result<()> {
    let Some(dir) = &spec.log_dir else {
        return Ok(());
    };
    std::fs::create_dir_all(dir)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(std::path::Path::new(dir).join(format!("{name}.log")))?;
    cmd.stdout(log.try_clone()?).stderr(log);
    Ok(())
}

/// Keeps the child until the machine's worker task ends (abort included), then kills it.
pub async fn hold(mut child: Child, pid: Arc<AtomicU32>, instance: String) {
    let status = child.wait().await;
    pid.store(0, Ordering::SeqCst);
    warn!(instance = %instance, status = ?status.ok(), "worker process exited");
}

/// SIGKILLs the process now (a machine dying under its worker).
pub fn kill(backend: &Backend) {
    let pid = backend.pid.swap(0, Ordering::SeqCst);
    if pid != 0 {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
}

/// Any request but a job: forwarded as it came (health above all). A process that does
/// not listen yet is a worker still starting.
pub async fn forward_other(
    ctx: &WorkerCtx,
    backend: &Backend,
    method: Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    match send(ctx, backend, method, uri, headers, body).await {
        Some(r) => r,
        None => util::json(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"status": "starting"}),
        ),
    }
}

/// A job for the process: its input without `simulate`, forwarded. When the plan says the
/// machine dies, the process is killed half-way through the planned time and this request
/// is never answered (the machine's connections go with it).
pub async fn forward_job(
    ctx: &WorkerCtx,
    backend: &Backend,
    op: &str,
    headers: &HeaderMap,
    mut input: Map<String, Value>,
    die_after: Option<f64>,
) -> Response {
    input.remove("simulate");
    let Ok(uri) = format!("/video/{op}").parse::<Uri>() else {
        return util::json(
            StatusCode::NOT_FOUND,
            &json!({"error": "bad operation path"}),
        );
    };
    let uri = &uri;
    let body = Bytes::from(serde_json::to_vec(&Value::Object(input)).unwrap_or_default());
    if let Some(seconds) = die_after {
        let (sim, provider, id, b) = (
            ctx.sim.clone(),
            ctx.provider,
            ctx.instance_id.clone(),
            backend.clone(),
        );
        tokio::spawn(async move {
            tokio::time::sleep(util::secs(seconds)).await;
            kill(&b);
            let task = instances::die(&sim, provider, &id, "worker process killed mid-job");
            instances::reap(task).await;
        });
        let _ = send(ctx, backend, Method::POST, uri, headers, body).await;
        return std::future::pending::<Response>().await;
    }
    match send(ctx, backend, Method::POST, uri, headers, body).await {
        Some(r) => r,
        // The process went away under the request (killed from outside): like a dead machine.
        None => util::json(
            StatusCode::BAD_GATEWAY,
            &json!({"error": "the worker process closed the connection"}),
        ),
    }
}

/// One request to the process; `None` when it cannot be reached or drops the connection.
async fn send(
    ctx: &WorkerCtx,
    backend: &Backend,
    method: Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Bytes,
) -> Option<Response> {
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let target: Uri = format!("http://127.0.0.1:{}{path}", backend.port)
        .parse()
        .ok()?;
    let mut req = hyper::Request::builder().method(method).uri(target);
    for (name, value) in headers {
        if !matches!(
            name.as_str(),
            "host" | "connection" | "keep-alive" | "transfer-encoding" | "content-length"
        ) {
            req = req.header(name, value);
        }
    }
    let req = req
        .header(header::HOST, format!("127.0.0.1:{}", backend.port))
        .body(Body::from(body))
        .ok()?;
    let res = ctx.sim.client.request(req).await.ok()?;
    let (parts, body) = res.into_parts();
    Some(Response::from_parts(parts, Body::new(body)))
}
