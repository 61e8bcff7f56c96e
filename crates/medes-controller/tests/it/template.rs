//! Template starts (issue 8) through the controller over the real agent and CRIU: the template
//! is made after the first cold start, later starts are template starts with the right result
//! and their own randomness, and a corrupt template falls back to a cold start that serves the
//! request, after which the template is rebuilt.

use std::time::{Duration, Instant};

use medes_controller::ControllerConfig;
use medes_core::{ActivationStatus, Code, StartKind};
use serde_json::json;

use super::{Platform, action, invoke};

const CODE: &str = r#"
import hashlib, json, os, random
DATA = [{"k": i, "v": str(i) * 5} for i in range(20000)]
BLOB = json.dumps(DATA).encode()
def main(args):
    h = hashlib.sha256(BLOB + json.dumps(args, sort_keys=True).encode()).hexdigest()
    return {"h": h, "r": random.random(), "u": os.urandom(8).hex()}
"#;

fn platform() -> Option<Platform> {
    super::platform_with(ControllerConfig {
        node_memory_budget_mb: 2048,
        dedup_enabled: false,
        template_starts: true,
        ..Default::default()
    })
}

async fn wait_made(p: &Platform, n: u64) {
    let t = Instant::now();
    while p.ctl.template_stats().made < n {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no template: {:?}",
            p.ctl.template_stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_starts_and_a_corrupt_template_falls_back_to_a_cold_start() {
    let Some(p) = platform() else { return };
    let a = action("tpl", Code::Source(CODE.into()), 128, 10_000);
    let cold = invoke(&p, &a, json!({"x": 1})).await;
    assert_eq!(cold.start_kind, StartKind::Cold);
    wait_made(&p, 1).await;
    let dir = p
        .agent
        .template_dir(&a.name)
        .expect("the node has the template");

    // Two starts at once with no idle sandbox: both from the template, own randomness.
    p.ctl.purge_idle(&a.name);
    let (x, y) = tokio::join!(
        invoke(&p, &a, json!({"x": 1})),
        invoke(&p, &a, json!({"x": 1}))
    );
    for t in [&x, &y] {
        assert_eq!(t.start_kind, StartKind::Template, "{:?}", t.response);
        assert_eq!(t.response.result["h"], cold.response.result["h"]);
    }
    assert_ne!(x.response.result["r"], y.response.result["r"]);
    assert_ne!(x.response.result["u"], y.response.result["u"]);
    assert_eq!(p.ctl.template_stats().starts, 2);
    // Template-born sandboxes serve warm starts afterwards.
    assert_eq!(
        invoke(&p, &a, json!({"x": 1})).await.start_kind,
        StartKind::Warm
    );
    // The node's template is charged to it.
    p.ctl.refresh_memory().await;
    let charged: u64 = p.ctl.sandboxes().iter().map(|s| s.charged.0).sum();
    assert!(
        p.ctl.memory_used()[0].0 > charged,
        "the template is not charged"
    );

    // Corrupt the template: the next start is a cold start that serves; the template is rebuilt.
    let pages = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|f| {
            f.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("pages-")
        })
        .expect("a pages file");
    let mut bytes = std::fs::read(&pages).unwrap();
    let mid = bytes.len() / 3;
    bytes[mid] ^= 0xff;
    std::fs::write(&pages, &bytes).unwrap();
    p.ctl.purge_idle(&a.name);
    let fallback = invoke(&p, &a, json!({"x": 1})).await;
    assert_eq!(fallback.start_kind, StartKind::Cold);
    assert_eq!(fallback.response.status, ActivationStatus::Success);
    assert_eq!(fallback.response.result["h"], cold.response.result["h"]);
    assert_eq!(
        p.ctl.template_stats().start_failures.get("checksum"),
        Some(&1)
    );
    wait_made(&p, 2).await;
    p.ctl.purge_idle(&a.name);
    let again = invoke(&p, &a, json!({"x": 1})).await;
    assert_eq!(again.start_kind, StartKind::Template);
    assert_eq!(again.response.result["h"], cold.response.result["h"]);
    p.stop().await;
}

/// With dedup on, the template is the function's first base: the first idle sandbox is
/// deduplicated (not made a base), against the template page by page, and its dedup start
/// gives the right result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_template_is_the_first_base_and_sandboxes_dedup_against_it() {
    let Some(p) = super::platform_with(ControllerConfig {
        node_memory_budget_mb: 2048,
        dedup_enabled: true,
        template_starts: true,
        ..Default::default()
    }) else {
        return;
    };
    let a = action("tplb", Code::Source(CODE.into()), 128, 10_000);
    let cold = invoke(&p, &a, json!({"x": 1})).await;
    assert_eq!(cold.start_kind, StartKind::Cold);
    wait_made(&p, 1).await;
    assert_eq!(p.agent.dedup_counters().bases, 1, "the template is a base");
    // The idle sandbox (the template's source) is deduplicated, not made a base.
    p.ctl.force_decisions(Some(&a.name)).await;
    let t = Instant::now();
    while p.agent.dedup_counters().dedups < 1 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no dedup: {:?}",
            p.agent.dedup_counters()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let c = p.agent.dedup_counters();
    assert_eq!(c.bases, 1, "no second base: {c:?}");
    assert!(
        p.agent.template_counters().positional_pages > 1000,
        "{:?}",
        p.agent.template_counters()
    );
    let d = invoke(&p, &a, json!({"x": 1})).await;
    assert_eq!(d.start_kind, StartKind::Dedup, "{:?}", d.response);
    assert_eq!(d.response.result["h"], cold.response.result["h"]);
    p.stop().await;
}
