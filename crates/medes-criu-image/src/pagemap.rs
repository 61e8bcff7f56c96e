//! `pagemap-<pid>.img`: a `pagemap_head` entry, then one `pagemap_entry` per dumped range.

use crate::frame::{
    DecodeImageError, EncodeImageError, IMG_COMMON, MAGIC_PAGEMAP, decode_entries, decode_raw,
    encode_raw,
};

/// Pagemap flag: the pages are in the parent image.
pub const PE_PARENT: u32 = 1 << 0;
/// Pagemap flag: the pages are served lazily.
pub const PE_LAZY: u32 = 1 << 1;
/// Pagemap flag: the pages are in this dump's pages image.
pub const PE_PRESENT: u32 = 1 << 2;

/// `pagemap_head`.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct PagemapHead {
    /// The `<id>` of the `pages-<id>.img` holding the present pages.
    #[prost(uint32, required, tag = "1")]
    pub pages_id: u32,
}

/// `pagemap_entry` as on disk (both schemas).
#[derive(Clone, PartialEq, Eq, prost::Message)]
struct PagemapEntryPb {
    #[prost(uint64, required, tag = "1")]
    vaddr: u64,
    /// CRIU 4.1 `nr_pages`, CRIU 4.2 `compat_nr_pages`.
    #[prost(uint32, optional, tag = "2")]
    compat_nr_pages: Option<u32>,
    #[prost(bool, optional, tag = "3")]
    in_parent: Option<bool>,
    #[prost(uint32, optional, tag = "4")]
    flags: Option<u32>,
    /// CRIU 4.2 `nr_pages`.
    #[prost(uint64, optional, tag = "5")]
    nr_pages: Option<u64>,
}

/// One dumped range of a pagemap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagemapEntry {
    /// First virtual address of the range.
    pub vaddr: u64,
    /// Number of pages in the range.
    pub nr_pages: u64,
    /// `in_parent` (old images), kept for round trips.
    pub in_parent: Option<bool>,
    /// `PE_*` flags.
    pub flags: Option<u32>,
}

impl PagemapEntry {
    /// Whether the range's pages are in this dump's pages image.
    pub fn is_present(&self) -> bool {
        match self.flags {
            Some(f) => f & PE_PRESENT != 0,
            None => !self.in_parent.unwrap_or(false),
        }
    }
}

/// A parsed pagemap image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pagemap {
    /// The leading common magic, kept for round trips.
    pub common: Option<u32>,
    /// The head entry.
    pub head: PagemapHead,
    /// The ranges, in image order.
    pub entries: Vec<PagemapEntry>,
}

/// A present range and where its pages sit in the pages image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRun {
    /// First virtual address.
    pub vaddr: u64,
    /// Number of pages.
    pub nr_pages: u64,
    /// Index of its first page in the pages image.
    pub first_page: u64,
}

impl Pagemap {
    /// Number of pages in the pages image (sum over present entries).
    pub fn n_present_pages(&self) -> u64 {
        self.entries
            .iter()
            .filter(|e| e.is_present())
            .fold(0u64, |acc, e| acc.saturating_add(e.nr_pages))
    }

    /// The present ranges with their positions in the pages image.
    pub fn present_runs(&self) -> Vec<PageRun> {
        let mut first_page = 0u64;
        let mut runs = Vec::new();
        for e in self.entries.iter().filter(|e| e.is_present()) {
            runs.push(PageRun {
                vaddr: e.vaddr,
                nr_pages: e.nr_pages,
                first_page,
            });
            first_page = first_page.saturating_add(e.nr_pages);
        }
        runs
    }

    /// The virtual address of every page of the pages image, in order.
    pub fn page_addresses(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for r in self.present_runs() {
            for i in 0..r.nr_pages.min(1 << 32) {
                out.push(r.vaddr.wrapping_add(i.wrapping_mul(4096)));
            }
        }
        out
    }
}

/// Parses a pagemap image (CRIU 4.1 or 4.2 schema).
pub fn decode_pagemap(data: &[u8]) -> Result<Pagemap, DecodeImageError> {
    let raw = decode_raw(data, MAGIC_PAGEMAP)?;
    let Some(head) = raw.entries.first() else {
        return Err(DecodeImageError::EntryCount { found: 0 });
    };
    let head = <PagemapHead as prost::Message>::decode(*head)
        .map_err(|source| DecodeImageError::Protobuf { index: 0, source })?;
    let entries = decode_entries::<PagemapEntryPb>(&raw, 1)?
        .into_iter()
        .map(|e| PagemapEntry {
            vaddr: e.vaddr,
            nr_pages: e
                .nr_pages
                .unwrap_or_else(|| u64::from(e.compat_nr_pages.unwrap_or(0))),
            in_parent: e.in_parent,
            flags: e.flags,
        })
        .collect();
    Ok(Pagemap {
        common: raw.common,
        head,
        entries,
    })
}

/// Writes a pagemap image in the CRIU 4.1 schema (page count in field 2).
pub fn encode_pagemap(pm: &Pagemap) -> Result<Vec<u8>, EncodeImageError> {
    let mut payloads = Vec::with_capacity(pm.entries.len() + 1);
    payloads.push(prost::Message::encode_to_vec(&pm.head));
    for (i, e) in pm.entries.iter().enumerate() {
        let n = u32::try_from(e.nr_pages).map_err(|_| EncodeImageError::TooManyPages {
            index: i + 1,
            nr_pages: e.nr_pages,
        })?;
        let pb = PagemapEntryPb {
            vaddr: e.vaddr,
            compat_nr_pages: Some(n),
            in_parent: e.in_parent,
            flags: e.flags,
            nr_pages: None,
        };
        payloads.push(prost::Message::encode_to_vec(&pb));
    }
    encode_raw(
        Some(pm.common.unwrap_or(IMG_COMMON)),
        MAGIC_PAGEMAP,
        &payloads,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_criu_42_field_5() {
        let pb = PagemapEntryPb {
            vaddr: 0x1000,
            compat_nr_pages: None,
            in_parent: None,
            flags: Some(PE_PRESENT),
            nr_pages: Some(7),
        };
        let head = prost::Message::encode_to_vec(&PagemapHead { pages_id: 3 });
        let e = prost::Message::encode_to_vec(&pb);
        let img = encode_raw(Some(IMG_COMMON), MAGIC_PAGEMAP, &[head, e]).unwrap();
        let pm = decode_pagemap(&img).unwrap();
        assert_eq!(pm.entries[0].nr_pages, 7);
        assert_eq!(pm.n_present_pages(), 7);
        // Written back in the 4.1 schema: field 2, which 4.1 reads.
        let out = encode_pagemap(&pm).unwrap();
        let raw = decode_raw(&out, MAGIC_PAGEMAP).unwrap();
        let back = <PagemapEntryPb as prost::Message>::decode(raw.entries[1]).unwrap();
        assert_eq!(back.compat_nr_pages, Some(7));
        assert_eq!(back.nr_pages, None);
    }

    #[test]
    fn too_many_pages_for_field_2_is_an_error() {
        let pm = Pagemap {
            common: Some(IMG_COMMON),
            head: PagemapHead { pages_id: 1 },
            entries: vec![PagemapEntry {
                vaddr: 0,
                nr_pages: 1 << 33,
                in_parent: None,
                flags: Some(PE_PRESENT),
            }],
        };
        assert!(matches!(
            encode_pagemap(&pm),
            Err(EncodeImageError::TooManyPages { .. })
        ));
    }
}
