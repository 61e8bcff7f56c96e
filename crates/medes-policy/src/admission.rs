//! Admission of a new sandbox under a per-node memory budget, with eviction of idle sandboxes
//! in the policy's order.

use medes_core::Bytes;

/// A sandbox that could be evicted to make room: an idle warm or dedup sandbox (never a base
/// with dependents).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Victim<K> {
    /// The caller's handle for the sandbox.
    pub key: K,
    /// Eviction order, lowest first ([`crate::Policy::eviction_rank`]; least recently used by
    /// default).
    pub rank: f64,
    /// Memory that evicting it frees.
    pub memory: Bytes,
}

/// The lowest-ranked idle sandboxes whose eviction frees at least `need`, lowest first; `None`
/// if all of them together do not free enough. `need == 0` yields an empty list.
pub fn choose_victims<K: Copy>(
    candidates: impl IntoIterator<Item = Victim<K>>,
    need: Bytes,
) -> Option<Vec<K>> {
    if need.0 == 0 {
        return Some(Vec::new());
    }
    let mut all: Vec<Victim<K>> = candidates.into_iter().collect();
    all.sort_by(|a, b| a.rank.total_cmp(&b.rank));
    let mut freed = 0u64;
    let mut out = Vec::new();
    for v in all {
        if v.memory.0 == 0 {
            continue;
        }
        freed = freed.saturating_add(v.memory.0);
        out.push(v.key);
        if freed >= need.0 {
            return Some(out);
        }
    }
    None
}

/// The outcome of admitting a sandbox of `need` bytes on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission<K> {
    /// It fits as things are.
    Fits,
    /// It fits once these idle sandboxes (lowest rank first) are evicted.
    Evict(Vec<K>),
    /// It does not fit now, but may once running sandboxes finish or shrink.
    Wait,
    /// It can never fit: the request exceeds the whole budget.
    Reject,
}

/// Admission of a new sandbox (or a restore's transient memory) needing `need` on a node with
/// `budget`, of which `used` is charged, given the idle sandboxes that may be evicted.
/// Following the answer never takes the charged total above the budget.
pub fn admit<K: Copy>(
    budget: Bytes,
    used: Bytes,
    need: Bytes,
    idle: impl IntoIterator<Item = Victim<K>>,
) -> Admission<K> {
    if need > budget {
        return Admission::Reject;
    }
    let after = used.0.saturating_add(need.0);
    if after <= budget.0 {
        return Admission::Fits;
    }
    match choose_victims(idle, Bytes(after - budget.0)) {
        Some(v) => Admission::Evict(v),
        None => Admission::Wait,
    }
}
