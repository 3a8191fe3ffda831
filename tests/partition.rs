//! The fault matrix, with each fault made the way it happens: hosts are network namespaces with
//! a management and a storage link (`common::netns`, `common::world`), a partition is a link set
//! down, and qemu runs inside its host, so its Ceph client really loses the cluster.
//!
//! Every case asserts the decision and its reason, that no stage outlived its bound and the
//! whole fence its deadline; where it approves, that the old VM's writes no longer land; and
//! where a VM of the failed host is no part of the fence, that it keeps writing.
//!
//! Each test builds its own world (its own micro cluster on 198.18.1.1, inside its own
//! namespaces), so they run side by side; named e2e_* so nextest runs them one at a time
//! with the other end-to-end tests.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use serde_json::Value;

use common::netns::Link;
use common::vm::Vm;
use common::world::{
    BLOCKLIST_TIMEOUT_MS, DEADLINE_MS, EVIDENCE_TIMEOUT_MS, OP_TIMEOUT_MS, SSH_TIMEOUT_MS,
    Settings, World,
};

/// The fence's recorded stage timings keep their bounds, and the whole fence its deadline.
fn assert_bounded(world: &World, reply: &Value) {
    let record = world.fence_record(reply["fence_id"].as_str().unwrap());
    let stages = record["stages_ms"].as_object().unwrap();
    for (stage, ms) in stages {
        let ms = ms.as_u64().unwrap();
        let bound = match stage.as_str() {
            "evidence" => EVIDENCE_TIMEOUT_MS,
            "blocklist" | "osdmap" => BLOCKLIST_TIMEOUT_MS,
            "ssh" => SSH_TIMEOUT_MS,
            _ => DEADLINE_MS,
        };
        assert!(ms <= bound, "stage {stage} took {ms} ms, bound {bound} ms");
    }
    let total = reply["duration_ms"].as_u64().unwrap();
    assert!(total <= DEADLINE_MS, "the fence took {total} ms");
}

/// The entries a reply says it blocklisted.
fn entries(reply: &Value) -> Vec<String> {
    reply["evidence"]["blocklist"]["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap().to_string())
        .collect()
}

/// A VM of h1 that wrote 0xab at 0 (it holds its image's lock) and, when asked for, a
/// bystander VM of the same host that wrote 0x11 at 0.
struct OnH1 {
    img: String,
    vm: Vm,
    other: String,
    bystander: Option<Vm>,
}

fn on_h1(world: &World, prefix: &str, bystander: bool) -> OnH1 {
    let img = world.image(prefix);
    let vm = world.vm(&world.h1, &img);
    vm.write(0, 0xab);
    let other = world.image("bystander");
    let bystander = bystander.then(|| {
        let b = world.vm(&world.h1, &other);
        b.write(0, 0x11);
        b
    });
    OnH1 {
        img,
        vm,
        other,
        bystander,
    }
}

/// `POST /v1/pre-instantiate` for `vm` (on `img`), which must answer 200: the reply, and
/// the time it took.
fn request(world: &World, vm: &Vm, img: &str) -> (Value, Duration) {
    let started = Instant::now();
    let (status, reply) = world.pre_instantiate(&vm.uuid, &[img]);
    let took = started.elapsed();
    assert_eq!(status, 200, "{reply:#}");
    (reply, took)
}

/// The old VM tries to write 0xcd over its 0xab: it must not land.
fn assert_old_vm_writes_nothing(world: &World, vm: &Vm, img: &str) {
    attempt_write(vm, 0, 0xcd, Duration::from_secs(20));
    assert_eq!(
        world.image_byte(img, 0),
        0xab,
        "the old VM's write did not land"
    );
}

/// `vm` writes 0x22 at 4096 of `img` (waiting up to 60 s for a network to come back), and it
/// lands.
fn assert_writes(world: &World, vm: &Vm, img: &str, what: &str) {
    attempt_write(vm, 4096, 0x22, Duration::from_secs(60));
    assert_eq!(world.image_byte(img, 4096), 0x22, "{what}");
}

/// Sets the mon's `paxos_propose_interval` at run time (seconds). Slowing it also makes a
/// commit now, so that the next one waits the whole interval.
fn propose_interval(world: &World, secs: &str) {
    world.cli(
        "ceph",
        &[
            "tell",
            "mon.a",
            "config",
            "set",
            "paxos_propose_interval",
            secs,
        ],
    );
    if secs != "0.1" {
        world.cli("ceph", &["osd", "pool", "set", "rbd", "pg_num_min", "1"]);
    }
}

/// Asserts the reply's decision and its outcome (approve) or reason (deny).
fn assert_decision(reply: &Value, decision: &str, outcome_or_reason: &str) {
    let key = if decision == "approve" {
        "outcome"
    } else {
        "reason"
    };
    assert_eq!(
        (reply["decision"].as_str(), reply[key].as_str()),
        (Some(decision), Some(outcome_or_reason)),
        "{reply:#}"
    );
}

/// Asks `vm` to write `byte` at `offset`; waits at most `within` for qemu's answer (a write
/// on a lost network hangs: qemu then does not answer, which is fine — what counts is what
/// reaches the image).
fn attempt_write(vm: &Vm, offset: u64, byte: u8, within: Duration) {
    let _ = vm.try_write(offset, byte, within);
}

/// h1's orphaned TCP sockets (closed by their process) on its storage address that may still
/// send data: `ss` lines, empty when there are none.
fn closed_sockets_holding_data(world: &World) -> Vec<String> {
    let storage = world.h1.storage.unwrap().to_string();
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &world.h1.ns, "ss", "-Htne"])
        .args([
            "state",
            "fin-wait-1",
            "state",
            "closing",
            "state",
            "last-ack",
        ])
        .args(["src", &storage])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.split_whitespace().any(|w| w == "ino:0"))
        .map(str::to_owned)
        .collect()
}

/// Asserts a VM fence of exactly the VM's own client on h1's storage address.
fn assert_vm_fence_of_h1_client(world: &World, reply: &Value) {
    assert_eq!(reply["evidence"]["blocklist"]["scope"], "vm", "{reply:#}");
    let h1 = world.h1.storage.unwrap().to_string();
    let fenced = entries(reply);
    assert!(!fenced.is_empty(), "{reply:#}");
    for e in &fenced {
        assert!(
            e.starts_with(&format!("{h1}:")) && !e.ends_with(":0/0"),
            "a VM fence names the VM's own client, not {e}: {reply:#}"
        );
    }
    let listed = world.blocklist();
    for e in &fenced {
        assert!(listed.contains(e), "{e} is in the osdmap: {listed:?}");
    }
    assert!(
        !listed
            .iter()
            .any(|l| l.starts_with(&format!("{h1}:0/0")) || l.starts_with(&format!("cidr:{h1}"))),
        "the host is not fenced whole: {listed:?}"
    );
}

/// ZStack's stuck case: the management network is down, storage is up, the VM runs. No SSH
/// can reach the host, but the evidence names the VM's own client: that client is fenced, the
/// VM's writes stop landing, and the host's other VM keeps writing.
#[test]
fn e2e_management_down_storage_up_fences_only_the_vm() {
    let world = World::new(Settings::default());
    let OnH1 {
        img,
        vm,
        other,
        bystander,
    } = on_h1(&world, "mgmt-down", true);
    let bystander = bystander.unwrap();

    world.set(&world.h1, Link::Mgmt, false);
    let (reply, took) = request(&world, &vm, &img);
    assert_decision(&reply, "approve", "success-ssh-unreachable");
    assert_eq!(reply["evidence"]["kill"]["ssh_reachable"], false);
    assert_vm_fence_of_h1_client(&world, &reply);
    assert_bounded(&world, &reply);
    eprintln!("management down, storage up: approve in {took:?}");

    assert!(vm.alive(), "nobody could kill it: SSH never reached h1");
    assert_old_vm_writes_nothing(&world, &vm, &img);
    assert_writes(
        &world,
        &bystander,
        &other,
        "the host's other VM keeps writing",
    );
}

/// The storage network is down, management up: the VM is alive but cut off from its disk. SSH
/// reaches it (through the sibling), kills it and proves it gone; its client is fenced too.
/// When storage comes back, the host's other VM writes again: its client was never fenced.
#[test]
fn e2e_storage_down_management_up_kills_the_vm() {
    let world = World::new(Settings::default());
    let OnH1 {
        img,
        vm,
        other,
        bystander,
    } = on_h1(&world, "stor-down", true);
    let bystander = bystander.unwrap();

    world.set(&world.h1, Link::Storage, false);
    let (reply, took) = request(&world, &vm, &img);
    assert_decision(&reply, "approve", "success-killed");
    assert_eq!(reply["evidence"]["kill"]["executor"], "h3", "{reply:#}");
    assert_eq!(reply["evidence"]["kill"]["qemu_found"], true);
    assert!(vm.wait_gone(Duration::from_secs(5)), "the qemu is gone");
    assert_vm_fence_of_h1_client(&world, &reply);
    assert_bounded(&world, &reply);
    eprintln!("storage down, management up: approve in {took:?}");

    world.set(&world.h1, Link::Storage, true);
    assert_eq!(world.image_byte(&img, 0), 0xab);
    // The bystander's client survived the partition; its write lands once storage is back.
    assert_writes(
        &world,
        &bystander,
        &other,
        "the host's other VM writes again",
    );
}

/// The storage network is down, management up, and nothing names the VM's client any more: its
/// image has no exclusive lock and the partitioned client's watch has expired. The scan decides:
/// it kills the qemu and proves it gone, and nothing is fenced. But the write the qemu issued
/// into the partition is still in its socket, which outlives the process: TCP retransmits it
/// at its backed-off pace. When the storage network comes back, that write must not land on
/// the image the new VM now owns.
#[test]
fn e2e_a_killed_vm_whose_client_no_evidence_names_leaves_no_write_on_the_way() {
    let world = World::new(Settings::default());
    let img = world.image_without_lock("unnamed");
    let vm = world.vm(&world.h1, &img);
    vm.write(0, 0xab);

    world.set(&world.h1, Link::Storage, false);
    // Issued into the partition: it cannot complete, and stays in the qemu's socket.
    attempt_write(&vm, 0, 0xcd, Duration::from_secs(2));
    world.wait_unwatched(&img, Duration::from_secs(60));

    let (reply, took) = request(&world, &vm, &img);
    assert_decision(&reply, "approve", "success-killed");
    assert_eq!(reply["evidence"]["kill"]["qemu_found"], true, "{reply:#}");
    assert_eq!(reply["evidence"]["blocklist"]["scope"], "none", "{reply:#}");
    assert!(vm.wait_gone(Duration::from_secs(5)), "the qemu is gone");
    assert_bounded(&world, &reply);
    eprintln!("storage down, no client named: approve in {took:?}");

    // Its unsent write is no longer on h1 either: no closed socket on h1's storage address
    // still holds data.
    assert_eq!(
        closed_sockets_holding_data(&world),
        Vec::<String>::new(),
        "the killed qemu's socket, with its write, is gone from h1"
    );

    world.set(&world.h1, Link::Storage, true);
    // TCP's retransmission backs off to seconds in a partition this long, and a closed
    // socket goes on retransmitting up to `tcp_orphan_retries` (8 by default).
    std::thread::sleep(Duration::from_secs(30));
    assert_eq!(
        world.image_byte(&img, 0),
        0xab,
        "the killed VM's write, left in its socket, never lands"
    );
}

/// A dead host (both links down): no SSH, the VM's client is fenced from the evidence alone.
/// Then the host comes back: the old VM's writes never land, the lifecycle finds its qemu over
/// SSH, stops it, and lifts the fence only a quiet period after the VM is proven gone — a
/// write the dead qemu left in its socket still arrives, at TCP's backed-off pace, and must
/// meet the blocklist — and the host's other VM, never fenced, writes again.
#[test]
fn e2e_dead_host_is_fenced_and_when_it_returns_its_vm_never_writes_and_is_stopped() {
    const QUIET: Duration = Duration::from_secs(20);
    let world = World::new(Settings {
        lifecycle_secs: 2,
        lift_quiet_secs: QUIET.as_secs(),
        ..Settings::default()
    });
    let OnH1 {
        img,
        vm,
        other,
        bystander,
    } = on_h1(&world, "dead-host", true);
    let bystander = bystander.unwrap();

    world.set(&world.h1, Link::Mgmt, false);
    world.set(&world.h1, Link::Storage, false);
    let (reply, took) = request(&world, &vm, &img);
    assert_decision(&reply, "approve", "success-ssh-unreachable");
    assert_vm_fence_of_h1_client(&world, &reply);
    assert_bounded(&world, &reply);
    eprintln!("both links down: approve in {took:?}");
    let fence_id = reply["fence_id"].as_str().unwrap().to_string();
    assert!(vm.alive(), "the old VM lives on in the partition");

    // The host returns. Its VM tries to write at once: it never lands.
    world.set(&world.h1, Link::Storage, true);
    world.set(&world.h1, Link::Mgmt, true);
    let healed = Instant::now();
    assert_old_vm_writes_nothing(&world, &vm, &img);

    // The lifecycle stops it and lifts the fence once it is proven gone.
    assert!(
        vm.wait_gone(Duration::from_secs(60)),
        "the lifecycle stopped the old VM"
    );
    let stopped = healed.elapsed();
    let gone = Instant::now();
    // Once the lifecycle has recorded it gone, its closed sockets are gone from h1 too: what
    // the qemu left in them can no longer arrive.
    while world.fence_record(&fence_id)["gone_at"].is_null() {
        assert!(
            gone.elapsed() < Duration::from_secs(10),
            "gone_at is recorded"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(closed_sockets_holding_data(&world), Vec::<String>::new());
    world.wait_lifted(&fence_id, Duration::from_secs(60));
    assert!(
        gone.elapsed() + Duration::from_secs(1) >= QUIET,
        "lifted {:?} after the VM was gone, before the quiet period",
        gone.elapsed()
    );
    let fenced = entries(&reply);
    let listed = world.blocklist();
    assert!(
        fenced.iter().all(|e| !listed.contains(e)),
        "its entries are lifted: {listed:?}"
    );
    eprintln!("healed: old VM stopped {stopped:?} after, fence lifted");
    // What the dead qemu left in its sockets is the kernel's to deliver: TCP retransmits it
    // after the heal, at its backed-off pace, even after the process is gone. It never lands.
    std::thread::sleep(Duration::from_secs(10));
    assert_eq!(world.image_byte(&img, 0), 0xab, "and never wrote");

    assert_writes(
        &world,
        &bystander,
        &other,
        "the host's other VM writes again",
    );
}

/// The failed host's sshd hangs (stopped, not refusing): TCP connects, no banner ever comes.
/// That is no proof of death; the VM's own client is fenced, and the host's other VM writes on.
#[test]
fn e2e_hung_sshd_is_no_proof_the_vm_fence_holds() {
    let world = World::new(Settings::default());
    let OnH1 {
        img,
        vm,
        other,
        bystander,
    } = on_h1(&world, "sshd-hung", true);
    let bystander = bystander.unwrap();

    world.h1_sshd.freeze();
    let started = Instant::now();
    let (status, reply) = world.pre_instantiate(&vm.uuid, &[&img]);
    let took = started.elapsed();
    world.h1_sshd.thaw();
    assert_eq!(status, 200, "{reply:#}");
    assert_decision(&reply, "approve", "success-ssh-unreachable");
    assert_vm_fence_of_h1_client(&world, &reply);
    assert_bounded(&world, &reply);
    eprintln!("sshd hung: approve in {took:?}");
    assert!(vm.alive());
    assert_old_vm_writes_nothing(&world, &vm, &img);
    bystander.write(4096, 0x22);
    assert_eq!(world.image_byte(&other, 4096), 0x22);
}

/// The cluster itself fails under a fence. The OSD stopped: the evidence cannot be read, so
/// `deny` and nothing is done. The mon stopped: no blocklist entry can be committed, so `deny`
/// `blocklist-failed`, even though SSH could reach the host. Each within its stage's bound;
/// and once the mon answers again, a retry is approved and the VM's writes stop landing.
#[test]
fn e2e_osd_or_mon_stopped_mid_fence_is_deny_and_a_retry_succeeds() {
    let world = World::new(Settings::default());
    let OnH1 { img, vm, .. } = on_h1(&world, "cluster-faults", false);
    let before = world.blocklist();

    let osd = world.cluster.daemon_pid("osd.0").unwrap();
    common::signal(osd, libc::SIGSTOP);
    let started = Instant::now();
    let (status, reply) = world.pre_instantiate(&vm.uuid, &[&img]);
    let took = started.elapsed();
    common::signal(osd, libc::SIGCONT);
    assert_eq!(status, 200, "{reply:#}");
    assert_eq!(reply["decision"], "deny", "{reply:#}");
    assert_eq!(reply["outcome"], "failed", "{reply:#}");
    eprintln!("OSD stopped: deny {} in {took:?}", reply["reason"]);
    // The reply's duration is the time to the decision: all of it but recording the deny
    // (one RADOS write, which fails here after the op timeout).
    let ms = u128::from(reply["duration_ms"].as_u64().unwrap());
    assert!(
        ms + u128::from(OP_TIMEOUT_MS) + 1000 >= took.as_millis() && ms <= took.as_millis(),
        "the reply tells the time the deny took: {ms} ms of {took:?}"
    );
    assert!(vm.alive(), "a deny does nothing");
    assert_eq!(world.blocklist(), before, "a deny blocklists nothing");

    let mon = world.cluster.daemon_pid("mon.a").unwrap();
    common::signal(mon, libc::SIGSTOP);
    let started = Instant::now();
    let (status, reply) = world.pre_instantiate(&vm.uuid, &[&img]);
    let took = started.elapsed();
    common::signal(mon, libc::SIGCONT);
    assert_eq!(status, 200, "{reply:#}");
    assert_decision(&reply, "deny", "blocklist-failed");
    assert!(
        took < Duration::from_millis(BLOCKLIST_TIMEOUT_MS + SSH_TIMEOUT_MS),
        "{took:?}"
    );
    eprintln!("mon stopped: deny blocklist-failed in {took:?}");

    let (reply, took) = request(&world, &vm, &img);
    assert_eq!(reply["decision"], "approve", "{reply:#}");
    assert_bounded(&world, &reply);
    eprintln!("mon back: retry {} in {took:?}", reply["outcome"]);
    assert_old_vm_writes_nothing(&world, &vm, &img);
}

/// ZStack's stuck case at scale: fifty VMs of a host whose management network is down, asked
/// for all at once — twice each (with and without a request id) — plus fifty duplicates of one
/// request: 150 requests. Each VM gets its own VM fence (its own client, the host never whole),
/// every duplicate shares its VM's fence, and the monitors see a bounded number of commands.
#[test]
fn e2e_fifty_duplicates_and_a_hundred_requests_for_a_partitioned_host() {
    const VMS: usize = 50;
    let world = World::new(Settings::default());
    let images: Vec<String> = (0..VMS).map(|i| world.image(&format!("many{i}"))).collect();
    let vms: Vec<Vm> = images.iter().map(|img| world.vm(&world.h1, img)).collect();
    for vm in &vms {
        vm.write(0, 0xab);
    }
    let adds_before = world.metric("rbdfence_ceph_calls_total{op=\"blocklist_add\",result=\"ok\"}");
    world.set(&world.h1, Link::Mgmt, false);

    let body = |i: usize, id: Option<String>| {
        let mut b = serde_json::json!({
            "vm_uuid": vms[i].uuid, "failed_host": "h1", "target_host": "h2",
            "volumes": [images[i]],
        });
        if let Some(id) = id {
            b["request_id"] = id.into();
        }
        b
    };
    let mut requests: Vec<(usize, Value)> = Vec::new();
    for i in 0..VMS {
        requests.push((i, body(i, None)));
        requests.push((i, body(i, Some(format!("many-{i}")))));
    }
    for _ in 0..50 {
        requests.push((0, body(0, None)));
    }
    let started = Instant::now();
    let replies: Vec<(usize, Value, Duration)> = std::thread::scope(|s| {
        let handles: Vec<_> = requests
            .iter()
            .map(|(i, b)| {
                let world = &world;
                s.spawn(move || {
                    let (status, reply) = world.http("POST", "/v1/pre-instantiate", Some(b));
                    assert_eq!(status, 200, "{reply:#}");
                    (*i, reply, started.elapsed())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let slowest = replies.iter().map(|r| r.2).max().unwrap();
    let mut fence_of_vm: Vec<Option<String>> = vec![None; VMS];
    let mut fences = std::collections::BTreeSet::new();
    for (i, reply, _) in &replies {
        assert_eq!(
            (reply["decision"].as_str(), reply["outcome"].as_str()),
            (Some("approve"), Some("success-ssh-unreachable")),
            "{reply:#}"
        );
        assert_vm_fence_of_h1_client(&world, reply);
        let id = reply["fence_id"].as_str().unwrap().to_string();
        fences.insert(id.clone());
        match &fence_of_vm[*i] {
            None => fence_of_vm[*i] = Some(id),
            Some(first) => assert_eq!(first, &id, "VM {i}: one fence answers all its requests"),
        }
    }
    assert_eq!(fences.len(), VMS, "one fence per VM");
    for (_, reply, _) in replies.iter().take(2 * VMS).step_by(2) {
        assert_bounded(&world, reply);
    }
    let adds =
        world.metric("rbdfence_ceph_calls_total{op=\"blocklist_add\",result=\"ok\"}") - adds_before;
    let peak = world.metric("rbdfence_ceph_calls_in_flight_peak{op=\"blocklist_add\"}");
    let entries = world.blocklist();
    assert_eq!(entries.len(), VMS, "exactly the fifty clients: {entries:?}");
    eprintln!(
        "{} requests, {VMS} VMs, management down: all approved in {slowest:?}; \
         {adds} blocklist commands, at most {peak} at once",
        replies.len()
    );
    assert!(
        adds <= VMS as f64,
        "{adds} blocklist commands for {VMS} clients"
    );
    for i in [0, VMS / 2, VMS - 1] {
        attempt_write(&vms[i], 0, 0xcd, Duration::from_secs(20));
        assert_eq!(
            world.image_byte(&images[i], 0),
            0xab,
            "VM {i}'s write did not land"
        );
    }
}

/// The monitors commit slowly (a busy mon: `paxos_propose_interval` 8 s, twice the blocklist
/// bound) while the management network is down: the VM's fence is not confirmed in time, so
/// `deny` `blocklist-failed` — and never widened to the host, whose entry the same monitors
/// would commit late, cutting every VM of the host off its storage under a deny. What the slow
/// monitors commit after the deny is taken back; the host's other VM writes throughout; once
/// commits are quick again a retry is approved.
#[test]
fn e2e_slow_mon_commits_deny_and_leave_no_fence_behind() {
    let world = World::new(Settings::default());
    let OnH1 {
        img,
        vm,
        other,
        bystander,
    } = on_h1(&world, "slow-mon", true);
    let bystander = bystander.unwrap();
    world.set(&world.h1, Link::Mgmt, false);
    propose_interval(&world, "8");

    let (reply, took) = request(&world, &vm, &img);
    assert_decision(&reply, "deny", "blocklist-failed");
    assert_eq!(reply["evidence"]["blocklist"]["scope"], "vm", "{reply:#}");
    eprintln!("slow mon commits: deny blocklist-failed in {took:?}");
    // The slow monitors commit the timed-out add a few seconds later; the host's whole-IP
    // entry never lands.
    let host_entry = format!("{}:0/0", world.h1.storage.unwrap());
    let watch = Instant::now();
    let mut landed = Vec::new();
    while watch.elapsed() < Duration::from_secs(12) {
        for e in world.blocklist() {
            assert_ne!(e, host_entry, "a denied fence cut the whole host off");
            if !landed.contains(&e) {
                eprintln!(
                    "after the deny, {:?}: {e} is in the osdmap",
                    watch.elapsed()
                );
                landed.push(e);
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    propose_interval(&world, "0.1");
    // Whatever the slow monitors committed for the denied fence is taken back.
    world.wait_blocklist_empty(
        "a denied fence's entries are taken back",
        Duration::from_secs(60),
    );
    eprintln!(
        "the denied fence's entries gone {:?} after the deny",
        watch.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while world.metric("rbdfence_unfences_total{trigger=\"take-back\"}") < 1.0 {
        assert!(Instant::now() < deadline, "the take-back is recorded");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_writes(
        &world,
        &bystander,
        &other,
        "the host's other VM writes throughout",
    );

    let (status, reply) = world.pre_instantiate(&vm.uuid, &[&img]);
    assert_eq!(status, 200, "{reply:#}");
    assert_eq!(reply["decision"], "approve", "{reply:#}");
    assert_eq!(reply["evidence"]["blocklist"]["scope"], "vm", "{reply:#}");
    assert_bounded(&world, &reply);
}

/// Threads of a process in uninterruptible sleep (state D).
fn threads_in_d(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("stat")).is_ok_and(|s| {
                        s.rsplit_once(')')
                            .and_then(|(_, r)| r.split_whitespace().next())
                            == Some("D")
                    })
                })
                .count()
        })
        .unwrap_or(0)
}

/// A qemu stuck in uninterruptible I/O (a read of a second drive on a FUSE filesystem that
/// never answers): SIGKILL cannot end it, so the scan never calls it gone. The approval rests
/// on the VM fence alone — its own client, never the host — and its outcome says the kill
/// failed.
#[test]
fn e2e_a_qemu_stuck_in_uninterruptible_io_is_never_called_gone() {
    let world = World::new(Settings::default());
    let hang = common::HangFs::mount();
    let img = world.image("d-state");
    let drive = format!("file={},format=raw,if=none,id=stuck", hang.disk().display());
    let vm = world.vm_with(&world.h1, &img, &["-drive".into(), drive]);
    vm.write(0, 0xab);
    // A read of the hanging drive; qemu never answers it.
    let _ = vm.try_hmp("qemu-io stuck \"read 0 4k\"", Duration::from_secs(1));

    let (reply, took) = request(&world, &vm, &img);
    eprintln!(
        "qemu in D state: {} {} in {took:?}",
        reply["decision"], reply["outcome"]
    );
    assert_eq!(reply["decision"], "approve", "{reply:#}");
    assert_eq!(reply["reason"], "storage-fenced", "{reply:#}");
    assert_eq!(
        reply["outcome"], "failed",
        "the kill failed, and the reply says so"
    );
    assert_eq!(reply["evidence"]["kill"]["qemu_found"], true, "{reply:#}");
    assert_eq!(reply["evidence"]["kill"]["killed"], true, "{reply:#}");
    assert_vm_fence_of_h1_client(&world, &reply);
    assert_bounded(&world, &reply);
    assert!(
        threads_in_d(vm.pid) > 0,
        "the qemu lives on in uninterruptible sleep after SIGKILL"
    );
    drop(hang);
    assert!(
        vm.wait_gone(Duration::from_secs(10)),
        "once its I/O fails, the SIGKILL ends it"
    );
    assert_eq!(world.image_byte(&img, 0), 0xab);
}

/// As the slow-commits case, but the service is SIGKILLed right after its deny, before it
/// takes anything back: the late add lands; the restarted service's lifecycle finds the deny
/// owed a take-back in the ledger and takes it back.
#[test]
fn e2e_a_deny_left_by_a_killed_service_is_taken_back_after_its_restart() {
    let mut world = World::new(Settings {
        lifecycle_secs: 2,
        ..Settings::default()
    });
    let OnH1 { img, vm, .. } = on_h1(&world, "slow-mon-restart", false);
    world.set(&world.h1, Link::Mgmt, false);
    propose_interval(&world, "8");
    let (status, reply) = world.pre_instantiate(&vm.uuid, &[&img]);
    assert_eq!(status, 200, "{reply:#}");
    assert_eq!(reply["reason"], "blocklist-failed", "{reply:#}");
    world.service = None; // SIGKILL, before its take-back's first round
    let landed = Instant::now();
    let entry = loop {
        if let Some(e) = world.blocklist().into_iter().next() {
            break e;
        }
        assert!(
            landed.elapsed() < Duration::from_secs(30),
            "the slow mon commits the timed-out add"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    eprintln!(
        "the late add landed {:?} after the deny: {entry}",
        landed.elapsed()
    );
    propose_interval(&world, "0.1");
    world.restart_service();
    let restarted = Instant::now();
    world.wait_blocklist_empty(
        "the restarted service takes the deny's entry back",
        Duration::from_secs(60),
    );
    eprintln!("taken back {:?} after the restart", restarted.elapsed());
}
