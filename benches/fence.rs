//! Benchmark: one-VM fence latency by stage on the micro cluster, for both fence scopes:
//! - `vm`: a real qemu VM whose RBD disk is opened from the failed host's address (127.0.0.81)
//!   and written (its lock owner names its client): that client is fenced and confirmed in the
//!   osdmap, then the qemu is killed over SSH through a sibling (127.0.0.83);
//! - `host`: a VM of h4 (127.0.0.85) that never wrote and whose watch expired, h4's SSH port
//!   closed: the scan cannot answer, so the whole host is fenced.
//!
//! Prints p50/p99 of the whole fence and of each stage, each stage's share, and, side by side
//! in the same run, one blocklist add done with the `ceph` CLI (a process per call).
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
use rbdfence::fence::record::FenceRecord;
use rbdfence::fence::ssh::SshSettings;

const N: usize = 25;

fn pct(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

const STAGES: [&str; 4] = ["evidence", "blocklist", "osdmap", "ssh"];

/// Whole-fence and per-stage times of one scenario, in ms.
#[derive(Default)]
struct Samples {
    total: Vec<f64>,
    per: [Vec<f64>; 4],
}

impl Samples {
    fn add(&mut self, record: &FenceRecord, outcome: &str, scope: &str) {
        let r = &record.reply;
        assert_eq!(r.outcome, outcome, "{}", r.message);
        assert_eq!(
            r.evidence.blocklist.as_ref().map(|b| b.scope.as_str()),
            Some(scope),
            "{}",
            r.message
        );
        self.total.push(r.duration_ms as f64);
        for (k, s) in STAGES.iter().enumerate() {
            self.per[k].push(record.stages_ms.get(*s).copied().unwrap_or(0) as f64);
        }
    }

    fn print(&self, title: &str) {
        let p50_total = pct(self.total.clone(), 0.5);
        println!("{title}, {N} runs (whole ms):");
        println!(
            "{:<40} p50 {:>8.1} ms   p99 {:>8.1} ms",
            "  whole fence",
            p50_total,
            pct(self.total.clone(), 0.99)
        );
        for (k, s) in STAGES.iter().enumerate() {
            let p50 = pct(self.per[k].clone(), 0.5);
            println!(
                "{:<40} p50 {:>8.1} ms   p99 {:>8.1} ms   share {:>4.0}%",
                format!("  stage {s}"),
                p50,
                pct(self.per[k].clone(), 0.99),
                100.0 * p50 / p50_total.max(1.0)
            );
        }
    }
}

fn request(uuid: &str, failed: &str, img: &TestImage) -> FenceRequest {
    FenceRequest {
        request_id: None,
        vm: uuid.parse().unwrap(),
        failed_host: failed.into(),
        target_host: "h2".into(),
        volumes: vec![img.spec.clone()],
        dry_run: false,
    }
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
    let rados_ledger = Ledger::in_rados(link.clone(), "rbd".into(), common::unique("bench-ledger"));
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
            jumps: Default::default(),
        },
        Inventory::new(vec![
            host("h1", "127.0.0.81", failed.addr()),
            host("h2", "127.0.0.82", "127.0.0.82:1".parse().unwrap()),
            host("h3", "127.0.0.83", sibling.addr()),
            host("h4", "127.0.0.85", "127.0.0.85:1".parse().unwrap()),
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
    // Scope vm: the VM wrote (its lock owner names its client), the host answers: the VM's
    // exact client is fenced, then its qemu is killed through the sibling.
    let img = TestImage::create("bench-fence");
    let mut vm_scope = Samples::default();
    for i in 0..N {
        let uuid = format!("00000000-0000-4000-8000-{:012x}", 0xbe00 + i);
        let vm = Vm::start(&img, "127.0.0.81", &uuid);
        vm.write(0, i as u8);
        let record = rt.block_on(engine.fence(&request(&uuid, "h1", &img)));
        vm_scope.add(&record, "success-killed", "vm");
        assert!(vm.wait_gone(Duration::from_secs(5)));
        for e in record.reply.evidence.blocklist.unwrap().entries {
            ceph_cli(&["osd", "blocklist", "rm", &e]);
        }
    }
    // Scope host: h4's VM never wrote and its watch expired (no evidence names a client), and
    // h4 does not answer SSH (its port is closed, so the refusal is quick): only the whole
    // host's fence is enough.
    let idle = TestImage::create("bench-fence-host");
    let hung = Vm::start(&idle, "127.0.0.85", "00000000-0000-4000-8000-00000000beef");
    hung.freeze();
    rt.block_on(common::no_watchers(
        "the idle VM's watch expires",
        &idle,
        Duration::from_secs(40),
    ));
    let mut host_scope = Samples::default();
    let mut host_last = None;
    for i in 0..N {
        let uuid = format!("00000000-0000-4000-8000-{:012x}", 0xbf00 + i);
        let record = rt.block_on(engine.fence(&request(&uuid, "h4", &idle)));
        host_scope.add(&record, "success-ssh-unreachable", "host");
        host_last = Some(record.clone());
        for e in record.reply.evidence.blocklist.unwrap().entries {
            ceph_cli(&["osd", "blocklist", "rm", &e]);
        }
    }
    // What the ledger in RADOS adds to a fence: recording one decision (the record object and
    // its request_id object), against the in-memory ledger the runs above used.
    let mut sample = host_last.expect("a host-scope record");
    let mut ledger_ms = Vec::new();
    for i in 0..N {
        sample.reply.fence_id = format!("f-bench-{i}");
        sample.request_id = Some(format!("r-bench-{i}"));
        let t = Instant::now();
        rt.block_on(rados_ledger.record(sample.clone())).unwrap();
        ledger_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    // Side by side: the storage fence through the CLI, a process per call.
    let mut cli = Vec::new();
    for _ in 0..N {
        let t = Instant::now();
        ceph_cli(&["osd", "blocklist", "add", "127.0.0.84:0/0", "600"]);
        cli.push(t.elapsed().as_secs_f64() * 1e3);
        ceph_cli(&["osd", "blocklist", "rm", "127.0.0.84:0/0"]);
    }

    vm_scope
        .print("scope vm: the VM's client fenced, then killed through sibling h3 (success-killed)");
    host_scope.print(
        "scope host: no client named, SSH refused, the whole host fenced (success-ssh-unreachable)",
    );
    println!(
        "{:<40} p50 {:>8.1} ms   p99 {:>8.1} ms",
        "ledger in RADOS: record one decision",
        pct(ledger_ms.clone(), 0.5),
        pct(ledger_ms, 0.99)
    );
    println!(
        "{:<40} p50 {:>8.1} ms   p99 {:>8.1} ms",
        "ceph osd blocklist add (CLI, per call)",
        pct(cli.clone(), 0.5),
        pct(cli, 0.99)
    );
}
