//! Instance life cycle shared by Vast instances and RunPod pods: provisioning → loading →
//! running (a real worker server on a loopback port), stop/start, death and destruction.
//!
//! Transitions caused from outside (stop, destroy, death) bump the instance's generation so a
//! lifecycle task still sleeping towards "running" stands down instead of resurrecting it.

use std::{
    sync::{Arc, atomic::AtomicU32},
    time::Instant,
};

use tokio::{net::TcpListener, task::JoinHandle};
use tracing::{info, warn};

use super::{
    process, serve,
    state::{Instance, Phase, Provider, Sim, WorkerHandle},
    util, worker,
};

/// Registers a new instance and starts its life cycle (unless it is created stopped).
pub fn create(sim: &Arc<Sim>, mut inst: Instance) {
    inst.generation = sim.next_generation();
    let (provider, id, generation, phase) =
        (inst.provider, inst.id.clone(), inst.generation, inst.phase);
    info!(provider = provider.name(), id = %id, gpu = %inst.gpu_name, "instance created");
    sim.lock().instances.push(inst);
    if phase == Phase::Provisioning {
        tokio::spawn(lifecycle(sim.clone(), provider, id, generation));
    }
}

/// Sleeps for `seconds`; false when the simulator shut down meanwhile.
async fn nap(sim: &Sim, seconds: f64) -> bool {
    let mut stop = sim.shutdown.subscribe();
    tokio::select! {
        _ = tokio::time::sleep(util::secs(seconds)) => true,
        _ = serve::wait_true(&mut stop) => false,
    }
}

/// Drives one instance from its current phase (provisioning or loading) to running.
async fn lifecycle(sim: Arc<Sim>, provider: Provider, id: String, generation: u64) {
    let (provisioning, loading) = {
        let st = sim.lock();
        (st.timing.provisioning_seconds, st.timing.loading_seconds)
    };
    if still(&sim, provider, &id, generation, Phase::Provisioning)
        && !provision(&sim, provider, &id, generation, provisioning).await
    {
        return;
    }
    if !still(&sim, provider, &id, generation, Phase::Loading) || !nap(&sim, loading).await {
        return;
    }
    let listener = match TcpListener::bind(("127.0.0.1", 0)).await {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "cannot bind a worker port; the instance dies");
            die(&sim, provider, &id, "cannot bind worker port");
            return;
        }
    };
    let Ok(port) = listener.local_addr().map(|a| a.port()) else {
        return;
    };
    run_worker(&sim, provider, &id, generation, listener, port);
}

/// Whether the instance is still in phase `want` of this life cycle's generation.
fn still(sim: &Sim, provider: Provider, id: &str, generation: u64, want: Phase) -> bool {
    sim.lock()
        .instance(provider, id)
        .is_some_and(|i| i.generation == generation && i.phase == want)
}

/// Provisions for `seconds`, then moves to loading; false when the life cycle must stop
/// (shut down, gone, or changed from outside meanwhile).
async fn provision(sim: &Sim, provider: Provider, id: &str, generation: u64, seconds: f64) -> bool {
    if !nap(sim, seconds).await {
        return false;
    }
    let mut st = sim.lock();
    let Some(i) = st.instance_mut(provider, id) else {
        return false;
    };
    if i.generation != generation || i.phase != Phase::Provisioning {
        return false;
    }
    i.phase = Phase::Loading;
    i.last_status_change = util::now_ms();
    true
}

/// Starts the worker server on `listener` and marks the instance running, unless it
/// changed from outside meanwhile.
fn run_worker(
    sim: &Arc<Sim>,
    provider: Provider,
    id: &str,
    generation: u64,
    listener: TcpListener,
    port: u16,
) {
    let mut st = sim.lock();
    let boot = st.timing.boot_seconds;
    let Some(i) = st.instance_mut(provider, id) else {
        return;
    };
    if i.generation != generation || i.phase != Phase::Loading {
        return;
    }
    let spawned = match sim.initial.worker_process.as_ref() {
        None => None,
        Some(spec) => match process::free_port().and_then(|p| Ok((p, process::spawn(spec, i, p)?)))
        {
            Ok(started) => Some(started),
            Err(e) => {
                warn!(error = %e, command = %spec.command, "cannot start the worker process; the instance dies");
                drop(st);
                die(sim, provider, id, "worker process did not start");
                return;
            }
        },
    };
    let backend = spawned.as_ref().map(|(p, child)| process::Backend {
        port: *p,
        pid: Arc::new(AtomicU32::new(child.id().unwrap_or(0))),
    });
    let ctx = worker::WorkerCtx {
        sim: sim.clone(),
        provider,
        instance_id: id.to_string(),
        started: Instant::now(),
        boot: util::secs(boot),
        api_key: i.env_value(crate::ENV_API_KEY).map(str::to_string),
        session_token: i.env_value(crate::ENV_SESSION_TOKEN).map(str::to_string),
        backend: backend.clone(),
    };
    let pid = backend.as_ref().map(|b| b.pid.clone());
    let served = serve::serve(listener, worker::router(ctx), sim.shutdown.subscribe());
    let task = match (spawned, backend) {
        (Some((_, child)), Some(b)) => tokio::spawn(with_process(
            served,
            child,
            b,
            sim.clone(),
            provider,
            id.to_string(),
        )),
        _ => tokio::spawn(served),
    };
    let now = util::now_ms();
    i.worker = Some(WorkerHandle { port, task, pid });
    i.worker_started = Some(Instant::now());
    i.phase = Phase::Running;
    i.running_at.get_or_insert(now);
    i.last_started_at = Some(now);
    i.last_status_change = now;
    info!(provider = provider.name(), id = %id, port, "instance running");
    let (bid, generation) = (i.is_bid(), i.generation);
    let rate = st.timing.interruptible_preemptions_per_hour;
    if bid && rate > 0.0 {
        // Exponential time to the next higher bid, from the one seeded RNG.
        let u: f64 = rand::Rng::random_range(&mut st.rng, f64::MIN_POSITIVE..1.0);
        let after = -u.ln() / rate * 3600.0;
        tokio::spawn(outbid_later(
            sim.clone(),
            provider,
            id.to_string(),
            generation,
            after,
        ));
    }
}

/// Serves the machine's port while its worker process lives. The process is killed when this
/// task is aborted (stop, death, destruction: the child is dropped); a process that exits on
/// its own is a container whose entrypoint ended, so the machine dies.
async fn with_process(
    served: impl std::future::Future<Output = ()>,
    child: tokio::process::Child,
    backend: process::Backend,
    sim: Arc<Sim>,
    provider: Provider,
    id: String,
) {
    tokio::select! {
        () = served => {}
        () = process::hold(child, backend.pid.clone(), id.clone()) => {
            tokio::spawn(async move {
                let task = die(&sim, provider, &id, "worker process exited");
                reap(task).await;
            });
            std::future::pending::<()>().await;
        }
    }
}

/// Outbids a running interruptible instance after `seconds`, unless it changed meanwhile.
async fn outbid_later(
    sim: Arc<Sim>,
    provider: Provider,
    id: String,
    generation: u64,
    seconds: f64,
) {
    if nap(&sim, seconds).await && still(&sim, provider, &id, generation, Phase::Running) {
        reap(outbid(&sim, provider, &id).flatten()).await;
    }
}

/// A higher bid takes an interruptible instance: stopped (no worker, open connections cut),
/// billed until destroyed, shown as outbid. `None` if unknown or destroyed.
pub fn outbid(sim: &Sim, provider: Provider, id: &str) -> Option<Option<JoinHandle<()>>> {
    let task = stop_as(sim, provider, id, true)?;
    warn!(provider = provider.name(), id, "instance outbid");
    Some(task)
}

/// Stops the worker of `i` (closing its port and open connections); returns the task to
/// await outside the lock so the caller can be sure the port is closed.
fn take_worker(i: &mut Instance) -> Option<JoinHandle<()>> {
    i.worker_started = None;
    i.worker.take().map(|w| {
        w.task.abort();
        w.task
    })
}

/// Waits until an aborted worker task is gone (its listener and connections dropped).
pub async fn reap(task: Option<JoinHandle<()>>) {
    if let Some(t) = task {
        let _ = t.await;
    }
}

/// Destroys an instance. `None` when it does not exist or is already destroyed.
pub fn destroy(sim: &Sim, provider: Provider, id: &str) -> Option<Option<JoinHandle<()>>> {
    let mut st = sim.lock();
    let i = st.instance_mut(provider, id)?;
    if i.is_destroyed() {
        return None;
    }
    i.generation = sim.next_generation();
    let now = util::now_ms();
    i.phase = Phase::Destroyed;
    i.destroyed_at = Some(now);
    i.last_status_change = now;
    info!(provider = provider.name(), id, "instance destroyed");
    Some(take_worker(i))
}

/// Stops a running (or starting) instance: no worker, machine kept. `None` if unknown.
pub fn stop(sim: &Sim, provider: Provider, id: &str) -> Option<Option<JoinHandle<()>>> {
    stop_as(sim, provider, id, false)
}

/// Stops an instance, `outbid` saying whether a higher bid did it (in the same change of
/// state, so no read sees it stopped but not yet outbid).
fn stop_as(
    sim: &Sim,
    provider: Provider,
    id: &str,
    outbid: bool,
) -> Option<Option<JoinHandle<()>>> {
    let mut st = sim.lock();
    let i = st.instance_mut(provider, id)?;
    if i.is_destroyed() {
        return None;
    }
    if i.phase == Phase::Stopped {
        return Some(None);
    }
    i.generation = sim.next_generation();
    i.phase = Phase::Stopped;
    i.outbid = outbid;
    i.last_status_change = util::now_ms();
    Some(take_worker(i))
}

/// Starts a stopped or dead instance again (through loading). `None` if unknown.
pub fn start(sim: &Arc<Sim>, provider: Provider, id: &str) -> Option<()> {
    let generation = {
        let mut st = sim.lock();
        let i = st.instance_mut(provider, id)?;
        if i.is_destroyed() {
            return None;
        }
        if !matches!(i.phase, Phase::Stopped | Phase::Dead) {
            return Some(());
        }
        i.generation = sim.next_generation();
        i.phase = Phase::Loading;
        i.died_at = None;
        i.last_status_change = util::now_ms();
        i.generation
    };
    tokio::spawn(lifecycle(sim.clone(), provider, id.to_string(), generation));
    Some(())
}

/// The container dies: worker gone, provider reports exited/DEAD, billing goes on.
pub fn die(sim: &Sim, provider: Provider, id: &str, why: &str) -> Option<JoinHandle<()>> {
    let mut st = sim.lock();
    let i = st.instance_mut(provider, id)?;
    if i.is_destroyed() || i.phase == Phase::Dead {
        return None;
    }
    i.generation = sim.next_generation();
    let now = util::now_ms();
    i.phase = Phase::Dead;
    i.died_at = Some(now);
    i.last_status_change = now;
    warn!(provider = provider.name(), id, why, "instance died");
    take_worker(i)
}

/// Stops every worker (shutdown and reset): the machines' and the serverless workers'
/// processes.
pub fn stop_all_workers(sim: &Sim) -> Vec<JoinHandle<()>> {
    let mut st = sim.lock();
    let mut tasks: Vec<_> = st.instances.iter_mut().filter_map(take_worker).collect();
    for w in st.endpoints.iter_mut().flat_map(|e| e.workers.iter_mut()) {
        if let Some(t) = w.process.take() {
            t.abort();
            tasks.push(t);
        }
    }
    tasks
}
