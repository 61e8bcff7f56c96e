//! Integration tests on real CRIU dumps: dedup → store → rebuild → byte-identical images, a real
//! `criu restore` of the rebuilt images, and errors that name the page.

#[path = "../../medes-criu-image/tests/support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::sync::OnceLock;

use medes_dedup::*;

struct Dumps {
    base: PathBuf,
    target: PathBuf,
}

/// Two independent cold-started json-only sandboxes (ASLR on): base and target.
fn dumps() -> Option<&'static Dumps> {
    static D: OnceLock<Option<Dumps>> = OnceLock::new();
    D.get_or_init(|| {
        if support::skip_without_criu("dedup on real dumps") {
            return None;
        }
        let root = support::tmp_dir("dedup");
        let base = root.join("json-0");
        let target = root.join("json-1");
        // nextest runs each test in its own process: concurrent CRIU dumps of processes that
        // share the mount namespace can collide in CRIU's parasite ("Can't create a directory
        // (-17)"), so the dumps of this binary's processes take turns.
        let lock = std::fs::File::create(std::env::temp_dir().join("medes-dedup-it-dump.lock"))
            .expect("lock file");
        lock.lock().expect("lock");
        support::make_dump(support::JSON_FUNCTION, &base, true).expect("base dump");
        support::make_dump(support::JSON_FUNCTION, &target, true).expect("target dump");
        drop(lock);
        Some(Dumps { base, target })
    })
    .as_ref()
}

fn setup(cfg: &DedupConfig, d: &Dumps) -> (Registry, LocalBases) {
    let registry = Registry::new();
    let mut bases = LocalBases::new(cfg.rebase);
    let dump = DumpImage::open(&d.base).unwrap();
    let meta = BaseMeta {
        function: "json".into(),
        node: NodeId(0),
    };
    register_base(&registry, BaseId(1), meta, &dump, cfg).unwrap();
    bases.insert(BaseId(1), dump);
    (registry, bases)
}

#[test]
fn dedup_store_rebuild_is_byte_identical_and_restores() {
    let Some(d) = dumps() else { return };
    for rebase in [true, false] {
        let cfg = DedupConfig {
            rebase,
            ..DedupConfig::default()
        };
        let (registry, bases) = setup(&cfg, d);
        let target = DumpImage::open(&d.target).unwrap();
        let (store, stats) = dedup(&target, &registry, &bases, &cfg).unwrap();
        assert_eq!(stats.pages, target.n_pages());
        assert!(stats.exact + stats.patched > stats.pages / 3, "{stats:?}");
        let path = d.target.with_extension(format!("store-{rebase}"));
        let written = store.write(&path).unwrap();
        assert!(written < target.pages_bytes() / 3, "{written}");
        let loaded = DedupStore::load(&path).unwrap();
        assert_eq!(loaded, store);

        let out = d.target.with_extension(format!("rebuilt-{rebase}"));
        std::fs::create_dir_all(&out).unwrap();
        rebuild_dir(&loaded, &bases, &out).unwrap();
        for e in std::fs::read_dir(&d.target).unwrap() {
            let e = e.unwrap();
            let name = e.file_name();
            if name.to_string_lossy().ends_with(".log") {
                continue;
            }
            assert_eq!(
                std::fs::read(e.path()).unwrap(),
                std::fs::read(out.join(&name)).unwrap(),
                "{name:?}"
            );
        }
        if rebase {
            // The rebuilt images restore and the process carries on.
            // The restored process keeps writing the answer file of the dump it came from.
            let answer = support::answer_file(&d.target);
            let expected = support::restore_and_read_answer(&out, &answer).unwrap();
            assert!(expected.parse::<u64>().unwrap() > 10_000, "{expected}");
        }
        std::fs::remove_dir_all(&out).unwrap();
        std::fs::remove_file(&path).unwrap();
    }
}

#[test]
fn corrupt_or_missing_base_is_an_error_naming_the_page() {
    let Some(d) = dumps() else { return };
    // zstd patches on too, so that the blob holds patches.
    let mut cfg = DedupConfig::default();
    cfg.codec.zstd_ref = true;
    let (registry, bases) = setup(&cfg, d);
    let target = DumpImage::open(&d.target).unwrap();
    let (store, _) = dedup(&target, &registry, &bases, &cfg).unwrap();

    // A flipped byte in a zstd patch: checksum mismatch or undecodable, naming the page.
    let i = store
        .pages
        .iter()
        .position(|e| e.kind.needs_base() && !e.kind.in_block() && e.len > 0)
        .unwrap();
    let off = store.offsets()[i] as usize + store.pages[i].len as usize / 2;
    let mut bad = store.clone();
    bad.blob[off] ^= 0x40;
    let err = rebuild_pages(&bad, &bases).unwrap_err();
    match err {
        RebuildError::Checksum { page }
        | RebuildError::Decode { page, .. }
        | RebuildError::Unrebase { page, .. } => {
            assert_eq!(page, i as u64)
        }
        ref e => panic!("unexpected {e}"),
    }
    assert!(err.to_string().contains(&format!("page {i}")), "{err}");

    // A corrupt block of sparse diffs and raw pages: an error naming a page of that block.
    let b = store.blocks.iter().position(|b| b.len() > 16).unwrap();
    let mut bad = store.clone();
    let mid = bad.blocks[b].len() / 2;
    bad.blocks[b][mid] ^= 0x40;
    match rebuild_pages(&bad, &bases).unwrap_err() {
        RebuildError::Checksum { page }
        | RebuildError::Decode { page, .. }
        | RebuildError::Unrebase { page, .. } => {
            assert_eq!(page as usize / store::BLOCK_PAGES, b)
        }
        e => panic!("unexpected {e}"),
    }

    // The base is gone.
    let empty = LocalBases::new(true);
    let err = rebuild_pages(&store, &empty).unwrap_err();
    assert!(matches!(err, RebuildError::BasePage { .. }), "{err}");

    // A store file with a flipped byte does not load.
    let path = d.target.with_extension("corrupt-store");
    store.write(&path).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(
        DedupStore::load(&path),
        Err(LoadStoreError::Checksum)
    ));
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn registry_refcounts_and_removal() {
    let Some(d) = dumps() else { return };
    let cfg = DedupConfig::default();
    let (registry, _bases) = setup(&cfg, d);
    let before = registry.stats();
    assert!(before.chunk_refs > 1000);
    registry.acquire(BaseId(1)).unwrap();
    assert!(matches!(
        registry.remove_base(BaseId(1)),
        Err(BaseRefError::InUse { .. })
    ));
    registry.release(BaseId(1)).unwrap();
    assert!(registry.release(BaseId(1)).is_err());
    registry.remove_base(BaseId(1)).unwrap();
    let after = registry.stats();
    assert_eq!(after.chunk_refs, 0);
    assert_eq!(after.exact_keys, 0);
}

#[test]
fn evaluate_reports_the_contract_fields() {
    let Some(d) = dumps() else { return };
    let cfg = eval::EvalConfig {
        dedup: DedupConfig::default(),
        aslr: true,
        store_dir: d.base.parent().unwrap().to_path_buf(),
        materialize_bases: true,
        rebuild_cpu_repeats: 1,
    };
    let r = evaluate(
        &[("json".into(), d.base.clone())],
        &[("json".into(), d.target.clone())],
        &cfg,
    )
    .unwrap();
    let v = serde_json::to_value(&r).unwrap();
    for k in ["aslr", "mean_savings_pct", "functions"] {
        assert!(v.get(k).is_some(), "{k}");
    }
    let f = &v["functions"][0];
    for k in [
        "name",
        "pages",
        "image_mb",
        "stored_mb",
        "savings_pct",
        "base_mb",
        "avg_patch_bytes",
        "cross_function_base_pct",
        "fingerprint_us_per_page",
        "lookup_us_per_page",
        "dedup_ms",
        "rebuild_ms",
        "rebuild_gb_per_s",
    ] {
        assert!(f.get(k).is_some(), "{k}");
    }
    assert!(r.mean_savings_pct > 50.0, "{}", r.mean_savings_pct);
}
