use medes_core::{ActionName, Bytes, Namespace};
use proptest::prelude::*;

use super::*;

const T0: Timestamp = Timestamp(1_000);

fn check(state: SandboxState, event: Event, now: u64, expect: &str) {
    let got = match state.apply(event, Timestamp(now)) {
        Ok(s) => format!("{s:?}"),
        Err(e) => format!("error: {e}"),
    };
    assert_eq!(got, expect, "{state:?} + {event:?}");
}

#[test]
fn lifecycle_transitions() {
    use SandboxState as S;
    let warm = S::Warm { idle_since: T0 };
    check(S::Starting, Event::Started, 5, "Running { in_flight: 1 }");
    check(
        S::Starting,
        Event::Ready,
        5,
        "Warm { idle_since: Timestamp(5) }",
    );
    check(
        warm,
        Event::Assign { concurrency: 1 },
        5,
        "Running { in_flight: 1 }",
    );
    check(
        S::Running { in_flight: 1 },
        Event::Assign { concurrency: 1 },
        5,
        "error: event Assign { concurrency: 1 } is not allowed in state Running { in_flight: 1 }",
    );
    check(
        S::Running { in_flight: 1 },
        Event::Assign { concurrency: 3 },
        5,
        "Running { in_flight: 2 }",
    );
    check(
        S::Running { in_flight: 0 },
        Event::Assign { concurrency: 0 },
        5,
        "Running { in_flight: 1 }",
    );
    check(
        S::Running { in_flight: 2 },
        Event::Finished,
        5,
        "Running { in_flight: 1 }",
    );
    check(
        S::Running { in_flight: 1 },
        Event::Finished,
        7,
        "Warm { idle_since: Timestamp(7) }",
    );
    check(
        warm,
        Event::Finished,
        5,
        "error: event Finished is not allowed in state Warm { idle_since: Timestamp(1000) }",
    );
    check(
        S::Starting,
        Event::Assign { concurrency: 5 },
        5,
        "error: event Assign { concurrency: 5 } is not allowed in state Starting",
    );
    check(S::Starting, Event::Purge, 5, "Purging");
    check(warm, Event::Purge, 5, "Purging");
    check(S::Running { in_flight: 2 }, Event::Purge, 5, "Purging");
    check(
        S::Purging,
        Event::Purge,
        5,
        "error: event Purge is not allowed in state Purging",
    );
    check(
        S::Purging,
        Event::Assign { concurrency: 1 },
        5,
        "error: event Assign { concurrency: 1 } is not allowed in state Purging",
    );
    check(
        warm,
        Event::Started,
        5,
        "error: event Started is not allowed in state Warm { idle_since: Timestamp(1000) }",
    );
}

#[test]
fn dedup_lifecycle_transitions() {
    use SandboxState as S;
    let warm = S::Warm { idle_since: T0 };
    let ck_dedup = S::Checkpointing {
        idle_since: T0,
        purpose: Purpose::Dedup,
    };
    let ck_base = S::Checkpointing {
        idle_since: T0,
        purpose: Purpose::Base,
    };
    let dedup = S::Dedup {
        since: Timestamp(70_000),
        idle_since: T0,
    };
    check(
        warm,
        Event::Checkpoint(Purpose::Dedup),
        61_000,
        "Checkpointing { idle_since: Timestamp(1000), purpose: Dedup }",
    );
    check(
        ck_dedup,
        Event::CheckpointDone,
        70_000,
        "Dedup { since: Timestamp(70000), idle_since: Timestamp(1000) }",
    );
    check(
        ck_base,
        Event::CheckpointDone,
        70_000,
        "Warm { idle_since: Timestamp(1000) }",
    );
    check(
        ck_dedup,
        Event::CheckpointFailed,
        70_000,
        "Warm { idle_since: Timestamp(1000) }",
    );
    check(
        ck_base,
        Event::CheckpointFailed,
        70_000,
        "Warm { idle_since: Timestamp(1000) }",
    );
    check(
        ck_dedup,
        Event::Assign { concurrency: 4 },
        5,
        "error: event Assign { concurrency: 4 } is not allowed in state Checkpointing { idle_since: Timestamp(1000), purpose: Dedup }",
    );
    check(
        S::Running { in_flight: 1 },
        Event::Checkpoint(Purpose::Base),
        5,
        "error: event Checkpoint(Base) is not allowed in state Running { in_flight: 1 }",
    );
    check(dedup, Event::Restore, 80_000, "Restoring");
    check(
        dedup,
        Event::Assign { concurrency: 1 },
        5,
        "error: event Assign { concurrency: 1 } is not allowed in state Dedup { since: Timestamp(70000), idle_since: Timestamp(1000) }",
    );
    check(
        S::Restoring,
        Event::Restored,
        80_050,
        "Running { in_flight: 1 }",
    );
    check(S::Restoring, Event::Purge, 80_050, "Purging");
    check(dedup, Event::Purge, 80_050, "Purging");
    check(ck_dedup, Event::Purge, 80_050, "Purging");
    check(
        S::Restoring,
        Event::Finished,
        5,
        "error: event Finished is not allowed in state Restoring",
    );
    check(
        warm,
        Event::Restore,
        5,
        "error: event Restore is not allowed in state Warm { idle_since: Timestamp(1000) }",
    );
}

#[test]
fn can_assign_and_restore_match_apply() {
    use SandboxState as S;
    for s in [
        S::Starting,
        S::Running { in_flight: 1 },
        S::Running { in_flight: 2 },
        S::Warm { idle_since: T0 },
        S::Checkpointing {
            idle_since: T0,
            purpose: Purpose::Base,
        },
        S::Dedup {
            since: T0,
            idle_since: T0,
        },
        S::Restoring,
        S::Purging,
    ] {
        for c in 0..4 {
            assert_eq!(
                s.can_assign(c),
                s.apply(Event::Assign { concurrency: c }, T0).is_ok(),
                "{s:?} concurrency {c}"
            );
        }
        assert_eq!(
            s.can_restore(),
            s.apply(Event::Restore, T0).is_ok(),
            "{s:?}"
        );
    }
}

#[test]
fn labels_and_counts() {
    use SandboxState as S;
    let mut c = Counts::default();
    let all = [
        (S::Starting, Form::Plain, "starting"),
        (S::Running { in_flight: 1 }, Form::Plain, "running"),
        (S::Running { in_flight: 1 }, Form::Base, "base"),
        (S::Warm { idle_since: T0 }, Form::Plain, "warm"),
        (S::Warm { idle_since: T0 }, Form::Base, "base"),
        (
            S::Checkpointing {
                idle_since: T0,
                purpose: Purpose::Base,
            },
            Form::Plain,
            "checkpointing",
        ),
        (
            S::Checkpointing {
                idle_since: T0,
                purpose: Purpose::Dedup,
            },
            Form::Plain,
            "checkpointing",
        ),
        (
            S::Dedup {
                since: T0,
                idle_since: T0,
            },
            Form::Plain,
            "dedup",
        ),
        (S::Restoring, Form::Plain, "restoring"),
        (S::Purging, Form::Base, "purging"),
    ];
    for (s, f, l) in all {
        assert_eq!(label(s, f).as_str(), l, "{s:?} {f:?}");
        c.add(s, f);
    }
    assert_eq!(
        format!("{c:?}"),
        "Counts { starting: 1, running: 1, warm: 1, base: 3, dedup: 2, restoring: 1 }"
    );
    assert_eq!(c.total(), 9);
    for (i, k) in StateKind::ALL.iter().enumerate() {
        assert_eq!(k.index(), i);
    }
}

fn name() -> ActionName {
    ActionName {
        namespace: Namespace("guest".into()),
        name: "f".into(),
    }
}

/// A sandbox for the decision tests, described in a few words:
/// `warm@t`, `base@t` (warm base idle since t), `dedup@t` (deduplicated at t), plus options
/// `nodedup` (not deduplicable), `deps=N`, `local=B/D` (bases and dedups of the function on
/// its node).
fn sandbox(desc: &str) -> SandboxView {
    let mut words = desc.split_whitespace();
    let head = words.next().expect("a state");
    let (kind, t) = head.split_once('@').expect("state@time");
    let t = Timestamp(t.parse().expect("a time"));
    let (state, form) = match kind {
        "warm" => (SandboxState::Warm { idle_since: t }, Form::Plain),
        "base" => (SandboxState::Warm { idle_since: t }, Form::Base),
        "dedup" => (
            SandboxState::Dedup {
                since: t,
                idle_since: t,
            },
            Form::Plain,
        ),
        "running" => (SandboxState::Running { in_flight: 1 }, Form::Plain),
        other => panic!("unknown state {other}"),
    };
    let mut v = SandboxView::new(state, Timestamp(0), Bytes::mib(30));
    v.form = form;
    for w in words {
        match w.split_once('=') {
            None if w == "nodedup" => v.deduplicable = false,
            Some(("deps", n)) => v.dependents = n.parse().expect("a number"),
            Some(("local", bd)) => {
                let (b, d) = bd.split_once('/').expect("B/D");
                v.local.base = b.parse().expect("a number");
                v.local.dedup = d.parse().expect("a number");
            }
            _ => panic!("unknown option {w}"),
        }
    }
    v
}

/// Asks `policy` about `desc` at `now` (ms) and formats `decision enforced next=...`.
fn check_policy(policy: &mut dyn Policy, desc: &str, now: u64, expect: &str) {
    let f = FunctionView::new(name(), Bytes::mib(256));
    let s = sandbox(desc);
    let c = ClusterView::default();
    let now = Timestamp(now);
    let d = policy.on_idle(&c, &f, &s, now);
    let got = format!(
        "{d:?} {:?} next={:?}",
        enforce(d, &s, true),
        policy.next_decision(&f, &s, now).map(|t| t.0)
    );
    assert_eq!(got, expect, "{} {desc} at {}", policy.name(), now.0);
}

#[test]
fn keep_alive_decisions() {
    let mut p = KeepAlive::new(600_000);
    check_policy(
        &mut p,
        "warm@1000",
        1_000,
        "KeepWarm KeepWarm next=Some(601000)",
    );
    check_policy(
        &mut p,
        "warm@1000",
        600_999,
        "KeepWarm KeepWarm next=Some(601000)",
    );
    check_policy(&mut p, "warm@1000", 601_000, "Purge Purge next=None");
    check_policy(&mut p, "warm@1000", 10_000_000, "Purge Purge next=None");
    // A clock that went backwards never purges early.
    check_policy(
        &mut p,
        "warm@1000",
        0,
        "KeepWarm KeepWarm next=Some(601000)",
    );
    check_policy(
        &mut p,
        "running@0",
        10_000_000,
        "KeepWarm KeepWarm next=None",
    );
    check_policy(
        &mut p,
        &format!("warm@{}", u64::MAX - 1),
        0,
        "KeepWarm KeepWarm next=Some(18446744073709551615)",
    );
}

#[test]
fn dedup_rule_decisions() {
    let mut p = DedupRule::new(RuleConfig::default());
    // Idle period: first a base, then dedups up to T per base, then another base.
    check_policy(&mut p, "warm@0", 0, "KeepWarm KeepWarm next=Some(60000)");
    check_policy(
        &mut p,
        "warm@0",
        59_999,
        "KeepWarm KeepWarm next=Some(60000)",
    );
    check_policy(&mut p, "warm@0", 60_000, "Base Base next=Some(600000)");
    check_policy(
        &mut p,
        "warm@0 local=1/0",
        60_000,
        "Dedup Dedup next=Some(600000)",
    );
    check_policy(
        &mut p,
        "warm@0 local=1/40",
        60_000,
        "Dedup Dedup next=Some(600000)",
    );
    check_policy(
        &mut p,
        "warm@0 local=1/41",
        60_000,
        "Base Base next=Some(600000)",
    );
    check_policy(
        &mut p,
        "warm@0 local=2/80",
        60_000,
        "Dedup Dedup next=Some(600000)",
    );
    // Not deduplicable: kept warm until the keep-alive.
    check_policy(
        &mut p,
        "warm@0 nodedup",
        0,
        "KeepWarm KeepWarm next=Some(600000)",
    );
    check_policy(
        &mut p,
        "warm@0 nodedup",
        60_000,
        "KeepWarm KeepWarm next=Some(600000)",
    );
    check_policy(&mut p, "warm@0 nodedup", 600_000, "Purge Purge next=None");
    // A base serves on; it retires after the keep-alive only without dependents.
    check_policy(
        &mut p,
        "base@0 local=1/3 deps=3",
        60_000,
        "KeepWarm KeepWarm next=Some(600000)",
    );
    check_policy(&mut p, "base@0 deps=3", 600_000, "Purge KeepWarm next=None");
    check_policy(&mut p, "base@0 deps=0", 600_000, "Purge Purge next=None");
    // Dedup sandboxes are purged after keep-dedup, never made warm.
    check_policy(
        &mut p,
        "dedup@60000",
        60_000,
        "KeepWarm KeepWarm next=Some(960000)",
    );
    check_policy(
        &mut p,
        "dedup@60000",
        959_999,
        "KeepWarm KeepWarm next=Some(960000)",
    );
    check_policy(&mut p, "dedup@60000", 960_000, "Purge Purge next=None");
    // A sandbox past the keep-alive at its first decision (idle period ≥ keep-alive).
    let mut long = DedupRule::new(RuleConfig {
        idle_period_ms: 700_000,
        ..Default::default()
    });
    check_policy(
        &mut long,
        "warm@0",
        650_000,
        "Purge Purge next=Some(700000)",
    );
    check_policy(
        &mut long,
        "warm@0",
        600_000,
        "Purge Purge next=Some(700000)",
    );
    // T configurable.
    let mut t2 = DedupRule::new(RuleConfig {
        dedup_per_base: 2,
        ..Default::default()
    });
    check_policy(
        &mut t2,
        "warm@0 local=1/2",
        60_000,
        "Dedup Dedup next=Some(600000)",
    );
    check_policy(
        &mut t2,
        "warm@0 local=1/3",
        60_000,
        "Base Base next=Some(600000)",
    );
    // Dedup disabled: plain keep-alive.
    let mut off = DedupRule::new(RuleConfig {
        dedup_enabled: false,
        ..Default::default()
    });
    assert_eq!(off.name(), "keep-alive");
    check_policy(&mut off, "warm@0", 0, "KeepWarm KeepWarm next=Some(600000)");
    check_policy(
        &mut off,
        "warm@0",
        60_000,
        "KeepWarm KeepWarm next=Some(600000)",
    );
    check_policy(&mut off, "warm@0", 600_000, "Purge Purge next=None");
}

#[test]
fn enforce_applies_the_platform_invariants() {
    let check = |d: Decision, desc: &str, enabled: bool, expect: Decision| {
        assert_eq!(
            enforce(d, &sandbox(desc), enabled),
            expect,
            "{d:?} {desc} {enabled}"
        );
    };
    use Decision as D;
    check(D::KeepWarm, "dedup@0", true, D::KeepWarm);
    check(D::Dedup, "dedup@0", true, D::KeepWarm);
    check(D::Base, "dedup@0", true, D::KeepWarm);
    check(D::Purge, "dedup@0", true, D::Purge);
    check(D::Purge, "base@0 deps=1", true, D::KeepWarm);
    check(D::Purge, "base@0", true, D::Purge);
    check(D::Dedup, "base@0", true, D::KeepWarm);
    check(D::Base, "base@0", true, D::KeepWarm);
    check(D::Dedup, "warm@0 nodedup", true, D::KeepWarm);
    check(D::Base, "warm@0 nodedup", true, D::KeepWarm);
    check(D::Purge, "warm@0 nodedup", true, D::Purge);
    check(D::Dedup, "warm@0", false, D::KeepWarm);
    check(D::Base, "warm@0", false, D::KeepWarm);
    check(D::Dedup, "warm@0", true, D::Dedup);
    check(D::Base, "warm@0", true, D::Base);
    check(D::Purge, "running@0", true, D::KeepWarm);
    check(D::Dedup, "running@0", true, D::KeepWarm);
}

#[test]
fn arrival_window_peaks_and_expires_by_time() {
    let mut w = ArrivalWindow::new(10);
    let min = |m: u64, s: u64| Timestamp(m * 60_000 + s * 1000);
    assert_eq!(w.summary(min(0, 0)), ArrivalSummary::default());
    for s in 0..5 {
        w.record(min(0, s));
    }
    for s in 0..2 {
        w.record(min(3, s));
    }
    let at = |w: &ArrivalWindow, t| {
        let s = w.summary(t);
        format!(
            "total={} cur={} peak={} win={}",
            s.total, s.current_minute, s.peak_per_minute, s.in_window
        )
    };
    assert_eq!(at(&w, min(3, 30)), "total=7 cur=2 peak=5 win=7");
    assert_eq!(w.summary(min(3, 30)).peak_rate(), 5.0 / 60.0);
    // Minute 0 leaves the window at minute 10, with no new arrival.
    assert_eq!(at(&w, min(9, 59)), "total=7 cur=0 peak=5 win=7");
    assert_eq!(at(&w, min(10, 0)), "total=7 cur=0 peak=2 win=2");
    assert_eq!(at(&w, min(13, 0)), "total=7 cur=0 peak=0 win=0");
    w.record(min(20, 0));
    assert_eq!(at(&w, min(20, 1)), "total=8 cur=1 peak=1 win=1");
    assert_eq!(w.summary(min(20, 1)).last, Some(min(20, 0)));
    // Out-of-order arrivals count in the latest bucket.
    w.record(min(19, 0));
    assert_eq!(at(&w, min(20, 1)), "total=9 cur=2 peak=2 win=2");
}

#[test]
fn ewma_weights_new_samples_by_a_tenth() {
    let mut e = Ewma::default();
    assert_eq!(e.get(), None);
    e.add(100.0);
    assert_eq!(e.get(), Some(100.0));
    e.add(200.0);
    assert_eq!(e.get(), Some(110.0));
    e.add(f64::NAN);
    assert_eq!(e.get(), Some(110.0));
}

fn v(key: u32, rank: u64, mb: u64) -> Victim<u32> {
    Victim {
        key,
        rank: rank as f64,
        memory: Bytes::mib(mb),
    }
}

fn check_admit(budget_mb: u64, used_mb: u64, need_mb: u64, idle: &[Victim<u32>], expect: &str) {
    let got = format!(
        "{:?}",
        admit(
            Bytes::mib(budget_mb),
            Bytes::mib(used_mb),
            Bytes::mib(need_mb),
            idle.iter().copied()
        )
    );
    assert_eq!(
        got, expect,
        "budget {budget_mb} used {used_mb} need {need_mb}"
    );
}

#[test]
fn admission_and_lru_eviction() {
    check_admit(1024, 0, 256, &[], "Fits");
    check_admit(1024, 768, 256, &[v(1, 5, 100)], "Fits");
    check_admit(1024, 1024, 2048, &[], "Reject");
    check_admit(1024, 900, 256, &[], "Wait");
    // Lowest rank first, only as many as needed.
    check_admit(
        1024,
        1000,
        256,
        &[v(1, 50, 300), v(2, 10, 100), v(3, 30, 200)],
        "Evict([2, 3])",
    );
    check_admit(
        1024,
        1000,
        256,
        &[v(1, 50, 300), v(2, 10, 300)],
        "Evict([2])",
    );
    // Sandboxes that free nothing are not evicted.
    check_admit(1024, 1000, 256, &[v(1, 1, 0), v(2, 10, 300)], "Evict([2])");
    // Not enough idle memory: wait rather than evict uselessly.
    check_admit(1024, 1024, 256, &[v(1, 1, 100), v(2, 2, 100)], "Wait");
    check_admit(1024, 2000, 256, &[v(1, 1, 1000)], "Wait");
    check_admit(1024, 0, 0, &[], "Fits");
}

proptest! {
    /// Following admission decisions never takes the charged total above the budget.
    #[test]
    fn admission_never_exceeds_budget(
        budget in 1u64..10_000,
        needs in proptest::collection::vec(0u64..3_000, 1..40),
        finishes in proptest::collection::vec(any::<bool>(), 40),
    ) {
        // (key, memory, idle) of every live sandbox
        let mut live: Vec<(u32, u64, bool)> = Vec::new();
        let mut next_key = 0u32;
        for (i, need) in needs.into_iter().enumerate() {
            let used: u64 = live.iter().map(|s| s.1).sum();
            let idle = live.iter().filter(|s| s.2).map(|s| Victim { key: s.0, rank: f64::from(s.0), memory: Bytes(s.1) });
            match admit(Bytes(budget), Bytes(used), Bytes(need), idle) {
                Admission::Fits => {}
                Admission::Evict(keys) => live.retain(|s| !keys.contains(&s.0)),
                Admission::Wait | Admission::Reject => continue,
            }
            live.push((next_key, need, false));
            next_key += 1;
            let total: u64 = live.iter().map(|s| s.1).sum();
            prop_assert!(total <= budget, "total {} > budget {}", total, budget);
            if finishes[i] {
                for s in &mut live { s.2 = true; }
            }
        }
    }

    /// The dedup rule's next decision is always in the future, and asking at that time never
    /// yields a base or dedup for a sandbox that may not be one.
    #[test]
    fn rule_decisions_are_consistent(
        idle_since in 0u64..1_000_000,
        now_off in 0u64..2_000_000,
        base in 0usize..4,
        dedup in 0usize..200,
        deduplicable in any::<bool>(),
        enabled in any::<bool>(),
    ) {
        let mut p = DedupRule::new(RuleConfig { dedup_enabled: enabled, ..Default::default() });
        let f = FunctionView::new(name(), Bytes::mib(128));
        let mut s = SandboxView::new(SandboxState::Warm { idle_since: Timestamp(idle_since) }, Timestamp(0), Bytes::mib(10));
        s.deduplicable = deduplicable;
        s.local.base = base;
        s.local.dedup = dedup;
        let now = Timestamp(idle_since + now_off);
        if let Some(t) = p.next_decision(&f, &s, now) {
            prop_assert!(t > now);
        }
        let d = p.on_idle(&ClusterView::default(), &f, &s, now);
        if !deduplicable || !enabled {
            prop_assert!(matches!(d, Decision::KeepWarm | Decision::Purge));
        }
        prop_assert_eq!(enforce(d, &s, enabled), d);
    }
}
