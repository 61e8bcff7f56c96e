//! Page fingerprints: content-defined 64-byte chunks found by a Gear rolling hash.

use xxhash_rust::xxh3::xxh3_64;

use crate::{PAGE, Page};

/// Largest supported number of chunks per page.
pub const MAX_K: usize = 16;
/// Chunk (window) size in bytes.
pub const WINDOW: usize = 64;

/// How pages are fingerprinted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FingerprintConfig {
    /// Chunks kept per page (the paper's 5). At most [`MAX_K`].
    pub k: usize,
    /// A window is an anchor candidate when the low `mask_bits` bits of its Gear hash are zero
    /// (default 5: about 125 candidates per page, from which the `k` with the smallest Gear
    /// hashes are kept, so the choice does not depend on where in the page the chunks lie).
    pub mask_bits: u32,
}

impl Default for FingerprintConfig {
    fn default() -> Self {
        Self { k: 5, mask_bits: 5 }
    }
}

/// The fingerprint of one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageFingerprint {
    /// xxh3-64 of the whole page (exact-duplicate detection).
    pub page_hash: u64,
    /// Whether the page is all zeros.
    pub zero: bool,
    n: u8,
    chunks: [u64; MAX_K],
}

impl PageFingerprint {
    /// The sampled chunks' xxh3-64 hashes (at most `k`, fewer for low-entropy pages).
    pub fn chunks(&self) -> &[u64] {
        &self.chunks[..usize::from(self.n)]
    }

    /// A fingerprint from its parts, e.g. one computed by another node (chunks beyond
    /// [`MAX_K`] are dropped).
    pub fn from_parts(page_hash: u64, zero: bool, chunks: &[u64]) -> Self {
        let n = chunks.len().min(MAX_K);
        let mut c = [0u64; MAX_K];
        c[..n].copy_from_slice(&chunks[..n]);
        Self {
            page_hash,
            zero,
            n: n as u8,
            chunks: c,
        }
    }
}

const fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const fn gear_table() -> [u64; 256] {
    let mut t = [0u64; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = splitmix(i as u64 ^ 0x6D65_6465_735F_6765); // "medes_ge"
        i += 1;
    }
    t
}

/// The Gear table (fixed: fingerprints are stable across runs and machines).
static GEAR: [u64; 256] = gear_table();

/// Gear hash of 64 zero bytes: all-zero windows are never sampled.
const fn zero_window_hash() -> u64 {
    let t = gear_table();
    let mut h = 0u64;
    let mut i = 0;
    while i < WINDOW {
        h = (h << 1).wrapping_add(t[0]);
        i += 1;
    }
    h
}
const ZERO_WINDOW: u64 = zero_window_hash();

/// Keeps the `k` smallest (gear, end) pairs.
struct BottomK {
    k: usize,
    n: usize,
    /// Index of the largest kept value once `n == k`.
    imax: usize,
    v: [(u64, u16); MAX_K],
}

impl BottomK {
    #[inline]
    fn offer(&mut self, h: u64, end: usize) {
        if h == ZERO_WINDOW {
            return;
        }
        if self.n < self.k {
            self.v[self.n] = (h, end as u16);
            self.n += 1;
            if self.n == self.k {
                self.recompute_max();
            }
            return;
        }
        if h < self.v[self.imax].0 {
            self.v[self.imax] = (h, end as u16);
            self.recompute_max();
        }
    }

    fn recompute_max(&mut self) {
        let mut imax = 0;
        for i in 1..self.n {
            if self.v[i].0 > self.v[imax].0 {
                imax = i;
            }
        }
        self.imax = imax;
    }
}

/// Whether a page is all zeros.
pub fn is_zero(page: &Page) -> bool {
    page.chunks_exact(64).all(|c| {
        let mut acc = 0u64;
        for w in c.chunks_exact(8) {
            acc |= u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        }
        acc == 0
    })
}

/// Fingerprints one page: zero check, whole-page xxh3, and up to `k` content-defined chunks.
///
/// Every byte offset is a window end (windows lie inside the page). Two interleaved Gear lanes
/// (first and second half of the page) keep the CPU's pipelines busy.
pub fn fingerprint(page: &Page, cfg: &FingerprintConfig) -> PageFingerprint {
    if is_zero(page) {
        return PageFingerprint {
            page_hash: xxh3_64(page),
            zero: true,
            n: 0,
            chunks: [0; MAX_K],
        };
    }
    sample(page, cfg, xxh3_64(page))
}

/// The fingerprint of a page known not to be all zeros, whose xxh3-64 is `page_hash`: up to
/// `k` content-defined chunks (see [`fingerprint`]).
pub fn sample(page: &Page, cfg: &FingerprintConfig, page_hash: u64) -> PageFingerprint {
    let k = cfg.k.min(MAX_K);
    let mut fp = PageFingerprint {
        page_hash,
        zero: false,
        n: 0,
        chunks: [0; MAX_K],
    };
    if k == 0 {
        return fp;
    }
    let mask = (1u64 << cfg.mask_bits.min(63)) - 1;
    let mut best = BottomK {
        k,
        n: 0,
        imax: 0,
        v: [(0, 0); MAX_K],
    };
    // Four interleaved Gear lanes over consecutive quarters of the window ends (independent
    // dependency chains keep the pipelines busy), one rarely taken branch for all four.
    const L: usize = (PAGE - (WINDOW - 1)) / 4;
    let g = |h: u64, at: usize| (h << 1).wrapping_add(GEAR[usize::from(page[at])]);
    let (mut h0, mut h1, mut h2, mut h3) = (0u64, 0u64, 0u64, 0u64);
    for j in 0..WINDOW - 1 {
        h0 = g(h0, j);
        h1 = g(h1, L + j);
        h2 = g(h2, 2 * L + j);
        h3 = g(h3, 3 * L + j);
    }
    for e in WINDOW - 1..WINDOW - 1 + L {
        h0 = g(h0, e);
        h1 = g(h1, L + e);
        h2 = g(h2, 2 * L + e);
        h3 = g(h3, 3 * L + e);
        if (h0 & mask == 0) | (h1 & mask == 0) | (h2 & mask == 0) | (h3 & mask == 0) {
            for (h, end) in [(h0, e), (h1, L + e), (h2, 2 * L + e), (h3, 3 * L + e)] {
                if h & mask == 0 {
                    best.offer(h, end);
                }
            }
        }
    }
    for e in 4 * L + WINDOW - 1..PAGE {
        h3 = g(h3, e);
        if h3 & mask == 0 {
            best.offer(h3, e);
        }
    }
    for i in 0..best.n {
        let end = usize::from(best.v[i].1);
        let start = end + 1 - WINDOW;
        fp.chunks[i] = xxh3_64(&page[start..=end]);
    }
    fp.n = best.n as u8;
    fp.chunks[..best.n].sort_unstable();
    fp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page_from(seed: u64) -> Box<Page> {
        let mut p = Box::new([0u8; PAGE]);
        let mut x = seed;
        for b in p.iter_mut() {
            x = splitmix(x);
            *b = x as u8;
        }
        p
    }

    #[test]
    fn zero_page_is_detected() {
        let fp = fingerprint(&[0u8; PAGE], &FingerprintConfig::default());
        assert!(fp.zero);
        assert!(fp.chunks().is_empty());
    }

    #[test]
    fn random_page_gets_k_chunks_and_shifted_copy_shares_most() {
        let cfg = FingerprintConfig::default();
        let p = page_from(7);
        let fp = fingerprint(&p, &cfg);
        assert_eq!(fp.chunks().len(), 5);
        // Shift content by 40 bytes: most chunks survive (content-defined, not aligned).
        let mut q = Box::new([0u8; PAGE]);
        q[40..].copy_from_slice(&p[..PAGE - 40]);
        let fq = fingerprint(&q, &cfg);
        let shared = fp
            .chunks()
            .iter()
            .filter(|c| fq.chunks().contains(c))
            .count();
        assert!(shared >= 3, "shared {shared}");
        assert_ne!(fp.page_hash, fq.page_hash);
    }

    #[test]
    fn chunks_are_hashes_of_windows_inside_the_page() {
        let cfg = FingerprintConfig {
            k: 16,
            mask_bits: 3,
        };
        let p = page_from(3);
        let fp = fingerprint(&p, &cfg);
        for c in fp.chunks() {
            assert!((0..=PAGE - WINDOW).any(|s| xxh3_64(&p[s..s + WINDOW]) == *c));
        }
    }
}
