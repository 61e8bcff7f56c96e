//! A/B timing of `unrebase` (bitmap, then lookups) against the branch-free form, interleaved.
use std::time::Instant;

use medes_dedup::*;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let d = DumpImage::open(&args[0])?;
    let mut pages: Vec<(Page, usize)> = Vec::new();
    for i in 0..d.n_pages() {
        let (p, _) = d.locate(i).ok_or("page")?;
        let mut out = [0u8; PAGE];
        if d.procs[p]
            .table
            .rebase(d.page(i).ok_or("page")?, &mut out)
            .is_some()
        {
            pages.push((out, p));
        }
    }
    let (mut a, mut b) = (f64::MAX, f64::MAX);
    for _ in 0..10 {
        let mut work = pages.clone();
        let t = Instant::now();
        for (pg, p) in &mut work {
            d.procs[*p].table.unrebase(pg)?;
        }
        a = a.min(t.elapsed().as_secs_f64());
        let mut work2 = pages.clone();
        let t = Instant::now();
        for (pg, p) in &mut work2 {
            d.procs[*p].table.unrebase_branchless(pg)?;
        }
        b = b.min(t.elapsed().as_secs_f64());
        assert!(work == work2);
    }
    let n = pages.len() as f64;
    println!(
        "{} pages: bitmap {:.2} µs/page, branch-free {:.2} µs/page",
        pages.len(),
        a * 1e6 / n,
        b * 1e6 / n
    );
    Ok(())
}
