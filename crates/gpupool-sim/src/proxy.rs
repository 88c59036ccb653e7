//! Stand-in for RunPod's HTTP proxy (`https://{podId}-{port}.proxy.runpod.net`): here
//! `/proxy/{podId}-{port}/...` on the simulator's own port forwards method, path, headers
//! and body to the pod's worker when that port was declared `/http`. Like the real proxy it
//! cuts requests after a timeout (100 s there) with a 524.

use std::sync::Arc;

use axum::{
    Extension, Router,
    body::Body,
    extract::{Path, Request, State},
    http::{StatusCode, Uri, header},
    response::Response,
    routing::any,
};

use super::{
    http::{self, Family, OpSlot},
    state::{Phase, Provider, Sim},
    util,
};

pub fn routes() -> Router<Arc<Sim>> {
    Router::new()
        .route("/proxy/{target}", any(root))
        .route("/proxy/{target}/", any(root))
        .route("/proxy/{target}/{*rest}", any(nested))
}

async fn root(
    State(sim): State<Arc<Sim>>,
    Extension(slot): Extension<OpSlot>,
    Path(target): Path<String>,
    req: Request,
) -> Response {
    forward(sim, slot, target, String::new(), req).await
}

async fn nested(
    State(sim): State<Arc<Sim>>,
    Extension(slot): Extension<OpSlot>,
    Path((target, rest)): Path<(String, String)>,
    req: Request,
) -> Response {
    forward(sim, slot, target, rest, req).await
}

/// Headers that belong to one connection and must not be forwarded.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
    "host",
];

/// Forwards a request for `{podId}-{port}` to the pod's worker, after the proxy's faults;
/// the 404s, 502s and the 524 are the real proxy's.
async fn forward(
    sim: Arc<Sim>,
    slot: OpSlot,
    target: String,
    rest: String,
    req: Request,
) -> Response {
    let op = "runpod.proxy";
    slot.set(op);
    if let Err(r) = http::delay_faults(&sim, op, Family::Worker).await {
        return r;
    }
    if let Err(r) = http::status_faults(&sim, op, Family::Worker) {
        return r;
    }
    let (pod, port) = match parse_target(&target) {
        Ok(t) => t,
        Err(r) => return r,
    };
    slot.set_instance(pod.to_string());
    let (host_port, timeout) = match worker_behind(&sim, pod, port) {
        Ok(w) => w,
        Err(r) => return r,
    };
    let out = match outgoing(req, host_port, &rest) {
        Ok(o) => o,
        Err(r) => return r,
    };
    match tokio::time::timeout(util::secs(timeout), sim.client.request(out)).await {
        Err(_) => util::text(
            util::status(524),
            "524: A timeout occurred (the origin did not answer within the proxy timeout)",
        ),
        Ok(Err(_)) => util::text(
            StatusCode::BAD_GATEWAY,
            "502 Bad Gateway: the pod closed the connection",
        ),
        Ok(Ok(res)) => {
            let (parts, body) = res.into_parts();
            Response::from_parts(parts, Body::new(body))
        }
    }
}

/// The pod id and port of a `{podId}-{port}` target.
fn parse_target(target: &str) -> Result<(&str, u16), Response> {
    let Some((pod, port)) = target.rsplit_once('-') else {
        return Err(util::text(
            StatusCode::NOT_FOUND,
            "404 Not Found: expected /proxy/{podId}-{port}/",
        ));
    };
    let Ok(port) = port.parse::<u16>() else {
        return Err(util::text(StatusCode::NOT_FOUND, "404 Not Found: bad port"));
    };
    Ok((pod, port))
}

/// The loopback port of the worker behind a running pod's `/http` port, and the proxy
/// timeout in seconds.
fn worker_behind(sim: &Sim, pod: &str, port: u16) -> Result<(u16, f64), Response> {
    let (host_port, timeout) = {
        let st = sim.lock();
        let Some(i) = st
            .instance(Provider::RunPod, pod)
            .filter(|i| i.phase == Phase::Running)
        else {
            return Err(util::text(
                StatusCode::NOT_FOUND,
                "404 Not Found: no running pod behind this address",
            ));
        };
        if !i.ports.iter().any(|p| p.port == port && p.proto == "http") {
            return Err(util::text(
                StatusCode::NOT_FOUND,
                "404 Not Found: port not exposed as http",
            ));
        }
        let host = if port == i.worker_port {
            i.worker_host_port()
        } else {
            None
        };
        (host, st.timing.proxy_timeout_seconds)
    };
    match host_port {
        Some(p) => Ok((p, timeout)),
        None => Err(util::text(
            StatusCode::BAD_GATEWAY,
            "502 Bad Gateway: nothing listens on that port",
        )),
    }
}

/// The request to send the worker: same method, path `rest`, query, headers (but the
/// hop-by-hop ones) and body, with the worker's `Host`.
fn outgoing(req: Request, host_port: u16, rest: &str) -> Result<Request, Response> {
    let (parts, body) = req.into_parts();
    let query = parts
        .uri
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let Ok(uri) = format!("http://127.0.0.1:{host_port}/{rest}{query}").parse::<Uri>() else {
        return Err(util::text(
            StatusCode::BAD_REQUEST,
            "400 Bad Request: bad path",
        ));
    };
    let mut out = hyper::Request::builder().method(parts.method).uri(uri);
    for (name, value) in &parts.headers {
        if !HOP_BY_HOP.contains(&name.as_str()) {
            out = out.header(name, value);
        }
    }
    out.header(header::HOST, format!("127.0.0.1:{host_port}"))
        .body(body)
        .map_err(|_| util::text(StatusCode::BAD_REQUEST, "400 Bad Request"))
}
