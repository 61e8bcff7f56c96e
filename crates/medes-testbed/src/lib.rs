//! A multi-host test bed on one machine (issue 7): `n` network namespaces ("hosts"), each joined
//! by a veth pair to a bridge in the root namespace, each with its own IPv4 address, so that
//! traffic between a controller and node agents crosses real TCP between "hosts".
//!
//! ```no_run
//! use medes_testbed::Testbed;
//! let bed = Testbed::up(3)?;                       // hosts 10.77.K.2, .3, .4; root is 10.77.K.1
//! let h0 = bed.host(0).expect("three hosts");
//! let mut cmd = h0.command("/usr/bin/env");        // runs inside host 0's network namespace
//! let child = cmd.spawn()?;
//! bed.partition(0, 1)?;                            // hosts 0 and 1 no longer reach each other
//! bed.heal(0, 1)?;
//! bed.set_link(2, false)?;                         // host 2 is cut off from everyone
//! bed.down()?;                                     // kills what still runs in the hosts, removes all
//! # drop(child);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Design
//! - **Names and addresses are claimed atomically.** Each test bed gets an id `K` in 0..=255:
//!   namespaces `mtbKhI` (in `/run/netns`), root-side veths `mtbKvI`, bridge `mtbKbr`, subnet
//!   `10.77.K.0/24` (the bridge is `10.77.K.1`, host `I` is `10.77.K.(I+2)`). An id is claimed by
//!   writing an owner file (`/run/medes-testbed/K`: the owner's pid and start time) under a
//!   lock, so concurrent test beds (parallel tests, a benchmark) never collide.
//! - **Teardown is idempotent and survives crashes.** [`Testbed::down`] (and `Drop`, best
//!   effort) kills every process still inside the hosts' namespaces, deletes the namespaces,
//!   veths and bridge, then the owner file. Every [`Testbed::up`] first removes the test beds
//!   whose owner is dead (a crashed test) and leftovers without an owner file
//!   ([`cleanup_stale`]). A test bed meant to outlive its creator (`medes cluster up`) is
//!   [`Testbed::detach`]ed and removed later by id ([`remove`]).
//! - **Only the network namespace is entered.** A process is started in a host with `setns(2)`
//!   between fork and exec ([`Host::prepare`]), not `ip netns exec`, which also unshares the
//!   mount namespace: an agent's tmpfs mounts must outlive the agent (its dedup stores survive
//!   a restart), so they belong to the machine's mount namespace.
//! - **Partitions without iptables.** [`Testbed::partition`] adds each host to the other's
//!   nftables drop set (input hook: packets between them vanish silently and connections time
//!   out, as on a real partition; a route or an output rule would fail calls at once);
//!   [`Testbed::set_link`] takes a host's link down (it reaches no one, the controller included).
//!
//! # What this crate does not do
//! No traffic shaping (latency, loss, bandwidth), no IPv6, no routing beyond one bridge, and no
//! process supervision: callers start and stop their processes; teardown only kills leftovers.
//! Needs root, `ip` (iproute2) and `nft` (nftables).
#![deny(missing_docs)]

use std::collections::BTreeSet;
use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use nix::sched::CloneFlags;
use tracing::{debug, info, warn};

/// Where owner files and the allocation lock live.
const STATE_DIR: &str = "/run/medes-testbed";
/// Where `ip netns` keeps named namespaces.
const NETNS_DIR: &str = "/run/netns";
/// Most hosts in one test bed (addresses .2 to .201 of the subnet).
pub const MAX_HOSTS: usize = 200;
/// Prefix of every name (namespaces, links) a test bed creates.
const PREFIX: &str = "mtb";

/// A test bed's id: its names (`mtbK...`) and its subnet (`10.77.K.0/24`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BedId(pub u8);

impl fmt::Display for BedId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl BedId {
    fn bridge(self) -> String {
        format!("{PREFIX}{}br", self.0)
    }
    fn netns(self, i: usize) -> String {
        format!("{PREFIX}{}h{i}", self.0)
    }
    fn veth(self, i: usize) -> String {
        format!("{PREFIX}{}v{i}", self.0)
    }
    /// The root namespace's address on the bridge.
    pub fn gateway(self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.0, 1)
    }
    /// Host `i`'s address.
    pub fn host_addr(self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.0, (i + 2) as u8)
    }
    fn owner_file(self) -> PathBuf {
        Path::new(STATE_DIR).join(self.0.to_string())
    }
}

/// An `ip` or `nft` command failed.
#[derive(Debug, thiserror::Error)]
pub enum IpError {
    /// The command could not be started.
    #[error("running {args}")]
    Spawn {
        /// The arguments.
        args: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The command exited with an error.
    #[error("{args} failed: {stderr}")]
    Failed {
        /// The arguments (and batch input, if any).
        args: String,
        /// What it printed on stderr.
        stderr: String,
    },
}

/// [`Testbed::up`] failed (what it had created is removed).
#[derive(Debug, thiserror::Error)]
pub enum UpError {
    /// Network namespaces need root.
    #[error("a test bed needs root (network namespaces, veth pairs)")]
    NotRoot,
    /// Zero or too many hosts asked for.
    #[error("a test bed has 1 to {MAX_HOSTS} hosts, not {0}")]
    Hosts(usize),
    /// Every id 0..=255 is in use by a live test bed.
    #[error("every test bed id is in use")]
    Exhausted,
    /// The state directory or an owner file could not be written.
    #[error("writing {path:?}")]
    State {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Creating namespaces or links failed.
    #[error("creating the test bed's network")]
    Ip(#[from] IpError),
    /// A host namespace could not be opened.
    #[error("opening namespace {path:?}")]
    Open {
        /// The namespace file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Removing stale test beds failed.
    #[error("removing a stale test bed")]
    Stale(#[from] CleanupError),
}

/// A link change ([`Testbed::partition`], [`Testbed::heal`], [`Testbed::set_link`]) failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// No host with this index.
    #[error("host {index} does not exist (the test bed has {hosts})")]
    UnknownHost {
        /// The index asked for.
        index: usize,
        /// Hosts in the test bed.
        hosts: usize,
    },
    /// A host cannot be partitioned from itself.
    #[error("host {0} cannot be partitioned from itself")]
    SameHost(usize),
    /// The `ip` command failed.
    #[error("changing the test bed's links")]
    Ip(#[from] IpError),
}

/// Removing a test bed ([`Testbed::down`], [`remove`]) failed.
#[derive(Debug, thiserror::Error)]
pub enum DownError {
    /// Namespaces or links are still there after removal.
    #[error("test bed {id} left {leftovers:?} behind")]
    Leftovers {
        /// The test bed.
        id: BedId,
        /// What is still there.
        leftovers: Vec<String>,
    },
    /// The owner file could not be removed.
    #[error("removing {path:?}")]
    State {
        /// The owner file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Removing stale test beds ([`cleanup_stale`]) failed.
#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    /// The state directory or its lock could not be used.
    #[error("using {path:?}")]
    State {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A stale test bed could not be removed.
    #[error("removing stale test bed")]
    Down(#[from] DownError),
}

/// A host's namespace could not be opened ([`Host::open`]).
#[derive(Debug, thiserror::Error)]
#[error("opening namespace {path:?}")]
pub struct OpenError {
    /// The namespace file.
    pub path: PathBuf,
    /// The cause.
    #[source]
    pub source: io::Error,
}

/// Entering a host's namespace from a thread ([`Host::thread`]) failed.
#[derive(Debug, thiserror::Error)]
#[error("entering namespace {netns}")]
pub struct EnterError {
    /// The namespace.
    pub netns: String,
    /// The cause.
    #[source]
    pub source: nix::Error,
}

/// One emulated host: a network namespace with one address on the test bed's bridge.
#[derive(Debug, Clone)]
pub struct Host {
    index: usize,
    netns: String,
    addr: Ipv4Addr,
    fd: Arc<OwnedFd>,
}

impl Host {
    /// Host `i` of the (detached, or another process's) test bed `bed`, opened by name.
    pub fn open(bed: BedId, i: usize) -> Result<Host, OpenError> {
        let netns = bed.netns(i);
        let path = Path::new(NETNS_DIR).join(&netns);
        let fd = File::open(&path)
            .map_err(|source| OpenError { path, source })?
            .into();
        Ok(Host {
            index: i,
            netns,
            addr: bed.host_addr(i),
            fd: Arc::new(fd),
        })
    }

    /// Its index in the test bed.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Its address (`10.77.K.(index+2)`).
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// Its namespace's name (`ip netns` name, e.g. for `ip -n NAME ...`).
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// Its namespace's file (`/run/netns/NAME`).
    pub fn netns_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.netns)
    }

    /// Makes `cmd` start inside this host's network namespace (only the network namespace: the
    /// mount, PID and other namespaces stay the caller's).
    pub fn prepare(&self, cmd: &mut Command) {
        let fd = self.fd.clone();
        // SAFETY: the closure runs in the child between fork and exec. It only calls setns(2)
        // (async-signal-safe) on a descriptor opened before the fork and kept alive by the
        // `Arc` moved into the closure; it neither allocates nor takes locks (`io::Error::from`
        // of an errno is a plain value).
        // JUSTIFICATION: `ip netns exec` would also unshare the mount namespace, and
        // std offers no safe way to run code in the child before exec.
        unsafe {
            cmd.pre_exec(move || {
                nix::sched::setns(fd.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
            });
        }
    }

    /// A [`Command`] for `program` that starts inside this host ([`Host::prepare`]).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        self.prepare(&mut cmd);
        cmd
    }

    /// Runs `f` on a new thread inside this host's network namespace (sockets it opens belong
    /// to the host; e.g. a current-thread tokio runtime serving an in-process agent there).
    /// The thread's result is `Err` if it could not enter the namespace (`f` did not run).
    pub fn thread<F, R>(&self, f: F) -> io::Result<std::thread::JoinHandle<Result<R, EnterError>>>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let fd = self.fd.clone();
        let netns = self.netns.clone();
        std::thread::Builder::new()
            .name(format!("in-{netns}"))
            .spawn(move || {
                nix::sched::setns(fd.as_fd(), CloneFlags::CLONE_NEWNET)
                    .map_err(|source| EnterError { netns, source })?;
                Ok(f())
            })
    }
}

/// A running test bed. Dropping it tears it down (best effort, logged); [`Testbed::down`] does
/// the same and reports failures.
#[derive(Debug)]
pub struct Testbed {
    id: BedId,
    hosts: Vec<Host>,
    /// Set once torn down or detached: nothing left to do on drop.
    done: bool,
}

impl Testbed {
    /// Creates `n` hosts (after removing stale test beds of crashed runs).
    pub fn up(n: usize) -> Result<Testbed, UpError> {
        if !(1..=MAX_HOSTS).contains(&n) {
            return Err(UpError::Hosts(n));
        }
        if !nix::unistd::geteuid().is_root() {
            return Err(UpError::NotRoot);
        }
        let id = {
            let lock = lock_state().map_err(|e| match e {
                CleanupError::State { path, source } => UpError::State { path, source },
                other => UpError::Stale(other),
            })?;
            let removed = cleanup_stale_locked()?;
            if removed > 0 {
                info!(removed, "stale test beds removed");
            }
            let id = claim_id()?;
            drop(lock);
            id
        };
        let mut bed = Testbed {
            id,
            hosts: Vec::new(),
            done: false,
        };
        // On error `bed` is dropped, which removes what was created.
        bed.create(n)?;
        info!(id = %id, hosts = n, gateway = %id.gateway(), "test bed up");
        Ok(bed)
    }

    fn create(&mut self, n: usize) -> Result<(), UpError> {
        let id = self.id;
        let mut batch = String::new();
        for i in 0..n {
            batch += &format!("netns add {}\n", id.netns(i));
        }
        ip(&["-batch", "-"], Some(&batch))?;
        let br = id.bridge();
        let mut batch = format!(
            "link add {br} type bridge\naddr add {}/24 dev {br}\nlink set {br} up\n",
            id.gateway()
        );
        for i in 0..n {
            let v = id.veth(i);
            batch += &format!(
                "link add {v} type veth peer name eth0 netns {ns}\nlink set {v} master {br}\n\
                 link set {v} up\n",
                ns = id.netns(i)
            );
        }
        ip(&["-batch", "-"], Some(&batch))?;
        for i in 0..n {
            let ns = id.netns(i);
            let addr = id.host_addr(i);
            ip(
                &["-n", &ns, "-batch", "-"],
                Some(&format!(
                    "link set lo up\naddr add {addr}/24 dev eth0\nlink set eth0 up\n\
                     route add default via {}\n",
                    id.gateway()
                )),
            )?;
            let path = Path::new(NETNS_DIR).join(&ns);
            let fd = File::open(&path)
                .map_err(|source| UpError::Open {
                    path: path.clone(),
                    source,
                })?
                .into();
            let host = Host {
                index: i,
                netns: ns,
                addr,
                fd: Arc::new(fd),
            };
            nft(&host, NFT_SETUP)?;
            self.hosts.push(host);
        }
        Ok(())
    }

    /// The test bed `id` as it is on the machine (e.g. one [`Testbed::detach`]ed by another
    /// process), to change its links; dropping it leaves it up (remove it with [`remove`]).
    pub fn attach(id: BedId) -> Result<Testbed, OpenError> {
        let mut hosts = Vec::new();
        while Path::new(NETNS_DIR).join(id.netns(hosts.len())).exists() {
            hosts.push(Host::open(id, hosts.len())?);
        }
        if hosts.is_empty() {
            return Err(OpenError {
                path: Path::new(NETNS_DIR).join(id.netns(0)),
                source: io::Error::from(io::ErrorKind::NotFound),
            });
        }
        Ok(Testbed {
            id,
            hosts,
            done: true,
        })
    }

    /// Its id (names and subnet).
    pub fn id(&self) -> BedId {
        self.id
    }

    /// The root namespace's address on the bridge (`10.77.K.1`): a process in the root
    /// namespace listening there (or on `0.0.0.0`) is reachable from every host.
    pub fn gateway(&self) -> Ipv4Addr {
        self.id.gateway()
    }

    /// The hosts, in index order.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Host `i`, if there is one.
    pub fn host(&self, i: usize) -> Option<&Host> {
        self.hosts.get(i)
    }

    fn check(&self, i: usize) -> Result<&Host, LinkError> {
        self.hosts.get(i).ok_or(LinkError::UnknownHost {
            index: i,
            hosts: self.hosts.len(),
        })
    }

    /// Hosts `i` and `j` stop reaching each other (both keep reaching the others and the root
    /// namespace): each drops, silently, every packet from the other (an nftables input rule),
    /// so connections between them time out as on a real partition. Idempotent.
    pub fn partition(&self, i: usize, j: usize) -> Result<(), LinkError> {
        self.cut(i, j, true)
    }

    /// Undoes [`Testbed::partition`]. Idempotent.
    pub fn heal(&self, i: usize, j: usize) -> Result<(), LinkError> {
        self.cut(i, j, false)
    }

    fn cut(&self, i: usize, j: usize, cut: bool) -> Result<(), LinkError> {
        if i == j {
            return Err(LinkError::SameHost(i));
        }
        let (a, b) = (self.check(i)?, self.check(j)?);
        for (at, from) in [(a, b), (b, a)] {
            let op = if cut { "add" } else { "delete" };
            let script = format!("{op} element inet {NFT_TABLE} cut {{ {} }}\n", from.addr);
            match nft(at, &script) {
                Ok(()) => {}
                // Deleting an element that is not there: already healed.
                Err(IpError::Failed { stderr, .. })
                    if !cut && stderr.contains("No such file or directory") => {}
                Err(e) => return Err(e.into()),
            }
        }
        debug!(bed = %self.id, i, j, cut, "partition changed");
        Ok(())
    }

    /// Takes host `i`'s link up or down: down, it reaches no one (the root namespace included)
    /// and established connections stall. Idempotent.
    pub fn set_link(&self, i: usize, up: bool) -> Result<(), LinkError> {
        self.check(i)?;
        ip(
            &[
                "link",
                "set",
                &self.id.veth(i),
                if up { "up" } else { "down" },
            ],
            None,
        )?;
        debug!(bed = %self.id, host = i, up, "link changed");
        Ok(())
    }

    /// Kills every process still inside the hosts, removes the namespaces, links and bridge,
    /// and releases the id. Idempotent; also what `Drop` does.
    pub fn down(mut self) -> Result<(), DownError> {
        self.done = true;
        remove_bed(self.id)
    }

    /// Leaves the test bed up after this value is dropped (for `medes cluster up`); remove it
    /// later with [`remove`]. Stale-bed cleanup never touches a detached test bed.
    pub fn detach(mut self) -> Result<BedId, UpError> {
        let path = self.id.owner_file();
        std::fs::write(&path, "detached\n").map_err(|source| UpError::State { path, source })?;
        self.done = true;
        Ok(self.id)
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Err(e) = remove_bed(self.id) {
            warn!(bed = %self.id, error = %e, "tearing down the test bed");
        }
    }
}

/// Removes test bed `id` (a detached one, or any leftover): kills the processes inside its
/// hosts, deletes its namespaces, links and bridge, and its owner file. Idempotent.
pub fn remove(id: BedId) -> Result<(), DownError> {
    remove_bed(id)
}

/// Removes every test bed whose owner process is gone (not detached ones) and leftovers of a
/// crashed creation (names `mtbK...` without an owner file); returns how many.
pub fn cleanup_stale() -> Result<usize, CleanupError> {
    let _lock = lock_state()?;
    cleanup_stale_locked()
}

/// The ids of the test beds present on this machine (owner files or leftovers), with whether
/// each is detached.
pub fn list() -> Vec<(BedId, bool)> {
    let mut ids: BTreeSet<u8> = leftover_ids();
    if let Ok(rd) = std::fs::read_dir(STATE_DIR) {
        for e in rd.flatten() {
            if let Some(k) = e.file_name().to_str().and_then(|s| s.parse::<u8>().ok()) {
                ids.insert(k);
            }
        }
    }
    ids.into_iter()
        .map(|k| {
            let detached = std::fs::read_to_string(BedId(k).owner_file())
                .is_ok_and(|s| s.trim() == "detached");
            (BedId(k), detached)
        })
        .collect()
}

struct StateLock(#[allow(dead_code)] File);

fn lock_state() -> Result<StateLock, CleanupError> {
    let dir = Path::new(STATE_DIR);
    std::fs::create_dir_all(dir).map_err(|source| CleanupError::State {
        path: dir.into(),
        source,
    })?;
    let path = dir.join(".lock");
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| CleanupError::State {
            path: path.clone(),
            source,
        })?;
    f.lock()
        .map_err(|source| CleanupError::State { path, source })?;
    Ok(StateLock(f))
}

/// A live process's start time (field 22 of `/proc/PID/stat`, in clock ticks since boot), to
/// tell a reused pid apart; `None` if it is gone or a zombie.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces: fields restart after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let mut fields = rest.split_whitespace();
    if fields.next()? == "Z" {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// Whether the owner recorded in an owner file is alive (or the bed is detached).
fn owner_alive(content: &str) -> bool {
    let content = content.trim();
    if content == "detached" {
        return true;
    }
    let mut it = content.split_whitespace();
    let (Some(pid), Some(start)) = (
        it.next().and_then(|p| p.parse::<u32>().ok()),
        it.next().and_then(|s| s.parse::<u64>().ok()),
    ) else {
        return false;
    };
    start_time(pid) == Some(start)
}

/// Ids that have namespaces or links on the machine.
fn leftover_ids() -> BTreeSet<u8> {
    let mut ids = BTreeSet::new();
    for dir in [NETNS_DIR, "/sys/class/net"] {
        let Ok(rd) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(k) = parse_id(&name) {
                ids.insert(k);
            }
        }
    }
    ids
}

/// The id in a name `mtbK{h,v}I` or `mtbKbr`.
fn parse_id(name: &str) -> Option<u8> {
    let rest = name.strip_prefix(PREFIX)?;
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    let tail = &rest[digits.len()..];
    let ok_tail = tail == "br"
        || (tail.len() > 1
            && (tail.starts_with('h') || tail.starts_with('v'))
            && tail[1..].bytes().all(|b| b.is_ascii_digit()));
    if digits.is_empty() || !ok_tail {
        return None;
    }
    digits.parse().ok()
}

fn cleanup_stale_locked() -> Result<usize, CleanupError> {
    let mut removed = 0;
    let mut ids = leftover_ids();
    if let Ok(rd) = std::fs::read_dir(STATE_DIR) {
        for e in rd.flatten() {
            if let Some(k) = e.file_name().to_str().and_then(|s| s.parse::<u8>().ok()) {
                ids.insert(k);
            }
        }
    }
    for k in ids {
        let id = BedId(k);
        let alive = std::fs::read_to_string(id.owner_file()).is_ok_and(|s| owner_alive(&s));
        if !alive {
            info!(bed = %id, "removing a stale test bed");
            remove_bed(id)?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Claims the first free id by writing its owner file (caller holds the lock).
fn claim_id() -> Result<BedId, UpError> {
    let taken = leftover_ids();
    let me = std::process::id();
    let start = start_time(me).unwrap_or(0);
    for k in 0..=255u8 {
        let id = BedId(k);
        let path = id.owner_file();
        if taken.contains(&k) || path.exists() {
            continue;
        }
        let mut f = File::create(&path).map_err(|source| UpError::State {
            path: path.clone(),
            source,
        })?;
        writeln!(f, "{me} {start}").map_err(|source| UpError::State { path, source })?;
        return Ok(id);
    }
    Err(UpError::Exhausted)
}

/// Kills the processes whose network namespace is `netns` (other than this one).
fn kill_inside(netns: &Path) -> usize {
    let Ok(ino) = std::fs::metadata(netns).map(|m| m.ino()) else {
        return 0;
    };
    let me = std::process::id();
    let mut killed = 0;
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return 0;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(m) = std::fs::metadata(format!("/proc/{pid}/ns/net")) else {
            continue;
        };
        if m.ino() == ino
            && nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            )
            .is_ok()
        {
            killed += 1;
        }
    }
    killed
}

fn remove_bed(id: BedId) -> Result<(), DownError> {
    let prefix_ns = format!("{PREFIX}{}h", id.0);
    let prefix_veth = format!("{PREFIX}{}v", id.0);
    let names = |dir: &str, prefix: &str| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| {
                        n.strip_prefix(prefix)
                            .is_some_and(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()))
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let namespaces = names(NETNS_DIR, &prefix_ns);
    let mut killed = 0;
    for ns in &namespaces {
        killed += kill_inside(&Path::new(NETNS_DIR).join(ns));
    }
    if killed > 0 {
        info!(bed = %id, killed, "killed processes left inside the test bed");
        // Let the kernel reap them so the namespaces can go.
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    for ns in &namespaces {
        let _ = ip(&["netns", "del", ns], None);
    }
    for v in names("/sys/class/net", &prefix_veth) {
        let _ = ip(&["link", "del", &v], None);
    }
    if Path::new("/sys/class/net").join(id.bridge()).exists() {
        let _ = ip(&["link", "del", &id.bridge()], None);
    }
    let mut leftovers: Vec<String> = names(NETNS_DIR, &prefix_ns);
    leftovers.extend(names("/sys/class/net", &prefix_veth));
    if Path::new("/sys/class/net").join(id.bridge()).exists() {
        leftovers.push(id.bridge());
    }
    if !leftovers.is_empty() {
        return Err(DownError::Leftovers { id, leftovers });
    }
    let path = id.owner_file();
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(DownError::State { path, source }),
    }
    debug!(bed = %id, "test bed removed");
    Ok(())
}

/// The nftables table of each host: the set of peers whose packets are dropped (partitions).
const NFT_TABLE: &str = "medes_testbed";
const NFT_SETUP: &str = "table inet medes_testbed {\n\
    set cut { type ipv4_addr; }\n\
    chain input { type filter hook input priority 0; policy accept; ip saddr @cut drop; }\n\
}\n";

/// Runs the nftables `script` inside `host`.
fn nft(host: &Host, script: &str) -> Result<(), IpError> {
    run(host.command("nft").args(["-f", "-"]), "nft", script)
}

/// Runs `ip ARGS` (with `input` on stdin, for `-batch -`).
fn ip(args: &[&str], input: Option<&str>) -> Result<(), IpError> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    run(
        &mut cmd,
        &format!("ip {}", args.join(" ")),
        input.unwrap_or(""),
    )
}

/// Runs `cmd` with `input` on stdin (none if empty); `what` names it in errors.
fn run(cmd: &mut Command, what: &str, input: &str) -> Result<(), IpError> {
    let input = (!input.is_empty()).then_some(input);
    let show = || {
        let mut s = what.to_string();
        if let Some(i) = input {
            s += &format!(" <<< {:?}", i.trim_end());
        }
        s
    };
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| IpError::Spawn {
            args: show(),
            source,
        })?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .map_err(|source| IpError::Spawn {
                args: show(),
                source,
            })?;
    }
    let out = child.wait_with_output().map_err(|source| IpError::Spawn {
        args: show(),
        source,
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(IpError::Failed {
            args: show(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn names_parse_back_to_their_id() {
        let id = BedId(17);
        for name in [id.bridge(), id.netns(0), id.netns(12), id.veth(199)] {
            assert_eq!(parse_id(&name), Some(17), "{name}");
            assert!(name.len() <= 15, "{name} is too long for a link name");
        }
        for name in [
            "mtb", "mtbx", "mtb1", "mtb1h", "mtb1q3", "mtb300br", "eth0", "mtb1h2x",
        ] {
            assert_eq!(parse_id(name), None, "{name}");
        }
        assert_eq!(
            BedId(255).host_addr(MAX_HOSTS - 1),
            Ipv4Addr::new(10, 77, 255, 201)
        );
    }

    #[test]
    fn owner_liveness() {
        let me = std::process::id();
        let start = start_time(me).expect("own start time");
        assert!(owner_alive(&format!("{me} {start}\n")));
        assert!(!owner_alive(&format!("{me} {}\n", start + 1)));
        assert!(owner_alive("detached\n"));
        assert!(!owner_alive("garbage"));
        assert!(!owner_alive(""));
    }
}
