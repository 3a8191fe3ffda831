//! Benchmark: the service over HTTP, in-process (`serve::build` + `api::router` + axum on
//! 127.0.0.1:0, on its own tokio runtime; the client on another), against the micro cluster,
//! real qemu and real sshd, in one run:
//!
//! (a) `GET /v1/images/POOL/IMAGE` over one keep-alive HTTP connection (one reqwest client,
//!     reused) versus `rbd status --format json` as a new process per call, on an image held
//!     and written by a real qemu (so it has a watcher and an exclusive-lock owner); also
//!     with the client on the service's runtime (as tests/service.rs runs it), and
//!     `GET /healthz` as the HTTP floor;
//! (b) one `POST /v1/pre-instantiate` for one VM of a failed host (repeated a few times, the
//!     fence lifted in between) versus 100 concurrent ones for 100 VMs of the same failed host
//!     (100 real qemus, each with its own image, all opened from the failed host's address),
//!     with the SSH sessions and blocklist adds used (from /metrics), the per-stage timings of
//!     every fence (from `GET /v1/fences/{id}`), when each qemu really exited (pidfd), and
//!     where the CPU went. To tell the stages' own scaling apart: the same 100 images read
//!     through `GET /v1/images/…` after the burst, one at a time and all at once (the
//!     service's image handles are cached by then, the burst's were first opens), and the
//!     kill session alone (russh via the sibling, uuids that match nothing) with and without
//!     the 100 qemus on the host. Both again on the already-dead path: the single VM's qemu
//!     ended beforehand, and the 100 VMs asked for a second time once their fence is lifted
//!     (their qemus gone, their lock records left).
//!
//! Run with `scripts/bench.sh service`, or with RBDFENCE_TEST_CLUSTER=DIR
//! `cargo bench --bench service`.
//!
//! Loopback addresses used: 127.0.0.121 (failed host h1: sshd, and every fenced VM's disk),
//! 127.0.0.122 (h2, the HA target, no sshd), 127.0.0.123 (h3, the sibling's sshd) and
//! 127.0.0.124 (the VM of (a), in no fence). Every qemu and sshd is ended on exit, also on a
//! panic (drop guards), and every blocklist entry on 127.0.0.121 – 127.0.0.130 is lifted.
#![allow(clippy::unwrap_used)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/cpu.rs"]
mod cpu;
#[path = "support/lift.rs"]
mod lift;

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use axum::serve::ListenerExt;
use common::stack::{Stack, new_uuid};
use common::vm::Vm;
use common::{TestImage, cluster};
use cpu::{CpuUse, cpu_now, cpu_use};
use rbdfence::config::Config;
use serde_json::{Value, json};

/// Last octet of the failed host h1 (h2 is +1, the sibling h3 +2).
const BASE: u8 = 121;
const FAILED_IP: &str = "127.0.0.121";
/// Where (a)'s VM opens its disk from: not a host of the inventory, never fenced.
const HOLDER_IP: &str = "127.0.0.124";
const GET_WARMUP: usize = 100;
const GET_N: usize = 2000;
const CLI_N: usize = 100;
/// Single-VM fences (each its own VM, the fence lifted after each); the ratio uses the median.
const SINGLE_REPS: usize = 3;
const MANY: usize = 100;
/// Parallel starters for the 100 qemus (image create + qemu -daemonize + one write each).
const START_THREADS: usize = 8;
const STAGES: [&str; 4] = ["evidence", "blocklist", "osdmap", "ssh"];

const SESSIONS_OK: &str = "rbdfence_ssh_sessions_total{result=\"ok\"}";
const ADDS_OK: &str = "rbdfence_ceph_calls_total{op=\"blocklist_add\",result=\"ok\"}";
const STATUS_OK: &str = "rbdfence_ceph_calls_total{op=\"image_status\",result=\"ok\"}";

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The `p` quantile (nearest rank) of `v`.
fn pct(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[((s.len() as f64 - 1.0) * p).round() as usize]
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::MIN, f64::max)
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::MAX, f64::min)
}

// ------------------------------------------------------------------------- blocklist clean-up

/// Lifts (as admin, with the CLI) every blocklist entry on 127.0.0.121 – .130; returns them.
/// Besides the fences, `rbd rm` of an image whose last writer was killed breaks its lock and
/// blocklists that writer's exact address (librbd's rbd_blocklist_on_break_lock).
fn lift_our_blocklist_entries() -> Vec<String> {
    lift::lift_entries(&cluster().conf, 121..=130)
}

/// Lifts our blocklist entries when dropped (also on a panic). Declared first in `main`, so
/// it runs after the VMs and sshds are gone.
struct LiftOnDrop;

impl Drop for LiftOnDrop {
    fn drop(&mut self) {
        let lifted = lift_our_blocklist_entries();
        if !lifted.is_empty() {
            eprintln!(
                "lifted {} leftover blocklist entries on 127.0.0.121-130 (fences not lifted yet, and \
                 killed writers' addresses that `rbd rm` blocklists when it breaks their lock)",
                lifted.len()
            );
        }
    }
}

// ------------------------------------------------------------------------------------ VMs

/// One VM: its qemu first, so a drop kills the qemu before removing its image.
struct BenchVm {
    vm: Vm,
    uuid: String,
    img: TestImage,
}

/// Creates an image, starts a qemu on it from `ip` and writes once (takes the exclusive lock).
fn start_vm(tag: &str, ip: &str, byte: u8) -> BenchVm {
    let img = TestImage::create(tag);
    let uuid = new_uuid();
    let vm = Vm::start(&img, ip, &uuid);
    // qemu-io prints nothing on success here; (a) and the fences' evidence check the owner.
    vm.write(0, byte);
    BenchVm { vm, uuid, img }
}

/// Starts `n` VMs from `ip` on `START_THREADS` threads. A panicking starter's VMs are ended
/// by its own unwinding; the others' are kept in the result and ended before re-panicking.
fn start_vms(n: usize, ip: &'static str) -> Vec<BenchVm> {
    let per = n.div_ceil(START_THREADS);
    let joined: Vec<std::thread::Result<Vec<BenchVm>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..START_THREADS)
            .map(|t| {
                s.spawn(move || {
                    (t * per..((t + 1) * per).min(n))
                        .map(|i| start_vm(&format!("bench-svc-many{i}"), ip, i as u8))
                        .collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join()).collect()
    });
    let mut vms = Vec::with_capacity(n);
    let mut failed = false;
    for r in joined {
        match r {
            Ok(v) => vms.extend(v),
            Err(_) => failed = true,
        }
    }
    assert!(!failed, "starting the VMs failed (see the panic above)");
    vms
}

/// Ends the (already killed) qemus and removes the images, in parallel; an image whose
/// killed client's watch has not expired yet is retried for a while.
fn remove_vms(vms: Vec<BenchVm>) {
    let mut buckets: Vec<Vec<BenchVm>> = (0..START_THREADS).map(|_| Vec::new()).collect();
    for (i, v) in vms.into_iter().enumerate() {
        buckets[i % START_THREADS].push(v);
    }
    std::thread::scope(|s| {
        for bucket in buckets {
            s.spawn(move || {
                for BenchVm { vm, uuid: _, img } in bucket {
                    drop(vm);
                    for _ in 0..20 {
                        let ok = Command::new("rbd")
                            .arg("--conf")
                            .arg(&cluster().conf)
                            .args(["rm", "--no-progress", &img.name()])
                            .stdout(Stdio::null())
                            .stderr(Stdio::null())
                            .status()
                            .is_ok_and(|s| s.success());
                        if ok {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(500));
                    }
                    drop(img); // its own `rbd rm` finds nothing left
                }
            });
        }
    });
}

// ------------------------------------------------------------------- process exits (pidfd)

/// A pidfd for `pid` (any process, not only a child): readable once the process has exited.
fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    #[allow(unsafe_code)]
    // SAFETY: pidfd_open(2) takes two integers and returns a new file descriptor or -1; no
    // memory is shared with the kernel.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    #[allow(unsafe_code)]
    // SAFETY: `fd` was just returned by pidfd_open, is open, and nothing else owns it.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Watches the processes of `fds` (pidfds) from a thread: for each, ms after `t0` when it
/// exited (`None`: not within `within`, or it could not be watched).
fn watch_exits(
    fds: Vec<Option<OwnedFd>>,
    t0: Instant,
    within: Duration,
) -> std::thread::JoinHandle<Vec<Option<f64>>> {
    std::thread::spawn(move || {
        let mut out: Vec<Option<f64>> = vec![None; fds.len()];
        let mut pending: Vec<usize> = (0..fds.len()).filter(|i| fds[*i].is_some()).collect();
        let end = t0 + within;
        while !pending.is_empty() && Instant::now() < end {
            let mut pfds: Vec<libc::pollfd> = pending
                .iter()
                .map(|i| libc::pollfd {
                    fd: fds[*i].as_ref().map_or(-1, |f| f.as_raw_fd()),
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            let left = end.saturating_duration_since(Instant::now()).as_millis();
            #[allow(unsafe_code)]
            // SAFETY: `pfds` is a live, exclusively borrowed array of `pfds.len()` pollfd
            // structs, which poll(2) reads and writes only within that length.
            let n = unsafe {
                libc::poll(
                    pfds.as_mut_ptr(),
                    pfds.len() as libc::nfds_t,
                    left.min(1000) as i32,
                )
            };
            if n <= 0 {
                continue;
            }
            let now = ms(t0.elapsed());
            let mut still = Vec::new();
            for (k, i) in pending.iter().enumerate() {
                if pfds[k].revents != 0 {
                    out[*i] = Some(now);
                } else {
                    still.push(*i);
                }
            }
            pending = still;
        }
        out
    })
}

// -------------------------------------------------------------------------- SSH kill probe

/// One kill session as the service runs it (via the sibling h3 to h1), for `n` fresh uuids
/// that match no process: the session and the host scan, nothing to kill. Median of 3, ms.
async fn ssh_probe(stack: &Stack, n: usize) -> f64 {
    use rbdfence::fence::ssh::{Route, SshTarget, kill_qemus};
    let cfg = Config::load(&stack.config).unwrap();
    let settings = rbdfence::app::ssh_settings(&cfg);
    let jump = SshTarget {
        host_uuid: "h3".into(),
        addr: stack.sibling_sshd.addr(),
        storage: vec![],
    };
    let target = SshTarget {
        host_uuid: "h1".into(),
        addr: stack.failed_sshd.as_ref().unwrap().addr(),
        storage: vec![],
    };
    let mut runs = Vec::new();
    for _ in 0..3 {
        let vms: Vec<rbdfence::fence::vm::VmUuid> =
            (0..n).map(|_| new_uuid().parse().unwrap()).collect();
        let t = Instant::now();
        let reports = kill_qemus(
            &settings,
            Route::Via {
                jump: &jump,
                target: &target,
            },
            &vms,
        )
        .await
        .unwrap();
        runs.push(ms(t.elapsed()));
        assert!(reports.iter().all(|r| r.gone && !r.qemu_found));
    }
    pct(&runs, 0.5)
}

// -------------------------------------------------------------------------------- service

/// The service, served in-process on 127.0.0.1:0, counting the connections it accepts.
struct Running {
    base: String,
    http: reqwest::Client,
    token: Option<String>,
    accepted: Arc<AtomicUsize>,
}

impl Running {
    /// Builds and serves the service on the current (server) runtime.
    async fn start(stack: &Stack) -> Running {
        let cfg = Config::load(&stack.config).unwrap();
        let svc = rbdfence::serve::build(cfg).await.unwrap();
        assert!(
            svc.link.is_healthy(),
            "the service could not connect to the test cluster as client.rbdfence"
        );
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let listener = listener.tap_io(move |_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        let app = rbdfence::api::router(svc.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Running {
            base: format!("http://{addr}"),
            http: client(),
            token: svc.token.clone(),
            accepted,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    fn auth(&self, r: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self.auth(self.http.post(format!("{}{path}", self.base)).json(body));
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// A GET with `client`, its body read whole; asserts 200.
    async fn get_with(&self, client: &reqwest::Client, path: &str) -> String {
        let resp = self
            .auth(client.get(format!("{}{path}", self.base)))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200, "GET {path}");
        resp.text().await.unwrap()
    }

    async fn get_json(&self, path: &str) -> Value {
        serde_json::from_str(&self.get_with(&self.http, path).await).unwrap()
    }

    async fn metric(&self, series: &str) -> f64 {
        let text = self.get_with(&self.http, "/metrics").await;
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0.0)
    }

    async fn counters(&self) -> [f64; 3] {
        [
            self.metric(SESSIONS_OK).await,
            self.metric(ADDS_OK).await,
            self.metric(STATUS_OK).await,
        ]
    }

    async fn unfence_h1(&self) -> Vec<String> {
        let (status, reply) = self.post("/v1/hosts/h1/unfence", &json!({})).await;
        assert_eq!(status, 200, "unfence: {reply}");
        reply["lifted"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_str().unwrap().to_string())
            .collect()
    }

    /// Opens `n` connections (n concurrent requests), kept idle in the client's pool.
    async fn warm(self: &Arc<Self>, n: usize) {
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let svc = self.clone();
                tokio::spawn(async move { svc.get_with(&svc.http, "/healthz").await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

fn pre(vm: &BenchVm) -> Value {
    json!({"vm_uuid": vm.uuid, "failed_host": "h1", "target_host": "h2",
           "volumes": [vm.img.name()]})
}

// --------------------------------------------------------------------------------- fences

/// One fence as the caller saw it and as the ledger recorded it; times in ms from the burst's
/// start (the fence's start is the ledger's `started_at`).
struct Fence {
    sent: f64,
    arrived: f64,
    started: f64,
    duration: f64,
    stages: Vec<f64>,
    epoch: Option<u64>,
    executor: String,
    /// When the VM's qemu exited (pidfd).
    exited: Option<f64>,
}

/// One burst of pre-instantiate requests and what it used.
struct Burst {
    wall: f64,
    fences: Vec<Fence>,
    /// SSH sessions ok, blocklist adds ok, image status calls ok (deltas over the burst).
    used: [f64; 3],
    new_conns: usize,
    lifted: Vec<String>,
    cpu: CpuUse,
}

/// Sends the pre-instantiate request of every VM at once (connections opened beforehand);
/// every reply must be approve with `outcome` (`success-killed`, or `success-already-dead`
/// when the qemus were ended beforehand). Then lifts h1's fence.
async fn burst(svc: &Arc<Running>, vms: &[BenchVm], outcome: &str) -> Burst {
    svc.warm(vms.len()).await;
    let c0 = svc.counters().await;
    let conns0 = svc.accepted();
    let cpu0 = cpu_now();
    let pidfds: Vec<Option<OwnedFd>> = vms.iter().map(|v| pidfd_open(v.vm.pid)).collect();
    let bodies: Vec<Value> = vms.iter().map(pre).collect();
    let t0 = Instant::now();
    let wall0 = SystemTime::now();
    let exits = watch_exits(pidfds, t0, Duration::from_secs(60));
    let tasks: Vec<_> = bodies
        .into_iter()
        .map(|body| {
            let svc = svc.clone();
            tokio::spawn(async move {
                let sent = t0.elapsed();
                let (status, reply) = svc.post("/v1/pre-instantiate", &body).await;
                (sent, t0.elapsed(), status, reply)
            })
        })
        .collect();
    let mut replies = Vec::new();
    for t in tasks {
        replies.push(t.await.unwrap());
    }
    let wall = ms(t0.elapsed());
    let cpu1 = cpu_now();
    let new_conns = svc.accepted() - conns0;
    let c1 = svc.counters().await;
    let exited = tokio::task::spawn_blocking(move || exits.join().unwrap())
        .await
        .unwrap();
    let mut fences = Vec::new();
    for ((sent, arrived, status, reply), exited) in replies.into_iter().zip(exited) {
        assert_eq!(status, 200, "{reply}");
        assert_eq!(
            (reply["decision"].as_str(), reply["outcome"].as_str()),
            (Some("approve"), Some(outcome)),
            "{reply:#}"
        );
        let id = reply["fence_id"].as_str().unwrap();
        let rec = svc.get_json(&format!("/v1/fences/{id}")).await;
        let started = time::OffsetDateTime::parse(
            rec["started_at"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap();
        let started = match SystemTime::from(started).duration_since(wall0) {
            Ok(d) => ms(d),
            Err(e) => -ms(e.duration()),
        };
        fences.push(Fence {
            sent: ms(sent),
            arrived: ms(arrived),
            started,
            duration: rec["duration_ms"].as_f64().unwrap(),
            stages: STAGES
                .iter()
                .map(|s| rec["stages_ms"][s].as_f64().unwrap_or(0.0))
                .collect(),
            epoch: rec["evidence"]["blocklist"]["osdmap_epoch"].as_u64(),
            executor: format!(
                "{}/{}",
                rec["evidence"]["kill"]["executor"].as_str().unwrap_or("-"),
                rec["evidence"]["kill"]["role"].as_str().unwrap_or("-")
            ),
            exited,
        });
    }
    for v in vms {
        assert!(v.vm.wait_gone(Duration::from_secs(5)), "a qemu is alive");
    }
    // Lift the fence, so later VMs can open their disks from 127.0.0.121 again.
    let lifted = svc.unfence_h1().await;
    Burst {
        wall,
        fences,
        used: [c1[0] - c0[0], c1[1] - c0[1], c1[2] - c0[2]],
        new_conns,
        lifted,
        cpu: cpu_use(&cpu0, &cpu1),
    }
}

fn stat_row(name: &str, v: &[f64]) {
    if v.is_empty() {
        println!("    {name:<48} (none)");
        return;
    }
    println!(
        "    {name:<48} min {:>7.1}  p50 {:>7.1}  p99 {:>7.1}  max {:>7.1}",
        min(v),
        pct(v, 0.5),
        pct(v, 0.99),
        max(v)
    );
}

/// Per-fence timeline and stages (ms), over every fence of `fences`.
fn print_fences(fences: &[&Fence]) {
    let col = |get: &dyn Fn(&Fence) -> f64| fences.iter().map(|x| get(x)).collect::<Vec<f64>>();
    stat_row("request sent (from the burst's start)", &col(&|x| x.sent));
    stat_row("fence started in the engine", &col(&|x| x.started));
    for (k, s) in STAGES.iter().enumerate() {
        stat_row(&format!("  stage {s} (stages_ms)"), &col(&|x| x.stages[k]));
    }
    stat_row(
        "  evidence done (started + evidence)",
        &col(&|x| x.started + x.stages[0]),
    );
    stat_row(
        "  ssh stage entered (fence end - ssh)",
        &col(&|x| x.started + x.duration - x.stages[3]),
    );
    let exited: Vec<f64> = fences.iter().filter_map(|x| x.exited).collect();
    stat_row("  qemu exited (pidfd)", &exited);
    stat_row(
        "fence duration_ms (engine, before ledger)",
        &col(&|x| x.duration),
    );
    stat_row(
        "fence end (started + duration_ms)",
        &col(&|x| x.started + x.duration),
    );
    stat_row("reply arrived", &col(&|x| x.arrived));
    stat_row(
        "after the engine (arrived - fence end)",
        &col(&|x| x.arrived - x.started - x.duration),
    );
}

fn print_burst(label: &str, runs: &[Burst]) {
    let walls: Vec<String> = runs.iter().map(|r| format!("{:.1}", r.wall)).collect();
    println!(
        "  {label}: wall {} ms (time until the last reply)",
        walls.join(" / ")
    );
    let all: Vec<&Fence> = runs.iter().flat_map(|r| &r.fences).collect();
    print_fences(&all);
    for (k, r) in runs.iter().enumerate() {
        let mut groups: BTreeMap<Option<u64>, Vec<&Fence>> = BTreeMap::new();
        for f in &r.fences {
            groups.entry(f.epoch).or_default().push(f);
        }
        let mut execs: Vec<&str> = r.fences.iter().map(|x| x.executor.as_str()).collect();
        execs.sort();
        execs.dedup();
        let tag = if runs.len() > 1 {
            format!("run {}: ", k + 1)
        } else {
            String::new()
        };
        println!(
            "    {tag}used {} SSH session(s) ok, {} blocklist add(s) ok, {} image status call(s) ok; \
             {} new connection(s) during the burst; kill executor(s) {execs:?}; unfence lifted {} entries",
            r.used[0],
            r.used[1],
            r.used[2],
            r.new_conns,
            r.lifted.len()
        );
        for (epoch, g) in &groups {
            let col = |get: &dyn Fn(&Fence) -> f64| g.iter().map(|x| get(x)).collect::<Vec<f64>>();
            let exits: Vec<f64> = g.iter().filter_map(|x| x.exited).collect();
            println!(
                "    {tag}storage fence confirmed at osdmap epoch {}: {} fence(s); blocklist add {:.0} ms; \
                 entered ssh {:.0}-{:.0} ms, qemus exited {:.0}-{:.0} ms, fences ended {:.0}-{:.0} ms",
                epoch.map_or("-".into(), |e| e.to_string()),
                g.len(),
                pct(&col(&|x| x.stages[1]), 0.5),
                min(&col(&|x| x.started + x.duration - x.stages[3])),
                max(&col(&|x| x.started + x.duration - x.stages[3])),
                if exits.is_empty() {
                    f64::NAN
                } else {
                    min(&exits)
                },
                if exits.is_empty() {
                    f64::NAN
                } else {
                    max(&exits)
                },
                min(&col(&|x| x.started + x.duration)),
                max(&col(&|x| x.started + x.duration)),
            );
        }
        println!("    {tag}CPU over the burst: {}", r.cpu.line());
    }
}

/// `GET_WARMUP` + `GET_N` GETs of `path`, one after another over one new reqwest client
/// (created and used on the calling runtime); returns the timed samples (ms), the
/// connections the service accepted meanwhile, and the last body.
async fn get_loop(svc: &Running, path: &str) -> (Vec<f64>, usize, String) {
    let client = client();
    let before = svc.accepted();
    let mut samples = Vec::with_capacity(GET_N);
    let mut body = String::new();
    for i in 0..GET_WARMUP + GET_N {
        let t = Instant::now();
        body = svc.get_with(&client, path).await;
        let e = t.elapsed();
        if i >= GET_WARMUP {
            samples.push(ms(e));
        }
        // Untimed: lets the connection go back to the pool before the next request, so
        // every request uses the same one.
        tokio::task::yield_now().await;
    }
    (samples, svc.accepted() - before, body)
}

// ----------------------------------------------------------------------------------- main

fn main() {
    let _lift = LiftOnDrop;
    // The service on its own runtime (as `rbdfence serve` runs it), the client on another.
    let server = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // The shim and the cluster's conf, once, before any parallel start.
    common::bind_shim();
    let conf = cluster().conf.clone();
    let stack = Stack::new(BASE);
    let svc = Arc::new(server.block_on(Running::start(&stack)));

    // ---------------------------------------------------------------------------------- (a)
    let a_vm = start_vm("bench-svc-get", HOLDER_IP, 1);
    let image = a_vm.img.name();
    let path = format!("/v1/images/{image}");
    // The client on its own thread and runtime, like an external caller (the primary
    // figure); then on the service's own runtime, as tests/service.rs runs it.
    let cpu0 = cpu_now();
    let (get_ms, a_conns, a_body) = rt.block_on(get_loop(&svc, &path));
    let a_cpu = cpu_use(&cpu0, &cpu_now());
    let (shared_ms, shared_conns, _) = server.block_on(get_loop(&svc, &path));
    // The HTTP floor: the same loop on a route that does no Ceph call.
    let (healthz_ms, _, _) = rt.block_on(get_loop(&svc, "/healthz"));
    let v: Value = serde_json::from_str(&a_body).unwrap();
    let owner = v["lock_owners"][0]["address"].as_str().unwrap_or_default();
    assert!(
        owner.starts_with(&format!("{HOLDER_IP}:"))
            && v["watchers"][0]["address"].as_str() == Some(owner),
        "the image must have the qemu as watcher and lock owner: {v}"
    );
    let mut cli_ms = Vec::with_capacity(CLI_N);
    for _ in 0..CLI_N {
        let t = Instant::now();
        let out = Command::new("rbd")
            .arg("--conf")
            .arg(&conf)
            .args(["status", "--format", "json", &image])
            .output()
            .unwrap();
        cli_ms.push(ms(t.elapsed()));
        assert!(out.status.success());
        assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("{HOLDER_IP}:")));
    }
    remove_vms(vec![a_vm]);

    // ------------------------------------------------------------------------------ (b) one
    let mut singles = Vec::new();
    for i in 0..SINGLE_REPS {
        let one = start_vm(&format!("bench-svc-one{i}"), FAILED_IP, 0xab);
        singles.push(rt.block_on(burst(&svc, std::slice::from_ref(&one), "success-killed")));
        remove_vms(vec![one]);
    }
    // The same, the qemu ended beforehand (its lock record stays): the already-dead path.
    let mut singles_dead = Vec::new();
    for i in 0..SINGLE_REPS {
        let one = start_vm(&format!("bench-svc-dead{i}"), FAILED_IP, 0xab);
        common::signal(one.vm.pid, libc::SIGKILL);
        assert!(one.vm.wait_gone(Duration::from_secs(5)));
        singles_dead.push(rt.block_on(burst(
            &svc,
            std::slice::from_ref(&one),
            "success-already-dead",
        )));
        remove_vms(vec![one]);
    }

    // ----------------------------------------------------------------------------- (b) many
    let t = Instant::now();
    let vms = start_vms(MANY, FAILED_IP);
    let start_secs = t.elapsed().as_secs_f64();
    // The kill session alone (no process matches): with the 100 qemus on the host, for 1
    // and for 100 uuids; after the burst, with none of them left.
    let probe_with = [
        rt.block_on(ssh_probe(&stack, 1)),
        rt.block_on(ssh_probe(&stack, MANY)),
    ];
    let many = rt.block_on(burst(&svc, &vms, "success-killed"));
    // Again for the same VMs, now all dead (the fence was lifted): the already-dead path.
    let many_dead = rt.block_on(burst(&svc, &vms, "success-already-dead"));
    let probe_without = [
        rt.block_on(ssh_probe(&stack, 1)),
        rt.block_on(ssh_probe(&stack, MANY)),
    ];
    // Evidence alone, after the burst (not to warm the burst's path): the same 100 images
    // through GET /v1/images (one open + status + close each, like the fence's evidence
    // step), one at a time, then all at once. Their qemus are gone now: lock owners only.
    let (ev_seq, ev_conc) = rt.block_on(async {
        svc.warm(MANY).await;
        let paths: Vec<String> = vms
            .iter()
            .map(|v| format!("/v1/images/{}", v.img.name()))
            .collect();
        let mut seq = Vec::new();
        let t = Instant::now();
        for p in &paths {
            let t = Instant::now();
            let body = svc.get_with(&svc.http, p).await;
            seq.push(ms(t.elapsed()));
            assert!(body.contains("lock_owners"), "{body}");
        }
        let seq_total = ms(t.elapsed());
        let t = Instant::now();
        let tasks: Vec<_> = paths
            .into_iter()
            .map(|p| {
                let svc = svc.clone();
                tokio::spawn(async move {
                    let t = Instant::now();
                    svc.get_with(&svc.http, &p).await;
                    ms(t.elapsed())
                })
            })
            .collect();
        let mut conc = Vec::new();
        for t in tasks {
            conc.push(t.await.unwrap());
        }
        ((seq, seq_total), (conc, ms(t.elapsed())))
    });

    // ------------------------------------------------------------------------------- report
    println!();
    println!(
        "rbdfence service benchmark (in-process axum on its own runtime, micro cluster, real qemu + sshd)"
    );
    println!();
    println!(
        "(a) watchers + lock owners of {image} (qemu from {HOLDER_IP}, written: 1 watcher, 1 exclusive owner)"
    );
    let row = |name: &str, v: &[f64]| {
        println!(
            "    {name:<52} n={:<5} median {:>9.3} ms   p99 {:>9.3} ms",
            v.len(),
            pct(v, 0.5),
            pct(v, 0.99)
        );
    };
    row(
        &format!("GET, client on its own runtime ({a_conns} conn accepted)"),
        &get_ms,
    );
    row(
        &format!("GET, client on the service's runtime ({shared_conns} conn)"),
        &shared_ms,
    );
    row(
        "GET /healthz, own runtime (HTTP floor, no Ceph)",
        &healthz_ms,
    );
    row("rbd status --format json (process per call)", &cli_ms);
    println!(
        "    ratio of medians (rbd status / GET): {:.1}x own runtime, {:.1}x shared runtime   (p99s: {:.1}x, {:.1}x; goal >= 150x)",
        pct(&cli_ms, 0.5) / pct(&get_ms, 0.5),
        pct(&cli_ms, 0.5) / pct(&shared_ms, 0.5),
        pct(&cli_ms, 0.99) / pct(&get_ms, 0.99),
        pct(&cli_ms, 0.99) / pct(&shared_ms, 0.99)
    );
    println!("    CPU during the GETs: {}", a_cpu.line());
    println!();
    println!(
        "(b) pre-instantiate, failed host h1 ({FAILED_IP}, sshd), target h2, kill via sibling h3; every reply approve/success-killed; times in ms from the burst's start"
    );
    print_burst(
        &format!("1 request, 1 VM ({SINGLE_REPS} runs, each its own VM)"),
        &singles,
    );
    println!();
    println!(
        "  {MANY} qemus started from {FAILED_IP} in {start_secs:.1} s ({START_THREADS} threads)."
    );
    print_burst(
        &format!("{MANY} concurrent requests, {MANY} VMs"),
        std::slice::from_ref(&many),
    );
    println!(
        "  evidence alone, after the burst (image handles now cached by the service): GET /v1/images of the {MANY} images one at a time: total {:.1} ms (per GET median {:.2}, p99 {:.2}); all {MANY} at once: wall {:.1} ms (per GET median {:.1}, max {:.1})",
        ev_seq.1,
        pct(&ev_seq.0, 0.5),
        pct(&ev_seq.0, 0.99),
        ev_conc.1,
        pct(&ev_conc.0, 0.5),
        max(&ev_conc.0)
    );
    println!(
        "  kill session alone (russh via h3 to h1, uuids matching nothing; median of 3): \
         1 uuid {:.1} ms / {MANY} uuids {:.1} ms with the {MANY} qemus running; \
         1 uuid {:.1} ms / {MANY} uuids {:.1} ms after they are gone",
        probe_with[0], probe_with[1], probe_without[0], probe_without[1]
    );
    println!();
    print_burst(
        &format!("already dead: 1 request, 1 VM ({SINGLE_REPS} runs)"),
        &singles_dead,
    );
    print_burst(
        &format!("already dead: {MANY} concurrent requests, {MANY} VMs"),
        std::slice::from_ref(&many_dead),
    );
    let single_walls: Vec<f64> = singles.iter().map(|r| r.wall).collect();
    let one = pct(&single_walls, 0.5);
    let dead_walls: Vec<f64> = singles_dead.iter().map(|r| r.wall).collect();
    let one_dead = pct(&dead_walls, 0.5);
    println!();
    println!(
        "  wall, killed: 1 VM {one:.1} ms (median of {SINGLE_REPS}), {MANY} VMs {:.1} ms; ratio {:.2}x (goal <= 1.5x)",
        many.wall,
        many.wall / one
    );
    println!(
        "  wall, already dead: 1 VM {one_dead:.1} ms (median of {SINGLE_REPS}), {MANY} VMs {:.1} ms; ratio {:.2}x (goal <= 1.5x)",
        many_dead.wall,
        many_dead.wall / one_dead
    );

    // ------------------------------------------------------------------------------ cleanup
    remove_vms(vms);
    drop(svc);
    drop(stack);
}
