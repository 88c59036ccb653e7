//! The `gpupool` operator: parse the configuration, start telemetry, serve /metrics and the
//! probes, run the controllers.

use std::sync::Arc;

use clap::Parser;
use k8s_openapi::api::core::v1::Namespace;
use kube::{Api, Client, client::ClientBuilder};
use tracing::{error, info};

use gpupool::{
    clock::SystemClock,
    config::Config,
    controller::{
        self, Context,
        providers::{HttpProviders, Providers},
    },
    metrics::Metrics,
};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = Config::parse();
    gpupool::telemetry::init(&config.log_format);
    match run(config).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %e, "gpupool stopped");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> Result<(), Box<dyn std::error::Error>> {
    let metrics = Arc::new(Metrics::new());
    let client = kube_client(metrics.clone()).await?;
    let cluster_id = match &config.cluster_id {
        Some(id) => id.clone(),
        None => Api::<Namespace>::all(client.clone())
            .get("kube-system")
            .await?
            .metadata
            .uid
            .ok_or("the kube-system namespace has no uid")?,
    };
    let endpoints = config.endpoints();
    let worker_config = endpoints.worker.clone();
    let providers = Providers::new(
        client.clone(),
        Box::new(HttpProviders {
            endpoints,
            metrics: metrics.clone(),
        }),
        worker_config,
    );
    let (stores, writers) = controller::context::caches();
    let ctx = Arc::new(Context::new(
        client,
        config.controller(cluster_id.clone()),
        Arc::new(SystemClock),
        metrics,
        providers,
        config.pod_name.clone(),
        stores,
    ));
    let (addr, server) = gpupool::http::serve(config.http_addr, ctx.clone()).await?;
    info!(%addr, cluster_id, namespace = ?config.namespace, "gpupool listening");
    let server = tokio::spawn(server);
    match config.leader() {
        None => {
            // Without leader election this process is the only one that reconciles.
            ctx.set_standby(false);
            tokio::select! {
                r = server => r??,
                () = controller::run(ctx, writers) => {}
            }
        }
        Some(leader) => {
            let mut elector = gpupool::leader::Elector::new(ctx.client.clone(), leader);
            // A standby replica is healthy and ready; it only does not reconcile.
            ctx.set_standby(true);
            elector.acquire().await;
            ctx.set_standby(false);
            tokio::select! {
                r = server => r??,
                () = controller::run(ctx, writers) => {}
                () = elector.keep_renewing() => {
                    // Exit rather than keep any in-memory state: the next leader starts clean.
                    return Err("lost the leader Lease; exiting so another replica leads".into());
                }
            }
        }
    }
    Ok(())
}

/// The kube client from the in-cluster config or the kubeconfig, counting every request it
/// sends in `gpupool_kube_requests_total` (the benchmarks report requests per job from it).
async fn kube_client(metrics: Arc<Metrics>) -> Result<Client, kube::Error> {
    let config = kube::Config::infer()
        .await
        .map_err(kube::Error::InferConfig)?;
    let count = tower::util::MapRequestLayer::new(move |req: http::Request<kube::client::Body>| {
        let labels = gpupool::metrics::KubeRequestLabels::of(
            req.method().as_str(),
            req.uri().path(),
            req.uri().query(),
        );
        metrics.kube_requests.get_or_create(&labels).inc();
        req
    });
    Ok(ClientBuilder::try_from(config)?.with_layer(&count).build())
}
