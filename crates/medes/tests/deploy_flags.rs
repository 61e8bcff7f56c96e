//! The deployment files (deploy/systemd, deploy/k8s) agree with the binary: every flag their
//! command lines pass exists on `medes <subcommand> --help`, takes a value exactly when the
//! binary expects one, and the units pass `systemd-analyze verify` where systemd is present.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The long and short options of `medes <sub> --help`, each with whether it takes a value.
fn options(sub: &str) -> BTreeMap<String, bool> {
    let out = Command::new(env!("CARGO_BIN_EXE_medes"))
        .args([sub, "--help"])
        .output()
        .expect("run medes --help");
    assert!(out.status.success(), "medes {sub} --help failed");
    let help = String::from_utf8_lossy(&out.stdout);
    let mut opts = BTreeMap::new();
    for line in help.lines() {
        let line = line.trim_start();
        if !line.starts_with('-') {
            continue;
        }
        // "-c, --config <CONFIG>  text" / "--purge-on-exit  text"
        let spec = line.split("  ").next().unwrap_or(line);
        let takes_value = spec.contains('<');
        for tok in spec.split([',', ' ']) {
            let tok = tok.trim();
            if tok.starts_with('-') {
                opts.insert(tok.to_string(), takes_value);
            }
        }
    }
    assert!(
        opts.contains_key("--help"),
        "no options parsed from:\n{help}"
    );
    opts
}

/// Checks one command line (`args[0]` is the subcommand); returns the flags seen.
fn check(origin: &str, args: &[String]) -> Vec<String> {
    let sub = args
        .first()
        .unwrap_or_else(|| panic!("{origin}: empty command line"));
    assert!(
        sub == "controller" || sub == "agent",
        "{origin}: unexpected subcommand {sub:?}"
    );
    let opts = options(sub);
    let mut seen = Vec::new();
    let mut i = 1;
    while i < args.len() {
        let a = &args[i];
        let (flag, inline) = match a.split_once('=') {
            Some((f, _)) if a.starts_with("--") => (f.to_string(), true),
            _ => (a.clone(), false),
        };
        assert!(
            flag.starts_with('-'),
            "{origin}: stray argument {a:?} (medes {sub} takes no positional arguments)"
        );
        let takes = *opts.get(&flag).unwrap_or_else(|| {
            panic!(
                "{origin}: `medes {sub}` has no option {flag} (it has {:?})",
                opts.keys()
            )
        });
        if takes && !inline {
            let v = args
                .get(i + 1)
                .unwrap_or_else(|| panic!("{origin}: {flag} needs a value"));
            assert!(
                !v.starts_with("--"),
                "{origin}: {flag} needs a value, got {v:?}"
            );
            i += 1;
        }
        assert!(takes || !inline, "{origin}: {flag} takes no value");
        seen.push(flag);
        i += 1;
    }
    seen
}

/// The `ExecStart=` command of a unit, continuation lines joined, split on whitespace.
fn exec_start(unit: &str) -> Vec<String> {
    let mut joined = String::new();
    let mut in_exec = false;
    for line in unit.lines() {
        let l = line.trim();
        if let Some(rest) = l.strip_prefix("ExecStart=") {
            in_exec = true;
            joined.push_str(rest);
        } else if in_exec {
            joined.push(' ');
            joined.push_str(l);
        } else {
            continue;
        }
        if joined.ends_with('\\') {
            joined.pop();
        } else {
            break;
        }
    }
    joined.split_whitespace().map(str::to_string).collect()
}

/// The `args:` lists of the containers in a manifest (block-style lists of scalars).
fn container_args(yaml: &str) -> Vec<Vec<String>> {
    let mut all = Vec::new();
    let mut lines = yaml.lines().peekable();
    while let Some(line) = lines.next() {
        let indent = line.len() - line.trim_start().len();
        if line.trim() != "args:" {
            continue;
        }
        let mut args = Vec::new();
        while let Some(next) = lines.peek() {
            let t = next.trim();
            let ind = next.len() - next.trim_start().len();
            if t.starts_with('#') || t.is_empty() {
                lines.next();
                continue;
            }
            if ind < indent || !t.starts_with("- ") {
                break;
            }
            let v = t[2..].trim().trim_matches('"').trim_matches('\'');
            args.push(v.to_string());
            lines.next();
        }
        all.push(args);
    }
    all
}

#[test]
fn systemd_units_use_real_flags() {
    for (unit, sub, must) in [
        (
            "medes-controller.service",
            "controller",
            &["--config", "--data-dir", "--listen", "--rpc", "--nodes"][..],
        ),
        (
            "medes-agent.service",
            "agent",
            &["--controller", "--listen", "--advertise", "--node-id"][..],
        ),
    ] {
        let path = repo().join("deploy/systemd").join(unit);
        let text = std::fs::read_to_string(&path).expect("unit file");
        let cmd = exec_start(&text);
        assert!(
            cmd.first().is_some_and(|b| b.ends_with("/medes")),
            "{unit}: ExecStart does not run medes: {cmd:?}"
        );
        assert_eq!(cmd.get(1).map(String::as_str), Some(sub), "{unit}");
        let seen = check(unit, &cmd[1..]);
        for m in must {
            assert!(seen.iter().any(|s| s == m), "{unit}: {m} missing");
        }
    }
}

#[test]
fn kubernetes_manifests_use_real_flags() {
    let dir = repo().join("deploy/k8s");
    let mut subs = Vec::new();
    for e in std::fs::read_dir(&dir).expect("deploy/k8s") {
        let path = e.expect("entry").path();
        if path.extension().is_none_or(|x| x != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("manifest");
        let workloads = text
            .lines()
            .filter(|l| matches!(l.trim(), "kind: Deployment" | "kind: DaemonSet"))
            .count();
        let lists = container_args(&text);
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        assert_eq!(
            lists.len(),
            workloads,
            "{name}: one args list per workload expected"
        );
        for args in lists {
            check(&name, &args);
            subs.push(args[0].clone());
        }
    }
    subs.sort();
    assert_eq!(
        subs,
        ["agent", "controller"],
        "one agent and one controller"
    );
    let agent = std::fs::read_to_string(dir.join("agent.yaml")).expect("agent.yaml");
    assert!(agent.contains("kind: DaemonSet") && agent.contains("privileged: true"));
    assert!(agent.contains("path: /run/medes"));
}

#[test]
fn systemd_analyze_verifies_the_units() {
    let have = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        // Not a failure in CI either: systemd is not on every machine (containers).
        eprintln!("skipping systemd-analyze verify: systemd-analyze is not installed");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let bin = env!("CARGO_BIN_EXE_medes");
    for unit in ["medes-controller.service", "medes-agent.service"] {
        let text = std::fs::read_to_string(repo().join("deploy/systemd").join(unit))
            .expect("unit file")
            .replace("/usr/local/bin/medes", bin);
        let path = tmp.path().join(unit);
        std::fs::write(&path, text).expect("write unit");
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&path)
            .output()
            .expect("systemd-analyze");
        assert!(
            out.status.success(),
            "systemd-analyze verify {unit}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
