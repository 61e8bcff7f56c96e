//! The batch forms of the rebuild (`rebuild::rebuild_batches`, `rebuild::Rebuilder`) on real
//! CRIU dumps: the same pages as the whole rebuild, and a corrupt page never handed over.

#[path = "../../medes-criu-image/tests/support/mod.rs"]
mod support;

mod fixture;

use std::sync::{Arc, Mutex};

use medes_dedup::rebuild::{BATCH_PAGES, RebuildScratch, Rebuilder, rebuild_batches};
use medes_dedup::*;

#[test]
fn batches_match_the_whole_rebuild_and_stop_at_a_bad_page() {
    if support::skip_without_criu("batch rebuild on real dumps") {
        return;
    }
    let (root, bases, store, whole) = fixture::json_store("dedup-batches");

    // Callback form: every batch once, at its place.
    let got = Mutex::new(vec![0u8; whole.len()]);
    let seen = Mutex::new(Vec::new());
    rebuild_batches(&store, &bases, |first, pages| {
        let o = first as usize * 4096;
        got.lock().unwrap()[o..o + pages.len()].copy_from_slice(pages);
        seen.lock().unwrap().push(first);
        true
    })
    .unwrap();
    assert_eq!(got.into_inner().unwrap(), whole);
    let mut seen = seen.into_inner().unwrap();
    seen.sort_unstable();
    let n = store.pages.len().div_ceil(BATCH_PAGES);
    assert_eq!(seen.len(), n);

    // Owned form, any order (last batch first).
    let store = Arc::new(store);
    let bases = Arc::new(bases);
    let rb = Rebuilder::new(store.clone(), bases.clone()).unwrap();
    assert_eq!(rb.n_batches(), n);
    let mut scratch = RebuildScratch::default();
    for b in (0..n).rev() {
        let r = rb.batch_pages(b);
        let mut out = vec![0u8; (r.end - r.start) as usize * 4096];
        rb.rebuild_batch(b, &mut scratch, &mut out).unwrap();
        assert_eq!(out, whole[r.start as usize * 4096..r.end as usize * 4096]);
    }

    // A corrupt page: its batch is never handed over, the error names the page.
    let i = store
        .pages
        .iter()
        .position(|e| e.len > 8 && !e.kind.in_block())
        .or_else(|| store.pages.iter().position(|e| e.kind.in_block()));
    let mut bad = (*store).clone();
    let bad_batch = match i {
        Some(i) if !store.pages[i].kind.in_block() => {
            let off = store.offsets()[i] as usize + store.pages[i].len as usize / 2;
            bad.blob[off] ^= 0x40;
            i / BATCH_PAGES
        }
        _ => {
            let b = bad.blocks.iter().position(|b| b.len() > 16).unwrap();
            let mid = bad.blocks[b].len() / 2;
            bad.blocks[b][mid] ^= 0x40;
            b
        }
    };
    let handed = Mutex::new(Vec::new());
    let err = rebuild_batches(&bad, &*bases, |first, _| {
        handed.lock().unwrap().push(first as usize / BATCH_PAGES);
        true
    })
    .unwrap_err();
    assert!(
        matches!(
            err,
            RebuildError::Checksum { .. }
                | RebuildError::Decode { .. }
                | RebuildError::Unrebase { .. }
        ),
        "{err}"
    );
    assert!(!handed.into_inner().unwrap().contains(&bad_batch));
    let bad = Arc::new(bad);
    let rb = Rebuilder::new(bad, bases.clone()).unwrap();
    let r = rb.batch_pages(bad_batch);
    let mut out = vec![0u8; (r.end - r.start) as usize * 4096];
    assert!(rb.rebuild_batch(bad_batch, &mut scratch, &mut out).is_err());

    // The caller can stop the rebuild.
    let err = rebuild_batches(&store, &*bases, |_, _| false).unwrap_err();
    assert!(matches!(err, RebuildError::Stopped), "{err}");
    let _ = std::fs::remove_dir_all(&root);
}
