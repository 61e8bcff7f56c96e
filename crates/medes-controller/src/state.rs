//! The controller's bookkeeping: every sandbox, per-action pools and their statistics, node
//! memory, checkpoint slots and queue, and the admission queue. Plain synchronous code called
//! under one short-lived lock; nothing here awaits.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use medes_agent::{BaseReply, DedupReply, NodeStatus, RestoreReply, SandboxForm};
use medes_core::{Action, ActionName, Bytes, Namespace, NodeId, SandboxId, SandboxScope};
use medes_policy::{
    Admission, ArrivalWindow, ClusterView, Counts, Decision, Event, EvictionOrder, Ewma,
    Footprints, Form, FunctionView, GreedyDualClock, Policy, Prewarm, Purpose, SandboxState,
    SandboxView, StartLatencies, StateKind, Timestamp, Victim, admit, enforce, greedy_dual_rank,
    label, live_greedy_dual_input,
};
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use crate::metrics::ActionMetrics;

/// Controller-local handle of a sandbox.
pub(crate) type Key = u64;

pub(crate) struct Sb {
    pub id: SandboxId,
    pub node: usize,
    pub action: ActionName,
    pub version: Arc<str>,
    pub generation: u64,
    pub limit: u64,
    pub state: SandboxState,
    pub form: Form,
    /// Cleared when a checkpoint or dedup failed: never made a base or dedup again.
    pub deduplicable: bool,
    /// It was a dedup sandbox when its purge began.
    pub was_dedup: bool,
    /// A checkpoint decided for it waits for a slot (it stays warm and assignable meanwhile).
    pub queued: Option<Purpose>,
    pub created: Timestamp,
    pub measured: Option<u64>,
    /// Memory charged against the node budget (transient included).
    pub charge: u64,
    /// Part of `charge` that is transient (a checkpoint image being written, a restore's m_R).
    pub transient: u64,
    /// Part of `charge` reserved for a restore's process until it is measured (released if
    /// the restore is not carried out).
    pub restore_reserved: u64,
    /// Bytes stored for it as a dedup sandbox.
    pub stored: Option<u64>,
    /// Bytes of its page image (last checkpoint).
    pub image: Option<u64>,
    /// The last dedup start's breakdown.
    pub last_restore: Option<RestoreReply>,
    /// When the controller learnt that the node has the sandbox ready.
    pub ready_at: Option<Timestamp>,
    pub next_decision: Option<Timestamp>,
    /// Greedy-Dual's `L`: its node's aging clock when it last served (0 if it never did).
    pub gd_at_use: f64,
    /// A base whose process is gone (its agent restarted) but whose pages the node keeps for
    /// the dedup sandboxes that depend on them: counted and charged as a base of its function,
    /// never assigned an invocation, purged once nothing depends on it.
    pub processless: bool,
    /// A base without process because the controller released its process on purpose
    /// (`release_base_process`): unlike a lost one it is not purged for want of dependents,
    /// only by the policy (base retirement), eviction or a new version of its action.
    pub released: bool,
}

/// Per-action pool: its sandboxes and what is measured about the function.
pub(crate) struct Pool {
    pub generation: u64,
    pub keys: Vec<Key>,
    pub metrics: Arc<ActionMetrics>,
    /// The latest definition seen (for pre-warming).
    pub action: Option<Arc<Action>>,
    pub limit: u64,
    pub arrivals: ArrivalWindow,
    pub cold_ms: Ewma,
    pub warm_ms: Ewma,
    pub dedup_ms: Ewma,
    pub exec_ms: Ewma,
    pub m_warm: Ewma,
    pub m_dedup: Ewma,
    pub m_base: Ewma,
    /// m_R: the page image until a dedup start was measured, then the measured transient.
    pub m_restore: Ewma,
    /// `m_restore` holds measured values (the agent's [`RestoreReply::transient_bytes`]).
    pub m_restore_measured: bool,
}

/// A sandbox handed to an invocation.
#[derive(Debug)]
pub(crate) enum Grant {
    /// An initialised sandbox to run in.
    Warm {
        key: Key,
        id: SandboxId,
        node: usize,
    },
    /// Memory reserved for a new sandbox; evict `victims` (already out of the books) first.
    Cold {
        key: Key,
        id: SandboxId,
        node: usize,
        victims: Vec<SandboxId>,
    },
    /// A dedup sandbox to restore (its restore memory reserved); evict `victims` first.
    Restore {
        key: Key,
        id: SandboxId,
        node: usize,
        victims: Vec<SandboxId>,
    },
}

pub(crate) struct Waiter {
    pub ticket: u64,
    pub action: ActionName,
    pub version: Arc<str>,
    pub need: u64,
    pub concurrency: u32,
    /// Whether a dedup sandbox may serve it (not after a failed dedup start).
    pub allow_restore: bool,
    pub tx: oneshot::Sender<Grant>,
}

/// A sandbox to destroy in the background: its charge stays on the books until it is gone.
pub(crate) struct PurgeJob {
    pub key: Key,
    pub node: usize,
    pub id: SandboxId,
}

/// A checkpoint to carry out in the background (its slot and transient memory taken).
pub(crate) struct CheckpointJob {
    pub key: Key,
    pub node: usize,
    pub id: SandboxId,
    pub action: ActionName,
    pub purpose: Purpose,
}

/// A pre-warm start to carry out (memory reserved, victims out of the books).
pub(crate) struct PrewarmJob {
    pub key: Key,
    pub node: usize,
    pub id: SandboxId,
    pub action: Arc<Action>,
    pub victims: Vec<SandboxId>,
}

/// Work produced under the lock, carried out outside it.
#[derive(Default)]
pub(crate) struct Work {
    pub purges: Vec<PurgeJob>,
    pub checkpoints: Vec<CheckpointJob>,
    pub prewarms: Vec<PrewarmJob>,
}

impl Work {
    pub(crate) fn is_empty(&self) -> bool {
        self.purges.is_empty() && self.checkpoints.is_empty() && self.prewarms.is_empty()
    }
}

/// How a checkpoint ended.
pub(crate) enum CheckpointOutcome {
    Base(BaseReply),
    Dedup(DedupReply),
    /// Failed; `alive`: the sandbox is still there, warm; `None`: unknown (purge it).
    Failed {
        alive: Option<bool>,
    },
}

/// Settings of the bookkeeping (from the controller's config).
pub(crate) struct Limits {
    pub max_checkpoints: usize,
    pub max_restores: usize,
    pub idle_period_ms: u64,
    pub dedup_enabled: bool,
    /// Whether idle bases take invocations ([`crate::ControllerConfig::bases_serve`]).
    pub bases_serve: bool,
    /// Template starts are on ([`crate::ControllerConfig::template_starts`]): Greedy-Dual
    /// eviction is then least recently used (`medes_policy::greedy_dual_rank`).
    pub template_starts: bool,
    /// A base's process is ended once its image is taken
    /// ([`medes_policy::PolicySettings::release_base_process`]).
    pub release_base_process: bool,
}

pub(crate) struct State {
    pub sbs: HashMap<Key, Sb>,
    pub pools: HashMap<ActionName, Pool>,
    pub budgets: Vec<u64>,
    pub used: Vec<u64>,
    pub checkpoints: Vec<usize>,
    pub restores: Vec<usize>,
    pub ckpt_queue: VecDeque<(Key, Purpose)>,
    pub waiters: VecDeque<Waiter>,
    pub policy: Box<dyn Policy>,
    pub limits: Limits,
    pub next_key: Key,
    pub next_ticket: u64,
    pub id_prefix: String,
    pub evictions: u64,
    pub next_tick: Option<Timestamp>,
    pub stats: crate::DedupStats,
    /// Per node: memory the node holds for nothing in these books (bases whose process is gone,
    /// e.g. kept by an earlier agent, while dedup sandboxes depend on them), from its status.
    pub unowned: Vec<u64>,
    /// Per node: whether placement may use it (issue 7 phase 2: false once its agent missed
    /// its heartbeats, until it is heard from again).
    pub alive: Vec<bool>,
    /// Per node: idle sandboxes the books dropped when the node was marked dead
    /// ([`State::node_down`]), so that the node's return can re-adopt those it still holds
    /// ([`State::readopt`]); emptied by each reconciliation of the node.
    pub lost: Vec<HashMap<SandboxId, Lost>>,
    /// Per node: placement skips it until then (its agent refused a connection: it is probably
    /// down, not yet found dead by its heartbeats).
    pub shunned: Vec<Timestamp>,
    /// Ready templates (issue 8) by node and action: each is its function's first base on its
    /// node, counted as a base in the policy's views (`template.rs`).
    pub template_bases: std::collections::HashSet<(usize, ActionName)>,
    /// Per node: Greedy-Dual's aging clock (used when the policy asks for that eviction
    /// order, [`medes_policy::EvictionOrder::GreedyDual`]; kept across policy changes).
    pub gd_clocks: Vec<GreedyDualClock>,
}

/// What the books knew of an idle sandbox they dropped with its dead node.
#[derive(Debug, Clone)]
pub(crate) struct Lost {
    pub action: ActionName,
    pub version: Arc<str>,
    /// The action's pool generation then: a changed action is not re-adopted.
    pub generation: u64,
    pub deduplicable: bool,
    pub image: Option<u64>,
}

/// What a node's return does with a sandbox it holds that the books do not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Readopt {
    /// Back in the books (warm, base or dedup, as the node reports it).
    Adopted,
    /// A base whose process is gone and whose function the books cannot tell: left to the
    /// node (charged as unowned; it retires once no dedup sandbox depends on it).
    Left,
    /// Unknown, of a changed action, or a warm one without process: purge it.
    Purge,
}

/// Whether the node holds (or is making) a dedup image for the sandbox, which may reference
/// base pages; a dedup sandbox being purged still counts until its purge is done.
fn is_dedup_like(sb: &Sb) -> bool {
    (sb.state == SandboxState::Purging && sb.was_dedup)
        || matches!(
            sb.state,
            SandboxState::Dedup { .. }
                | SandboxState::Restoring
                | SandboxState::Checkpointing {
                    purpose: Purpose::Dedup,
                    ..
                }
        )
        || (sb.queued == Some(Purpose::Dedup) && sb.state.kind() == StateKind::Warm)
}

fn count(c: &mut Counts, sb: &Sb) {
    match (sb.queued, sb.state) {
        (Some(Purpose::Base), SandboxState::Warm { .. }) => c.base += 1,
        (Some(Purpose::Dedup), SandboxState::Warm { .. }) => c.dedup += 1,
        (_, s) => c.add(s, sb.form),
    }
}

impl State {
    pub(crate) fn new(
        budgets: Vec<u64>,
        policy: Box<dyn Policy>,
        limits: Limits,
        id_prefix: String,
    ) -> Self {
        let n = budgets.len();
        State {
            sbs: HashMap::new(),
            pools: HashMap::new(),
            used: vec![0; n],
            checkpoints: vec![0; n],
            restores: vec![0; n],
            ckpt_queue: VecDeque::new(),
            budgets,
            waiters: VecDeque::new(),
            policy,
            limits,
            next_key: 1,
            next_ticket: 1,
            id_prefix,
            evictions: 0,
            next_tick: None,
            stats: crate::DedupStats::default(),
            unowned: vec![0; n],
            alive: vec![true; n],
            lost: vec![HashMap::new(); n],
            shunned: vec![Timestamp(0); n],
            template_bases: std::collections::HashSet::new(),
            gd_clocks: vec![GreedyDualClock::default(); n],
        }
    }

    /// A new node with `budget` (issue 7); returns the number of nodes.
    pub(crate) fn add_node(&mut self, budget: u64) -> usize {
        self.budgets.push(budget);
        self.used.push(0);
        self.checkpoints.push(0);
        self.restores.push(0);
        self.unowned.push(0);
        self.alive.push(true);
        self.lost.push(HashMap::new());
        self.shunned.push(Timestamp(0));
        self.gd_clocks.push(GreedyDualClock::default());
        self.budgets.len()
    }

    pub(crate) fn pool(&mut self, action: &ActionName) -> &mut Pool {
        self.pools.entry(action.clone()).or_insert_with(|| Pool {
            generation: 0,
            keys: Vec::new(),
            metrics: Arc::new(ActionMetrics::new(action)),
            action: None,
            limit: 0,
            arrivals: ArrivalWindow::default(),
            cold_ms: Ewma::default(),
            warm_ms: Ewma::default(),
            dedup_ms: Ewma::default(),
            exec_ms: Ewma::default(),
            m_warm: Ewma::default(),
            m_dedup: Ewma::default(),
            m_base: Ewma::default(),
            m_restore: Ewma::default(),
            m_restore_measured: false,
        })
    }

    // ---- views -------------------------------------------------------------------------

    fn counts(&self, action: &ActionName, node: Option<usize>) -> Counts {
        let mut c = Counts::default();
        let Some(pool) = self.pools.get(action) else {
            return c;
        };
        for k in &pool.keys {
            if let Some(sb) = self.sbs.get(k)
                && node.is_none_or(|n| n == sb.node)
            {
                count(&mut c, sb);
            }
        }
        c
    }

    /// Dedup sandboxes (in progress included) of a namespace on a node: the sandboxes that may
    /// reference the pages of the namespace's bases there (the default dedup domain).
    fn dependents(&self, node: usize, ns: &Namespace) -> usize {
        self.sbs
            .values()
            .filter(|s| s.node == node && &s.action.namespace == ns && is_dedup_like(s))
            .count()
    }

    pub(crate) fn function_view(&self, action: &ActionName, now: Timestamp) -> FunctionView {
        let mut fv = FunctionView::new(action.clone(), Bytes(0));
        fv.counts = self.counts(action, None);
        fv.counts.base += self.template_bases_of(action, None);
        if let Some(p) = self.pools.get(action) {
            let bytes = |e: &Ewma| e.get().map(|v| Bytes(v as u64));
            fv.memory_limit = Bytes(p.limit);
            fv.arrivals = p.arrivals.summary(now);
            fv.latency = StartLatencies {
                cold_ms: p.cold_ms.get(),
                warm_ms: p.warm_ms.get(),
                dedup_ms: p.dedup_ms.get(),
            };
            fv.exec_ms = p.exec_ms.get();
            fv.footprint = Footprints {
                warm: bytes(&p.m_warm),
                dedup: bytes(&p.m_dedup),
                base: bytes(&p.m_base),
                restore: bytes(&p.m_restore),
            };
        }
        fv
    }

    fn sandbox_view(&self, sb: &Sb) -> SandboxView {
        let mut v = SandboxView::new(sb.state, sb.created, Bytes(sb.charge));
        v.form = sb.form;
        v.deduplicable = sb.deduplicable;
        if sb.form == Form::Base {
            v.dependents = self.dependents(sb.node, &sb.action.namespace);
        }
        v.local = self.counts(&sb.action, Some(sb.node));
        v.local.base += self.template_bases_of(&sb.action, Some(sb.node));
        v
    }

    pub(crate) fn cluster_view(&self, now: Timestamp) -> ClusterView {
        ClusterView {
            nodes: self.budgets.len(),
            budget: Bytes(self.budgets.iter().sum()),
            used: Bytes(self.used.iter().sum()),
            peak_rate_sum: self
                .pools
                .values()
                .map(|p| p.arrivals.summary(now).peak_rate())
                .sum(),
            functions: self.pools.len(),
        }
    }

    fn next_decision_of(&self, key: Key, now: Timestamp) -> Option<Timestamp> {
        let sb = self.sbs.get(&key)?;
        let fv = self.function_view(&sb.action, now);
        let view = self.sandbox_view(sb);
        self.policy.next_decision(&fv, &view, now)
    }

    fn rearm(&mut self, key: Key, now: Timestamp) {
        let next = self.next_decision_of(key, now);
        if let Some(sb) = self.sbs.get_mut(&key) {
            sb.next_decision = next;
        }
    }

    // ---- arrivals and assignment --------------------------------------------------------

    /// An invocation of `action` arrived: counts it and tells the policy.
    pub(crate) fn arrival(&mut self, action: &Arc<Action>, now: Timestamp) {
        let need = Bytes::mib(action.limits.memory_mb).0;
        let pool = self.pool(&action.name);
        pool.arrivals.record(now);
        pool.limit = need;
        if pool
            .action
            .as_ref()
            .is_none_or(|a| a.version != action.version)
        {
            pool.action = Some(action.clone());
        }
        let fv = self.function_view(&action.name, now);
        self.policy.on_arrival(&fv, now);
    }

    /// Assigns an initialised sandbox of `action@version` if one can take another invocation
    /// (a running one with spare concurrency first, else the most recently used warm one, a
    /// base included), else a dedup sandbox whose restore fits (if `allow_restore`).
    pub(crate) fn try_assign(
        &mut self,
        action: &ActionName,
        version: &str,
        concurrency: u32,
        allow_restore: bool,
        now: Timestamp,
    ) -> Option<Grant> {
        let pool = self.pools.get(action)?;
        let mut best: Option<(Key, (u8, Timestamp))> = None;
        let mut dedups: Vec<(Timestamp, Key)> = Vec::new();
        for &k in &pool.keys {
            let Some(sb) = self.sbs.get(&k) else { continue };
            if sb.generation != pool.generation
                || &*sb.version != version
                || !self.usable(sb.node, now)
            {
                continue;
            }
            if let SandboxState::Dedup { since, .. } = sb.state {
                dedups.push((since, k));
                continue;
            }
            if !sb.state.can_assign(concurrency)
                || sb.processless
                || (!self.limits.bases_serve && sb.form == Form::Base)
            {
                continue;
            }
            let rank = match sb.state {
                SandboxState::Running { .. } => (1, Timestamp(0)),
                SandboxState::Warm { idle_since } => (0, idle_since),
                _ => continue,
            };
            if best.is_none_or(|(_, r)| rank > r) {
                best = Some((k, rank));
            }
        }
        if let Some((key, _)) = best {
            let sb = self.sbs.get_mut(&key)?;
            sb.state = sb
                .state
                .apply(Event::Assign { concurrency }, Timestamp(0))
                .ok()?;
            sb.next_decision = None;
            sb.queued = None;
            return Some(Grant::Warm {
                key,
                id: sb.id.clone(),
                node: sb.node,
            });
        }
        if !allow_restore {
            return None;
        }
        // Most recently deduplicated first.
        dedups.sort_by(|a, b| b.cmp(a));
        for (_, key) in dedups {
            if let Some(g) = self.try_restore(key, now) {
                return Some(g);
            }
        }
        None
    }

    /// Reserves a restore of dedup sandbox `key`: a concurrent-restore slot on its node and
    /// memory for the restored process (its limit) plus the transient m_R (its page image).
    fn try_restore(&mut self, key: Key, now: Timestamp) -> Option<Grant> {
        let sb = self.sbs.get(&key)?;
        let node = sb.node;
        if self.restores[node] >= self.limits.max_restores {
            return None;
        }
        let m_r = self.restore_transient(sb);
        // The restored process: the function's measured warm footprint, as a cold start of a
        // measured function is charged (its limit only if none was measured), until the next
        // status report measures it. Reserving the limit (as until 2026-11-27) held 268-402
        // MiB per dedup start of the suite for ~2 s, several at once in a burst: in the
        // `vtrace2` live run that evicted 127 sandboxes where 20 were needed.
        let process = self.start_charge(&sb.action, sb.limit);
        let need = process.saturating_add(m_r);
        let victims = self.make_room(node, need, Some(key), now)?;
        let victims = self.evict(victims);
        let sb = self.sbs.get_mut(&key)?;
        sb.state = sb.state.apply(Event::Restore, now).ok()?;
        sb.next_decision = None;
        sb.charge += need;
        sb.transient = m_r;
        sb.restore_reserved = process;
        self.used[node] += need;
        self.restores[node] += 1;
        Some(Grant::Restore {
            key,
            id: sb.id.clone(),
            node,
            victims,
        })
    }

    /// Idle sandboxes of `node` that may be evicted: warm ones, dedup ones and bases without
    /// dependents, ranked in the policy's order ([`Policy::eviction_order`]: its own rank, or
    /// Greedy-Dual with the node's clock), least recently used first among equal ranks.
    fn victims(&self, node: usize, exclude: Option<Key>, now: Timestamp) -> Vec<Victim<Key>> {
        let mut views: HashMap<&ActionName, FunctionView> = HashMap::new();
        let order = self.policy.eviction_order();
        let mut out = Vec::new();
        let mut used = Vec::new();
        for (&k, s) in &self.sbs {
            if s.node != node || Some(k) == exclude {
                continue;
            }
            let idle = match s.state {
                SandboxState::Warm { .. } => {
                    s.form == Form::Plain || self.dependents(node, &s.action.namespace) == 0
                }
                SandboxState::Dedup { .. } => true,
                _ => false,
            };
            if !idle {
                continue;
            }
            let fv = views
                .entry(&s.action)
                .or_insert_with(|| self.function_view(&s.action, now));
            let view = self.sandbox_view(s);
            let rank = match order {
                EvictionOrder::GreedyDual => greedy_dual_rank(&live_greedy_dual_input(
                    fv,
                    &view,
                    s.gd_at_use,
                    self.limits.template_starts,
                    now,
                )),
                _ => self.policy.eviction_rank(fv, &view, now),
            };
            used.push((s.state.last_used().unwrap_or(now), k));
            out.push(Victim {
                key: k,
                rank,
                memory: Bytes(s.charge),
            });
        }
        // `choose_victims` sorts stably: equal ranks go least recently used first.
        let mut idx: Vec<usize> = (0..out.len()).collect();
        idx.sort_by_key(|&i| used[i]);
        idx.into_iter().map(|i| out[i]).collect()
    }

    /// Victims (with their eviction rank) to evict on `node` so that `need` more fits; `None`
    /// if it cannot fit now.
    fn make_room(
        &self,
        node: usize,
        need: u64,
        exclude: Option<Key>,
        now: Timestamp,
    ) -> Option<Vec<(Key, f64)>> {
        let budget = Bytes(self.budgets[node]);
        let used = Bytes(self.used[node]);
        if used.0.saturating_add(need) <= budget.0 {
            return Some(Vec::new());
        }
        let candidates = self.victims(node, exclude, now);
        let ranks: HashMap<Key, f64> = candidates.iter().map(|v| (v.key, v.rank)).collect();
        match admit(budget, used, Bytes(need), candidates) {
            Admission::Fits => Some(Vec::new()),
            Admission::Evict(v) => Some(
                v.into_iter()
                    .map(|k| (k, ranks.get(&k).copied().unwrap_or(0.0)))
                    .collect(),
            ),
            Admission::Wait | Admission::Reject => None,
        }
    }

    /// Takes victims out of the books (with Greedy-Dual, the node's clock moves up to each
    /// victim's rank); returns their ids for the caller to purge.
    fn evict(&mut self, victims: Vec<(Key, f64)>) -> Vec<SandboxId> {
        let gd = self.policy.eviction_order() == EvictionOrder::GreedyDual;
        let mut ids = Vec::with_capacity(victims.len());
        for (k, rank) in victims {
            if let Some(sb) = self.take(k) {
                debug!(sandbox = %sb.id, action = %sb.action, state = %label(sb.state, sb.form), rank, "evicting idle sandbox");
                if gd && let Some(c) = self.gd_clocks.get_mut(sb.node) {
                    c.on_evicted(rank);
                }
                self.evictions += 1;
                ids.push(sb.id);
            }
        }
        ids
    }

    /// Reserves memory for a new sandbox on the node with the most room, evicting idle
    /// sandboxes (in the policy's order) if needed; `None` if no node can make room now.
    pub(crate) fn try_admit(
        &mut self,
        action: &ActionName,
        version: &Arc<str>,
        need: u64,
        now: Timestamp,
    ) -> Option<Grant> {
        let (key, id, node, victims) = self.admit_new(action, version, need, true, now)?;
        Some(Grant::Cold {
            key,
            id,
            node,
            victims,
        })
    }

    /// What a new sandbox of `action` (memory limit `limit`) is charged until the node's next
    /// memory report measures it: the function's measured warm footprint (the EWMA of m_W)
    /// when one is known, never above the limit; the limit for its first sandbox.
    fn start_charge(&self, action: &ActionName, limit: u64) -> u64 {
        self.pools
            .get(action)
            .and_then(|p| p.m_warm.get())
            .filter(|m| m.is_finite() && *m >= 1.0)
            .map_or(limit, |m| (m as u64).min(limit))
    }

    /// Reserves a new sandbox's memory on the node with the most room (evicting idle
    /// sandboxes there if `evict`, else only where it fits as things are).
    fn admit_new(
        &mut self,
        action: &ActionName,
        version: &Arc<str>,
        limit: u64,
        evict: bool,
        now: Timestamp,
    ) -> Option<(Key, SandboxId, usize, Vec<SandboxId>)> {
        let need = self.start_charge(action, limit);
        let mut choice: Option<(usize, Vec<(Key, f64)>)> = None;
        for node in 0..self.budgets.len() {
            if !self.usable(node, now) {
                continue;
            }
            let Some(v) = self.make_room(node, need, None, now) else {
                continue;
            };
            if !evict && !v.is_empty() {
                continue;
            }
            let better = match &choice {
                None => true,
                Some((n, cv)) => {
                    if v.is_empty() {
                        // The most free budget (budgets may differ per node).
                        let free = |i: usize| self.budgets[i].saturating_sub(self.used[i]);
                        !cv.is_empty() || free(node) > free(*n)
                    } else {
                        !cv.is_empty() && v.len() < cv.len()
                    }
                }
            };
            if better {
                choice = Some((node, v));
            }
        }
        let (node, victim_keys) = choice?;
        let victims = self.evict(victim_keys);
        let key = self.next_key;
        self.next_key += 1;
        let id = SandboxId(format!("{}-{key}", self.id_prefix));
        let generation = self.pool(action).generation;
        self.pool(action).keys.push(key);
        self.used[node] += need;
        self.sbs.insert(
            key,
            Sb {
                id: id.clone(),
                node,
                action: action.clone(),
                version: version.clone(),
                generation,
                limit,
                state: SandboxState::Starting,
                form: Form::Plain,
                deduplicable: true,
                was_dedup: false,
                queued: None,
                created: now,
                measured: None,
                charge: need,
                transient: 0,
                restore_reserved: 0,
                stored: None,
                image: None,
                last_restore: None,
                ready_at: None,
                next_decision: None,
                gd_at_use: 0.0,
                processless: false,
                released: false,
            },
        );
        Some((key, id, node, victims))
    }

    /// Whether placement may use `node` at `now` (alive and not shunned).
    pub(crate) fn usable(&self, node: usize, now: Timestamp) -> bool {
        self.alive.get(node).copied().unwrap_or(false)
            && self.shunned.get(node).is_none_or(|&until| until <= now)
    }

    /// Placement skips `node` until `until` (issue 7: its agent refused a connection).
    pub(crate) fn shun(&mut self, node: usize, until: Timestamp) {
        if let Some(s) = self.shunned.get_mut(node) {
            *s = (*s).max(until);
        }
    }

    // ---- removal -----------------------------------------------------------------------

    /// Marks `node` dead (issue 7 phase 2): nothing is placed on it any more, and its idle
    /// sandboxes (warm, bases, dedup, being purged) leave the books, their memory released.
    /// Sandboxes with work in flight there stay until that work fails. Returns how many left
    /// and the memory they were charged.
    pub(crate) fn node_down(&mut self, node: usize) -> (usize, u64) {
        let Some(alive) = self.alive.get_mut(node) else {
            return (0, 0);
        };
        *alive = false;
        let keys: Vec<Key> = self
            .sbs
            .iter()
            .filter(|(_, s)| {
                s.node == node
                    && matches!(
                        s.state,
                        SandboxState::Warm { .. }
                            | SandboxState::Dedup { .. }
                            | SandboxState::Purging
                    )
            })
            .map(|(&k, _)| k)
            .collect();
        let mut freed = 0;
        for k in &keys {
            if let Some(sb) = self.take(*k) {
                freed += sb.charge;
                if sb.state != SandboxState::Purging {
                    self.lost[node].insert(
                        sb.id.clone(),
                        Lost {
                            action: sb.action.clone(),
                            version: sb.version.clone(),
                            generation: sb.generation,
                            deduplicable: sb.deduplicable,
                            image: sb.image,
                        },
                    );
                }
            }
        }
        self.used[node] = self.used[node].saturating_sub(self.unowned[node]);
        self.unowned[node] = 0;
        (keys.len(), freed)
    }

    /// Idle sandboxes of `node` created at or before `before` whose ids are not in `held`
    /// (the node no longer has them, e.g. its agent restarted) leave the books; returns how
    /// many.
    pub(crate) fn forget_missing(
        &mut self,
        node: usize,
        held: &std::collections::HashSet<SandboxId>,
        before: Timestamp,
    ) -> usize {
        let keys: Vec<Key> = self
            .sbs
            .iter()
            .filter(|(_, s)| {
                s.node == node
                    && s.created <= before
                    && !held.contains(&s.id)
                    && matches!(
                        s.state,
                        SandboxState::Warm { .. } | SandboxState::Dedup { .. }
                    )
            })
            .map(|(&k, _)| k)
            .collect();
        for k in &keys {
            self.take(*k);
        }
        keys.len()
    }

    /// Removes a sandbox from the books (its memory is free again) and returns it. When it was
    /// the last dedup sandbox of its namespace on its node, that namespace's bases there are
    /// decided about again (they may retire).
    pub(crate) fn take(&mut self, key: Key) -> Option<Sb> {
        let sb = self.sbs.remove(&key)?;
        self.used[sb.node] = self.used[sb.node].saturating_sub(sb.charge);
        match sb.state {
            SandboxState::Restoring => {
                self.restores[sb.node] = self.restores[sb.node].saturating_sub(1)
            }
            SandboxState::Checkpointing { .. } => {
                self.checkpoints[sb.node] = self.checkpoints[sb.node].saturating_sub(1)
            }
            _ => {}
        }
        if let Some(pool) = self.pools.get_mut(&sb.action) {
            pool.keys.retain(|&k| k != key);
        }
        if is_dedup_like(&sb) {
            self.release_bases(sb.node, &sb.action.namespace);
        }
        Some(sb)
    }

    fn release_bases(&mut self, node: usize, ns: &Namespace) {
        if self.dependents(node, ns) > 0 {
            return;
        }
        for s in self.sbs.values_mut() {
            if s.node == node
                && &s.action.namespace == ns
                && s.form == Form::Base
                && s.state.kind() == StateKind::Warm
            {
                s.next_decision = Some(Timestamp(0));
            }
        }
    }

    /// Marks a sandbox for destruction: never assigned again, still charged until destroyed.
    pub(crate) fn start_purge(&mut self, key: Key) -> Option<PurgeJob> {
        let sb = self.sbs.get_mut(&key)?;
        let was = sb.state;
        let held_dedup = is_dedup_like(sb);
        sb.state = sb.state.apply(Event::Purge, Timestamp(0)).ok()?;
        sb.was_dedup = held_dedup;
        sb.next_decision = None;
        sb.queued = None;
        let node = sb.node;
        let job = PurgeJob {
            key,
            node,
            id: sb.id.clone(),
        };
        let action = sb.action.clone();
        match was {
            SandboxState::Restoring => self.restores[node] = self.restores[node].saturating_sub(1),
            SandboxState::Checkpointing { .. } => {
                self.checkpoints[node] = self.checkpoints[node].saturating_sub(1)
            }
            _ => {}
        }
        if let Some(pool) = self.pools.get_mut(&action) {
            pool.keys.retain(|&k| k != key);
        }
        Some(job)
    }

    /// The agent refused to purge a base because dedup sandboxes it does not know of here (another
    /// dedup domain setting) depend on it: it is a base again, decided about at its next time.
    pub(crate) fn purge_refused(&mut self, key: Key, now: Timestamp) {
        let Some(sb) = self.sbs.get_mut(&key) else {
            return;
        };
        sb.state = SandboxState::Warm { idle_since: now };
        let action = sb.action.clone();
        self.pool(&action).keys.push(key);
        self.rearm(key, now);
    }

    // ---- lifecycle events --------------------------------------------------------------

    /// The cold start of `key` finished; it now serves its first invocation.
    pub(crate) fn started(&mut self, key: Key, now: Timestamp, cold_ms: f64) {
        if let Some(sb) = self.sbs.get_mut(&key) {
            sb.ready_at = Some(now);
            match sb.state.apply(Event::Started, Timestamp(0)) {
                Ok(s) => sb.state = s,
                Err(e) => warn!(sandbox = %sb.id, error = %e, "unexpected start"),
            }
            let action = sb.action.clone();
            self.pool(&action).cold_ms.add(cold_ms);
        }
    }

    /// The template start of `key` finished (issue 8); it now serves its first invocation.
    /// Its latency is not a cold start's (not added to the pool's cold-start estimate).
    pub(crate) fn template_started(&mut self, key: Key, now: Timestamp) {
        if let Some(sb) = self.sbs.get_mut(&key) {
            sb.ready_at = Some(now);
            match sb.state.apply(Event::Started, Timestamp(0)) {
                Ok(s) => sb.state = s,
                Err(e) => warn!(sandbox = %sb.id, error = %e, "unexpected template start"),
            }
        }
    }

    /// A pre-warmed sandbox is ready and idle.
    pub(crate) fn prewarmed(&mut self, key: Key, now: Timestamp) {
        if let Some(sb) = self.sbs.get_mut(&key) {
            sb.ready_at = Some(now);
            match sb.state.apply(Event::Ready, now) {
                Ok(s) => sb.state = s,
                Err(e) => warn!(sandbox = %sb.id, error = %e, "unexpected pre-warm"),
            }
            self.rearm(key, now);
        }
    }

    /// A warm start was served (for the policy's latency statistics).
    pub(crate) fn warm_started(&mut self, action: &ActionName, ms: f64) {
        self.pool(action).warm_ms.add(ms);
    }

    /// The restore of `key` succeeded: it serves its first invocation; m_R is released.
    pub(crate) fn restored(&mut self, key: Key, now: Timestamp, reply: RestoreReply, ms: f64) {
        let Some(sb) = self.sbs.get_mut(&key) else {
            return;
        };
        if sb.state != SandboxState::Restoring {
            return;
        }
        sb.state = SandboxState::Running { in_flight: 1 };
        sb.ready_at = Some(now);
        sb.last_restore = Some(reply);
        sb.charge = sb.charge.saturating_sub(sb.transient);
        let node = sb.node;
        self.used[node] = self.used[node].saturating_sub(sb.transient);
        sb.transient = 0;
        sb.restore_reserved = 0;
        self.restores[node] = self.restores[node].saturating_sub(1);
        let action = sb.action.clone();
        let pool = self.pool(&action);
        pool.dedup_ms.add(ms);
        if reply.transient_bytes > 0 {
            pool.record_restore_transient(reply.transient_bytes);
        }
    }

    /// The restore of `key` failed; the agent already destroyed it (`gone`), or it must be.
    pub(crate) fn restore_failed(&mut self, key: Key, gone: bool) -> Option<PurgeJob> {
        if gone {
            self.take(key);
            None
        } else {
            self.start_purge(key)
        }
    }

    /// An invocation in `key` finished and the sandbox is still usable. Returns a purge job if
    /// the sandbox is now idle but must go (its action changed).
    pub(crate) fn finished(
        &mut self,
        key: Key,
        now: Timestamp,
        exec_ms: Option<f64>,
    ) -> Option<PurgeJob> {
        let sb = self.sbs.get_mut(&key)?;
        if sb.state.kind() == StateKind::Purging {
            // Purged while running (shutdown): nothing to do.
            return None;
        }
        match sb.state.apply(Event::Finished, now) {
            Ok(s) => sb.state = s,
            Err(e) => {
                warn!(sandbox = %sb.id, error = %e, "unexpected finish");
                return None;
            }
        }
        let action = sb.action.clone();
        let generation = sb.generation;
        let idle = sb.state.kind() == StateKind::Warm;
        let is_base = sb.form == Form::Base;
        if idle {
            sb.gd_at_use = self
                .gd_clocks
                .get(sb.node)
                .map_or(0.0, GreedyDualClock::value);
        }
        if let Some(ms) = exec_ms {
            self.pool(&action).exec_ms.add(ms);
        }
        if !idle {
            return None;
        }
        let stale = self
            .pools
            .get(&action)
            .is_none_or(|p| p.generation != generation);
        if stale && (!is_base || self.dependents(self.sbs[&key].node, &action.namespace) == 0) {
            return self.start_purge(key);
        }
        self.rearm(key, now);
        None
    }

    // ---- decisions ---------------------------------------------------------------------

    /// Asks the policy about every idle sandbox whose decision time has come (`force`: every
    /// idle warm sandbox of the scope, as if its idle period had passed). Returns the number of
    /// sandboxes something was decided for, and the work to do.
    pub(crate) fn decide(&mut self, now: Timestamp, force: Option<&SandboxScope>) -> (usize, Work) {
        let mut due: Vec<(Timestamp, Key)> = self
            .sbs
            .iter()
            .filter(|(_, s)| match force {
                Some(scope) => {
                    scope.covers(&s.action)
                        && s.state.kind() == StateKind::Warm
                        && s.form == Form::Plain
                        && s.queued.is_none()
                }
                None => s.next_decision.is_some_and(|t| t <= now),
            })
            .map(|(&k, s)| (s.state.last_used().unwrap_or(now), k))
            .collect();
        due.sort();
        let cluster = self.cluster_view(now);
        let mut work = Work::default();
        let mut decided = 0;
        for (_, key) in due {
            let Some(sb) = self.sbs.get(&key) else {
                continue;
            };
            if !matches!(
                sb.state,
                SandboxState::Warm { .. } | SandboxState::Dedup { .. }
            ) {
                if let Some(sb) = self.sbs.get_mut(&key) {
                    sb.next_decision = None;
                }
                continue;
            }
            let stale = self
                .pools
                .get(&sb.action)
                .is_none_or(|p| p.generation != sb.generation);
            let fv = self.function_view(&sb.action, now);
            let view = self.sandbox_view(sb);
            // Forced: asked as if the idle period had passed.
            let at = match (force, view.state) {
                (Some(_), SandboxState::Warm { idle_since }) => {
                    now.max(idle_since.plus_ms(self.limits.idle_period_ms))
                }
                _ => now,
            };
            let asked = if stale || (sb.processless && !sb.released && view.dependents == 0) {
                // A base that lost its process serves only its dependents (a released one is
                // its function's base until the policy retires it).
                Decision::Purge
            } else {
                self.policy.on_idle(&cluster, &fv, &view, at)
            };
            let mut d = enforce(asked, &view, self.limits.dedup_enabled);
            if sb.queued.is_some() && matches!(d, Decision::Dedup | Decision::Base) {
                d = Decision::KeepWarm;
            }
            debug!(sandbox = %sb.id, action = %sb.action, state = %view.label(), asked = ?asked, decision = ?d, policy = self.policy.name(), "idle decision");
            match d {
                Decision::Purge => {
                    decided += 1;
                    work.purges.extend(self.start_purge(key));
                }
                Decision::Dedup | Decision::Base => {
                    decided += 1;
                    let purpose = if d == Decision::Base {
                        Purpose::Base
                    } else {
                        Purpose::Dedup
                    };
                    if let Some(sb) = self.sbs.get_mut(&key) {
                        sb.queued = Some(purpose);
                    }
                    self.ckpt_queue.push_back((key, purpose));
                    // The keep-alive still applies while it waits for a slot.
                    let next = self.policy.next_decision(&fv, &view, now);
                    if let Some(sb) = self.sbs.get_mut(&key) {
                        sb.next_decision = next.filter(|&t| t > now);
                    }
                }
                _ => {
                    let next = self.policy.next_decision(&fv, &view, now);
                    if let Some(sb) = self.sbs.get_mut(&key) {
                        sb.next_decision = next.filter(|&t| t > now);
                    }
                }
            }
        }
        work.checkpoints = self.start_checkpoints(now);
        (decided, work)
    }

    /// Starts queued checkpoints where a node has a free slot and room for the image being
    /// written (a transient charge of the sandbox's measured size); a dedup waits while a base
    /// of its function is being made on its node (so that it finds the base's pages).
    pub(crate) fn start_checkpoints(&mut self, now: Timestamp) -> Vec<CheckpointJob> {
        let mut jobs = Vec::new();
        let mut i = 0;
        while i < self.ckpt_queue.len() {
            let (key, purpose) = self.ckpt_queue[i];
            let Some(sb) = self.sbs.get(&key) else {
                self.ckpt_queue.remove(i);
                continue;
            };
            if sb.queued != Some(purpose) || sb.state.kind() != StateKind::Warm {
                self.ckpt_queue.remove(i);
                continue;
            }
            let node = sb.node;
            let making_base = purpose == Purpose::Dedup
                && self.sbs.values().any(|s| {
                    s.node == node
                        && s.action == sb.action
                        && matches!(
                            s.state,
                            SandboxState::Checkpointing {
                                purpose: Purpose::Base,
                                ..
                            }
                        )
                });
            let extra = sb.measured.unwrap_or(sb.charge).min(sb.limit);
            let fits = self.used[node].saturating_add(extra) <= self.budgets[node];
            if self.checkpoints[node] >= self.limits.max_checkpoints || making_base || !fits {
                i += 1;
                continue;
            }
            self.ckpt_queue.remove(i);
            let sb = self.sbs.get_mut(&key).expect("present above");
            let Ok(s) = sb.state.apply(Event::Checkpoint(purpose), now) else {
                continue;
            };
            sb.state = s;
            sb.queued = None;
            sb.charge += extra;
            sb.transient = extra;
            self.used[node] += extra;
            self.checkpoints[node] += 1;
            jobs.push(CheckpointJob {
                key,
                node,
                id: sb.id.clone(),
                action: sb.action.clone(),
                purpose,
            });
        }
        jobs
    }

    /// A checkpoint ended. Returns a purge job if the sandbox must now go.
    pub(crate) fn checkpoint_done(
        &mut self,
        key: Key,
        outcome: CheckpointOutcome,
        now: Timestamp,
    ) -> Option<PurgeJob> {
        let sb = self.sbs.get_mut(&key)?;
        if !matches!(sb.state, SandboxState::Checkpointing { .. }) {
            // Purged meanwhile (shutdown): its slot was released then.
            return None;
        }
        let node = sb.node;
        self.checkpoints[node] = self.checkpoints[node].saturating_sub(1);
        sb.charge = sb.charge.saturating_sub(sb.transient);
        self.used[node] = self.used[node].saturating_sub(sb.transient);
        sb.transient = 0;
        let action = sb.action.clone();
        match outcome {
            CheckpointOutcome::Base(r) => {
                sb.state = sb.state.apply(Event::CheckpointDone, now).ok()?;
                sb.form = Form::Base;
                sb.image = Some(r.image_bytes);
                sb.charge += r.image_bytes;
                self.used[node] += r.image_bytes;
                let charge = sb.charge;
                info!(sandbox = %sb.id, action = %action, image_mb = r.image_bytes >> 20, checkpoint_ms = r.checkpoint_ms, register_ms = r.register_ms, "sandbox is a base");
                self.pool(&action).m_base.add(charge as f64);
            }
            CheckpointOutcome::Dedup(r) => {
                sb.state = sb.state.apply(Event::CheckpointDone, now).ok()?;
                let before = sb.charge;
                sb.charge = r.stored_bytes;
                sb.stored = Some(r.stored_bytes);
                sb.image = Some(r.image_bytes);
                sb.measured = None;
                self.used[node] = self.used[node].saturating_sub(before) + r.stored_bytes;
                debug!(sandbox = %sb.id, action = %action, image_mb = r.image_bytes >> 20, stored_kb = r.stored_bytes >> 10, checkpoint_ms = r.checkpoint_ms, dedup_ms = r.dedup_ms, reused = r.reused_previous, "sandbox deduplicated");
                let pool = self.pool(&action);
                pool.m_dedup.add(r.stored_bytes as f64);
                if !pool.m_restore_measured {
                    // Until a dedup start is measured, m_R is estimated by the page image.
                    pool.m_restore.add(r.image_bytes as f64);
                }
            }
            CheckpointOutcome::Failed { alive: Some(true) } => {
                sb.state = sb.state.apply(Event::CheckpointFailed, now).ok()?;
                sb.deduplicable = false;
            }
            CheckpointOutcome::Failed { alive: Some(false) } => {
                self.take(key);
                return None;
            }
            CheckpointOutcome::Failed { alive: None } => {
                if let Some(sb) = self.sbs.get_mut(&key) {
                    sb.deduplicable = false;
                }
                return self.start_purge(key);
            }
        }
        let sb = &self.sbs[&key];
        let stale = self
            .pools
            .get(&action)
            .is_none_or(|p| p.generation != sb.generation);
        if stale {
            let is_base = sb.form == Form::Base;
            if !is_base || self.dependents(node, &action.namespace) == 0 {
                return self.start_purge(key);
            }
        }
        self.rearm(key, now);
        None
    }

    /// With `release_base_process`: the base `key` just made (idle, of its action's current
    /// version) becomes a base without process ([`Sb::processless`], [`Sb::released`]),
    /// charged its page image until its node reports what it holds for it. Returns its id and
    /// node, for the caller to have the node end its process.
    pub(crate) fn release_base(&mut self, key: Key, now: Timestamp) -> Option<(SandboxId, usize)> {
        if !self.limits.release_base_process {
            return None;
        }
        let sb = self.sbs.get(&key)?;
        let current = self
            .pools
            .get(&sb.action)
            .is_some_and(|p| p.generation == sb.generation);
        if sb.form != Form::Base
            || sb.processless
            || !current
            || !matches!(sb.state, SandboxState::Warm { .. })
        {
            return None;
        }
        let image = sb.image?;
        let sb = self.sbs.get_mut(&key)?;
        sb.processless = true;
        sb.released = true;
        sb.measured = None;
        sb.queued = None;
        self.used[sb.node] = self.used[sb.node].saturating_sub(sb.charge) + image;
        sb.charge = image;
        let out = (sb.id.clone(), sb.node);
        info!(sandbox = %sb.id, action = %sb.action, image_mb = image >> 20, "base process released; its image stays the base");
        self.rearm(key, now);
        Some(out)
    }

    /// The node did not end a released base's process (`release_base` undone): the base
    /// keeps its process and serves again; its charge comes from the next status.
    pub(crate) fn unrelease_base(&mut self, key: Key) {
        if let Some(sb) = self.sbs.get_mut(&key)
            && sb.released
        {
            sb.processless = false;
            sb.released = false;
        }
    }

    /// Puts `policy` in charge (the operator changed the knob): every idle sandbox's next
    /// decision is recomputed by it (one already overdue under it is asked at once) and the
    /// policy's timer restarts.
    pub(crate) fn replace_policy(
        &mut self,
        policy: Box<dyn Policy>,
        idle_period_ms: u64,
        now: Timestamp,
    ) {
        self.policy = policy;
        self.limits.idle_period_ms = idle_period_ms;
        self.next_tick = None;
        let keys: Vec<Key> = self.sbs.keys().copied().collect();
        for key in keys {
            let idle = self.sbs.get(&key).is_some_and(|sb| {
                matches!(
                    sb.state,
                    SandboxState::Warm { .. } | SandboxState::Dedup { .. }
                )
            });
            if idle {
                // Overdue under the new policy (no future decision): ask it now.
                let next = self.next_decision_of(key, now).or(Some(now));
                if let Some(sb) = self.sbs.get_mut(&key) {
                    sb.next_decision = next;
                }
            }
        }
    }

    /// Whether no checkpoint is in flight or waiting.
    pub(crate) fn settled(&self) -> bool {
        self.checkpoints.iter().all(|&n| n == 0)
            && self.ckpt_queue.iter().all(|(k, p)| {
                self.sbs
                    .get(k)
                    .is_none_or(|s| s.queued != Some(*p) || s.state.kind() != StateKind::Warm)
            })
    }

    /// The earliest pending policy decision or tick.
    pub(crate) fn next_deadline(&self) -> Option<Timestamp> {
        let d = self.sbs.values().filter_map(|s| s.next_decision).min();
        match (d, self.next_tick) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Runs the policy's timer if due; returns the pre-warm starts it asked for (memory
    /// reserved on the node with most room, only where it fits without evicting anything, as
    /// in the simulator: a pre-warm evicting an idle sandbox that is then needed is churn,
    /// measured live in docs/BENCHMARKS.md, "Issue 6: medes-predict live").
    pub(crate) fn tick(&mut self, now: Timestamp) -> Vec<PrewarmJob> {
        let Some(every) = self.policy.tick_ms() else {
            self.next_tick = None;
            return Vec::new();
        };
        match self.next_tick {
            Some(t) if t > now => return Vec::new(),
            _ => {}
        }
        self.next_tick = Some(now.plus_ms(every.max(1)));
        let cluster = self.cluster_view(now);
        let names: Vec<ActionName> = self.pools.keys().cloned().collect();
        let views: Vec<FunctionView> = names.iter().map(|n| self.function_view(n, now)).collect();
        let asks: Vec<Prewarm> = self.policy.on_tick(&cluster, &views, now);
        let mut jobs = Vec::new();
        for ask in asks {
            let Some(action) = self.pools.get(&ask.function).and_then(|p| p.action.clone()) else {
                continue;
            };
            let need = Bytes::mib(action.limits.memory_mb).0;
            let version: Arc<str> = Arc::from(action.version.as_str());
            for _ in 0..ask.count {
                let Some((key, id, node, victims)) =
                    self.admit_new(&action.name, &version, need, false, now)
                else {
                    break;
                };
                jobs.push(PrewarmJob {
                    key,
                    node,
                    id,
                    action: action.clone(),
                    victims,
                });
            }
        }
        jobs
    }

    /// The action changed: no sandbox made before now is assigned again; idle ones go now
    /// (bases once no dedup sandbox depends on them), busy ones when they finish.
    pub(crate) fn action_changed(&mut self, action: &ActionName) -> Vec<PurgeJob> {
        let Some(pool) = self.pools.get_mut(action) else {
            return Vec::new();
        };
        pool.generation += 1;
        pool.action = None;
        let mut idle: Vec<Key> = pool
            .keys
            .iter()
            .copied()
            .filter(|k| {
                self.sbs.get(k).is_some_and(|s| {
                    matches!(
                        s.state,
                        SandboxState::Warm { .. } | SandboxState::Dedup { .. }
                    )
                })
            })
            .collect();
        // Dedup sandboxes first, so that bases they free can go too.
        idle.sort_by_key(|k| self.sbs[k].form == Form::Base);
        let mut jobs = Vec::new();
        for k in idle {
            let sb = &self.sbs[&k];
            if sb.form == Form::Base && self.dependents(sb.node, &sb.action.namespace) > 0 {
                // Decided about (and purged) when its last dependent is gone.
                continue;
            }
            jobs.extend(self.start_purge(k));
        }
        jobs
    }

    /// Serves queued invocations in arrival order: any of them may take a sandbox that became
    /// available; cold starts are admitted strictly in order (a waiter that does not fit blocks
    /// the cold starts behind it, so large sandboxes are not starved).
    pub(crate) fn pump(&mut self, now: Timestamp) {
        let mut blocked = false;
        let mut i = 0;
        while i < self.waiters.len() {
            if self.waiters[i].tx.is_closed() {
                self.waiters.remove(i);
                continue;
            }
            let w = &self.waiters[i];
            let (action, version, need, conc, restore) = (
                w.action.clone(),
                w.version.clone(),
                w.need,
                w.concurrency,
                w.allow_restore,
            );
            let grant = match self.try_assign(&action, &version, conc, restore, now) {
                Some(g) => Some(g),
                None if !blocked => {
                    let g = self.try_admit(&action, &version, need, now);
                    blocked = g.is_none();
                    g
                }
                None => None,
            };
            match grant {
                Some(g) => {
                    let w = self.waiters.remove(i).expect("index in range");
                    if let Err(g) = w.tx.send(g) {
                        // The waiter is gone (its task was cancelled): undo.
                        self.undo(g, now);
                    }
                }
                None => i += 1,
            }
        }
    }

    fn undo(&mut self, g: Grant, now: Timestamp) {
        match g {
            Grant::Warm { key, .. } => {
                let _ = self.finished(key, now, None);
            }
            Grant::Cold { key, .. } => {
                self.take(key);
            }
            Grant::Restore { key, .. } => {
                // Back to dedup: release the reservation.
                if let Some(sb) = self.sbs.get_mut(&key) {
                    let node = sb.node;
                    let reserved = sb.restore_reserved + sb.transient;
                    sb.charge = sb.charge.saturating_sub(reserved);
                    self.used[node] = self.used[node].saturating_sub(reserved);
                    sb.transient = 0;
                    sb.restore_reserved = 0;
                    sb.state = SandboxState::Dedup {
                        since: now,
                        idle_since: now,
                    };
                    self.restores[node] = self.restores[node].saturating_sub(1);
                    self.rearm(key, now);
                }
            }
        }
    }

    /// Applies a node's status report, requested at `asked_at`: charges measured memory (warm:
    /// PSS capped at the limit, plus anything else the node holds for it; base: PSS + its
    /// resident image; dedup: everything stored for it) and purges idle sandboxes whose runtime
    /// died or that the node no longer has. Returns whether any memory was freed, and the purges
    /// to carry out.
    pub(crate) fn apply_status(
        &mut self,
        node: usize,
        status: &NodeStatus,
        asked_at: Timestamp,
    ) -> (bool, Vec<PurgeJob>) {
        let reported: HashMap<&SandboxId, &medes_agent::SandboxStatus> =
            status.sandboxes.iter().map(|s| (&s.id, s)).collect();
        let mut freed = self.apply_unowned(node, status);
        let mut jobs = Vec::new();
        let keys: Vec<Key> = self
            .sbs
            .iter()
            .filter(|(_, s)| s.node == node)
            .map(|(&k, _)| k)
            .collect();
        for key in keys {
            let sb = &self.sbs[&key];
            let kind = sb.state.kind();
            if !matches!(
                kind,
                StateKind::Running | StateKind::Warm | StateKind::Dedup
            ) {
                continue;
            }
            // Only sandboxes the node had, in their present form, before the report was asked
            // for can be missed by it (a dedup sandbox from its dedup on: a report asked while
            // its checkpoint ran still shows the warm sandbox, even if it was ready long ago).
            let judged = match sb.state {
                SandboxState::Dedup { since, .. } => since < asked_at,
                _ => sb.ready_at.is_some_and(|t| t < asked_at),
            };
            let charge = match reported.get(&sb.id) {
                Some(st) if kind == StateKind::Dedup && st.form == SandboxForm::Dedup => {
                    Some((st.held_bytes, None))
                }
                // A base without process: its pages and registry share.
                Some(st) if sb.processless && st.form == SandboxForm::Base => {
                    Some((st.held_bytes, None))
                }
                None if sb.processless && judged => {
                    // The node retired it (nothing depended on it any more).
                    info!(sandbox = %sb.id, action = %sb.action, "base without process retired by its node");
                    self.take(key);
                    freed = true;
                    continue;
                }
                Some(st) if st.alive && kind != StateKind::Dedup => st.memory.map(|m| {
                    let pss = m.pss.0;
                    let extra = st.held_bytes.saturating_sub(pss);
                    (pss.min(sb.limit) + extra, Some(pss))
                }),
                _ if matches!(kind, StateKind::Warm | StateKind::Dedup) && judged => {
                    warn!(sandbox = %sb.id, action = %sb.action, state = %kind, "idle sandbox died or vanished from its node; purging it");
                    jobs.extend(self.start_purge(key));
                    continue;
                }
                _ => None,
            };
            let Some((charge, pss)) = charge else {
                continue;
            };
            let sb = self.sbs.get_mut(&key).expect("present");
            if pss.is_some() {
                sb.measured = pss;
            }
            if charge < sb.charge {
                freed = true;
            }
            self.used[node] = self.used[node].saturating_sub(sb.charge) + charge;
            sb.charge = charge;
            let (action, form, k) = (sb.action.clone(), sb.form, kind);
            // A lost base is no measure of what a base costs; a released one is (its image).
            if sb.processless && !sb.released {
                continue;
            }
            let pool = self.pool(&action);
            match (k, form) {
                (StateKind::Dedup, _) => pool.m_dedup.add(charge as f64),
                (_, Form::Base) => pool.m_base.add(charge as f64),
                _ => pool.m_warm.add(charge as f64),
            }
        }
        (freed, jobs)
    }

    /// Sandboxes and charged memory per label, in [`StateKind::ALL`] order.
    pub(crate) fn census(&self) -> ([usize; 8], [u64; 8]) {
        let mut n = [0usize; 8];
        let mut mem = [0u64; 8];
        for s in self.sbs.values() {
            let i = label(s.state, s.form).index();
            n[i] += 1;
            mem[i] += s.charge;
        }
        (n, mem)
    }

    pub(crate) fn info(&self, node_ids: &[NodeId], now: Timestamp) -> Vec<crate::SandboxInfo> {
        let mut v: Vec<crate::SandboxInfo> = self
            .sbs
            .values()
            .map(|s| crate::SandboxInfo {
                id: s.id.clone(),
                node: node_ids[s.node].clone(),
                action: s.action.clone(),
                version: s.version.to_string(),
                state: label(s.state, s.form),
                form: s.form,
                in_flight: match s.state {
                    SandboxState::Running { in_flight } => in_flight,
                    _ => 0,
                },
                idle_ms: s.state.last_used().map(|t| now.since(t)),
                charged: Bytes(s.charge),
                measured: s.measured.map(Bytes),
                memory_limit: Bytes(s.limit),
                deduplicable: s.deduplicable,
                stored: s.stored.map(Bytes),
                image: s.image.map(Bytes),
                dependents: if s.form == Form::Base {
                    self.dependents(s.node, &s.action.namespace)
                } else {
                    0
                },
                last_restore: s.last_restore,
            })
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }
}

// ---- restart reconciliation and restore transients (issue 5) --------------------------------

/// What the controller makes of a sandbox a node reports at startup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Adoption {
    /// A dedup sandbox of a known, unchanged action: it resumes as DEDUP.
    Adopt,
    /// A live warm sandbox or base of a known, unchanged action: it resumes as idle WARM.
    AdoptLive,
    /// A base whose process is gone, of a known, unchanged action (the node reports which):
    /// it is the function's base again, without process ([`Sb::processless`]).
    AdoptKeptBase,
    /// Not adoptable: purge it (the reason is a short fixed label).
    Purge(&'static str),
    /// Left to the node (a base whose process is gone: it retires once nothing depends on it).
    Leave,
}

impl Pool {
    /// A measured m_R of one dedup start (replaces the image-size estimate).
    pub(crate) fn record_restore_transient(&mut self, bytes: u64) {
        if !self.m_restore_measured {
            self.m_restore = Ewma::default();
            self.m_restore_measured = true;
        }
        self.m_restore.add(bytes as f64);
        self.metrics
            .restore_transient(self.m_restore.get().unwrap_or(0.0));
    }
}

impl State {
    /// Whether the node keeps `key` across its restart (a dedup sandbox, or a base dedup
    /// sandboxes depend on), so the controller's shutdown leaves it alone.
    pub(crate) fn kept_at_shutdown(&self, key: Key) -> bool {
        let Some(sb) = self.sbs.get(&key) else {
            return false;
        };
        matches!(sb.state, SandboxState::Dedup { .. })
            || (sb.form == Form::Base
                && self.sbs.values().any(|s| {
                    s.node == sb.node
                        && s.action.namespace == sb.action.namespace
                        && matches!(s.state, SandboxState::Dedup { .. })
                }))
    }

    /// m_R to reserve for a dedup start of `sb`: the function's measured restore transient if
    /// known, else its page image (the rebuilt pages on the tmpfs are most of it), else its limit.
    pub(crate) fn restore_transient(&self, sb: &Sb) -> u64 {
        let estimate = sb.image.unwrap_or(sb.limit);
        match self.pools.get(&sb.action) {
            Some(p) if p.m_restore_measured => p.m_restore.get().map_or(estimate, |v| v as u64),
            _ => estimate,
        }
    }

    /// Charges what `node` holds for sandboxes not in these books (bases without process);
    /// returns whether that charge went down.
    fn apply_unowned(&mut self, node: usize, status: &NodeStatus) -> bool {
        let known: std::collections::HashSet<&SandboxId> = self
            .sbs
            .values()
            .filter(|s| s.node == node)
            .map(|s| &s.id)
            .collect();
        let held: u64 = status
            .sandboxes
            .iter()
            .filter(|s| !known.contains(&s.id) && s.form == SandboxForm::Base && !s.alive)
            .map(|s| s.held_bytes)
            .sum::<u64>()
            // Templates (issue 8) are held by the node for no sandbox.
            + status.templates.iter().map(|t| t.held_bytes).sum::<u64>();
        let before = self.unowned[node];
        self.used[node] = self.used[node].saturating_sub(before) + held;
        self.unowned[node] = held;
        held < before
    }

    /// Decides about a sandbox a node reports that these books do not have (startup
    /// reconciliation, e.g. after a controller restart): `current` is the action's stored
    /// definition, if it still exists. Dedup sandboxes and live warm sandboxes and bases of
    /// known, unchanged actions are adopted; a base whose process is gone is left to its node.
    pub(crate) fn adoption(st: &medes_agent::SandboxStatus, current: Option<&Action>) -> Adoption {
        match st.form {
            SandboxForm::Base if !st.alive => match (&st.action, &st.version, current) {
                (Some(a), Some(v), Some(cur)) if a == &cur.name && v == &cur.version => {
                    Adoption::AdoptKeptBase
                }
                // Unknown function (a base file from an agent older than the one that names
                // a lost base's action and version), or a changed action: the node retires it
                // when nothing needs it.
                _ => Adoption::Leave,
            },
            SandboxForm::Warm if !st.alive => Adoption::Purge("dead_process"),
            _ => match (&st.action, &st.version, current) {
                (None, _, _) | (_, None, _) => Adoption::Purge("no_metadata"),
                (Some(_), Some(_), None) => Adoption::Purge("unknown_action"),
                (Some(a), Some(v), Some(cur)) if a == &cur.name && v == &cur.version => {
                    if st.form == SandboxForm::Dedup {
                        Adoption::Adopt
                    } else {
                        Adoption::AdoptLive
                    }
                }
                _ => Adoption::Purge("stale_version"),
            },
        }
    }

    /// A sandbox `st` that `node` reports and these books do not have, when the node returns
    /// (issue 7: heard from again, or its agent registered again): re-adopted if the books
    /// dropped it when the node was marked dead and its action has not changed since (dedup →
    /// DEDUP, a live warm sandbox or base → idle WARM, from `now`); a base whose process is
    /// gone is left to the node; anything else is to be purged.
    pub(crate) fn readopt(
        &mut self,
        node: usize,
        st: &medes_agent::SandboxStatus,
        now: Timestamp,
    ) -> Readopt {
        let lost = self.lost.get_mut(node).and_then(|l| l.remove(&st.id));
        let processless = st.form == SandboxForm::Base && !st.alive;
        let Some(lost) = lost else {
            return if processless {
                Readopt::Left
            } else {
                Readopt::Purge
            };
        };
        let current = self
            .pools
            .get(&lost.action)
            .filter(|p| p.generation == lost.generation)
            .and_then(|p| p.action.clone())
            .filter(|a| *a.version == *lost.version);
        let gone = if processless {
            Readopt::Left
        } else {
            Readopt::Purge
        };
        let Some(action) = current else {
            return gone;
        };
        if st.version.as_deref().is_some_and(|v| v != &*lost.version) {
            return gone;
        }
        let key = match st.form {
            SandboxForm::Base if processless => self.adopt_kept_base(node, st, &action, now),
            SandboxForm::Dedup => self.adopt_dedup(node, st, &action, now),
            SandboxForm::Warm | SandboxForm::Base if st.alive => {
                self.adopt_live(node, st, &action, (lost.deduplicable, lost.image), now)
            }
            _ => None,
        };
        match key {
            Some(key) => {
                if let Some(sb) = self.sbs.get_mut(&key) {
                    if st.form == SandboxForm::Dedup {
                        sb.deduplicable = lost.deduplicable;
                    }
                    if sb.image.is_none() {
                        sb.image = lost.image;
                    }
                }
                Readopt::Adopted
            }
            None => gone,
        }
    }

    /// Idle sandboxes in the books on `node` whose process the node reports gone (its agent
    /// restarted): a base of an unchanged action whose pages the node keeps (for the dedup
    /// sandboxes that depend on them) stays in the books as its function's base without
    /// process ([`Sb::processless`], charged what the node holds for it); the others leave the
    /// books (a base of a changed action is then charged as unowned until it retires).
    /// Returns (how many left, how many stayed as bases without process).
    pub(crate) fn forget_lost_bases(
        &mut self,
        node: usize,
        reported: &HashMap<&SandboxId, &medes_agent::SandboxStatus>,
    ) -> (usize, usize) {
        let keys: Vec<(Key, bool, u64)> = self
            .sbs
            .iter()
            .filter(|(_, s)| s.node == node && matches!(s.state, SandboxState::Warm { .. }))
            .filter_map(|(&k, s)| {
                let st = reported.get(&s.id).filter(|st| !st.alive)?;
                let current = self
                    .pools
                    .get(&s.action)
                    .is_some_and(|p| p.generation == s.generation);
                let keep = s.form == Form::Base && st.form == SandboxForm::Base && current;
                Some((k, keep, st.held_bytes))
            })
            .collect();
        let (mut left, mut kept) = (0, 0);
        for (k, keep, held) in keys {
            if !keep {
                self.take(k);
                left += 1;
                continue;
            }
            let Some(sb) = self.sbs.get_mut(&k) else {
                continue;
            };
            if !sb.processless {
                info!(sandbox = %sb.id, action = %sb.action, "base lost its process; its pages stay its function's base");
                kept += 1;
            }
            sb.processless = true;
            sb.measured = None;
            self.used[node] = self.used[node].saturating_sub(sb.charge) + held;
            sb.charge = held;
        }
        (left, kept)
    }

    /// Takes a base whose process is gone (kept by the node for its dedup sandboxes) into the
    /// books as its function's base without process ([`Sb::processless`]), idle from `now`.
    /// Returns its key, or `None` if the id is already known.
    pub(crate) fn adopt_kept_base(
        &mut self,
        node: usize,
        st: &medes_agent::SandboxStatus,
        action: &Arc<Action>,
        now: Timestamp,
    ) -> Option<Key> {
        let key = self.adopt_live(node, st, action, (false, st.image_bytes), now)?;
        if let Some(sb) = self.sbs.get_mut(&key) {
            sb.processless = true;
            sb.measured = None;
        }
        // Decided about at once: purged if nothing depends on it.
        self.rearm(key, now);
        Some(key)
    }

    /// Takes a live sandbox (warm, or a base: `st.form`) that the books do not have into them
    /// as idle WARM from `now` (its keep-alive and idle clocks restart). `known` carries what an
    /// earlier entry knew (whether it may be deduplicated, its page image). Returns its key, or
    /// `None` if the id is already known.
    pub(crate) fn adopt_live(
        &mut self,
        node: usize,
        st: &medes_agent::SandboxStatus,
        action: &Arc<Action>,
        known: (bool, Option<u64>),
        now: Timestamp,
    ) -> Option<Key> {
        let (key, limit) = self.adoption_key(node, st, action)?;
        let form = if st.form == SandboxForm::Base {
            Form::Base
        } else {
            Form::Plain
        };
        // The node's next status report charges it exactly; until then what it holds (or its
        // limit, if it reported nothing).
        let charge = if st.held_bytes > 0 {
            st.held_bytes
        } else {
            limit
        };
        let generation = {
            let pool = self.pool(&action.name);
            pool.keys.push(key);
            if pool.action.is_none() {
                pool.action = Some(action.clone());
            }
            if pool.limit == 0 {
                pool.limit = Bytes::mib(action.limits.memory_mb).0;
            }
            pool.generation
        };
        self.used[node] += charge;
        self.sbs.insert(
            key,
            Sb {
                id: st.id.clone(),
                node,
                action: action.name.clone(),
                version: Arc::from(action.version.as_str()),
                generation,
                limit,
                state: SandboxState::Warm { idle_since: now },
                form,
                deduplicable: known.0,
                was_dedup: false,
                queued: None,
                created: now,
                measured: st.memory.map(|m| m.pss.0),
                charge,
                transient: 0,
                restore_reserved: 0,
                stored: None,
                image: known.1.or(st.image_bytes),
                last_restore: None,
                ready_at: Some(now),
                next_decision: None,
                gd_at_use: self.gd_clocks.get(node).map_or(0.0, GreedyDualClock::value),
                processless: false,
                released: false,
            },
        );
        self.rearm(key, now);
        Some(key)
    }

    /// A fresh key and the memory limit for adopting `st` on `node`; `None` if the books
    /// already have it.
    fn adoption_key(
        &mut self,
        node: usize,
        st: &medes_agent::SandboxStatus,
        action: &Action,
    ) -> Option<(Key, u64)> {
        if self.sbs.values().any(|s| s.node == node && s.id == st.id) {
            return None;
        }
        let key = self.next_key;
        self.next_key += 1;
        let limit = st
            .memory_limit
            .map_or(Bytes::mib(action.limits.memory_mb).0, |b| b.0);
        Some((key, limit))
    }

    /// Takes a dedup sandbox an earlier agent kept into the books as DEDUP, as if it had just
    /// been deduplicated (its keep-dedup timer starts now). Returns its key, or `None` if the id
    /// is already known.
    pub(crate) fn adopt_dedup(
        &mut self,
        node: usize,
        st: &medes_agent::SandboxStatus,
        action: &Arc<Action>,
        now: Timestamp,
    ) -> Option<Key> {
        let (key, limit) = self.adoption_key(node, st, action)?;
        let version: Arc<str> = Arc::from(action.version.as_str());
        let generation = {
            let pool = self.pool(&action.name);
            pool.keys.push(key);
            if pool.action.is_none() {
                pool.action = Some(action.clone());
            }
            if pool.limit == 0 {
                pool.limit = Bytes::mib(action.limits.memory_mb).0;
            }
            pool.m_dedup.add(st.held_bytes as f64);
            if let Some(img) = st.image_bytes
                && !pool.m_restore_measured
            {
                pool.m_restore.add(img as f64);
            }
            pool.generation
        };
        self.used[node] += st.held_bytes;
        self.sbs.insert(
            key,
            Sb {
                id: st.id.clone(),
                node,
                action: action.name.clone(),
                version,
                generation,
                limit,
                state: SandboxState::Dedup {
                    since: now,
                    idle_since: now,
                },
                form: Form::Plain,
                deduplicable: true,
                was_dedup: false,
                queued: None,
                created: now,
                measured: None,
                charge: st.held_bytes,
                transient: 0,
                restore_reserved: 0,
                stored: Some(st.held_bytes),
                image: st.image_bytes,
                last_restore: None,
                ready_at: Some(now),
                next_decision: None,
                gd_at_use: self.gd_clocks.get(node).map_or(0.0, GreedyDualClock::value),
                processless: false,
                released: false,
            },
        );
        self.rearm(key, now);
        Some(key)
    }
}
