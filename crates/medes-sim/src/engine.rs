//! The discrete-event simulator: a trace replayed through a [`ClusterPolicy`] on a modelled
//! cluster.

use std::cmp::Ordering;
use std::collections::{BTreeSet, BinaryHeap, HashMap, VecDeque};

use medes_core::StartKind;
use medes_policy::Timestamp;
use medes_policy::policies::{
    ClusterPolicy, FleetView, FunctionCounts, IdleSandbox, IdleState, Verdict,
};
use medes_trace::Trace;
use rand::{Rng as _, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, LogNormal};
use serde::{Deserialize, Serialize};

use crate::output::{InvocationRecord, MemorySample, SimOutput};
use crate::profile::{FunctionProfile, Profile};

/// The modelled cluster.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ClusterConfig {
    /// Worker nodes.
    pub nodes: usize,
    /// Memory budget of each node, MB.
    pub node_mb: f64,
    /// A cold start (or pre-warm, or a new base) is placed only where it keeps the node under
    /// this share of its budget (0.95); restores may use the whole budget.
    pub admit_fraction: f64,
    /// Concurrent dedup starts per node (10).
    pub max_restores_per_node: usize,
    /// Whether an idle base whose node holds no dedup sandbox may be evicted, as the live
    /// controller does. The prototype never evicts bases (`false`, the paper's setup).
    #[serde(default)]
    pub evict_idle_bases: bool,
    /// CPU cores per node; 0 (the default): unlimited. With n cores, an invocation (and its
    /// cold or dedup start) that begins while k sandboxes of its node are busy (starting,
    /// restoring or running, itself included) takes max(1, k / n) times its profiled time: a
    /// crude processor-sharing model, fixed at the start.
    #[serde(default)]
    pub cores: usize,
    /// The live controller's memory-refresh lag, ms: with a value above 0, a cold start's
    /// reservation beyond m_W ([`crate::FunctionProfile::start_mb`]) ends this long after the
    /// sandbox is ready (the live controller re-measures running and idle sandboxes every 2 s,
    /// 1000 ms after the start on average, and never a starting one), whether or not its first
    /// invocation has ended. 0 (the
    /// default, the paper evaluation's): the reservation ends with its first invocation. As
    /// live, only the starts of a function before one of its sandboxes was measured reserve
    /// more than m_W (the controller charges later ones the function's measured m_W).
    #[serde(default)]
    pub start_hold_ms: u64,
    /// The live controller's admission bound, ms: an invocation that has waited this long
    /// since its arrival without a sandbox (warm, dedup or a new one) is turned away (the live
    /// platform answers 503 "no capacity"), counted in [`Counters::rejected`] and in the
    /// summary's `dropped`, and left out of the latency percentiles (as the live summary
    /// leaves out failed invocations). 0 (the default, the paper's setup): invocations wait
    /// without bound. The live default is 10 000 (`admission_wait_ms`).
    #[serde(default)]
    pub admission_timeout_ms: u64,
}

impl ClusterConfig {
    /// The paper's cluster: 19 worker nodes sharing a pool of `pool_gb` GB evenly.
    pub fn paper(pool_gb: f64) -> Self {
        ClusterConfig {
            nodes: 19,
            node_mb: pool_gb * 1000.0 / 19.0,
            admit_fraction: 0.95,
            max_restores_per_node: 10,
            evict_idle_bases: false,
            cores: 0,
            start_hold_ms: 0,
            admission_timeout_ms: 0,
        }
    }

    /// The whole budget, MB.
    pub fn budget_mb(&self) -> f64 {
        self.nodes as f64 * self.node_mb
    }
}

/// Simulation settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SimConfig {
    /// The cluster.
    pub cluster: ClusterConfig,
    /// Seed for execution-time draws.
    pub seed: u64,
    /// Memory sampling interval, ms.
    pub sample_ms: u64,
    /// Policy timer interval, ms.
    pub tick_ms: u64,
    /// Keep per-invocation records (the summary is computed either way).
    pub keep_records: bool,
    /// Template starts (issue 8): after a node's first real cold start of a function, the node
    /// keeps a template image of it ([`crate::FunctionProfile::template_image_mb`], charged to
    /// the node for the rest of the run, made only if it fits under the admission share), and
    /// later starts of the function on that node are template starts
    /// ([`crate::FunctionProfile::template_start_ms`]) instead of cold starts. Placement prefers
    /// nodes holding the function's template. Default false.
    #[serde(default)]
    pub templates: bool,
}

impl SimConfig {
    /// Defaults for a cluster: seed 1, memory sampled every 10 s, policy tick every second.
    pub fn new(cluster: ClusterConfig) -> Self {
        SimConfig {
            cluster,
            seed: 1,
            sample_ms: 10_000,
            tick_ms: 1_000,
            keep_records: true,
            templates: false,
        }
    }
}

/// Why a simulation cannot run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// The trace names a function the profile lacks.
    #[error("function {0:?} is in the trace but not in the profile")]
    UnknownFunction(String),
    /// A function's sandbox does not fit in one node's admission budget.
    #[error(
        "a {function:?} sandbox ({need_mb} MB) does not fit in a node ({cap_mb} MB admissible)"
    )]
    DoesNotFit {
        /// The function.
        function: String,
        /// Its footprint.
        need_mb: f64,
        /// What a node admits.
        cap_mb: f64,
    },
    /// The cluster settings are unusable.
    #[error("invalid cluster: {0}")]
    Cluster(&'static str),
    /// The profile is invalid.
    #[error("invalid profile")]
    Profile(#[from] crate::profile::ProfileError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Starting,
    Running,
    Restoring,
    Warm,
    Deduping,
    Dedup,
    Dead,
}

#[derive(Debug, Clone)]
struct Sb {
    f: usize,
    node: usize,
    st: St,
    base: bool,
    mem: f64,
    idle_since: u64,
    deadline: Option<Timestamp>,
    score: f64,
    epoch: u32,
    /// Position in its function's live list.
    pos: usize,
    /// A pre-warm: keep until this time once started.
    prewarm_until: Option<Timestamp>,
}

#[derive(Debug, Clone, Copy)]
enum Ev {
    /// A cold start, pre-warm or restore finished.
    Started(usize),
    /// An invocation in the sandbox finished.
    Finish(usize),
    /// A decision timer (sandbox, generation).
    Decide(usize, u32),
    /// A dedup operation finished (sandbox, generation).
    DedupDone(usize, u32),
    /// Pre-warm a sandbox of the function, keep it until the time.
    Prewarm(usize, u64),
    /// Policy timer and memory sample.
    Tick,
    /// A cold start's reservation beyond m_W ends.
    Release(usize),
    /// The admission bound of a waiting invocation (function, request index) expires.
    Expire(usize, u32),
}

struct Event {
    t: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Event {
    fn eq(&self, o: &Self) -> bool {
        (self.t, self.seq) == (o.t, o.seq)
    }
}
impl Eq for Event {}
impl PartialOrd for Event {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Event {
    fn cmp(&self, o: &Self) -> Ordering {
        // Min-heap on (time, seq).
        (o.t, o.seq).cmp(&(self.t, self.seq))
    }
}

#[derive(Debug, Clone, Copy)]
struct Req {
    f: usize,
    arrival: u64,
    idx: u32,
}

struct Node {
    used: f64,
    restores: usize,
    /// Template images held, MB (part of `used`).
    templates_mb: f64,
}

/// Counters besides the per-invocation records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    /// Sandboxes evicted under memory pressure.
    pub evictions: u64,
    /// Sandboxes purged by the policy (timers, decisions, unloads).
    pub purges: u64,
    /// Dedup operations completed.
    pub dedup_ops: u64,
    /// Sandboxes made bases.
    pub bases: u64,
    /// Pre-warms started.
    pub prewarms: u64,
    /// Pre-warms skipped for lack of memory.
    pub prewarms_skipped: u64,
    /// Invocations that had to wait for memory.
    pub queued: u64,
    /// Memory charges that took a node above its budget (must stay 0).
    pub budget_violations: u64,
    /// Template images made (one per node and function at most at a time).
    #[serde(default)]
    pub templates: u64,
    /// Template images dropped to make room (after every idle sandbox of their node).
    #[serde(default)]
    pub templates_dropped: u64,
    /// Invocations turned away after waiting [`ClusterConfig::admission_timeout_ms`] for
    /// memory (0 without the bound).
    #[serde(default)]
    pub rejected: u64,
}

struct Sim<'a, P: ClusterPolicy + ?Sized> {
    cfg: SimConfig,
    prof: Vec<FunctionProfile>,
    names: Vec<String>,
    policy: &'a mut P,
    now: u64,
    seq: u64,
    heap: BinaryHeap<Event>,
    sbs: Vec<Sb>,
    live: Vec<Vec<usize>>,
    /// Idle warm sandboxes (bases included) per function, by (idle_since, id).
    warm_idle: Vec<BTreeSet<(u64, usize)>>,
    /// Dedup sandboxes per function, by (idle_since, id).
    dedup_idle: Vec<BTreeSet<(u64, usize)>>,
    counts: Vec<FunctionCounts>,
    nodes: Vec<Node>,
    /// Whether node `n` holds a template of function `f`: `tmpl[n * functions + f]`.
    tmpl: Vec<bool>,
    /// Whether a sandbox of the function has been measured (its start reservation released):
    /// later starts reserve m_W only, as the live controller charges the measured m_W.
    measured: Vec<bool>,
    /// Invocations waiting for memory, per function, in arrival order.
    pending: Vec<VecDeque<Req>>,
    n_pending: usize,
    rng: ChaCha8Rng,
    exec: Vec<Option<LogNormal<f64>>>,
    records: Vec<InvocationRecord>,
    memory: Vec<MemorySample>,
    counters: Counters,
    done: usize,
    summary: crate::output::SummaryBuilder,
}

/// Runs `trace` through `policy` on the cluster, with costs from `profile`.
pub fn simulate<P: ClusterPolicy + ?Sized>(
    trace: &Trace,
    profile: &Profile,
    policy: &mut P,
    cfg: &SimConfig,
) -> Result<SimOutput, SimError> {
    profile.validate()?;
    let c = cfg.cluster;
    if c.nodes == 0 || !(c.node_mb.is_finite() && c.node_mb > 0.0) {
        return Err(SimError::Cluster("nodes and node_mb must be positive"));
    }
    if !(c.admit_fraction > 0.0 && c.admit_fraction <= 1.0) {
        return Err(SimError::Cluster("admit_fraction must be within (0, 1]"));
    }
    let names = trace.functions();
    let mut prof = Vec::with_capacity(names.len());
    for n in &names {
        let p = profile
            .functions
            .get(n)
            .ok_or_else(|| SimError::UnknownFunction(n.clone()))?;
        let cap = c.node_mb * c.admit_fraction;
        if p.start_reserve_mb() > cap {
            return Err(SimError::DoesNotFit {
                function: n.clone(),
                need_mb: p.start_reserve_mb(),
                cap_mb: cap,
            });
        }
        prof.push(p.clone());
    }
    let index: HashMap<&str, usize> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i))
        .collect();
    let exec = prof
        .iter()
        .map(|p| {
            if p.exec_cv > 0.0 && p.exec_ms > 0.0 {
                let s2 = (1.0 + p.exec_cv * p.exec_cv).ln();
                LogNormal::new(p.exec_ms.ln() - s2 / 2.0, s2.sqrt()).ok()
            } else {
                None
            }
        })
        .collect();
    let n_fn = names.len();
    let mut sim = Sim {
        cfg: *cfg,
        prof,
        names: names.clone(),
        policy,
        now: 0,
        seq: 0,
        heap: BinaryHeap::new(),
        sbs: Vec::new(),
        live: vec![Vec::new(); n_fn],
        warm_idle: vec![BTreeSet::new(); n_fn],
        dedup_idle: vec![BTreeSet::new(); n_fn],
        counts: vec![FunctionCounts::default(); n_fn],
        tmpl: vec![false; n_fn * c.nodes],
        measured: vec![false; n_fn],
        nodes: (0..c.nodes)
            .map(|_| Node {
                used: 0.0,
                restores: 0,
                templates_mb: 0.0,
            })
            .collect(),
        pending: vec![VecDeque::new(); n_fn],
        n_pending: 0,
        rng: ChaCha8Rng::seed_from_u64(cfg.seed),
        exec,
        records: Vec::with_capacity(if cfg.keep_records { trace.len() } else { 0 }),
        memory: Vec::new(),
        counters: Counters::default(),
        done: 0,
        summary: crate::output::SummaryBuilder::new(&names),
    };
    sim.summary.expect(trace.len() as u64);
    let reqs: Vec<Req> = trace
        .entries()
        .iter()
        .enumerate()
        .map(|(i, e)| Req {
            f: index[e.function.as_str()],
            arrival: e.time_ms,
            idx: i as u32,
        })
        .collect();
    sim.push(0, Ev::Tick);
    let mut next = 0usize;
    let total = reqs.len();
    let horizon = trace.duration_ms() + 24 * 3_600_000;
    loop {
        let heap_t = sim.heap.peek().map(|e| e.t);
        let arr_t = reqs.get(next).map(|r| r.arrival);
        let take_arrival = match (heap_t, arr_t) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(h), Some(a)) => a < h,
        };
        if take_arrival {
            let r = reqs[next];
            next += 1;
            sim.now = r.arrival;
            sim.arrive(r);
            continue;
        }
        if next >= total && sim.done >= total {
            break;
        }
        if next >= total && sim.now > horizon {
            // Invocations that could never be placed (only possible when pinned bases fill
            // nodes): stop; the summary counts them as dropped.
            break;
        }
        let Some(e) = sim.heap.pop() else { break };
        sim.now = e.t;
        match e.ev {
            Ev::Tick => {
                sim.policy.tick(Timestamp(sim.now));
                sim.relieve_pressure();
                for f in 0..sim.prof.len() {
                    sim.ask_prewarm(f);
                }
                if sim.now.is_multiple_of(sim.cfg.sample_ms.max(1)) {
                    sim.sample();
                }
                if next < total || sim.done < total {
                    let t = sim.now + sim.cfg.tick_ms.max(1);
                    sim.push(t, Ev::Tick);
                }
            }
            Ev::Started(s) => sim.started(s),
            Ev::Finish(s) => sim.finish(s),
            Ev::Decide(s, g) => sim.decide(s, g),
            Ev::DedupDone(s, g) => sim.dedup_done(s, g),
            Ev::Prewarm(f, until) => {
                sim.prewarm(f, until);
            }
            Ev::Release(s) => sim.release(s),
            Ev::Expire(f, idx) => sim.expire(f, idx),
        }
    }
    sim.sample();
    let duration_ms = trace.duration_ms();
    let budget = sim.cfg.cluster.budget_mb();
    let summary = std::mem::take(&mut sim.summary).finish(
        sim.policy.name(),
        &sim.memory,
        duration_ms,
        budget,
        sim.counters,
    );
    Ok(SimOutput {
        policy: sim.policy.name(),
        functions: names,
        records: sim.records,
        memory: sim.memory,
        summary,
    })
}

impl<P: ClusterPolicy + ?Sized> Sim<'_, P> {
    fn push(&mut self, t: u64, ev: Ev) {
        self.seq += 1;
        self.heap.push(Event {
            t,
            seq: self.seq,
            ev,
        });
    }

    fn view(&self) -> FleetView<'_> {
        FleetView {
            counts: &self.counts,
            budget_mb: self.cfg.cluster.budget_mb(),
            used_mb: self.nodes.iter().map(|n| n.used).sum(),
        }
    }

    fn bucket(c: &mut FunctionCounts, st: St, base: bool) -> Option<&mut usize> {
        if st == St::Dead {
            return None;
        }
        if base {
            return Some(&mut c.base);
        }
        Some(match st {
            St::Starting => &mut c.starting,
            St::Running | St::Restoring => &mut c.running,
            St::Warm => &mut c.warm,
            St::Deduping => &mut c.deduping,
            St::Dedup => &mut c.dedup,
            St::Dead => return None,
        })
    }

    /// Moves a sandbox to a new state (and base flag), keeping counts and generation.
    fn set(&mut self, s: usize, st: St, base: bool) {
        let (f, old, old_base) = (self.sbs[s].f, self.sbs[s].st, self.sbs[s].base);
        if let Some(b) = Self::bucket(&mut self.counts[f], old, old_base) {
            *b -= 1;
        }
        if let Some(b) = Self::bucket(&mut self.counts[f], st, base) {
            *b += 1;
        }
        let key = (self.sbs[s].idle_since, s);
        match old {
            St::Warm => {
                self.warm_idle[f].remove(&key);
            }
            St::Dedup => {
                self.dedup_idle[f].remove(&key);
            }
            _ => {}
        }
        match st {
            St::Warm => {
                self.warm_idle[f].insert(key);
            }
            St::Dedup => {
                self.dedup_idle[f].insert(key);
            }
            _ => {}
        }
        let sb = &mut self.sbs[s];
        sb.st = st;
        sb.base = base;
        sb.epoch = sb.epoch.wrapping_add(1);
    }

    fn charge(&mut self, s: usize, mem: f64) {
        let node = self.sbs[s].node;
        self.nodes[node].used += mem - self.sbs[s].mem;
        self.sbs[s].mem = mem;
        if self.nodes[node].used > self.cfg.cluster.node_mb + 1e-6 {
            self.counters.budget_violations += 1;
        }
    }

    fn exec_ms(&mut self, f: usize) -> f64 {
        if self.prof[f].exec_quantiles_ms.len() >= 2 {
            let u: f64 = self.rng.random();
            return self.prof[f]
                .exec_quantile(u)
                .unwrap_or(self.prof[f].exec_ms);
        }
        match &self.exec[f] {
            Some(d) => d.sample(&mut self.rng),
            None => self.prof[f].exec_ms,
        }
    }

    fn idle_view(&self, s: usize) -> IdleSandbox {
        let sb = &self.sbs[s];
        IdleSandbox {
            state: match (sb.st, sb.base) {
                (_, true) => IdleState::Base,
                (St::Dedup, _) => IdleState::Dedup,
                _ => IdleState::Warm,
            },
            idle_since: Timestamp(sb.idle_since),
            deadline: sb.deadline,
            score: sb.score,
            blacklisted: false,
            dependents: if sb.base { self.dependents(s) } else { 0 },
        }
    }

    /// A base's dependents: its function's sandboxes that are deduplicated, being deduplicated
    /// or being restored, anywhere (a dedup sandbox may use a base on another node).
    fn dependents(&self, s: usize) -> usize {
        let f = self.sbs[s].f;
        self.live[f]
            .iter()
            .filter(|&&o| matches!(self.sbs[o].st, St::Dedup | St::Deduping | St::Restoring))
            .count()
    }

    fn schedule_decision(&mut self, s: usize) {
        let (f, epoch) = (self.sbs[s].f, self.sbs[s].epoch);
        let iv = self.idle_view(s);
        if let Some(t) = self.policy.next_decision(f, &iv, Timestamp(self.now)) {
            let t = t.0.max(self.now);
            self.push(t, Ev::Decide(s, epoch));
        }
    }

    fn kill(&mut self, s: usize) {
        let f = self.sbs[s].f;
        self.charge(s, 0.0);
        self.set(s, St::Dead, false);
        let i = self.sbs[s].pos;
        if self.live[f].get(i) == Some(&s) {
            self.live[f].swap_remove(i);
            if let Some(&moved) = self.live[f].get(i) {
                self.sbs[moved].pos = i;
            }
        }
    }

    fn new_sandbox(&mut self, f: usize, node: usize, prewarm_until: Option<Timestamp>) -> usize {
        let s = self.sbs.len();
        self.sbs.push(Sb {
            f,
            node,
            st: St::Dead,
            base: false,
            mem: 0.0,
            idle_since: self.now,
            deadline: None,
            score: 0.0,
            epoch: 0,
            pos: self.live[f].len(),
            prewarm_until,
        });
        self.set(s, St::Starting, false);
        let m = self.start_need(f);
        self.charge(s, m);
        self.live[f].push(s);
        s
    }

    /// What a new sandbox of `f` reserves: [`FunctionProfile::start_reserve_mb`] until a
    /// sandbox of `f` has been measured, m_W after (the live controller charges a new sandbox
    /// the function's measured m_W, its limit only before the first measurement).
    fn start_need(&self, f: usize) -> f64 {
        if self.measured[f] {
            self.prof[f].warm_mb
        } else {
            self.prof[f].start_reserve_mb()
        }
    }

    fn has_template(&self, node: usize, f: usize) -> bool {
        self.cfg.templates && self.tmpl[node * self.prof.len() + f]
    }

    /// The start kind and latency (before CPU slowdown) of a new sandbox of `f` on `node`.
    fn new_start(&self, f: usize, node: usize) -> (StartKind, f64) {
        if self.has_template(node, f) {
            (StartKind::Template, self.prof[f].template_start_ms())
        } else {
            (StartKind::Cold, self.prof[f].cold_ms)
        }
    }

    /// After a real cold start of `f` on `node`: make the node's template of it if it has none
    /// and the image fits under the admission share.
    fn make_template(&mut self, f: usize, node: usize) {
        if !self.cfg.templates || self.has_template(node, f) {
            return;
        }
        let img = self.prof[f].template_image_mb();
        if self.admit_cap() - self.nodes[node].used < img {
            return;
        }
        self.tmpl[node * self.prof.len() + f] = true;
        self.counts[f].templates += 1;
        self.nodes[node].used += img;
        self.nodes[node].templates_mb += img;
        self.counters.templates += 1;
    }

    fn admit_cap(&self) -> f64 {
        self.cfg.cluster.node_mb * self.cfg.cluster.admit_fraction
    }

    fn evictable(&self, s: usize) -> bool {
        let sb = &self.sbs[s];
        if sb.base {
            // Like the live controller: an idle base nothing on its node depends on.
            return self.cfg.cluster.evict_idle_bases
                && sb.st == St::Warm
                && !self.live.iter().flatten().any(|&o| {
                    self.sbs[o].node == sb.node
                        && matches!(self.sbs[o].st, St::Dedup | St::Deduping | St::Restoring)
                });
        }
        matches!(sb.st, St::Warm | St::Dedup)
    }

    /// Idle evictable sandboxes (optionally of one node), in the policy's eviction order.
    fn victims(&self, node: Option<usize>, exclude: Option<usize>) -> Vec<(f64, u64, usize)> {
        let view = self.view();
        let now = Timestamp(self.now);
        let mut v: Vec<(f64, u64, usize)> = self
            .live
            .iter()
            .flatten()
            .copied()
            .filter(|&s| {
                Some(s) != exclude
                    && self.evictable(s)
                    && node.is_none_or(|n| self.sbs[s].node == n)
            })
            .map(|s| {
                let iv = self.idle_view(s);
                let r = self.policy.evict_rank(self.sbs[s].f, &iv, &view, now);
                (r, self.sbs[s].idle_since, s)
            })
            .collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        v
    }

    fn evict(&mut self, s: usize, rank: f64) {
        self.counters.evictions += 1;
        self.policy.on_evicted(self.sbs[s].f, rank);
        self.kill(s);
    }

    /// Frees `need` MB under `limit` on `node` by evicting idle sandboxes there; false (and
    /// nothing evicted) if even evicting all of them would not do.
    fn make_room(&mut self, node: usize, need: f64, limit: f64, exclude: Option<usize>) -> bool {
        let free = limit - self.nodes[node].used;
        if free >= need {
            return true;
        }
        let victims = self.victims(Some(node), exclude);
        let avail: f64 = victims.iter().map(|v| self.sbs[v.2].mem).sum();
        if free + avail + self.nodes[node].templates_mb < need {
            return false;
        }
        for (rank, _, s) in victims {
            if limit - self.nodes[node].used >= need {
                break;
            }
            self.evict(s, rank);
        }
        // Template images go last, largest first (made again at the next cold start there).
        while limit - self.nodes[node].used < need && self.nodes[node].templates_mb > 0.0 {
            let n = self.prof.len();
            let Some(f) = (0..n)
                .filter(|&f| self.tmpl[node * n + f])
                .max_by(|&a, &b| {
                    self.prof[a]
                        .template_image_mb()
                        .total_cmp(&self.prof[b].template_image_mb())
                })
            else {
                break;
            };
            self.drop_template(node, f);
        }
        limit - self.nodes[node].used >= need
    }

    fn drop_template(&mut self, node: usize, f: usize) {
        let n = self.prof.len();
        if !std::mem::replace(&mut self.tmpl[node * n + f], false) {
            return;
        }
        let img = self.prof[f].template_image_mb();
        self.counts[f].templates = self.counts[f].templates.saturating_sub(1);
        self.nodes[node].used -= img;
        self.nodes[node].templates_mb = (self.nodes[node].templates_mb - img).max(0.0);
        self.counters.templates_dropped += 1;
    }

    /// A node for a new sandbox of `f`, evicting if `evict`; `None` if there is none.
    fn place(&mut self, f: usize, evict: bool) -> Option<usize> {
        let need = self.start_need(f);
        let cap = self.admit_cap();
        // With templates: the node with the most free memory among those holding the
        // function's template.
        if self.cfg.templates {
            let t = self
                .nodes
                .iter()
                .enumerate()
                .filter(|(i, n)| self.has_template(*i, f) && cap - n.used >= need)
                .max_by(|a, b| {
                    (cap - a.1.used)
                        .total_cmp(&(cap - b.1.used))
                        .then(b.0.cmp(&a.0))
                })
                .map(|(i, _)| i);
            if t.is_some() {
                return t;
            }
        }
        // The node with the most free memory (the paper's rule).
        let best = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| cap - n.used >= need)
            .max_by(|a, b| {
                (cap - a.1.used)
                    .total_cmp(&(cap - b.1.used))
                    .then(b.0.cmp(&a.0))
            })
            .map(|(i, _)| i);
        if best.is_some() || !evict {
            return best;
        }
        // Evict on the node of the policy's first victim among the nodes where evicting their
        // idle sandboxes makes room (one pass to find it; only that node's victims are sorted).
        let view = self.view();
        let now = Timestamp(self.now);
        let mut idle_on = vec![0.0f64; self.nodes.len()];
        let mut ranked: Vec<(f64, u64, usize)> = Vec::new();
        for s in self.live.iter().flatten().copied() {
            if self.evictable(s) {
                idle_on[self.sbs[s].node] += self.sbs[s].mem;
                let iv = self.idle_view(s);
                let r = self.policy.evict_rank(self.sbs[s].f, &iv, &view, now);
                ranked.push((r, self.sbs[s].idle_since, s));
            }
        }
        let best = ranked
            .iter()
            .filter(|v| {
                let n = self.sbs[v.2].node;
                cap - self.nodes[n].used + idle_on[n] + self.nodes[n].templates_mb >= need
            })
            .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)))
            .map(|v| self.sbs[v.2].node)?;
        self.make_room(best, need, cap, None).then_some(best)
    }

    fn arrive(&mut self, r: Req) {
        self.policy.on_arrival(r.f, Timestamp(self.now));
        // Later arrivals do not overtake waiting ones of the same function.
        if !self.pending[r.f].is_empty() || !self.dispatch(r) {
            self.counters.queued += 1;
            self.pending[r.f].push_back(r);
            self.n_pending += 1;
            let bound = self.cfg.cluster.admission_timeout_ms;
            if bound > 0 {
                self.push(r.arrival + bound, Ev::Expire(r.f, r.idx));
            }
        }
        self.ask_prewarm(r.f);
    }

    /// Starts the pre-warms the policy asks for `f` now (those that fit without evicting).
    fn ask_prewarm(&mut self, f: usize) {
        let n = {
            let view = FleetView {
                counts: &self.counts,
                budget_mb: self.cfg.cluster.budget_mb(),
                used_mb: self.nodes.iter().map(|n| n.used).sum(),
            };
            self.policy.prewarm(f, &view, Timestamp(self.now))
        };
        for _ in 0..n {
            if !self.prewarm(f, u64::MAX) {
                break;
            }
        }
    }

    /// The CPU slowdown of work starting now on `node` (1 without a CPU model).
    fn slowdown(&self, node: usize) -> f64 {
        let cores = self.cfg.cluster.cores;
        if cores == 0 {
            return 1.0;
        }
        let busy = self
            .live
            .iter()
            .flatten()
            .filter(|&&o| {
                self.sbs[o].node == node
                    && matches!(self.sbs[o].st, St::Running | St::Starting | St::Restoring)
            })
            .count();
        (busy as f64 / cores as f64).max(1.0)
    }

    /// Records an invocation starting in `s` after `start_ms` (already slowed down); its
    /// execution is slowed down by the node's current load.
    fn record(&mut self, r: Req, s: usize, kind: StartKind, start_ms: f64) {
        let exec = self.exec_ms(r.f) * self.slowdown(self.sbs[s].node);
        let startup = (self.now - r.arrival) as f64 + start_ms;
        self.policy
            .on_start(r.f, kind, startup, Timestamp(self.now));
        let rec = InvocationRecord {
            request: r.idx,
            function: r.f as u32,
            arrival_ms: r.arrival,
            start: kind,
            startup_ms: startup,
            e2e_ms: startup + exec,
            node: self.sbs[s].node as u32,
        };
        self.summary.add(&rec);
        if self.cfg.keep_records {
            self.records.push(rec);
        }
        let fin = self.now + (start_ms + exec).ceil() as u64;
        self.push(fin, Ev::Finish(s));
    }

    /// Starts the invocation now if possible.
    fn dispatch(&mut self, r: Req) -> bool {
        let f = r.f;
        // 1. A warm sandbox (or base), most recently used first.
        let warm = self.warm_idle[f].last().map(|&(_, s)| s);
        if let Some(s) = warm {
            let base = self.sbs[s].base;
            self.set(s, St::Running, base);
            let w = self.prof[f].warm_ms * self.slowdown(self.sbs[s].node);
            self.record(r, s, StartKind::Warm, w);
            return true;
        }
        // 2. A dedup sandbox on a node with a restore slot and room.
        let dedups: Vec<usize> = self.dedup_idle[f].iter().rev().map(|&(_, s)| s).collect();
        let p = self.prof[f].clone();
        for s in dedups {
            let node = self.sbs[s].node;
            if self.nodes[node].restores >= self.cfg.cluster.max_restores_per_node {
                continue;
            }
            let need = (p.warm_mb - self.sbs[s].mem) + p.restore_mb;
            if !self.make_room(node, need, self.cfg.cluster.node_mb, Some(s)) {
                continue;
            }
            self.nodes[node].restores += 1;
            self.set(s, St::Restoring, false);
            self.charge(s, p.warm_mb + p.restore_mb);
            let d = p.dedup_ms * self.slowdown(node);
            let t = self.now + d.ceil() as u64;
            self.push(t, Ev::Started(s));
            self.record(r, s, StartKind::Dedup, d);
            return true;
        }
        // 3. A cold start.
        let Some(node) = self.place(f, true) else {
            return false;
        };
        let (kind, ms) = self.new_start(f, node);
        let s = self.new_sandbox(f, node, None);
        let c = ms * self.slowdown(node);
        let t = self.now + c.ceil() as u64;
        self.push(t, Ev::Started(s));
        self.record(r, s, kind, c);
        true
    }

    /// Retries waiting invocations, oldest first across functions; a function whose oldest
    /// waiting invocation cannot start is skipped for the rest of the pass.
    fn drain_pending(&mut self) {
        if self.n_pending == 0 {
            return;
        }
        let mut blocked = vec![false; self.pending.len()];
        loop {
            let next = self
                .pending
                .iter()
                .enumerate()
                .filter(|(f, q)| !blocked[*f] && !q.is_empty())
                .min_by_key(|(f, q)| (q.front().map_or(u64::MAX, |r| r.arrival), *f))
                .map(|(f, _)| f);
            let Some(f) = next else { break };
            let Some(r) = self.pending[f].pop_front() else {
                break;
            };
            if self.dispatch(r) {
                self.n_pending -= 1;
            } else {
                self.pending[f].push_front(r);
                blocked[f] = true;
            }
        }
    }

    fn started(&mut self, s: usize) {
        let sb = &self.sbs[s];
        match sb.st {
            St::Restoring => {
                let node = sb.node;
                self.nodes[node].restores -= 1;
                let m = self.prof[sb.f].warm_mb;
                self.charge(s, m);
                self.set(s, St::Running, false);
                self.drain_pending();
            }
            St::Starting => {
                let (f, node) = (sb.f, sb.node);
                self.make_template(f, node);
                self.started_new(s);
            }
            _ => {}
        }
    }

    /// A cold, template or pre-warm start of `s` finished.
    fn started_new(&mut self, s: usize) {
        let sb = &self.sbs[s];
        if sb.st != St::Starting {
            return;
        }
        // With a refresh lag, a reservation beyond m_W ends that long after the sandbox is
        // ready: the live controller measures running and idle sandboxes, not starting ones.
        let hold = self.cfg.cluster.start_hold_ms;
        if hold > 0 && sb.prewarm_until.is_none() && sb.mem > self.prof[sb.f].warm_mb {
            self.push(self.now + hold, Ev::Release(s));
        }
        let sb = &self.sbs[s];
        match sb.prewarm_until {
            Some(until) => {
                let m = self.prof[sb.f].warm_mb;
                self.charge(s, m);
                self.sbs[s].idle_since = self.now;
                self.sbs[s].deadline = Some(until);
                self.set(s, St::Warm, false);
                // A waiting invocation of the function takes it at once.
                let f = self.sbs[s].f;
                if let Some(r) = self.pending[f].pop_front() {
                    self.n_pending -= 1;
                    let ok = self.dispatch(r);
                    debug_assert!(ok);
                } else {
                    self.schedule_decision(s);
                }
                self.drain_pending();
            }
            None => self.set(s, St::Running, false),
        }
    }

    fn finish(&mut self, s: usize) {
        self.done += 1;
        let (f, base) = (self.sbs[s].f, self.sbs[s].base);
        // A cold start's reservation beyond m_W ends with its first invocation (with a
        // refresh lag, at the `Release` scheduled when the start began).
        if !base && self.sbs[s].mem > self.prof[f].warm_mb && self.cfg.cluster.start_hold_ms == 0 {
            let m = self.prof[f].warm_mb;
            self.charge(s, m);
            self.measured[f] = true;
        }
        let after = self.policy.on_finish(f, Timestamp(self.now));
        {
            let sb = &mut self.sbs[s];
            sb.idle_since = self.now;
            sb.deadline = after.deadline;
            sb.score = after.score;
            sb.prewarm_until = None;
        }
        self.set(s, St::Warm, base);
        if let Some((at, until)) = after.prewarm {
            self.push(at.0.max(self.now), Ev::Prewarm(f, until.0));
        }
        // A queued invocation of this function takes the sandbox at once.
        if let Some(r) = self.pending[f].pop_front() {
            self.n_pending -= 1;
            let ok = self.dispatch(r);
            debug_assert!(ok);
        } else if after.unload && !base {
            self.counters.purges += 1;
            self.kill(s);
        } else {
            self.schedule_decision(s);
        }
        self.drain_pending();
    }

    /// Turns the invocation away if it still waits for memory (the live controller's
    /// admission bound); it counts as done, with no record.
    fn expire(&mut self, f: usize, idx: u32) {
        let Some(pos) = self.pending[f].iter().position(|r| r.idx == idx) else {
            return;
        };
        self.pending[f].remove(pos);
        self.n_pending -= 1;
        self.counters.rejected += 1;
        self.done += 1;
        // As live, a waiter leaving lets the ones behind it try (another function's may fit).
        self.drain_pending();
    }

    fn release(&mut self, s: usize) {
        let sb = &self.sbs[s];
        let warm = self.prof[sb.f].warm_mb;
        if !sb.base && matches!(sb.st, St::Warm | St::Running | St::Starting) && sb.mem > warm {
            let f = sb.f;
            self.charge(s, warm);
            self.measured[f] = true;
            self.drain_pending();
        }
    }

    fn decide(&mut self, s: usize, epoch: u32) {
        let sb = &self.sbs[s];
        if sb.epoch != epoch || !matches!(sb.st, St::Warm | St::Dedup) {
            return;
        }
        let f = sb.f;
        let iv = self.idle_view(s);
        let now = Timestamp(self.now);
        let verdict = {
            let view = FleetView {
                counts: &self.counts,
                budget_mb: self.cfg.cluster.budget_mb(),
                used_mb: self.nodes.iter().map(|n| n.used).sum(),
            };
            self.policy.decide(f, &iv, &view, now)
        };
        let (st, base) = (self.sbs[s].st, self.sbs[s].base);
        match verdict {
            // A base goes only when the policy retires it and nothing depends on it.
            Verdict::Purge if !base || self.dependents(s) == 0 => {
                self.counters.purges += 1;
                self.kill(s);
                self.drain_pending();
            }
            Verdict::Dedup if st == St::Warm && !base && self.policy.dedups() => {
                self.set(s, St::Deduping, false);
                let (t, g) = (
                    self.now + self.prof[f].dedup_op_ms.ceil() as u64,
                    self.sbs[s].epoch,
                );
                self.push(t, Ev::DedupDone(s, g));
            }
            Verdict::MakeBase if st == St::Warm && !base && self.policy.dedups() => {
                let node = self.sbs[s].node;
                let extra = self.prof[f].base_extra_mb;
                if self.admit_cap() - self.nodes[node].used >= extra {
                    self.counters.bases += 1;
                    let m = self.sbs[s].mem + extra;
                    self.charge(s, m);
                    self.set(s, St::Warm, true);
                } else {
                    // No room for the page image now: ask again later.
                    self.set(s, St::Warm, false);
                }
                self.schedule_decision(s);
            }
            _ => {
                self.set(s, st, base);
                self.schedule_decision(s);
            }
        }
    }

    fn dedup_done(&mut self, s: usize, epoch: u32) {
        if self.sbs[s].epoch != epoch || self.sbs[s].st != St::Deduping {
            return;
        }
        self.counters.dedup_ops += 1;
        let m = self.prof[self.sbs[s].f].dedup_mb;
        self.charge(s, m);
        self.set(s, St::Dedup, false);
        self.schedule_decision(s);
        self.drain_pending();
    }

    /// Starts a pre-warm of `f` kept until `until` if it fits without evicting.
    fn prewarm(&mut self, f: usize, until: u64) -> bool {
        if until <= self.now {
            return false;
        }
        match self.place(f, false) {
            Some(node) => {
                self.counters.prewarms += 1;
                let (_, ms) = self.new_start(f, node);
                let s = self.new_sandbox(f, node, Some(Timestamp(until)));
                let t = self.now + ms.ceil() as u64;
                self.push(t, Ev::Started(s));
                true
            }
            None => {
                self.counters.prewarms_skipped += 1;
                false
            }
        }
    }

    /// Offers idle warm sandboxes of nodes above the policy's watermark to
    /// [`ClusterPolicy::on_pressure`], least recently used first, until the dedups under way
    /// bring the node under the watermark.
    fn relieve_pressure(&mut self) {
        let Some(w) = self.policy.pressure_watermark() else {
            return;
        };
        if !self.policy.dedups() {
            return;
        }
        let mark = w * self.cfg.cluster.node_mb;
        let mut pending_free = vec![0.0f64; self.nodes.len()];
        for s in self.live.iter().flatten().copied() {
            let sb = &self.sbs[s];
            if sb.st == St::Deduping {
                pending_free[sb.node] += self.prof[sb.f].warm_mb - self.prof[sb.f].dedup_mb;
            }
        }
        let hot: Vec<usize> = (0..self.nodes.len())
            .filter(|&n| self.nodes[n].used - pending_free[n] > mark)
            .collect();
        if hot.is_empty() {
            return;
        }
        let mut cands: Vec<(u64, usize)> = self
            .live
            .iter()
            .flatten()
            .copied()
            .filter(|&s| {
                let sb = &self.sbs[s];
                sb.st == St::Warm && !sb.base && hot.contains(&sb.node)
            })
            .map(|s| (self.sbs[s].idle_since, s))
            .collect();
        cands.sort_unstable();
        let now = Timestamp(self.now);
        for (_, s) in cands {
            let (node, f) = (self.sbs[s].node, self.sbs[s].f);
            if self.nodes[node].used - pending_free[node] <= mark {
                continue;
            }
            let iv = self.idle_view(s);
            let verdict = {
                let view = FleetView {
                    counts: &self.counts,
                    budget_mb: self.cfg.cluster.budget_mb(),
                    used_mb: self.nodes.iter().map(|n| n.used).sum(),
                };
                self.policy.on_pressure(f, &iv, &view, now)
            };
            if verdict == Verdict::Dedup {
                pending_free[node] += self.prof[f].warm_mb - self.prof[f].dedup_mb;
                self.set(s, St::Deduping, false);
                let (t, e) = (
                    self.now + self.prof[f].dedup_op_ms.ceil() as u64,
                    self.sbs[s].epoch,
                );
                self.push(t, Ev::DedupDone(s, e));
            }
        }
    }

    fn sample(&mut self) {
        let mut used = 0.0;
        let mut max_node = 0.0f64;
        for n in &self.nodes {
            used += n.used;
            max_node = max_node.max(n.used);
        }
        let mut by = [0.0f64; 4]; // warm/running, dedup, base (+ templates), starting/restoring
        by[2] = self.nodes.iter().map(|n| n.templates_mb).sum();
        let mut n_dedup = 0usize;
        let mut n_live = 0usize;
        for s in self.live.iter().flatten().copied() {
            let sb = &self.sbs[s];
            n_live += 1;
            let i = match (sb.st, sb.base) {
                (_, true) => 2,
                (St::Dedup | St::Deduping, _) => {
                    n_dedup += 1;
                    1
                }
                (St::Starting | St::Restoring, _) => 3,
                _ => 0,
            };
            by[i] += sb.mem;
        }
        let _ = &self.names;
        self.memory.push(MemorySample {
            time_ms: self.now,
            used_mb: used,
            max_node_mb: max_node,
            warm_mb: by[0],
            dedup_mb: by[1],
            base_mb: by[2],
            transient_mb: by[3],
            sandboxes: n_live,
            dedup_sandboxes: n_dedup,
        });
    }
}
