//! The orphan sweep: every `sweep_interval`, list the machines that carry this cluster's
//! label at every instance provider the pools use, and destroy those whose GpuInstance does
//! not exist, once they have been seen for longer than `orphan_grace` (a create whose
//! GpuInstance status is not written yet must not be mistaken for an orphan). This is what
//! catches a create that answered an error yet made the machine, or a GpuInstance whose
//! finalizer someone removed by hand.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use kube::ResourceExt;
use kube::runtime::events::EventType;
use tracing::{info, warn};

use crate::{
    crd::ProviderKind,
    provider::{
        ProviderError, cluster_label_prefix, instance_uid_from_label, quota::teardown_lane,
    },
};

use super::Context;

/// Runs until the process ends.
pub async fn run(ctx: Arc<Context>) {
    let mut first_seen: HashMap<String, jiff::Timestamp> = HashMap::new();
    loop {
        tokio::time::sleep(ctx.config.sweep_interval).await;
        if !ctx.is_ready() {
            continue;
        }
        sweep_once(&ctx, &mut first_seen).await;
    }
}

/// One pass of the sweep; returns the provider ids destroyed.
pub async fn sweep_once(
    ctx: &Context,
    first_seen: &mut HashMap<String, jiff::Timestamp>,
) -> Vec<String> {
    let prefix = cluster_label_prefix(&ctx.config.cluster_id);
    let known: HashSet<String> = ctx
        .stores()
        .instances
        .state()
        .iter()
        .filter_map(|i| i.uid())
        .collect();
    let mut destroyed = Vec::new();
    let mut seen_now = HashSet::new();
    // The same account may back several pools: list each (provider, account) once.
    let mut listed: HashSet<(String, String)> = HashSet::new();
    for pool in ctx.stores().pools.state() {
        for entry in &pool.spec.providers {
            if !matches!(
                entry.kind(),
                Some(ProviderKind::Vast | ProviderKind::Runpod)
            ) {
                continue;
            }
            let provider = match ctx.providers.instance(&pool, &entry.name).await {
                Ok(p) => p,
                Err(e) => {
                    // Reported on the pool's status by the reconcilers; no need to repeat it here.
                    tracing::debug!(pool = %pool.name_any(), provider = %entry.name, error = %e, "sweep cannot use this provider");
                    continue;
                }
            };
            let account = format!(
                "{:?}:{}",
                entry.kind(),
                entry
                    .credentials()
                    .map(|c| format!(
                        "{}/{}/{}",
                        pool.namespace().unwrap_or_default(),
                        c.name,
                        c.key
                    ))
                    .unwrap_or_default()
            );
            if !listed.insert((format!("{:?}", entry.kind()), account)) {
                continue;
            }
            let machines = match provider.list_labeled(&prefix).await {
                Ok(m) => m,
                Err(e) => {
                    warn!(provider = %entry.name, error = %e, "sweep could not list machines");
                    continue;
                }
            };
            for m in machines {
                let Some(uid) = m
                    .label
                    .as_deref()
                    .and_then(|l| instance_uid_from_label(&ctx.config.cluster_id, l))
                else {
                    continue;
                };
                if known.contains(uid) {
                    continue;
                }
                seen_now.insert(m.id.clone());
                let now = ctx.now();
                let since = *first_seen.entry(m.id.clone()).or_insert(now);
                let grace = jiff::SignedDuration::try_from(ctx.config.orphan_grace)
                    .unwrap_or(jiff::SignedDuration::MAX);
                if now.duration_since(since) < grace {
                    continue;
                }
                match teardown_lane(provider.delete(&m.id)).await {
                    Ok(()) | Err(ProviderError::NotFound(_)) => {
                        info!(id = %m.id, provider = %entry.name, "destroyed an orphan machine");
                        ctx.metrics.orphans_destroyed.inc();
                        ctx.event(pool.as_ref(), EventType::Warning, "OrphanDestroyed", format!(
                            "destroyed machine {} at {}: it carries this cluster's label but no GpuInstance has uid {uid}",
                            m.id, entry.name
                        ))
                        .await;
                        destroyed.push(m.id.clone());
                    }
                    Err(e) => {
                        warn!(id = %m.id, error = %e, "could not destroy an orphan; next sweep retries")
                    }
                }
            }
        }
    }
    first_seen.retain(|id, _| seen_now.contains(id) && !destroyed.contains(id));
    destroyed
}
