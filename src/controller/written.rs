//! Read-your-writes for the scheduler. The pool reconciler decides from its caches, and a
//! cache shows this process's own writes only when their watch events come back. A pass that
//! runs in between would see a job it just started as still Pending, an instance it just
//! claimed as still free, and none of the instances it just created, so it would create more
//! than `maxInstances` or claim twice. This overlay remembers what the last writes returned,
//! keyed by the resourceVersion they replaced, until the cache moves past that version.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use kube::{Resource, ResourceExt};

/// How long a write is remembered at most (a deleted object's entry, a watch that is down).
const HORIZON: Duration = Duration::from_secs(60);

struct Entry<K> {
    /// The resourceVersion the write replaced; `None` for a creation.
    replaced: Option<String>,
    object: Arc<K>,
    at: Instant,
}

/// The objects of one kind this process wrote last, by namespace and name.
pub struct Written<K> {
    entries: Mutex<HashMap<(String, String), Entry<K>>>,
}

impl<K> Default for Written<K> {
    fn default() -> Self {
        Self {
            entries: Mutex::default(),
        }
    }
}

impl<K: Resource + Clone> Written<K> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Entry<K>>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Remembers that `object` (as the API server returned it) replaced version `replaced`
    /// (`None`: it was created).
    pub fn wrote(&self, replaced: Option<String>, object: K) {
        let key = (object.namespace().unwrap_or_default(), object.name_any());
        self.lock().insert(
            key,
            Entry {
                replaced,
                object: Arc::new(object),
                at: Instant::now(),
            },
        );
    }

    /// The watch delivered `object`: the cache now shows it (or a later version), so a
    /// remembered write it replaces is dropped. A created object that is deleted before any
    /// scheduling pass looked must not linger as a phantom starting instance.
    pub fn observed(&self, object: &K) {
        let mut entries = self.lock();
        if entries.is_empty() {
            return;
        }
        let key = (object.namespace().unwrap_or_default(), object.name_any());
        if let Some(e) = entries.get(&key)
            && (e.replaced.is_none() || e.replaced != object.resource_version())
        {
            entries.remove(&key);
        }
    }

    /// `cached` with this process's newer writes in place of what the cache shows, and
    /// created objects the cache does not show yet added. Entries the cache has caught up
    /// with (or moved past) are dropped.
    pub fn overlay(&self, cached: Vec<Arc<K>>) -> Vec<Arc<K>> {
        let mut entries = self.lock();
        if entries.is_empty() {
            return cached;
        }
        let now = Instant::now();
        entries.retain(|_, e| now.duration_since(e.at) < HORIZON);
        let mut seen = Vec::new();
        let mut out: Vec<Arc<K>> = cached
            .into_iter()
            .map(|obj| {
                let key = (obj.namespace().unwrap_or_default(), obj.name_any());
                let Some(e) = entries.get(&key) else {
                    return obj;
                };
                if e.replaced.is_some() && e.replaced == obj.resource_version() {
                    let newer = Arc::clone(&e.object);
                    seen.push(key);
                    newer
                } else {
                    // The cache shows our write or something later: it is authoritative again.
                    entries.remove(&key);
                    obj
                }
            })
            .collect();
        for (key, e) in entries.iter() {
            if e.replaced.is_none() && !seen.contains(key) {
                out.push(Arc::clone(&e.object));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;

    fn cm(name: &str, rv: &str, value: &str) -> ConfigMap {
        let mut c = ConfigMap::default();
        c.metadata.name = Some(name.into());
        c.metadata.namespace = Some("ns".into());
        c.metadata.resource_version = Some(rv.into());
        c.data = Some([("v".to_string(), value.to_string())].into());
        c
    }

    fn value(c: &ConfigMap) -> &str {
        &c.data.as_ref().unwrap()["v"]
    }

    #[test]
    fn a_write_shows_until_the_cache_moves_past_the_version_it_replaced() {
        let w = Written::default();
        w.wrote(Some("1".into()), cm("a", "2", "new"));
        let seen = w.overlay(vec![
            Arc::new(cm("a", "1", "old")),
            Arc::new(cm("b", "7", "b")),
        ]);
        assert_eq!(seen.len(), 2);
        assert_eq!(value(&seen[0]), "new");
        assert_eq!(value(&seen[1]), "b");
        // The cache caught up: its own copy wins and the entry is gone.
        let seen = w.overlay(vec![Arc::new(cm("a", "2", "cached"))]);
        assert_eq!(value(&seen[0]), "cached");
        let seen = w.overlay(vec![Arc::new(cm("a", "1", "old"))]);
        assert_eq!(value(&seen[0]), "old", "a dropped entry never comes back");
    }

    #[test]
    fn a_later_write_by_someone_else_wins_over_ours() {
        let w = Written::default();
        w.wrote(Some("1".into()), cm("a", "2", "ours"));
        let seen = w.overlay(vec![Arc::new(cm("a", "3", "theirs"))]);
        assert_eq!(value(&seen[0]), "theirs");
    }

    #[test]
    fn a_creation_the_watch_delivered_is_not_shown_after_its_deletion() {
        let w = Written::default();
        w.wrote(None, cm("new", "5", "created"));
        w.observed(&cm("new", "6", "failed"));
        assert_eq!(
            w.overlay(vec![]).len(),
            0,
            "deleted before a pass: no phantom"
        );
        w.wrote(Some("1".into()), cm("a", "2", "ours"));
        w.observed(&cm("a", "1", "late event of the old version"));
        let seen = w.overlay(vec![Arc::new(cm("a", "1", "old"))]);
        assert_eq!(
            value(&seen[0]),
            "ours",
            "an old version's event keeps our write"
        );
    }

    #[test]
    fn a_creation_shows_until_the_cache_has_it() {
        let w = Written::default();
        w.wrote(None, cm("new", "5", "created"));
        let seen = w.overlay(vec![Arc::new(cm("other", "1", "x"))]);
        assert_eq!(seen.len(), 2);
        assert_eq!(value(&seen[1]), "created");
        let seen = w.overlay(vec![Arc::new(cm("new", "5", "cached"))]);
        assert_eq!(seen.len(), 1);
        assert_eq!(value(&seen[0]), "cached");
        assert_eq!(w.overlay(vec![]).len(), 0);
    }
}
