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
    gateway::GatewayConfig,
    metrics::Metrics,
};

/// `gpupool [flags]` runs the operator; `gpupool gateway [flags]` the HTTP gateway (one image
/// serves both).
#[derive(Parser, Debug)]
#[command(
    name = "gpupool",
    version,
    about = "Rents GPU machines on Vast.ai and RunPod only while there is video work for them",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    operator: Config,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// The HTTP gateway: POST /video/{operation} and friends, backed by VideoJobs.
    Gateway(GatewayConfig),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Gateway(config)) = cli.command {
        gpupool::telemetry::init(&config.log_format);
        return match gpupool::gateway::run(config).await {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                error!(error = %e, "gpupool gateway stopped");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let config = cli.operator;
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
