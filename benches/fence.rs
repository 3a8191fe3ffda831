//! Benchmark: one-VM fence latency by stage on the micro cluster — a real qemu VM whose RBD disk
//! is opened from the failed host's address (127.0.0.81), killed over SSH through a sibling
//! (127.0.0.83), with the storage fence confirmed in the osdmap first. Prints p50/p99 of the
//! whole fence and of each stage, each stage's share, and, side by side in the same run, the
//! same storage fence done with the `ceph` CLI (`ceph osd blocklist add`, a process per call).
//!
//! Run with `scripts/bench.sh fence`.
#![allow(clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::sshd::{ClientKey, Sshd, write_known_hosts};
use common::vm::Vm;
use common::{TestImage, cluster};
use rbdfence::fence::driver::{Engine, FenceRequest, FenceSettings, SshKiller};
use rbdfence::fence::inventory::{Host, Inventory};
use rbdfence::fence::ledger::Ledger;
use rbdfence::fence::link::CephLink;
use rbdfence::fence::ssh::SshSettings;

const N: usize = 25;

fn pct(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn ceph_cli(args: &[&str]) {
    let ok = Command::new("ceph")
        .arg("--conf")
        .arg(&cluster().conf)
        .args(args)
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "ceph {args:?}: {}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let key = ClientKey::generate();
    let failed = Sshd::start(Ipv4Addr::new(127, 0, 0, 81), &key);
    let sibling = Sshd::start(Ipv4Addr::new(127, 0, 0, 83), &key);
    let dir = tempfile::tempdir().unwrap();
    let known_hosts = dir.path().join("known_hosts");
    write_known_hosts(&known_hosts, &[&failed, &sibling]);
    let host = |uuid: &str, ip: &str, ssh| Host {
        uuid: uuid.into(),
        cluster: "c1".into(),
        storage_addrs: vec![ip.parse().unwrap()],
        ssh,
    };
    let link = rt.block_on(CephLink::connect(
        common::connect_options("rbdfence", 10),
        None,
        None,
    ));
    assert!(
        link.is_healthy(),
        "cannot connect to the test cluster as client.rbdfence"
    );
    let engine = Engine::new(
        link,
        SshKiller {
            settings: SshSettings {
                user: "root".into(),
                identity: key.identity().to_path_buf(),
                known_hosts,
                connect_timeout: Duration::from_secs(5),
                command_timeout: Duration::from_secs(10),
            },
            observer: None,
        },
        Inventory::new(vec![
            host("h1", "127.0.0.81", failed.addr()),
            host("h2", "127.0.0.82", "127.0.0.82:1".parse().unwrap()),
            host("h3", "127.0.0.83", sibling.addr()),
        ]),
        FenceSettings {
            blocklist_expire: Duration::from_secs(600),
            deadline: Duration::from_secs(30),
            evidence_timeout: Duration::from_secs(10),
            blocklist_timeout: Duration::from_secs(10),
            ssh_timeout: Duration::from_secs(15),
        },
        Ledger::in_memory(),
    );
    let img = TestImage::create("bench-fence");
    let stages = ["evidence", "blocklist", "osdmap", "ssh"];
    let mut total = Vec::new();
    let mut per: Vec<Vec<f64>> = vec![Vec::new(); stages.len()];
    for i in 0..N {
        let uuid = format!("00000000-0000-4000-8000-{:012x}", 0xbe00 + i);
        let vm = Vm::start(&img, "127.0.0.81", &uuid);
        vm.write(0, i as u8);
        let req = FenceRequest {
            request_id: None,
            vm: uuid.parse().unwrap(),
            failed_host: "h1".into(),
            target_host: "h2".into(),
            volumes: vec![img.spec.clone()],
            dry_run: false,
        };
        let t = Instant::now();
        let record = rt.block_on(engine.fence(&req));
        let elapsed = t.elapsed().as_secs_f64() * 1e3;
        assert_eq!(
            record.reply.outcome, "success-killed",
            "{}",
            record.reply.message
        );
        total.push(elapsed);
        for (k, s) in stages.iter().enumerate() {
            per[k].push(record.stages_ms.get(*s).copied().unwrap_or(0) as f64);
        }
        assert!(vm.wait_gone(Duration::from_secs(5)));
        for e in record.reply.evidence.blocklist.unwrap().entries {
            ceph_cli(&["osd", "blocklist", "rm", &e]);
        }
    }
    // Side by side: the storage fence through the CLI, a process per call.
    let mut cli = Vec::new();
    for _ in 0..N {
        let t = Instant::now();
        ceph_cli(&["osd", "blocklist", "add", "127.0.0.84:0/0", "600"]);
        cli.push(t.elapsed().as_secs_f64() * 1e3);
        ceph_cli(&["osd", "blocklist", "rm", "127.0.0.84:0/0"]);
    }

    let p50_total = pct(total.clone(), 0.5);
    println!("one-VM fence, {N} runs (success-killed through sibling h3; stages in whole ms):");
    println!(
        "{:<40} p50 {:>8.1} ms   p99 {:>8.1} ms",
        "whole fence",
        p50_total,
        pct(total, 0.99)
    );
    for (k, s) in stages.iter().enumerate() {
        let p50 = pct(per[k].clone(), 0.5);
        println!(
            "{:<40} p50 {:>8.1} ms   p99 {:>8.1} ms   share {:>4.0}%",
            format!("  stage {s}"),
            p50,
            pct(per[k].clone(), 0.99),
            100.0 * p50 / p50_total
        );
    }
    println!(
        "{:<40} p50 {:>8.1} ms   p99 {:>8.1} ms",
        "ceph osd blocklist add (CLI, per call)",
        pct(cli.clone(), 0.5),
        pct(cli, 0.99)
    );
}
