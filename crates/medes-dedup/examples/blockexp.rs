//! Experiment: how well do sparse diffs and standalone pages compress in blocks of pages?
//! usage: blockexp BASE_DIR TARGET_DIR
use medes_dedup::*;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut cfg = DedupConfig::default();
    cfg.fingerprint.k = 16;
    cfg.codec.window_radius = 2;
    let registry = Registry::new();
    let base = DumpImage::open(&args[0])?;
    let meta = BaseMeta {
        function: "f".into(),
        node: NodeId(0),
    };
    register_base(&registry, BaseId(0), meta, &base, &cfg)?;
    let mut bases = LocalBases::new(true);
    bases.insert(BaseId(0), base);
    bases.materialize();
    let target = DumpImage::open(&args[1])?;
    let (fps, _) = fingerprint_dump(&target, &cfg.fingerprint, true);
    let choices = registry.choose_batch(&fps, target.positions(), NodeId(0));
    let mut enc = Encoder::default();
    let sparse_cfg = CodecConfig {
        zstd_ref: false,
        patch_threshold: 4096,
        ..cfg.codec
    };
    let win_cfg = CodecConfig {
        sparse_good_enough: 0,
        zref_min_gain: 0,
        ..cfg.codec
    };
    let (mut sparse_all, mut raw_all) = (Vec::new(), Vec::new());
    let (mut n_sp, mut n_raw, mut win_bytes, mut zstd_pp) = (0usize, 0usize, 0usize, 0usize);
    let mut best_mix = 0usize;
    let mut mix_blob = Vec::new();
    for i in 0..target.n_pages() {
        let (t, _) = target.canonical_page(i, true).unwrap();
        if fps[i as usize].zero {
            continue;
        }
        match choices[i as usize] {
            Some(c) => {
                let r = c.page();
                let bp = bases.page(r.base, u64::from(r.page))?;
                let w = bases.window(r.base, u64::from(r.page), 2)?;
                let mut d = Vec::new();
                let k = enc.encode(&t, Some(&bp), None, &sparse_cfg, &mut d);
                if k == PageKind::Same {
                    continue;
                }
                let mut dw = Vec::new();
                enc.encode(&t, Some(&bp), Some(&w), &win_cfg, &mut dw);
                win_bytes += dw.len();
                if k == PageKind::Sparse {
                    n_sp += 1;
                    sparse_all.push(d.clone());
                    // mix: sparse if within 2x of window
                    if d.len() <= 2 * dw.len() {
                        mix_blob.extend_from_slice(&d);
                    } else {
                        best_mix += dw.len();
                    }
                }
            }
            None => {
                n_raw += 1;
                raw_all.extend_from_slice(&t[..]);
                let mut d = Vec::new();
                enc.encode(
                    &t,
                    None,
                    None,
                    &CodecConfig {
                        standalone: Standalone::Zstd(1),
                        ..cfg.codec
                    },
                    &mut d,
                );
                zstd_pp += d.len();
            }
        }
    }
    let sparse_bytes: usize = sparse_all.iter().map(Vec::len).sum();
    let cat: Vec<u8> = sparse_all.concat();
    for lvl in [1, 3] {
        let mut blocks = 0usize;
        for chunk in cat.chunks(64 * 1024) {
            blocks += zstd::bulk::compress(chunk, lvl)?.len();
        }
        let mut mixb = 0usize;
        for chunk in mix_blob.chunks(64 * 1024) {
            mixb += zstd::bulk::compress(chunk, lvl)?.len();
        }
        let mut rawb = 0usize;
        for chunk in raw_all.chunks(256 * 1024) {
            rawb += zstd::bulk::compress(chunk, lvl)?.len();
        }
        println!(
            "level {lvl}: patched pages {n_sp}: sparse {:.0} B/p, sparse in 64K blocks {:.0} B/p, zstd-window {:.0} B/p, mix {:.0} B/p | standalone {n_raw}: per-page zstd1 {:.0} B/p, 256K blocks {:.0} B/p",
            sparse_bytes as f64 / n_sp as f64,
            blocks as f64 / n_sp as f64,
            win_bytes as f64 / n_sp as f64,
            (mixb + best_mix) as f64 / n_sp as f64,
            zstd_pp as f64 / n_raw.max(1) as f64,
            rawb as f64 / n_raw.max(1) as f64
        );
    }
    Ok(())
}
