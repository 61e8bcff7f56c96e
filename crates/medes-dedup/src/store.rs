//! The dedup store: the stored form of one deduplicated sandbox.
//!
//! File layout (all integers little-endian):
//! `"MEDESDS1"`, version u32, window radius u32, payload length u64, xxh3-64 of the payload u64, then
//! the payload: five length-prefixed sections (u64 length each): non-page images (zstd),
//! processes, base ids, page table (column layout, zstd), page blob, compressed blocks (per 256
//! pages, the data of sparse-diff and raw pages, zstd-compressed together). Every page table entry holds
//! the xxh3-64 of the original page, so a rebuild can never return a wrong page silently.
//!
//! Two ways to load: [`DedupStore::load`] parses the whole file into memory;
//! [`DedupStore::open_lean`] streams it once (verifying the same checksum) and keeps only the
//! metadata plus a [`StoreFile`] from which the page data (blob ranges, compressed blocks) is
//! read on demand with `pread` (never mapped: a file truncated under a mapping would fault the
//! reader; a short read is an error).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::xxh3_64;

use crate::codec::PageKind;
use crate::registry::BaseId;

const MAGIC: &[u8; 8] = b"MEDESDS1";
const VERSION: u32 = 1;
const HEADER: usize = 8 + 4 + 4 + 8 + 8;

/// Pages per block (batch) of block-compressed page data.
pub const BLOCK_PAGES: usize = 256;

/// One page's entry in the page table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageEntry {
    /// How the page is stored.
    pub kind: PageKind,
    /// Whether the stored form is rebased (pointers as tokens of the sandbox's own mappings).
    pub rebased: bool,
    /// Index into [`DedupStore::bases`] (meaningful when the kind needs a base).
    pub base_slot: u16,
    /// The base page's index in its base image.
    pub base_page: u32,
    /// Byte length of the page's data in the blob.
    pub len: u32,
    /// xxh3-64 of the original page.
    pub checksum: u64,
}

/// A process of the deduplicated dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredProcess {
    /// The pid in the image names.
    pub pid: u32,
    /// The pages image to rebuild.
    pub pages_file: String,
    /// Its number of pages.
    pub n_pages: u64,
}

/// A deduplicated sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DedupStore {
    /// CRIU's non-page images (pagemaps and mm images included), by file name.
    pub images: BTreeMap<String, Vec<u8>>,
    /// Processes in page order.
    pub procs: Vec<StoredProcess>,
    /// Bases used, by slot.
    pub bases: Vec<BaseId>,
    /// One entry per page, in page order.
    pub pages: Vec<PageEntry>,
    /// Data of pages whose kind is not block-compressed ([`PageKind::in_block`]), in page
    /// order.
    pub blob: Vec<u8>,
    /// Per batch of [`BLOCK_PAGES`] pages, the zstd-compressed concatenated data of its pages
    /// whose kind is block-compressed (empty if it has none).
    pub blocks: Vec<Vec<u8>>,
    /// Window radius of `ZstdWin` pages.
    pub window_radius: u64,
}

/// Error writing a store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriteStoreError {
    /// Writing or renaming failed.
    #[error("writing store {path:?}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Error loading a store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadStoreError {
    /// Reading failed.
    #[error("reading store {path:?}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Not a store file, or another version.
    #[error("not a medes dedup store (version 1)")]
    BadHeader,
    /// The payload checksum does not match.
    #[error("store checksum mismatch")]
    Checksum,
    /// The payload is malformed.
    #[error("malformed store section {0}")]
    Malformed(&'static str),
}

fn put_u64(v: &mut Vec<u8>, x: u64) {
    v.extend_from_slice(&x.to_le_bytes());
}

fn put_section(v: &mut Vec<u8>, s: &[u8]) {
    put_u64(v, s.len() as u64);
    v.extend_from_slice(s);
}

struct Reader<'a> {
    d: &'a [u8],
    at: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], LoadStoreError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.d.len())
            .ok_or(LoadStoreError::Malformed(self.what))?;
        let s = &self.d[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u64(&mut self) -> Result<u64, LoadStoreError> {
        let b = self.bytes(8)?;
        Ok(u64::from_le_bytes(
            b.try_into()
                .map_err(|_| LoadStoreError::Malformed(self.what))?,
        ))
    }
    fn u32(&mut self) -> Result<u32, LoadStoreError> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes(
            b.try_into()
                .map_err(|_| LoadStoreError::Malformed(self.what))?,
        ))
    }
    fn len(&mut self) -> Result<usize, LoadStoreError> {
        usize::try_from(self.u64()?).map_err(|_| LoadStoreError::Malformed(self.what))
    }
    fn section(&mut self) -> Result<&'a [u8], LoadStoreError> {
        let n = self.len()?;
        self.bytes(n)
    }
}

/// A store's fixed header, after its magic and version: the window radius, the payload's
/// length and the payload's xxh3.
struct Header {
    window_radius: u64,
    len: u64,
    sum: u64,
}

/// Parses the [`HEADER`] bytes at the start of `data` (a bad magic or version, or too few
/// bytes, is [`LoadStoreError::BadHeader`]).
fn parse_header(data: &[u8]) -> Result<Header, LoadStoreError> {
    let head = data.get(..HEADER).ok_or(LoadStoreError::BadHeader)?;
    if &head[..8] != MAGIC {
        return Err(LoadStoreError::BadHeader);
    }
    let mut h = Reader {
        d: head,
        at: 8,
        what: "header",
    };
    if h.u32()? != VERSION {
        return Err(LoadStoreError::BadHeader);
    }
    Ok(Header {
        window_radius: u64::from(h.u32()?),
        len: h.u64()?,
        sum: h.u64()?,
    })
}

fn zstd_decompress(data: &[u8], what: &'static str) -> Result<Vec<u8>, LoadStoreError> {
    // Bounded: a store section never decompresses to more than 1 GiB.
    zstd::bulk::decompress(data, 1 << 30).map_err(|_| LoadStoreError::Malformed(what))
}

fn parse_images(data: &[u8]) -> Result<BTreeMap<String, Vec<u8>>, LoadStoreError> {
    let imgs = zstd_decompress(data, "images")?;
    let mut ir = Reader {
        d: &imgs,
        at: 0,
        what: "images",
    };
    let mut images = BTreeMap::new();
    for _ in 0..ir.u64()? {
        let name = String::from_utf8(ir.section()?.to_vec())
            .map_err(|_| LoadStoreError::Malformed("images"))?;
        images.insert(name, ir.section()?.to_vec());
    }
    Ok(images)
}

fn parse_procs(data: &[u8]) -> Result<Vec<StoredProcess>, LoadStoreError> {
    let mut pr = Reader {
        d: data,
        at: 0,
        what: "processes",
    };
    let mut procs = Vec::new();
    for _ in 0..pr.u64()? {
        let pid = pr.u32()?;
        let pages_file = String::from_utf8(pr.section()?.to_vec())
            .map_err(|_| LoadStoreError::Malformed("processes"))?;
        let n_pages = pr.u64()?;
        procs.push(StoredProcess {
            pid,
            pages_file,
            n_pages,
        });
    }
    Ok(procs)
}

fn parse_bases(data: &[u8]) -> Vec<BaseId> {
    data.chunks_exact(4)
        .map(|c| BaseId(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
        .collect()
}

/// The page table, and the blob bytes it accounts for.
fn parse_table(data: &[u8]) -> Result<(Vec<PageEntry>, u64), LoadStoreError> {
    let t = zstd_decompress(data, "page table")?;
    let mut tr = Reader {
        d: &t,
        at: 0,
        what: "page table",
    };
    let n = tr.len()?;
    if t.len()
        != 8 + n
            .checked_mul(19)
            .ok_or(LoadStoreError::Malformed("page table"))?
    {
        return Err(LoadStoreError::Malformed("page table"));
    }
    let kinds = tr.bytes(n)?;
    let slots = tr.bytes(2 * n)?;
    let bpages = tr.bytes(4 * n)?;
    let lens = tr.bytes(4 * n)?;
    let sums = tr.bytes(8 * n)?;
    let mut pages = Vec::with_capacity(n);
    let mut prev = 0u32;
    let mut total = 0u64;
    for i in 0..n {
        let kind =
            PageKind::from_u8(kinds[i] & 0x7F).ok_or(LoadStoreError::Malformed("page kind"))?;
        let d = u32::from_le_bytes(bpages[4 * i..4 * i + 4].try_into().unwrap_or_default());
        prev = prev.wrapping_add(d);
        let len = u32::from_le_bytes(lens[4 * i..4 * i + 4].try_into().unwrap_or_default());
        if !kind.in_block() {
            total += u64::from(len);
        }
        pages.push(PageEntry {
            kind,
            rebased: kinds[i] & 0x80 != 0,
            base_slot: u16::from_le_bytes(slots[2 * i..2 * i + 2].try_into().unwrap_or_default()),
            base_page: prev,
            len,
            checksum: u64::from_le_bytes(sums[8 * i..8 * i + 8].try_into().unwrap_or_default()),
        });
    }
    Ok((pages, total))
}

/// A store file read once from its payload's start to its end, hashing what it reads.
struct Stream {
    r: std::io::BufReader<std::fs::File>,
    hasher: xxhash_rust::xxh3::Xxh3Default,
    /// Payload bytes not read yet.
    left: u64,
    /// File offset of the next byte.
    at: u64,
    skip_buf: Vec<u8>,
}

impl Stream {
    fn seek_start(&mut self) -> std::io::Result<()> {
        use std::io::Seek;
        self.r.seek(std::io::SeekFrom::Start(self.at)).map(|_| ())
    }

    /// Reads `out.len()` payload bytes into `out`.
    fn fill<E>(&mut self, out: &mut [u8], what: &'static str, io: E) -> Result<(), LoadStoreError>
    where
        E: Fn(std::io::Error) -> LoadStoreError,
    {
        use std::io::Read;
        if out.len() as u64 > self.left {
            return Err(LoadStoreError::Malformed(what));
        }
        self.r.read_exact(out).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                // Shorter than its size said a moment ago: changed while read.
                LoadStoreError::Malformed(what)
            } else {
                io(e)
            }
        })?;
        self.hasher.update(out);
        self.left -= out.len() as u64;
        self.at += out.len() as u64;
        Ok(())
    }

    fn u64<E>(&mut self, what: &'static str, io: E) -> Result<u64, LoadStoreError>
    where
        E: Fn(std::io::Error) -> LoadStoreError,
    {
        let mut b = [0u8; 8];
        self.fill(&mut b, what, io)?;
        Ok(u64::from_le_bytes(b))
    }

    /// A length-prefixed section, read (the length is bounded by the payload, itself bounded
    /// by the file's size).
    fn section<E>(&mut self, what: &'static str, io: E) -> Result<Vec<u8>, LoadStoreError>
    where
        E: Fn(std::io::Error) -> LoadStoreError,
    {
        let n = self.u64(what, &io)?;
        if n > self.left {
            return Err(LoadStoreError::Malformed(what));
        }
        let mut v = vec![0u8; n as usize];
        self.fill(&mut v, what, io)?;
        Ok(v)
    }

    /// Reads (hashes) `n` bytes without keeping them; returns their file offset.
    fn skip<E>(&mut self, n: u64, what: &'static str, io: E) -> Result<u64, LoadStoreError>
    where
        E: Fn(std::io::Error) -> LoadStoreError,
    {
        let at = self.at;
        if n > self.left {
            return Err(LoadStoreError::Malformed(what));
        }
        let mut buf = std::mem::take(&mut self.skip_buf);
        buf.resize(1 << 16, 0);
        let mut todo = n;
        while todo > 0 {
            let k = todo.min(buf.len() as u64) as usize;
            let r = self.fill(&mut buf[..k], what, &io);
            if let Err(e) = r {
                self.skip_buf = buf;
                return Err(e);
            }
            todo -= k as u64;
        }
        self.skip_buf = buf;
        Ok(at)
    }
}

/// The page data of a store opened with [`DedupStore::open_lean`], read from its file on
/// demand: the open file and where the blob and each compressed block lie in it.
#[derive(Debug)]
pub struct StoreFile {
    file: std::fs::File,
    path: PathBuf,
    blob_at: u64,
    blob_len: u64,
    /// File offset and length of each compressed block.
    blocks: Vec<(u64, u64)>,
}

/// Error reading a store's page data from its file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadPayloadError {
    /// The range is not in the blob, or the block does not exist.
    #[error("{what} out of the store's bounds")]
    OutOfBounds {
        /// What was read.
        what: &'static str,
    },
    /// The read failed, or the file is shorter than when it was opened.
    #[error("reading {path:?}")]
    Io {
        /// The store file.
        path: PathBuf,
        /// The I/O error (`UnexpectedEof` for a file truncated since it was opened).
        #[source]
        source: std::io::Error,
    },
}

impl StoreFile {
    /// The store file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Memory this holds, bytes (the block offsets, the path).
    pub fn held_bytes(&self) -> u64 {
        (std::mem::size_of::<Self>()
            + self.blocks.capacity() * std::mem::size_of::<(u64, u64)>()
            + self.path.as_os_str().len()) as u64
    }

    /// Number of compressed blocks.
    pub fn n_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Reads the blob's bytes `range` into `buf` (grown if too small; its bytes past the
    /// range are left as they are) and returns them.
    pub fn read_blob<'a>(
        &self,
        range: std::ops::Range<u64>,
        buf: &'a mut Vec<u8>,
    ) -> Result<&'a [u8], ReadPayloadError> {
        if range.start > range.end || range.end > self.blob_len {
            return Err(ReadPayloadError::OutOfBounds { what: "blob range" });
        }
        self.read_at(self.blob_at + range.start, range.end - range.start, buf)
    }

    /// Reads compressed block `b` into `buf` (grown if too small; its bytes past the block
    /// are left as they are) and returns it.
    pub fn read_block<'a>(
        &self,
        b: usize,
        buf: &'a mut Vec<u8>,
    ) -> Result<&'a [u8], ReadPayloadError> {
        let &(at, len) = self
            .blocks
            .get(b)
            .ok_or(ReadPayloadError::OutOfBounds { what: "block" })?;
        self.read_at(at, len, buf)
    }

    fn read_at<'a>(
        &self,
        at: u64,
        len: u64,
        buf: &'a mut Vec<u8>,
    ) -> Result<&'a [u8], ReadPayloadError> {
        use std::os::unix::fs::FileExt;
        let len =
            usize::try_from(len).map_err(|_| ReadPayloadError::OutOfBounds { what: "read" })?;
        // Grown (zeroed) only when too small: a reused buffer is not cleared again.
        if buf.len() < len {
            buf.resize(len, 0);
        }
        let out = &mut buf[..len];
        // A short read (the file was truncated) is `UnexpectedEof`, an error.
        self.file
            .read_exact_at(out, at)
            .map_err(|source| ReadPayloadError::Io {
                path: self.path.clone(),
                source,
            })?;
        Ok(out)
    }
}

impl DedupStore {
    /// The serialised payload as pieces (small owned sections, the blob and blocks borrowed),
    /// so that writing needs no copy of the data.
    fn payload_parts(&self) -> Vec<std::borrow::Cow<'_, [u8]>> {
        use std::borrow::Cow;
        let (imgs, t) = rayon::join(
            || {
                let mut imgs = Vec::new();
                put_u64(&mut imgs, self.images.len() as u64);
                for (name, data) in &self.images {
                    put_section(&mut imgs, name.as_bytes());
                    put_section(&mut imgs, data);
                }
                zstd::bulk::compress(&imgs, 3).unwrap_or(imgs)
            },
            || {
                // Page table, column layout: kinds+flags, slots, base pages (delta), lens,
                // checksums.
                let n = self.pages.len();
                let mut t = Vec::with_capacity(n * 19 + 8);
                put_u64(&mut t, n as u64);
                t.extend(
                    self.pages
                        .iter()
                        .map(|e| e.kind as u8 | u8::from(e.rebased) << 7),
                );
                for e in &self.pages {
                    t.extend_from_slice(&e.base_slot.to_le_bytes());
                }
                let mut prev = 0u32;
                for e in &self.pages {
                    t.extend_from_slice(&e.base_page.wrapping_sub(prev).to_le_bytes());
                    prev = e.base_page;
                }
                for e in &self.pages {
                    t.extend_from_slice(&e.len.to_le_bytes());
                }
                for e in &self.pages {
                    t.extend_from_slice(&e.checksum.to_le_bytes());
                }
                zstd::bulk::compress(&t, 1).unwrap_or(t)
            },
        );
        let mut head = Vec::new();
        put_section(&mut head, &imgs);
        // Processes.
        let mut procs = Vec::new();
        put_u64(&mut procs, self.procs.len() as u64);
        for p in &self.procs {
            procs.extend_from_slice(&p.pid.to_le_bytes());
            put_section(&mut procs, p.pages_file.as_bytes());
            put_u64(&mut procs, p.n_pages);
        }
        put_section(&mut head, &procs);
        // Bases.
        let mut bases = Vec::new();
        for b in &self.bases {
            bases.extend_from_slice(&b.0.to_le_bytes());
        }
        put_section(&mut head, &bases);
        put_section(&mut head, &t);
        put_u64(&mut head, self.blob.len() as u64);
        let mut parts = vec![Cow::Owned(head), Cow::Borrowed(&self.blob[..])];
        let blocks_len = 8 + self.blocks.iter().map(|b| b.len() + 8).sum::<usize>();
        let mut bh = Vec::with_capacity(16);
        put_u64(&mut bh, blocks_len as u64);
        put_u64(&mut bh, self.blocks.len() as u64);
        parts.push(Cow::Owned(bh));
        for b in &self.blocks {
            parts.push(Cow::Owned((b.len() as u64).to_le_bytes().to_vec()));
            parts.push(Cow::Borrowed(&b[..]));
        }
        parts
    }

    /// The file header for a payload made of `parts`.
    fn header(&self, parts: &[std::borrow::Cow<'_, [u8]>]) -> Vec<u8> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let mut hasher = xxhash_rust::xxh3::Xxh3Default::new();
        for p in parts {
            hasher.update(p);
        }
        let mut out = Vec::with_capacity(HEADER);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(self.window_radius.min(u64::from(u32::MAX)) as u32).to_le_bytes());
        put_u64(&mut out, len as u64);
        put_u64(&mut out, hasher.digest());
        out
    }

    /// Serialises the store.
    pub fn to_bytes(&self) -> Vec<u8> {
        let parts = self.payload_parts();
        let header = self.header(&parts);
        let mut out =
            Vec::with_capacity(header.len() + parts.iter().map(|p| p.len()).sum::<usize>());
        out.extend_from_slice(&header);
        for p in &parts {
            out.extend_from_slice(p);
        }
        out
    }

    /// Parses a serialised store, verifying its checksum.
    pub fn from_bytes(data: &[u8]) -> Result<Self, LoadStoreError> {
        let Header {
            window_radius,
            len,
            sum,
        } = parse_header(data)?;
        let mut h = Reader {
            d: data,
            at: HEADER,
            what: "header",
        };
        let len = usize::try_from(len).map_err(|_| LoadStoreError::Malformed("header"))?;
        let payload = h.bytes(len)?;
        if xxh3_64(payload) != sum {
            return Err(LoadStoreError::Checksum);
        }
        let mut r = Reader {
            d: payload,
            at: 0,
            what: "images",
        };
        let images = parse_images(r.section()?)?;
        r.what = "processes";
        let procs = parse_procs(r.section()?)?;
        r.what = "bases";
        let bases = parse_bases(r.section()?);
        r.what = "page table";
        let (pages, total) = parse_table(r.section()?)?;
        r.what = "blob";
        let blob = r.section()?.to_vec();
        if total != blob.len() as u64 {
            return Err(LoadStoreError::Malformed("blob length"));
        }
        r.what = "blocks";
        let mut br = Reader {
            d: r.section()?,
            at: 0,
            what: "blocks",
        };
        let n_blocks = br.len()?;
        if n_blocks != pages.len().div_ceil(BLOCK_PAGES) {
            return Err(LoadStoreError::Malformed("block count"));
        }
        let mut blocks = Vec::with_capacity(n_blocks);
        for _ in 0..n_blocks {
            blocks.push(br.section()?.to_vec());
        }
        let store = Self {
            images,
            procs,
            bases,
            pages,
            blob,
            blocks,
            window_radius,
        };
        store.check_counts()?;
        Ok(store)
    }

    /// The processes' page counts must add up to the page table's.
    fn check_counts(&self) -> Result<(), LoadStoreError> {
        if self.procs.iter().map(|p| p.n_pages).sum::<u64>() != self.pages.len() as u64 {
            return Err(LoadStoreError::Malformed("process page counts"));
        }
        Ok(())
    }

    /// Opens a store written by [`DedupStore::write`] without keeping its page data: the file
    /// is read once from start to end, its whole payload verified against the header's xxh3
    /// as it streams by, and only the small sections are kept (the non-page images, processes,
    /// bases, page table and window radius, in the returned store, whose `blob` and `blocks`
    /// stay empty) with the file offsets of the blob and of each compressed block (the
    /// returned [`StoreFile`], which keeps the file open). A [`crate::rebuild::Rebuilder`]
    /// made with [`crate::rebuild::Rebuilder::from_file`] then reads each batch's data from
    /// the file on demand (`pread`), and verifies every rebuilt page against its xxh3 as
    /// always: a file changed after it was opened can fail a rebuild, never give a wrong page.
    ///
    /// Never maps the file (a file truncated under a mapping would fault the process).
    pub fn open_lean(path: &Path) -> Result<(Self, StoreFile), LoadStoreError> {
        let io = |source| LoadStoreError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        let mut head = [0u8; HEADER];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut head, 0).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                LoadStoreError::BadHeader
            } else {
                io(e)
            }
        })?;
        let Header {
            window_radius,
            len,
            sum,
        } = parse_header(&head)?;
        // The payload must be in the file: this bounds every length read below.
        if size < HEADER as u64 || len > size - HEADER as u64 {
            return Err(LoadStoreError::Malformed("header"));
        }
        let mut s = Stream {
            r: std::io::BufReader::with_capacity(1 << 16, file),
            hasher: xxhash_rust::xxh3::Xxh3Default::new(),
            left: len,
            at: HEADER as u64,
            skip_buf: Vec::new(),
        };
        s.seek_start().map_err(io)?;
        let images = s.section("images", io)?;
        let procs = s.section("processes", io)?;
        let bases = s.section("bases", io)?;
        let table = s.section("page table", io)?;
        let blob_len = s.u64("blob", io)?;
        let blob_at = s.skip(blob_len, "blob", io)?;
        let blocks_len = s.u64("blocks", io)?;
        if blocks_len > s.left || blocks_len < 8 {
            return Err(LoadStoreError::Malformed("blocks"));
        }
        let blocks_end = s.left - blocks_len;
        let n_blocks = s.u64("blocks", io)?;
        // Each block takes at least its 8-byte length: bounds the allocation.
        if n_blocks > (s.left - blocks_end) / 8 {
            return Err(LoadStoreError::Malformed("blocks"));
        }
        let mut block_at = Vec::with_capacity(n_blocks as usize);
        for _ in 0..n_blocks {
            let n = s.u64("blocks", io)?;
            if n > s.left - blocks_end {
                return Err(LoadStoreError::Malformed("blocks"));
            }
            block_at.push((s.skip(n, "blocks", io)?, n));
        }
        // What is left of the payload (nothing, as written) is covered by the checksum too.
        let rest = s.left;
        s.skip(rest, "payload", io)?;
        if s.hasher.digest() != sum {
            return Err(LoadStoreError::Checksum);
        }
        let file = s.r.into_inner();
        // Verified: parse the small sections.
        let (pages, total) = parse_table(&table)?;
        if total != blob_len {
            return Err(LoadStoreError::Malformed("blob length"));
        }
        if block_at.len() != pages.len().div_ceil(BLOCK_PAGES) {
            return Err(LoadStoreError::Malformed("block count"));
        }
        let store = Self {
            images: parse_images(&images)?,
            procs: parse_procs(&procs)?,
            bases: parse_bases(&bases),
            pages,
            blob: Vec::new(),
            blocks: Vec::new(),
            window_radius,
        };
        store.check_counts()?;
        Ok((
            store,
            StoreFile {
                file,
                path: path.to_path_buf(),
                blob_at,
                blob_len,
                blocks: block_at,
            },
        ))
    }

    /// Writes the store atomically: a temporary file in the same directory, fsync, rename.
    /// Returns the number of bytes written.
    pub fn write(&self, path: &Path) -> Result<u64, WriteStoreError> {
        let parts = self.payload_parts();
        let header = self.header(&parts);
        let err = |source| WriteStoreError::Io {
            path: path.to_path_buf(),
            source,
        };
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        let mut written = header.len() as u64;
        let mut w = std::io::BufWriter::with_capacity(1 << 16, &mut f);
        w.write_all(&header).map_err(err)?;
        for p in &parts {
            w.write_all(p).map_err(err)?;
            written += p.len() as u64;
        }
        w.flush().map_err(err)?;
        drop(w);
        f.sync_all().map_err(err)?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            err(e)
        })?;
        if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty())
            && let Ok(d) = std::fs::File::open(dir)
        {
            let _ = d.sync_all();
        }
        Ok(written)
    }

    /// Loads a store written by [`DedupStore::write`].
    pub fn load(path: &Path) -> Result<Self, LoadStoreError> {
        let data = std::fs::read(path).map_err(|source| LoadStoreError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(&data)
    }

    /// Byte offset of every page's data: in the blob, or, for block-compressed kinds, in its
    /// batch's decompressed block.
    pub fn offsets(&self) -> Vec<u64> {
        let mut o = Vec::with_capacity(self.pages.len());
        let (mut at, mut in_block) = (0u64, 0u64);
        for (i, e) in self.pages.iter().enumerate() {
            if i % BLOCK_PAGES == 0 {
                in_block = 0;
            }
            if e.kind.in_block() {
                o.push(in_block);
                in_block += u64::from(e.len);
            } else {
                o.push(at);
                at += u64::from(e.len);
            }
        }
        o
    }

    /// Decompressed size of block `b` (from the page table).
    pub fn block_len(&self, b: usize) -> usize {
        let start = (b * BLOCK_PAGES).min(self.pages.len());
        let end = (start + BLOCK_PAGES).min(self.pages.len());
        self.pages[start..end]
            .iter()
            .filter(|e| e.kind.in_block())
            .map(|e| e.len as usize)
            .sum()
    }

    /// Compresses the block-compressed kinds' data of each batch (`data[i]`: page `i`'s data).
    pub fn build_blocks(pages: &[PageEntry], data: &[Vec<u8>], level: i32) -> Vec<Vec<u8>> {
        use rayon::prelude::*;
        pages
            .par_chunks(BLOCK_PAGES)
            .zip(data.par_chunks(BLOCK_PAGES))
            .map(|(ps, ds)| {
                let mut raw = Vec::new();
                for (p, d) in ps.iter().zip(ds) {
                    if p.kind.in_block() {
                        raw.extend_from_slice(d);
                    }
                }
                if raw.is_empty() {
                    Vec::new()
                } else {
                    zstd::bulk::compress(&raw, level).unwrap_or_default()
                }
            })
            .collect()
    }

    /// Total pages.
    pub fn n_pages(&self) -> u64 {
        self.pages.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> DedupStore {
        DedupStore {
            images: [("mm-1.img".to_owned(), vec![1, 2, 3])].into(),
            procs: vec![StoredProcess {
                pid: 1,
                pages_file: "pages-1.img".into(),
                n_pages: 2,
            }],
            bases: vec![BaseId(7)],
            pages: vec![
                PageEntry {
                    kind: PageKind::Sparse,
                    rebased: true,
                    base_slot: 0,
                    base_page: 9,
                    len: 3,
                    checksum: 42,
                },
                PageEntry {
                    kind: PageKind::Zero,
                    rebased: false,
                    base_slot: 0,
                    base_page: 0,
                    len: 0,
                    checksum: 43,
                },
            ],
            blob: vec![],
            blocks: vec![zstd::bulk::compress(&[1, 2, 3], 3).unwrap()],
            window_radius: 1,
        }
    }

    #[test]
    fn round_trips_and_detects_corruption() {
        let s = sample();
        let b = s.to_bytes();
        assert_eq!(DedupStore::from_bytes(&b).unwrap(), s);
        let mut c = b.clone();
        let last = c.len() - 1;
        c[last] ^= 1;
        assert!(matches!(
            DedupStore::from_bytes(&c),
            Err(LoadStoreError::Checksum)
        ));
    }

    #[test]
    fn lean_open_keeps_the_metadata_and_reads_the_payload_on_demand() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.medes");
        let s = sample();
        s.write(&path).unwrap();
        let (lean, file) = DedupStore::open_lean(&path).unwrap();
        assert_eq!(
            lean,
            DedupStore {
                blocks: vec![],
                ..s.clone()
            }
        );
        assert_eq!(file.n_blocks(), 1);
        let mut out = Vec::new();
        assert_eq!(file.read_block(0, &mut out).unwrap(), s.blocks[0]);
        assert!(file.read_block(1, &mut out).is_err());
        assert!(file.read_blob(0..1, &mut out).is_err());
        // Truncated after opening: an error, not a panic.
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 2)
            .unwrap();
        assert!(matches!(
            file.read_block(0, &mut out),
            Err(ReadPayloadError::Io { .. })
        ));
        assert!(matches!(
            DedupStore::open_lean(&path),
            Err(LoadStoreError::Malformed(_))
        ));
        // Every flipped byte and every truncation is refused (or, for the unchecked window
        // radius, changes it).
        let b = s.to_bytes();
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x55;
            std::fs::write(&path, &c).unwrap();
            match DedupStore::open_lean(&path) {
                Err(_) => {}
                Ok((l, _)) => assert!((12..16).contains(&i) && l.window_radius != 1, "byte {i}"),
            }
            std::fs::write(&path, &b[..i]).unwrap();
            assert!(DedupStore::open_lean(&path).is_err(), "cut at {i}");
        }
    }

    proptest! {
        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..200), flip in any::<usize>()) {
            let _ = DedupStore::from_bytes(&data);
            let mut b = sample().to_bytes();
            let i = flip % b.len();
            b[i] ^= 0x55;
            let _ = DedupStore::from_bytes(&b);
            let f = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(f.path(), &data).unwrap();
            let _ = DedupStore::open_lean(f.path());
            std::fs::write(f.path(), &b).unwrap();
            let _ = DedupStore::open_lean(f.path());
        }
    }
}
