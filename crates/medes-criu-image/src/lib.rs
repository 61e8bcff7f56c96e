//! Reader and writer for the page-related CRIU image files.
//!
//! CRIU writes a process's memory as `pagemap-<pid>.img` (which virtual ranges were dumped),
//! `pages-<id>.img` (the raw 4 KiB pages of the present ranges, in pagemap order, no header) and
//! `mm-<pid>.img` (the address space: every VMA with its address, protection, flags and file).
//! `files.img` names the files mappings refer to. This crate parses and writes those with
//! hand-written `prost` structs whose field numbers and magics come from `python3-pycriu` (CRIU
//! 4.1.1), so it needs neither `protoc` nor CRIU's `.proto` files.
//!
//! ```no_run
//! use medes_criu_image::ImageDir;
//! let dir = ImageDir::load("/dev/shm/dump")?;
//! for p in &dir.processes {
//!     println!("pid {}: {} pages in pages-{}.img", p.pid, p.pagemap.n_present_pages(), p.pagemap.head.pages_id);
//! }
//! # Ok::<(), medes_criu_image::LoadImagesError>(())
//! ```
//!
//! Design decisions:
//! - Every image is framed as CRIU frames it: u32 LE magics (`IMG_COMMON`/`IMG_SERVICE` then the
//!   image's own magic; `inventory.img` has only its own), then entries, each a u32 LE length and a
//!   protobuf payload. Parsing is bounds-checked; bad input yields an error, never a panic.
//! - Both pagemap schemas are read: CRIU 4.1 keeps the page count in field 2 (u32), CRIU 4.2 in
//!   field 5 (u64). Writing always uses field 2, the only one CRIU 4.1 reads.
//! - The structs carry every field of the messages written back (pagemap, mm), so a read → write
//!   round trip is byte-identical for images CRIU 4.1 wrote.
//!
//! What it does not do: it never spawns CRIU or any process, and it does not model the other
//! image kinds (core, fdinfo, ...): callers keep those as opaque bytes.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod files;
mod frame;
mod lazify;
mod mm;
mod pagemap;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use files::{FileEntry, RegFileEntry, decode_files, reg_file_names};
pub use frame::{
    DecodeImageError, EncodeImageError, IMG_COMMON, IMG_SERVICE, MAGIC_FILES, MAGIC_INVENTORY,
    MAGIC_MM, MAGIC_PAGEMAP, RawImage, decode_raw, encode_raw,
};
pub use lazify::{Lazified, lazify, unlazify};
pub use mm::{AioRingEntry, MmEntry, VmaEntry, decode_mm, encode_mm, vma_status};
pub use pagemap::{
    PE_LAZY, PE_PARENT, PE_PRESENT, PageRun, Pagemap, PagemapEntry, PagemapHead, decode_pagemap,
    encode_pagemap,
};

/// Size of a page in CRIU's page images.
pub const PAGE_SIZE: usize = 4096;

/// The images of one dumped process that describe its memory.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessImages {
    /// The pid in the image file names (`pagemap-<pid>.img`, `mm-<pid>.img`).
    pub pid: u32,
    /// The parsed pagemap.
    pub pagemap: Pagemap,
    /// The parsed mm image (absent for threads that share their leader's mm).
    pub mm: Option<MmEntry>,
}

impl ProcessImages {
    /// File name of the pages image holding this process's present pages.
    pub fn pages_file_name(&self) -> String {
        format!("pages-{}.img", self.pagemap.head.pages_id)
    }
}

/// A CRIU image directory: every file's bytes except the page images, plus the parsed memory
/// images of every process.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageDir {
    /// The directory it was loaded from.
    pub path: PathBuf,
    /// All non-page files (`pages-*.img` excluded), by file name, as raw bytes.
    pub files: BTreeMap<String, Vec<u8>>,
    /// One entry per `pagemap-<pid>.img`, sorted by pid.
    pub processes: Vec<ProcessImages>,
    /// Names of the `files.img` regular files by file id (empty if `files.img` is absent).
    pub reg_files: BTreeMap<u32, String>,
}

/// Error loading an image directory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadImagesError {
    /// The directory or a file in it could not be read.
    #[error("reading {path:?}")]
    Read {
        /// The path that failed.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// An image file could not be decoded.
    #[error("decoding {name}")]
    Decode {
        /// The file name.
        name: String,
        /// What was wrong.
        #[source]
        source: DecodeImageError,
    },
    /// A pagemap names a pages image that does not exist or whose size disagrees with it.
    #[error("{name}: expected {expected} bytes from the pagemap, found {found:?}")]
    PagesSize {
        /// The pages file name.
        name: String,
        /// Size the pagemap implies.
        expected: u64,
        /// Size on disk (`None`: missing).
        found: Option<u64>,
    },
}

impl ImageDir {
    /// Reads every non-page file of a CRIU image directory and parses its memory images. Checks
    /// that every pages image has exactly the size its pagemap implies (CRIU hangs otherwise).
    pub fn load(dir: impl AsRef<Path>) -> Result<Self, LoadImagesError> {
        let dir = dir.as_ref();
        let read_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| LoadImagesError::Read { path, source }
        };
        let mut files = BTreeMap::new();
        let mut page_sizes = BTreeMap::new();
        for entry in std::fs::read_dir(dir).map_err(read_err(dir))? {
            let entry = entry.map_err(read_err(dir))?;
            let path = entry.path();
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let meta = entry.metadata().map_err(read_err(&path))?;
            if !meta.is_file() {
                continue;
            }
            if is_pages_file(&name) {
                page_sizes.insert(name, meta.len());
            } else {
                let bytes = std::fs::read(&path).map_err(read_err(&path))?;
                files.insert(name, bytes);
            }
        }
        Self::from_files(dir.to_path_buf(), files, &page_sizes)
    }

    /// Parses already-read non-page files. `page_sizes` gives the size of every pages image by
    /// file name; each must match its pagemap.
    pub fn from_files(
        path: PathBuf,
        files: BTreeMap<String, Vec<u8>>,
        page_sizes: &BTreeMap<String, u64>,
    ) -> Result<Self, LoadImagesError> {
        let decode_err = |name: &str| {
            let name = name.to_owned();
            move |source| LoadImagesError::Decode { name, source }
        };
        let mut processes = Vec::new();
        for (name, bytes) in &files {
            let Some(pid) = pid_of(name, "pagemap-") else {
                continue;
            };
            let pagemap = decode_pagemap(bytes).map_err(decode_err(name))?;
            let mm_name = format!("mm-{pid}.img");
            let mm = match files.get(&mm_name) {
                Some(b) => Some(decode_mm(b).map_err(decode_err(&mm_name))?),
                None => None,
            };
            processes.push(ProcessImages { pid, pagemap, mm });
        }
        processes.sort_by_key(|p| p.pid);
        for p in &processes {
            let name = p.pages_file_name();
            let expected = p.pagemap.n_present_pages() * PAGE_SIZE as u64;
            let found = page_sizes.get(&name).copied();
            if found != Some(expected) {
                return Err(LoadImagesError::PagesSize {
                    name,
                    expected,
                    found,
                });
            }
        }
        let reg_files = match files.get("files.img") {
            Some(b) => reg_file_names(b).map_err(decode_err("files.img"))?,
            None => BTreeMap::new(),
        };
        Ok(Self {
            path,
            files,
            processes,
            reg_files,
        })
    }
}

/// Whether a file name is a CRIU pages image (`pages-<n>.img`).
pub fn is_pages_file(name: &str) -> bool {
    pid_of(name, "pages-").is_some()
}

fn pid_of(name: &str, prefix: &str) -> Option<u32> {
    name.strip_prefix(prefix)?
        .strip_suffix(".img")?
        .parse()
        .ok()
}
