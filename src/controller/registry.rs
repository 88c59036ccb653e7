//! What the reconcilers remember between passes, as typed registries: each is keyed by the
//! object it is about ([`PoolKey`], [`EntryKey`], an object's [`ObjectKey`], or a UID) and
//! is emptied for that object when it is deleted, so nothing grows with the objects a
//! cluster has ever had. Time comes from the caller (the Context's [`crate::clock::Clock`]),
//! never from the system clock.

use std::{
    collections::HashMap,
    hash::Hash,
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use jiff::{SignedDuration, Timestamp};
use kube::{Resource, ResourceExt};

/// A pool, by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub namespace: String,
    pub name: String,
}

impl PoolKey {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    pub fn of<K: Resource>(pool: &K) -> Self {
        Self::new(&pool.namespace().unwrap_or_default(), &pool.name_any())
    }

    pub fn entry(&self, entry: &str) -> EntryKey {
        EntryKey {
            pool: self.clone(),
            entry: entry.into(),
        }
    }
}

/// One provider entry of a pool.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EntryKey {
    pub pool: PoolKey,
    pub entry: String,
}

/// Any object, by kind, namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ObjectKey {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn of<K: Resource<DynamicType = ()>>(obj: &K) -> Self {
        Self {
            kind: K::kind(&()).into_owned(),
            namespace: obj.namespace().unwrap_or_default(),
            name: obj.name_any(),
        }
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.kind, self.namespace, self.name)
    }
}

/// A map behind a mutex that a panicking holder cannot poison for everyone else.
pub struct Registry<K, V>(Mutex<HashMap<K, V>>);

impl<K, V> Default for Registry<K, V> {
    fn default() -> Self {
        Self(Mutex::default())
    }
}

impl<K: Eq + Hash, V: Clone> Registry<K, V> {
    pub fn lock(&self) -> MutexGuard<'_, HashMap<K, V>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, key: &K) -> Option<V> {
        self.lock().get(key).cloned()
    }

    pub fn insert(&self, key: K, value: V) -> Option<V> {
        self.lock().insert(key, value)
    }

    pub fn remove(&self, key: &K) -> Option<V> {
        self.lock().remove(key)
    }

    /// Drops every entry whose key matches (the object it is about was deleted).
    pub fn forget(&self, matches: impl Fn(&K) -> bool) {
        self.lock().retain(|k, _| !matches(k));
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// When something was last done, per key, for "at most once per interval" rules.
pub type Throttle<K> = Registry<K, Timestamp>;

impl<K: Eq + Hash> Registry<K, Timestamp> {
    /// `None` when the thing may be done now (and records it as done at `now`), else how long
    /// until it may: `every` after the last time.
    pub fn wait(&self, key: K, every: Duration, now: Timestamp) -> Option<Duration> {
        let mut m = self.lock();
        if let Some(at) = m.get(&key) {
            let since = now.duration_since(*at);
            let every = SignedDuration::try_from(every).unwrap_or(SignedDuration::MAX);
            if since >= SignedDuration::ZERO && since < every {
                return Some((every - since).unsigned_abs());
            }
        }
        m.insert(key, now);
        None
    }

    /// Whether the thing is due (not done within `every`); if so it counts as done now.
    pub fn due(&self, key: K, every: Duration, now: Timestamp) -> bool {
        self.wait(key, every, now).is_none()
    }

    /// True the first time `key` is seen within `keep`; entries older than `keep` go.
    pub fn first_within(&self, key: K, keep: Duration, now: Timestamp) -> bool {
        let keep = SignedDuration::try_from(keep).unwrap_or(SignedDuration::MAX);
        let mut m = self.lock();
        m.retain(|_, at| now.duration_since(*at) < keep);
        m.insert(key, now).is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    #[test]
    fn a_throttle_lets_one_through_per_interval() {
        let t: Throttle<&str> = Throttle::default();
        let every = Duration::from_secs(10);
        assert!(t.due("a", every, at(0)));
        assert_eq!(t.wait("a", every, at(4)), Some(Duration::from_secs(6)));
        assert!(!t.due("a", every, at(9)));
        assert!(t.due("b", every, at(9)), "keys are independent");
        assert!(t.due("a", every, at(10)));
        // A clock that went back does not lock the key out.
        assert!(t.due("a", every, at(-100)));
    }

    #[test]
    fn first_within_counts_once_and_forgets_old_entries() {
        let t: Throttle<&str> = Throttle::default();
        let keep = Duration::from_secs(600);
        assert!(t.first_within("u1", keep, at(0)));
        assert!(!t.first_within("u1", keep, at(10)));
        assert!(t.first_within("u2", keep, at(700)));
        assert_eq!(t.len(), 1, "u1 was older than the horizon");
    }

    #[test]
    fn forget_drops_what_belongs_to_a_deleted_pool() {
        let r: Registry<EntryKey, u32> = Registry::default();
        let p = PoolKey::new("media", "default");
        let q = PoolKey::new("media", "other");
        r.insert(p.entry("vast"), 1);
        r.insert(p.entry("runpod"), 2);
        r.insert(q.entry("vast"), 3);
        r.forget(|k| k.pool == p);
        assert_eq!(r.len(), 1);
        assert_eq!(r.get(&q.entry("vast")), Some(3));
    }
}
