//! The operator's configuration: flags, each with an environment-variable fallback.
//! Credentials are never configured here; they come from Secrets named by the pools.

use std::{net::SocketAddr, time::Duration};

use clap::Parser;

use crate::{
    controller::{context::ControllerConfig, providers::ProviderEndpoints},
    provider::http::{
        DEFAULT_RUNPOD_GRAPHQL_BASE_URL, DEFAULT_RUNPOD_PROXY_TEMPLATE,
        DEFAULT_RUNPOD_REST_V2_BASE_URL, DEFAULT_RUNPOD_SERVERLESS_BASE_URL, DEFAULT_VAST_BASE_URL,
        RateLimit,
    },
};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "gpupool",
    version,
    about = "Rents GPU machines on Vast.ai and RunPod only while there is video work for them"
)]
pub struct Config {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "GPUPOOL_NAMESPACE")]
    pub namespace: Option<String>,

    /// Identifies this cluster in the labels of provider machines. Default: the UID of the
    /// kube-system namespace. Give each operator sharing a provider account its own id.
    #[arg(long, env = "GPUPOOL_CLUSTER_ID")]
    pub cluster_id: Option<String>,

    /// Address of the HTTP server for /metrics, /healthz and /readyz.
    #[arg(long, env = "GPUPOOL_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,

    /// Vast.ai API base (host only; /api/v0 is appended).
    #[arg(long, env = "GPUPOOL_VAST_URL", default_value = DEFAULT_VAST_BASE_URL)]
    pub vast_url: String,

    /// RunPod GraphQL API base (/graphql is appended), for entries with `api: GraphQL`
    /// (deprecated; RunPod retires GraphQL in early 2027).
    #[arg(long, env = "GPUPOOL_RUNPOD_API_URL", default_value = DEFAULT_RUNPOD_GRAPHQL_BASE_URL)]
    pub runpod_api_url: String,

    /// RunPod REST API v2 base, /v2 included (pods/, catalog/gpus, serverless/{id} are
    /// appended), for entries with `api: RestV2` (the default).
    #[arg(long, env = "GPUPOOL_RUNPOD_REST_URL", default_value = DEFAULT_RUNPOD_REST_V2_BASE_URL)]
    pub runpod_rest_url: String,

    /// RunPod Serverless API base ({endpointId}/run is appended).
    #[arg(long, env = "GPUPOOL_RUNPOD_SERVERLESS_URL", default_value = DEFAULT_RUNPOD_SERVERLESS_BASE_URL)]
    pub runpod_serverless_url: String,

    /// URL of a worker behind RunPod's HTTP proxy, with {podId} and {port} placeholders.
    #[arg(long, env = "GPUPOOL_RUNPOD_PROXY_TEMPLATE", default_value = DEFAULT_RUNPOD_PROXY_TEMPLATE)]
    pub runpod_proxy_template: String,

    /// Seconds between orphan sweeps.
    #[arg(long, env = "GPUPOOL_SWEEP_INTERVAL_SECONDS", default_value_t = 60)]
    pub sweep_interval_seconds: u64,

    /// Seconds a labelled machine without a GpuInstance is left alone before the sweep destroys it.
    #[arg(long, env = "GPUPOOL_ORPHAN_GRACE_SECONDS", default_value_t = 120)]
    pub orphan_grace_seconds: u64,

    /// Seconds a provider is skipped after reporting no capacity (doubling while it keeps failing).
    #[arg(long, env = "GPUPOOL_PROVIDER_BACKOFF_SECONDS", default_value_t = 180)]
    pub provider_backoff_seconds: u64,

    /// Seconds between provider checks of a Ready machine.
    #[arg(long, env = "GPUPOOL_LIVENESS_INTERVAL_SECONDS", default_value_t = 60)]
    pub liveness_interval_seconds: u64,

    /// Milliseconds between polls of a starting machine.
    #[arg(long, env = "GPUPOOL_PROVISION_POLL_MS", default_value_t = 2000)]
    pub provision_poll_ms: u64,

    /// Requests per second each provider account may receive from this operator (a
    /// client-side quota below the provider's own limit; bursts of twice as many pass).
    #[arg(long, env = "GPUPOOL_PROVIDER_QPS", default_value_t = 5)]
    pub provider_qps: u32,

    /// Largest worker output kept in a VideoJob's status, in bytes.
    #[arg(long, env = "GPUPOOL_MAX_OUTPUT_BYTES", default_value_t = 64 * 1024)]
    pub max_output_bytes: usize,

    /// Log format: text or json. The level comes from RUST_LOG (default info).
    #[arg(long, env = "GPUPOOL_LOG_FORMAT", default_value = "text")]
    pub log_format: String,

    /// Name of this replica in events and in the leader Lease (the pod name in a Deployment).
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,

    /// Run the controllers only while holding a coordination.k8s.io Lease, so several
    /// replicas can run at once (one works, the others stand by).
    #[arg(long, env = "GPUPOOL_LEADER_ELECT", default_value_t = false)]
    pub leader_elect: bool,

    /// Namespace of the leader Lease (default: $POD_NAMESPACE, else "default").
    #[arg(long, env = "GPUPOOL_LEADER_ELECTION_NAMESPACE")]
    pub leader_election_namespace: Option<String>,

    /// Name of the leader Lease.
    #[arg(long, env = "GPUPOOL_LEASE_NAME", default_value = "gpupool-leader")]
    pub lease_name: String,
}

impl Config {
    /// The leader election settings, when enabled.
    pub fn leader(&self) -> Option<crate::leader::LeaderConfig> {
        if !self.leader_elect {
            return None;
        }
        let namespace = self
            .leader_election_namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .unwrap_or_else(|| "default".into());
        let identity = self.pod_name.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            format!("{}-{}", host.trim(), std::process::id())
        });
        Some(crate::leader::LeaderConfig::new(
            namespace,
            self.lease_name.clone(),
            identity,
        ))
    }

    pub fn controller(&self, cluster_id: String) -> ControllerConfig {
        ControllerConfig {
            namespace: self.namespace.clone(),
            cluster_id,
            sweep_interval: Duration::from_secs(self.sweep_interval_seconds.max(1)),
            orphan_grace: Duration::from_secs(self.orphan_grace_seconds),
            provision_poll: Duration::from_millis(self.provision_poll_ms.max(10)),
            liveness_interval: Duration::from_secs(self.liveness_interval_seconds.max(1)),
            provider_backoff: Duration::from_secs(self.provider_backoff_seconds.max(1)),
            max_output_bytes: self.max_output_bytes,
        }
    }

    pub fn endpoints(&self) -> ProviderEndpoints {
        let mut e = ProviderEndpoints::default();
        e.vast.base_url = self.vast_url.clone();
        e.runpod.graphql_base_url = self.runpod_api_url.clone();
        e.runpod.proxy_url_template = self.runpod_proxy_template.clone();
        e.runpod_v2.base_url = self.runpod_rest_url.clone();
        e.runpod_v2.proxy_url_template = self.runpod_proxy_template.clone();
        e.serverless.base_url = self.runpod_serverless_url.clone();
        e.serverless.rest_base_url = self.runpod_rest_url.clone();
        e.serverless.graphql_base_url = self.runpod_api_url.clone();
        e.worker.max_output_bytes = self.max_output_bytes;
        let qps = self.provider_qps.max(1);
        let limit = RateLimit {
            replenish_every: Duration::from_secs(1) / qps,
            burst: std::num::NonZeroU32::new(qps.saturating_mul(2))
                .unwrap_or(std::num::NonZeroU32::MIN),
        };
        e.vast.http.rate_limit = Some(limit.clone());
        e.runpod.http.rate_limit = Some(limit.clone());
        // REST v2 limits per user (60 a minute in RunPod's example policy): the flag may
        // only make its quota tighter.
        e.runpod_v2.http.rate_limit = Some(match e.runpod_v2.http.rate_limit.take() {
            Some(own) if own.replenish_every > limit.replenish_every => RateLimit {
                burst: own.burst.min(limit.burst),
                ..own
            },
            _ => limit.clone(),
        });
        e.serverless.http.rate_limit = Some(limit);
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runpod_rest_url_reaches_pods_and_serverless_and_the_quota_only_tightens() {
        let c = Config::parse_from(["gpupool", "--runpod-rest-url", "http://127.0.0.1:9/v2"]);
        let e = c.endpoints();
        assert_eq!(e.runpod_v2.base_url, "http://127.0.0.1:9/v2");
        assert_eq!(e.serverless.rest_base_url, "http://127.0.0.1:9/v2");
        // Default 5 qps is looser than REST v2's own one a second: v2 keeps its own.
        let own = e.runpod_v2.http.rate_limit.expect("quota");
        assert_eq!(own.replenish_every, Duration::from_secs(1));
        assert_eq!(own.burst.get(), 10);
        let defaults = Config::parse_from(["gpupool"]).endpoints();
        assert_eq!(defaults.runpod_v2.base_url, DEFAULT_RUNPOD_REST_V2_BASE_URL);
        // A tighter flag wins.
        let slow = Config::parse_from(["gpupool", "--provider-qps", "1"]).endpoints();
        let limit = slow.runpod_v2.http.rate_limit.expect("quota");
        assert_eq!(limit.replenish_every, Duration::from_secs(1));
        assert_eq!(limit.burst.get(), 2);
    }
}
