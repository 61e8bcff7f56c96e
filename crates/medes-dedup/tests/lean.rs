//! The file-backed rebuild (`DedupStore::open_lean`, `Rebuilder::from_file`) on real CRIU
//! dumps: the same pages as the in-memory rebuild, no copy of the page data held, and a store
//! file changed or truncated after it was opened fails the batches that read it (an error,
//! never a panic, never a wrong page).

#[path = "../../medes-criu-image/tests/support/mod.rs"]
mod support;

mod fixture;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use medes_dedup::rebuild::{RebuildScratch, Rebuilder};
use medes_dedup::*;

/// Every batch of `rb`: `Ok(pages)` or the error.
fn all_batches(rb: &Rebuilder) -> Vec<Result<Vec<u8>, RebuildError>> {
    let mut scratch = RebuildScratch::default();
    (0..rb.n_batches())
        .map(|b| {
            let r = rb.batch_pages(b);
            let mut out = vec![0u8; (r.end - r.start) as usize * PAGE];
            rb.rebuild_batch(b, &mut scratch, &mut out).map(|()| out)
        })
        .collect()
}

/// File offsets of each compressed block's data and of the blob, from the in-memory store
/// (the layout `DedupStore::write` makes: the blob, then the blocks section at the end).
fn layout(store: &DedupStore, file_len: u64) -> (Vec<(u64, u64)>, (u64, u64)) {
    let mut end = file_len;
    let mut blocks = Vec::new();
    for b in store.blocks.iter().rev() {
        blocks.push((end - b.len() as u64, b.len() as u64));
        end -= b.len() as u64 + 8;
    }
    blocks.reverse();
    let blob_end = end - 16;
    (
        blocks,
        (blob_end - store.blob.len() as u64, store.blob.len() as u64),
    )
}

fn open(path: &Path, store: &DedupStore, bases: &Arc<LocalBases>) -> Rebuilder {
    let (lean, file) = DedupStore::open_lean(path).expect("open lean");
    assert!(lean.blob.is_empty() && lean.blocks.is_empty());
    assert_eq!(lean.pages, store.pages);
    assert_eq!(lean.procs, store.procs);
    assert_eq!(lean.bases, store.bases);
    assert_eq!(lean.images, store.images);
    assert_eq!(lean.window_radius, store.window_radius);
    let rb = Rebuilder::from_file(lean, file, bases.clone()).expect("rebuilder");
    assert!(rb.is_file_backed());
    assert!(rb.store().images.is_empty(), "the images are dropped");
    rb
}

#[test]
fn file_backed_rebuild_matches_and_catches_a_changed_file() {
    if support::skip_without_criu("file-backed rebuild on real dumps") {
        return;
    }
    let (root, bases, store, whole) = fixture::json_store("dedup-lean");
    let bases = Arc::new(bases);
    let path = root.join("json-1.medes");
    let file_len = store.write(&path).unwrap();

    // Byte-identical to the in-memory rebuild, batch by batch and page group by page group.
    let rb = open(&path, &store, &bases);
    let got = all_batches(&rb);
    let mut joined = Vec::with_capacity(whole.len());
    for (b, r) in got.into_iter().enumerate() {
        joined.extend(r.unwrap_or_else(|e| panic!("batch {b}: {e}")));
    }
    assert_eq!(joined, whole);
    let mut scratch = RebuildScratch::default();
    for b in 0..rb.n_batches() {
        let r = rb.batch_pages(b);
        let mut out = vec![0u8; (r.end - r.start) as usize * PAGE];
        let some = [r.start + 1..r.start + 3, r.end - 1..r.end];
        rb.rebuild_batch_pages(b, &some, &mut scratch, &mut out)
            .unwrap();
        for p in some
            .iter()
            .flat_map(|x| x.clone())
            .filter(|p| r.contains(p))
        {
            let (o, w) = ((p - r.start) as usize * PAGE, p as usize * PAGE);
            assert_eq!(out[o..o + PAGE], whole[w..w + PAGE], "page {p}");
        }
    }
    // It holds the metadata, not the page data.
    let in_memory = Rebuilder::new(Arc::new(store.clone()), bases.clone()).unwrap();
    let payload = (store.blob.len() + store.blocks.iter().map(Vec::len).sum::<usize>()) as u64;
    println!(
        "file {file_len} B, payload {payload} B, in-memory rebuilder {} B, file-backed {} B, {} pages",
        in_memory.held_bytes(),
        rb.held_bytes(),
        store.pages.len()
    );
    assert!(rb.held_bytes() + payload <= in_memory.held_bytes());
    drop(rb);

    let (blocks, (blob_at, blob_len)) = layout(&store, file_len);
    // The layout helper is right: the bytes at those offsets are the blocks.
    let f = std::fs::File::open(&path).unwrap();
    for (b, &(at, len)) in blocks.iter().enumerate() {
        let mut buf = vec![0u8; len as usize];
        f.read_exact_at(&mut buf, at).unwrap();
        assert_eq!(buf, store.blocks[b]);
    }
    drop(f);

    // Changed in place after it was opened (verified): the batches whose data changed fail;
    // every batch that succeeds is right.
    let rb = open(&path, &store, &bases);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut flipped = Vec::new();
    for (b, &(at, len)) in blocks.iter().enumerate() {
        if len > 16 && b % 2 == 0 {
            let mut x = [0u8; 1];
            f.read_exact_at(&mut x, at + len / 2).unwrap();
            f.write_all_at(&[x[0] ^ 0x40], at + len / 2).unwrap();
            flipped.push(b);
        }
    }
    if blob_len > 0 {
        let mut x = [0u8; 1];
        f.read_exact_at(&mut x, blob_at + blob_len / 2).unwrap();
        f.write_all_at(&[x[0] ^ 0x40], blob_at + blob_len / 2)
            .unwrap();
    }
    assert!(!flipped.is_empty(), "the store has blocks to change");
    drop(f);
    let got = all_batches(&rb);
    for (b, r) in got.iter().enumerate() {
        let range = rb.batch_pages(b);
        match r {
            Ok(pages) => assert_eq!(
                pages[..],
                whole[range.start as usize * PAGE..range.end as usize * PAGE],
                "batch {b} was handed over wrong"
            ),
            Err(e) => assert!(
                matches!(
                    e,
                    RebuildError::Checksum { .. }
                        | RebuildError::Decode { .. }
                        | RebuildError::Unrebase { .. }
                ),
                "batch {b}: {e}"
            ),
        }
    }
    for b in &flipped {
        assert!(got[*b].is_err(), "batch {b}'s block was changed");
    }
    // Reopened, the changed file fails its checksum.
    assert!(matches!(
        DedupStore::open_lean(&path),
        Err(LoadStoreError::Checksum)
    ));
    drop(rb);

    // Truncated after it was opened: the batches past the end fail to read (not a panic).
    store.write(&path).unwrap();
    let rb = open(&path, &store, &bases);
    let cut = blocks
        .iter()
        .find(|(_, len)| *len > 0)
        .map_or(blob_at, |b| b.0);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(cut)
        .unwrap();
    let got = all_batches(&rb);
    let mut read_errors = 0;
    for (b, r) in got.iter().enumerate() {
        let range = rb.batch_pages(b);
        match r {
            Ok(pages) => assert_eq!(
                pages[..],
                whole[range.start as usize * PAGE..range.end as usize * PAGE]
            ),
            Err(RebuildError::Read { .. }) => read_errors += 1,
            Err(e) => panic!("batch {b}: unexpected {e}"),
        }
    }
    assert!(read_errors > 0);
    // Reopened, the truncated file is refused.
    assert!(matches!(
        DedupStore::open_lean(&path),
        Err(LoadStoreError::Malformed(_))
    ));
    let _ = std::fs::remove_dir_all(&root);
}
