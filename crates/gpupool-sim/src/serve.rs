//! The accept loop under every simulator listener (the API port and each worker).
//!
//! Connections are tasks in a `JoinSet` owned by the loop, so ending the loop (or aborting
//! its task) closes the port *and* drops every open connection at once. That is what a
//! destroyed machine does, and what `axum::serve` (which detaches connections) cannot.

use axum::Router;
use hyper_util::{rt::TokioIo, service::TowerToHyperService};
use tokio::{net::TcpListener, sync::watch, task::JoinSet};

/// Serves `router` on `listener` until `stop` turns true (or its sender is dropped).
pub async fn serve(listener: TcpListener, router: Router, mut stop: watch::Receiver<bool>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _peer)) = accepted else {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                };
                let svc = TowerToHyperService::new(router.clone());
                conns.spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
            // Reap finished connections so the set does not grow without bound.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = wait_true(&mut stop) => break,
        }
    }
    conns.abort_all();
}

/// Resolves once the watched flag is true or its sender is gone.
pub async fn wait_true(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}
