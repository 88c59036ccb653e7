//! The GpuPool reconciler: the scheduler of its pool. It binds pending jobs to idle
//! instances (the instance write, with a resourceVersion precondition, is the lock that
//! gives an instance to exactly one job), sends jobs to serverless endpoints, creates
//! GpuInstances within the pool's limits, shows why jobs wait, keeps serverless endpoint
//! settings in line, and reports the pool's state. Deleting a pool first deletes its
//! instances (so their machines are destroyed while credentials are still known).

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use kube::runtime::events::EventType;
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, PostParams},
    runtime::{
        controller::Action,
        finalizer::{Event as Finalizer, finalizer},
    },
};
use rust_decimal::Decimal;
use tracing::{debug, info, instrument};

use crate::{
    crd::{
        ConditionType, GpuInstance, GpuInstanceSpec, GpuPool, GpuPoolStatus, INSTANCE_FINALIZER,
        InstancePhase, JobPhase, Money, VideoJob, WorkerSpec,
        pool::{InstanceCounts, ProviderState, ProviderStatus},
    },
    metrics::PoolGauges,
    provider::EndpointSettings,
};

use super::{
    Context, Error, Result,
    context::warning_if,
    from_finalizer,
    registry::PoolKey,
    scheduling::{self, InstanceView, Limits, PendingJob, ProviderView, WaitReason},
    settle,
    status::{apply_own_status, apply_status, offer_price, set_condition},
};

pub use crate::crd::{POOL_FINALIZER, POOL_LABEL};
/// How often at most a pool's status is rewritten when only its counts changed.
const STATUS_COUNTS_INTERVAL: Duration = Duration::from_secs(1);
/// How often serverless endpoint settings are compared with the pool.
const ENDPOINT_SYNC: Duration = Duration::from_secs(300);

#[instrument(skip_all, fields(ns = pool.namespace().unwrap_or_default(), name = pool.name_any()))]
pub async fn reconcile(pool: Arc<GpuPool>, ctx: Arc<Context>) -> Result<Action> {
    let ns = pool.namespace().unwrap_or_default();
    let api: Api<GpuPool> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, POOL_FINALIZER, pool.clone(), |event| async {
        match event {
            Finalizer::Apply(pool) => apply(pool, &ctx, &api).await,
            Finalizer::Cleanup(pool) => cleanup(pool, &ctx).await,
        }
    })
    .await;
    settle(pool.as_ref(), &ctx, from_finalizer(result))
}

/// The pool's jobs and instances as the cache shows them, with this process's own recent
/// writes that the cache does not show yet (see `written.rs`).
fn jobs_of(ctx: &Context, ns: &str, pool: &str) -> Vec<Arc<VideoJob>> {
    ctx.written_jobs
        .overlay(ctx.stores().jobs.state())
        .into_iter()
        .filter(|j| j.namespace().as_deref() == Some(ns) && j.spec.pool == pool)
        .collect()
}

fn instances_of(ctx: &Context, ns: &str, pool: &str) -> Vec<Arc<GpuInstance>> {
    ctx.written_instances
        .overlay(ctx.stores().instances.state())
        .into_iter()
        .filter(|i| i.namespace().as_deref() == Some(ns) && i.spec.pool == pool)
        .collect()
}

fn job_phase(j: &VideoJob) -> JobPhase {
    j.status.as_ref().and_then(|s| s.phase).unwrap_or_default()
}

fn instance_phase(i: &GpuInstance) -> InstancePhase {
    i.status.as_ref().and_then(|s| s.phase).unwrap_or_default()
}

fn unix_seconds(t: Timestamp) -> f64 {
    t.as_millisecond() as f64 / 1000.0
}

fn instance_price(i: &GpuInstance) -> Option<Decimal> {
    i.status.as_ref().and_then(offer_price).map(Money::amount)
}

/// One scheduling pass, as named steps: observe the pool, repair what a crash interrupted,
/// plan (pure: `scheduling::schedule` on views of the snapshot), then carry the plan out:
/// binds, serverless submissions, new instances, wait reasons; endpoint settings; status.
/// A Warning event, once per process, for each provider entry that names a deprecated API.
async fn warn_deprecated(pool: &GpuPool, ctx: &Context) {
    for message in pool.deprecated_apis() {
        if ctx.first_warning(&PoolKey::of(pool), &message) {
            let reason = crate::crd::pool::DEPRECATED_API_REASON;
            ctx.event(pool, EventType::Warning, reason, message).await;
        }
    }
}

async fn apply(pool: Arc<GpuPool>, ctx: &Arc<Context>, api: &Api<GpuPool>) -> Result<Action> {
    let ns = pool.namespace().unwrap_or_default();
    let snap = Snapshot::observe(ctx, &pool);
    let job_api: Api<VideoJob> = Api::namespaced(ctx.client.clone(), &ns);
    let inst_api: Api<GpuInstance> = Api::namespaced(ctx.client.clone(), &ns);

    warn_deprecated(&pool, ctx).await;
    let repaired = repair_bindings(ctx, &job_api, &snap).await?;
    let pending = snap.pending(&repaired);
    if !pending.is_empty() {
        check_references(&pool, ctx).await;
    }
    let input = SchedulingInput::of(&pool, &snap, &pending, ctx.now(), |entry| {
        ctx.provider_backoff(&PoolKey::of(pool.as_ref()).entry(entry))
            .is_none()
    });
    let plan = scheduling::schedule(
        &input.pending,
        &input.instances,
        &input.providers,
        &input.limits,
    );
    debug!(
        pending = input.pending.len(),
        instances = input.instances.len(),
        ?plan,
        "scheduling pass"
    );

    // Each step says whether every write went through; a conflict means "look again soon".
    let mut clean = bind_all(ctx, &pool, &job_api, &inst_api, &snap, &plan).await?;
    clean &= submit_serverless(ctx, &job_api, &snap, &plan).await?;
    for provider in &plan.create {
        let created = create_instance(&inst_api, &pool, provider).await?;
        ctx.written_instances.wrote(None, created);
    }
    clean &= write_wait_reasons(ctx, &pool, &job_api, &snap, &plan).await?;
    sync_endpoints(&pool, ctx).await;
    let mut requeue = if clean {
        Duration::from_secs(60)
    } else {
        Duration::from_millis(200)
    };
    if let Some(wait) = write_status(&pool, ctx, api, &snap).await? {
        requeue = requeue.min(wait);
    }
    Ok(Action::requeue(requeue))
}

/// A pool's jobs and instances as the caches show them, with this process's own recent
/// writes that the caches do not show yet (see `written.rs`), by name, at one instant.
struct Snapshot {
    jobs: Vec<Arc<VideoJob>>,
    instances: Vec<Arc<GpuInstance>>,
    job_by_name: HashMap<String, Arc<VideoJob>>,
    instance_by_name: HashMap<String, Arc<GpuInstance>>,
    now: Timestamp,
}

impl Snapshot {
    fn observe(ctx: &Context, pool: &GpuPool) -> Self {
        let (ns, name) = (pool.namespace().unwrap_or_default(), pool.name_any());
        Self::new(
            jobs_of(ctx, &ns, &name),
            instances_of(ctx, &ns, &name),
            ctx.now(),
        )
    }

    fn new(jobs: Vec<Arc<VideoJob>>, instances: Vec<Arc<GpuInstance>>, now: Timestamp) -> Self {
        let job_by_name = jobs
            .iter()
            .filter_map(|j| Some((j.metadata.name.clone()?, Arc::clone(j))))
            .collect();
        let instance_by_name = instances
            .iter()
            .filter_map(|i| Some((i.metadata.name.clone()?, Arc::clone(i))))
            .collect();
        Self {
            jobs,
            instances,
            job_by_name,
            instance_by_name,
            now,
        }
    }

    fn job(&self, name: &str) -> Option<&Arc<VideoJob>> {
        self.job_by_name.get(name)
    }

    /// The jobs waiting for a place, but those whose binding was just repaired.
    fn pending(&self, repaired: &[String]) -> Vec<Arc<VideoJob>> {
        self.jobs
            .iter()
            .filter(|j| j.metadata.deletion_timestamp.is_none())
            .filter(|j| matches!(job_phase(j), JobPhase::Pending))
            .filter(|j| !repaired.contains(&j.name_any()))
            .cloned()
            .collect()
    }
}

/// Completes the bindings a crash interrupted: an instance that claims a job still Pending.
async fn repair_bindings(
    ctx: &Context,
    job_api: &Api<VideoJob>,
    snap: &Snapshot,
) -> Result<Vec<String>> {
    let mut repaired = Vec::new();
    for inst in &snap.instances {
        let Some(job_name) = inst.status.as_ref().and_then(|s| s.current_job.clone()) else {
            continue;
        };
        if let Some(job) = snap.job(&job_name)
            && matches!(job_phase(job), JobPhase::Pending)
            && job.metadata.deletion_timestamp.is_none()
            && inst.metadata.deletion_timestamp.is_none()
        {
            bind_job(ctx, job_api, job, &inst.name_any(), &inst.spec.provider).await?;
            repaired.push(job_name);
        }
    }
    Ok(repaired)
}

/// What `scheduling::schedule` decides on, built from a snapshot without I/O.
#[derive(Debug)]
struct SchedulingInput {
    pending: Vec<PendingJob>,
    /// Idle instances longest idle first, so warm ones are reused before fresh ones idle out.
    instances: Vec<InstanceView>,
    providers: Vec<ProviderView>,
    limits: Limits,
}

impl SchedulingInput {
    /// `available(entry)` says whether a provider entry may be used now (not backing off).
    fn of(
        pool: &GpuPool,
        snap: &Snapshot,
        pending: &[Arc<VideoJob>],
        now: Timestamp,
        available: impl Fn(&str) -> bool,
    ) -> Self {
        let mut instances: Vec<InstanceView> = snap
            .instances
            .iter()
            .map(|i| InstanceView {
                name: i.name_any(),
                provider: i.spec.provider.clone(),
                phase: instance_phase(i),
                busy: i.status.as_ref().is_some_and(|s| s.current_job.is_some()),
                releasing: i
                    .status
                    .as_ref()
                    .and_then(|s| s.current_job.as_ref())
                    .and_then(|j| snap.job(j))
                    .is_some_and(|j| job_phase(j).is_finished()),
                // Going away too: idle, and within the claim margin of its idle deadline.
                deleting: i.metadata.deletion_timestamp.is_some()
                    || i.status.as_ref().is_some_and(|s| s.current_job.is_none())
                        && !super::deadlines::claimable(
                            i.status
                                .as_ref()
                                .and_then(|s| s.idle_deadline.as_ref())
                                .map(|t| t.0),
                            pool.spec.idle_timeout_seconds,
                            now,
                        ),
                price_per_hour: instance_price(i),
            })
            .collect();
        instances.sort_by_key(|v| {
            snap.instance_by_name
                .get(&v.name)
                .and_then(|i| i.status.as_ref()?.idle_since.as_ref().map(|t| t.0))
                .unwrap_or(Timestamp::MAX)
        });
        let providers = pool
            .spec
            .providers
            .iter()
            .filter_map(|p| {
                Some(ProviderView {
                    name: p.name.clone(),
                    kind: p.kind()?,
                    available: available(&p.name),
                    max_price_per_hour: p
                        .vast
                        .as_ref()
                        .map(|v| v.max_price_per_hour.as_str())
                        .or(p.runpod.as_ref().map(|r| r.max_price_per_hour.as_str()))
                        .and_then(|s| s.parse().ok()),
                })
            })
            .collect();
        let limits = Limits {
            max_instances: pool.spec.max_instances.max(0) as usize,
            max_hourly_spend: pool.spec.max_hourly_spend.map(Money::amount),
        };
        let pending = pending
            .iter()
            .map(|j| PendingJob {
                name: j.name_any(),
                created: j
                    .metadata
                    .creation_timestamp
                    .as_ref()
                    .map(|t| t.0)
                    .unwrap_or(snap.now),
                provider: j.spec.provider.clone(),
            })
            .collect();
        Self {
            pending,
            instances,
            providers,
            limits,
        }
    }
}

/// The plan's bindings. They are independent (each instance and job is written once), so
/// they go out together: a pass that places many jobs does not wait for each write in turn.
/// False if one lost a race.
async fn bind_all(
    ctx: &Arc<Context>,
    pool: &GpuPool,
    job_api: &Api<VideoJob>,
    inst_api: &Api<GpuInstance>,
    snap: &Snapshot,
    plan: &scheduling::Plan,
) -> Result<bool> {
    let pairs: Vec<(Arc<VideoJob>, Arc<GpuInstance>)> = plan
        .bind
        .iter()
        .filter_map(|(j, i)| {
            Some((
                Arc::clone(snap.job(j)?),
                Arc::clone(snap.instance_by_name.get(i)?),
            ))
        })
        .collect();
    let binds = futures::stream::iter(pairs)
        .map(|(job, inst)| async move { bind(ctx, pool, job_api, inst_api, &job, &inst).await })
        .buffer_unordered(BIND_CONCURRENCY)
        .collect::<Vec<Result<bool>>>()
        .await;
    let mut clean = true;
    for r in binds {
        clean &= r?;
    }
    Ok(clean)
}

/// The plan's serverless submissions: each job Scheduled on its endpoint (the job reconciler
/// sends it). False if one lost a race.
async fn submit_serverless(
    ctx: &Context,
    job_api: &Api<VideoJob>,
    snap: &Snapshot,
    plan: &scheduling::Plan,
) -> Result<bool> {
    let mut clean = true;
    for (job_name, provider) in &plan.serverless {
        let Some(job) = snap.job(job_name) else {
            continue;
        };
        let mut s = job.status.clone().unwrap_or_default();
        s.bind(None, provider, snap.now);
        set_condition(
            &mut s.conditions,
            ConditionType::Scheduled,
            true,
            "Serverless",
            &format!("sent to the serverless endpoint {provider}"),
            job.metadata.generation,
            snap.now,
        );
        match apply_status(job_api, job.as_ref(), &s).await {
            Ok(written) => ctx.written_jobs.wrote(job.resource_version(), written),
            Err(e) if e.is_conflict() => clean = false,
            Err(e) => return Err(e),
        }
    }
    Ok(clean)
}

/// Why each waiting job waits, written only when it changed (and together). False if one
/// lost a race.
async fn write_wait_reasons(
    ctx: &Arc<Context>,
    pool: &GpuPool,
    job_api: &Api<VideoJob>,
    snap: &Snapshot,
    plan: &scheduling::Plan,
) -> Result<bool> {
    let now = snap.now;
    let waits: Vec<(Arc<VideoJob>, String, String)> = plan
        .waiting
        .iter()
        .filter_map(|(job_name, reason)| {
            let job = snap.job(job_name)?;
            let (code, message) = wait_message(reason, pool);
            Some((Arc::clone(job), code.to_string(), message))
        })
        .collect();
    let written = futures::stream::iter(waits)
        .map(|(job, code, message)| async move {
            let mut s = job.status.clone().unwrap_or_default();
            let new = s.phase.is_none();
            s.phase = Some(JobPhase::Pending);
            s.observed_generation = job.metadata.generation;
            if !set_condition(
                &mut s.conditions,
                ConditionType::Scheduled,
                false,
                &code,
                &message,
                job.metadata.generation,
                now,
            ) && !new
            {
                return Ok(true);
            }
            match apply_status(job_api, job.as_ref(), &s).await {
                Ok(written) => {
                    ctx.written_jobs
                        .wrote(job.resource_version(), written.clone());
                    let job = written;
                    // Waiting for a machine that is starting or busy is normal
                    // operation: only the reasons that need a person get an event.
                    if !matches!(code.as_str(), "InstanceStarting" | "MaxInstances") {
                        ctx.event(&job, warning_if(code == "UnknownProvider"), &code, message)
                            .await;
                    }
                    Ok(true)
                }
                Err(e) if e.is_conflict() => Ok(false),
                Err(e) => Err(e),
            }
        })
        .buffer_unordered(BIND_CONCURRENCY)
        .collect::<Vec<Result<bool>>>()
        .await;
    let mut clean = true;
    for r in written {
        clean &= r?;
    }
    Ok(clean)
}

/// Writes the pool's status when it changed, and says how soon the pool should look again:
/// when a counts-only change is held back, or when a provider's back-off ends.
async fn write_status(
    pool: &GpuPool,
    ctx: &Context,
    api: &Api<GpuPool>,
    snap: &Snapshot,
) -> Result<Option<Duration>> {
    let (status, next_backoff) = pool_status(pool, ctx, &snap.jobs, &snap.instances, snap.now);
    let mut wait: Option<Duration> = None;
    if pool.status.as_ref() != Some(&status) {
        // Counts move with every job; under load they are written at most once per
        // STATUS_COUNTS_INTERVAL (a pass is due by then to write the latest). Anything else
        // (conditions, providers, generation) is written at once.
        let counts_only = pool.status.as_ref().is_some_and(|old| {
            old.observed_generation == status.observed_generation
                && old.providers == status.providers
                && old.conditions == status.conditions
        });
        match ctx.pool_status_wait(pool, counts_only, STATUS_COUNTS_INTERVAL) {
            Some(w) => wait = Some(w),
            None => {
                apply_own_status(api, pool, &status).await?;
            }
        }
    }
    if let Some(at) = next_backoff {
        let until = snap.now.duration_until(at).unsigned_abs() + Duration::from_millis(50);
        wait = Some(wait.map_or(until, |w| w.min(until)));
    }
    Ok(wait)
}

/// Checks, before anything is rented, what every provider entry needs from the namespace:
/// its credentials Secret and key and, for the entries that rent machines, the worker API
/// key and the Secret keys of `worker.env`. An entry that lacks one is marked unavailable (pool status, a Warning event) so the
/// scheduler does not create an instance that could only fail; it is checked again after
/// one back-off period. Secret reads are cached; a read that fails for another reason (the
/// API server unreachable) marks nothing.
async fn check_references(pool: &GpuPool, ctx: &Context) {
    let ns = pool.namespace().unwrap_or_default();
    let name = pool.name_any();
    let worker_key = match pool.spec.worker.as_ref() {
        Some(w) => worker_secrets_missing(ctx, &ns, w).await,
        None => None,
    };
    for p in &pool.spec.providers {
        if ctx
            .provider_backoff(&PoolKey::new(&ns, &name).entry(&p.name))
            .is_some()
        {
            continue;
        }
        let problem = match p.credentials() {
            Some(r) => missing(ctx, &ns, r).await,
            None => Some(format!("provider {} has no credentials", p.name)),
        };
        let rents_machines = p.kind() != Some(crate::crd::ProviderKind::RunpodServerless);
        let problem = problem.or_else(|| worker_key.clone().filter(|_| rents_machines));
        if let Some(message) = problem
            && ctx.provider_misconfigured(PoolKey::new(&ns, &name).entry(&p.name), message.clone())
        {
            ctx.event(
                pool,
                EventType::Warning,
                "ProviderUnavailable",
                format!("provider {}: {message}", p.name),
            )
            .await;
        }
    }
}

/// What the Secrets a rented machine's worker needs lack, if anything: the worker API key,
/// then each `worker.env` `valueFrom` (the message names the variable and the Secret).
async fn worker_secrets_missing(ctx: &Context, ns: &str, w: &WorkerSpec) -> Option<String> {
    if let Some(r) = &w.api_key_secret_ref
        && let Some(m) = missing(ctx, ns, r).await
    {
        return Some(format!("the worker API key: {m}"));
    }
    match ctx.providers.worker_env_secrets(ns, w).await {
        Err(Error::BadReference(m)) => Some(m),
        _ => None,
    }
}

/// What a Secret reference lacks, if anything (other errors are not the user's to fix).
async fn missing(ctx: &Context, ns: &str, r: &crate::crd::SecretKeyRef) -> Option<String> {
    match ctx.providers.secret(ns, r).await {
        Err(Error::BadReference(m)) => Some(m),
        _ => None,
    }
}

fn wait_message(reason: &WaitReason, pool: &GpuPool) -> (&'static str, String) {
    match reason {
        WaitReason::InstanceStarting => (
            "InstanceStarting",
            "waiting for an instance that is starting".into(),
        ),
        WaitReason::MaxInstances => (
            "MaxInstances",
            format!(
                "the pool has its maximum of {} instances",
                pool.spec.max_instances
            ),
        ),
        WaitReason::MaxHourlySpend => (
            "MaxHourlySpend",
            format!(
                "another instance would exceed the pool's maxHourlySpend of {} USD/h",
                pool.spec.max_hourly_spend.unwrap_or_default()
            ),
        ),
        WaitReason::NoProviderAvailable => (
            "NoProviderAvailable",
            "every provider the job may use is backing off or misconfigured".into(),
        ),
        WaitReason::UnknownProvider(p) => (
            "UnknownProvider",
            format!("the pool has no provider named {p}"),
        ),
    }
}

/// How many bindings one pool pass writes at once.
const BIND_CONCURRENCY: usize = 16;

/// Gives `inst` to `job` and starts the job on it. Returns false when the instance changed
/// before the claim (the pass should run again soon).
async fn bind(
    ctx: &Arc<Context>,
    pool: &GpuPool,
    job_api: &Api<VideoJob>,
    inst_api: &Api<GpuInstance>,
    job: &VideoJob,
    inst: &GpuInstance,
) -> Result<bool> {
    let inst_name = inst.name_any();
    // Begun before the check, so that the idle timer of this process sees it (deadlines.rs).
    ctx.claims.begin(&inst.uid().unwrap_or_default(), ctx.now());
    let deadline = inst
        .status
        .as_ref()
        .and_then(|s| s.idle_deadline.as_ref())
        .map(|t| t.0);
    if !super::deadlines::claimable(deadline, pool.spec.idle_timeout_seconds, ctx.now()) {
        debug!(instance = %inst_name, "too close to its idle deadline to be claimed");
        return Ok(false);
    }
    // The claim: only one writer can move the instance from this resourceVersion.
    let mut s = inst.status.clone().unwrap_or_default();
    s.current_job = Some(job.name_any());
    let claimed = match apply_status(inst_api, inst, &s).await {
        Ok(claimed) => {
            ctx.written_instances
                .wrote(inst.resource_version(), claimed.clone());
            claimed
        }
        Err(e)
            if e.is_conflict()
                || matches!(&e, Error::Kube(kube::Error::Api(s)) if s.code == 404) =>
        {
            debug!(instance = %inst_name, "instance changed before the claim; trying again");
            return Ok(false);
        }
        Err(e) => return Err(e),
    };
    // Start the attempt now rather than after the job's watch event comes back: the token
    // is remembered from the instance's creation (read once after a restart).
    if let Some(token) = ctx.sessions.existing(&ctx.client, &claimed).await? {
        match super::dispatch::start_attempt(ctx, job_api, job, &claimed, pool, token).await {
            // No event here: the job's condition names the instance, and the outcome's event
            // follows (one event per job keeps the API server's load per job low).
            Ok(_) => return Ok(true),
            // The job changed meanwhile; the instance's claim stays and the next pass repairs it.
            Err(e) if e.is_conflict() => return Ok(true),
            Err(e) => return Err(e),
        }
    }
    // No token to be found: bind only; the job reconciler reports why it cannot start.
    bind_job(ctx, job_api, job, &inst_name, &inst.spec.provider).await?;
    Ok(true)
}

async fn bind_job(
    ctx: &Context,
    api: &Api<VideoJob>,
    job: &VideoJob,
    instance: &str,
    provider: &str,
) -> Result<()> {
    let now = ctx.now();
    let mut s = job.status.clone().unwrap_or_default();
    s.bind(Some(instance), provider, now);
    set_condition(
        &mut s.conditions,
        ConditionType::Scheduled,
        true,
        "Bound",
        &format!("bound to {instance}"),
        job.metadata.generation,
        now,
    );
    match apply_status(api, job, &s).await {
        Ok(written) => {
            ctx.written_jobs
                .wrote(job.resource_version(), written.clone());
            let job = written;
            ctx.event(
                &job,
                EventType::Normal,
                "Bound",
                format!("bound to instance {instance}"),
            )
            .await;
            Ok(())
        }
        // The job changed meanwhile; the instance's claim stays and the next pass repairs it.
        Err(e) if e.is_conflict() => Ok(()),
        Err(e) => Err(e),
    }
}

async fn create_instance(
    api: &Api<GpuInstance>,
    pool: &GpuPool,
    provider: &str,
) -> Result<GpuInstance> {
    let owner = OwnerReference {
        api_version: GpuPool::api_version(&()).into_owned(),
        kind: GpuPool::kind(&()).into_owned(),
        name: pool.name_any(),
        uid: pool.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(false),
    };
    let mut gi = GpuInstance::new(
        "",
        GpuInstanceSpec {
            pool: pool.name_any(),
            provider: provider.into(),
            capacity_type: pool
                .spec
                .providers
                .iter()
                .find(|p| p.name == provider)
                .map(|p| p.capacity_type)
                .unwrap_or_default(),
        },
    );
    gi.metadata.name = None;
    gi.metadata.generate_name = Some(format!("{}-", pool.name_any()));
    gi.metadata.labels = Some(BTreeMap::from([
        (POOL_LABEL.to_string(), pool.name_any()),
        (crate::crd::PROVIDER_LABEL.to_string(), provider.to_string()),
        (
            crate::crd::MANAGED_BY_LABEL.to_string(),
            crate::crd::MANAGED_BY.to_string(),
        ),
    ]));
    gi.metadata.finalizers = Some(vec![INSTANCE_FINALIZER.to_string()]);
    gi.metadata.owner_references = Some(vec![owner]);
    let created = api.create(&PostParams::default(), &gi).await?;
    info!(instance = %created.name_any(), provider, "created GpuInstance for waiting jobs");
    Ok(created)
}

/// Keeps each managed serverless endpoint's idle timeout and worker bounds equal to the pool's.
async fn sync_endpoints(pool: &GpuPool, ctx: &Context) {
    let desired = EndpointSettings {
        idle_timeout_seconds: pool.spec.idle_timeout_seconds.clamp(1, 3600) as u32,
        workers_min: pool.spec.min_idle.max(0) as u32,
        workers_max: pool.spec.max_instances.max(0) as u32,
    };
    for entry in &pool.spec.providers {
        let Some(sls) = &entry.runpod_serverless else {
            continue;
        };
        if !sls.manage_endpoint_settings
            || !ctx.endpoint_sync_due(PoolKey::of(pool).entry(&entry.name), ENDPOINT_SYNC)
        {
            continue;
        }
        let result = async {
            let endpoint = ctx.providers.serverless(pool, &entry.name).await?;
            let current = endpoint.settings().await?;
            if current != desired {
                endpoint.update_settings(&desired).await?;
                info!(provider = %entry.name, ?desired, "serverless endpoint settings updated to match the pool");
            }
            Ok::<_, Error>(())
        }
        .await;
        if let Err(e) = result {
            ctx.endpoint_sync_failed(&PoolKey::of(pool).entry(&entry.name));
            ctx.event(
                pool,
                EventType::Warning,
                "EndpointSyncFailed",
                format!("{}: {e}", entry.name),
            )
            .await;
        }
    }
}

/// What the pool's instances and jobs add up to, for its status and its gauges.
#[derive(Debug, Default, PartialEq)]
pub struct Tally {
    pub counts: InstanceCounts,
    /// Summed price per hour of the instances that are billing.
    pub spend: Decimal,
    /// Instances by provider entry and phase.
    pub by_label: BTreeMap<(String, String), i64>,
    /// Idle instances and their deadlines (Unix seconds).
    pub idle: Vec<(String, f64)>,
    /// Jobs not being deleted, by phase.
    pub jobs: BTreeMap<String, i64>,
}

impl Tally {
    pub fn of(instances: &[Arc<GpuInstance>], jobs: &[Arc<VideoJob>]) -> Self {
        let mut t = Tally::default();
        for i in instances {
            t.add_instance(i);
        }
        for j in jobs
            .iter()
            .filter(|j| j.metadata.deletion_timestamp.is_none())
        {
            *t.jobs.entry(format!("{:?}", job_phase(j))).or_default() += 1;
        }
        t
    }

    fn add_instance(&mut self, i: &GpuInstance) {
        let c = &mut self.counts;
        c.total += 1;
        let phase = if i.metadata.deletion_timestamp.is_some() {
            InstancePhase::Terminating
        } else {
            instance_phase(i)
        };
        match phase {
            InstancePhase::Pending => c.pending += 1,
            InstancePhase::Provisioning => c.provisioning += 1,
            InstancePhase::Ready => c.ready += 1,
            InstancePhase::Terminating => c.terminating += 1,
            InstancePhase::Failed => c.failed += 1,
        }
        if let (InstancePhase::Ready, Some(s)) = (phase, i.status.as_ref()) {
            if s.current_job.is_some() {
                c.busy += 1;
            } else if let Some(deadline) = &s.idle_deadline {
                self.idle.push((i.name_any(), unix_seconds(deadline.0)));
            }
        }
        if i.status
            .as_ref()
            .is_some_and(|s| s.provider_instance_id.is_some())
        {
            self.spend += instance_price(i).unwrap_or_default();
        }
        *self
            .by_label
            .entry((i.spec.provider.clone(), format!("{phase:?}")))
            .or_default() += 1;
    }

    pub fn pending_jobs(&self) -> i64 {
        self.jobs.get("Pending").copied().unwrap_or(0)
    }
}

/// Each provider entry's state from the back-offs in force, and the earliest end of one.
fn provider_statuses(pool: &GpuPool, ctx: &Context) -> (Vec<ProviderStatus>, Option<Timestamp>) {
    let key = PoolKey::of(pool);
    let mut next_backoff: Option<Timestamp> = None;
    let providers = pool
        .spec
        .providers
        .iter()
        .map(|p| match ctx.provider_backoff(&key.entry(&p.name)) {
            Some(b) => {
                next_backoff = Some(next_backoff.map_or(b.until, |n| n.min(b.until)));
                ProviderStatus {
                    name: p.name.clone(),
                    state: if b.unavailable {
                        ProviderState::Unavailable
                    } else {
                        ProviderState::BackingOff
                    },
                    backoff_until: Some(Time(b.until)),
                    consecutive_failures: b.failures as i32,
                    message: Some(b.message.chars().take(512).collect()),
                }
            }
            None => ProviderStatus {
                name: p.name.clone(),
                state: ProviderState::Available,
                backoff_until: None,
                consecutive_failures: 0,
                message: None,
            },
        })
        .collect();
    (providers, next_backoff)
}

/// The pool's gauges (`Metrics::publish_pool`) from its tally and provider states.
fn publish_gauges(ctx: &Context, pool: &GpuPool, tally: &Tally, providers: &[ProviderStatus]) {
    let (ns, name) = (pool.namespace().unwrap_or_default(), pool.name_any());
    let entries = providers
        .iter()
        .map(|p| {
            let state = match p.state {
                ProviderState::Available => "Available",
                ProviderState::BackingOff => "BackingOff",
                ProviderState::Unavailable => "Unavailable",
            };
            let until = p.backoff_until.as_ref().map(|t| unix_seconds(t.0));
            (p.name.clone(), state, until)
        })
        .collect();
    ctx.metrics.publish_pool(&PoolGauges {
        namespace: &ns,
        pool: &name,
        entries,
        instances: &tally.by_label,
        jobs: &tally.jobs,
        idle: &tally.idle,
        spend_per_hour: tally.spend.try_into().unwrap_or(0.0),
        max_hourly_spend: pool
            .spec
            .max_hourly_spend
            .map(|m| m.amount().try_into().unwrap_or(0.0)),
    });
}

/// The pool's Ready condition: true while some provider entry is available.
fn ready_condition(
    pool: &GpuPool,
    providers: &[ProviderStatus],
    now: Timestamp,
) -> Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    let available = providers
        .iter()
        .filter(|p| p.state == ProviderState::Available)
        .count();
    let mut conditions = pool
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let (ready, reason, message) = if available > 0 {
        let message = format!("{available} of {} providers available", providers.len());
        (true, "ProvidersAvailable", message)
    } else {
        let message = "every provider is backing off or misconfigured; jobs wait".to_string();
        (false, "NoProviderAvailable", message)
    };
    set_condition(
        &mut conditions,
        ConditionType::Ready,
        ready,
        reason,
        &message,
        pool.metadata.generation,
        now,
    );
    conditions
}

/// The pool's status at `now` and when the earliest provider back-off ends; publishes the
/// pool's gauges from the same figures.
fn pool_status(
    pool: &GpuPool,
    ctx: &Context,
    jobs: &[Arc<VideoJob>],
    instances: &[Arc<GpuInstance>],
    now: Timestamp,
) -> (GpuPoolStatus, Option<Timestamp>) {
    let tally = Tally::of(instances, jobs);
    let (providers, next_backoff) = provider_statuses(pool, ctx);
    publish_gauges(ctx, pool, &tally, &providers);
    let status = GpuPoolStatus {
        observed_generation: pool.metadata.generation,
        instances: Some(tally.counts.clone()),
        spend_per_hour: Some(Money::new(tally.spend)),
        pending_jobs: Some(tally.pending_jobs() as i32),
        conditions: ready_condition(pool, &providers, now),
        providers,
    };
    (status, next_backoff)
}

/// Pool deletion: delete every instance of the pool and wait until they are gone, so each
/// machine is destroyed with the pool's credentials still at hand.
async fn cleanup(pool: Arc<GpuPool>, ctx: &Context) -> Result<Action> {
    let ns = pool.namespace().unwrap_or_default();
    let api: Api<GpuInstance> = Api::namespaced(ctx.client.clone(), &ns);
    let instances = instances_of(ctx, &ns, &pool.name_any());
    if instances.is_empty() {
        ctx.forget_pool(&PoolKey::of(pool.as_ref()));
        return Ok(Action::await_change());
    }
    for i in &instances {
        if i.metadata.deletion_timestamp.is_none() {
            match api.delete(&i.name_any(), &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Err(Error::TeardownPending(format!(
        "{} instances of pool {}",
        instances.len(),
        pool.name_any()
    )))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use jiff::Timestamp;
    use serde_json::{Value, json};

    use super::{SchedulingInput, Snapshot};
    use crate::{
        controller::scheduling,
        crd::{GpuInstance, GpuPool, InstancePhase, VideoJob},
    };

    fn pool(max_hourly_spend: &str) -> GpuPool {
        serde_json::from_value(json!({
            "apiVersion": "gpupool.dev/v1alpha1", "kind": "GpuPool",
            "metadata": {"name": "default", "namespace": "media"},
            "spec": {
                "maxInstances": 3, "maxHourlySpend": max_hourly_spend,
                "providers": [
                    {"name": "vast", "vast": {"gpuNames": ["RTX 3060"], "maxPricePerHour": "0.25",
                     "credentialsSecretRef": {"name": "vast", "key": "apiKey"}}},
                    {"name": "rp", "runpod": {"gpuTypeIds": ["NVIDIA GeForce RTX 3060"], "maxPricePerHour": "0.30",
                     "credentialsSecretRef": {"name": "runpod", "key": "apiKey"}}},
                ],
                "worker": {"image": "w:1", "port": 8000},
            },
        }))
        .unwrap()
    }

    fn instance(name: &str, status: Value, deleting: bool) -> Arc<GpuInstance> {
        let mut meta = json!({"name": name, "namespace": "media"});
        if deleting {
            meta["deletionTimestamp"] = json!("2026-12-01T09:59:00Z");
        }
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "gpupool.dev/v1alpha1", "kind": "GpuInstance",
                "metadata": meta, "spec": {"pool": "default", "provider": "vast"}, "status": status,
            }))
            .unwrap(),
        )
    }

    fn job(name: &str, created: &str, phase: Option<&str>) -> Arc<VideoJob> {
        let mut j = json!({
            "apiVersion": "gpupool.dev/v1alpha1", "kind": "VideoJob",
            "metadata": {"name": name, "namespace": "media", "creationTimestamp": created},
            "spec": {"pool": "default", "operation": "caption", "input": {}},
        });
        if let Some(p) = phase {
            j["status"] = json!({"phase": p});
        }
        Arc::new(serde_json::from_value(j).unwrap())
    }

    fn ready(idle_since: &str, current_job: Option<&str>) -> Value {
        json!({"phase": "Ready", "idleSince": idle_since, "currentJob": current_job,
               "offer": {"pricePerHour": "0.20"}})
    }

    fn snapshot() -> Snapshot {
        let now: Timestamp = "2026-12-01T10:00:00Z".parse().unwrap();
        Snapshot::new(
            vec![
                job("new", "2026-12-01T09:59:30Z", Some("Pending")),
                job("old", "2026-12-01T09:50:00Z", None),
                job("done", "2026-12-01T09:40:00Z", Some("Succeeded")),
                job("repaired", "2026-12-01T09:45:00Z", Some("Pending")),
            ],
            vec![
                instance("fresh", ready("2026-12-01T09:59:00.000000Z", None), false),
                instance("warm", ready("2026-12-01T09:55:00.000000Z", None), false),
                instance(
                    "releasing",
                    ready("2026-12-01T09:30:00.000000Z", Some("done")),
                    false,
                ),
                instance("leaving", ready("2026-12-01T09:00:00.000000Z", None), true),
            ],
            now,
        )
    }

    #[test]
    fn pending_leaves_out_finished_and_repaired_jobs() {
        let snap = snapshot();
        let mut names: Vec<String> = snap
            .pending(&["repaired".to_string()])
            .iter()
            .map(|j| j.metadata.name.clone().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["new", "old"]);
    }

    #[test]
    fn the_scheduler_sees_the_longest_idle_machine_first_and_what_each_one_is_doing() {
        let snap = snapshot();
        let pending = snap.pending(&[]);
        let input = SchedulingInput::of(
            &pool("1.00"),
            &snap,
            &pending,
            Timestamp::UNIX_EPOCH,
            |entry| entry != "rp",
        );
        let order: Vec<&str> = input.instances.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(order, ["leaving", "releasing", "warm", "fresh"]);
        let by = |n: &str| input.instances.iter().find(|v| v.name == n).unwrap();
        assert!(by("releasing").busy && by("releasing").releasing);
        assert!(by("leaving").deleting);
        assert!(!by("warm").busy && by("warm").phase == InstancePhase::Ready);
        assert_eq!(by("warm").price_per_hour, Some("0.20".parse().unwrap()));
        let available: Vec<(&str, bool)> = input
            .providers
            .iter()
            .map(|p| (p.name.as_str(), p.available))
            .collect();
        assert_eq!(available, [("vast", true), ("rp", false)]);
        assert_eq!(input.limits.max_instances, 3);
        assert_eq!(input.limits.max_hourly_spend, Some("1.00".parse().unwrap()));
        // A job without a creation time counts as created now; these all have one.
        assert_eq!(input.pending.len(), 3);

        // The oldest job gets the longest-idle machine that is free; the next the other.
        let plan = scheduling::schedule(
            &input.pending,
            &input.instances,
            &input.providers,
            &input.limits,
        );
        assert_eq!(
            plan.bind,
            [
                ("repaired".to_string(), "warm".to_string()),
                ("old".to_string(), "fresh".to_string())
            ]
        );
        assert!(plan.create.is_empty(), "{plan:?}");
    }

    #[test]
    fn the_tally_counts_phases_spend_idle_deadlines_and_live_jobs() {
        use crate::controller::fixtures::{instance, job, time};
        let billing = |phase: &str, job: Option<&str>| {
            json!({"phase": phase, "providerInstanceId": "m", "currentJob": job,
                   "offer": {"pricePerHour": "0.20"}, "idleDeadline": time(300)})
        };
        let mut going = instance("d", billing("Ready", None));
        going.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::UNIX_EPOCH),
        );
        let instances: Vec<Arc<GpuInstance>> = [
            instance("a", billing("Ready", None)),
            instance("b", billing("Ready", Some("j1"))),
            instance("c", json!({"phase": "Pending"})),
            going,
        ]
        .into_iter()
        .map(Arc::new)
        .collect();
        let mut gone = job("j3", json!({"phase": "Pending"}));
        gone.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::UNIX_EPOCH),
        );
        let jobs: Vec<Arc<VideoJob>> = [
            job("j1", json!({"phase": "Running", "instance": "b"})),
            job("j2", json!({"phase": "Pending"})),
            gone,
        ]
        .into_iter()
        .map(Arc::new)
        .collect();
        let t = super::Tally::of(&instances, &jobs);
        let c = &t.counts;
        assert_eq!(
            (c.total, c.ready, c.busy, c.pending, c.terminating),
            (4, 2, 1, 1, 1)
        );
        // Three machines bill (the one being deleted still does until it is destroyed).
        assert_eq!(t.spend, "0.60".parse().unwrap());
        assert_eq!(
            t.idle.len(),
            1,
            "only the idle Ready instance has a deadline to show"
        );
        assert_eq!(t.idle[0].0, "a");
        assert_eq!(t.pending_jobs(), 1, "a job being deleted is not counted");
        assert_eq!(
            t.by_label.get(&("vast".into(), "Terminating".into())),
            Some(&1)
        );
    }
}
