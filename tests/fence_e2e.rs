//! The fence engine end to end, through `rbdfence fence`: the real micro Ceph cluster, real
//! qemu VMs whose RBD disks are opened from the failed host's own address, and real OpenSSH
//! sshds for the failed host and a sibling. Named e2e_* so nextest runs them one at a time.
//!
//! Loopback addresses used: 127.0.0.61 – 127.0.0.75.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::sshd::write_known_hosts_with_wrong_key;
use common::stack::{Stack, new_uuid};
use common::vm::{Vm, image_byte};
use common::{BlocklistGuard, Holder, TestImage, admin};

async fn listed(entry: &str) -> bool {
    admin()
        .await
        .blocklist_ls()
        .await
        .unwrap()
        .iter()
        .any(|i| i.entry == entry)
}

async fn wait_no_watchers(img: &TestImage) {
    common::no_watchers(
        "the frozen VM's watch expires",
        img,
        Duration::from_secs(40),
    )
    .await;
}

/// The race ZStack's watcher check loses: the VM is frozen until its watch expires, the
/// watchers are empty — but the lock owner says who wrote last, and the fence goes on.
#[tokio::test]
async fn e2e_empty_watcher_race_is_fenced_and_killed_through_a_sibling() {
    let stack = Stack::new(61);
    let img = TestImage::create("e2e-race");
    let uuid = new_uuid();
    let vm = Vm::start(&img, "127.0.0.61", &uuid);
    vm.write(0, 0xab);
    vm.freeze();
    wait_no_watchers(&img).await;
    let status = admin().await.image_status(&img.spec).await.unwrap();
    assert_eq!(
        status.lock_owners.len(),
        1,
        "the stale lock owner is the evidence"
    );

    let (code, reply) = stack.fence(&uuid, &[&img]);
    let _guard = BlocklistGuard::for_reply(&reply);
    assert_eq!(code, 0, "{reply:#}");
    assert_eq!(reply["decision"], "approve", "{reply:#}");
    assert_eq!(reply["outcome"], "success-killed");
    assert_eq!(reply["evidence"]["kill"]["executor"], "h3");
    assert_eq!(reply["evidence"]["kill"]["role"], "sibling");
    assert_eq!(reply["evidence"]["kill"]["qemu_found"], true);
    assert_eq!(
        reply["evidence"]["volumes"][0]["watchers"],
        serde_json::json!([])
    );
    assert!(
        reply["evidence"]["blocklist"]["osdmap_epoch"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert!(vm.wait_gone(Duration::from_secs(5)), "the qemu is gone");
    // The stale lock owner names the VM's client: it is fenced, not the whole host.
    assert_eq!(reply["evidence"]["blocklist"]["scope"], "vm", "{reply:#}");
    assert!(
        listed(&status.lock_owners[0].address).await,
        "the blocklist entry is present"
    );
    assert!(
        !listed("127.0.0.61:0/0").await,
        "the host is not fenced whole"
    );
    assert!(
        stack.ledger().contains(reply["fence_id"].as_str().unwrap()),
        "recorded in the ledger"
    );
}

/// The failed host hangs (its sshd frozen): no SSH proof, but the storage fence holds — and
/// when the frozen VM comes back, its writes do not reach the image.
#[tokio::test]
async fn e2e_ssh_unreachable_is_approved_only_because_the_blocklist_holds() {
    let stack = Stack::new(64);
    stack.failed_sshd.as_ref().unwrap().freeze();
    let img = TestImage::create("e2e-unreach");
    let uuid = new_uuid();
    let vm = Vm::start(&img, "127.0.0.64", &uuid);
    vm.write(0, 0xab);
    vm.freeze();

    let (code, reply) = stack.fence(&uuid, &[&img]);
    let _guard = BlocklistGuard::for_reply(&reply);
    assert_eq!(code, 0, "{reply:#}");
    assert_eq!(
        (reply["decision"].as_str(), reply["outcome"].as_str()),
        (Some("approve"), Some("success-ssh-unreachable")),
        "{reply:#}"
    );
    assert_eq!(reply["evidence"]["kill"]["ssh_reachable"], false);
    assert_eq!(reply["evidence"]["blocklist"]["scope"], "vm", "{reply:#}");
    assert!(
        !listed("127.0.0.64:0/0").await,
        "the host is not fenced whole"
    );

    vm.thaw();
    assert!(vm.alive(), "nobody killed it: SSH never reached the host");
    vm.write(8192, 0xcd);
    assert_eq!(
        image_byte(&img, 0),
        0xab,
        "the write before the fence landed"
    );
    assert_eq!(
        image_byte(&img, 8192),
        0,
        "the write after the fence did not land"
    );
}

/// A watcher from another host (here the HA target itself): deny, and touch nothing.
#[tokio::test]
async fn e2e_a_watcher_elsewhere_denies_without_touching_anything() {
    let stack = Stack::new(67);
    let img = TestImage::create("e2e-elsewhere");
    let uuid = new_uuid();
    let vm = Vm::start(&img, "127.0.0.67", &uuid);
    let _other = Holder::start(&img, "127.0.0.68");
    let before = admin().await.blocklist_ls().await.unwrap();

    let (code, reply) = stack.fence(&uuid, &[&img]);
    let _guard = BlocklistGuard::for_reply(&reply);
    assert_eq!(code, 1);
    assert_eq!(
        (reply["decision"].as_str(), reply["reason"].as_str()),
        (Some("deny"), Some("active-elsewhere")),
        "{reply:#}"
    );
    assert_eq!(reply["outcome"], "failed");
    assert!(reply["evidence"]["blocklist"].is_null() && reply["evidence"]["kill"].is_null());
    assert_eq!(
        admin().await.blocklist_ls().await.unwrap(),
        before,
        "no blocklist entry added"
    );
    assert!(vm.alive(), "the VM was not killed");
}

/// The VM's qemu is already gone from the failed host.
#[tokio::test]
async fn e2e_a_vm_already_gone_is_success_already_dead() {
    let stack = Stack::new(70);
    let img = TestImage::create("e2e-gone");
    let uuid = new_uuid();
    let vm = Vm::start(&img, "127.0.0.70", &uuid);
    vm.write(0, 0x11);
    common::signal(vm.pid, libc::SIGKILL);
    assert!(vm.wait_gone(Duration::from_secs(5)));

    let (code, reply) = stack.fence(&uuid, &[&img]);
    let _guard = BlocklistGuard::for_reply(&reply);
    assert_eq!(code, 0, "{reply:#}");
    assert_eq!(reply["outcome"], "success-already-dead", "{reply:#}");
    assert_eq!(reply["evidence"]["kill"]["qemu_found"], false);
    assert_eq!(reply["evidence"]["kill"]["ssh_reachable"], true);
}

/// A wrong host key for the failed host is never "reachable": with the blocklist the answer
/// is success-ssh-unreachable and the VM is not touched; without the blocklist it is a deny.
#[tokio::test]
async fn e2e_a_wrong_host_key_is_never_reachable() {
    let mut stack = Stack::new(73);
    let failed = stack.failed_sshd.as_ref().unwrap();
    write_known_hosts_with_wrong_key(
        &stack.dir.path().join("known_hosts"),
        failed,
        &[&stack.sibling_sshd],
    );
    let img = TestImage::create("e2e-hostkey");
    let uuid = new_uuid();
    let vm = Vm::start(&img, "127.0.0.73", &uuid);
    vm.write(0, 0x22);

    let (code, reply) = stack.fence(&uuid, &[&img]);
    let guard = BlocklistGuard::for_reply(&reply);
    assert_eq!(code, 0, "{reply:#}");
    assert_eq!(reply["outcome"], "success-ssh-unreachable", "{reply:#}");
    assert_eq!(reply["evidence"]["kill"]["ssh_reachable"], false);
    let err = reply["evidence"]["kill"]["error"]
        .as_str()
        .unwrap_or_default();
    assert!(
        err.contains("h1") && err.to_lowercase().contains("key"),
        "{err}"
    );
    assert!(
        vm.alive(),
        "a host with a wrong key was not trusted to run the kill"
    );
    drop(guard);

    // Without a working blocklist: a Ceph user that may read images but not blocklist.
    let _user = stack.use_user_without_blocklist();
    let (code, reply) = stack.fence(&uuid, &[&img]);
    let _guard = BlocklistGuard::for_reply(&reply);
    assert_eq!(code, 1, "{reply:#}");
    assert_eq!(
        (reply["decision"].as_str(), reply["reason"].as_str()),
        (Some("deny"), Some("blocklist-failed")),
        "{reply:#}"
    );
    assert!(
        reply["message"].as_str().unwrap().contains("EACCES"),
        "{reply:#}"
    );
    assert!(vm.alive());
}
