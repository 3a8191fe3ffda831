//! The fence's scope, lasting entries and the trustworthy scan (CONTRACT.md revision 2, rules
//! 1–3), end to end through `rbdfence fence`: the real micro Ceph cluster, real qemu VMs and
//! real librados holders opened from the failed host's own address, real OpenSSH sshds.
//!
//! - A VM that crashed on a healthy host, or whose host hangs while the VM's clients are known,
//!   is fenced by its own clients' exact addresses (scope `vm`): a bystander VM of the same host
//!   keeps writing.
//! - Only when nothing less is provably enough is the whole host fenced (scope `host`).
//! - An entry that exists already but lapses too soon is never the proof.
//! - The SSH scan finds the VM's qemu whatever the launcher called it and wherever it put the
//!   uuid, and refuses to answer from a PID namespace that cannot see the host's processes.
//!
//! Named e2e_* so nextest runs them one at a time. Loopback addresses used: 127.0.0.131 –
//! 127.0.0.157.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::sshd::Sshd;
use common::stack::{Stack, new_uuid};
use common::vm::{Launch, Vm, image_byte};
use common::{BlocklistGuard, Holder, TestImage, admin};
use rbdfence::rbd::{BlocklistEntry, EntityAddr};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// The stack's configured `blocklist_expire_secs` (tests/common/stack.rs).
const EXPIRE_SECS: i64 = 600;

async fn wait_no_watchers(img: &TestImage) {
    common::no_watchers("the VM's watch expires", img, Duration::from_secs(40)).await;
}

/// The entries of a reply's storage fence, and its scope.
fn fence_of(reply: &serde_json::Value) -> (String, Vec<String>) {
    let b = &reply["evidence"]["blocklist"];
    let entries = b["entries"]
        .as_array()
        .map(|a| a.iter().map(|e| e.as_str().unwrap().to_string()).collect())
        .unwrap_or_default();
    (
        b["scope"].as_str().unwrap_or("<no scope>").to_string(),
        entries,
    )
}

/// The latest expiry among the listed entries that fence `client`, if any fences it.
async fn fenced_until(client: &str) -> Option<OffsetDateTime> {
    let client: EntityAddr = client.parse().unwrap();
    admin()
        .await
        .blocklist_ls()
        .await
        .unwrap()
        .iter()
        .filter(|i| {
            i.entry
                .parse::<BlocklistEntry>()
                .is_ok_and(|e| e.fences(&client))
        })
        .map(|i| OffsetDateTime::parse(&i.until, &Rfc3339).unwrap())
        .max()
}

async fn whole_host_listed(ip: &str) -> bool {
    fenced_until(&format!("{ip}:0/4242")).await.is_some()
}

/// A VM crashed on a host that is fine: its lock owner names its one client. The fence is
/// that exact client; the host's other VMs keep their storage.
#[tokio::test]
async fn e2e_a_vm_crashed_on_a_healthy_host_costs_its_bystanders_nothing() {
    let stack = Stack::new(131);
    let img = TestImage::create("scope-crash");
    let other = TestImage::create("scope-bystander");
    let uuid = new_uuid();
    let vm = Vm::start(&img, "127.0.0.131", &uuid);
    vm.write(0, 0xab);
    let mut bystander = Holder::start(&other, "127.0.0.131");
    bystander.write(0, 1).unwrap();
    common::signal(vm.pid, libc::SIGKILL);
    assert!(vm.wait_gone(Duration::from_secs(5)));
    let owner = admin()
        .await
        .image_status(&img.spec)
        .await
        .unwrap()
        .lock_owners;
    assert_eq!(owner.len(), 1, "the crashed VM's lock owner is left");

    let (code, reply) = stack.fence(&uuid, &[&img]);
    let _guard = BlocklistGuard::for_reply(&reply);
    assert_eq!(code, 0, "{reply:#}");
    assert_eq!(
        bystander.write(4096, 2),
        Ok(()),
        "the bystander VM of the same host keeps writing: {reply:#}"
    );
    assert!(
        !whole_host_listed("127.0.0.131").await,
        "the host is not fenced whole"
    );
    assert_eq!(reply["outcome"], "success-already-dead", "{reply:#}");
    let (scope, entries) = fence_of(&reply);
    assert_eq!(scope, "vm", "{reply:#}");
    assert!(entries.contains(&owner[0].address), "{reply:#}");
}

/// The same, for a VM that never wrote: no lock owner, and its watch is gone. No evidence names
/// a client, the scan over a verified session finds no qemu: approve with nothing to fence.
#[tokio::test]
async fn e2e_a_vm_crashed_without_a_lock_owner_is_approved_without_any_fence() {
    let stack = Stack::new(134);
    let img = TestImage::create("scope-crash-nolock");
    let other = TestImage::create("scope-bystander");
    let uuid = new_uuid();
    let vm = Vm::start(&img, "127.0.0.134", &uuid);
    let mut bystander = Holder::start(&other, "127.0.0.134");
    common::signal(vm.pid, libc::SIGKILL);
    assert!(vm.wait_gone(Duration::from_secs(5)));
    wait_no_watchers(&img).await;

    let (code, reply) = stack.fence(&uuid, &[&img]);
    let _guard = BlocklistGuard::for_reply(&reply);
    assert_eq!(code, 0, "{reply:#}");
    assert_eq!(
        bystander.write(0, 3),
        Ok(()),
        "the bystander keeps writing: {reply:#}"
    );
    assert!(!whole_host_listed("127.0.0.134").await);
    assert_eq!(reply["outcome"], "success-already-dead", "{reply:#}");
    assert_eq!(fence_of(&reply), ("none".to_string(), vec![]), "{reply:#}");
}

/// The management path hangs (sshd frozen) and the VM is frozen with its lock owner left: the
/// VM's own client is fenced, its writes after it resumes do not land, and a bystander VM on
/// the same host keeps writing.
#[tokio::test]
async fn e2e_a_hung_host_with_a_known_client_gets_a_vm_fence() {
    let stack = Stack::new(137);
    stack.failed_sshd.as_ref().unwrap().freeze();
    let img = TestImage::create("scope-hung-vm");
    let other = TestImage::create("scope-bystander");
    let uuid = new_uuid();
    let vm = Vm::start(&img, "127.0.0.137", &uuid);
    vm.write(0, 0xab);
    vm.freeze();
    let mut bystander = Holder::start(&other, "127.0.0.137");
    wait_no_watchers(&img).await;

    let (code, reply) = stack.fence(&uuid, &[&img]);
    let _guard = BlocklistGuard::for_reply(&reply);
    assert_eq!(code, 0, "{reply:#}");
    assert_eq!(
        (reply["decision"].as_str(), reply["outcome"].as_str()),
        (Some("approve"), Some("success-ssh-unreachable")),
        "{reply:#}"
    );
    assert_eq!(
        bystander.write(0, 4),
        Ok(()),
        "the bystander keeps writing: {reply:#}"
    );
    assert!(!whole_host_listed("127.0.0.137").await);
    assert_eq!(fence_of(&reply).0, "vm", "{reply:#}");

    vm.thaw();
    vm.write(8192, 0xcd);
    assert_eq!(
        image_byte(&img, 0),
        0xab,
        "the write before the fence landed"
    );
    assert_eq!(
        image_byte(&img, 8192),
        0,
        "the write after the fence did not"
    );
}

/// The management path hangs and the VM never wrote (no lock owner, its watch expired): nothing
/// names its client, so only the whole host's fence is enough.
#[tokio::test]
async fn e2e_a_hung_host_with_no_known_client_gets_a_host_fence() {
    let stack = Stack::new(140);
    stack.failed_sshd.as_ref().unwrap().freeze();
    let img = TestImage::create("scope-hung-host");
    let uuid = new_uuid();
    let vm = Vm::start(&img, "127.0.0.140", &uuid);
    vm.freeze();
    wait_no_watchers(&img).await;

    let (code, reply) = stack.fence(&uuid, &[&img]);
    let _guard = BlocklistGuard::for_reply(&reply);
    assert_eq!(code, 0, "{reply:#}");
    assert_eq!(reply["outcome"], "success-ssh-unreachable", "{reply:#}");
    assert_eq!(
        fence_of(&reply),
        ("host".to_string(), vec!["127.0.0.140:0/0".to_string()]),
        "{reply:#}"
    );
    vm.thaw();
    vm.write(8192, 0xcd);
    assert_eq!(
        image_byte(&img, 8192),
        0,
        "the write after the fence did not land"
    );
}

/// An entry for the host exists already and lapses in 60 s; Ceph does not extend it when it is
/// added again. The approval must rest on an entry that lasts the configured expiry.
#[tokio::test]
async fn e2e_an_existing_short_lived_host_entry_is_not_the_proof() {
    let stack = Stack::new(143);
    stack.failed_sshd.as_ref().unwrap().freeze();
    let img = TestImage::create("scope-short");
    let uuid = new_uuid();
    let vm = Vm::start(&img, "127.0.0.143", &uuid);
    vm.freeze();
    wait_no_watchers(&img).await;
    let short = BlocklistGuard {
        entries: vec!["127.0.0.143:0/0".into()],
    };
    admin()
        .await
        .blocklist_add(
            "127.0.0.143".parse().unwrap(),
            Some(Duration::from_secs(60)),
        )
        .await
        .unwrap();

    let (code, reply) = stack.fence(&uuid, &[&img]);
    let _guard = BlocklistGuard::for_reply(&reply);
    assert_eq!(code, 0, "{reply:#}");
    let lasting = OffsetDateTime::now_utc() + time::Duration::seconds(EXPIRE_SECS - 60);
    let until = fenced_until("127.0.0.143:0/4242").await;
    drop(short);
    assert!(
        until.is_some_and(|u| u >= lasting),
        "the host's clients are fenced until {until:?}, not at least until {lasting}: {reply:#}"
    );
    assert_eq!(fence_of(&reply).0, "host", "{reply:#}");
    for e in reply["evidence"]["blocklist"]["expires"]
        .as_array()
        .unwrap()
    {
        let u = OffsetDateTime::parse(e["until"].as_str().unwrap(), &Rfc3339).unwrap();
        assert!(
            u >= lasting,
            "{e}: the reply names an entry that lapses soon"
        );
    }
}

/// The VM's own exact entry exists already with a short expiry (no distinct key can cover one
/// client instance), and the host does not answer: the fence falls back to the whole host,
/// with an entry that lasts.
#[tokio::test]
async fn e2e_an_existing_short_lived_vm_entry_falls_back_to_a_lasting_host_fence() {
    let stack = Stack::new(146);
    stack.failed_sshd.as_ref().unwrap().freeze();
    let img = TestImage::create("scope-short-vm");
    let uuid = new_uuid();
    let vm = Vm::start(&img, "127.0.0.146", &uuid);
    vm.write(0, 0xab);
    vm.freeze();
    wait_no_watchers(&img).await;
    let owner = admin()
        .await
        .image_status(&img.spec)
        .await
        .unwrap()
        .lock_owners;
    let exact: BlocklistEntry = owner[0].address.parse().unwrap();
    let _short = BlocklistGuard {
        entries: vec![exact.to_string()],
    };
    admin()
        .await
        .blocklist_add(exact, Some(Duration::from_secs(60)))
        .await
        .unwrap();

    let (code, reply) = stack.fence(&uuid, &[&img]);
    let _guard = BlocklistGuard::for_reply(&reply);
    assert_eq!(code, 0, "{reply:#}");
    let lasting = OffsetDateTime::now_utc() + time::Duration::seconds(EXPIRE_SECS - 60);
    let until = fenced_until(&owner[0].address).await;
    assert!(until.is_some_and(|u| u >= lasting), "{until:?}: {reply:#}");
    assert_eq!(fence_of(&reply).0, "host", "{reply:#}");
}

/// With a Ceph user that cannot blocklist, only the scan can approve. A VM with no evidence
/// (never wrote, watch expired) started by `launch` must be found by its uuid and killed:
/// never an "already dead" for a qemu that lives.
async fn scan_finds(base: u8, launch: Launch) {
    let mut stack = Stack::new(base);
    let _user = stack.use_user_without_blocklist();
    let img = TestImage::create("scan");
    let uuid = new_uuid();
    let ip = format!("127.0.0.{base}");
    let vm = Vm::start_as(&img, &ip, &uuid, launch);
    vm.freeze();
    wait_no_watchers(&img).await;

    let (code, reply) = stack.fence(&uuid, &[&img]);
    let _guard = BlocklistGuard::for_reply(&reply);
    assert!(
        !(code == 0 && vm.alive()),
        "{launch:?}: approved while the qemu lives: {reply:#}"
    );
    assert_eq!(
        reply["evidence"]["kill"]["qemu_found"], true,
        "{launch:?}: {reply:#}"
    );
    assert_eq!(reply["outcome"], "success-killed", "{launch:?}: {reply:#}");
    assert!(vm.wait_gone(Duration::from_secs(5)));
}

#[tokio::test]
async fn e2e_the_scan_finds_a_qemu_started_as_kvm() {
    scan_finds(149, Launch::KvmName).await;
}

#[tokio::test]
async fn e2e_the_scan_finds_a_qemu_with_the_uuid_only_in_smbios() {
    scan_finds(152, Launch::SmbiosOnly).await;
}

/// The failed host's sshd runs in a PID namespace of its own: a scan there cannot see the
/// host's qemu, so it proves nothing. Without a blocklist that is a deny, and the VM lives.
#[tokio::test]
async fn e2e_a_scan_from_another_pid_namespace_proves_nothing() {
    let mut stack = Stack::with_failed_sshd(155, Sshd::start_in_own_pid_namespace);
    let _user = stack.use_user_without_blocklist();
    let img = TestImage::create("scan-pidns");
    let uuid = new_uuid();
    let vm = Vm::start(&img, "127.0.0.155", &uuid);
    vm.freeze();
    wait_no_watchers(&img).await;

    let (code, reply) = stack.fence(&uuid, &[&img]);
    let _guard = BlocklistGuard::for_reply(&reply);
    assert_eq!(code, 1, "{reply:#}");
    assert_eq!(reply["decision"], "deny", "{reply:#}");
    assert!(vm.alive(), "the VM was not touched");
    let err = reply["evidence"]["kill"]["error"]
        .as_str()
        .unwrap_or_default();
    assert!(err.contains("namespace"), "{reply:#}");
}
