//! One policy on one pattern, timed.
use medes_sim::eval::*;
use medes_sim::*;
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let (minh, maxh, pool, pol) = (
        a[1].parse().unwrap(),
        a[2].parse().unwrap(),
        a[3].parse().unwrap(),
        a[4].parse::<PolicySpec>().unwrap(),
    );
    let rc = medes_trace::RecipeConfig {
        min_per_hour: minh,
        max_per_hour: maxh,
        ..Default::default()
    };
    let idx: usize = a.get(5).map_or(0, |x| x.parse().unwrap());
    let pats = vec![patterns_with(idx + 1, 1, &rc).unwrap().swap_remove(idx)];
    eprintln!("{} invocations", pats[0].len());
    let t0 = std::time::Instant::now();
    let runs = run_grid(
        &pats,
        &Profile::paper(),
        &[(pol, pool)],
        1,
        false,
        &|_, _| {},
    )
    .unwrap();
    let s = &runs[0].output.summary;
    eprintln!(
        "{:?}: cold {} dedup {} mem {:.2} evict {} queued {} p999 {}",
        t0.elapsed(),
        s.cold_starts,
        s.dedup_starts,
        s.mean_memory_gb,
        s.counters.evictions,
        s.counters.queued,
        s.p999_ms
    );
}
