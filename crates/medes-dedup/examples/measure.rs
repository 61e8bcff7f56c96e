//! Measures savings and speeds on real dumps made by `scripts/make-dumps.sh`.
//!
//! usage: measure DUMPS_DIR [variant...] [--json] [--aslr-off]
//! DUMPS_DIR holds `<function>-0` (the base) and `<function>-1..` (deduplicated sandboxes).
//! Variants (joined with '+'): default, norebase, pos, win0, win1, k5, k8, zstd1, lz4, nozref,
//! bf1, bf2, bf8, nosecond, materialize (precomputed rebased bases: use it for rebuild figures).
use std::collections::BTreeMap;
use std::path::PathBuf;

use medes_dedup::eval::{EvalConfig, evaluate};
use medes_dedup::{DedupConfig, Standalone};

fn variant(name: &str) -> (DedupConfig, bool) {
    let mut c = DedupConfig::default();
    let mut materialize = false;
    for part in name.split('+') {
        match part {
            "default" => {}
            "norebase" => c.rebase = false,
            "nozref" => c.codec.zstd_ref = false,
            "lz4" => c.codec.standalone = Standalone::Lz4,
            "raw" => c.codec.standalone = Standalone::Raw,
            "zstd3" => c.codec.standalone = Standalone::Zstd(3),
            "nosecond" => c.second_candidate_above = 0,
            "nopos" => c.positional = false,
            "pos" => c.positional = true,
            "second0" => c.second_candidate_above = 1,
            "k8" => c.fingerprint.k = 8,
            "k16" => c.fingerprint.k = 16,
            "mask3" => c.fingerprint.mask_bits = 3,
            "mask7" => c.fingerprint.mask_bits = 7,
            "gain0" => c.codec.zref_min_gain = 0,
            "gain256" => c.codec.zref_min_gain = 256,
            "materialize" => materialize = true,
            "win0" => c.codec.window_radius = 0,
            "win1" => c.codec.window_radius = 1,
            "zstd1" => c.codec.standalone = Standalone::Zstd(1),
            "bf1" => c.codec.block_factor = 1,
            "bf2" => c.codec.block_factor = 2,
            "sge400" => c.codec.sparse_good_enough = 400,
            "sge800" => c.codec.sparse_good_enough = 800,
            "blk1" => c.block_level = 1,
            "blk6" => c.block_level = 6,
            "blk9" => c.block_level = 9,
            "zl3" => c.codec.zstd_ref_level = 3,
            "bf4" => c.codec.block_factor = 4,
            "bf8" => c.codec.block_factor = 8,
            "k5" => c.fingerprint.k = 5,
            "win2" => c.codec.window_radius = 2,
            "win4" => c.codec.window_radius = 4,
            "nolz" => c.codec.lz = false,
            "pred0" => c.predict_below = 0,
            "pred64" => c.predict_below = 64,
            "pred256" => c.predict_below = 256,
            "pred512" => c.predict_below = 512,
            "secondfail" => c.second_candidate_above = usize::MAX,
            "second512" => c.second_candidate_above = 512,
            "zref" => c.codec.zstd_ref = true,
            "zabove1k" => c.codec.zstd_above = 1024,
            "mask5" => c.fingerprint.mask_bits = 5,
            "mask6" => c.fingerprint.mask_bits = 6,
            "blk3" => c.block_level = 3,
            "blk2" => c.block_level = 2,
            "blk0" => c.block_level = 0,
            "blkm1" => c.block_level = -1,
            "paper" => {
                // The paper's technique set: no rebasing, no LZ/zstd patches (sparse diffs
                // only), pages without a good base stored raw, k = 5.
                c.rebase = false;
                c.codec.lz = false;
                c.codec.zstd_ref = false;
                c.fingerprint.k = 5;
            }
            "nocompress" => c.block_level = i32::MIN,
            other => panic!("unknown variant part {other}"),
        }
    }
    (c, materialize)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = PathBuf::from(
        args.first()
            .ok_or("usage: measure DUMPS_DIR [variant...]")?,
    );
    let json = args.iter().any(|a| a == "--json");
    let aslr = !args.iter().any(|a| a == "--aslr-off");
    let mut variants: Vec<&str> = args[1..]
        .iter()
        .filter(|a| !a.starts_with("--"))
        .map(String::as_str)
        .collect();
    if variants.is_empty() {
        variants.push("default");
    }
    let mut groups: BTreeMap<String, Vec<(u32, PathBuf)>> = BTreeMap::new();
    for e in std::fs::read_dir(&dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some((f, i)) = name.rsplit_once('-')
            && let Ok(i) = i.parse::<u32>()
            && e.path().is_dir()
        {
            groups.entry(f.to_owned()).or_default().push((i, e.path()));
        }
    }
    let mut bases = Vec::new();
    let mut targets = Vec::new();
    for (f, mut v) in groups {
        v.sort();
        let mut it = v.into_iter();
        if let Some((_, b)) = it.next() {
            bases.push((f.clone(), b));
        }
        targets.extend(it.map(|(_, p)| (f.clone(), p)));
    }
    for v in variants {
        let (dedup, materialize_bases) = variant(v);
        let cfg = EvalConfig {
            dedup,
            aslr,
            store_dir: std::env::temp_dir(),
            materialize_bases,
            rebuild_cpu_repeats: 5,
        };
        let r = evaluate(&bases, &targets, &cfg)?;
        if json {
            println!("{}", serde_json::to_string_pretty(&r)?);
            continue;
        }
        println!(
            "== {v} (aslr {aslr}): mean savings {:.1}%  registry {:.1} B/entry ({} refs)",
            r.mean_savings_pct, r.registry.bytes_per_entry, r.registry.chunk_refs
        );
        for f in &r.functions {
            println!(
                "  {:8} pages {:6} zero {:5} same {:5} patch {:5} alone {:5} | img {:6.1} MB stored {:5.2} MB savings {:5.1}% | patch {:4.0} B cross {:4.1}% | fp {:.2} us/p lookup {:.2} us/p dedup {:6.1} ms | rebuild {:6.1} ms {:5.2} GB/s",
                f.name,
                f.pages,
                f.zero,
                f.exact,
                f.patched,
                f.standalone,
                f.image_mb,
                f.stored_mb,
                f.savings_pct,
                f.avg_patch_bytes,
                f.cross_function_base_pct,
                f.fingerprint_us_per_page,
                f.lookup_us_per_page,
                f.dedup_ms,
                f.rebuild_ms,
                f.rebuild_gb_per_s
            );
            println!(
                "           dedup CPU {:.0} ms; rebuild CPU {:.1} ms/sandbox = {:.2} GB/s on 2 unshared cores",
                f.dedup_cpu_ms,
                f.rebuild_cpu_ms.unwrap_or(0.0),
                f.rebuild_cpu_gb_per_s_2_cores.unwrap_or(0.0)
            );
            let kinds: Vec<String> = f
                .kind_pages
                .iter()
                .map(|(k, n)| {
                    format!(
                        "{k} {n}p/{:.0}KB",
                        f.kind_bytes.get(k).copied().unwrap_or(0) as f64 / 1e3
                    )
                })
                .collect();
            println!("           {}", kinds.join("  "));
        }
    }
    Ok(())
}
