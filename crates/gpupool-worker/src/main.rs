//! The `gpupool-worker` binary: reads its settings from the environment the provider gives the
//! machine and serves `docs/worker-api.md` on `$GPUPOOL_WORKER_BIND:$GPUPOOL_WORKER_PORT`
//! (`0.0.0.0:8000` by default), with the operations of `docs/worker.md`: `probe`,
//! `thumbnails`, `transcode` and `caption`, run by ffmpeg.

use std::{net::SocketAddr, sync::Arc};

use gpupool_worker::{Config, Worker, media::Limits, ops::VideoOps};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt().with_target(false).init();
    let config = match Config::from_env(|k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let ops = match Limits::from_env(|k| std::env::var(k).ok()).and_then(VideoOps::new) {
        Ok(o) => o,
        Err(e) => {
            tracing::error!("{e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let addr = SocketAddr::from((config.bind, config.port));
    let worker = Worker::new(config, Arc::new(ops));
    match worker.serve(addr).await {
        Ok((bound, server)) => {
            tracing::info!(addr = %bound, "gpupool-worker listening");
            if let Err(e) = server.await {
                tracing::error!(error = %e, "server failed");
                return std::process::ExitCode::FAILURE;
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, %addr, "cannot listen");
            std::process::ExitCode::FAILURE
        }
    }
}
