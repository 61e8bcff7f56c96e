//! Network namespaces: one named netns per sandbox (`/run/netns/medes-<pid>-<n>`, `<pid>` being
//! the creating process), created and configured from the host with `ip`, joined by the sandbox
//! (or handed to CRIU at restore). Creating one costs 3 `ip` runs (10-30 ms on a busy 2-core
//! machine), so a few configured spares are kept ready per mode and refilled in the background.
//!
//! `Outbound`: a veth pair `mdv<N>` (host) / `eth0` (sandbox) on the /30 number `N` of
//! 10.201.0.0/16, a default route via the host end, and NAT masquerade by an nftables table
//! `inet medes` (created once per process, idempotently). The veth name is unique on the host, so
//! `N` (and the subnet) is too, even across several agent processes.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

use crate::NetworkMode;

const SLOTS: u32 = 16_384;
static NEXT: AtomicU32 = AtomicU32::new(0);
static NAT: OnceLock<Result<(), String>> = OnceLock::new();
static NAMES: AtomicU32 = AtomicU32::new(0);
static SPARES: Mutex<Vec<(NetworkMode, Netns)>> = Mutex::new(Vec::new());
static REFILLING: [AtomicBool; 2] = [AtomicBool::new(false), AtomicBool::new(false)];

/// A configured namespace for a new sandbox: a spare if one is ready, else a new one; then
/// tops the spares of `mode` up to `spares` in a background thread.
pub(crate) fn take(mode: NetworkMode, spares: usize) -> Result<Netns, String> {
    let spare = {
        let mut pool = SPARES.lock().unwrap_or_else(|e| e.into_inner());
        pool.iter()
            .position(|(m, _)| *m == mode)
            .map(|i| pool.swap_remove(i).1)
    };
    let ns = match spare {
        // A spare whose namespace vanished (someone ran `ip netns del`) is not used.
        Some(ns) if ns.path().exists() => ns,
        _ => Netns::create(mode)?,
    };
    if spares > 0 {
        refill(mode, spares);
    }
    Ok(ns)
}

fn refill(mode: NetworkMode, target: usize) {
    let flag = &REFILLING[mode as usize];
    if flag.swap(true, Ordering::AcqRel) {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("medes-netns".into())
        .spawn(move || {
            loop {
                let have = SPARES
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .filter(|(m, _)| *m == mode)
                    .count();
                if have >= target {
                    break;
                }
                match Netns::create(mode) {
                    Ok(ns) => SPARES
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((mode, ns)),
                    Err(_) => break, // the next take() creates synchronously and reports the error
                }
            }
            flag.store(false, Ordering::Release);
        });
    if spawned.is_err() {
        flag.store(false, Ordering::Release);
    }
}

/// Deletes the spare namespaces of this process (call at shutdown).
pub fn release_spares() {
    let spares = std::mem::take(&mut *SPARES.lock().unwrap_or_else(|e| e.into_inner()));
    for (_, ns) in spares {
        ns.remove();
    }
}

/// Deletes `/run/netns/medes-<pid>-<n>` namespaces whose creating process is gone (spares of a
/// dead agent; namespaces of its sandboxes are removed with their run directories first).
pub(crate) fn remove_orphans() -> usize {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return 0;
    };
    let mut n = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("medes-")
            .and_then(|r| r.split_once('-'))
            .and_then(|(p, _)| p.parse::<u32>().ok())
        else {
            continue;
        };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        Netns { name, veth: None }.remove();
        n += 1;
    }
    n
}

/// One sandbox's network namespace.
#[derive(Debug)]
pub(crate) struct Netns {
    pub(crate) name: String,
    pub(crate) veth: Option<String>,
}

impl Netns {
    pub(crate) fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Creates and configures a namespace.
    fn create(mode: NetworkMode) -> Result<Netns, String> {
        if mode == NetworkMode::Outbound {
            NAT.get_or_init(setup_nat).clone()?;
        }
        let name = format!(
            "medes-{}-{}",
            std::process::id(),
            NAMES.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name], None)?;
        let mut ns = Netns { name, veth: None };
        let r = ns.configure(mode);
        if let Err(e) = r {
            ns.remove();
            return Err(e);
        }
        Ok(ns)
    }

    fn configure(&mut self, mode: NetworkMode) -> Result<(), String> {
        if mode == NetworkMode::Isolated {
            return run("ip", &["-n", &self.name, "link", "set", "lo", "up"], None);
        }
        let start = NEXT.fetch_add(1, Ordering::Relaxed) + std::process::id() * 7919;
        let mut last = String::new();
        for k in 0..64 {
            let n = (start + k) % SLOTS;
            let veth = format!("mdv{n}");
            match run(
                "ip",
                &[
                    "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns",
                    &self.name,
                ],
                None,
            ) {
                Ok(()) => {
                    self.veth = Some(veth.clone());
                    let base = 0x0ac9_0000u32 + n * 4; // 10.201.0.0 + 4n
                    let host = ip4(base + 1);
                    let guest = ip4(base + 2);
                    run(
                        "ip",
                        &["-batch", "-"],
                        Some(&format!(
                            "addr add {host}/30 dev {veth}\nlink set {veth} up\n"
                        )),
                    )?;
                    return run(
                        "ip",
                        &["-n", &self.name, "-batch", "-"],
                        Some(&format!(
                            "link set lo up\naddr add {guest}/30 dev eth0\nlink set eth0 up\n\
                             route add default via {host}\n"
                        )),
                    );
                }
                Err(e) => last = e,
            }
        }
        Err(format!("no free veth slot: {last}"))
    }

    /// Deletes the namespace (the veth pair goes with it). Best effort, idempotent.
    pub(crate) fn remove(&self) {
        if let Some(v) = &self.veth {
            let _ = run("ip", &["link", "del", v], None);
        }
        let _ = run("ip", &["netns", "del", &self.name], None);
    }
}

fn ip4(v: u32) -> String {
    let b = v.to_be_bytes();
    format!("{}.{}.{}.{}", b[0], b[1], b[2], b[3])
}

fn setup_nat() -> Result<(), String> {
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
        .map_err(|e| format!("enabling ip_forward: {e}"))?;
    // Define-then-delete makes the script idempotent; the table is identical in every process.
    let script = r#"table inet medes
delete table inet medes
table inet medes {
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr 10.201.0.0/16 oifname != "mdv*" masquerade
  }
  chain forward {
    type filter hook forward priority filter; policy accept;
    iifname "mdv*" oifname "mdv*" drop
  }
  chain input {
    type filter hook input priority filter; policy accept;
    iifname "mdv*" ct state established,related accept
    iifname "mdv*" drop
  }
}
"#;
    run("nft", &["-f", "-"], Some(script))
}

fn run(prog: &str, args: &[&str], stdin: Option<&str>) -> Result<(), String> {
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("{prog}: {e}"))?;
    if let (Some(s), Some(mut w)) = (stdin, child.stdin.take()) {
        let _ = w.write_all(s.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{prog}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{prog} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
