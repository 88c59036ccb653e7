//! One watch per kind feeds one cache, then fans each object out to every controller that
//! reacts to that kind.
//!
//! The cache is updated before any controller hears of the change, so a reconcile triggered
//! by an event always sees that event in the cache (two watches of the same kind would race:
//! a pool could be woken by a job its cache does not show yet). Deletes are forwarded too:
//! kube-runtime's shared reflector (`reflector::store_shared`) forwards only applies, and a
//! pool must hear that one of its jobs or instances is gone.
//!
//! [`fan_out`] is the whole behaviour over any stream of watch events, so it is tested
//! without an API server; [`watch_and_fan_out`] only builds the real watch.
//!
//! # Bounded channels, and why they cannot deadlock
//!
//! Each consumer gets a channel of [`CHANNEL_CAPACITY`] objects, and the watch waits for room
//! (`send().await`): a controller that falls behind holds its kind's watch back instead of
//! letting its queue grow without bound (at a restart, the list of every job was queued three
//! times over before the first reconcile). Waiting is safe for these reasons, checked against
//! kube-runtime 5.0:
//!
//! * The controllers read only after all three caches are ready (`Context::wait_until_synced`).
//!   A store becomes ready inside the reflector: `WatchStreamExt::reflect` calls
//!   `Writer::apply_watcher_event` in its `poll_next`, before the event is handed on, and for
//!   `InitDone` that function swaps the listed objects into the store and then releases
//!   `Store::wait_until_ready`. Before its first `InitDone` a watch sends nothing (`Init` and
//!   `InitApply` are not forwarded). So the first send that can wait comes after that watch's
//!   own store is ready, and a full channel at `InitDone` cannot keep any cache from syncing.
//! * Once running, a controller keeps taking triggers even when all its reconcile slots are
//!   busy (its runner polls the scheduler's `hold()`, which drains the trigger stream into a
//!   queue keyed by object), and reconciles run in tasks of their own and never wait for a
//!   watch (the caches and the read-your-writes overlay are read, not awaited). A channel
//!   therefore stays full only while its controller's stream is not being polled, and the
//!   watch resumes as soon as it is.
//! * At shutdown a controller stops reading before the watches are dropped; a watch waiting
//!   then only waits, and a send to a controller that is gone fails and is ignored.

use std::{fmt::Debug, pin::pin, sync::Arc};

use futures::{Stream, StreamExt};
use kube::{
    Api, Resource, ResourceExt,
    runtime::{
        WatchStreamExt,
        reflector::{ObjectRef, Store, store::Writer},
        watcher,
    },
};
use tokio::sync::mpsc::{self, Receiver, Sender};
use tracing::warn;

/// Objects queued per consumer at most before the watch waits for the consumer. A queued
/// object is an `Arc` (the cache's own, but for a delete), so a full queue costs a few
/// kilobytes; a controller that keeps up never makes its watch wait, and a (re)list of
/// 10,000 objects is not queued whole for each controller before the controllers start.
pub const CHANNEL_CAPACITY: usize = 1024;

/// A stream that yields what a channel receives, as a controller trigger.
pub fn channel_stream<K: Send + Sync + 'static>(
    rx: Receiver<Arc<K>>,
) -> impl Stream<Item = Arc<K>> + Send {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|k| (k, rx)) })
}

/// Watches `api` into a new cache and fans the objects out to `consumers` channels (see
/// [`fan_out`]); `on_event` sees every applied, deleted or listed object first.
pub fn watch_and_fan_out<K>(
    api: Api<K>,
    writer: Writer<K>,
    consumers: usize,
    on_event: impl Fn(Seen, &K) + Send + 'static,
) -> (
    Store<K>,
    Vec<Receiver<Arc<K>>>,
    impl Future<Output = ()> + Send,
)
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + Debug
        + Send
        + Sync
        + 'static,
{
    // The initial list is paginated (500 a page; kube-apiserver serves it from its watch
    // cache): with `any_semantic` the whole list came in one response, so 10,000 jobs were
    // decoded at once next to the cache being filled.
    let events = watcher(api, watcher::Config::default())
        .default_backoff()
        // managedFields are never read from the cache (status writes are server-side applies
        // built from scratch); dropping them keeps a cache of 10,000 jobs much smaller.
        .modify(|o| o.managed_fields_mut().clear());
    fan_out(events, writer, consumers, CHANNEL_CAPACITY, on_event)
}

/// How the watch saw an object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// Created or changed.
    Applied,
    /// Deleted: whatever the process remembers of it can go.
    Deleted,
    /// In a (re)list.
    Listed,
}

/// The fan-out over any stream of watch events: each event is applied to `writer`'s cache,
/// then passed to `on_event` and to every one of `consumers` channels of `capacity` objects.
/// Returns the cache, the receiving ends and the future that drives it all (it ends when
/// `events` does).
///
/// * `Apply`: every consumer gets the cache's own `Arc` of the object.
/// * `Delete`: every consumer gets the deleted object (the cache no longer holds it).
/// * `Init`, `InitApply`: nothing is sent. The cache buffers its own copy of each listed
///   object and swaps them in at `InitDone`; forwarding each one as it came kept a second
///   copy of every object queued until the controllers started.
/// * `InitDone`: the cache holds the whole list now, and every cached object goes to every
///   consumer once, as the cache's own `Arc`.
/// * An error is logged and skipped (the watcher retries by itself).
///
/// A send waits while the consumer's channel is full, so nothing is dropped.
pub fn fan_out<K, S>(
    events: S,
    writer: Writer<K>,
    consumers: usize,
    capacity: usize,
    on_event: impl Fn(Seen, &K) + Send + 'static,
) -> (
    Store<K>,
    Vec<Receiver<Arc<K>>>,
    impl Future<Output = ()> + Send,
)
where
    K: Resource<DynamicType = ()> + Clone + Debug + Send + Sync + 'static,
    S: Stream<Item = watcher::Result<watcher::Event<K>>> + Send + 'static,
{
    let store = writer.as_reader();
    let (senders, receivers): (Vec<_>, Vec<_>) =
        (0..consumers).map(|_| mpsc::channel(capacity)).unzip();
    let reader = store.clone();
    let driver = async move {
        let kind = K::kind(&());
        // The reflector has applied each event to the cache by the time it yields it.
        let mut events = pin!(events.reflect(writer));
        while let Some(event) = events.next().await {
            match event {
                Ok(watcher::Event::Apply(obj)) => {
                    on_event(Seen::Applied, &obj);
                    let cached = reader
                        .get(&ObjectRef::from_obj(&obj))
                        .unwrap_or_else(|| Arc::new(obj));
                    send(&senders, cached).await;
                }
                Ok(watcher::Event::Delete(obj)) => {
                    on_event(Seen::Deleted, &obj);
                    send(&senders, Arc::new(obj)).await;
                }
                Ok(watcher::Event::InitApply(obj)) => on_event(Seen::Listed, &obj),
                Ok(watcher::Event::Init) => {}
                Ok(watcher::Event::InitDone) => {
                    for obj in reader.state() {
                        send(&senders, obj).await;
                    }
                }
                Err(e) => warn!(kind = %kind, error = %e, "watch failed; retrying"),
            }
        }
    };
    (store, receivers, driver)
}

/// `obj` to every consumer, waiting for room in each channel in turn. A consumer that is
/// gone (its controller stopped) is skipped.
async fn send<K>(senders: &[Sender<Arc<K>>], obj: Arc<K>) {
    for tx in senders {
        let _ = tx.send(obj.clone()).await;
    }
}

#[cfg(test)]
mod tests {
    use std::{
        pin::Pin,
        sync::{Arc, Mutex},
    };

    use futures::{FutureExt, channel::mpsc::UnboundedSender};
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::{
        api::ObjectMeta,
        runtime::{
            reflector::{self, ObjectRef, Store},
            watcher::{self, Event},
        },
    };
    use tokio::sync::mpsc::{Receiver, error::TryRecvError};

    use super::{Seen, fan_out};

    type Source = UnboundedSender<watcher::Result<Event<ConfigMap>>>;
    type Driver = Pin<Box<dyn Future<Output = ()> + Send>>;

    fn cm(name: &str, version: &str) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("media".into()),
                resource_version: Some(version.into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn key(name: &str) -> ObjectRef<ConfigMap> {
        ObjectRef::new(name).within("media")
    }

    fn name(obj: &ConfigMap) -> String {
        obj.metadata.name.clone().unwrap_or_default()
    }

    /// A fan-out fed by a channel the test writes events into, and the names `on_event` saw.
    struct Harness {
        source: Source,
        store: Store<ConfigMap>,
        consumers: Vec<Receiver<Arc<ConfigMap>>>,
        driver: Driver,
        seen: Arc<Mutex<Vec<String>>>,
    }

    impl Harness {
        fn new(consumers: usize, capacity: usize) -> Self {
            let (source, events) = futures::channel::mpsc::unbounded();
            let seen = Arc::new(Mutex::new(Vec::new()));
            let log = seen.clone();
            let (_, writer) = reflector::store();
            let (store, consumers, driver) = fan_out(
                events,
                writer,
                consumers,
                capacity,
                move |how, o: &ConfigMap| {
                    let mark = if how == Seen::Deleted { "-" } else { "" };
                    log.lock().unwrap().push(format!("{mark}{}", name(o)));
                },
            );
            Self {
                source,
                store,
                consumers,
                // Unconstrained: tokio's cooperative budget must not make a poll return early.
                driver: Box::pin(tokio::task::unconstrained(driver)),
                seen,
            }
        }

        fn push(&self, event: watcher::Result<Event<ConfigMap>>) {
            self.source.unbounded_send(event).unwrap();
        }

        /// Polls the driver once: it handles every event it can and returns when it waits
        /// (for the next event or for room in a channel). True if it ended.
        fn run(&mut self) -> bool {
            self.driver.as_mut().now_or_never().is_some()
        }

        fn seen(&self) -> Vec<String> {
            self.seen.lock().unwrap().clone()
        }
    }

    /// What a consumer has queued now, without waiting.
    fn drain(rx: &mut Receiver<Arc<ConfigMap>>) -> Vec<Arc<ConfigMap>> {
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    #[tokio::test]
    async fn an_apply_reaches_every_consumer_as_the_cached_arc() {
        let mut h = Harness::new(3, 8);
        h.push(Ok(Event::Apply(cm("a", "1"))));
        assert!(!h.run());
        for rx in &mut h.consumers {
            let got = drain(rx);
            assert_eq!(got.len(), 1);
            // The cache held it when it was sent: the consumer's Arc is the cache's own.
            let cached = h.store.get(&key("a")).expect("in the cache");
            assert!(Arc::ptr_eq(&got[0], &cached));
        }
        // An update replaces the cached Arc, and the consumers get the new one.
        h.push(Ok(Event::Apply(cm("a", "2"))));
        assert!(!h.run());
        let cached = h.store.get(&key("a")).unwrap();
        assert_eq!(cached.metadata.resource_version.as_deref(), Some("2"));
        for rx in &mut h.consumers {
            let got = drain(rx);
            assert_eq!(got.len(), 1);
            assert!(Arc::ptr_eq(&got[0], &cached));
        }
    }

    #[tokio::test]
    async fn a_delete_reaches_every_consumer_after_it_left_the_cache() {
        let mut h = Harness::new(2, 8);
        h.push(Ok(Event::Apply(cm("a", "1"))));
        h.push(Ok(Event::Apply(cm("b", "1"))));
        assert!(!h.run());
        for rx in &mut h.consumers {
            assert_eq!(drain(rx).len(), 2);
        }
        h.push(Ok(Event::Delete(cm("a", "2"))));
        assert!(!h.run());
        assert!(h.store.get(&key("a")).is_none());
        assert!(h.store.get(&key("b")).is_some());
        for rx in &mut h.consumers {
            let got = drain(rx);
            assert_eq!(got.len(), 1);
            assert_eq!(name(&got[0]), "a");
            assert_eq!(got[0].metadata.resource_version.as_deref(), Some("2"));
        }
    }

    #[tokio::test]
    async fn a_list_is_sent_once_at_init_done_as_the_cached_arcs() {
        let mut h = Harness::new(2, 8);
        h.push(Ok(Event::Init));
        h.push(Ok(Event::InitApply(cm("a", "1"))));
        h.push(Ok(Event::InitApply(cm("b", "1"))));
        h.push(Ok(Event::InitApply(cm("c", "1"))));
        assert!(!h.run());
        for rx in &mut h.consumers {
            assert_eq!(rx.try_recv().unwrap_err(), TryRecvError::Empty);
        }
        assert!(h.store.is_empty());
        assert!(h.store.wait_until_ready().now_or_never().is_none());

        h.push(Ok(Event::InitDone));
        assert!(!h.run());
        assert!(h.store.wait_until_ready().now_or_never().is_some());
        for rx in &mut h.consumers {
            let got = drain(rx);
            let mut names: Vec<_> = got.iter().map(|o| name(o)).collect();
            names.sort();
            assert_eq!(names, ["a", "b", "c"]);
            for obj in &got {
                let cached = h.store.get(&ObjectRef::from_obj(obj.as_ref())).unwrap();
                assert!(Arc::ptr_eq(obj, &cached));
            }
        }

        // A relist replaces the cache: what left it is not sent again, what is new is.
        h.push(Ok(Event::Init));
        h.push(Ok(Event::InitApply(cm("b", "2"))));
        h.push(Ok(Event::InitApply(cm("d", "1"))));
        assert!(!h.run());
        for rx in &mut h.consumers {
            assert_eq!(rx.try_recv().unwrap_err(), TryRecvError::Empty);
        }
        h.push(Ok(Event::InitDone));
        assert!(!h.run());
        for rx in &mut h.consumers {
            let mut names: Vec<_> = drain(rx).iter().map(|o| name(o)).collect();
            names.sort();
            assert_eq!(names, ["b", "d"]);
        }
    }

    #[tokio::test]
    async fn on_event_sees_applies_deletes_and_listed_objects() {
        let mut h = Harness::new(1, 8);
        h.push(Ok(Event::Init));
        h.push(Ok(Event::InitApply(cm("listed", "1"))));
        h.push(Ok(Event::InitDone));
        h.push(Ok(Event::Apply(cm("applied", "2"))));
        h.push(Ok(Event::Delete(cm("listed", "3"))));
        assert!(!h.run());
        assert_eq!(h.seen(), ["listed", "applied", "-listed"]);
    }

    #[tokio::test]
    async fn a_full_channel_stops_the_watch_until_the_consumer_reads() {
        let mut h = Harness::new(2, 2);
        for (i, n) in ["a", "b", "c", "d", "e"].into_iter().enumerate() {
            h.push(Ok(Event::Apply(cm(n, "1"))));
            if i == 1 {
                h.push(Err(watcher::Error::NoResourceVersion));
            }
        }
        h.source.close_channel();
        let (mut first, mut second) = (Vec::new(), Vec::new());

        // a and b fill both channels (the error between them is skipped); c is taken from
        // the watch and cached, and its send waits. Nothing further is read from the watch.
        assert!(!h.run());
        assert_eq!(h.seen(), ["a", "b", "c"]);
        assert_eq!(h.store.len(), 3);
        assert!(!h.run());
        assert_eq!(
            h.seen(),
            ["a", "b", "c"],
            "no progress while a channel is full"
        );

        // The first consumer reads: c reaches it, then waits for the second, which does not
        // read. Still no progress.
        first.extend(drain(&mut h.consumers[0]));
        assert!(!h.run());
        assert!(!h.run());
        assert_eq!(
            h.seen(),
            ["a", "b", "c"],
            "the second consumer holds the watch"
        );

        // One read by the second makes room for c; d is taken and waits in turn.
        second.extend(h.consumers[1].try_recv().ok());
        assert!(!h.run());
        assert_eq!(h.seen(), ["a", "b", "c", "d"]);

        // Reading on, everything arrives, in order, at both.
        let mut ended = false;
        for _ in 0..10 {
            first.extend(drain(&mut h.consumers[0]));
            second.extend(drain(&mut h.consumers[1]));
            if ended {
                break;
            }
            ended = h.run();
        }
        assert!(ended, "the driver ends with its event stream");
        let names = |v: &[Arc<ConfigMap>]| v.iter().map(|o| name(o)).collect::<Vec<_>>();
        assert_eq!(names(&first), ["a", "b", "c", "d", "e"]);
        assert_eq!(names(&second), ["a", "b", "c", "d", "e"]);
        assert_eq!(h.seen(), ["a", "b", "c", "d", "e"]);
    }

    #[tokio::test]
    async fn a_full_channel_at_init_done_does_not_keep_the_cache_from_being_ready() {
        // The controllers start reading only when every cache is ready: a list larger than a
        // channel must make the store ready before the sends that wait.
        let mut h = Harness::new(1, 1);
        h.push(Ok(Event::Init));
        for n in ["a", "b", "c"] {
            h.push(Ok(Event::InitApply(cm(n, "1"))));
        }
        h.push(Ok(Event::InitDone));
        h.push(Ok(Event::Apply(cm("d", "1"))));
        assert!(!h.run());
        assert!(h.store.wait_until_ready().now_or_never().is_some());
        assert_eq!(h.store.len(), 3);
        assert_eq!(h.seen(), ["a", "b", "c"], "the Apply after the list waits");

        let mut got = Vec::new();
        for _ in 0..10 {
            got.extend(drain(&mut h.consumers[0]));
            h.run();
        }
        let mut names: Vec<_> = got.iter().map(|o| name(o)).collect();
        names[..3].sort();
        assert_eq!(names, ["a", "b", "c", "d"]);
    }
}
