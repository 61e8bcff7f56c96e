//! A throw-away Redis Cluster on this machine (tests and benchmarks): `redis-server` masters
//! on free loopback ports in a temporary directory, joined by `redis-cli --cluster create`,
//! killed when dropped.

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Starting a local cluster failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartClusterError {
    /// The temporary directory could not be made.
    #[error("creating the cluster's directory")]
    Dir(#[source] std::io::Error),
    /// No free pair of ports (client port and cluster bus port + 10000) was found.
    #[error("no free port pair")]
    NoPorts,
    /// `redis-server` or `redis-cli` could not be run.
    #[error("running {program}")]
    Spawn {
        /// The program.
        program: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A server did not accept connections in time.
    #[error("redis-server on port {port} did not start (log: {log})")]
    NotListening {
        /// Its port.
        port: u16,
        /// Its log file.
        log: String,
    },
    /// `redis-cli --cluster create` failed.
    #[error("redis-cli --cluster create failed: {output}")]
    Create {
        /// What it printed.
        output: String,
    },
    /// The cluster did not report `cluster_state:ok` in time.
    #[error("cluster did not become ready")]
    NotReady,
}

/// Why local Redis clusters cannot be started here (`redis-server` or `redis-cli` missing).
pub fn redis_server_missing() -> Option<String> {
    for program in ["redis-server", "redis-cli"] {
        let ok = Command::new(program)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Some(format!(
                "{program} is not installed (scripts/setup.sh installs it)"
            ));
        }
    }
    None
}

/// A running local Redis Cluster of masters only (see the module documentation).
#[derive(Debug)]
pub struct LocalCluster {
    dir: tempfile::TempDir,
    ports: Vec<u16>,
    servers: Vec<Child>,
}

/// A free loopback port whose cluster bus port (+10000) is free too.
fn free_port_pair(taken: &[u16]) -> Option<u16> {
    for _ in 0..200 {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).ok()?;
        let port = l.local_addr().ok()?.port();
        if port > 55_000 || taken.contains(&port) || taken.contains(&(port + 10_000)) {
            continue;
        }
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port + 10_000)).is_ok() {
            return Some(port);
        }
    }
    None
}

fn cli(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

impl LocalCluster {
    /// Starts `masters` (at least 3) servers and joins them into a cluster.
    pub fn start(masters: usize) -> Result<LocalCluster, StartClusterError> {
        let masters = masters.max(3);
        let dir = tempfile::Builder::new()
            .prefix("medes-redis-")
            .tempdir()
            .map_err(StartClusterError::Dir)?;
        let mut c = LocalCluster {
            dir,
            ports: Vec::new(),
            servers: Vec::new(),
        };
        for _ in 0..masters {
            let port = free_port_pair(&c.ports).ok_or(StartClusterError::NoPorts)?;
            c.ports.push(port);
            let d = c.dir.path();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string()])
                .args(["--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes"])
                .arg("--cluster-config-file")
                .arg(d.join(format!("nodes-{port}.conf")))
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(d)
                .arg("--logfile")
                .arg(d.join(format!("{port}.log")))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|source| StartClusterError::Spawn {
                    program: "redis-server",
                    source,
                })?;
            c.servers.push(child);
        }
        for &port in &c.ports {
            let t0 = Instant::now();
            while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
                if t0.elapsed() > Duration::from_secs(10) {
                    return Err(StartClusterError::NotListening {
                        port,
                        log: c.log(port).display().to_string(),
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let nodes: Vec<String> = c.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .map_err(|source| StartClusterError::Spawn {
                program: "redis-cli",
                source,
            })?;
        if !out.status.success() {
            return Err(StartClusterError::Create {
                output: format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            });
        }
        let t0 = Instant::now();
        loop {
            let ready = c.ports.iter().all(|&p| {
                cli(p, &["cluster", "info"]).is_some_and(|s| s.contains("cluster_state:ok"))
            });
            if ready {
                return Ok(c);
            }
            if t0.elapsed() > Duration::from_secs(20) {
                return Err(StartClusterError::NotReady);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The masters' URLs (`redis://127.0.0.1:PORT`).
    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// The masters' ports.
    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    /// A server's log file.
    pub fn log(&self, port: u16) -> PathBuf {
        self.dir.path().join(format!("{port}.log"))
    }

    /// Each master's `INFO <section>` (empty for a master that does not answer).
    pub fn info(&self, section: &str) -> Vec<String> {
        self.ports
            .iter()
            .map(|&p| cli(p, &["info", section]).unwrap_or_default())
            .collect()
    }

    /// Keys stored on each master (`DBSIZE`).
    pub fn key_counts(&self) -> Vec<u64> {
        self.ports
            .iter()
            .map(|&p| {
                cli(p, &["dbsize"])
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(0)
            })
            .collect()
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
    }
}
