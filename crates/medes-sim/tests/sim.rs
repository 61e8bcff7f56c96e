//! Simulator properties: determinism, conservation, the memory budget, scenario checks, and a
//! tiny end-to-end evaluation.

use medes_core::StartKind;
use medes_sim::eval::{MAIN_POLICIES, patterns_with, run_paper};
use medes_sim::{ClusterConfig, PolicySpec, Profile, SimConfig, SimOutput, simulate};
use medes_trace::{RecipeConfig, Trace, TraceEntry};

fn trace(entries: &[(u64, &str)]) -> Trace {
    Trace::new(
        entries
            .iter()
            .map(|&(t, f)| TraceEntry {
                time_ms: t,
                function: f.to_string(),
                params: None,
            })
            .collect(),
    )
}

/// A busy one-hour pattern of the ten functions (small enough for debug builds).
fn pattern(seed: u64) -> Trace {
    let rc = RecipeConfig {
        min_per_hour: 300.0,
        max_per_hour: 3000.0,
        ..RecipeConfig::default()
    };
    patterns_with(1, seed, &rc, 2000).unwrap().swap_remove(0)
}

fn cluster(nodes: usize, node_mb: f64) -> SimConfig {
    let mut c = SimConfig::new(ClusterConfig {
        nodes,
        node_mb,
        ..ClusterConfig::paper(40.0)
    });
    c.sample_ms = 1_000;
    c
}

fn run(t: &Trace, policy: &str, cfg: &SimConfig, profile: &Profile) -> SimOutput {
    let spec: PolicySpec = policy.parse().unwrap();
    let mut p = spec.build(profile.costs(&t.functions()).unwrap());
    simulate(t, profile, &mut p, cfg).unwrap()
}

fn varied_profile() -> Profile {
    let mut p = Profile::paper();
    for f in p.functions.values_mut() {
        f.exec_cv = 0.5;
    }
    p
}

#[test]
fn same_seed_same_output_other_seed_differs() {
    let t = pattern(3);
    let prof = varied_profile();
    let cfg = cluster(4, 400.0);
    for policy in ["medes", "hybrid-histogram", "greedy-dual", "fixed-10m"] {
        let a = run(&t, policy, &cfg, &prof);
        let b = run(&t, policy, &cfg, &prof);
        assert_eq!(a, b, "{policy}");
        let mut other = cfg;
        other.seed = 99;
        let c = run(&t, policy, &other, &prof);
        assert_ne!(a.records, c.records, "{policy}");
    }
}

#[test]
fn every_invocation_is_accounted_for_and_memory_stays_in_budget() {
    let t = pattern(5);
    let prof = varied_profile();
    // From roomy to very tight (a node holds a handful of sandboxes).
    for (nodes, node_mb) in [(19, 2000.0), (4, 400.0), (2, 200.0)] {
        let cfg = cluster(nodes, node_mb);
        for policy in MAIN_POLICIES
            .iter()
            .chain(&["medes-latency", "fixed-1m", "medes-kd-5m"])
        {
            let out = run(&t, policy, &cfg, &prof);
            let s = &out.summary;
            let ctx = format!("{policy} on {nodes} × {node_mb} MB");
            assert_eq!(s.invocations as usize, t.len(), "{ctx}");
            assert_eq!(s.dropped, 0, "{ctx}");
            assert_eq!(
                s.cold_starts + s.dedup_starts + s.warm_starts,
                s.invocations,
                "{ctx}"
            );
            let mut seen = vec![false; t.len()];
            for r in &out.records {
                assert!(
                    !seen[r.request as usize],
                    "{ctx}: request {} twice",
                    r.request
                );
                seen[r.request as usize] = true;
                let e = &t.entries()[r.request as usize];
                assert_eq!(out.functions[r.function as usize], e.function, "{ctx}");
                assert_eq!(r.arrival_ms, e.time_ms, "{ctx}");
                assert!(r.e2e_ms >= r.startup_ms && r.startup_ms >= 0.0, "{ctx}");
            }
            assert!(seen.iter().all(|&x| x), "{ctx}");
            assert_eq!(s.counters.budget_violations, 0, "{ctx}");
            for m in &out.memory {
                assert!(m.max_node_mb <= node_mb + 1e-6, "{ctx}: {m:?}");
                assert!(m.used_mb <= nodes as f64 * node_mb + 1e-6, "{ctx}");
            }
            let dedups = s.dedup_starts + s.counters.dedup_ops + s.counters.bases;
            if !policy.starts_with("medes") {
                assert_eq!(dedups, 0, "{ctx}: only Medes deduplicates");
            }
        }
    }
}

#[test]
fn medes_deduplicates_under_pressure() {
    let t = pattern(5);
    let out = run(&t, "medes", &cluster(2, 400.0), &Profile::paper());
    let s = &out.summary;
    assert!(s.counters.dedup_ops > 0 && s.dedup_starts > 0, "{s:?}");
    assert!(s.counters.bases > 0, "{s:?}");
}

#[test]
fn keep_alive_scenarios() {
    let prof = Profile::paper();
    let cfg = cluster(1, 2000.0);
    // linalg: exec 250 ms, cold 835 ms. 9 minutes later: warm; 11 minutes after that: cold.
    let t = trace(&[
        (0, "linalg"),
        (540_000, "linalg"),
        (540_000 + 660_000, "linalg"),
    ]);
    let kinds = |out: &SimOutput| -> Vec<StartKind> {
        let mut r = out.records.clone();
        r.sort_by_key(|r| r.request);
        r.iter().map(|r| r.start).collect()
    };
    let out = run(&t, "fixed-10m", &cfg, &prof);
    assert_eq!(
        kinds(&out),
        [StartKind::Cold, StartKind::Warm, StartKind::Cold]
    );
    assert_eq!(out.records[0].e2e_ms, 835.0 + 250.0);
    // Greedy-Dual never expires a sandbox when memory allows.
    let out = run(&t, "greedy-dual", &cfg, &prof);
    assert_eq!(
        kinds(&out),
        [StartKind::Cold, StartKind::Warm, StartKind::Warm]
    );
    // Medes: the first sandbox becomes the function's base at its first idle decision and is
    // never purged.
    let out = run(&t, "medes", &cfg, &prof);
    assert_eq!(
        kinds(&out),
        [StartKind::Cold, StartKind::Warm, StartKind::Warm]
    );
    assert_eq!(out.summary.counters.bases, 1);
    // Medes with a tight node: a second concurrent sandbox is deduplicated after its idle
    // period and restored (a dedup start) 12 minutes later, past the 10-minute keep-alive.
    let t = trace(&[
        (0, "modelserve"),
        (10, "modelserve"),
        (12 * 60_000, "modelserve"),
        (12 * 60_000 + 1, "modelserve"),
    ]);
    let out = run(&t, "medes-budget-0.1", &cluster(1, 400.0), &prof);
    let k = kinds(&out);
    assert_eq!(&k[..2], [StartKind::Cold, StartKind::Cold]);
    assert!(
        k[2..].contains(&StartKind::Dedup),
        "{k:?} {:?}",
        out.summary
    );
    let out = run(&t, "fixed-10m", &cluster(1, 400.0), &prof);
    assert_eq!(kinds(&out), [StartKind::Cold; 4]);
}

#[test]
fn hybrid_histogram_prewarms_a_periodic_function() {
    let prof = Profile::paper();
    // vanilla every 7 minutes for 3 hours: idle times of ~7 min; after a few, the policy
    // unloads after each call and pre-warms before the next: warm starts without keeping the
    // sandbox for the whole gap.
    let entries: Vec<(u64, &str)> = (0..26).map(|i| (i * 420_000, "vanilla")).collect();
    let t = trace(&entries);
    let out = run(&t, "hybrid-histogram", &cluster(1, 2000.0), &prof);
    let s = &out.summary;
    assert!(s.counters.prewarms >= 20, "{s:?}");
    let mut r = out.records.clone();
    r.sort_by_key(|r| r.request);
    assert!(r[5..].iter().all(|r| r.start == StartKind::Warm), "{r:?}");
    // Memory is freed between calls: well below always-on.
    let idle_samples = out.memory.iter().filter(|m| m.used_mb == 0.0).count();
    assert!(
        idle_samples > out.memory.len() / 2,
        "{idle_samples} of {}",
        out.memory.len()
    );
}

#[test]
fn unknown_function_and_oversized_sandbox_are_errors() {
    let prof = Profile::paper();
    let t = trace(&[(0, "nope")]);
    let mut p = PolicySpec::GreedyDual.build(vec![]);
    assert!(matches!(
        simulate(&t, &prof, &mut p, &cluster(1, 1000.0)),
        Err(medes_sim::SimError::UnknownFunction(_))
    ));
    let t = trace(&[(0, "modelserve")]);
    assert!(matches!(
        simulate(&t, &prof, &mut p, &cluster(1, 50.0)),
        Err(medes_sim::SimError::DoesNotFit { .. })
    ));
    assert!(simulate(&t, &prof, &mut p, &cluster(0, 50.0)).is_err());
}

#[test]
fn outputs_round_trip_through_files() {
    let t = pattern(2);
    let out = run(&t, "medes", &cluster(3, 300.0), &Profile::paper());
    let dir = tempfile::tempdir().unwrap();
    out.write_dir(dir.path()).unwrap();
    let back = SimOutput::read_dir(dir.path()).unwrap();
    // JSON and CSV keep counts exactly and floats to within rounding.
    let (a, b) = (&back.summary, &out.summary);
    assert_eq!(
        (a.invocations, a.cold_starts, a.dedup_starts),
        (b.invocations, b.cold_starts, b.dedup_starts)
    );
    assert!((a.mean_memory_gb - b.mean_memory_gb).abs() < 1e-9);
    assert_eq!(a.functions.len(), b.functions.len());
    assert_eq!(back.records.len(), out.records.len());
    for (x, y) in back.records.iter().zip(&out.records) {
        assert_eq!(
            (x.request, x.function, x.start, x.node),
            (y.request, y.function, y.start, y.node)
        );
        assert!((x.e2e_ms - y.e2e_ms).abs() < 1e-6);
    }
    assert_eq!(back.memory.len(), out.memory.len());
    let rep = tempfile::tempdir().unwrap();
    let other = run(&t, "fixed-10m", &cluster(3, 300.0), &Profile::paper());
    let md = medes_sim::report::write_runs_report(&[other, back], rep.path()).unwrap();
    let text = std::fs::read_to_string(md).unwrap();
    assert!(
        text.contains("fixed-10m") && text.contains("÷ medes"),
        "{text}"
    );
    assert!(rep.path().join("memory_over_time.png").exists());
}

#[test]
fn tiny_paper_evaluation_end_to_end() {
    let pats = vec![pattern(7)];
    let res = run_paper(&pats, &Profile::paper(), &[4.0, 2.0], true, 1, &|_, _| {}).unwrap();
    for pool in [4.0, 2.0] {
        for p in MAIN_POLICIES {
            let r = res.row(p, pool).unwrap_or_else(|| panic!("{p} {pool}"));
            assert_eq!(r.invocations as usize, pats[0].len());
            assert!(r.p50_ms > 0.0 && r.p999_ms >= r.p99_ms && r.p99_ms >= r.p50_ms);
        }
    }
    assert!(res.row("fixed-20m", 40.0).is_some() && res.row("medes-kd-5m", 40.0).is_some());
    let dir = tempfile::tempdir().unwrap();
    let md = medes_sim::report::write_paper_report(&res, dir.path()).unwrap();
    let text = std::fs::read_to_string(md).unwrap();
    for needle in [
        "Fig. 10a",
        "Fig. 7a",
        "Fig. 7b",
        "Fig. 9",
        "Fig. 12",
        "Fig. 15",
        "Trade-off",
        "Template starts (issue 8)",
        "medes-predict+template",
    ] {
        assert!(text.contains(needle), "{needle}");
    }
    for f in [
        "fig10_cold_starts_vs_pool.png",
        "fig7a_latency_ratio_cdf.png",
        "fig7b_cold_starts_per_function.png",
        "fig9_memory_over_time.png",
        "fig12_keepalive_sweep.png",
        "fig15_keepdedup_sweep.png",
        "tradeoff_cold_starts_vs_memory.png",
        "templates_cold_template_time.png",
    ] {
        let meta = std::fs::metadata(dir.path().join(f)).unwrap();
        assert!(meta.len() > 1000, "{f}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("rows.json")).unwrap())
            .unwrap();
    let row = &json["rows"][0];
    for k in [
        "policy",
        "pool_gb",
        "cold_starts",
        "p50_ms",
        "p99_ms",
        "p999_ms",
        "startup_p999_ms",
        "mean_memory_gb",
        "template_starts",
        "cold_template_ms",
        "prewarms",
    ] {
        assert!(!row[k].is_null(), "{k}");
    }
    let t = res.row("fixed-10m+template", 4.0).unwrap();
    assert!(t.template_starts > 0, "{t:?}");
    assert_eq!(res.row("fixed-10m", 4.0).unwrap().template_starts, 0);
}

#[test]
fn cpu_model_slows_concurrent_work_and_start_reservations_and_base_eviction_are_options() {
    let p = Profile::paper();
    // Three linalg invocations at once on one node: no CPU model, each takes cold + exec;
    // with one core the second and third start while others are busy and take longer.
    let t = trace(&[(0, "linalg"), (0, "linalg"), (0, "linalg")]);
    let base = cluster(1, 4000.0);
    let free = run(&t, "fixed-10m", &base, &p);
    let mut one = base;
    one.cluster.cores = 1;
    let slow = run(&t, "fixed-10m", &one, &p);
    let max = |o: &SimOutput| o.records.iter().map(|r| r.e2e_ms).fold(0.0, f64::max);
    let lin = &p.functions["linalg"];
    assert!(
        (max(&free) - (lin.cold_ms + lin.exec_ms)).abs() < 2.0,
        "{}",
        max(&free)
    );
    assert!(
        max(&slow) >= 2.9 * (lin.cold_ms + lin.exec_ms),
        "{}",
        max(&slow)
    );
    // A start reservation larger than m_W is charged until the first invocation ends.
    let mut q = p.clone();
    q.functions.get_mut("linalg").unwrap().start_mb = 500.0;
    let t1 = trace(&[(0, "linalg")]);
    let mut c = cluster(1, 4000.0);
    c.sample_ms = 100;
    let o = run(&t1, "fixed-10m", &c, &q);
    let peak = o.memory.iter().map(|m| m.used_mb).fold(0.0, f64::max);
    assert!((peak - 500.0).abs() < 1e-6, "{peak}");
    let last = o.memory.last().unwrap().used_mb;
    assert!((last - lin.warm_mb).abs() < 1e-6, "{last}");
    // With a refresh lag the reservation outlives the first invocation by that long (a later
    // invocation keeps the simulation, and its memory samples, going).
    let done = (lin.cold_ms + lin.exec_ms) as u64;
    let t1 = trace(&[(0, "linalg"), (done + 5_000, "linalg")]);
    let o = run(&t1, "fixed-10m", &c, &q);
    let at = |o: &SimOutput, t: u64| {
        o.memory
            .iter()
            .find(|m| m.time_ms >= t)
            .map_or(f64::NAN, |m| m.used_mb)
    };
    assert!((at(&o, done + 300) - lin.warm_mb).abs() < 1e-6);
    // Once a sandbox of the function was measured, new ones reserve m_W only (as the live
    // controller charges the measured m_W): two more at once peak at 3 × m_W.
    let t2 = trace(&[
        (0, "linalg"),
        (done + 5_000, "linalg"),
        (done + 5_000, "linalg"),
    ]);
    let o = run(&t2, "fixed-10m", &c, &q);
    assert_eq!(o.summary.cold_starts, 2);
    let late = o
        .memory
        .iter()
        .filter(|m| m.time_ms > done)
        .map(|m| m.used_mb)
        .fold(0.0, f64::max);
    assert!((late - 2.0 * lin.warm_mb).abs() < 1e-6, "{late}");
    // With a refresh lag the reservation ends that long after the sandbox is ready (the live
    // controller does not measure starting sandboxes), before its first invocation ends here.
    let mut lag = c;
    lag.tick_ms = 100; // memory is sampled on policy ticks
    let cold = lin.cold_ms as u64;
    assert!(lin.exec_ms > 200.0, "{}", lin.exec_ms);
    lag.cluster.start_hold_ms = 100;
    let o2 = run(&t1, "fixed-10m", &lag, &q);
    assert!((at(&o2, cold - 100) - 500.0).abs() < 1e-6);
    assert!((at(&o2, cold + 50) - 500.0).abs() < 1e-6);
    assert!((at(&o2, cold + 200) - lin.warm_mb).abs() < 1e-6);
    // A longer lag outlives the first invocation.
    lag.cluster.start_hold_ms = done - cold + 1_000;
    let o3 = run(&t1, "fixed-10m", &lag, &q);
    assert!((at(&o3, done + 300) - 500.0).abs() < 1e-6);
    assert!((at(&o3, done + 1_300) - lin.warm_mb).abs() < 1e-6);
    assert!(!ClusterConfig::paper(40.0).evict_idle_bases);
    assert_eq!(ClusterConfig::paper(40.0).cores, 0);
}

#[test]
fn template_starts_replace_later_cold_starts_on_a_node_and_are_dropped_last() {
    let p = Profile::paper();
    let lin = &p.functions["linalg"];
    // linalg twice, the second after fixed-10m's keep-alive: a template start.
    let t = trace(&[(0, "linalg"), (11 * 60_000, "linalg")]);
    let mut c = cluster(1, 4000.0);
    c.templates = true;
    let spec: PolicySpec = "fixed-10m+template".parse().unwrap();
    assert!(
        spec.template_starts() && !"fixed-10m".parse::<PolicySpec>().unwrap().template_starts()
    );
    let mut pol = spec.build(p.costs_for(&t.functions(), true).unwrap());
    let o = simulate(&t, &p, &mut pol, &c).unwrap();
    assert_eq!(o.policy, "fixed-10m+template");
    let kinds: Vec<StartKind> = o.records.iter().map(|r| r.start).collect();
    assert_eq!(kinds, [StartKind::Cold, StartKind::Template]);
    assert!((o.records[1].startup_ms - lin.template_start_ms()).abs() < 1e-9);
    let s = &o.summary;
    assert_eq!(
        (s.cold_starts, s.template_starts, s.counters.templates),
        (1, 1, 1)
    );
    assert!((s.cold_template_ms - lin.cold_ms - lin.template_start_ms()).abs() < 1e-6);
    // The image stays charged to the node after the sandboxes are gone.
    let m = o.memory.iter().find(|m| m.time_ms >= 10 * 60_000).unwrap();
    assert!((m.used_mb - 2.0 * lin.warm_mb).abs() < 1e-6, "{m:?}");
    // Without templates the same trace is two cold starts.
    c.templates = false;
    let o = run(&t, "fixed-10m", &c, &p);
    assert_eq!(o.summary.cold_starts, 2);

    // A full node evicts its idle sandboxes first, then drops template images.
    let vid = &p.functions["videopro"];
    let node_mb = (lin.warm_mb * 2.0 + 1.0) / 0.95;
    assert!(vid.warm_mb + lin.warm_mb > 0.95 * node_mb);
    let t = trace(&[(0, "linalg"), (5_000, "videopro")]);
    let mut c = cluster(1, node_mb);
    c.templates = true;
    let mut pol = spec.build(p.costs_for(&t.functions(), true).unwrap());
    let o = simulate(&t, &p, &mut pol, &c).unwrap();
    let s = &o.summary;
    assert_eq!(s.cold_starts, 2, "{s:?}");
    assert_eq!(
        (s.counters.evictions, s.counters.templates_dropped),
        (1, 1),
        "{s:?}"
    );
    assert_eq!(s.counters.budget_violations, 0);
}

#[test]
fn medes_predict_prewarms_ahead_of_a_burst() {
    let p = Profile::paper();
    // modeltrain (exec 3 s, cold 1.2 s) at 20/s for a minute, from nothing.
    let t = trace(
        &(0..1200u64)
            .map(|i| (i * 50, "modeltrain"))
            .collect::<Vec<_>>(),
    );
    let c = cluster(4, 20_000.0);
    let fixed = run(&t, "fixed-10m", &c, &p).summary;
    let pred = run(&t, "medes-predict", &c, &p).summary;
    assert_eq!(pred.invocations, 1200);
    assert!(pred.counters.prewarms > 0, "{pred:?}");
    assert!(
        (pred.cold_starts as f64) < 0.6 * fixed.cold_starts as f64,
        "{} vs {}",
        pred.cold_starts,
        fixed.cold_starts
    );
    // The paper's Medes never pre-warms.
    assert_eq!(run(&t, "medes", &c, &p).summary.counters.prewarms, 0);
}

#[test]
fn bases_on_demand_and_retired_once_nothing_depends_on_them() {
    // 40 linalg invocations at once (40 sandboxes), then nothing until one at 20 minutes.
    let mut entries: Vec<(u64, &str)> = (0..40).map(|_| (0, "linalg")).collect();
    entries.push((20 * 60_000, "linalg"));
    let t = trace(&entries);
    let prof = Profile::paper();
    let cfg = cluster(2, 2000.0);
    let base_at = |o: &SimOutput, min: u64| {
        o.memory
            .iter()
            .find(|s| s.time_ms >= min * 60_000)
            .map_or(-1.0, |s| s.base_mb)
    };
    // Warm 1 minute, then deduplicated until 5 minutes idle: one base (its candidates pay for
    // it), 39 dedup sandboxes.
    let kept = run(&t, "medes-ka-1m-kd-5m-dka", &cfg, &prof);
    let retired = run(&t, "medes-ka-1m-kd-5m-dka-lazybase-retire", &cfg, &prof);
    for o in [&kept, &retired] {
        assert_eq!(o.summary.counters.bases, 1, "{}", o.policy);
        assert_eq!(o.summary.counters.dedup_ops, 39, "{}", o.policy);
        assert!(base_at(o, 3) > 0.0, "{}", o.policy);
        assert_eq!(o.summary.counters.budget_violations, 0);
    }
    // The prototype keeps its base for the run; retired, it goes once its dedup sandboxes
    // are gone (keep-dedup) and it has been idle for keep-dedup itself.
    assert!(base_at(&kept, 19) > 0.0);
    assert_eq!(base_at(&retired, 19), 0.0);
    let used_19 = |o: &SimOutput| {
        o.memory
            .iter()
            .find(|s| s.time_ms >= 19 * 60_000)
            .map_or(-1.0, |s| s.used_mb)
    };
    assert_eq!(used_19(&retired), 0.0);
    assert!(retired.summary.mean_memory_gb < kept.summary.mean_memory_gb);
    // A function with too few idle sandboxes to pay for a base never gets one, and so never
    // deduplicates: its sandboxes stay warm until keep-dedup.
    let few = trace(&[(0, "linalg"), (0, "linalg"), (20 * 60_000, "linalg")]);
    let o = run(&few, "medes-ka-1m-kd-5m-dka-lazybase-retire", &cfg, &prof);
    assert_eq!(o.summary.counters.bases, 0);
    assert_eq!(o.summary.counters.dedup_ops, 0);
    assert_eq!(o.summary.counters.purges, 2);
    let p = run(&few, "medes-ka-1m-kd-5m-dka", &cfg, &prof);
    assert_eq!(p.summary.counters.bases, 1);
}

#[test]
fn admission_bound_turns_away_waiting_invocations_only() {
    let p = Profile::paper();
    let lin = p.functions["linalg"].clone();
    let busy = (lin.cold_ms + lin.exec_ms) as u64;
    assert!(busy > 500, "{busy}");
    // Room for one linalg sandbox: the second of two simultaneous invocations waits for the
    // first to finish (a warm start then) unless the bound turns it away first.
    let t = trace(&[(0, "linalg"), (0, "linalg")]);
    let tight = cluster(1, lin.start_reserve_mb() * 1.5 / 0.95);
    let unbounded = run(&t, "fixed-10m", &tight, &p);
    assert_eq!(unbounded.summary.dropped, 0);
    assert_eq!(unbounded.summary.counters.rejected, 0);
    assert_eq!(unbounded.records.len(), 2);
    let waited = unbounded
        .records
        .iter()
        .map(|r| r.e2e_ms)
        .fold(0.0, f64::max);
    assert!(waited >= busy as f64, "{waited}");
    let mut bounded = tight;
    bounded.cluster.admission_timeout_ms = 500;
    let o = run(&t, "fixed-10m", &bounded, &p);
    assert_eq!(o.summary.dropped, 1);
    assert_eq!(o.summary.counters.rejected, 1);
    assert_eq!(o.summary.invocations, 1);
    assert_eq!(o.records.len(), 1);
    // The turned-away invocation is not in the percentiles: p99 is the served one's latency.
    assert!((o.summary.p99_ms - o.records[0].e2e_ms).abs() < 1e-9);
    assert!(o.summary.p99_ms < waited);
    // A bound longer than the wait turns nothing away.
    let mut long = tight;
    long.cluster.admission_timeout_ms = busy + 1_000;
    let o = run(&t, "fixed-10m", &long, &p);
    assert_eq!((o.summary.dropped, o.summary.counters.rejected), (0, 0));
    // With room for both, nothing waits and nothing is turned away.
    let mut roomy = cluster(1, 4000.0);
    roomy.cluster.admission_timeout_ms = 500;
    let o = run(&t, "fixed-10m", &roomy, &p);
    assert_eq!((o.summary.dropped, o.summary.counters.rejected), (0, 0));
    assert_eq!(o.summary.counters.queued, 0);
    assert_eq!(o.summary.cold_starts, 2);
    assert_eq!(ClusterConfig::paper(40.0).admission_timeout_ms, 0);
}

#[test]
fn empirical_execution_times_are_drawn_from_their_quantiles() {
    // One function called every 10 s (always warm after the first call): its execution times
    // follow the profile's quantiles (1..=101 ms, evenly), not its mean.
    let mut prof = Profile::paper();
    let f = prof.functions.get_mut("vanilla").unwrap();
    f.exec_quantiles_ms = (0..=100).map(|i| 1.0 + i as f64).collect();
    f.exec_ms = 51.0;
    let entries: Vec<(u64, &str)> = (0..2000).map(|i| (i * 10_000, "vanilla")).collect();
    let t = trace(&entries);
    let out = run(&t, "fixed-10m", &cluster(1, 10_000.0), &prof);
    let warm_ms = prof.functions["vanilla"].warm_ms;
    let mut exec: Vec<f64> = out
        .records
        .iter()
        .filter(|r| r.start == StartKind::Warm)
        .map(|r| r.e2e_ms - warm_ms)
        .collect();
    exec.sort_by(f64::total_cmp);
    let q = |p: f64| exec[(p * (exec.len() - 1) as f64) as usize];
    assert!(exec.len() > 1900, "{}", exec.len());
    assert!(q(0.0) >= 1.0 - 1e-9 && q(1.0) <= 101.0 + 1e-9, "{exec:?}");
    for (p, want) in [(0.1, 11.0), (0.5, 51.0), (0.9, 91.0)] {
        assert!((q(p) - want).abs() < 5.0, "p{p}: {} vs {want}", q(p));
    }
    // A malformed distribution is refused.
    let mut bad = Profile::paper();
    bad.functions.get_mut("vanilla").unwrap().exec_quantiles_ms = vec![5.0, 3.0];
    assert!(bad.validate().is_err());
    let mut bad = Profile::paper();
    bad.functions.get_mut("vanilla").unwrap().exec_quantiles_ms = vec![5.0];
    assert!(bad.validate().is_err());
}
