//! Page codecs: how one page is stored, and the measured choice between them.
//!
//! - `Zero`, `Same`: no bytes.
//! - `Sparse`: an own byte-run diff against the base page: records `(skip, len, bytes)` with
//!   LEB128 `skip`/`len`. Decoding is a copy of the base page plus a few small copies (memcpy
//!   speed); it cannot express shifted content. Stored in the store's zstd blocks.
//! - `ZstdRef` / `ZstdWin`: zstd with the base page (or a window of base pages around it) as
//!   raw-content prefix: handles shifted content, ~1.5–2 µs to decode.
//! - `Raw` (in the store's zstd blocks), `Lz4`, `Zstd`: the page on its own.
//!
//! Measured on real pages of Python sandboxes (ASLR on, rebased; see the crate README): sparse
//! diffs average ~1–2 KB raw but 2.3–2.7× less in blocks; zstd with the base page averages
//! ~370–540 B. So the encoder computes the sparse diff, takes it when it is small
//! (`sparse_good_enough`), and otherwise takes zstd only when `block_factor × zstd + zref_min_gain
//! ≤ sparse`.

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
            _ => return None,
        })
    }

    /// Whether decoding needs the base page.
    pub fn needs_base(self) -> bool {
        matches!(
            self,
            Self::Same | Self::Sparse | Self::ZstdRef | Self::ZstdWin
        )
    }

    /// Whether the page's data is compressed together with its neighbours' (in the store's
    /// blocks) rather than on its own.
    pub fn in_block(self) -> bool {
        matches!(self, Self::Sparse | Self::Raw)
    }

    /// Whether decoding needs the window of base pages (instead of the base page).
    pub fn needs_window(self) -> bool {
        self == Self::ZstdWin
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
}

impl Default for CodecConfig {
    fn default() -> Self {
        Self {
            zstd_ref: true,
            zstd_ref_level: 1,
            sparse_good_enough: 800,
            zref_min_gain: 64,
            block_factor: 4,
            standalone: Standalone::Raw,
            window_radius: 2,
            patch_threshold: 2048,
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

/// A reusable encoder (one per thread).
pub struct Encoder {
    cctx: zstd_safe::CCtx<'static>,
    buf: Vec<u8>,
}

impl Default for Encoder {
    fn default() -> Self {
        Self {
            cctx: zstd_safe::CCtx::create(),
            buf: Vec::with_capacity(2 * PAGE),
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
    /// `window` (base pages around `base`, see [`crate::BasePages::window`]) replaces the base
    /// page as zstd dictionary when given. Zero pages must be detected by the caller.
    pub fn encode(
        &mut self,
        target: &Page,
        base: Option<&Page>,
        window: Option<&[u8]>,
        cfg: &CodecConfig,
        out: &mut Vec<u8>,
    ) -> PageKind {
        if let Some(base) = base {
            if target == base {
                return PageKind::Same;
            }
            let start = out.len();
            let limit = cfg.patch_threshold.min(PAGE);
            let sparse_ok = sparse_encode(target, base, limit, out);
            let sparse_len = if sparse_ok {
                out.len() - start
            } else {
                usize::MAX
            };
            if sparse_len <= cfg.sparse_good_enough {
                return PageKind::Sparse;
            }
            if cfg.zstd_ref {
                self.buf.clear();
                let dict: &[u8] = window.unwrap_or(base);
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
                        <= sparse_len
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
            if sparse_ok {
                return PageKind::Sparse;
            }
            out.truncate(start);
        }
        self.standalone(target, cfg, out)
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
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300), kind in 0u8..8) {
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
        let mut data = Vec::new();
        let kind =
            Encoder::default().encode(&t, Some(&base), None, &CodecConfig::default(), &mut data);
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
            ..CodecConfig::default()
        };
        let mut data = Vec::new();
        let kind = Encoder::default().encode(&target, Some(base), Some(&w), &cfg, &mut data);
        assert_eq!(kind, PageKind::ZstdWin);
        let mut out = [0u8; PAGE];
        Decoder::default()
            .decode(kind, &data, Some(base), Some(&w), &mut out)
            .unwrap();
        assert_eq!(out, target);
    }
}
