//! The test bed on the real kernel: hosts reach each other over TCP, processes start inside
//! their host, partitions and link-down cut traffic, teardown leaves nothing behind (also after
//! a "crashed" owner). Needs root; skipped with a message unless `CI=true`, where a missing
//! privilege is a failure.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use medes_testbed::{Host, Testbed};

fn can_run() -> bool {
    let root = nix::unistd::geteuid().is_root();
    let ip = std::process::Command::new("ip")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    let nft = std::process::Command::new("nft")
        .arg("-v")
        .output()
        .is_ok_and(|o| o.status.success());
    if root && ip && nft {
        return true;
    }
    let why = format!("root: {root}, ip available: {ip}, nft available: {nft}");
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("test bed tests cannot run in CI: {why}");
    }
    eprintln!("skipping test bed test: {why}");
    false
}

/// Serves one echo connection at a time on `addr` inside `host`, until told to stop by a
/// connection sending "stop".
fn echo_server(host: &Host, port: u16) -> std::thread::JoinHandle<()> {
    let addr = SocketAddr::from((host.addr(), port));
    let (tx, rx) = std::sync::mpsc::channel();
    let h = host
        .thread(move || {
            let l = TcpListener::bind(addr).expect("bind inside the host");
            tx.send(()).unwrap();
            for c in l.incoming() {
                let Ok(mut c) = c else { continue };
                let mut buf = [0u8; 64];
                let n = c.read(&mut buf).unwrap_or(0);
                let _ = c.write_all(&buf[..n]);
                if &buf[..n] == b"stop" {
                    return;
                }
            }
        })
        .expect("thread");
    rx.recv_timeout(Duration::from_secs(5))
        .expect("server listening");
    std::thread::spawn(move || h.join().unwrap().expect("entered the namespace"))
}

/// Connects from inside `from` to `to:port`, sends `msg`, returns the echo (or the error).
fn talk(from: &Host, to: Ipv4Addr, port: u16, msg: &str) -> Result<String, String> {
    let msg = msg.to_string();
    from.thread(move || {
        let mut s =
            TcpStream::connect_timeout(&SocketAddr::from((to, port)), Duration::from_millis(700))
                .map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.write_all(msg.as_bytes()).map_err(|e| e.to_string())?;
        let mut out = String::new();
        s.read_to_string(&mut out).map_err(|e| e.to_string())?;
        Ok(out)
    })
    .expect("thread")
    .join()
    .unwrap()
    .expect("entered the namespace")
}

fn exists(p: &str) -> bool {
    Path::new(p).exists()
}

#[test]
fn hosts_talk_over_tcp_partitions_cut_them_and_teardown_is_clean() {
    if !can_run() {
        return;
    }
    let bed = Testbed::up(3).expect("test bed up");
    let id = bed.id().0;
    let [h0, h1, h2] = [0, 1, 2].map(|i| bed.host(i).unwrap().clone());
    assert_ne!(h0.addr(), h1.addr());
    assert!(exists(&format!("/run/netns/{}", h0.netns())));
    assert!(bed.host(3).is_none());

    // A process started in host 1 sees host 1's address, not the machine's.
    let out = h1
        .command("ip")
        .args(["-4", "-o", "addr", "show", "dev", "eth0"])
        .output()
        .expect("ip inside host 1");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("{}/24", h1.addr())), "{text}");

    // TCP between hosts, and from the root namespace (the gateway side).
    let server = echo_server(&h0, 7000);
    assert_eq!(talk(&h1, h0.addr(), 7000, "a").as_deref(), Ok("a"));
    assert_eq!(talk(&h2, h0.addr(), 7000, "b").as_deref(), Ok("b"));
    let mut s =
        TcpStream::connect_timeout(&SocketAddr::from((h0.addr(), 7000)), Duration::from_secs(1))
            .expect("root namespace reaches host 0");
    s.write_all(b"c").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert_eq!(out, "c");

    // Partition 0 <-> 1: they no longer reach each other, host 2 still reaches host 0.
    bed.partition(0, 1).expect("partition");
    bed.partition(0, 1).expect("partition is idempotent");
    let cut = talk(&h1, h0.addr(), 7000, "x");
    // Silently dropped (a timeout), not refused at once as a route or output rule would.
    assert!(
        cut.as_ref().is_err_and(|e| e.contains("timed out")),
        "partitioned hosts talked, or the cut was not silent: {cut:?}"
    );
    assert_eq!(talk(&h2, h0.addr(), 7000, "d").as_deref(), Ok("d"));
    bed.heal(0, 1).expect("heal");
    bed.heal(0, 1).expect("heal is idempotent");
    assert_eq!(talk(&h1, h0.addr(), 7000, "e").as_deref(), Ok("e"));
    assert!(bed.partition(1, 1).is_err());
    assert!(bed.partition(0, 9).is_err());

    // Link down: host 0 reaches no one, then back.
    bed.set_link(0, false).expect("link down");
    assert!(talk(&h2, h0.addr(), 7000, "y").is_err());
    bed.set_link(0, true).expect("link up");
    let mut back = Err(String::new());
    for _ in 0..20 {
        back = talk(&h2, h0.addr(), 7000, "f");
        if back.is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(back.as_deref(), Ok("f"));
    assert_eq!(talk(&h2, h0.addr(), 7000, "stop").as_deref(), Ok("stop"));
    server.join().unwrap();

    // Another handle on the same test bed changes its links; dropping it leaves the bed up.
    {
        let other = Testbed::attach(bed.id()).expect("attach");
        assert_eq!(other.hosts().len(), 3);
        other
            .partition(1, 2)
            .expect("partition through another handle");
        // Nothing listens there: refused at once when reachable, a timeout when cut.
        let cut = talk(&h2, h1.addr(), 7001, "z");
        assert!(
            cut.as_ref().is_err_and(|e| e.contains("timed out")),
            "{cut:?}"
        );
        other.heal(1, 2).expect("heal");
        let open = talk(&h2, h1.addr(), 7001, "z");
        assert!(
            open.as_ref().is_err_and(|e| !e.contains("timed out")),
            "{open:?}"
        );
    }
    assert!(exists(&format!("/run/netns/{}", h0.netns())));

    // A process left running inside a host is killed by teardown.
    let mut child = h2
        .command("sleep")
        .arg("600")
        .spawn()
        .expect("sleep in host 2");
    bed.down().expect("down");
    let status = child.wait().expect("wait");
    assert!(!status.success(), "the leftover was killed");
    assert!(!exists(&format!("/run/netns/mtb{id}h0")));
    assert!(!exists(&format!("/sys/class/net/mtb{id}br")));
    assert!(!exists(&format!("/sys/class/net/mtb{id}v1")));
    assert!(!exists(&format!("/run/medes-testbed/{id}")));
}

#[test]
fn a_crashed_owners_test_bed_is_removed_by_the_next_one() {
    if !can_run() {
        return;
    }
    // Simulate a crash: a test bed whose owner file names a process that is gone.
    let bed = Testbed::up(1).expect("first bed");
    let stale = bed.id();
    let detached = bed.detach().expect("detach");
    assert_eq!(stale, detached);
    std::fs::write(format!("/run/medes-testbed/{}", stale.0), "999999999 1\n").unwrap();
    let next = Testbed::up(1).expect("second bed");
    assert!(
        !exists(&format!("/run/netns/mtb{}h0", stale.0)) || next.id() == stale,
        "the stale bed was removed (or its id reused after removal)"
    );
    assert!(
        medes_testbed::list()
            .iter()
            .all(|(id, _)| *id != stale || next.id() == stale)
    );
    // A detached bed survives stale cleanup and is removed by id.
    let kept = Testbed::up(1).expect("third bed").detach().expect("detach");
    medes_testbed::cleanup_stale().expect("cleanup");
    assert!(exists(&format!("/run/netns/mtb{}h0", kept.0)));
    medes_testbed::remove(kept).expect("remove by id");
    medes_testbed::remove(kept).expect("remove is idempotent");
    assert!(!exists(&format!("/run/netns/mtb{}h0", kept.0)));
    next.down().expect("down");
}
