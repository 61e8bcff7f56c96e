//! `files.img`: only what mappings need (the names of regular files), read-only.

use std::collections::BTreeMap;

use crate::frame::{DecodeImageError, MAGIC_FILES, decode_entries, decode_raw};

/// `reg_file_entry` (only the fields medes reads; others are skipped).
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct RegFileEntry {
    /// File id.
    #[prost(uint32, required, tag = "1")]
    pub id: u32,
    /// Path of the file.
    #[prost(string, required, tag = "6")]
    pub name: String,
}

/// `file_entry` (only the fields medes reads).
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct FileEntry {
    /// `fd_types` value.
    #[prost(int32, required, tag = "1")]
    pub r#type: i32,
    /// File id.
    #[prost(uint32, required, tag = "2")]
    pub id: u32,
    /// The regular file, if this is one.
    #[prost(message, optional, tag = "3")]
    pub reg: Option<RegFileEntry>,
}

/// Parses `files.img`.
pub fn decode_files(data: &[u8]) -> Result<Vec<FileEntry>, DecodeImageError> {
    let raw = decode_raw(data, MAGIC_FILES)?;
    decode_entries(&raw, 0)
}

/// The names of the regular files in `files.img`, by file id.
pub fn reg_file_names(data: &[u8]) -> Result<BTreeMap<u32, String>, DecodeImageError> {
    Ok(decode_files(data)?
        .into_iter()
        .filter_map(|f| f.reg.map(|r| (f.id, r.name)))
        .collect())
}
