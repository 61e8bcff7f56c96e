//! `mm-<pid>.img`: one `mm_entry` with the process's VMAs.

use crate::frame::{
    DecodeImageError, EncodeImageError, IMG_COMMON, MAGIC_MM, decode_entries, decode_raw,
    encode_raw,
};

/// `vma_entry.status` bits (CRIU's `VMA_*`).
pub mod vma_status {
    /// A regular mapping.
    pub const AREA_REGULAR: u32 = 1 << 0;
    /// The stack.
    pub const AREA_STACK: u32 = 1 << 1;
    /// The vsyscall page.
    pub const AREA_VSYSCALL: u32 = 1 << 2;
    /// The vDSO.
    pub const AREA_VDSO: u32 = 1 << 3;
    /// The brk heap.
    pub const AREA_HEAP: u32 = 1 << 5;
    /// Private file mapping.
    pub const FILE_PRIVATE: u32 = 1 << 6;
    /// Shared file mapping.
    pub const FILE_SHARED: u32 = 1 << 7;
    /// Shared anonymous mapping.
    pub const ANON_SHARED: u32 = 1 << 8;
    /// Private anonymous mapping.
    pub const ANON_PRIVATE: u32 = 1 << 9;
    /// SysV shared memory.
    pub const AREA_SYSVIPC: u32 = 1 << 10;
    /// A socket mapping.
    pub const AREA_SOCKET: u32 = 1 << 11;
    /// The vvar page.
    pub const AREA_VVAR: u32 = 1 << 12;
    /// An AIO ring.
    pub const AREA_AIORING: u32 = 1 << 13;
    /// A memfd mapping.
    pub const AREA_MEMFD: u32 = 1 << 14;
    /// Unsupported mapping.
    pub const AREA_UNSUPP: u32 = 1 << 31;
}

/// `vma_entry`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct VmaEntry {
    /// First address.
    #[prost(uint64, required, tag = "1")]
    pub start: u64,
    /// End address (exclusive).
    #[prost(uint64, required, tag = "2")]
    pub end: u64,
    /// File offset.
    #[prost(uint64, required, tag = "3")]
    pub pgoff: u64,
    /// File id (`files.img`) for file mappings, else shm id or 0.
    #[prost(uint64, required, tag = "4")]
    pub shmid: u64,
    /// `PROT_*`.
    #[prost(uint32, required, tag = "5")]
    pub prot: u32,
    /// `MAP_*`.
    #[prost(uint32, required, tag = "6")]
    pub flags: u32,
    /// `VMA_*` status bits ([`vma_status`]).
    #[prost(uint32, required, tag = "7")]
    pub status: u32,
    /// File descriptor (-1 if none).
    #[prost(sint64, required, tag = "8")]
    pub fd: i64,
    /// `madvise` bits.
    #[prost(uint64, optional, tag = "9")]
    pub madv: Option<u64>,
    /// File descriptor flags.
    #[prost(uint32, optional, tag = "10")]
    pub fdflags: Option<u32>,
}

/// `aio_ring_entry`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct AioRingEntry {
    /// Ring id.
    #[prost(uint64, required, tag = "1")]
    pub id: u64,
    /// Number of requests.
    #[prost(uint32, required, tag = "2")]
    pub nr_req: u32,
    /// Ring length.
    #[prost(uint32, required, tag = "3")]
    pub ring_len: u32,
}

/// `mm_entry`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct MmEntry {
    /// Start of code.
    #[prost(uint64, required, tag = "1")]
    pub mm_start_code: u64,
    /// End of code.
    #[prost(uint64, required, tag = "2")]
    pub mm_end_code: u64,
    /// Start of data.
    #[prost(uint64, required, tag = "3")]
    pub mm_start_data: u64,
    /// End of data.
    #[prost(uint64, required, tag = "4")]
    pub mm_end_data: u64,
    /// Start of stack.
    #[prost(uint64, required, tag = "5")]
    pub mm_start_stack: u64,
    /// Start of brk.
    #[prost(uint64, required, tag = "6")]
    pub mm_start_brk: u64,
    /// Current brk.
    #[prost(uint64, required, tag = "7")]
    pub mm_brk: u64,
    /// Start of argv.
    #[prost(uint64, required, tag = "8")]
    pub mm_arg_start: u64,
    /// End of argv.
    #[prost(uint64, required, tag = "9")]
    pub mm_arg_end: u64,
    /// Start of environ.
    #[prost(uint64, required, tag = "10")]
    pub mm_env_start: u64,
    /// End of environ.
    #[prost(uint64, required, tag = "11")]
    pub mm_env_end: u64,
    /// File id of the executable.
    #[prost(uint32, required, tag = "12")]
    pub exe_file_id: u32,
    /// Saved auxiliary vector.
    #[prost(uint64, repeated, packed = "false", tag = "13")]
    pub mm_saved_auxv: Vec<u64>,
    /// The VMAs, in address order.
    #[prost(message, repeated, tag = "14")]
    pub vmas: Vec<VmaEntry>,
    /// Dumpable flag.
    #[prost(int32, optional, tag = "15")]
    pub dumpable: Option<i32>,
    /// AIO rings.
    #[prost(message, repeated, tag = "16")]
    pub aios: Vec<AioRingEntry>,
    /// THP disabled flag.
    #[prost(bool, optional, tag = "17")]
    pub thp_disabled: Option<bool>,
}

/// Parses an mm image (exactly one entry).
pub fn decode_mm(data: &[u8]) -> Result<MmEntry, DecodeImageError> {
    let raw = decode_raw(data, MAGIC_MM)?;
    if raw.entries.len() != 1 {
        return Err(DecodeImageError::EntryCount {
            found: raw.entries.len(),
        });
    }
    let mut v = decode_entries::<MmEntry>(&raw, 0)?;
    v.pop().ok_or(DecodeImageError::EntryCount { found: 0 })
}

/// Writes an mm image.
pub fn encode_mm(mm: &MmEntry) -> Result<Vec<u8>, EncodeImageError> {
    encode_raw(
        Some(IMG_COMMON),
        MAGIC_MM,
        &[prost::Message::encode_to_vec(mm)],
    )
}
