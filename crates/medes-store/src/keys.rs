//! Byte layouts of the activation tables' keys.
//!
//! - primary: `ns 0x00 inv(start) id` (newest first within a namespace)
//! - by name: `ns 0x00 name 0x00 inv(start) id`
//! - by time: `start id` → `ns 0x00 name` (oldest first, for retention)
//!
//! `inv(start)` is `u64::MAX - start`, big endian, so ascending key order is descending time.

/// The parts of an activation that its keys are made of.
pub(crate) struct ActKey<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub start: u64,
    pub id: &'a str,
}

fn inv(start: u64) -> [u8; 8] {
    (u64::MAX - start).to_be_bytes()
}

impl ActKey<'_> {
    pub fn primary(&self) -> Vec<u8> {
        let mut k = ns_prefix(self.namespace);
        k.extend_from_slice(&inv(self.start));
        k.extend_from_slice(self.id.as_bytes());
        k
    }

    pub fn by_name(&self) -> Vec<u8> {
        let mut k = name_prefix(self.namespace, self.name);
        k.extend_from_slice(&inv(self.start));
        k.extend_from_slice(self.id.as_bytes());
        k
    }

    pub fn by_time(&self) -> Vec<u8> {
        let mut k = Vec::with_capacity(8 + self.id.len());
        k.extend_from_slice(&self.start.to_be_bytes());
        k.extend_from_slice(self.id.as_bytes());
        k
    }

    pub fn time_value(&self) -> Vec<u8> {
        let mut v = ns_prefix(self.namespace);
        v.extend_from_slice(self.name.as_bytes());
        v
    }
}

/// An [`ActKey`] recovered from a by-time entry.
pub(crate) struct OwnedActKey {
    namespace: String,
    name: String,
    start: u64,
    id: String,
}

impl OwnedActKey {
    pub fn from_time_entry(key: &[u8], value: &[u8]) -> Option<OwnedActKey> {
        let start = u64::from_be_bytes(key.get(..8)?.try_into().ok()?);
        let id = std::str::from_utf8(key.get(8..)?).ok()?.to_owned();
        let sep = value.iter().position(|&b| b == 0)?;
        let namespace = std::str::from_utf8(&value[..sep]).ok()?.to_owned();
        let name = std::str::from_utf8(&value[sep + 1..]).ok()?.to_owned();
        Some(OwnedActKey {
            namespace,
            name,
            start,
            id,
        })
    }

    pub fn as_ref(&self) -> ActKey<'_> {
        ActKey {
            namespace: &self.namespace,
            name: &self.name,
            start: self.start,
            id: &self.id,
        }
    }
}

pub(crate) fn ns_prefix(ns: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(ns.len() + 48);
    k.extend_from_slice(ns.as_bytes());
    k.push(0);
    k
}

pub(crate) fn name_prefix(ns: &str, name: &str) -> Vec<u8> {
    let mut k = ns_prefix(ns);
    k.extend_from_slice(name.as_bytes());
    k.push(0);
    k
}

/// Key range `[lo, hi)` under `prefix` (which ends in 0x00) of records with
/// `since <= start <= upto`.
pub(crate) fn time_range(prefix: &[u8], since: u64, upto: u64) -> (Vec<u8>, Vec<u8>) {
    let mut lo = prefix.to_vec();
    lo.extend_from_slice(&inv(upto));
    let hi = if since == 0 {
        let mut hi = prefix.to_vec();
        if let Some(last) = hi.last_mut() {
            *last = 1;
        }
        hi
    } else {
        let mut hi = prefix.to_vec();
        hi.extend_from_slice(&inv(since - 1));
        hi
    };
    (lo, hi)
}

/// The primary key of the record a by-name index entry points at (`suffix` is what follows the
/// name prefix: `inv(start) id`).
pub(crate) fn primary_from_name_key(ns: &str, suffix: &[u8]) -> Vec<u8> {
    let mut k = ns_prefix(ns);
    k.extend_from_slice(suffix);
    k
}
