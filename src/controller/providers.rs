//! Turning a pool's provider entry into a client: read the API key from its Secret, build the
//! vendor client with the operator's base URLs, wrap it with metrics, and cache the result.
//!
//! Credentials come only from Secrets in the pool's namespace; base URLs only from the
//! operator's own configuration (never from a namespaced resource). Secrets are re-read at
//! most every [`SECRET_TTL`], so a rotated key is picked up within that time.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};

use crate::{
    crd::{GpuPool, ProviderKind, ProviderSpec, RunpodApi, SecretKeyRef, WorkerSpec},
    metrics::Metrics,
    provider::{
        Credentials, InstanceProvider, ProviderError, ServerlessProvider,
        http::WorkerShape,
        instrumented::{InstrumentedInstances, InstrumentedServerless},
        runpod::{RunpodClient, RunpodOptions},
        runpod_serverless::{RunpodServerlessClient, RunpodServerlessOptions},
        runpod_v2::{RunpodV2Client, RunpodV2Options},
        vast::{VastClient, VastOptions},
    },
    worker::{WorkerClient, WorkerClientConfig},
};

use super::{Error, Result};

/// How long a Secret's value is reused before it is read again.
pub const SECRET_TTL: Duration = Duration::from_secs(30);

/// Where the operator reaches each provider (from flags; never from a namespaced resource).
#[derive(Clone, Debug, Default)]
pub struct ProviderEndpoints {
    pub vast: VastOptions,
    /// RunPod pods through GraphQL (entries with `api: GraphQL`).
    pub runpod: RunpodOptions,
    /// RunPod pods through REST v2 (entries with `api: RestV2`, the default).
    pub runpod_v2: RunpodV2Options,
    /// RunPod Serverless; its settings go to REST v2 or GraphQL as the entry's `api` says.
    pub serverless: RunpodServerlessOptions,
    pub worker: WorkerClientConfig,
}

/// Builds vendor clients. The real one talks HTTP; tests may substitute their own.
pub trait ProviderFactory: Send + Sync {
    fn instance(
        &self,
        pool: &GpuPool,
        entry: &ProviderSpec,
        key: Credentials,
    ) -> Result<Arc<dyn InstanceProvider>, ProviderError>;
    fn serverless(
        &self,
        entry: &ProviderSpec,
        key: Credentials,
    ) -> Result<Arc<dyn ServerlessProvider>, ProviderError>;
}

/// The factory used in production and end-to-end tests.
pub struct HttpProviders {
    pub endpoints: ProviderEndpoints,
    pub metrics: Arc<Metrics>,
}

impl ProviderFactory for HttpProviders {
    fn instance(
        &self,
        pool: &GpuPool,
        entry: &ProviderSpec,
        key: Credentials,
    ) -> Result<Arc<dyn InstanceProvider>, ProviderError> {
        let worker = pool
            .spec
            .worker
            .as_ref()
            .ok_or_else(|| ProviderError::Permanent("the pool has no worker section".into()))?;
        let shape = WorkerShape::from_spec(worker)?;
        let inner: Arc<dyn InstanceProvider> = match (&entry.vast, &entry.runpod) {
            (Some(v), None) => {
                Arc::new(VastClient::new(v, shape, key, self.endpoints.vast.clone())?)
            }
            (None, Some(r)) if r.api == RunpodApi::GraphQL => Arc::new(RunpodClient::new(
                r,
                shape,
                key,
                self.endpoints.runpod.clone(),
            )?),
            (None, Some(r)) => Arc::new(RunpodV2Client::new(
                r,
                shape,
                key,
                self.endpoints.runpod_v2.clone(),
            )?),
            _ => {
                return Err(ProviderError::Permanent(format!(
                    "provider {} is not a vast or runpod entry",
                    entry.name
                )));
            }
        };
        Ok(Arc::new(InstrumentedInstances::new(
            inner,
            entry.name.clone(),
            self.metrics.clone(),
        )))
    }

    fn serverless(
        &self,
        entry: &ProviderSpec,
        key: Credentials,
    ) -> Result<Arc<dyn ServerlessProvider>, ProviderError> {
        let spec = entry.runpod_serverless.as_ref().ok_or_else(|| {
            ProviderError::Permanent(format!("provider {} is not serverless", entry.name))
        })?;
        let inner = Arc::new(RunpodServerlessClient::new(
            spec,
            key,
            self.endpoints.serverless.clone(),
        )?);
        Ok(Arc::new(InstrumentedServerless::new(
            inner,
            entry.name.clone(),
            self.metrics.clone(),
        )))
    }
}

/// Cache key of a built client: the pool object as of a generation, one entry, one key value.
type ClientKey = (String, String, i64, String, String);

/// Secret values by (namespace, name, key), with when they were read.
type SecretCache = HashMap<(String, String, String), (Instant, Credentials)>;

/// Reads Secrets and caches clients built from them.
pub struct Providers {
    client: Client,
    factory: Box<dyn ProviderFactory>,
    worker_config: WorkerClientConfig,
    secrets: Mutex<SecretCache>,
    instances: Mutex<HashMap<ClientKey, Arc<dyn InstanceProvider>>>,
    serverless: Mutex<HashMap<ClientKey, Arc<dyn ServerlessProvider>>>,
    workers: Mutex<HashMap<ClientKey, WorkerClient>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Providers {
    pub fn new(
        client: Client,
        factory: Box<dyn ProviderFactory>,
        worker: WorkerClientConfig,
    ) -> Self {
        Self {
            client,
            factory,
            worker_config: worker,
            secrets: Mutex::default(),
            instances: Mutex::default(),
            serverless: Mutex::default(),
            workers: Mutex::default(),
        }
    }

    /// The value of one Secret key in `namespace`. The error names the Secret and key, never
    /// the value.
    pub async fn secret(&self, namespace: &str, r: &SecretKeyRef) -> Result<Credentials> {
        let cache_key = (namespace.to_string(), r.name.clone(), r.key.clone());
        if let Some((at, value)) = lock(&self.secrets).get(&cache_key)
            && at.elapsed() < SECRET_TTL
        {
            return Ok(value.clone());
        }
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let fetched = match api.get_opt(&r.name).await {
            Ok(s) => s,
            // The API server cannot be reached: a key read a moment ago is still the key, and
            // a teardown that must not wait for the API server needs it (deadlines.rs).
            Err(e) => {
                if let Some((_, value)) = lock(&self.secrets).get(&cache_key) {
                    tracing::warn!(secret = %r.name, error = %e, "cannot read the Secret; using the value read before");
                    return Ok(value.clone());
                }
                return Err(e.into());
            }
        };
        let secret = match fetched {
            Some(s) => s,
            None => {
                return Err(Error::BadReference(format!(
                    "Secret {namespace}/{} not found",
                    r.name
                )));
            }
        };
        let bytes = secret
            .data
            .as_ref()
            .and_then(|d| d.get(&r.key))
            .map(|b| b.0.clone())
            .or_else(|| {
                secret
                    .string_data
                    .as_ref()
                    .and_then(|d| d.get(&r.key))
                    .map(|s| s.clone().into_bytes())
            })
            .ok_or_else(|| {
                Error::BadReference(format!(
                    "Secret {namespace}/{} has no key {}",
                    r.name, r.key
                ))
            })?;
        let value = String::from_utf8(bytes)
            .map(|s| s.trim().to_string())
            .map_err(|_| {
                Error::BadReference(format!(
                    "Secret {namespace}/{} key {} is not UTF-8 text",
                    r.name, r.key
                ))
            })?;
        if value.is_empty() {
            return Err(Error::BadReference(format!(
                "Secret {namespace}/{} key {} is empty",
                r.name, r.key
            )));
        }
        let value = Credentials::new(value);
        lock(&self.secrets).insert(cache_key, (Instant::now(), value.clone()));
        Ok(value)
    }

    /// The values of `worker`'s `env` entries that come from a Secret key (`valueFrom`), by
    /// variable name, read from `namespace`. The error names the variable, the Secret and the
    /// key, never a value.
    pub async fn worker_env_secrets(
        &self,
        namespace: &str,
        worker: &WorkerSpec,
    ) -> Result<BTreeMap<String, Credentials>> {
        let mut values = BTreeMap::new();
        for e in &worker.env {
            let Some(r) = e.secret_key_ref() else {
                continue;
            };
            let value = self.secret(namespace, r).await.map_err(|err| match err {
                Error::BadReference(m) => {
                    Error::BadReference(format!("worker env {}: {m}", e.name))
                }
                other => other,
            })?;
            values.insert(e.name.clone(), value);
        }
        Ok(values)
    }

    fn key(pool: &GpuPool, entry: &str, credential: &Credentials) -> ClientKey {
        (
            pool.metadata.namespace.clone().unwrap_or_default(),
            pool.metadata.name.clone().unwrap_or_default(),
            pool.metadata.generation.unwrap_or_default(),
            entry.to_string(),
            credential.expose().to_string(),
        )
    }

    /// The entry named `name` of `pool`.
    pub fn entry<'a>(pool: &'a GpuPool, name: &str) -> Result<&'a ProviderSpec> {
        pool.spec
            .providers
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| Error::BadReference(format!("pool has no provider named {name}")))
    }

    /// The instance provider for entry `name` of `pool`.
    pub async fn instance(&self, pool: &GpuPool, name: &str) -> Result<Arc<dyn InstanceProvider>> {
        let entry = Self::entry(pool, name)?;
        if entry.kind() == Some(ProviderKind::RunpodServerless) {
            return Err(Error::BadReference(format!(
                "provider {name} is serverless: it runs jobs, not instances"
            )));
        }
        let ns = pool.metadata.namespace.clone().unwrap_or_default();
        let cred_ref = entry
            .credentials()
            .ok_or_else(|| Error::BadReference(format!("provider {name} has no credentials")))?;
        let key = self.secret(&ns, cred_ref).await?;
        let cache_key = Self::key(pool, name, &key);
        if let Some(p) = lock(&self.instances).get(&cache_key) {
            return Ok(p.clone());
        }
        let built = self.factory.instance(pool, entry, key)?;
        lock(&self.instances).insert(cache_key, built.clone());
        Ok(built)
    }

    /// The serverless provider for entry `name` of `pool`.
    pub async fn serverless(
        &self,
        pool: &GpuPool,
        name: &str,
    ) -> Result<Arc<dyn ServerlessProvider>> {
        let entry = Self::entry(pool, name)?;
        let ns = pool.metadata.namespace.clone().unwrap_or_default();
        let cred_ref = entry
            .credentials()
            .ok_or_else(|| Error::BadReference(format!("provider {name} has no credentials")))?;
        let key = self.secret(&ns, cred_ref).await?;
        let cache_key = Self::key(pool, name, &key);
        if let Some(p) = lock(&self.serverless).get(&cache_key) {
            return Ok(p.clone());
        }
        let built = self.factory.serverless(entry, key)?;
        lock(&self.serverless).insert(cache_key, built.clone());
        Ok(built)
    }

    /// The worker client of `pool` (it carries the pool's worker API key, if any).
    pub async fn worker(&self, pool: &GpuPool) -> Result<WorkerClient> {
        let ns = pool.metadata.namespace.clone().unwrap_or_default();
        let api_key = match pool
            .spec
            .worker
            .as_ref()
            .and_then(|w| w.api_key_secret_ref.as_ref())
        {
            Some(r) => Some(self.secret(&ns, r).await?),
            None => None,
        };
        let cache_key = Self::key(
            pool,
            "worker",
            api_key.as_ref().unwrap_or(&Credentials::new("")),
        );
        if let Some(w) = lock(&self.workers).get(&cache_key) {
            return Ok(w.clone());
        }
        let worker = WorkerClient::new(api_key, self.worker_config.clone())?;
        lock(&self.workers).insert(cache_key, worker.clone());
        Ok(worker)
    }
}
