//! The controller's bookkeeping: every sandbox, per-action pools, node memory and the admission
//! queue. Plain synchronous code called under one short-lived lock; nothing here awaits.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use medes_agent::NodeStatus;
use medes_core::{ActionName, Bytes, NodeId, SandboxId};
use medes_policy::{
    Admission, Decision, Event, FunctionView, Policy, SandboxState, SandboxView, StateKind,
    Timestamp, Victim, admit,
};
use tokio::sync::oneshot;
use tracing::{debug, warn};

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
    pub created: Timestamp,
    pub measured: Option<u64>,
    pub charge: u64,
    /// When the controller learnt that the node has the sandbox ready.
    pub ready_at: Option<Timestamp>,
    pub next_decision: Option<Timestamp>,
}

pub(crate) struct Pool {
    pub generation: u64,
    pub keys: Vec<Key>,
    pub metrics: Arc<ActionMetrics>,
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
}

pub(crate) struct Waiter {
    pub ticket: u64,
    pub action: ActionName,
    pub version: Arc<str>,
    pub need: u64,
    pub concurrency: u32,
    pub tx: oneshot::Sender<Grant>,
}

/// A sandbox to destroy in the background: its charge stays on the books until it is gone.
pub(crate) struct PurgeJob {
    pub key: Key,
    pub node: usize,
    pub id: SandboxId,
}

pub(crate) struct State {
    pub sbs: HashMap<Key, Sb>,
    pub pools: HashMap<ActionName, Pool>,
    pub budgets: Vec<u64>,
    pub used: Vec<u64>,
    pub waiters: VecDeque<Waiter>,
    pub policy: Box<dyn Policy>,
    pub next_key: Key,
    pub next_ticket: u64,
    pub id_prefix: String,
    pub evictions: u64,
}

impl State {
    pub(crate) fn new(budgets: Vec<u64>, policy: Box<dyn Policy>, id_prefix: String) -> Self {
        State {
            sbs: HashMap::new(),
            pools: HashMap::new(),
            used: vec![0; budgets.len()],
            budgets,
            waiters: VecDeque::new(),
            policy,
            next_key: 1,
            next_ticket: 1,
            id_prefix,
            evictions: 0,
        }
    }

    pub(crate) fn pool(&mut self, action: &ActionName) -> &mut Pool {
        if !self.pools.contains_key(action) {
            let metrics = Arc::new(ActionMetrics::new(action));
            self.pools.insert(
                action.clone(),
                Pool {
                    generation: 0,
                    keys: Vec::new(),
                    metrics,
                },
            );
        }
        self.pools.get_mut(action).expect("inserted above")
    }

    fn function_view(&self, action: &ActionName, limit: u64) -> FunctionView {
        let keys = self
            .pools
            .get(action)
            .map(|p| p.keys.as_slice())
            .unwrap_or_default();
        let n_idle = keys
            .iter()
            .filter(|k| {
                self.sbs
                    .get(k)
                    .is_some_and(|s| s.state.kind() == StateKind::Warm)
            })
            .count();
        FunctionView {
            memory_limit: Bytes(limit),
            n_sandboxes: keys.len(),
            n_idle,
        }
    }

    /// Assigns an initialised sandbox of `action@version` if one can take another invocation:
    /// a running one with spare concurrency first, else the most recently used warm one.
    pub(crate) fn try_assign(
        &mut self,
        action: &ActionName,
        version: &str,
        concurrency: u32,
    ) -> Option<Grant> {
        let pool = self.pools.get(action)?;
        let mut best: Option<(Key, (u8, Timestamp))> = None;
        for &k in &pool.keys {
            let Some(sb) = self.sbs.get(&k) else { continue };
            if sb.generation != pool.generation
                || &*sb.version != version
                || !sb.state.can_assign(concurrency)
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
        let (key, _) = best?;
        let sb = self.sbs.get_mut(&key)?;
        sb.state = sb
            .state
            .apply(Event::Assign { concurrency }, Timestamp(0))
            .ok()?;
        sb.next_decision = None;
        Some(Grant::Warm {
            key,
            id: sb.id.clone(),
            node: sb.node,
        })
    }

    /// Reserves memory for a new sandbox on the node with the most room, evicting least recently
    /// used idle sandboxes if needed; `None` if no node can make room now.
    pub(crate) fn try_admit(
        &mut self,
        action: &ActionName,
        version: &Arc<str>,
        need: u64,
        now: Timestamp,
    ) -> Option<Grant> {
        let mut choice: Option<(usize, Vec<Key>)> = None;
        for node in 0..self.budgets.len() {
            let sbs = &self.sbs;
            let idle = sbs.iter().filter_map(|(&k, s)| match s.state {
                SandboxState::Warm { idle_since } if s.node == node => Some(Victim {
                    key: k,
                    idle_since,
                    memory: Bytes(s.charge),
                }),
                _ => None,
            });
            match admit(
                Bytes(self.budgets[node]),
                Bytes(self.used[node]),
                Bytes(need),
                idle,
            ) {
                Admission::Fits => {
                    let better = match &choice {
                        None => true,
                        Some((n, v)) => !v.is_empty() || self.used[node] < self.used[*n],
                    };
                    if better {
                        choice = Some((node, Vec::new()));
                    }
                }
                Admission::Evict(v) => {
                    if choice
                        .as_ref()
                        .is_none_or(|(_, cv)| !cv.is_empty() && v.len() < cv.len())
                    {
                        choice = Some((node, v));
                    }
                }
                Admission::Wait | Admission::Reject => {}
            }
        }
        let (node, victim_keys) = choice?;
        let mut victims = Vec::with_capacity(victim_keys.len());
        for k in victim_keys {
            if let Some(sb) = self.take(k) {
                debug!(sandbox = %sb.id, action = %sb.action, "evicting idle sandbox");
                self.evictions += 1;
                victims.push(sb.id);
            }
        }
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
                limit: need,
                state: SandboxState::Starting,
                created: now,
                measured: None,
                charge: need,
                ready_at: None,
                next_decision: None,
            },
        );
        Some(Grant::Cold {
            key,
            id,
            node,
            victims,
        })
    }

    /// Removes a sandbox from the books (its memory is free again) and returns it.
    pub(crate) fn take(&mut self, key: Key) -> Option<Sb> {
        let sb = self.sbs.remove(&key)?;
        self.used[sb.node] = self.used[sb.node].saturating_sub(sb.charge);
        if let Some(pool) = self.pools.get_mut(&sb.action) {
            pool.keys.retain(|&k| k != key);
        }
        Some(sb)
    }

    /// Marks a sandbox for destruction: never assigned again, still charged until destroyed.
    pub(crate) fn start_purge(&mut self, key: Key) -> Option<PurgeJob> {
        let sb = self.sbs.get_mut(&key)?;
        sb.state = sb.state.apply(Event::Purge, Timestamp(0)).ok()?;
        sb.next_decision = None;
        let job = PurgeJob {
            key,
            node: sb.node,
            id: sb.id.clone(),
        };
        let action = sb.action.clone();
        if let Some(pool) = self.pools.get_mut(&action) {
            pool.keys.retain(|&k| k != key);
        }
        Some(job)
    }

    /// The cold start of `key` finished; it now serves its first invocation.
    pub(crate) fn started(&mut self, key: Key, now: Timestamp) {
        if let Some(sb) = self.sbs.get_mut(&key) {
            sb.ready_at = Some(now);
            match sb.state.apply(Event::Started, Timestamp(0)) {
                Ok(s) => sb.state = s,
                Err(e) => warn!(sandbox = %sb.id, error = %e, "unexpected start"),
            }
        }
    }

    /// An invocation in `key` finished and the sandbox is still usable. Returns a purge job if
    /// the sandbox is now idle but must go (its action changed), and the time of the sandbox's
    /// next policy decision if it became idle.
    pub(crate) fn finished(
        &mut self,
        key: Key,
        now: Timestamp,
    ) -> (Option<PurgeJob>, Option<Timestamp>) {
        let Some(sb) = self.sbs.get_mut(&key) else {
            return (None, None);
        };
        if sb.state.kind() == StateKind::Purging {
            // Purged while running (shutdown): nothing to do.
            return (None, None);
        }
        match sb.state.apply(Event::Finished, now) {
            Ok(s) => sb.state = s,
            Err(e) => {
                warn!(sandbox = %sb.id, error = %e, "unexpected finish");
                return (None, None);
            }
        }
        if sb.state.kind() != StateKind::Warm {
            return (None, None);
        }
        let stale = self
            .pools
            .get(&sb.action)
            .is_none_or(|p| p.generation != sb.generation);
        if stale {
            return (self.start_purge(key), None);
        }
        let (action, limit) = (sb.action.clone(), sb.limit);
        let fv = self.function_view(&action, limit);
        let sb = self.sbs.get(&key).expect("present above");
        let view = SandboxView {
            state: sb.state,
            created: sb.created,
            memory: Bytes(sb.charge),
        };
        let next = self.policy.next_decision(&fv, &view);
        if let Some(sb) = self.sbs.get_mut(&key) {
            sb.next_decision = next;
        }
        (None, next)
    }

    /// Asks the policy about every idle sandbox whose decision time has come.
    pub(crate) fn expire(&mut self, now: Timestamp) -> Vec<PurgeJob> {
        let due: Vec<Key> = self
            .sbs
            .iter()
            .filter(|(_, s)| s.next_decision.is_some_and(|t| t <= now))
            .map(|(&k, _)| k)
            .collect();
        let mut jobs = Vec::new();
        for key in due {
            let Some(sb) = self.sbs.get(&key) else {
                continue;
            };
            let fv = self.function_view(&sb.action, sb.limit);
            let sb = &self.sbs[&key];
            let view = SandboxView {
                state: sb.state,
                created: sb.created,
                memory: Bytes(sb.charge),
            };
            match self.policy.on_idle(&fv, &view, now) {
                Decision::Purge => {
                    debug!(sandbox = %sb.id, action = %sb.action, policy = self.policy.name(), "idle sandbox expired");
                    jobs.extend(self.start_purge(key));
                }
                _ => {
                    let next = self.policy.next_decision(&fv, &view).filter(|&t| t > now);
                    if let Some(sb) = self.sbs.get_mut(&key) {
                        sb.next_decision = next;
                    }
                }
            }
        }
        jobs
    }

    /// The earliest pending policy decision.
    pub(crate) fn next_deadline(&self) -> Option<Timestamp> {
        self.sbs.values().filter_map(|s| s.next_decision).min()
    }

    /// The action changed: no sandbox made before now is assigned again; idle ones go now,
    /// busy ones when they finish.
    pub(crate) fn action_changed(&mut self, action: &ActionName) -> Vec<PurgeJob> {
        let Some(pool) = self.pools.get_mut(action) else {
            return Vec::new();
        };
        pool.generation += 1;
        let idle: Vec<Key> = pool
            .keys
            .iter()
            .copied()
            .filter(|k| {
                self.sbs
                    .get(k)
                    .is_some_and(|s| s.state.kind() == StateKind::Warm)
            })
            .collect();
        idle.into_iter()
            .filter_map(|k| self.start_purge(k))
            .collect()
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
            let (action, version, need, conc) =
                (w.action.clone(), w.version.clone(), w.need, w.concurrency);
            let grant = match self.try_assign(&action, &version, conc) {
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
                let _ = self.finished(key, now);
            }
            Grant::Cold { key, .. } => {
                self.take(key);
            }
        }
    }

    /// Applies a node's status report, requested at `asked_at`: charges measured memory (PSS,
    /// capped at the limit) and purges idle sandboxes whose runtime died or that the node no
    /// longer has. Returns whether any memory was freed, and the purges to carry out.
    pub(crate) fn apply_status(
        &mut self,
        node: usize,
        status: &NodeStatus,
        asked_at: Timestamp,
    ) -> (bool, Vec<PurgeJob>) {
        let reported: HashMap<&SandboxId, &medes_agent::SandboxStatus> =
            status.sandboxes.iter().map(|s| (&s.id, s)).collect();
        let mut freed = false;
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
            if !matches!(kind, StateKind::Running | StateKind::Warm) {
                continue;
            }
            // Only sandboxes the node had before the report was asked for can be missed by it.
            let judged = sb.ready_at.is_some_and(|t| t < asked_at);
            match reported.get(&sb.id) {
                Some(st) if st.alive => {
                    if let Some(m) = st.memory {
                        let charge = m.pss.0.min(sb.limit);
                        let sb = self.sbs.get_mut(&key).expect("present");
                        sb.measured = Some(m.pss.0);
                        if charge < sb.charge {
                            freed = true;
                        }
                        self.used[node] = self.used[node] - sb.charge + charge;
                        sb.charge = charge;
                    }
                }
                _ if kind == StateKind::Warm && judged => {
                    warn!(sandbox = %sb.id, action = %sb.action, "idle sandbox died or vanished from its node; purging it");
                    jobs.extend(self.start_purge(key));
                }
                _ => {}
            }
        }
        (freed, jobs)
    }

    /// Sandboxes and charged memory per state, in [`StateKind::ALL`] order.
    pub(crate) fn census(&self) -> ([usize; 4], [u64; 4]) {
        let mut n = [0usize; 4];
        let mut mem = [0u64; 4];
        for s in self.sbs.values() {
            let i = s.state.kind().index();
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
                state: s.state.kind(),
                in_flight: match s.state {
                    SandboxState::Running { in_flight } => in_flight,
                    _ => 0,
                },
                idle_ms: s.state.idle_since().map(|t| now.since(t)),
                charged: Bytes(s.charge),
                measured: s.measured.map(Bytes),
                memory_limit: Bytes(s.limit),
            })
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }
}
