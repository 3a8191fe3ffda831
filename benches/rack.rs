//! Benchmark: a rack fails at once. `rbdfence serve` as a real process (its ledger in RADOS),
//! 10 failed hosts × 100 VMs, every host's sshd up (a real sshd per host), one Ceph client per
//! host holding its 100 images (watch + exclusive lock, from the host's own 127.x address) and
//! 100 stand-in processes per host whose command lines carry the VMs' uuids as qemu's do (the
//! kill command's scan finds and kills them). 1000 concurrent pre-instantiate requests, one
//! per VM, against one request for one VM of a host set up the same way, in the same run.
//!
//! Reported: wall time of the burst and its ratio to one request (goal <= 4x); every reply
//! checked (approve, success-killed, scope `vm`, the fence is exactly the host's client);
//! storage batches (distinct osdmap confirmations) and blocklist mon commands per host, the
//! most mon commands in flight at once, SSH kill commands and the logins the failed hosts' and
//! the jump hosts' sshds accepted; the service's RSS idle, after the burst and at its peak.
//!
//! Run with `scripts/bench.sh rack`, or with RBDFENCE_TEST_CLUSTER=DIR `cargo bench --bench
//! rack`. RBDFENCE_RACK_HOSTS and RBDFENCE_RACK_VMS shrink it (defaults 10 and 100).
//!
//! Loopback addresses used: 127.0.0.210 (h00, the single-request host), 127.0.0.211 – .220
//! (the failed hosts h01 – h10), .221 (the HA target, no sshd), .222 (a healthy sibling).
//! Every process started here is ended by PID on exit (also on a panic), every blocklist entry
//! on 127.0.0.210 – .222 is lifted, and the images are removed.
#![allow(clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/cpu.rs"]
mod cpu;
#[path = "support/lift.rs"]
mod lift;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::cluster;
use common::sshd::{ClientKey, Sshd, write_known_hosts};
use common::stack::{ServeProcess, ip, new_uuid};
use serde_json::{Value, json};

const SINGLE_IP: u8 = 210;
const FIRST_FAILED: u8 = 211;
const TARGET_IP: u8 = 221;
const SIBLING_IP: u8 = 222;
const SINGLE_REPS: usize = 3;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// A child ended by PID (SIGKILL) when dropped.
struct Owned(Child);

impl Drop for Owned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One host's Ceph client: `rack_holder.py` holding `count` images from `ip`.
struct HostClient {
    child: Owned,
    address: String,
    prefix: String,
    count: usize,
}

fn holder_script() -> PathBuf {
    common::repo().join("benches/fixtures/rack_holder.py")
}

impl HostClient {
    fn start(ip: &str, prefix: &str, count: usize) -> HostClient {
        let mut child = Command::new("/usr/bin/python3")
            .arg(holder_script())
            .arg("--conf")
            .arg(&cluster().conf)
            .args(["--prefix", prefix, "--count", &count.to_string()])
            .env("LD_PRELOAD", common::bind_shim())
            .env("RBDFENCE_BIND_ADDR", ip)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let address = line
            .trim()
            .strip_prefix("ready ")
            .unwrap_or_else(|| panic!("rack_holder from {ip}: {line:?}"))
            .trim()
            .to_string();
        assert!(address.contains(&format!("{ip}:")), "{address}");
        // `[v2:…,v1:IP:PORT/NONCE]` or `IP:PORT/NONCE`: the address as watchers show it.
        let address = address
            .trim_matches(|c| c == '[' || c == ']')
            .split(',')
            .map(|a| a.trim_start_matches("v1:").trim_start_matches("v2:"))
            .next()
            .unwrap()
            .to_string();
        HostClient {
            child: Owned(child),
            address,
            prefix: prefix.to_string(),
            count,
        }
    }

    fn image(&self, i: usize) -> String {
        format!("rbd/{}{i:03}", self.prefix)
    }

    /// Ends the client (it may be fenced) and removes its images.
    fn remove(self) {
        drop(self.child);
        let ok = Command::new("/usr/bin/python3")
            .arg(holder_script())
            .arg("--conf")
            .arg(&cluster().conf)
            .args(["--prefix", &self.prefix, "--count", &self.count.to_string()])
            .arg("--remove")
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(ok.success(), "removing {}*", self.prefix);
    }
}

/// The stand-in qemu, built once.
fn standin() -> PathBuf {
    common::build_c_fixture("benches/fixtures/standin.c", "standin", &[])
}

/// A host of the benchmark: its sshd, its Ceph client and its VMs' stand-ins.
struct Host {
    name: String,
    ip: String,
    sshd: Sshd,
    client: Option<HostClient>,
    vms: Vec<(String, Owned)>,
}

fn start_host(
    name: &str,
    last: u8,
    vms: usize,
    key: &ClientKey,
    standin: &Path,
    tag: &str,
) -> Host {
    let ip4 = ip(last);
    let ip = ip4.to_string();
    let sshd = Sshd::start(ip4, key);
    let client = HostClient::start(&ip, &format!("{tag}-{name}-vm"), vms);
    let vms = (0..vms)
        .map(|i| {
            let uuid = new_uuid();
            let child = Command::new(standin)
                .args(["-name", &format!("guest={name}-vm{i:03}"), "-uuid", &uuid])
                .stdin(Stdio::null())
                .spawn()
                .unwrap();
            (uuid, Owned(child))
        })
        .collect();
    Host {
        name: name.to_string(),
        ip,
        sshd,
        client: Some(client),
        vms,
    }
}

fn write_config(dir: &Path, key: &ClientKey, hosts: &[&Host], sibling: &Sshd, ns: &str) -> PathBuf {
    let mut text = format!(
        r#"
[api]
listen = "127.0.0.1:0"
[ceph]
conf = "{conf}"
id = "rbdfence"
op_timeout_secs = 10
connect_timeout_secs = 10
[fence]
blocklist_expire_secs = 600
deadline_secs = 60
ssh_timeout_secs = 30
lifecycle_interval_secs = 3600
[ledger]
pool = "rbd"
namespace = "{ns}"
[ssh]
user = "root"
identity = "{identity}"
known_hosts = "{known_hosts}"
connect_timeout_secs = 5
command_timeout_secs = 20
[[hosts]]
uuid = "target"
cluster = "c1"
storage_addrs = ["{target}"]
ssh = "{target}:1"
[[hosts]]
uuid = "sibling"
cluster = "c1"
storage_addrs = ["{sib}"]
ssh = "{sib_ssh}"
"#,
        conf = cluster().conf.display(),
        identity = key.identity().display(),
        known_hosts = dir.join("known_hosts").display(),
        target = ip(TARGET_IP),
        sib = ip(SIBLING_IP),
        sib_ssh = sibling.addr(),
    );
    for h in hosts {
        text.push_str(&format!(
            "[[hosts]]\nuuid = \"{}\"\ncluster = \"c1\"\nstorage_addrs = [\"{}\"]\nssh = \"{}\"\n",
            h.name,
            h.ip,
            h.sshd.addr()
        ));
    }
    let mut sshds: Vec<&Sshd> = hosts.iter().map(|h| &h.sshd).collect();
    sshds.push(sibling);
    write_known_hosts(&dir.join("known_hosts"), &sshds);
    let path = dir.join("rbdfence.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// VmRSS and VmHWM of a process, in MiB.
fn rss(pid: u32) -> (f64, f64) {
    let [rss, hwm] = status_mib(pid, ["VmRSS:", "VmHWM:"]);
    (rss, hwm)
}

/// Fields of `/proc/PID/status` given in kB, in MiB (0 when absent).
fn status_mib<const N: usize>(pid: u32, names: [&str; N]) -> [f64; N] {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    names.map(|name| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0)
    })
}

/// RSS and anonymous RSS (MiB) of the smallest librados client: a C program that connects as
/// the service does (its conf and cephx id), opens the `rbd` pool and waits
/// (`benches/fixtures/rados_floor.c`). What any process linking librados costs, beside the
/// service's own figure.
fn rados_floor() -> (f64, f64) {
    use std::io::{BufRead, BufReader};
    let program = common::build_c_fixture(
        "benches/fixtures/rados_floor.c",
        "rados_floor",
        &["-lrados"],
    );
    let mut child = Command::new(&program)
        .arg(&cluster().conf)
        .args(["rbdfence", "rbd"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert_eq!(ready, "ready\n", "rados_floor could not connect");
    std::thread::sleep(Duration::from_secs(1));
    let [rss_mib, anon] = status_mib(child.id(), ["VmRSS:", "RssAnon:"]);
    drop(child.stdin.take());
    child.wait().unwrap();
    let _ = std::fs::remove_file(&program);
    (rss_mib, anon)
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .pool_max_idle_per_host(2000)
        .build()
        .unwrap()
}

async fn metric(http: &reqwest::Client, base: &str, series: &str) -> f64 {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

const ADDS: &str = "rbdfence_ceph_calls_total{op=\"blocklist_add\",result=\"ok\"}";
const SESSIONS: &str = "rbdfence_ssh_sessions_total{result=\"ok\"}";
const PEAK: &str = "rbdfence_ceph_calls_in_flight_peak{op=\"blocklist_add\"}";

/// Opens `n` keep-alive connections (concurrent /healthz calls), so the burst measures
/// fences, not TCP handshakes.
async fn warm(http: &reqwest::Client, base: &str, n: usize) {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (http, url) = (http.clone(), format!("{base}/healthz"));
            tokio::spawn(async move { http.get(url).send().await.unwrap().bytes().await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}

/// One reply, checked: approve, success-killed, scope vm, the fence exactly `client`; its
/// osdmap epoch, or what was wrong with it.
fn check(status: u16, reply: &Value, client: &str) -> Result<u64, String> {
    let bl = &reply["evidence"]["blocklist"];
    let entries: Vec<&str> = bl["entries"]
        .as_array()
        .map(|a| a.iter().filter_map(|e| e.as_str()).collect())
        .unwrap_or_default();
    let got = (
        status,
        reply["decision"].as_str().unwrap_or("-"),
        reply["outcome"].as_str().unwrap_or("-"),
        bl["scope"].as_str().unwrap_or("-"),
    );
    if got != (200, "approve", "success-killed", "vm") || entries != [client] {
        return Err(format!(
            "{} {} {} scope {} entries {entries:?}: {}",
            got.0,
            got.1,
            got.2,
            got.3,
            reply["message"].as_str().unwrap_or("")
        ));
    }
    Ok(bl["osdmap_epoch"].as_u64().unwrap_or(0))
}

/// One reply of a burst: its host, its check, when it arrived (ms from the burst's start),
/// its fence id.
type Reply = (String, Result<u64, String>, f64, String);

async fn fire(
    http: &reqwest::Client,
    base: &str,
    reqs: Vec<(Value, String, String)>,
) -> (f64, Vec<Reply>) {
    let t0 = Instant::now();
    let tasks: Vec<_> = reqs
        .into_iter()
        .map(|(body, host, client)| {
            let (http, url) = (http.clone(), format!("{base}/v1/pre-instantiate"));
            tokio::spawn(async move {
                let r = http.post(url).json(&body).send().await.unwrap();
                let status = r.status().as_u16();
                let reply: Value = r.json().await.unwrap();
                let id = reply["fence_id"].as_str().unwrap_or("").to_string();
                (host, check(status, &reply, &client), ms(t0.elapsed()), id)
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    (ms(t0.elapsed()), out)
}

fn body(uuid: &str, host: &str, image: &str) -> Value {
    json!({"vm_uuid": uuid, "failed_host": host, "target_host": "target", "volumes": [image]})
}

fn main() {
    let hosts_n = env_or("RBDFENCE_RACK_HOSTS", 10).clamp(1, 10);
    let vms_n = env_or("RBDFENCE_RACK_VMS", 100).clamp(1, 999);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    common::bind_shim();
    let tag = format!("rack{}", std::process::id());
    let standin = standin();
    let key = ClientKey::generate();
    let dir = tempfile::Builder::new()
        .prefix("rbdfence-rack-")
        .tempdir()
        .unwrap();
    let sibling = Sshd::start(ip(SIBLING_IP), &key);

    let t = Instant::now();
    let mut failed: Vec<Host> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..hosts_n)
            .map(|i| {
                let (key, standin, tag) = (&key, &standin, &tag);
                s.spawn(move || {
                    start_host(
                        &format!("h{:02}", i + 1),
                        FIRST_FAILED + i as u8,
                        vms_n,
                        key,
                        standin,
                        tag,
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let setup = t.elapsed().as_secs_f64();
    // h00, for the single requests: its sshd; a client and one VM per run.
    let single_sshd = Sshd::start(ip(SINGLE_IP), &key);
    let mut single = Host {
        name: "h00".into(),
        ip: ip(SINGLE_IP).to_string(),
        sshd: single_sshd,
        client: None,
        vms: Vec::new(),
    };
    let mut all: Vec<&Host> = vec![&single];
    all.extend(failed.iter());
    let config = write_config(dir.path(), &key, &all, &sibling, &format!("bench-{tag}"));
    let svc = ServeProcess::start(&config);
    let pid = svc.child.id();
    let base = svc.base.clone();
    let http = http();
    let total = hosts_n * vms_n;
    // Memory: idle (the Ceph connection up, one HTTP connection), then after 1000 reads of
    // 200 images (GET /v1/images, one keep-alive connection), then 1000 connections open.
    std::thread::sleep(Duration::from_secs(1));
    let (rss_idle, _) = rss(pid);
    let (floor_rss, floor_anon) = rados_floor();
    let images: Vec<String> = failed
        .iter()
        .flat_map(|h| {
            let c = h.client.as_ref().unwrap();
            (0..vms_n).map(move |i| c.image(i))
        })
        .take(200)
        .collect();
    let (reads_ms, rss_reads) = rt.block_on(async {
        let one = reqwest::Client::new();
        let mut v = Vec::new();
        for i in 0..1000 {
            let t = Instant::now();
            let r = one
                .get(format!("{base}/v1/images/{}", images[i % images.len()]))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 200);
            r.bytes().await.unwrap();
            v.push(ms(t.elapsed()));
        }
        (v, rss(pid).0)
    });
    rt.block_on(warm(&http, &base, total.min(2000)));
    let (idle_rss, _) = rss(pid);

    // One request, one VM, SINGLE_REPS times (each its own client and stand-in on h00).
    let mut singles = Vec::new();
    for r in 0..SINGLE_REPS {
        let client = HostClient::start(&single.ip, &format!("{tag}-h00-r{r}-vm"), 1);
        let uuid = new_uuid();
        let vm = Command::new(&standin)
            .args(["-name", &format!("guest=h00-r{r}"), "-uuid", &uuid])
            .spawn()
            .unwrap();
        single.vms.push((uuid.clone(), Owned(vm)));
        let req = vec![(
            body(&uuid, "h00", &client.image(0)),
            "h00".to_string(),
            client.address.clone(),
        )];
        let (wall, replies) = rt.block_on(fire(&http, &base, req));
        if let Err(e) = &replies[0].1 {
            panic!("the single request: {e}");
        }
        singles.push(wall);
        client.remove();
    }
    let one = pct(&singles, 0.5);

    // The rack: every VM of every failed host at once.
    let adds0 = rt.block_on(metric(&http, &base, ADDS));
    let sessions0 = rt.block_on(metric(&http, &base, SESSIONS));
    // Logins accepted by the failed hosts' sshds (their kill sessions) and by the others
    // (h00, first of the cluster by uuid, and the sibling: the jump hosts).
    let count = |d: &Sshd| d.log().matches("Accepted publickey").count();
    let logins = || {
        (
            failed.iter().map(|h| count(&h.sshd)).sum::<usize>(),
            count(&sibling) + count(&single.sshd),
        )
    };
    let logins0 = logins();
    let reqs: Vec<(Value, String, String)> = failed
        .iter()
        .flat_map(|h| {
            let c = h.client.as_ref().unwrap();
            h.vms.iter().enumerate().map(move |(i, (uuid, _))| {
                (
                    body(uuid, &h.name, &c.image(i)),
                    h.name.clone(),
                    c.address.clone(),
                )
            })
        })
        .collect();
    let (rss_before, _) = rss(pid);
    let cpu0 = cpu::cpu_now();
    let (wall, replies) = rt.block_on(fire(&http, &base, reqs));
    let cpu_use = cpu::cpu_use(&cpu0, &cpu::cpu_now());
    let (rss_after, rss_peak) = rss(pid);
    let adds = rt.block_on(metric(&http, &base, ADDS)) - adds0;
    let sessions = rt.block_on(metric(&http, &base, SESSIONS)) - sessions0;
    let logins1 = logins();
    let (host_logins, jump_logins) = (logins1.0 - logins0.0, logins1.1 - logins0.1);
    let peak = rt.block_on(metric(&http, &base, PEAK));
    // Every stand-in must be gone: the scan found and killed each.
    let mut alive = 0;
    for h in &mut failed {
        for (_, child) in &mut h.vms {
            if !matches!(child.0.try_wait(), Ok(Some(_))) {
                alive += 1;
            }
        }
    }
    let mut batches: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    let mut wrong: BTreeMap<String, usize> = BTreeMap::new();
    for (host, checked, _, _) in &replies {
        match checked {
            Ok(epoch) => {
                batches.entry(host.clone()).or_default().insert(*epoch);
            }
            Err(e) => {
                // Group by what was wrong, without the per-request details.
                let kind = e.split(':').next().unwrap_or(e).to_string();
                *wrong.entry(kind).or_default() += 1;
                if wrong.values().sum::<usize>() == 1 {
                    println!("  first wrong reply: {e}");
                }
            }
        }
    }
    let correct = replies.iter().filter(|r| r.1.is_ok()).count();
    // Where the time went: each fence's record (when it started in the engine, its stages).
    let burst_start = time::OffsetDateTime::now_utc() - Duration::from_secs_f64(wall / 1e3);
    let mut started = Vec::new();
    let mut engine = Vec::new();
    let mut stage: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    rt.block_on(async {
        for (_, _, _, id) in &replies {
            let Ok(r) = http.get(format!("{base}/v1/fences/{id}")).send().await else {
                continue;
            };
            let Ok(rec) = r.json::<Value>().await else {
                continue;
            };
            if let Some(t) = rec["started_at"].as_str().and_then(|t| {
                time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
            }) {
                started.push((t - burst_start).as_seconds_f64() * 1e3);
            }
            engine.push(rec["duration_ms"].as_f64().unwrap_or(0.0));
            if let Some(m) = rec["stages_ms"].as_object() {
                for (k, v) in m {
                    stage
                        .entry(k.clone())
                        .or_default()
                        .push(v.as_f64().unwrap_or(0.0));
                }
            }
        }
    });
    let arrivals: Vec<f64> = replies.iter().map(|r| r.2).collect();

    println!();
    println!(
        "rack failure: rbdfence serve (ledger in RADOS), {hosts_n} failed hosts x {vms_n} VMs, \
         a real sshd per host, one Ceph client per host holding its {vms_n} images, \
         stand-in qemus (set up in {setup:.1} s)"
    );
    println!(
        "  1 request, 1 VM ({SINGLE_REPS} runs): {} ms; median {one:.1} ms",
        singles
            .iter()
            .map(|w| format!("{w:.1}"))
            .collect::<Vec<_>>()
            .join(" / ")
    );
    println!(
        "  {total} concurrent requests: wall {wall:.1} ms (replies p50 {:.1}, p99 {:.1}); ratio {:.2}x one request (goal <= 4x)",
        pct(&arrivals, 0.5),
        pct(&arrivals, 0.99),
        wall / one
    );
    println!(
        "  replies approve / success-killed / scope vm / exactly the host's client: {correct} of {total}; stand-ins left alive: {alive}"
    );
    for (kind, n) in &wrong {
        println!("    wrong: {n} x {kind}");
    }
    println!("  CPU over the burst: {}", cpu_use.line());
    if !started.is_empty() {
        let row = |name: &str, v: &[f64]| {
            println!(
                "    {name:<44} p50 {:>7.1}  p99 {:>7.1}  max {:>7.1} ms",
                pct(v, 0.5),
                pct(v, 0.99),
                pct(v, 1.0)
            );
        };
        row("fence started in the engine (from the burst)", &started);
        row("fence in the engine (duration_ms)", &engine);
        for (k, v) in &stage {
            row(&format!("  stage {k}"), v);
        }
    }
    println!(
        "  mon: {adds} blocklist adds in all ({:.1} per host), at most {peak} in flight at once; storage batches per host: {}",
        adds / hosts_n as f64,
        batches
            .iter()
            .map(|(h, e)| format!("{h}={}", e.len()))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "  SSH: {sessions} kill commands for {hosts_n} hosts; logins accepted meanwhile: {host_logins} by the failed hosts' sshds, {jump_logins} by the jump hosts'"
    );
    println!(
        "  librados alone (benches/fixtures/rados_floor.c: connect, open the pool, wait): RSS {floor_rss:.1} MiB, of it anonymous {floor_anon:.1} MiB; the service idle {rss_idle:.1} MiB, {:.1} MiB above it",
        rss_idle - floor_rss
    );
    println!(
        "  service RSS: idle {rss_idle:.1} MiB; after 1000 GET /v1/images of {} images {rss_reads:.1} MiB (per GET median {:.3} ms, p99 {:.3}); {} connections open {idle_rss:.1} MiB; before the burst {rss_before:.1}, after {rss_after:.1}, peak {rss_peak:.1} MiB",
        images.len(),
        pct(&reads_ms, 0.5),
        pct(&reads_ms, 0.99),
        total.min(2000)
    );
    let failed_check = correct != total || alive != 0;

    // Clean up: the service, the stand-ins, the clients and their images, our entries.
    drop(svc);
    for h in failed {
        if let Some(c) = h.client {
            c.remove();
        }
    }
    drop(single);
    let lifted = lift::lift_entries(&cluster().conf, SINGLE_IP..=SIBLING_IP).len();
    println!("  lifted {lifted} blocklist entries on 127.0.0.{SINGLE_IP}-{SIBLING_IP}");
    let _ = std::fs::remove_file(&standin);
    assert!(!failed_check, "the rack failure was not handled correctly");
}
