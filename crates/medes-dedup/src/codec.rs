//! Page codecs: how one page is stored, and the measured choice between them.
//!
//! - `Zero`, `Same`: no bytes.
//! - `Lz` (the default for similar pages): copy/literal ops against the window of base pages
//!   around the base page (see [`lz_encode`]): pointers that differ in a few bytes and content
//!   shifted by a multiple of 8 bytes (also across the page border) cost a few bytes each;
//!   decoding is a few memcpys. Stored in the store's zstd blocks.
//! - `Sparse`: an own byte-run diff against the base page: records `(skip, len, bytes)` with
//!   LEB128 `skip`/`len`; cannot express shifted content (used when `lz` is off). In the blocks.
//! - `ZstdRef` / `ZstdWin`: zstd with the base page (or the window) as raw-content prefix
//!   (`zstd_ref`, off by default): ~15 µs to encode, 1.5–2 µs to decode.
//! - `Raw` (in the store's zstd blocks), `Lz4`, `Zstd`: the page on its own.
//!
//! Measured on the ten suite functions (ASLR on, rebased; see the crate README): LZ patches
//! save 2.4 points more than sparse diffs, and zstd patches on top add nothing measurable
//! while costing 15% more dedup CPU.

use serde::{Deserialize, Serialize};
use zstd::zstd_safe;

use crate::{PAGE, Page};

/// How a page is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum PageKind {
    /// All zeros.
    Zero = 0,
    /// Identical to its base page.
    Same = 1,
    /// Sparse byte-run diff against its base page.
    Sparse = 2,
    /// zstd with the base page as prefix.
    ZstdRef = 3,
    /// Stored raw.
    Raw = 4,
    /// lz4 on its own.
    Lz4 = 5,
    /// zstd on its own.
    Zstd = 6,
    /// zstd with a window of base pages around the base page as prefix (shifted content).
    ZstdWin = 7,
    /// Own LZ-style copy/literal ops against the window of base pages (shifted content at
    /// memcpy speed). Stored in the store's zstd blocks.
    Lz = 8,
}

impl PageKind {
    /// Decodes the on-disk tag.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::Zero,
            1 => Self::Same,
            2 => Self::Sparse,
            3 => Self::ZstdRef,
            4 => Self::Raw,
            5 => Self::Lz4,
            6 => Self::Zstd,
            7 => Self::ZstdWin,
            8 => Self::Lz,
            _ => return None,
        })
    }

    /// Whether decoding needs the base page.
    pub fn needs_base(self) -> bool {
        matches!(
            self,
            Self::Same | Self::Sparse | Self::ZstdRef | Self::ZstdWin | Self::Lz
        )
    }

    /// Whether the page's data is compressed together with its neighbours' (in the store's
    /// blocks) rather than on its own.
    pub fn in_block(self) -> bool {
        matches!(self, Self::Sparse | Self::Raw | Self::Lz)
    }

    /// Whether decoding needs the window of base pages (instead of the base page).
    pub fn needs_window(self) -> bool {
        matches!(self, Self::ZstdWin | Self::Lz)
    }
}

/// How pages without a usable base are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Standalone {
    /// Raw 4 KiB, compressed with its neighbours in the store's blocks.
    Raw,
    /// lz4 (fast to decode), raw if that does not pay.
    Lz4,
    /// zstd at the given level, raw if that does not pay.
    Zstd(i32),
}

/// Codec choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodecConfig {
    /// Try zstd with the base page as prefix when the sparse diff is large.
    pub zstd_ref: bool,
    /// zstd level for `ZstdRef`.
    pub zstd_ref_level: i32,
    /// Sparse diffs up to this size are taken without trying zstd.
    pub sparse_good_enough: usize,
    /// `ZstdRef` is chosen only when `block_factor × its size + zref_min_gain` is at most the
    /// sparse diff's size.
    pub zref_min_gain: usize,
    /// How much smaller a sparse diff gets in its block (measured: 2.3–2.7×), used to compare
    /// it with a zstd patch.
    pub block_factor: usize,
    /// Standalone codec.
    pub standalone: Standalone,
    /// Base pages on each side of the base page in the `ZstdWin` dictionary (0: `ZstdRef`).
    pub window_radius: u64,
    /// A patch is used only if smaller than this; else the page is stored standalone.
    pub patch_threshold: usize,
    /// Use the [`PageKind::Lz`] codec (copies from the window of base pages) instead of the
    /// sparse diff, which it subsumes.
    #[serde(default = "yes")]
    pub lz: bool,
    /// zstd (`ZstdRef`/`ZstdWin`, ~10–20 µs to encode) is tried only when the best block-stored
    /// patch (sparse or LZ, raw bytes) is larger than this.
    #[serde(default)]
    pub zstd_above: usize,
}

fn yes() -> bool {
    true
}

impl Default for CodecConfig {
    fn default() -> Self {
        Self {
            zstd_ref: false,
            zstd_ref_level: 1,
            sparse_good_enough: 800,
            zref_min_gain: 64,
            block_factor: 4,
            standalone: Standalone::Raw,
            window_radius: 1,
            patch_threshold: 2048,
            lz: true,
            zstd_above: 0,
        }
    }
}

/// Error decoding a stored page.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodePageError {
    /// The kind needs a base page and none was given.
    #[error("page kind {0:?} needs a base page")]
    MissingBase(PageKind),
    /// The stored bytes are malformed for their kind.
    #[error("malformed {0:?} data")]
    Malformed(PageKind),
}

fn put_varint(out: &mut Vec<u8>, mut v: usize) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(data: &[u8], at: &mut usize) -> Option<usize> {
    let mut v = 0usize;
    for shift in [0, 7, 14] {
        let b = *data.get(*at)?;
        *at += 1;
        v |= usize::from(b & 0x7F) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Equal bytes between two differing runs that are cheaper to copy than a new record.
const MERGE_GAP: usize = 3;

/// Appends the sparse diff of `target` against `base` to `out`; gives up (returning `false`)
/// once it exceeds `limit` bytes.
pub fn sparse_encode(target: &Page, base: &Page, limit: usize, out: &mut Vec<u8>) -> bool {
    let start_len = out.len();
    let mut i = 0;
    let mut last_end = 0;
    while i < PAGE {
        if i % 8 == 0 && target[i..i + 8] == base[i..i + 8] {
            i += 8;
            continue;
        }
        if target[i] == base[i] {
            i += 1;
            continue;
        }
        let start = i;
        let mut end = i + 1;
        let mut j = i + 1;
        while j < PAGE {
            if target[j] != base[j] {
                end = j + 1;
            } else if j - end >= MERGE_GAP {
                break;
            }
            j += 1;
        }
        put_varint(out, start - last_end);
        put_varint(out, end - start);
        out.extend_from_slice(&target[start..end]);
        if out.len() - start_len > limit {
            return false;
        }
        last_end = end;
        i = end;
    }
    true
}

/// Applies a sparse diff: `out` = `base` with the recorded runs replaced.
pub fn sparse_decode(data: &[u8], base: &Page, out: &mut Page) -> Result<(), DecodePageError> {
    let bad = DecodePageError::Malformed(PageKind::Sparse);
    out.copy_from_slice(base);
    let (mut at, mut pos) = (0usize, 0usize);
    while at < data.len() {
        let skip = get_varint(data, &mut at).ok_or(bad.clone())?;
        let len = get_varint(data, &mut at).ok_or(bad.clone())?;
        pos = pos.checked_add(skip).ok_or(bad.clone())?;
        let end = pos
            .checked_add(len)
            .filter(|&e| e <= PAGE)
            .ok_or(bad.clone())?;
        let src = data.get(at..at + len).ok_or(bad.clone())?;
        let dst = &mut out[pos..end];
        if len <= 16 {
            // Most runs are a few bytes: a call to memmove costs more than the copy.
            for (d, s) in dst.iter_mut().zip(src) {
                *d = *s;
            }
        } else {
            dst.copy_from_slice(src);
        }
        at += len;
        pos = end;
    }
    Ok(())
}

/// Hash-table bits of the LZ encoder's index of the window's words.
const LZ_BITS: u32 = 12;
/// Longest window the LZ codec indexes (its offsets are u16 word indices).
const LZ_MAX_WINDOW: usize = LZ_STRIDE * (u16::MAX as usize - 1);
/// Bytes between indexed window words.
const LZ_STRIDE: usize = 32;

#[inline]
fn word(d: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&d[at..at + 8]);
    u64::from_le_bytes(w)
}

#[inline]
fn lz_hash(w: u64) -> usize {
    (w.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - LZ_BITS)) as usize
}

fn zigzag(v: isize) -> usize {
    ((v << 1) ^ (v >> (isize::BITS - 1))) as usize
}

fn unzigzag(v: usize) -> isize {
    ((v >> 1) as isize) ^ -((v & 1) as isize)
}

/// Length of the common prefix of `a` and `b`.
#[inline]
fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    let n = a.len().min(b.len());
    let mut i = 0;
    while i + 8 <= n {
        let x = word(a, i) ^ word(b, i);
        if x != 0 {
            return i + (x.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < n && a[i] == b[i] {
        i += 1;
    }
    i
}

/// Appends the LZ encoding of `target` against the window `w` (base page at byte `bo` of it) to
/// `out`: ops `(literal length, literal bytes, match length - 8, zigzag delta change)` with
/// LEB128 numbers, where a match copies from `w` at the target position plus the running delta.
/// Matches are found from the previous delta (pointers differing in a few bytes) and from an
/// index of the window's aligned words (content shifted by a multiple of 8). Gives up
/// (returning `false`) once the encoding exceeds `limit` bytes.
pub fn lz_encode(
    target: &Page,
    w: &[u8],
    bo: usize,
    table: &mut [u16; 1 << LZ_BITS],
    limit: usize,
    out: &mut Vec<u8>,
) -> bool {
    let start_len = out.len();
    if w.len() > LZ_MAX_WINDOW || bo + PAGE > w.len() {
        return false;
    }
    // The index of the window's aligned words is built on the first miss that needs it (pages
    // that differ from the base page only in a few words never need it).
    let mut indexed = false;
    let (mut pos, mut lit_start, mut last_end) = (0usize, 0usize, 0usize);
    let mut delta = bo as isize;
    let mut emitted_delta = 0isize;
    while pos + 8 <= PAGE {
        let tw = word(target, pos);
        let mut cand = None;
        let dp = pos as isize + delta;
        let near = pos - last_end < 16;
        if dp >= 0 && (dp as usize) + 8 <= w.len() && word(w, dp as usize) == tw {
            cand = Some(dp as usize);
        } else if !near || pos % 8 == 0 {
            if !indexed {
                // Every other word (a match of 16 bytes or more at a word shift covers an
                // indexed word; backward extension finds its start), the base page last so
                // that it wins collisions.
                table.fill(0);
                let nw = w.len() / LZ_STRIDE;
                let (b0, b1) = (bo / LZ_STRIDE, (bo + PAGE) / LZ_STRIDE);
                for i in (0..b0).chain(b1..nw).chain(b0..b1) {
                    table[lz_hash(word(w, i * LZ_STRIDE))] = (i + 1) as u16;
                }
                indexed = true;
            }
            let e = table[lz_hash(tw)];
            if e != 0 {
                let dp = usize::from(e - 1) * LZ_STRIDE;
                if word(w, dp) == tw {
                    cand = Some(dp);
                }
            }
        }
        let Some(mut dp) = cand else {
            // Near the end of a match, step by byte to resynchronise quickly; else by word.
            pos = if near { pos + 1 } else { (pos + 8) & !7 };
            continue;
        };
        let mut len = 8 + common_prefix(&target[pos + 8..], &w[dp + 8..]);
        // Extend backwards into the pending literal.
        while pos > lit_start && dp > 0 && target[pos - 1] == w[dp - 1] {
            pos -= 1;
            dp -= 1;
            len += 1;
        }
        put_varint(out, pos - lit_start);
        out.extend_from_slice(&target[lit_start..pos]);
        put_varint(out, len - 8);
        let d = dp as isize - pos as isize;
        put_varint(out, zigzag(d - emitted_delta));
        emitted_delta = d;
        delta = d;
        pos += len;
        lit_start = pos;
        last_end = pos;
        if out.len() - start_len > limit {
            return false;
        }
    }
    put_varint(out, PAGE - lit_start);
    out.extend_from_slice(&target[lit_start..]);
    out.len() - start_len <= limit
}

/// Decodes an LZ encoding (see [`lz_encode`]) against the window `w` into `out`.
pub fn lz_decode(data: &[u8], w: &[u8], out: &mut Page) -> Result<(), DecodePageError> {
    let bad = DecodePageError::Malformed(PageKind::Lz);
    let (mut at, mut pos) = (0usize, 0usize);
    let mut delta = 0isize;
    loop {
        let lit = get_varint(data, &mut at).ok_or(bad.clone())?;
        let end = pos
            .checked_add(lit)
            .filter(|&e| e <= PAGE)
            .ok_or(bad.clone())?;
        let src = data.get(at..at + lit).ok_or(bad.clone())?;
        let dst = &mut out[pos..end];
        if lit <= 16 {
            // Most literals are a few bytes: a call to memcpy costs more than the copy.
            for (d, s) in dst.iter_mut().zip(src) {
                *d = *s;
            }
        } else {
            dst.copy_from_slice(src);
        }
        at += lit;
        pos = end;
        if pos == PAGE {
            return if at == data.len() { Ok(()) } else { Err(bad) };
        }
        let len = get_varint(data, &mut at).ok_or(bad.clone())? + 8;
        let dz = get_varint(data, &mut at).ok_or(bad.clone())?;
        delta = delta.checked_add(unzigzag(dz)).ok_or(bad.clone())?;
        let dp = usize::try_from(pos as isize + delta).map_err(|_| bad.clone())?;
        let end = pos
            .checked_add(len)
            .filter(|&e| e <= PAGE)
            .ok_or(bad.clone())?;
        let src = w.get(dp..dp + len).ok_or(bad.clone())?;
        let dst = &mut out[pos..end];
        if len <= 32 {
            for (d, s) in dst.iter_mut().zip(src) {
                *d = *s;
            }
        } else {
            dst.copy_from_slice(src);
        }
        pos = end;
    }
}

/// A reusable encoder (one per thread).
pub struct Encoder {
    cctx: zstd_safe::CCtx<'static>,
    buf: Vec<u8>,
    lzbuf: Vec<u8>,
    table: Box<[u16; 1 << LZ_BITS]>,
}

impl Default for Encoder {
    fn default() -> Self {
        Self {
            cctx: zstd_safe::CCtx::create(),
            buf: Vec::with_capacity(2 * PAGE),
            lzbuf: Vec::with_capacity(2 * PAGE),
            table: Box::new([0; 1 << LZ_BITS]),
        }
    }
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Encoder")
    }
}

impl Encoder {
    /// Encodes `target` against `base` (or on its own), appending the stored bytes to `out`.
    /// `window` (base pages around `base`, see [`crate::BasePages::window`], and the base
    /// page's byte offset in it) is the dictionary of the LZ and zstd codecs when given; the
    /// decoder must then be given the same window. Zero pages must be detected by the caller.
    pub fn encode(
        &mut self,
        target: &Page,
        base: Option<&Page>,
        window: Option<(&[u8], usize)>,
        cfg: &CodecConfig,
        out: &mut Vec<u8>,
    ) -> PageKind {
        if let Some(base) = base {
            if target == base {
                return PageKind::Same;
            }
            let start = out.len();
            let limit = cfg.patch_threshold.min(PAGE);
            // LZ subsumes the sparse diff (copies at the same offset): try it alone when on.
            let sparse_ok = !cfg.lz && sparse_encode(target, base, limit, out);
            let mut best_len = if sparse_ok {
                out.len() - start
            } else {
                out.truncate(start);
                usize::MAX
            };
            if sparse_ok && best_len <= cfg.sparse_good_enough {
                return PageKind::Sparse;
            }
            let mut best = sparse_ok.then_some(PageKind::Sparse);
            if cfg.lz {
                let (w, bo) = window.unwrap_or((&base[..], 0));
                self.lzbuf.clear();
                if lz_encode(target, w, bo, &mut self.table, limit, &mut self.lzbuf) {
                    out.truncate(start);
                    out.extend_from_slice(&self.lzbuf);
                    best_len = self.lzbuf.len();
                    best = Some(PageKind::Lz);
                }
            }
            if cfg.zstd_ref && best_len > cfg.zstd_above {
                self.buf.clear();
                let dict: &[u8] = window.map_or(&base[..], |(w, _)| w);
                let r =
                    self.cctx
                        .compress_using_dict(&mut self.buf, target, dict, cfg.zstd_ref_level);
                if r.is_ok()
                    && self.buf.len() < limit
                    && self
                        .buf
                        .len()
                        .saturating_mul(cfg.block_factor.max(1))
                        .saturating_add(cfg.zref_min_gain)
                        <= best_len
                {
                    out.truncate(start);
                    out.extend_from_slice(&self.buf);
                    return if window.is_some() {
                        PageKind::ZstdWin
                    } else {
                        PageKind::ZstdRef
                    };
                }
            }
            if let Some(k) = best {
                return k;
            }
            out.truncate(start);
        }
        self.standalone(target, cfg, out)
    }

    /// The cheap encodings only: `Same`, else an LZ patch (a sparse diff when `cfg.lz` is off)
    /// of at most `limit` bytes, appended to `out`; `None` (and `out` unchanged) otherwise.
    pub fn encode_cheap(
        &mut self,
        target: &Page,
        base: &Page,
        window: Option<(&[u8], usize)>,
        cfg: &CodecConfig,
        limit: usize,
        out: &mut Vec<u8>,
    ) -> Option<PageKind> {
        if target == base {
            return Some(PageKind::Same);
        }
        let start = out.len();
        let ok = if cfg.lz {
            let (w, bo) = window.unwrap_or((&base[..], 0));
            lz_encode(target, w, bo, &mut self.table, limit, out)
        } else {
            sparse_encode(target, base, limit, out)
        };
        if ok {
            Some(if cfg.lz {
                PageKind::Lz
            } else {
                PageKind::Sparse
            })
        } else {
            out.truncate(start);
            None
        }
    }

    fn standalone(&mut self, target: &Page, cfg: &CodecConfig, out: &mut Vec<u8>) -> PageKind {
        match cfg.standalone {
            Standalone::Raw => {}
            Standalone::Lz4 => {
                let c = lz4_flex::block::compress(target);
                if c.len() < PAGE * 7 / 8 {
                    out.extend_from_slice(&c);
                    return PageKind::Lz4;
                }
            }
            Standalone::Zstd(level) => {
                self.buf.clear();
                if self.cctx.compress(&mut self.buf, target, level).is_ok()
                    && self.buf.len() < PAGE * 7 / 8
                {
                    out.extend_from_slice(&self.buf);
                    return PageKind::Zstd;
                }
            }
        }
        out.extend_from_slice(target);
        PageKind::Raw
    }
}

/// A reusable decoder (one per thread).
pub struct Decoder {
    dctx: zstd_safe::DCtx<'static>,
}

impl Default for Decoder {
    fn default() -> Self {
        Self {
            dctx: zstd_safe::DCtx::create(),
        }
    }
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Decoder")
    }
}

impl Decoder {
    /// Decompresses a store block of exactly `len` bytes into `out` (cleared first).
    pub fn decompress_block(
        &mut self,
        data: &[u8],
        out: &mut Vec<u8>,
        len: usize,
    ) -> Result<(), DecodePageError> {
        out.clear();
        out.reserve(len);
        let n = self
            .dctx
            .decompress(out, data)
            .map_err(|_| DecodePageError::Malformed(PageKind::Sparse))?;
        if n != len || out.len() != len {
            return Err(DecodePageError::Malformed(PageKind::Sparse));
        }
        Ok(())
    }

    /// Decodes one stored page into `out` (`window` only for `ZstdWin`).
    pub fn decode(
        &mut self,
        kind: PageKind,
        data: &[u8],
        base: Option<&Page>,
        window: Option<&[u8]>,
        out: &mut Page,
    ) -> Result<(), DecodePageError> {
        let need = || base.ok_or(DecodePageError::MissingBase(kind));
        let bad = DecodePageError::Malformed(kind);
        match kind {
            PageKind::Zero => out.fill(0),
            PageKind::Same => out.copy_from_slice(need()?),
            PageKind::Sparse => sparse_decode(data, need()?, out)?,
            PageKind::ZstdRef => {
                let base = need()?;
                let n = self
                    .dctx
                    .decompress_using_dict(&mut out[..], data, base)
                    .map_err(|_| bad.clone())?;
                if n != PAGE {
                    return Err(bad);
                }
            }
            PageKind::ZstdWin => {
                let w = window.ok_or(DecodePageError::MissingBase(kind))?;
                let n = self
                    .dctx
                    .decompress_using_dict(&mut out[..], data, w)
                    .map_err(|_| bad.clone())?;
                if n != PAGE {
                    return Err(bad);
                }
            }
            PageKind::Lz => {
                let w = window
                    .or(base.map(|b| &b[..]))
                    .ok_or(DecodePageError::MissingBase(kind))?;
                lz_decode(data, w, out)?;
            }
            PageKind::Raw => {
                if data.len() != PAGE {
                    return Err(bad);
                }
                out.copy_from_slice(data);
            }
            PageKind::Lz4 => {
                let n = lz4_flex::block::decompress_into(data, &mut out[..])
                    .map_err(|_| bad.clone())?;
                if n != PAGE {
                    return Err(bad);
                }
            }
            PageKind::Zstd => {
                let n = self
                    .dctx
                    .decompress(&mut out[..], data)
                    .map_err(|_| bad.clone())?;
                if n != PAGE {
                    return Err(bad);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn page(v: &[u8]) -> Box<Page> {
        let mut p = Box::new([0u8; PAGE]);
        for (i, b) in p.iter_mut().enumerate() {
            *b = v[i % v.len()].wrapping_add((i / 7) as u8);
        }
        p
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn every_codec_round_trips(seed in proptest::collection::vec(any::<u8>(), 1..64),
                                   edits in proptest::collection::vec((0usize..PAGE, any::<u8>()), 0..200),
                                   standalone in 0u8..3, zref in any::<bool>()) {
            let base = page(&seed);
            let mut target = base.clone();
            for (i, b) in edits { target[i] = b; }
            let cfg = CodecConfig {
                zstd_ref: zref,
                standalone: [Standalone::Raw, Standalone::Lz4, Standalone::Zstd(1)][usize::from(standalone)],
                ..CodecConfig::default()
            };
            let mut enc = Encoder::default();
            let mut dec = Decoder::default();
            for b in [Some(&*base), None] {
                let mut data = Vec::new();
                let kind = enc.encode(&target, b, None, &cfg, &mut data);
                let mut out = [0u8; PAGE];
                dec.decode(kind, &data, b, None, &mut out).unwrap();
                prop_assert_eq!(&out[..], &target[..]);
            }
        }

        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300), kind in 0u8..9) {
            let kind = PageKind::from_u8(kind).unwrap();
            let base = [7u8; PAGE];
            let mut out = [0u8; PAGE];
            let _ = Decoder::default().decode(kind, &data, Some(&base), Some(&base), &mut out);
        }
    }

    #[test]
    fn small_edit_gives_small_sparse_patch() {
        let base = page(b"hello world");
        let mut t = base.clone();
        t[100] ^= 1;
        t[2000..2008].copy_from_slice(&[9; 8]);
        let cfg = CodecConfig {
            lz: false,
            ..CodecConfig::default()
        };
        let mut data = Vec::new();
        let kind = Encoder::default().encode(&t, Some(&base), None, &cfg, &mut data);
        assert_eq!(kind, PageKind::Sparse);
        assert!(data.len() < 20, "{}", data.len());
    }
}

#[cfg(test)]
mod window_tests {
    use super::*;

    #[test]
    fn window_codec_round_trips_shifted_content() {
        let mut w = vec![0u8; 3 * PAGE];
        let mut x = 1u32;
        for b in w.iter_mut() {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            *b = (x >> 24) as u8 & 0x0F;
        }
        let mut target = [0u8; PAGE];
        target.copy_from_slice(&w[PAGE + 100..2 * PAGE + 100]);
        target[5] ^= 0xFF;
        let base: &Page = w[PAGE..2 * PAGE].try_into().unwrap();
        let cfg = CodecConfig {
            sparse_good_enough: 0,
            zref_min_gain: 0,
            lz: false,
            zstd_ref: true,
            ..CodecConfig::default()
        };
        let mut data = Vec::new();
        let kind =
            Encoder::default().encode(&target, Some(base), Some((&w, PAGE)), &cfg, &mut data);
        assert_eq!(kind, PageKind::ZstdWin);
        let mut out = [0u8; PAGE];
        Decoder::default()
            .decode(kind, &data, Some(base), Some(&w), &mut out)
            .unwrap();
        assert_eq!(out, target);
    }
}

#[cfg(test)]
mod lz_tests {
    use super::*;
    use proptest::prelude::*;

    fn noise(seed: u32, n: usize) -> Vec<u8> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                (x >> 24) as u8
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        /// Content shifted by any amount (pieces of it by different amounts), with edits,
        /// round-trips; word-multiple shifts give small encodings.
        #[test]
        fn lz_round_trips_shifted_content(seed in any::<u32>(), shift in 0usize..2 * PAGE,
                                          cut in 0usize..PAGE, shift2 in 0usize..2 * PAGE,
                                          edits in proptest::collection::vec((0usize..PAGE, any::<u8>()), 0..40)) {
            let w = noise(seed, 3 * PAGE);
            let mut t = [0u8; PAGE];
            t[..cut].copy_from_slice(&w[shift..shift + cut]);
            t[cut..].copy_from_slice(&w[shift2 + cut..shift2 + PAGE]);
            for (i, b) in edits { t[i] = b; }
            let mut table = Box::new([0u16; 1 << LZ_BITS]);
            let mut data = Vec::new();
            if lz_encode(&t, &w, PAGE, &mut table, PAGE * 2, &mut data) {
                let mut out = [0u8; PAGE];
                lz_decode(&data, &w, &mut out).unwrap();
                prop_assert_eq!(&out[..], &t[..]);
            }
            if shift % 8 == 0 && shift2 % 8 == 0 && cut % 8 == 0 {
                prop_assert!(data.len() < 600, "{}", data.len());
            }
        }

        #[test]
        fn lz_garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let w = noise(1, 2 * PAGE);
            let mut out = [0u8; PAGE];
            let _ = lz_decode(&data, &w, &mut out);
        }
    }

    #[test]
    fn pointer_edits_give_small_lz_patch_and_codec_picks_it() {
        let w = noise(9, 5 * PAGE);
        let mut t = [0u8; PAGE];
        // Shifted by 48 bytes relative to the base page, with a few changed pointer bytes.
        t.copy_from_slice(&w[2 * PAGE + 48..3 * PAGE + 48]);
        for i in (0..PAGE).step_by(512) {
            t[i] ^= 0x11;
        }
        let base: &Page = w[2 * PAGE..3 * PAGE].try_into().unwrap();
        let cfg = CodecConfig::default();
        let mut data = Vec::new();
        let kind = Encoder::default().encode(&t, Some(base), Some((&w, 2 * PAGE)), &cfg, &mut data);
        assert_eq!(kind, PageKind::Lz);
        assert!(data.len() < 100, "{}", data.len());
        let mut out = [0u8; PAGE];
        Decoder::default()
            .decode(kind, &data, Some(base), Some(&w), &mut out)
            .unwrap();
        assert_eq!(out, t);
    }
}
