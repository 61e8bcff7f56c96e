//! Rebuild speed of one dedup store (base dir, target dir): into a buffer, into pages files on
//! a tmpfs (`rebuild_pages_files`), a buffer then written, a whole CRIU image directory
//! (`rebuild_dir`); on 1 thread and on the default pool.
//!
//! `cargo run --release -p medes-dedup --example rebuild_speed -- BASE_DIR TARGET_DIR [OUT_DIR]`
use std::time::Instant;

use medes_dedup::*;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut cfg = DedupConfig::default();
    if std::env::var_os("NO_ZSTD_PATCHES").is_some() {
        cfg.codec.zstd_ref = false;
    }
    let registry = Registry::new();
    let base = DumpImage::open(&args[0])?;
    let meta = BaseMeta {
        function: "f".into(),
        node: NodeId(0),
    };
    register_base(&registry, BaseId(0), meta, &base, &cfg)?;
    let mut bases = LocalBases::new(cfg.rebase);
    bases.insert(BaseId(0), base);
    bases.materialize();
    let target = DumpImage::open(&args[1])?;
    let (store, stats) = dedup(&target, &registry, &bases, &cfg)?;
    let out = std::path::PathBuf::from(args.get(2).map_or("/dev/shm/rebuild-speed", |s| s));
    std::fs::create_dir_all(&out)?;
    let mb = store.n_pages() as f64 * 4096.0 / 1e6;
    println!(
        "pages {} ({mb:.1} MB), kinds {:?}",
        stats.pages, stats.kinds
    );
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    let report = |what: &str, f: &mut dyn FnMut() -> Result<(), RebuildError>| {
        let mut t = Vec::new();
        for _ in 0..15 {
            let t0 = Instant::now();
            f().expect("rebuild");
            t.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        t.sort_by(f64::total_cmp);
        println!(
            "{what:<28} p50 {:6.2} ms  min {:6.2} ms  ({:.2} GB/s at p50)",
            t[t.len() / 2],
            t[0],
            mb / t[t.len() / 2]
        );
    };
    report("buffer, pool", &mut || {
        rebuild_pages(&store, &bases).map(|_| ())
    });
    report("buffer, 1 thread", &mut || {
        one.install(|| rebuild_pages(&store, &bases).map(|_| ()))
    });
    report("pages files, pool", &mut || {
        rebuild_pages_files(&store, &bases, &out)
    });
    report("pages files, 1 thread", &mut || {
        one.install(|| rebuild_pages_files(&store, &bases, &out))
    });
    report("buffer + write, pool", &mut || {
        let pages = rebuild_pages(&store, &bases)?;
        std::fs::write(out.join("pages-1.img"), pages).map_err(|source| RebuildError::Write {
            path: out.clone(),
            source,
        })
    });
    report("rebuild_dir, pool", &mut || {
        rebuild_dir(&store, &bases, &out)
    });
    report("rebuild_dir, 1 thread", &mut || {
        one.install(|| rebuild_dir(&store, &bases, &out))
    });
    let _ = std::fs::remove_dir_all(&out);
    Ok(())
}
