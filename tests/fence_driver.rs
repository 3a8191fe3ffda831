//! The fence driver with FAKE ports (no Ceph, no SSH): step order, timeouts, route fallback
//! and fail-closed error handling. Real-stack behaviour is in tests/fence_e2e.rs.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rbdfence::fence::decision::ExecutorRole;
use rbdfence::fence::driver::{CephPort, Engine, FenceRequest, FenceSettings, KillPort};
use rbdfence::fence::inventory::{Host, Inventory};
use rbdfence::fence::ledger::Ledger;
use rbdfence::fence::ssh::{KillReport, Peer, Route, SocketSweep, SshError, Stage};
use rbdfence::fence::vm::VmUuid;
use rbdfence::rbd::{
    BlocklistEntry, BlocklistItem, CephError, ImageSpec, ImageStatus, LockMode, LockOwner, Op,
    Watcher,
};

type Log = Arc<Mutex<Vec<String>>>;
type Answer = Arc<dyn Fn(&str) -> Result<KillReport, SshError> + Send + Sync>;

/// A fake Ceph: serves scripted image statuses and keeps an in-memory blocklist.
#[derive(Clone, Default)]
struct FakeCeph {
    log: Log,
    status: Arc<Mutex<Vec<(String, ImageStatus)>>>,
    /// Entries with their expiry (RFC 3339); like Ceph, adding an entry that exists keeps
    /// its old expiry.
    listed: Arc<Mutex<Vec<(String, String)>>>,
    fail_add: bool,
    hang_status: bool,
    drop_from_ls: bool,
    /// Every call fails as a link without a connection does (a missing conf: ENOENT).
    disconnected: bool,
    /// How long a blocklist add takes (a monitor commit); 10 ms unless set.
    add_delay: Option<Duration>,
    /// Images whose name contains "slow" answer after this long.
    slow_status: Option<Duration>,
}

impl CephPort for FakeCeph {
    fn own_addrs(&self) -> Vec<rbdfence::rbd::EntityAddr> {
        vec!["127.0.0.1:0/5".parse().unwrap()]
    }
    async fn image_status(&self, spec: &ImageSpec) -> Result<ImageStatus, CephError> {
        self.log.lock().unwrap().push(format!("status {spec}"));
        if let Some(d) = self.slow_status.filter(|_| spec.image.contains("slow")) {
            tokio::time::sleep(d).await;
        }
        if self.hang_status {
            std::future::pending::<()>().await;
        }
        if self.disconnected {
            return Err(CephError::new(
                Op::ConfReadFile,
                "/etc/ceph/ceph.conf",
                libc::ENOENT,
                "",
            ));
        }
        let found = self
            .status
            .lock()
            .unwrap()
            .iter()
            .find(|(s, _)| *s == spec.to_string())
            .map(|(_, st)| st.clone());
        found.ok_or_else(|| {
            CephError::new(
                Op::LocateImage,
                spec.to_string(),
                libc::ENOENT,
                "no such image",
            )
        })
    }
    async fn blocklist_add(
        &self,
        entry: BlocklistEntry,
        expire: Duration,
    ) -> Result<(), CephError> {
        self.log.lock().unwrap().push(format!("add {entry}"));
        // A monitor commit takes time; overlapping fences must share it.
        tokio::time::sleep(self.add_delay.unwrap_or(Duration::from_millis(10))).await;
        if self.fail_add {
            return Err(CephError::new(
                Op::BlocklistAdd,
                entry.to_string(),
                libc::EACCES,
                "access denied",
            ));
        }
        let mut listed = self.listed.lock().unwrap();
        if !self.drop_from_ls && !listed.iter().any(|(e, _)| *e == entry.to_string()) {
            let until = time::OffsetDateTime::now_utc() + expire;
            listed.push((
                entry.to_string(),
                until
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap(),
            ));
        }
        Ok(())
    }
    async fn blocklist_rm(&self, entry: BlocklistEntry) -> Result<(), CephError> {
        self.log.lock().unwrap().push(format!("rm {entry}"));
        self.listed
            .lock()
            .unwrap()
            .retain(|(e, _)| *e != entry.to_string());
        Ok(())
    }
    async fn wait_for_latest_osdmap(&self) -> Result<(), CephError> {
        self.log.lock().unwrap().push("wait-osdmap".into());
        Ok(())
    }
    async fn blocklist_ls(&self) -> Result<Vec<BlocklistItem>, CephError> {
        Ok(self
            .listed
            .lock()
            .unwrap()
            .iter()
            .map(|(e, until)| BlocklistItem {
                entry: e.clone(),
                kind: "addr".into(),
                until: until.clone(),
            })
            .collect())
    }
    async fn osdmap_epoch(&self) -> Result<u64, CephError> {
        Ok(42)
    }
}

/// A fake SSH killer: answers per route from a script, after a scripted delay.
#[derive(Clone)]
struct FakeKiller {
    log: Log,
    answer: Answer,
    /// How long connecting on a route takes before it answers (a black-hole sibling).
    delay: Arc<dyn Fn(&str) -> Duration + Send + Sync>,
}

fn route_name(route: &Route<'_>) -> String {
    match route {
        Route::Direct(t) => format!("direct {}", t.host_uuid),
        Route::Via { jump, target } => format!("via {} to {}", jump.host_uuid, target.host_uuid),
    }
}

impl KillPort for FakeKiller {
    /// The route the session was opened on.
    type Session = String;

    async fn connect(&self, route: Route<'_>) -> Result<String, SshError> {
        let name = route_name(&route);
        self.log.lock().unwrap().push(format!("connect {name}"));
        tokio::time::sleep((self.delay)(&name)).await;
        (self.answer)(&name).map(|_| name)
    }

    async fn kill(&self, session: &String, vms: &[VmUuid]) -> Result<Vec<KillReport>, SshError> {
        self.log
            .lock()
            .unwrap()
            .push(format!("kill {session} x{}", vms.len()));
        vms.iter().map(|_| (self.answer)(session)).collect()
    }

    async fn close(&self, session: String) {
        self.log.lock().unwrap().push(format!("close {session}"));
    }
}

fn host(uuid: &str, ip: &str) -> Host {
    Host {
        uuid: uuid.into(),
        cluster: "c1".into(),
        storage_addrs: vec![ip.parse().unwrap()],
        ssh: format!("{ip}:22").parse().unwrap(),
    }
}

fn peer(uuid: &str) -> Peer {
    Peer {
        host_uuid: uuid.into(),
        addr: "127.0.0.1:22".parse().unwrap(),
    }
}

fn killed() -> Result<KillReport, SshError> {
    Ok(KillReport {
        qemu_found: true,
        pids: vec![7],
        killed: true,
        gone: true,
        alive: vec![],
        unknown: vec![],
        sockets: Some(SocketSweep {
            aborted: 0,
            held: Some(0),
        }),
    })
}

fn timeout(uuid: &str) -> SshError {
    SshError::Timeout {
        peer: peer(uuid),
        stage: Stage::Handshake,
        after: Duration::from_secs(5),
    }
}

fn settings() -> FenceSettings {
    FenceSettings {
        blocklist_expire: Duration::from_secs(3600),
        deadline: Duration::from_secs(2),
        evidence_timeout: Duration::from_secs(1),
        blocklist_timeout: Duration::from_secs(1),
        ssh_timeout: Duration::from_secs(1),
    }
}

struct Setup {
    log: Log,
    engine: Engine<FakeCeph, FakeKiller>,
}

fn setup(
    ceph: FakeCeph,
    answer: impl Fn(&str) -> Result<KillReport, SshError> + Send + Sync + 'static,
) -> Setup {
    let log = ceph.log.clone();
    let status = ImageStatus {
        watchers: vec![Watcher {
            address: "127.0.0.2:0/99".into(),
            client: 1,
            cookie: 2,
        }],
        lock_owners: vec![LockOwner {
            mode: LockMode::Exclusive,
            address: "127.0.0.2:0/99".into(),
        }],
    };
    ceph.status
        .lock()
        .unwrap()
        .push(("rbd/root".into(), status));
    let engine = Engine::new(
        ceph,
        FakeKiller {
            log: log.clone(),
            answer: Arc::new(answer),
            delay: Arc::new(|_| Duration::ZERO),
        },
        Inventory::new(vec![
            host("h1", "127.0.0.2"),
            host("h2", "127.0.0.3"),
            host("h3", "127.0.0.4"),
        ]),
        settings(),
        Ledger::in_memory(),
    );
    Setup { log, engine }
}

fn request() -> FenceRequest {
    FenceRequest {
        request_id: Some("r-1".into()),
        vm: "0b6e3f4a-1c2d-4e5f-8a9b-0c1d2e3f4a5b".parse().unwrap(),
        failed_host: "h1".into(),
        target_host: "h2".into(),
        volumes: vec!["rbd/root".parse().unwrap()],
        dry_run: false,
    }
}

/// VMs of the failed host h1 (target h2), each with one volume: the `(image, client)` pairs
/// give each volume's name and the client that holds its exclusive lock (and watches it when
/// `watching`). Registers their statuses with the fake Ceph; returns their requests, VM uuids
/// numbered from `first`.
fn requests_for_h1(
    s: &Setup,
    first: u32,
    vols: impl IntoIterator<Item = (String, String)>,
    watching: bool,
) -> Vec<FenceRequest> {
    vols.into_iter()
        .zip(first..)
        .map(|((image, addr), n)| {
            s.engine.ceph.status.lock().unwrap().push((
                image.clone(),
                ImageStatus {
                    watchers: if watching {
                        vec![Watcher {
                            address: addr.clone(),
                            client: 1,
                            cookie: 2,
                        }]
                    } else {
                        vec![]
                    },
                    lock_owners: vec![LockOwner {
                        mode: LockMode::Exclusive,
                        address: addr,
                    }],
                },
            ));
            FenceRequest {
                request_id: None,
                vm: format!("0b6e3f4a-1c2d-4e5f-8a9b-{n:012x}").parse().unwrap(),
                failed_host: "h1".into(),
                target_host: "h2".into(),
                volumes: vec![image.parse().unwrap()],
                dry_run: false,
            }
        })
        .collect()
}

fn calls(log: &Log) -> Vec<String> {
    log.lock().unwrap().clone()
}

#[tokio::test]
async fn fences_storage_first_then_kills_through_a_bystander_sibling() {
    let s = setup(FakeCeph::default(), |_| killed());
    let r = s.engine.fence(&request()).await;
    assert_eq!(
        (r.reply.decision.as_str(), r.reply.outcome.as_str()),
        ("approve", "success-killed")
    );
    let log = calls(&s.log);
    let first_kill = log.iter().position(|c| c.starts_with("kill")).unwrap();
    let last_add = log.iter().rposition(|c| c.starts_with("add")).unwrap();
    assert!(last_add < first_kill, "blocklist before SSH: {log:?}");
    // The evidence names the VM's client: fence exactly it, never the whole host.
    assert!(log.contains(&"add 127.0.0.2:0/99".to_string()), "{log:?}");
    assert!(!log.contains(&"add 127.0.0.2:0/0".to_string()), "{log:?}");
    assert_eq!(
        r.reply.evidence.blocklist.as_ref().map(|b| b.scope),
        Some(rbdfence::fence::decision::Scope::Vm)
    );
    // h3 is a bystander sibling; h2 (the HA target) would only be used after it.
    assert_eq!(log[first_kill], "kill via h3 to h1 x1");
    let kill = r.reply.evidence.kill.clone().unwrap();
    assert_eq!(
        (kill.executor.as_deref(), kill.role),
        (Some("h3"), ExecutorRole::Sibling)
    );
    assert_eq!(
        r.reply.evidence.blocklist.as_ref().unwrap().osdmap_epoch,
        Some(42)
    );
    // Recorded before the reply.
    assert_eq!(
        s.engine
            .ledger
            .by_request_id("r-1")
            .await
            .unwrap()
            .unwrap()
            .reply,
        r.reply
    );
}

#[tokio::test]
async fn an_unusable_sibling_is_skipped_then_the_target_then_direct() {
    let s = setup(FakeCeph::default(), |route| match route {
        "via h3 to h1" => Err(timeout("h3")),
        "via h2 to h1" => Err(timeout("h2")),
        _ => killed(),
    });
    let r = s.engine.fence(&request()).await;
    assert_eq!(r.reply.outcome, "success-killed");
    let connects: Vec<String> = calls(&s.log)
        .into_iter()
        .filter(|c| c.starts_with("connect"))
        .collect();
    assert_eq!(
        connects,
        vec![
            "connect via h3 to h1",
            "connect via h2 to h1",
            "connect direct h1"
        ]
    );
    let kills: Vec<String> = calls(&s.log)
        .into_iter()
        .filter(|c| c.starts_with("kill"))
        .collect();
    assert_eq!(kills, vec!["kill direct h1 x1"]);
    assert_eq!(r.reply.evidence.kill.unwrap().role, ExecutorRole::Direct);
}

#[tokio::test]
async fn the_failed_host_unreachable_from_a_working_sibling_ends_the_search() {
    let s = setup(FakeCeph::default(), |_| Err(timeout("h1")));
    let r = s.engine.fence(&request()).await;
    // Blocklist confirmed: SSH unreachable only changes the label.
    assert_eq!(
        (r.reply.decision.as_str(), r.reply.outcome.as_str()),
        ("approve", "success-ssh-unreachable")
    );
    let connects: Vec<String> = calls(&s.log)
        .into_iter()
        .filter(|c| c.starts_with("connect"))
        .collect();
    assert_eq!(connects, vec!["connect via h3 to h1"]);
    assert!(
        !calls(&s.log).iter().any(|c| c.starts_with("kill")),
        "no session, no kill command"
    );
    assert!(!r.reply.evidence.kill.unwrap().ssh_reachable);
}

#[tokio::test]
async fn ssh_timeout_without_a_blocklist_is_a_deny() {
    let s = setup(
        FakeCeph {
            fail_add: true,
            ..Default::default()
        },
        |_| Err(timeout("h1")),
    );
    let r = s.engine.fence(&request()).await;
    assert_eq!(
        (r.reply.decision.as_str(), r.reply.reason.as_str()),
        ("deny", "blocklist-failed")
    );
    assert_eq!(r.reply.outcome, "failed");
    assert!(r.reply.message.contains("EACCES"), "{}", r.reply.message);
}

/// Revision 2, rule 1(c): a confirmed kill approves only with every client the evidence
/// showed fenced; and a host that confirmed the VM gone is never fenced whole for it.
#[tokio::test]
async fn a_confirmed_kill_without_the_vms_clients_fenced_is_a_deny() {
    let s = setup(
        FakeCeph {
            fail_add: true,
            ..Default::default()
        },
        |_| killed(),
    );
    let r = s.engine.fence(&request()).await;
    assert_eq!(
        (r.reply.decision.as_str(), r.reply.reason.as_str()),
        ("deny", "blocklist-failed"),
        "{}",
        r.reply.message
    );
    assert!(r.reply.evidence.blocklist.unwrap().error.is_some());
    assert!(
        !calls(&s.log).contains(&"add 127.0.0.2:0/0".to_string()),
        "the host is not fenced whole"
    );
}

#[tokio::test]
async fn an_entry_missing_from_the_osdmap_is_a_failed_blocklist() {
    let s = setup(
        FakeCeph {
            drop_from_ls: true,
            ..Default::default()
        },
        |_| Err(timeout("h1")),
    );
    let r = s.engine.fence(&request()).await;
    assert_eq!(r.reply.reason, "blocklist-failed");
    assert!(
        r.reply.message.contains("not in the osdmap"),
        "{}",
        r.reply.message
    );
}

#[tokio::test]
async fn a_hung_ceph_ends_in_a_deny_within_the_deadline() {
    let s = setup(
        FakeCeph {
            hang_status: true,
            ..Default::default()
        },
        |_| killed(),
    );
    let t = Instant::now();
    let r = s.engine.fence(&request()).await;
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(
        (r.reply.decision.as_str(), r.reply.reason.as_str()),
        ("deny", "ceph-unavailable")
    );
    assert!(
        !calls(&s.log)
            .iter()
            .any(|c| c.starts_with("add") || c.starts_with("kill"))
    );
}

#[tokio::test]
async fn active_elsewhere_and_dry_run_touch_nothing() {
    let s = setup(FakeCeph::default(), |_| killed());
    s.engine.ceph.status.lock().unwrap().push((
        "rbd/data".into(),
        ImageStatus {
            watchers: vec![Watcher {
                address: "127.0.0.3:0/1".into(),
                client: 3,
                cookie: 4,
            }],
            lock_owners: vec![],
        },
    ));
    let mut req = request();
    req.volumes.push("rbd/data".parse().unwrap());
    let r = s.engine.fence(&req).await;
    assert_eq!(
        (r.reply.decision.as_str(), r.reply.reason.as_str()),
        ("deny", "active-elsewhere")
    );
    assert_eq!(
        r.reply.evidence.volumes.len(),
        2,
        "the evidence is in the reply"
    );

    let s = setup(FakeCeph::default(), |_| killed());
    let r = s
        .engine
        .fence(&FenceRequest {
            dry_run: true,
            ..request()
        })
        .await;
    assert_eq!(r.reply.reason, "dry-run");
    assert!(
        !calls(&s.log)
            .iter()
            .any(|c| c.starts_with("add") || c.starts_with("kill")),
        "{:?}",
        calls(&s.log)
    );
}

#[tokio::test]
async fn missing_volume_and_unknown_host_deny() {
    let s = setup(FakeCeph::default(), |_| killed());
    let mut req = request();
    req.volumes.push("rbd/missing".parse().unwrap());
    assert_eq!(s.engine.fence(&req).await.reply.reason, "image-not-found");
    let r = s
        .engine
        .fence(&FenceRequest {
            failed_host: "nope".into(),
            ..request()
        })
        .await;
    assert_eq!(r.reply.reason, "unknown-host");
    let r = s
        .engine
        .fence(&FenceRequest {
            target_host: "h1".into(),
            ..request()
        })
        .await;
    assert_eq!(
        r.reply.reason, "unknown-host",
        "the target may not be the failed host"
    );
    assert!(
        !calls(&s.log)
            .iter()
            .any(|c| c.starts_with("add") || c.starts_with("kill"))
    );
}

#[tokio::test]
async fn an_unwritable_ledger_turns_an_approval_into_a_deny() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.jsonl");
    let mut s = setup(FakeCeph::default(), |_| killed());
    s.engine.ledger = Ledger::open(path.clone()).unwrap();
    let r = s.engine.fence(&request()).await;
    assert_eq!(r.reply.decision, "approve");
    assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
    // Reloads what was recorded.
    assert_eq!(
        Ledger::open(path.clone())
            .unwrap()
            .by_request_id("r-1")
            .await
            .unwrap()
            .unwrap()
            .reply
            .fence_id,
        r.reply.fence_id
    );

    std::fs::remove_file(&path).unwrap();
    std::fs::create_dir(&path).unwrap(); // a directory where the file should be: appends fail
    let r = s.engine.fence(&request()).await;
    assert_eq!(
        (r.reply.decision.as_str(), r.reply.reason.as_str()),
        ("deny", "ledger-failed")
    );
}

#[tokio::test]
async fn many_vms_of_one_host_share_one_storage_fence_and_one_ssh_session() {
    let s = setup(FakeCeph::default(), |_| killed());
    let reqs = requests_for_h1(
        &s,
        0,
        (0..20u32).map(|i| (format!("rbd/vm{i}"), format!("127.0.0.2:0/{}", 1000 + i))),
        true,
    );
    let records = futures::future::join_all(reqs.iter().map(|r| s.engine.fence(r))).await;
    for r in &records {
        assert_eq!(r.reply.outcome, "success-killed", "{}", r.reply.message);
    }
    let log = calls(&s.log);
    let exact_adds = log
        .iter()
        .filter(|c| c.starts_with("add 127.0.0.2:0/10"))
        .count();
    assert_eq!(exact_adds, 20, "each VM's own client: {log:?}");
    assert!(!log.contains(&"add 127.0.0.2:0/0".to_string()), "{log:?}");
    let confirmations = log.iter().filter(|c| *c == "wait-osdmap").count();
    assert_eq!(confirmations, 1, "one storage batch for the host: {log:?}");
    let kills: Vec<&String> = log.iter().filter(|c| c.starts_with("kill")).collect();
    assert_eq!(
        kills,
        vec!["kill via h3 to h1 x20"],
        "one SSH session for all 20 VMs"
    );
}

/// A rack failure's shape: the VMs of one host (one Ceph client holding all their disks) reach
/// the storage step in waves, while the host's first storage batch is still adding. Later
/// waves join the running batch that already adds their entry (a group commit), instead of
/// each wave adding it again; and every kill command of the host runs on its one SSH session,
/// one after another, instead of opening a session per wave.
#[tokio::test]
async fn waves_of_one_host_join_the_running_storage_batch_and_reuse_the_session() {
    let ceph = FakeCeph {
        add_delay: Some(Duration::from_millis(80)),
        ..Default::default()
    };
    let s = setup(ceph, |_| killed());
    let addr = "127.0.0.2:0/4242";
    let reqs = requests_for_h1(
        &s,
        100,
        (0..30u32).map(|i| (format!("rbd/wave{i}"), addr.to_string())),
        false,
    );
    // Three waves of ten: at 0 ms, 40 ms (the first batch is adding) and 400 ms (it is done).
    let records = futures::future::join_all(reqs.iter().enumerate().map(|(i, r)| {
        let engine = &s.engine;
        async move {
            let wave = [0u64, 40, 400][i / 10];
            tokio::time::sleep(Duration::from_millis(wave)).await;
            engine.fence(r).await
        }
    }))
    .await;
    for r in &records {
        assert_eq!(r.reply.outcome, "success-killed", "{}", r.reply.message);
    }
    let log = calls(&s.log);
    let adds = log.iter().filter(|c| *c == &format!("add {addr}")).count();
    assert_eq!(
        adds, 2,
        "waves 1 and 2 share one add, wave 3 adds again: {log:?}"
    );
    let connects = log.iter().filter(|c| c.starts_with("connect")).count();
    assert_eq!(connects, 1, "one SSH session for the host: {log:?}");
    let kills: Vec<&String> = log.iter().filter(|c| c.starts_with("kill")).collect();
    let killed: usize = kills
        .iter()
        .map(|k| k.rsplit('x').next().unwrap().parse::<usize>().unwrap())
        .sum();
    assert_eq!(killed, 30, "{kills:?}");
    assert!(kills.len() <= 3, "{kills:?}");
    assert!(
        !log.iter().any(|c| c.starts_with("close")),
        "the session stays open for the host's next batch: {log:?}"
    );
}

/// Many VMs of one host, each with its own client, whose evidence comes back at different
/// times (half of them 40 ms later): the host's storage batch waits for the fences still
/// gathering evidence, so all their entries share one confirmation, and their kills one batch.
#[tokio::test]
async fn a_storage_batch_waits_for_the_hosts_fences_still_gathering_evidence() {
    let ceph = FakeCeph {
        slow_status: Some(Duration::from_millis(40)),
        ..Default::default()
    };
    let s = setup(ceph, |_| killed());
    let reqs = requests_for_h1(
        &s,
        200,
        (0..20u32).map(|i| {
            let image = if i % 2 == 0 { "fast" } else { "slow" };
            (
                format!("rbd/{image}{i}"),
                format!("127.0.0.2:0/{}", 2000 + i),
            )
        }),
        false,
    );
    let records = futures::future::join_all(reqs.iter().map(|r| s.engine.fence(r))).await;
    for r in &records {
        assert_eq!(r.reply.outcome, "success-killed", "{}", r.reply.message);
    }
    let log = calls(&s.log);
    let confirmations = log.iter().filter(|c| *c == "wait-osdmap").count();
    assert_eq!(confirmations, 1, "one storage batch for the host: {log:?}");
    let kills: Vec<&String> = log.iter().filter(|c| c.starts_with("kill")).collect();
    assert_eq!(kills, vec!["kill via h3 to h1 x20"], "{log:?}");
}

#[tokio::test]
async fn a_missing_ceph_conf_is_ceph_unavailable_not_image_not_found() {
    let s = setup(
        FakeCeph {
            disconnected: true,
            ..Default::default()
        },
        |_| killed(),
    );
    let r = s.engine.fence(&request()).await;
    assert_eq!(
        (r.reply.decision.as_str(), r.reply.reason.as_str()),
        ("deny", "ceph-unavailable"),
        "{}",
        r.reply.message
    );
}

/// A rack failed: four siblings are black holes (their sshd never answers; each would take the
/// whole connect timeout), one sibling works. The walk does not spend the SSH budget on dead
/// siblings one after another: the working one kills within the SSH timeout (REVIEW-SAFETY M4).
#[tokio::test]
async fn dead_siblings_do_not_use_up_the_ssh_budget() {
    let ceph = FakeCeph::default();
    let log = ceph.log.clone();
    ceph.status.lock().unwrap().push((
        "rbd/root".into(),
        ImageStatus {
            watchers: vec![],
            lock_owners: vec![LockOwner {
                mode: LockMode::Exclusive,
                address: "127.0.0.2:0/99".into(),
            }],
        },
    ));
    let mut hosts = vec![host("h1", "127.0.0.2"), host("h2", "127.0.0.3")];
    for (i, name) in ["s1", "s2", "s3", "s4", "s5"].iter().enumerate() {
        hosts.push(host(name, &format!("127.0.0.{}", 10 + i)));
    }
    let engine = Engine::new(
        ceph,
        FakeKiller {
            log: log.clone(),
            answer: Arc::new(|route| match route {
                "via s5 to h1" | "via s5 to h1 x1" => killed(),
                r if r.starts_with("via s") => Err(timeout(&r[4..6])),
                _ => Err(timeout("h1")),
            }),
            delay: Arc::new(|route| {
                if route.starts_with("via s") && !route.starts_with("via s5") {
                    Duration::from_secs(5)
                } else {
                    Duration::ZERO
                }
            }),
        },
        Inventory::new(hosts),
        FenceSettings {
            ssh_timeout: Duration::from_secs(2),
            deadline: Duration::from_secs(6),
            ..settings()
        },
        Ledger::in_memory(),
    );
    let started = Instant::now();
    let r = engine.fence(&request()).await;
    assert_eq!(r.reply.outcome, "success-killed", "{}", r.reply.message);
    let kill = r.reply.evidence.kill.unwrap();
    assert_eq!(
        (kill.executor.as_deref(), kill.role),
        (Some("s5"), ExecutorRole::Sibling)
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(
        !calls(&log).iter().any(|c| c.contains("via h2")),
        "the HA target is not used while a bystander works"
    );
}
