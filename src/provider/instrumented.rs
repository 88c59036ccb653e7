//! A decorator that records the latency and outcome of every provider call as metrics,
//! around any [`InstanceProvider`] or [`ServerlessProvider`]. Timeouts live in the vendor
//! clients (every HTTP request has one); this layer only observes.

use std::{future::Future, sync::Arc, time::Instant};

use async_trait::async_trait;
use serde_json::Value;

use super::{
    CreateRequest, EndpointHealth, EndpointSettings, InstanceProvider, Offer, ProviderKind,
    ProviderResult, RemoteInstance, ServerlessJob, ServerlessProvider,
};
use crate::metrics::{Metrics, ProviderCallLabels};

async fn observe<T>(
    metrics: &Metrics,
    provider: &str,
    operation: &str,
    call: impl Future<Output = ProviderResult<T>>,
) -> ProviderResult<T> {
    let started = Instant::now();
    let result = call.await;
    let labels = ProviderCallLabels {
        provider: provider.to_string(),
        operation: operation.to_string(),
        outcome: match &result {
            Ok(_) => "Ok".to_string(),
            Err(e) => e.label().to_string(),
        },
    };
    metrics.provider_calls.get_or_create(&labels).inc();
    metrics
        .provider_call_seconds
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    result
}

/// An instance provider with metrics.
#[derive(Debug)]
pub struct InstrumentedInstances {
    inner: Arc<dyn InstanceProvider>,
    name: String,
    metrics: Arc<Metrics>,
}

impl InstrumentedInstances {
    pub fn new(inner: Arc<dyn InstanceProvider>, name: String, metrics: Arc<Metrics>) -> Self {
        Self {
            inner,
            name,
            metrics,
        }
    }
}

#[async_trait]
impl InstanceProvider for InstrumentedInstances {
    fn kind(&self) -> ProviderKind {
        self.inner.kind()
    }
    async fn offers(&self) -> ProviderResult<Vec<Offer>> {
        observe(&self.metrics, &self.name, "offers", self.inner.offers()).await
    }
    async fn create(&self, offer: &Offer, req: &CreateRequest) -> ProviderResult<RemoteInstance> {
        observe(
            &self.metrics,
            &self.name,
            "create",
            self.inner.create(offer, req),
        )
        .await
    }
    async fn get(&self, id: &str) -> ProviderResult<RemoteInstance> {
        observe(&self.metrics, &self.name, "get", self.inner.get(id)).await
    }
    async fn delete(&self, id: &str) -> ProviderResult<()> {
        observe(&self.metrics, &self.name, "delete", self.inner.delete(id)).await
    }
    async fn list_labeled(&self, prefix: &str) -> ProviderResult<Vec<RemoteInstance>> {
        observe(
            &self.metrics,
            &self.name,
            "list",
            self.inner.list_labeled(prefix),
        )
        .await
    }
    async fn find_by_label(&self, label: &str) -> ProviderResult<Option<RemoteInstance>> {
        observe(
            &self.metrics,
            &self.name,
            "find",
            self.inner.find_by_label(label),
        )
        .await
    }
}

/// A serverless provider with metrics.
#[derive(Debug)]
pub struct InstrumentedServerless {
    inner: Arc<dyn ServerlessProvider>,
    name: String,
    metrics: Arc<Metrics>,
}

impl InstrumentedServerless {
    pub fn new(inner: Arc<dyn ServerlessProvider>, name: String, metrics: Arc<Metrics>) -> Self {
        Self {
            inner,
            name,
            metrics,
        }
    }
}

#[async_trait]
impl ServerlessProvider for InstrumentedServerless {
    async fn submit(&self, input: &Value) -> ProviderResult<String> {
        observe(
            &self.metrics,
            &self.name,
            "submit",
            self.inner.submit(input),
        )
        .await
    }
    async fn status(&self, job_id: &str) -> ProviderResult<ServerlessJob> {
        observe(
            &self.metrics,
            &self.name,
            "status",
            self.inner.status(job_id),
        )
        .await
    }
    async fn cancel(&self, job_id: &str) -> ProviderResult<()> {
        observe(
            &self.metrics,
            &self.name,
            "cancel",
            self.inner.cancel(job_id),
        )
        .await
    }
    async fn health(&self) -> ProviderResult<EndpointHealth> {
        observe(&self.metrics, &self.name, "health", self.inner.health()).await
    }
    async fn settings(&self) -> ProviderResult<EndpointSettings> {
        observe(&self.metrics, &self.name, "settings", self.inner.settings()).await
    }
    async fn update_settings(&self, settings: &EndpointSettings) -> ProviderResult<()> {
        observe(
            &self.metrics,
            &self.name,
            "update_settings",
            self.inner.update_settings(settings),
        )
        .await
    }
}
