//! Rebuild: store + base pages → the exact pages images CRIU restores from.
//!
//! The page data comes from the store in memory, or, for a [`Rebuilder::from_file`], from the
//! store file read batch by batch ([`crate::store::StoreFile`]); either way every rebuilt page
//! is verified against its xxh3 before it is handed over.

use std::path::{Path, PathBuf};

use medes_criu_image::{DecodeImageError, decode_mm, reg_file_names};
use rayon::prelude::*;
use xxhash_rust::xxh3::xxh3_64;

use crate::codec::{DecodePageError, Decoder};
use crate::image::{BasePageError, BasePages};
use crate::rebase::{MappingTable, UnknownMapping};
use crate::store::{DedupStore, ReadPayloadError, StoreFile};
use crate::{PAGE, Page};

/// Pages decoded per parallel work item (one store block).
const BATCH: usize = crate::store::BLOCK_PAGES;

/// Error rebuilding a sandbox's pages. Every variant that concerns a page names it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RebuildError {
    /// A page's base page is unavailable.
    #[error("page {page}: base page unavailable")]
    BasePage {
        /// The page index.
        page: u64,
        /// The cause.
        #[source]
        source: BasePageError,
    },
    /// A page's stored data could not be decoded.
    #[error("page {page}: cannot decode")]
    Decode {
        /// The page index.
        page: u64,
        /// The cause.
        #[source]
        source: DecodePageError,
    },
    /// A page's rebased pointers name an unknown mapping.
    #[error("page {page}: cannot restore pointers")]
    Unrebase {
        /// The page index.
        page: u64,
        /// The cause.
        #[source]
        source: UnknownMapping,
    },
    /// A rebuilt page does not match its checksum.
    #[error("page {page}: checksum mismatch")]
    Checksum {
        /// The page index.
        page: u64,
    },
    /// A page references a base slot the store does not have.
    #[error("page {page}: unknown base slot {slot}")]
    BaseSlot {
        /// The page index.
        page: u64,
        /// The slot.
        slot: u16,
    },
    /// The store lacks or has a corrupt mm/files image needed to restore pointers.
    #[error("image {name} needed to restore pointers is missing or corrupt")]
    Image {
        /// The image name.
        name: String,
        /// The decode error, if it was present.
        #[source]
        source: Option<DecodeImageError>,
    },
    /// The output buffer has the wrong size.
    #[error("output buffer has {found} bytes, expected {expected}")]
    OutputSize {
        /// Expected bytes.
        expected: u64,
        /// Bytes given.
        found: u64,
    },
    /// A page's stored data could not be read from the store file ([`Rebuilder::from_file`]).
    #[error("page {page}: cannot read its data from the store file")]
    Read {
        /// The first page of the batch whose data was read.
        page: u64,
        /// The cause.
        #[source]
        source: ReadPayloadError,
    },
    /// The caller of [`rebuild_batches`] asked to stop.
    #[error("the rebuild was stopped by its caller")]
    Stopped,
    /// Writing the rebuilt images failed.
    #[error("writing {path:?}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// The mapping tables of the store's processes (needed when any page is rebased).
fn tables(store: &DedupStore) -> Result<Vec<Option<MappingTable>>, RebuildError> {
    let mut first = 0u64;
    let mut out = Vec::new();
    let reg = match store.images.get("files.img") {
        Some(b) => Some(reg_file_names(b).map_err(|e| RebuildError::Image {
            name: "files.img".into(),
            source: Some(e),
        })?),
        None => None,
    };
    for p in &store.procs {
        let range = first as usize..(first + p.n_pages) as usize;
        first += p.n_pages;
        if !store
            .pages
            .get(range)
            .is_some_and(|r| r.iter().any(|e| e.rebased))
        {
            out.push(None);
            continue;
        }
        let name = format!("mm-{}.img", p.pid);
        let mm = store.images.get(&name).ok_or(RebuildError::Image {
            name: name.clone(),
            source: None,
        })?;
        let mm = decode_mm(mm).map_err(|e| RebuildError::Image {
            name,
            source: Some(e),
        })?;
        let reg = reg.as_ref().ok_or(RebuildError::Image {
            name: "files.img".into(),
            source: None,
        })?;
        out.push(Some(MappingTable::new(&mm, reg)));
    }
    Ok(out)
}

/// What every batch of a rebuild needs: mapping tables, page → process, data offsets.
struct Plan<'a> {
    store: &'a DedupStore,
    bases: &'a dyn BasePages,
    data: &'a PlanData,
    /// Where the page data is read from when not in `store` (its `blob` and `blocks` empty).
    file: Option<&'a StoreFile>,
}

/// The store-derived part of a [`Plan`].
struct PlanData {
    tables: Vec<Option<MappingTable>>,
    proc_of: Vec<u16>,
    offsets: Vec<u64>,
}

impl PlanData {
    fn new(store: &DedupStore) -> Result<Self, RebuildError> {
        let tables = tables(store)?;
        let mut proc_of = Vec::with_capacity(store.pages.len());
        for (pi, p) in store.procs.iter().enumerate() {
            proc_of.extend(std::iter::repeat_n(pi as u16, p.n_pages as usize));
        }
        Ok(PlanData {
            tables,
            proc_of,
            offsets: store.offsets(),
        })
    }
}

impl Plan<'_> {
    /// Decodes batch `b` (pages `b * BATCH ..`) into `chunk` (its pages, in order), verifying
    /// every page.
    fn batch(
        &self,
        dec: &mut Decoder,
        block: &mut Vec<u8>,
        b: usize,
        chunk: &mut [u8],
    ) -> Result<(), RebuildError> {
        self.batch_only(dec, block, &mut Vec::new(), b, chunk, None, false)
    }

    /// [`Plan::batch`] for the pages `only` accepts (all when `None`); the others' bytes in
    /// `chunk` are left as they are. `block` already holds batch `b`'s decompressed block when
    /// `have_block`. With a store file, `raw` receives what is read from it (the compressed
    /// block, then the batch's range of the blob).
    #[allow(clippy::too_many_arguments)]
    fn batch_only(
        &self,
        dec: &mut Decoder,
        block: &mut Vec<u8>,
        raw: &mut Vec<u8>,
        b: usize,
        chunk: &mut [u8],
        only: Option<&dyn Fn(u64) -> bool>,
        have_block: bool,
    ) -> Result<(), RebuildError> {
        let (store, bases) = (self.store, self.bases);
        let expected = store.n_pages() * PAGE as u64;
        let want = store.block_len(b);
        if !have_block {
            block.clear();
        }
        if want > 0 && !have_block {
            let first = store.pages[b * BATCH..]
                .iter()
                .position(|e| e.kind.in_block())
                .unwrap_or(0);
            let bad = || RebuildError::Decode {
                page: (b * BATCH + first) as u64,
                source: DecodePageError::Malformed(store.pages[b * BATCH + first].kind),
            };
            match self.file {
                None => {
                    let src = store.blocks.get(b).ok_or_else(bad)?;
                    dec.decompress_block(src, block, want).map_err(|_| bad())?;
                }
                Some(f) => {
                    let src = f.read_block(b, raw).map_err(|source| RebuildError::Read {
                        page: (b * BATCH) as u64,
                        source,
                    })?;
                    dec.decompress_block(src, block, want).map_err(|_| bad())?;
                }
            }
        }
        // The data of the batch's pages stored on their own: the whole blob in memory, or
        // the batch's range of it read from the file.
        let (blob, blob_lo): (&[u8], u64) = match self.file {
            None => (&store.blob, 0),
            Some(f) => {
                let (mut lo, mut hi) = (u64::MAX, 0u64);
                let n = store.pages.len();
                let span = (b * BATCH).min(n)..(b * BATCH + chunk.len() / PAGE).min(n);
                for i in span {
                    let e = &store.pages[i];
                    if !e.kind.in_block() && e.len > 0 {
                        let o = self.data.offsets[i];
                        lo = lo.min(o);
                        hi = hi.max(o + u64::from(e.len));
                    }
                }
                if lo < hi {
                    let src = f
                        .read_blob(lo..hi, raw)
                        .map_err(|source| RebuildError::Read {
                            page: (b * BATCH) as u64,
                            source,
                        })?;
                    (src, lo)
                } else {
                    (&[][..], 0)
                }
            }
        };
        for (j, dst) in chunk.chunks_exact_mut(PAGE).enumerate() {
            let i = b * BATCH + j;
            let page = i as u64;
            if only.is_some_and(|f| !f(page)) {
                continue;
            }
            let e = store
                .pages
                .get(i)
                .ok_or(RebuildError::OutputSize { expected, found: 0 })?;
            let dst: &mut Page = dst
                .try_into()
                .map_err(|_| RebuildError::OutputSize { expected, found: 0 })?;
            let id =
                if e.kind.needs_base() {
                    Some(*store.bases.get(usize::from(e.base_slot)).ok_or(
                        RebuildError::BaseSlot {
                            page,
                            slot: e.base_slot,
                        },
                    )?)
                } else {
                    None
                };
            let bp = |source| RebuildError::BasePage { page, source };
            let (base, window) = match id {
                Some(id) if e.kind.needs_window() => (
                    None,
                    Some(
                        bases
                            .window(id, u64::from(e.base_page), store.window_radius)
                            .map_err(bp)?,
                    ),
                ),
                Some(id) => (
                    Some(bases.page(id, u64::from(e.base_page)).map_err(bp)?),
                    None,
                ),
                None => (None, None),
            };
            let (src, o): (&[u8], usize) = if e.len == 0 {
                (&[], 0)
            } else if e.kind.in_block() {
                (block, self.data.offsets[i] as usize)
            } else {
                let o = self.data.offsets[i]
                    .checked_sub(blob_lo)
                    .unwrap_or(u64::MAX);
                (blob, usize::try_from(o).unwrap_or(usize::MAX))
            };
            let data =
                src.get(o..o.saturating_add(e.len as usize))
                    .ok_or(RebuildError::Decode {
                        page,
                        source: DecodePageError::Malformed(e.kind),
                    })?;
            dec.decode(e.kind, data, base.as_deref(), window.as_deref(), dst)
                .map_err(|source| RebuildError::Decode { page, source })?;
            if e.rebased {
                let proc_idx = self
                    .data
                    .proc_of
                    .get(i)
                    .map_or(usize::MAX, |&p| usize::from(p));
                let t = self
                    .data
                    .tables
                    .get(proc_idx)
                    .and_then(Option::as_ref)
                    .ok_or(RebuildError::Unrebase {
                        page,
                        source: UnknownMapping { id: 0 },
                    })?;
                t.unrebase(dst)
                    .map_err(|source| RebuildError::Unrebase { page, source })?;
            }
            if xxh3_64(dst) != e.checksum {
                return Err(RebuildError::Checksum { page });
            }
        }
        Ok(())
    }
}

/// Rebuilds all pages of the store, in page order, into `out` (`n_pages * 4096` bytes), in
/// parallel on rayon's pool, verifying every page's checksum.
pub fn rebuild_into(
    store: &DedupStore,
    bases: &dyn BasePages,
    out: &mut [u8],
) -> Result<(), RebuildError> {
    let expected = store.n_pages() * PAGE as u64;
    if out.len() as u64 != expected {
        return Err(RebuildError::OutputSize {
            expected,
            found: out.len() as u64,
        });
    }
    let data = PlanData::new(store)?;
    let plan = Plan {
        store,
        bases,
        data: &data,
        file: None,
    };
    out.par_chunks_mut(PAGE * BATCH)
        .enumerate()
        .try_for_each_init(
            || (Decoder::default(), Vec::new()),
            |(dec, block), (b, chunk)| plan.batch(dec, block, b, chunk),
        )
}

/// Rebuilds each process's pages image (`pages-<id>.img`) into `dir`, in parallel on rayon's
/// pool, every page verified (see [`rebuild_to_files`]). Non-page images are not written.
pub fn rebuild_pages_files(
    store: &DedupStore,
    bases: &dyn BasePages,
    dir: &Path,
) -> Result<(), RebuildError> {
    let mut files = Vec::with_capacity(store.procs.len());
    for p in &store.procs {
        let path = dir.join(&p.pages_file);
        let f = std::fs::File::create(&path)
            .and_then(|f| f.set_len(p.n_pages * PAGE as u64).map(|()| f))
            .map_err(|source| RebuildError::Write { path, source })?;
        files.push(f);
    }
    rebuild_to_files(store, bases, &files)
}

/// Rebuilds the pages of each process of the store into its file (`files[i]` for
/// `store.procs[i]`, opened for writing), at offset 0, in parallel on rayon's pool, every page
/// verified. Each batch of pages is decoded into a small per-thread buffer and written at its
/// place (`pwrite`): no buffer of the whole image, whose page faults and zeroing cost about as
/// much as decoding when the files are on a tmpfs.
pub fn rebuild_to_files(
    store: &DedupStore,
    bases: &dyn BasePages,
    files: &[std::fs::File],
) -> Result<(), RebuildError> {
    use std::os::unix::fs::FileExt;
    if files.len() != store.procs.len() {
        return Err(RebuildError::OutputSize {
            expected: store.procs.len() as u64,
            found: files.len() as u64,
        });
    }
    let data = PlanData::new(store)?;
    let plan = Plan {
        store,
        bases,
        data: &data,
        file: None,
    };
    let mut spans = Vec::with_capacity(files.len());
    let mut first = 0u64;
    for (f, p) in files.iter().zip(&store.procs) {
        spans.push((f, PathBuf::from(&p.pages_file), first, first + p.n_pages));
        first += p.n_pages;
    }
    let n = store.pages.len();
    (0..n.div_ceil(BATCH)).into_par_iter().try_for_each_init(
        || (Decoder::default(), Vec::new(), vec![0u8; PAGE * BATCH]),
        |(dec, block, buf), b| {
            let pages = BATCH.min(n - b * BATCH);
            let chunk = &mut buf[..pages * PAGE];
            plan.batch(dec, block, b, chunk)?;
            // The batch may span processes: write each part into its own file.
            let (lo, hi) = ((b * BATCH) as u64, (b * BATCH + pages) as u64);
            for (f, path, start, end) in &spans {
                let (a, z) = (lo.max(*start), hi.min(*end));
                if a >= z {
                    continue;
                }
                let src = &chunk[(a - lo) as usize * PAGE..(z - lo) as usize * PAGE];
                f.write_all_at(src, (a - start) * PAGE as u64)
                    .map_err(|source| RebuildError::Write {
                        path: path.clone(),
                        source,
                    })?;
            }
            Ok(())
        },
    )
}

/// Rebuilds all pages into a new buffer.
pub fn rebuild_pages(store: &DedupStore, bases: &dyn BasePages) -> Result<Vec<u8>, RebuildError> {
    let mut out = vec![0u8; store.n_pages() as usize * PAGE];
    rebuild_into(store, bases, &mut out)?;
    Ok(out)
}

/// Rebuilds a CRIU image directory: every non-page image as stored, and each process's
/// `pages-<id>.img`. `dir` must exist.
pub fn rebuild_dir(
    store: &DedupStore,
    bases: &dyn BasePages,
    dir: &Path,
) -> Result<(), RebuildError> {
    for (name, data) in &store.images {
        let path = dir.join(name);
        std::fs::write(&path, data).map_err(|source| RebuildError::Write { path, source })?;
    }
    rebuild_pages_files(store, bases, dir)
}

/// Pages per batch of [`Rebuilder::rebuild_batch`] and [`rebuild_batches`] (one store block):
/// batch `b` holds the store's pages `b * BATCH_PAGES ..` (the last one may be shorter).
pub const BATCH_PAGES: usize = BATCH;

/// Per-thread scratch space of a [`Rebuilder`] (a decoder and a decompressed block, kept for
/// the next call on the same batch: several small page groups of one batch decompress its
/// block once).
#[derive(Default)]
pub struct RebuildScratch {
    dec: Decoder,
    block: Vec<u8>,
    /// What a file-backed rebuilder read from its store file last (a compressed block, a range
    /// of the blob).
    raw: Vec<u8>,
    /// The rebuilder ([`Rebuilder`]'s unique id) and batch whose block `block` holds.
    block_of: Option<(u64, usize)>,
}

/// Ids of [`Rebuilder`]s (one scratch may serve several).
static REBUILDERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A rebuild one batch at a time, in any order, from any thread: for callers that place the
/// pages themselves (e.g. copy them into a restored process as they come, or rebuild the batch
/// of a page asked for first). Owns what it needs, so it can live on its own thread. Every
/// page is verified against its checksum before a batch is returned.
///
/// The page data is read from the store in memory ([`Rebuilder::new`]) or, for a store opened
/// with [`DedupStore::open_lean`], from its file on demand ([`Rebuilder::from_file`]: each
/// batch's compressed block and range of the blob are read with `pread` into the caller's
/// [`RebuildScratch`], so no copy of the store's page data is held).
pub struct Rebuilder {
    id: u64,
    store: std::sync::Arc<DedupStore>,
    bases: std::sync::Arc<dyn BasePages + Send>,
    data: PlanData,
    file: Option<StoreFile>,
}

impl Rebuilder {
    /// Prepares a rebuild of `store` against `bases` (decodes the mapping tables once).
    pub fn new(
        store: std::sync::Arc<DedupStore>,
        bases: std::sync::Arc<dyn BasePages + Send>,
    ) -> Result<Self, RebuildError> {
        let data = PlanData::new(&store)?;
        let id = REBUILDERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Rebuilder {
            id,
            store,
            bases,
            data,
            file: None,
        })
    }

    /// Prepares a rebuild of a store opened with [`DedupStore::open_lean`] (`store`, whose
    /// `blob` and `blocks` are ignored, and `file`), reading its page data from the file on
    /// demand. The mapping tables are decoded from the store's mm and files images once, here;
    /// then its non-page images are dropped (the rebuild does not need them: write them out
    /// before), so the rebuilder holds only the store's metadata.
    ///
    /// Every page is still verified against its xxh3: a store file changed since it was opened
    /// (and verified) fails the batch that reads the changed bytes ([`RebuildError::Checksum`],
    /// [`RebuildError::Decode`], or [`RebuildError::Read`] for a truncated file), never yields a
    /// wrong page.
    pub fn from_file(
        mut store: DedupStore,
        file: StoreFile,
        bases: std::sync::Arc<dyn BasePages + Send>,
    ) -> Result<Self, RebuildError> {
        let data = PlanData::new(&store)?;
        store.images = Default::default();
        store.blob = Vec::new();
        store.blocks = Vec::new();
        let id = REBUILDERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Rebuilder {
            id,
            store: std::sync::Arc::new(store),
            bases,
            data,
            file: Some(file),
        })
    }

    /// Whether the page data is read from the store file ([`Rebuilder::from_file`]).
    pub fn is_file_backed(&self) -> bool {
        self.file.is_some()
    }

    /// Memory this rebuilder holds of the store, bytes: the metadata (page table, processes,
    /// bases, per-page offsets and processes, mapping tables, block offsets) and, for one made
    /// with [`Rebuilder::new`], the store's page data and non-page images too (shared with the
    /// caller's `Arc`). Excludes the per-thread [`RebuildScratch`] buffers.
    pub fn held_bytes(&self) -> u64 {
        use std::mem::size_of;
        let s = &*self.store;
        let mut n = size_of::<Self>() + size_of::<DedupStore>();
        n += s.pages.capacity() * size_of::<crate::store::PageEntry>();
        n += s.bases.capacity() * size_of::<crate::registry::BaseId>();
        n += s
            .procs
            .iter()
            .map(|p| size_of::<crate::store::StoredProcess>() + p.pages_file.capacity())
            .sum::<usize>();
        n += s.blob.capacity();
        n += s
            .blocks
            .iter()
            .map(|b| b.capacity() + size_of::<Vec<u8>>())
            .sum::<usize>();
        n += s
            .images
            .iter()
            .map(|(k, v)| k.capacity() + v.capacity() + 64)
            .sum::<usize>();
        n += self.data.offsets.capacity() * size_of::<u64>();
        n += self.data.proc_of.capacity() * size_of::<u16>();
        n += self
            .data
            .tables
            .iter()
            .map(|t| {
                size_of::<Option<MappingTable>>() + t.as_ref().map_or(0, MappingTable::heap_bytes)
            })
            .sum::<usize>();
        n as u64 + self.file.as_ref().map_or(0, StoreFile::held_bytes)
    }

    /// The store being rebuilt.
    pub fn store(&self) -> &DedupStore {
        &self.store
    }

    /// Number of batches.
    pub fn n_batches(&self) -> usize {
        self.store.pages.len().div_ceil(BATCH)
    }

    /// The store's page indices of batch `b` (empty past the end).
    pub fn batch_pages(&self, b: usize) -> std::ops::Range<u64> {
        let n = self.store.pages.len();
        let lo = (b.saturating_mul(BATCH)).min(n);
        let hi = (lo + BATCH).min(n);
        lo as u64..hi as u64
    }

    /// Rebuilds batch `b` into `out` (exactly its pages × 4096 bytes), every page verified:
    /// on `Err` the contents of `out` must not be used.
    pub fn rebuild_batch(
        &self,
        b: usize,
        scratch: &mut RebuildScratch,
        out: &mut [u8],
    ) -> Result<(), RebuildError> {
        self.batch_into(b, scratch, out, None)
    }

    /// [`Rebuilder::rebuild_batch`] for only the pages of batch `b` that lie in `pages`
    /// (store page indices, sorted ranges), each verified; the bytes of the other pages in `out`
    /// are left as they are. For the few pages needed before all others (decoding a batch's
    /// block once, then only those pages).
    pub fn rebuild_batch_pages(
        &self,
        b: usize,
        pages: &[std::ops::Range<u64>],
        scratch: &mut RebuildScratch,
        out: &mut [u8],
    ) -> Result<(), RebuildError> {
        let only = |p: u64| {
            let i = pages.partition_point(|x| x.end <= p);
            pages.get(i).is_some_and(|x| x.start <= p)
        };
        self.batch_into(b, scratch, out, Some(&only))
    }

    /// Batch `b` into `out` (checked to be exactly its size): every page, or those `only` keeps.
    fn batch_into(
        &self,
        b: usize,
        scratch: &mut RebuildScratch,
        out: &mut [u8],
        only: Option<&dyn Fn(u64) -> bool>,
    ) -> Result<(), RebuildError> {
        let r = self.batch_pages(b);
        let expected = (r.end - r.start) * PAGE as u64;
        if r.is_empty() || out.len() as u64 != expected {
            return Err(RebuildError::OutputSize {
                expected,
                found: out.len() as u64,
            });
        }
        let plan = Plan {
            store: &self.store,
            bases: &*self.bases,
            data: &self.data,
            file: self.file.as_ref(),
        };
        let have = scratch.block_of == Some((self.id, b));
        scratch.block_of = None;
        plan.batch_only(
            &mut scratch.dec,
            &mut scratch.block,
            &mut scratch.raw,
            b,
            out,
            only,
            have,
        )?;
        scratch.block_of = Some((self.id, b));
        Ok(())
    }
}

/// Rebuilds every page of the store in batches of [`BATCH_PAGES`], in parallel on rayon's
/// pool, and hands each verified batch to `f(first page index, pages)`; a batch that fails
/// verification (or cannot be decoded) is never handed over, and the rebuild stops with its
/// error. `f` returning `false` stops the rebuild with [`RebuildError::Stopped`].
pub fn rebuild_batches<F>(
    store: &DedupStore,
    bases: &dyn BasePages,
    f: F,
) -> Result<(), RebuildError>
where
    F: Fn(u64, &[u8]) -> bool + Sync,
{
    let data = PlanData::new(store)?;
    let plan = Plan {
        store,
        bases,
        data: &data,
        file: None,
    };
    let n = store.pages.len();
    (0..n.div_ceil(BATCH)).into_par_iter().try_for_each_init(
        || (Decoder::default(), Vec::new(), vec![0u8; PAGE * BATCH]),
        |(dec, block, buf), b| {
            let pages = BATCH.min(n - b * BATCH);
            let chunk = &mut buf[..pages * PAGE];
            plan.batch(dec, block, b, chunk)?;
            if f((b * BATCH) as u64, chunk) {
                Ok(())
            } else {
                Err(RebuildError::Stopped)
            }
        },
    )
}
