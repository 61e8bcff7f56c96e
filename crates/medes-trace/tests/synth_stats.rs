//! The synthetic generator's statistics against the published character of the 2019 trace.

use medes_trace::{Azure2019Stats, SynthConfig, Synthetic, Trigger};

#[test]
fn synthetic_day_has_the_published_character() {
    let mut st = Azure2019Stats::new();
    for row in Synthetic::new(SynthConfig {
        seed: 11,
        functions: 4000,
        ..Default::default()
    }) {
        st.add(&row);
    }
    let s = st.finish();
    println!("{s}");
    assert_eq!(s.functions, 4000);
    assert!(
        s.rate_spread_orders >= 6.0,
        "spread {}",
        s.rate_spread_orders
    );
    assert!(
        (0.65..=0.95).contains(&s.frac_functions_below_1_per_min),
        "{}",
        s.frac_functions_below_1_per_min
    );
    assert!((0.45..=0.65).contains(&s.frac_single_function_apps));
    let d = s.diurnal_peak_to_trough.expect("a full day");
    assert!((1.3..=4.0).contains(&d), "diurnal {d}");
    let get = |t: Trigger| {
        s.triggers
            .iter()
            .find(|x| x.trigger == t)
            .expect("trigger present")
    };
    for t in &s.triggers {
        assert!(
            (t.pct_functions - t.published_pct_functions).abs() < 3.0,
            "{:?}",
            t
        );
    }
    let timer = get(Trigger::Timer);
    assert!(
        timer.median_iat_cv.unwrap() < 0.1,
        "timers are periodic: {:?}",
        timer
    );
    assert!(timer.pct_invocations < 8.0, "{:?}", timer);
    let http = get(Trigger::Http);
    let cv = http.median_iat_cv.unwrap();
    assert!(cv > 0.8, "http is Poisson or bursty: {cv}");
    assert!(http.frac_cv_above_1_2 > 0.2, "{:?}", http);
}
