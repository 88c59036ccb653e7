//! The `gpupool-worker` binary, in one of two modes:
//! - `gpupool-worker` (or `serve`): reads its settings from the environment the provider gives
//!   the machine and serves `docs/worker-api.md` on `$GPUPOOL_WORKER_BIND:$GPUPOOL_WORKER_PORT`
//!   (`0.0.0.0:8000` by default);
//! - `gpupool-worker serverless` (or `GPUPOOL_WORKER_MODE=serverless`): a RunPod Serverless
//!   worker taking jobs from `$RUNPOD_WEBHOOK_GET_JOB` (src/serverless.rs).
//!
//! Both run the operations of `docs/worker.md` (`probe`, `thumbnails`, `transcode`,
//! `caption`) with ffmpeg.

use std::{net::SocketAddr, process::ExitCode, sync::Arc};

use gpupool_worker::{
    Config, Worker,
    media::Limits,
    ops::VideoOps,
    s3::S3,
    serverless::{self, Queue, QueueConfig},
};

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok()
}

/// Logs a start-up error and fails.
fn fail(e: impl std::fmt::Display) -> ExitCode {
    tracing::error!("{e}");
    ExitCode::FAILURE
}

/// Resolves on SIGTERM or Ctrl-C.
async fn terminated() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        () = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt().with_target(false).init();
    let mode = std::env::args()
        .nth(1)
        .or_else(|| env("GPUPOOL_WORKER_MODE"))
        .unwrap_or_else(|| "serve".into());
    let ops = match Limits::from_env(env)
        .and_then(VideoOps::new)
        .and_then(|o| Ok(o.with_s3(S3::from_env(env)?)))
    {
        Ok(o) => Arc::new(o),
        Err(e) => return fail(e),
    };
    match mode.as_str() {
        "serve" => serve(ops).await,
        "serverless" => {
            let queue = match QueueConfig::from_env(env).and_then(Queue::new) {
                Ok(q) => q,
                Err(e) => return fail(e),
            };
            match serverless::run(queue, ops, terminated()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        other => fail(format!(
            "unknown mode {other:?}: use `serve` (the default) or `serverless`"
        )),
    }
}

async fn serve(ops: Arc<VideoOps>) -> ExitCode {
    let config = match Config::from_env(env) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let addr = SocketAddr::from((config.bind, config.port));
    let worker = Worker::new(config, ops);
    match worker.serve(addr).await {
        Ok((bound, server)) => {
            tracing::info!(addr = %bound, "gpupool-worker listening");
            match server.await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(format!("server failed: {e}")),
            }
        }
        Err(e) => fail(format!("cannot listen on {addr}: {e}")),
    }
}
