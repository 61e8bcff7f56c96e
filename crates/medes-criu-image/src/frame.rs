//! CRIU image framing: magics, then length-prefixed protobuf entries.

/// First magic of most images.
pub const IMG_COMMON: u32 = 0x5456_4319;
/// First magic of service images.
pub const IMG_SERVICE: u32 = 0x5510_5940;
/// Magic of `inventory.img` (written without a leading common magic).
pub const MAGIC_INVENTORY: u32 = 0x5831_3116;
/// Magic of `pagemap-*.img`.
pub const MAGIC_PAGEMAP: u32 = 0x5608_4025;
/// Magic of `mm-*.img`.
pub const MAGIC_MM: u32 = 0x5749_2820;
/// Magic of `files.img`.
pub const MAGIC_FILES: u32 = 0x5630_3138;

/// An image split into its magics and entry payloads (borrowed from the input).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawImage<'a> {
    /// The leading common magic (`IMG_COMMON` or `IMG_SERVICE`), absent for `inventory.img`.
    pub common: Option<u32>,
    /// The image's own magic.
    pub magic: u32,
    /// Each entry's protobuf payload.
    pub entries: Vec<&'a [u8]>,
}

/// Error decoding an image file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeImageError {
    /// The file is shorter than its magics.
    #[error("image too short for its magic ({len} bytes)")]
    TooShort {
        /// The file length.
        len: usize,
    },
    /// The image's magic is not the expected one.
    #[error("wrong magic {found:#x}, expected {expected:#x}")]
    BadMagic {
        /// The expected magic.
        expected: u32,
        /// The magic found.
        found: u32,
    },
    /// An entry's length runs past the end of the file.
    #[error("entry {index} at byte {offset} is truncated")]
    Truncated {
        /// The entry's index.
        index: usize,
        /// Byte offset of its length prefix.
        offset: usize,
    },
    /// An entry's protobuf payload is malformed.
    #[error("entry {index} is not a valid protobuf message")]
    Protobuf {
        /// The entry's index.
        index: usize,
        /// The protobuf error.
        #[source]
        source: prost::DecodeError,
    },
    /// The image has a different number of entries than its kind requires.
    #[error("unexpected number of entries: {found}")]
    EntryCount {
        /// Number of entries found.
        found: usize,
    },
}

/// Error encoding an image file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeImageError {
    /// An entry is larger than a u32 length prefix allows.
    #[error("entry {index} is too large ({len} bytes)")]
    EntryTooLarge {
        /// The entry's index.
        index: usize,
        /// Its length.
        len: usize,
    },
    /// A pagemap entry's page count does not fit the u32 field CRIU 4.1 reads.
    #[error("pagemap entry {index} has {nr_pages} pages, more than field 2 can hold")]
    TooManyPages {
        /// The entry's index.
        index: usize,
        /// Its page count.
        nr_pages: u64,
    },
}

fn read_u32(data: &[u8], at: usize) -> Option<u32> {
    let b = data.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Splits an image into magics and entries, checking that its own magic is `magic`.
pub fn decode_raw(data: &[u8], magic: u32) -> Result<RawImage<'_>, DecodeImageError> {
    let first = read_u32(data, 0).ok_or(DecodeImageError::TooShort { len: data.len() })?;
    let (common, own, mut at) = if first == IMG_COMMON || first == IMG_SERVICE {
        let own = read_u32(data, 4).ok_or(DecodeImageError::TooShort { len: data.len() })?;
        (Some(first), own, 8)
    } else {
        (None, first, 4)
    };
    if own != magic {
        return Err(DecodeImageError::BadMagic {
            expected: magic,
            found: own,
        });
    }
    let mut entries = Vec::new();
    while at < data.len() {
        let index = entries.len();
        let trunc = DecodeImageError::Truncated { index, offset: at };
        let len = read_u32(data, at).ok_or(trunc)? as usize;
        let start = at + 4;
        let end = start
            .checked_add(len)
            .filter(|&e| e <= data.len())
            .ok_or(DecodeImageError::Truncated { index, offset: at })?;
        entries.push(&data[start..end]);
        at = end;
    }
    Ok(RawImage {
        common,
        magic: own,
        entries,
    })
}

/// Frames entries as an image: magics, then each payload with its u32 LE length.
pub fn encode_raw<B: AsRef<[u8]>>(
    common: Option<u32>,
    magic: u32,
    entries: &[B],
) -> Result<Vec<u8>, EncodeImageError> {
    let total: usize = entries.iter().map(|e| e.as_ref().len() + 4).sum();
    let mut out = Vec::with_capacity(8 + total);
    if let Some(c) = common {
        out.extend_from_slice(&c.to_le_bytes());
    }
    out.extend_from_slice(&magic.to_le_bytes());
    for (index, e) in entries.iter().enumerate() {
        let e = e.as_ref();
        let len = u32::try_from(e.len()).map_err(|_| EncodeImageError::EntryTooLarge {
            index,
            len: e.len(),
        })?;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(e);
    }
    Ok(out)
}

/// Decodes each entry with `M`, mapping protobuf errors to their entry index.
pub(crate) fn decode_entries<M: prost::Message + Default>(
    raw: &RawImage<'_>,
    skip: usize,
) -> Result<Vec<M>, DecodeImageError> {
    raw.entries
        .iter()
        .enumerate()
        .skip(skip)
        .map(|(index, e)| {
            M::decode(*e).map_err(|source| DecodeImageError::Protobuf { index, source })
        })
        .collect()
}
