//! A dump's pages (memory-mapped) with its mapping tables, and the `BasePages` seam.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use medes_criu_image::{ImageDir, LoadImagesError};

use crate::rebase::MappingTable;
use crate::registry::BaseId;
use crate::{PAGE, Page};

/// One process's pages of a dump.
#[derive(Debug)]
pub struct ProcessPages {
    /// The pid in the image names.
    pub pid: u32,
    /// The pages image's file name.
    pub pages_file: String,
    /// Number of pages.
    pub n_pages: u64,
    /// The process's mapping table (pointer rebasing).
    pub table: MappingTable,
    map: PagesMap,
}

impl ProcessPages {
    /// The raw pages image.
    pub fn bytes(&self) -> &[u8] {
        self.map.bytes()
    }
}

#[derive(Debug)]
enum PagesMap {
    Mapped(memmap2::Mmap),
    Empty,
}

impl PagesMap {
    fn bytes(&self) -> &[u8] {
        match self {
            Self::Mapped(m) => m,
            Self::Empty => &[],
        }
    }
}

/// A CRIU dump with its pages memory-mapped: all processes' pages form one sequence (process
/// order by pid, pagemap order within a process), indexed from 0.
#[derive(Debug)]
pub struct DumpImage {
    /// The parsed non-page images.
    pub dir: ImageDir,
    /// Pages per process.
    pub procs: Vec<ProcessPages>,
    /// Index of each process's first page.
    first_page: Vec<u64>,
    /// Position key of every page ([`MappingTable::position_key`]).
    positions: Vec<u64>,
    n_pages: u64,
}

/// Error opening a dump.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenDumpError {
    /// The CRIU images could not be loaded.
    #[error("loading images")]
    Images(#[from] LoadImagesError),
    /// A pages image could not be mapped.
    #[error("mapping {path:?}")]
    Map {
        /// The pages image.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A process has no mm image.
    #[error("process {pid} has no mm image")]
    NoMm {
        /// The pid.
        pid: u32,
    },
}

fn map_file(path: &Path) -> Result<PagesMap, OpenDumpError> {
    let err = |source| OpenDumpError::Map {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(err)?;
    if file.metadata().map_err(err)?.len() == 0 {
        return Ok(PagesMap::Empty);
    }
    // SAFETY: the pages image is a CRIU output file that medes does not modify while a dump is
    // open (images are written once, then only read or deleted; deletion keeps the mapping
    // valid). JUSTIFICATION: mapping avoids copying hundreds of MB of pages per dump.
    #[allow(unsafe_code)]
    let m = unsafe { memmap2::Mmap::map(&file) }.map_err(err)?;
    Ok(PagesMap::Mapped(m))
}

impl DumpImage {
    /// Opens a CRIU image directory (sizes are checked against the pagemaps).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, OpenDumpError> {
        let dir = ImageDir::load(path.as_ref())?;
        let mut procs = Vec::new();
        let mut first_page = Vec::new();
        let mut n_pages = 0u64;
        let mut positions = Vec::new();
        for p in &dir.processes {
            let mm = p.mm.as_ref().ok_or(OpenDumpError::NoMm { pid: p.pid })?;
            let pages_file = p.pages_file_name();
            let map = map_file(&dir.path.join(&pages_file))?;
            let n = p.pagemap.n_present_pages();
            first_page.push(n_pages);
            n_pages += n;
            let table = MappingTable::new(mm, &dir.reg_files);
            for r in p.pagemap.present_runs() {
                for i in 0..r.nr_pages {
                    positions.push(table.position_key(r.vaddr.wrapping_add(i * PAGE as u64)));
                }
            }
            procs.push(ProcessPages {
                pid: p.pid,
                pages_file,
                n_pages: n,
                table,
                map,
            });
        }
        positions.resize(n_pages as usize, 0);
        Ok(Self {
            dir,
            procs,
            first_page,
            positions,
            n_pages,
        })
    }

    /// Position keys of all pages (same mapping and page offset ⇒ same key across dumps).
    pub fn positions(&self) -> &[u64] {
        &self.positions
    }

    /// Total pages.
    pub fn n_pages(&self) -> u64 {
        self.n_pages
    }

    /// Bytes of all pages images.
    pub fn pages_bytes(&self) -> u64 {
        self.n_pages * PAGE as u64
    }

    /// Process index and page index within it of global page `idx`.
    pub fn locate(&self, idx: u64) -> Option<(usize, u64)> {
        if idx >= self.n_pages {
            return None;
        }
        let p = self.first_page.partition_point(|&f| f <= idx) - 1;
        Some((p, idx - self.first_page[p]))
    }

    /// The raw page `idx`.
    pub fn page(&self, idx: u64) -> Option<&Page> {
        let (p, i) = self.locate(idx)?;
        let o = usize::try_from(i).ok()? * PAGE;
        self.procs[p]
            .map
            .bytes()
            .get(o..o + PAGE)
            .and_then(|s| s.try_into().ok())
    }

    /// The page as the codec sees it: rebased with its process's table when `rebase` is set
    /// and possible. Returns the page and whether it was rebased.
    pub fn canonical_page(&self, idx: u64, rebase: bool) -> Option<(Cow<'_, Page>, bool)> {
        let raw = self.page(idx)?;
        if rebase {
            let (p, _) = self.locate(idx)?;
            let mut out = [0u8; PAGE];
            if self.procs[p].table.rebase(raw, &mut out).is_some() {
                return Some((Cow::Owned(out), true));
            }
        }
        Some((Cow::Borrowed(raw), false))
    }
}

/// Error fetching a base page.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BasePageError {
    /// The base is not available.
    #[error("base {0:?} is not available")]
    MissingBase(BaseId),
    /// The base has no such page.
    #[error("base {base:?} has no page {page}")]
    MissingPage {
        /// The base.
        base: BaseId,
        /// The page index.
        page: u64,
    },
}

/// Source of base pages for encoding and rebuild. A later implementation may serve remote pages.
///
/// Pages are returned *as the codec sees them*: rebased with the base's own mapping table when
/// pointer rebasing is on.
pub trait BasePages: Sync {
    /// Base page `idx` of `base`.
    fn page(&self, base: BaseId, idx: u64) -> Result<Cow<'_, Page>, BasePageError>;

    /// Number of pages of `base`.
    fn n_pages(&self, base: BaseId) -> Result<u64, BasePageError>;

    /// Pages `idx - radius ..= idx + radius` of `base` (clamped to its pages), contiguous: the
    /// dictionary of the `ZstdWin` codec. The default concatenates [`BasePages::page`].
    fn window(&self, base: BaseId, idx: u64, radius: u64) -> Result<Cow<'_, [u8]>, BasePageError> {
        let (start, end) = window_range(idx, radius, self.n_pages(base)?);
        let mut v = Vec::with_capacity((end - start) as usize * PAGE);
        for i in start..end {
            v.extend_from_slice(&self.page(base, i)?[..]);
        }
        Ok(Cow::Owned(v))
    }
}

/// The page range of a window (see [`BasePages::window`]).
pub fn window_range(idx: u64, radius: u64, n_pages: u64) -> (u64, u64) {
    let start = idx.saturating_sub(radius);
    let end = idx.saturating_add(radius).saturating_add(1).min(n_pages);
    (start.min(end), end)
}

/// Local bases: memory-mapped dumps, rebased on the fly or from a precomputed canonical copy.
#[derive(Debug, Default)]
pub struct LocalBases {
    bases: HashMap<BaseId, LocalBase>,
    rebase: bool,
}

#[derive(Debug)]
struct LocalBase {
    dump: DumpImage,
    /// Precomputed canonical (rebased) pages, if materialised.
    canonical: Option<Vec<u8>>,
}

impl LocalBases {
    /// An empty set; `rebase` says whether pages are served rebased.
    pub fn new(rebase: bool) -> Self {
        Self {
            bases: HashMap::new(),
            rebase,
        }
    }

    /// Adds a base dump.
    pub fn insert(&mut self, id: BaseId, dump: DumpImage) {
        self.bases.insert(
            id,
            LocalBase {
                dump,
                canonical: None,
            },
        );
    }

    /// Removes a base.
    pub fn remove(&mut self, id: BaseId) -> Option<DumpImage> {
        self.bases.remove(&id).map(|b| b.dump)
    }

    /// The dump of a base.
    pub fn dump(&self, id: BaseId) -> Option<&DumpImage> {
        self.bases.get(&id).map(|b| &b.dump)
    }

    /// Precomputes the rebased pages of every base in memory (faster rebuilds at the cost of a
    /// copy of each base). No-op without rebasing.
    pub fn materialize(&mut self) {
        if !self.rebase {
            return;
        }
        for b in self.bases.values_mut() {
            if b.canonical.is_some() {
                continue;
            }
            let mut v = Vec::with_capacity(b.dump.pages_bytes() as usize);
            for i in 0..b.dump.n_pages() {
                if let Some((p, _)) = b.dump.canonical_page(i, true) {
                    v.extend_from_slice(&p[..]);
                }
            }
            b.canonical = Some(v);
        }
    }
}

impl BasePages for LocalBases {
    fn n_pages(&self, base: BaseId) -> Result<u64, BasePageError> {
        self.bases
            .get(&base)
            .map(|b| b.dump.n_pages())
            .ok_or(BasePageError::MissingBase(base))
    }

    fn window(&self, base: BaseId, idx: u64, radius: u64) -> Result<Cow<'_, [u8]>, BasePageError> {
        let b = self
            .bases
            .get(&base)
            .ok_or(BasePageError::MissingBase(base))?;
        let (start, end) = window_range(idx, radius, b.dump.n_pages());
        if idx >= end {
            return Err(BasePageError::MissingPage { base, page: idx });
        }
        if let Some(c) = &b.canonical {
            return Ok(Cow::Borrowed(
                &c[start as usize * PAGE..end as usize * PAGE],
            ));
        }
        if !self.rebase && b.dump.locate(start).map(|l| l.0) == b.dump.locate(end - 1).map(|l| l.0)
        {
            // Raw pages of one process are contiguous in its mapped pages image.
            let (p, i) = b
                .dump
                .locate(start)
                .ok_or(BasePageError::MissingPage { base, page: start })?;
            let o = i as usize * PAGE;
            let bytes = b.dump.procs[p].bytes();
            return bytes
                .get(o..o + (end - start) as usize * PAGE)
                .map(Cow::Borrowed)
                .ok_or(BasePageError::MissingPage { base, page: idx });
        }
        let mut v = Vec::with_capacity((end - start) as usize * PAGE);
        for i in start..end {
            v.extend_from_slice(&self.page(base, i)?[..]);
        }
        Ok(Cow::Owned(v))
    }

    fn page(&self, base: BaseId, idx: u64) -> Result<Cow<'_, Page>, BasePageError> {
        let b = self
            .bases
            .get(&base)
            .ok_or(BasePageError::MissingBase(base))?;
        let missing = BasePageError::MissingPage { base, page: idx };
        if let Some(c) = &b.canonical {
            let o = usize::try_from(idx).map_err(|_| missing.clone())? * PAGE;
            let s: &Page = c
                .get(o..o + PAGE)
                .and_then(|s| s.try_into().ok())
                .ok_or(missing)?;
            return Ok(Cow::Borrowed(s));
        }
        b.dump
            .canonical_page(idx, self.rebase)
            .map(|(p, _)| p)
            .ok_or(missing)
    }
}
