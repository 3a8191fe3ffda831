//! Benchmark: listing one image's watchers through rbdfence's persistent native connection
//! versus `rbd status --format json` (a new process per call, as ZStack and Rook do), in one
//! run against the same image, held read-write by a client from 127.0.0.2.
//!
//! Run with `scripts/bench.sh watchers` (starts a micro cluster), or with
//! RBDFENCE_TEST_CLUSTER=DIR `cargo bench --bench watchers`.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rbdfence::rbd::{Ceph, ConnectOptions, HeaderObject, ImageSpec, Timeouts};

fn stats(name: &str, mut samples: Vec<Duration>) -> f64 {
    samples.sort();
    let pct = |p: f64| samples[((samples.len() as f64 - 1.0) * p).round() as usize];
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{name:<58} n={:<5} median {:>9.3} ms   p99 {:>9.3} ms",
        samples.len(),
        ms(pct(0.5)),
        ms(pct(0.99))
    );
    ms(pct(0.5))
}

fn main() {
    let dir = PathBuf::from(std::env::var("RBDFENCE_TEST_CLUSTER").expect(
        "RBDFENCE_TEST_CLUSTER=DIR of a running scripts/ceph-micro.sh cluster (scripts/bench.sh starts one)",
    ));
    let conf = dir.join("ceph.conf");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let image = format!("rbd/bench-watchers-{}", std::process::id());
    let rbd = |args: &[&str]| {
        let ok = Command::new("rbd")
            .arg("--conf")
            .arg(&conf)
            .args(args)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(ok.success(), "rbd {args:?}");
    };
    rbd(&["create", &image, "--size", "16M"]);

    // The holder: a real librados client from 127.0.0.2, like a VM's qemu.
    let shim = dir.join("bench-bindaddr.so");
    let ok = Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&shim)
        .arg(root.join("tests/fixtures/bindaddr.c"))
        .arg("-ldl")
        .status()
        .unwrap();
    assert!(ok.success());
    let mut holder = Command::new("/usr/bin/python3")
        .arg(root.join("tests/fixtures/holder.py"))
        .arg("--conf")
        .arg(&conf)
        .args(["--id", "admin", "--image", &image])
        .env("LD_PRELOAD", &shim)
        .env("RBDFENCE_BIND_ADDR", "127.0.0.2")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    BufReader::new(holder.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert!(ready.starts_with("ready 127.0.0.2:"), "holder: {ready}");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let t = Duration::from_secs(10);
    let ceph = rt
        .block_on(Ceph::connect(ConnectOptions {
            conf: conf.clone(),
            id: "admin".into(),
            timeouts: Timeouts { op: t, mount: t },
        }))
        .unwrap();
    let spec: ImageSpec = image.parse().unwrap();
    println!("watchers of {image} (1 watcher from 127.0.0.2), one run, same cluster:");

    // 1. What the service does per request (`Ceph::image_status`): one look at the header
    //    object (watchers, lock owners and the image's id, three OSD ops at once, in one
    //    call), through the async layer (spawn_blocking + timeout).
    let mut s = Vec::new();
    for i in 0..1100 {
        let t0 = Instant::now();
        let st = rt.block_on(ceph.image_status(&spec)).unwrap();
        if i >= 100 {
            s.push(t0.elapsed());
        }
        assert_eq!(st.watchers.len(), 1);
    }
    let native_full = stats("native image_status (async)", s);

    // 2. The same look on a header already located, without the layer's bound and metrics.
    let header = HeaderObject::locate(ceph.ioctx(&spec.pool).unwrap(), &spec.image).unwrap();
    let mut s = Vec::new();
    for i in 0..5100 {
        let t0 = Instant::now();
        let (st, _) = rt.block_on(header.read(true)).unwrap();
        if i >= 100 {
            s.push(t0.elapsed());
        }
        assert_eq!(st.watchers.len(), 1);
    }
    let native_open = stats("native: one read of the header object", s);

    // 3. The CLI, a new process and connection per call.
    let mut s = Vec::new();
    for _ in 0..100 {
        let t0 = Instant::now();
        let out = Command::new("rbd")
            .arg("--conf")
            .arg(&conf)
            .args(["status", "--format", "json", &image])
            .output()
            .unwrap();
        s.push(t0.elapsed());
        assert!(out.status.success());
        assert!(String::from_utf8_lossy(&out.stdout).contains("127.0.0.2:"));
    }
    let cli = stats("rbd status --format json (process per call)", s);
    println!(
        "speed-up vs rbd status: {:.0}x (image_status), {:.0}x (header read alone)",
        cli / native_full,
        cli / native_open
    );

    // A clean close drops the holder's watch at once, so the image can be removed.
    drop(holder.stdin.take());
    let _ = holder.wait();
    rbd(&["rm", "--no-progress", &image]);
}
