//! Store round trips, persistence across reopen, listing filters, retention and put latency.

use std::time::Instant;

use medes_core::{
    Action, ActionName, Activation, ActivationId, ActivationResponse, ActivationStatus, Code, Exec,
    Limits, Namespace, StartKind,
};
use medes_store::{ActivationQuery, ApiKey, PutActionError, Store, StoreConfig};

fn action(ns: &str, name: &str, updated: u64) -> Action {
    Action {
        name: ActionName {
            namespace: Namespace(ns.into()),
            name: name.into(),
        },
        version: String::new(),
        exec: Exec {
            kind: "python:3".into(),
            code: Code::Source("def main(a):\n    return a\n".into()),
            main: "main".into(),
        },
        parameters: serde_json::Map::new(),
        annotations: vec![("k".into(), serde_json::json!(1))],
        limits: Limits::default(),
        publish: false,
        updated,
    }
}

fn activation(ns: &str, name: &str, start: u64) -> Activation {
    Activation {
        id: ActivationId::random(),
        action: ActionName {
            namespace: Namespace(ns.into()),
            name: name.into(),
        },
        version: "0.0.1".into(),
        subject: "guest".into(),
        start,
        end: start + 3,
        response: ActivationResponse {
            status: ActivationStatus::Success,
            result: serde_json::json!({"start": start}),
        },
        logs: vec!["2024-01-01T00:00:00.000000Z stdout: hi".into()],
        start_kind: StartKind::Warm,
        init_time_ms: None,
        wait_time_ms: 1,
        main_ms: Some(0.1),
        timeout: false,
        limits: Limits::default(),
        node: None,
    }
}

#[test]
fn actions_round_trip_with_overwrite_semantics() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("db.redb")).unwrap();
    let a = store
        .put_action(action("guest", "hello", 1), false)
        .unwrap();
    assert_eq!(a.version, "0.0.1");
    assert_eq!(store.get_action(&a.name).unwrap().unwrap(), a);

    let err = store
        .put_action(action("guest", "hello", 2), false)
        .unwrap_err();
    assert!(matches!(err, PutActionError::Exists(_)), "{err}");
    assert_eq!(
        store.get_action(&a.name).unwrap().unwrap().updated,
        1,
        "conflict changed nothing"
    );

    let b = store.put_action(action("guest", "hello", 3), true).unwrap();
    assert_eq!(b.version, "0.0.2");
    assert_eq!(
        store
            .put_action(action("guest", "hello", 4), true)
            .unwrap()
            .version,
        "0.0.3"
    );

    store
        .put_action(action("guest", "pkg/zzz", 10), false)
        .unwrap();
    store
        .put_action(action("other", "hello", 20), false)
        .unwrap();
    store.put_action(action("guest2", "x", 20), false).unwrap();
    let names: Vec<_> = store
        .list_actions(&Namespace("guest".into()), 0, 30)
        .unwrap()
        .into_iter()
        .map(|a| a.name.name)
        .collect();
    assert_eq!(
        names,
        ["pkg/zzz", "hello"],
        "newest update first, only this namespace"
    );
    assert_eq!(
        store
            .list_actions(&Namespace("guest".into()), 1, 30)
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        store
            .list_actions(&Namespace("guest".into()), 0, 1)
            .unwrap()
            .len(),
        1
    );

    let gone = store.delete_action(&a.name).unwrap().unwrap();
    assert_eq!(gone.version, "0.0.3");
    assert!(store.get_action(&a.name).unwrap().is_none());
    assert!(store.delete_action(&a.name).unwrap().is_none());
}

#[test]
fn everything_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/dir/db.redb");
    let (key, act, name) = {
        let store = Store::open(&path).unwrap();
        let key = store.ensure_default_key().unwrap();
        assert_eq!(
            store.ensure_default_key().unwrap(),
            key,
            "default key is stable"
        );
        let extra = ApiKey::generate(Namespace("alice".into()), "alice");
        store.add_key(&extra).unwrap();
        let a = store
            .put_action(action("guest", "hello", 1), false)
            .unwrap();
        let act = activation("guest", "hello", 1000);
        store.record_activation(act.clone()).unwrap();
        // Readable before the writer commits.
        assert_eq!(store.get_activation(&act.id).unwrap().unwrap(), act);
        (key, act, a.name)
        // dropped: the writer commits what is queued
    };
    let store = Store::open(&path).unwrap();
    assert_eq!(store.ensure_default_key().unwrap(), key);
    assert_eq!(store.lookup_key(&key.uuid).unwrap().unwrap(), key);
    assert_eq!(store.list_keys().unwrap().len(), 2);
    assert!(store.lookup_key("nope").unwrap().is_none());
    assert_eq!(store.get_action(&name).unwrap().unwrap().version, "0.0.1");
    assert_eq!(store.get_activation(&act.id).unwrap().unwrap(), act);
    assert_eq!(store.activation_count().unwrap(), 1);
}

#[test]
fn default_key_is_random_and_never_the_openwhisk_guest_key() {
    let d1 = tempfile::tempdir().unwrap();
    let d2 = tempfile::tempdir().unwrap();
    let k1 = Store::open(d1.path().join("a"))
        .unwrap()
        .ensure_default_key()
        .unwrap();
    let k2 = Store::open(d2.path().join("a"))
        .unwrap()
        .ensure_default_key()
        .unwrap();
    assert_ne!(k1, k2);
    assert_ne!(k1.uuid, "23bc46b1-71f6-4ed5-8c54-816aa4f8c502");
    assert_eq!(k1.key.len(), 64);
    let guest = ApiKey {
        uuid: medes_store::OPENWHISK_GUEST_UUID.into(),
        key: "123zO3xZCLrMN6v2BKK1dXYFpXlPkccOFqm12CdAsMgRU4VrNZ9lyGVCGuMDGIwP".into(),
        namespace: Namespace("guest".into()),
        subject: "guest".into(),
        admin: false,
    };
    let store = Store::open(d1.path().join("b")).unwrap();
    assert!(matches!(
        store.add_key(&guest),
        Err(medes_store::WriteError::WellKnownKey)
    ));
    assert!(store.lookup_key(&guest.uuid).unwrap().is_none());
    assert!(k1.key.chars().all(|c| c.is_ascii_alphanumeric()));
}

#[test]
fn activation_listing_filters() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("db")).unwrap();
    let mut all = Vec::new();
    for i in 0..50u64 {
        let name = if i % 2 == 0 { "even" } else { "pkg/odd" };
        all.push(activation("guest", name, 1000 + i * 10));
    }
    all.push(activation("other", "even", 5000));
    store.put_activations(&all).unwrap();
    let q = |f: &dyn Fn(&mut ActivationQuery)| {
        let mut q = ActivationQuery::namespace(Namespace("guest".into()));
        f(&mut q);
        store
            .list_activations(&q)
            .unwrap()
            .into_iter()
            .map(|a| a.start)
            .collect::<Vec<_>>()
    };
    let newest = q(&|_| {});
    assert_eq!(newest.len(), 30);
    assert_eq!(newest[0], 1490);
    assert!(newest.windows(2).all(|w| w[0] > w[1]), "newest first");
    assert_eq!(q(&|q| q.limit = 200).len(), 50, "other namespaces excluded");
    assert_eq!(q(&|q| q.skip = 48), [1010, 1000]);
    assert_eq!(q(&|q| q.name = Some("pkg/odd".into())).len(), 25);
    assert_eq!(
        q(&|q| {
            q.name = Some("even".into());
            q.limit = 2
        }),
        [1480, 1460]
    );
    assert_eq!(
        q(&|q| {
            q.name = Some("even".into());
            q.skip = 1;
            q.limit = 1
        }),
        [1460]
    );
    assert_eq!(q(&|q| q.name = Some("nope".into())), Vec::<u64>::new());
    assert_eq!(
        q(&|q| {
            q.since = Some(1450);
        }),
        [1490, 1480, 1470, 1460, 1450],
        "since inclusive"
    );
    assert_eq!(
        q(&|q| {
            q.upto = Some(1020);
        }),
        [1020, 1010, 1000],
        "upto inclusive"
    );
    assert_eq!(
        q(&|q| {
            q.since = Some(1015);
            q.upto = Some(1040)
        }),
        [1040, 1030, 1020]
    );
    assert_eq!(
        q(&|q| {
            q.since = Some(1015);
            q.upto = Some(1040);
            q.name = Some("even".into())
        }),
        [1040, 1020]
    );
    assert_eq!(
        q(&|q| {
            q.since = Some(2000);
            q.upto = Some(1000)
        }),
        Vec::<u64>::new()
    );
}

#[test]
fn retention_deletes_the_oldest() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StoreConfig {
        max_activations: 10,
        ..StoreConfig::default()
    };
    let store = Store::open_with(dir.path().join("db"), cfg).unwrap();
    let acts: Vec<_> = (0..25u64)
        .map(|i| activation("guest", "f", 100 + i))
        .collect();
    for a in &acts {
        store.record_activation(a.clone()).unwrap();
    }
    store.flush().unwrap();
    assert_eq!(store.activation_count().unwrap(), 10);
    let mut q = ActivationQuery::namespace(Namespace("guest".into()));
    q.limit = 100;
    let starts: Vec<_> = store
        .list_activations(&q)
        .unwrap()
        .into_iter()
        .map(|a| a.start)
        .collect();
    assert_eq!(starts, (115..125).rev().collect::<Vec<_>>());
    q.name = Some("f".into());
    assert_eq!(
        store.list_activations(&q).unwrap().len(),
        10,
        "name index pruned too"
    );
    assert!(store.get_activation(&acts[0].id).unwrap().is_none());
    assert!(store.get_activation(&acts[24].id).unwrap().is_some());
}

#[test]
fn rewriting_an_activation_id_replaces_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("db")).unwrap();
    let mut a = activation("guest", "f", 100);
    store.put_activations(&[a.clone()]).unwrap();
    a.start = 200;
    store.put_activations(&[a.clone()]).unwrap();
    assert_eq!(store.activation_count().unwrap(), 1);
    let all = store
        .list_activations(&ActivationQuery::namespace(Namespace("guest".into())))
        .unwrap();
    assert_eq!(all, [a]);
}

/// Prints the latency of synchronous puts and the throughput of the batching writer.
#[test]
fn put_latency_report() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("db")).unwrap();
    let n = 200;
    let mut lat = Vec::with_capacity(n);
    for i in 0..n as u64 {
        let a = activation("guest", "f", 1000 + i);
        let t = Instant::now();
        store.put_activations(&[a]).unwrap();
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    lat.sort_by(f64::total_cmp);
    let t = Instant::now();
    let m = 20_000u64;
    for i in 0..m {
        store
            .record_activation(activation("guest", "g", 10_000 + i))
            .unwrap();
    }
    store.flush().unwrap();
    let rate = m as f64 / t.elapsed().as_secs_f64();
    println!(
        "store: synchronous put (one txn, fsync) p50 {:.3} ms p99 {:.3} ms; queued writer {:.0} activations/s",
        lat[n / 2],
        lat[n * 99 / 100],
        rate
    );
    assert_eq!(store.activation_count().unwrap(), n as u64 + m);
}
