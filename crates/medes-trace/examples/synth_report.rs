//! Statistics of the synthetic generator over several seeds, against the published ones.
//!
//! `cargo run --release -p medes-trace --example synth_report -- [FUNCTIONS] [SEEDS]`
//! (defaults: 10000 functions, seeds 1..=10). The numbers in the `synth` module docs come from here.

use medes_trace::{Azure2019Stats, SynthConfig, Synthetic, Trigger};

fn main() {
    let mut args = std::env::args().skip(1);
    let functions: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let seeds: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    let mut runs = Vec::new();
    for seed in 1..=seeds {
        let mut st = Azure2019Stats::new();
        for row in Synthetic::new(SynthConfig {
            seed,
            functions,
            ..Default::default()
        }) {
            st.add(&row);
        }
        runs.push(st.finish());
    }
    let mean = |f: &dyn Fn(&medes_trace::Azure2019Summary) -> f64| {
        runs.iter().map(f).sum::<f64>() / runs.len() as f64
    };
    let range = |f: &dyn Fn(&medes_trace::Azure2019Summary) -> f64| {
        let v: Vec<f64> = runs.iter().map(f).collect();
        (
            v.iter().copied().fold(f64::INFINITY, f64::min),
            v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        )
    };
    println!("{functions} functions × {seeds} seeds (mean [min, max])");
    type Metric = (
        &'static str,
        fn(&medes_trace::Azure2019Summary) -> f64,
        &'static str,
    );
    let metrics: [Metric; 6] = [
        (
            "rate spread, orders of magnitude",
            |s| s.rate_spread_orders,
            "~8",
        ),
        (
            "functions < 1/min, %",
            |s| 100.0 * s.frac_functions_below_1_per_min,
            "-",
        ),
        (
            "apps < 1/min, %",
            |s| 100.0 * s.frac_apps_below_1_per_min,
            "81",
        ),
        (
            "apps <= 1/hour, %",
            |s| 100.0 * s.frac_apps_at_most_1_per_hour,
            "45",
        ),
        (
            "single-function apps, %",
            |s| 100.0 * s.frac_single_function_apps,
            "54",
        ),
        (
            "diurnal peak/trough",
            |s| s.diurnal_peak_to_trough.unwrap_or(0.0),
            "~2",
        ),
    ];
    for (name, f, published) in metrics {
        let (lo, hi) = range(&f);
        println!(
            "{name:<34} {:>7.2} [{lo:.2}, {hi:.2}]   published {published}",
            mean(&f)
        );
    }
    println!(
        "{:<14} {:>7} {:>6} {:>8} {:>16} {:>6} {:>8} {:>8} {:>8}",
        "trigger", "%func", "(pub)", "%inv", "[min, max]", "(pub)", "med CV", "CV>1.2", "CV<0.1"
    );
    for t in [
        Trigger::Http,
        Trigger::Queue,
        Trigger::Event,
        Trigger::Timer,
        Trigger::Orchestration,
        Trigger::Others,
    ] {
        let get =
            |s: &medes_trace::Azure2019Summary| s.triggers.iter().find(|x| x.trigger == t).cloned();
        let pick = |f: &dyn Fn(&medes_trace::stats::TriggerStats) -> f64| {
            let v: Vec<f64> = runs.iter().filter_map(get).map(|x| f(&x)).collect();
            let m = v.iter().sum::<f64>() / v.len().max(1) as f64;
            (
                m,
                v.iter().copied().fold(f64::INFINITY, f64::min),
                v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            )
        };
        let (pf, _, _) = pick(&|x| x.pct_functions);
        let (pi, lo, hi) = pick(&|x| x.pct_invocations);
        let (cv, _, _) = pick(&|x| x.median_iat_cv.unwrap_or(0.0));
        let (gt, _, _) = pick(&|x| 100.0 * x.frac_cv_above_1_2);
        let (lt, _, _) = pick(&|x| 100.0 * x.frac_cv_below_0_1);
        let first = runs.iter().find_map(get);
        let (ppf, ppi) = first.map_or((0.0, 0.0), |x| {
            (x.published_pct_functions, x.published_pct_invocations)
        });
        println!(
            "{:<14} {pf:>7.1} {ppf:>6.0} {pi:>8.1} {:>16} {ppi:>6.0} {cv:>8.2} {gt:>7.0}% {lt:>7.0}%",
            t.as_str(),
            format!("[{lo:.1}, {hi:.1}]")
        );
    }
}
