//! The ring across real processes: a producer in a child process (this test
//! binary re-executed), killed with SIGKILL mid-stream, and a successor
//! producer continuing; the consumer must see every published record
//! intact and in order, and nothing torn.

use sluice_common::ipc::ring::{Consumer, Producer, Ring};
use std::process::Command;
use std::time::{Duration, Instant};

const CHILD_FD: &str = "SLUICE_TEST_RING_FD";
const CHILD_START: &str = "SLUICE_TEST_RING_START";

fn payload(i: u64) -> Vec<u8> {
    let len = (i * 7919 % 5000) as usize + 8;
    let mut v: Vec<u8> = (0..len).map(|j| (i as usize).wrapping_mul(31).wrapping_add(j) as u8).collect();
    v[..8].copy_from_slice(&i.to_le_bytes());
    v
}

/// Child mode: produce forever from CHILD_START.
fn child() {
    let fd: i32 = std::env::var(CHILD_FD).unwrap().parse().unwrap();
    let mut i: u64 = std::env::var(CHILD_START).unwrap().parse().unwrap();
    // SAFETY: the parent passed us this descriptor for our own use.
    let mut p = Producer::new(unsafe { Ring::from_raw_fd(fd) }.unwrap());
    loop {
        let v = payload(i);
        if p.try_push(v.len(), |b| b.copy_from_slice(&v)) {
            i += 1;
        } else {
            std::thread::yield_now();
        }
    }
}

fn spawn_child(ring: &Ring, start: u64) -> std::process::Child {
    sluice_common::ipc::shm::inheritable(ring.fd()).unwrap();
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "producer_child", "--nocapture"])
        .env(CHILD_FD, ring.fd().to_string())
        .env(CHILD_START, start.to_string())
        .spawn()
        .unwrap()
}

#[test]
fn producer_child() {
    if std::env::var(CHILD_FD).is_ok() {
        child();
    }
}

/// Read until `n` records arrived or the deadline; verify each.
fn drain(c: &mut Consumer, expect_from: &mut u64, n: u64, deadline: Instant) -> u64 {
    let mut got = 0;
    while got < n && Instant::now() < deadline {
        let mut end = None;
        while let Some(r) = c.next_record().expect("ring intact") {
            let i = u64::from_le_bytes(r.payload[..8].try_into().unwrap());
            assert_eq!(i, *expect_from, "records out of order");
            assert_eq!(r.payload, payload(i).as_slice(), "record {i} torn");
            *expect_from += 1;
            got += 1;
            end = Some(r.end);
        }
        match end {
            Some(e) => c.release(e),
            None => std::thread::sleep(Duration::from_micros(200)),
        }
    }
    got
}

#[test]
fn killed_producer_leaves_ring_intact() {
    if std::env::var(CHILD_FD).is_ok() {
        return;
    }
    let ring = Ring::create("xproc", 1 << 16).unwrap();
    let fd_copy = nix::unistd::dup(ring.fd()).unwrap();
    // SAFETY: a dup we own.
    let mut c = Consumer::new(unsafe { Ring::from_raw_fd(fd_copy) }.unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    for round in 0..5u64 {
        let start = round * 1_000_000_000;
        let mut next = start;
        let mut child = spawn_child(&ring, start);
        assert!(drain(&mut c, &mut next, 20_000, deadline) >= 20_000, "round {round}: too slow");
        // Kill it while it writes (the ring is kept nearly full, so the
        // child is inside try_push most of the time).
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGKILL)
            .unwrap();
        child.wait().unwrap();
        // Whatever it published before dying is still intact and ordered.
        drain(&mut c, &mut next, u64::MAX, Instant::now() + Duration::from_millis(200));
        assert!(!c.has_data());
    }
    drop(ring);
}
