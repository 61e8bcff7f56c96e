//! The Medes dedup engine as a library: page fingerprints, the fingerprint registry, base-page
//! choice, page codecs, the dedup store and the rebuild of CRIU page images.
//!
//! ```no_run
//! use medes_dedup::*;
//! let cfg = DedupConfig::default();
//! let registry = Registry::new();
//! let mut bases = LocalBases::new(cfg.rebase);
//! let base = DumpImage::open("/dev/shm/dumps/numpy-0")?;
//! register_base(&registry, BaseId(0), BaseMeta { function: "numpy".into(), node: NodeId(0) }, &base, &cfg)?;
//! bases.insert(BaseId(0), base);
//! let target = DumpImage::open("/dev/shm/dumps/numpy-1")?;
//! let (store, stats) = dedup(&target, &registry, &bases, &cfg)?;
//! store.write(std::path::Path::new("/dev/shm/numpy-1.medes"))?;
//! let pages = rebuild_pages(&store, &bases)?; // verified page by page
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Design decisions:
//! - **Pointer rebasing** (on by default): with ASLR on, two sandboxes of one function differ
//!   mostly in pointers shifted by per-process slides. Every aligned word pointing into one of the
//!   dump's own mappings is rewritten as (canonical mapping id, offset) before fingerprinting and
//!   diffing, and restored from the sandbox's own mm image at rebuild (see [`rebase`]).
//! - **Codecs chosen by measurement** ([`codec`]): zero and identical pages store nothing; a
//!   similar page is an own LZ patch (copy/literal ops against the window of base pages around
//!   its base page: tolerates content shifted by ASLR-changed alignment, decodes at memcpy
//!   speed); LZ patches and pages without a base are zstd-compressed in blocks of 256 pages.
//!   Sparse byte-run diffs and zstd-with-window patches remain as options.
//! - **One pass per batch** ([`dedup()`]): each batch of 256 pages is rebased, looked up,
//!   encoded and compressed by one thread while in cache; the base page after the previous
//!   page's base page is tried first (sequential prediction) and kept when its patch is small
//!   enough, so most pages need no fingerprint or lookup.
//! - **Fingerprints**: Gear rolling hash over every offset, windows inside the page, the `k`
//!   smallest anchors kept (default 16; the paper's 5 finds fewer similar pages), xxh3-64.
//! - **Integrity**: every page carries the xxh3 of the original page; a rebuild verifies each one
//!   and names the page on any error; the store file is checksummed and written atomically.
//! - Base pages reach encoder and rebuild through the [`BasePages`] trait, so remote bases can be
//!   served later.
//! - The fingerprint index sits behind the [`RegistryBackend`] trait: in memory by default (the
//!   fused pass above), or in a backend such as Redis Cluster, which [`dedup()`] asks once per
//!   batch of 256 pages (every page of the batch fingerprinted first, then one batched lookup).
//!
//! What it does not do: no CRIU invocation, no networking, no policy about when to dedup or which
//! sandbox becomes a base, no async runtime (parallelism is rayon's pool).
#![deny(missing_docs)]
#![deny(unsafe_code)]

pub mod codec;
pub mod dedup;
pub mod eval;
pub mod fingerprint;
pub mod image;
pub mod rebase;
pub mod rebuild;
pub mod registry;
pub mod store;
pub mod template;

pub use codec::{CodecConfig, DecodePageError, Decoder, Encoder, PageKind, Standalone};
pub use dedup::{DedupConfig, DedupError, DedupStats, dedup, fingerprint_dump, register_base};
pub use eval::{DedupReport, EvalConfig, EvalError, FunctionReport, evaluate};
pub use fingerprint::{FingerprintConfig, PageFingerprint, fingerprint};
pub use image::{BasePageError, BasePages, DumpImage, LocalBases, OpenDumpError};
pub use rebase::{MappingTable, RebaseCache};
pub use rebuild::{
    RebuildError, rebuild_dir, rebuild_into, rebuild_pages, rebuild_pages_files, rebuild_to_files,
};
pub use registry::{
    AddBaseError, BackendError, BaseId, BaseMeta, BaseRefError, Candidates, Choice, MemoryIndex,
    NodeId, PageKeys, PageRef, Registry, RegistryBackend, RegistryReader, RegistryStats,
};
pub use store::{
    DedupStore, LoadStoreError, PageEntry, ReadPayloadError, StoreFile, StoredProcess,
    WriteStoreError,
};
pub use template::{TemplateHint, TemplateLayout, dedup_with_template, register_raw_base};

/// Bytes per page.
pub const PAGE: usize = 4096;
/// One page.
pub type Page = [u8; PAGE];
