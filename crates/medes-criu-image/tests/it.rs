//! Integration tests on real CRIU dumps and on random bytes.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use medes_criu_image::{
    ImageDir, MAGIC_PAGEMAP, PE_LAZY, decode_files, decode_mm, decode_pagemap, decode_raw,
    encode_mm, encode_pagemap, encode_raw, lazify, reg_file_names, unlazify, vma_status,
};
use proptest::prelude::*;

/// One real json-only dump per test binary run (or `MEDES_TEST_DUMP` if set).
fn real_dump() -> Option<&'static Path> {
    static DUMP: OnceLock<Option<PathBuf>> = OnceLock::new();
    DUMP.get_or_init(|| {
        if let Ok(d) = std::env::var("MEDES_TEST_DUMP") {
            return Some(PathBuf::from(d));
        }
        if support::skip_without_criu("real dump") {
            return None;
        }
        let dir = support::tmp_dir("criu-image");
        match support::make_dump(support::JSON_FUNCTION, &dir, true) {
            Ok(()) => Some(dir),
            Err(e) => panic!("making a real dump: {e}"),
        }
    })
    .as_deref()
}

fn image_files(dir: &Path, prefix: &str) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_owned();
            name.starts_with(prefix)
                .then(|| (name, std::fs::read(e.path()).unwrap()))
        })
        .collect();
    v.sort();
    v
}

#[test]
fn real_dump_round_trips_byte_identical() {
    let Some(dir) = real_dump() else { return };
    let pagemaps = image_files(dir, "pagemap-");
    assert!(!pagemaps.is_empty());
    for (name, bytes) in pagemaps {
        let pm = decode_pagemap(&bytes).unwrap();
        assert!(pm.n_present_pages() > 100, "{name}");
        assert_eq!(encode_pagemap(&pm).unwrap(), bytes, "{name}");
    }
    let mms = image_files(dir, "mm-");
    assert!(!mms.is_empty());
    for (name, bytes) in mms {
        let mm = decode_mm(&bytes).unwrap();
        assert!(mm.vmas.len() > 10, "{name}");
        assert_eq!(encode_mm(&mm).unwrap(), bytes, "{name}");
    }
    let loaded = ImageDir::load(dir).unwrap();
    assert!(!loaded.processes.is_empty());
    assert!(loaded.reg_files.values().any(|n| n.contains("python")));
}

/// The written pages of a real Python process's private file mappings become lazy anonymous
/// runs, the rest of each mapping stays the file's, and a later dump gets them back.
#[test]
fn real_dump_lazifies_its_written_file_pages_and_gets_them_back() {
    let Some(dir) = real_dump() else { return };
    let names = reg_file_names(&std::fs::read(dir.join("files.img")).unwrap()).unwrap();
    let ids = names.iter().map(|(id, n)| (n.clone(), *id)).collect();
    let mut made_lazy = 0;
    for (name, bytes) in image_files(dir, "mm-") {
        let pid = &name["mm-".len()..name.len() - ".img".len()];
        let mm = decode_mm(&bytes).unwrap();
        let pm = decode_pagemap(&std::fs::read(dir.join(format!("pagemap-{pid}.img"))).unwrap())
            .unwrap();
        let Some(l) = lazify(&mm, &pm) else { continue };
        made_lazy += l.pages;
        // The same pages in the same order (the pages image is unchanged).
        let addrs = |p: &medes_criu_image::Pagemap| p.page_addresses();
        assert_eq!(addrs(&l.pagemap), addrs(&pm));
        // The mappings cover the same addresses with the same protections.
        let spans = |m: &medes_criu_image::MmEntry| {
            let mut v: Vec<(u64, u64, u32)> = Vec::new();
            for x in &m.vmas {
                match v.last_mut() {
                    Some(l) if l.1 == x.start && l.2 == x.prot => l.1 = x.end,
                    _ => v.push((x.start, x.end, x.prot)),
                }
            }
            v
        };
        assert_eq!(spans(&l.mm), spans(&mm));
        // Every page in a private file mapping is lazy now, and no lazy page is in one.
        for e in l.pagemap.entries.iter().filter(|e| e.is_present()) {
            let lazy = e.flags.unwrap_or(0) & PE_LAZY != 0;
            for i in 0..e.nr_pages {
                let a = e.vaddr + i * 4096;
                let v =
                    l.mm.vmas
                        .iter()
                        .find(|v| v.start <= a && a < v.end)
                        .unwrap();
                if v.status & vma_status::FILE_PRIVATE != 0 {
                    panic!("page {a:#x} left in a private file mapping");
                }
                let was_file = mm
                    .vmas
                    .iter()
                    .any(|v| v.start <= a && a < v.end && v.status & vma_status::FILE_PRIVATE != 0);
                assert!(lazy || !was_file, "page {a:#x} not made lazy");
            }
        }
        // The python binary's data is among what was split; it comes back as it was.
        let split: Vec<_> = l
            .split
            .iter()
            .map(|v| (v.clone(), names[&(v.shmid as u32)].clone()))
            .collect();
        assert!(split.iter().any(|(_, n)| n.contains("python")));
        let (back_mm, back_pm) = unlazify(&l.mm, &l.pagemap, &split, &ids).unwrap();
        assert_eq!(back_mm, mm);
        // Every page flagged as in the dump (the file mappings' pages eager again; entries
        // stay split).
        let flags = |p: &medes_criu_image::Pagemap| {
            p.entries
                .iter()
                .filter(|e| e.is_present())
                .flat_map(|e| (0..e.nr_pages).map(move |i| (e.vaddr + i * 4096, e.flags)))
                .collect::<Vec<_>>()
        };
        assert_eq!(flags(&back_pm), flags(&pm));
    }
    assert!(made_lazy > 50, "only {made_lazy} pages made lazy");
}

fn crit_decode(path: &Path) -> Option<serde_json::Value> {
    let out = match Command::new("crit")
        .args(["decode", "-i"])
        .arg(path)
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("CI=true but crit is missing: {e}");
            }
            eprintln!("skipping crit comparison: {e}");
            return None;
        }
    };
    assert!(out.status.success(), "crit failed on {path:?}");
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

#[test]
fn crit_agrees_with_our_reader() {
    let Some(dir) = real_dump() else { return };
    for (name, bytes) in image_files(dir, "pagemap-") {
        let Some(v) = crit_decode(&dir.join(&name)) else {
            return;
        };
        let pm = decode_pagemap(&bytes).unwrap();
        let entries = v["entries"].as_array().unwrap();
        assert_eq!(
            entries[0]["pages_id"].as_u64().unwrap(),
            u64::from(pm.head.pages_id)
        );
        assert_eq!(entries.len() - 1, pm.entries.len());
        for (c, e) in entries[1..].iter().zip(&pm.entries) {
            assert_eq!(c["vaddr"].as_u64().unwrap(), e.vaddr);
            assert_eq!(c["nr_pages"].as_u64().unwrap(), e.nr_pages);
            assert_eq!(c["flags"].as_u64().map(|f| f as u32), e.flags);
        }
    }
    for (name, bytes) in image_files(dir, "mm-") {
        let Some(v) = crit_decode(&dir.join(&name)) else {
            return;
        };
        let mm = decode_mm(&bytes).unwrap();
        let c = &v["entries"][0];
        assert_eq!(c["mm_start_brk"].as_u64().unwrap(), mm.mm_start_brk);
        assert_eq!(
            c["mm_saved_auxv"].as_array().unwrap().len(),
            mm.mm_saved_auxv.len()
        );
        let vmas = c["vmas"].as_array().unwrap();
        assert_eq!(vmas.len(), mm.vmas.len());
        for (cv, ov) in vmas.iter().zip(&mm.vmas) {
            assert_eq!(cv["start"].as_u64().unwrap(), ov.start);
            assert_eq!(cv["end"].as_u64().unwrap(), ov.end);
            assert_eq!(cv["pgoff"].as_u64().unwrap(), ov.pgoff);
            assert_eq!(cv["shmid"].as_u64().unwrap(), ov.shmid);
            assert_eq!(cv["prot"].as_u64().unwrap(), u64::from(ov.prot));
            assert_eq!(cv["flags"].as_u64().unwrap(), u64::from(ov.flags));
            assert_eq!(cv["status"].as_u64().unwrap(), u64::from(ov.status));
            assert_eq!(cv["fd"].as_i64().unwrap(), ov.fd);
        }
    }
    let Some(v) = crit_decode(&dir.join("files.img")) else {
        return;
    };
    let files = decode_files(&std::fs::read(dir.join("files.img")).unwrap()).unwrap();
    let entries = v["entries"].as_array().unwrap();
    assert_eq!(entries.len(), files.len());
    for (c, f) in entries.iter().zip(&files) {
        assert_eq!(c["id"].as_u64().unwrap(), u64::from(f.id));
        if let Some(r) = &f.reg {
            assert_eq!(c["reg"]["name"].as_str().unwrap(), r.name);
        }
    }
}

#[test]
fn truncated_pages_image_is_rejected() {
    let Some(dir) = real_dump() else { return };
    let copy = support::tmp_dir("criu-image-trunc");
    std::fs::create_dir_all(&copy).unwrap();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), copy.join(e.file_name())).unwrap();
    }
    let pages = image_files(&copy, "pages-");
    let (name, bytes) = &pages[0];
    std::fs::write(copy.join(name), &bytes[..bytes.len() - 4096]).unwrap();
    let err = ImageDir::load(&copy).unwrap_err();
    assert!(err.to_string().contains(name.as_str()), "{err}");
    std::fs::remove_dir_all(&copy).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_pagemap(&data);
        let _ = decode_mm(&data);
        let _ = decode_files(&data);
    }

    #[test]
    fn random_entries_behind_valid_magic_never_panic(
        entries in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..8),
        cut in 0usize..64,
    ) {
        let mut img = encode_raw(Some(medes_criu_image::IMG_COMMON), MAGIC_PAGEMAP, &entries).unwrap();
        let keep = img.len().saturating_sub(cut);
        img.truncate(keep);
        let _ = decode_pagemap(&img);
        let raw = decode_raw(&img, MAGIC_PAGEMAP);
        if cut == 0 {
            prop_assert_eq!(raw.unwrap().entries.len(), entries.len());
        }
    }

    #[test]
    fn corrupted_real_images_never_panic(pos in any::<usize>(), byte in any::<u8>(), which in 0usize..2) {
        let Some(dir) = real_dump() else { return Ok(()) };
        let prefix = if which == 0 { "pagemap-" } else { "mm-" };
        let (_, mut bytes) = image_files(dir, prefix).swap_remove(0);
        let p = pos % bytes.len();
        bytes[p] = byte;
        if let Ok(pm) = decode_pagemap(&bytes) {
            let _ = encode_pagemap(&pm);
        }
        if let Ok(mm) = decode_mm(&bytes) {
            let _ = encode_mm(&mm);
        }
    }

    #[test]
    fn pagemap_write_read_is_identity(
        pages_id in any::<u32>(),
        ents in proptest::collection::vec((any::<u64>(), any::<u32>(), proptest::option::of(any::<bool>()), proptest::option::of(any::<u32>())), 0..20),
    ) {
        let pm = medes_criu_image::Pagemap {
            common: Some(medes_criu_image::IMG_COMMON),
            head: medes_criu_image::PagemapHead { pages_id },
            entries: ents.iter().map(|&(vaddr, n, in_parent, flags)| medes_criu_image::PagemapEntry {
                vaddr, nr_pages: u64::from(n), in_parent, flags,
            }).collect(),
        };
        let bytes = encode_pagemap(&pm).unwrap();
        let back = decode_pagemap(&bytes).unwrap();
        prop_assert_eq!(&back, &pm);
        prop_assert_eq!(encode_pagemap(&back).unwrap(), bytes);
    }
}
