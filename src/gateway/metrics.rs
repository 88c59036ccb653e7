//! The gateway's own Prometheus registry (a gateway process runs no controller, so it shares
//! nothing with the operator's): requests by route and code, how long synchronous requests
//! waited, how many wait now, and callback deliveries by outcome.

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The route's pattern (`/video/{operation}`), never the concrete path.
    pub route: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

pub struct GatewayMetrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub wait_seconds: Histogram,
    pub waits_in_flight: Gauge,
    pub callbacks: Family<OutcomeLabels, Counter>,
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl GatewayMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("gpupool_gateway");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "HTTP requests answered, by route and status code",
            requests.clone(),
        );
        let wait_seconds = Histogram::new(exponential_buckets(0.05, 2.0, 16));
        registry.register(
            "wait_seconds",
            "Seconds a synchronous request waited for its job",
            wait_seconds.clone(),
        );
        let waits_in_flight = Gauge::default();
        registry.register(
            "waits_in_flight",
            "Synchronous requests waiting for their job now",
            waits_in_flight.clone(),
        );
        let callbacks = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "callbacks",
            "Callback deliveries, by outcome (delivered, retry, failed)",
            callbacks.clone(),
        );
        Self {
            registry,
            requests,
            wait_seconds,
            waits_in_flight,
            callbacks,
        }
    }

    pub fn callback(&self, outcome: &str) {
        self.callbacks
            .get_or_create(&OutcomeLabels {
                outcome: outcome.into(),
            })
            .inc();
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_renders_with_the_prefix() {
        let m = GatewayMetrics::new();
        m.requests
            .get_or_create(&RequestLabels {
                route: "/video/{operation}".into(),
                code: "200".into(),
            })
            .inc();
        m.callback("delivered");
        m.wait_seconds.observe(0.2);
        let text = m.render();
        for needle in [
            r#"gpupool_gateway_requests_total{route="/video/{operation}",code="200"} 1"#,
            r#"gpupool_gateway_callbacks_total{outcome="delivered"} 1"#,
            "gpupool_gateway_wait_seconds_count 1",
            "gpupool_gateway_waits_in_flight 0",
        ] {
            assert!(text.contains(needle), "{needle} not in\n{text}");
        }
    }
}
