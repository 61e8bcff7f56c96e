//! Lookup µs/page of the in-memory registry and of a local 3-master Redis Cluster.
//!
//! `cargo run --release -p medes-registry-redis --example lookup_bench -- [PAGES] [RUNS] [BUCKETS]`
//! (defaults 16384 pages, 5 runs, 64 buckets; prints one JSON line per run and the medians).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let pages: usize = args.next().map_or(Ok(16_384), |a| a.parse())?;
    let runs: usize = args.next().map_or(Ok(5), |a| a.parse())?;
    let buckets: u32 = args.next().map_or(Ok(64), |a| a.parse())?;
    if let Some(why) = medes_registry_redis::redis_server_missing() {
        return Err(why.into());
    }
    let cluster = medes_registry_redis::LocalCluster::start(3)?;
    let (mut mem, mut red) = (Vec::new(), Vec::new());
    for _ in 0..runs.max(1) {
        let cfg = medes_registry_redis::RegistryConfig {
            buckets,
            ..medes_registry_redis::RegistryConfig::redis(cluster.urls())
        };
        let b = medes_registry_redis::bench_lookup_with(&cfg, pages)?;
        println!("{}", serde_json_line(&b));
        mem.push(b.memory_us_per_page);
        red.push(b.redis_us_per_page);
    }
    // Server time per command kind, summed over the masters (µs).
    let mut stats: std::collections::BTreeMap<String, (u64, f64)> = Default::default();
    for info in cluster.info("commandstats") {
        for l in info.lines() {
            let Some((name, rest)) = l.strip_prefix("cmdstat_").and_then(|l| l.split_once(':'))
            else {
                continue;
            };
            let field = |k: &str| {
                rest.split(',')
                    .find_map(|kv| kv.strip_prefix(k))
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            let e = stats.entry(name.to_string()).or_default();
            e.0 += field("calls=") as u64;
            e.1 += field("usec=");
        }
    }
    for (name, (calls, usec)) in stats.iter().filter(|(_, (c, _))| *c > 10) {
        println!("server {name}: {calls} calls, {:.0} ms", usec / 1e3);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "median over {} runs of {pages} pages: memory {:.3} µs/page, redis {:.2} µs/page",
        mem.len(),
        median(&mut mem),
        median(&mut red)
    );
    Ok(())
}

fn serde_json_line(b: &medes_registry_redis::LookupBench) -> String {
    format!(
        "{{\"pages\":{},\"memory_us_per_page\":{:.4},\"redis_us_per_page\":{:.3},\"same_choices\":{}}}",
        b.pages, b.memory_us_per_page, b.redis_us_per_page, b.same_choices
    )
}
