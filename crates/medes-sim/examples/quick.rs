//! Quick look at a few policies on the evaluation's setup:
//! `POLICIES=medes,fixed-10m POOLS=40,20 cargo run --release -p medes-sim --example quick`.
use medes_sim::eval::*;
use medes_sim::*;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let var = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
    let rc = medes_trace::RecipeConfig {
        min_per_hour: var("MINH", &EVAL_MIN_PER_HOUR.to_string()).parse()?,
        max_per_hour: var("MAXH", &EVAL_MAX_PER_HOUR.to_string()).parse()?,
        ..eval_recipe()
    };
    let pats = patterns_with(
        var("PATTERNS", "5").parse()?,
        1,
        &rc,
        var("SYNTH", "2000").parse()?,
    )?;
    for p in &pats {
        eprint!("{} ", p.len());
    }
    eprintln!("invocations");
    let mut jobs = Vec::new();
    for pool in var("POOLS", "40,30,20").split(',') {
        for p in var("POLICIES", &MAIN_POLICIES.join(",")).split(',') {
            jobs.push((p.parse::<PolicySpec>()?, pool.parse::<f64>()?));
        }
    }
    let t0 = std::time::Instant::now();
    let runs = run_grid(&pats, &Profile::paper(), &jobs, 1, false, &|_, _| {})?;
    eprintln!("{} runs in {:?}", runs.len(), t0.elapsed());
    for r in rows(&runs) {
        println!(
            "{:24} {:>3} cold/h {:7.1} dedup {:6} p999 {:6.0} sp999 {:6.0} mem {:5.2} GB dshare {:.2} evict {}",
            r.policy,
            r.pool_gb,
            r.cold_starts_per_hour,
            r.dedup_starts,
            r.p999_ms,
            r.startup_p999_ms,
            r.mean_memory_gb,
            r.dedup_share,
            r.evictions
        );
    }
    Ok(())
}
