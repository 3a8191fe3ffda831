//! The fence lifecycle (CONTRACT rule 6) with `rbdfence serve` as a real process, the real
//! micro cluster, qemu and sshd: an unproven fence outlives its own entry's expiry (Ceph does
//! not extend an entry, so the lifecycle covers it with one that lasts, without a gap); when the
//! host answers again, the service kills the leftover qemu, lifts the entries it made, records
//! it, and a new client on that host can write. Named e2e_* so nextest runs it alone.
//!
//! Loopback addresses used: 127.0.0.183 – 127.0.0.185.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::stack::{ServeProcess, Stack, new_uuid};
use common::vm::Vm;
use common::{BlocklistGuard, Holder, TestImage, admin, unique};
use rbdfence::rbd::{BlocklistEntry, EntityAddr};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Every listed entry that fences `client`, with its expiry.
async fn fencing(client: &str) -> Vec<(String, OffsetDateTime)> {
    let client: EntityAddr = client.parse().unwrap();
    admin()
        .await
        .blocklist_ls()
        .await
        .unwrap()
        .into_iter()
        .filter(|i| {
            i.entry
                .parse::<BlocklistEntry>()
                .is_ok_and(|e| e.fences(&client))
        })
        .map(|i| (i.entry, OffsetDateTime::parse(&i.until, &Rfc3339).unwrap()))
        .collect()
}

async fn fence_view(http: &reqwest::Client, base: &str, id: &str) -> Value {
    http.get(format!("{base}/v1/fences/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_an_unproven_fence_outlives_its_expiry_and_is_lifted_once_the_host_proves_the_vm_gone()
{
    let mut stack = Stack::new(183);
    stack.ledger_namespace = Some(unique("rbdfence-test"));
    stack.expire_secs = 60;
    stack.fence_extra = "lifecycle_interval_secs = 1".into();
    stack.write_config("rbdfence", &common::cluster().conf.clone());
    let sshd = stack.failed_sshd.as_ref().unwrap();
    sshd.freeze();
    let img = TestImage::create("lifecycle");
    let uuid = new_uuid();
    let vm = Vm::start(&img, "127.0.0.183", &uuid);
    vm.freeze();
    common::no_watchers("the VM's watch expires", &img, Duration::from_secs(40)).await;

    let svc = ServeProcess::start(&stack.config);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(90))
        .build()
        .unwrap();
    let reply: Value = http
        .post(format!("{}/v1/pre-instantiate", svc.base))
        .json(
            &json!({"vm_uuid": uuid, "failed_host": "h1", "target_host": "h2",
                      "volumes": [img.name()]}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let approved = Instant::now();
    let _g = BlocklistGuard {
        entries: vec!["127.0.0.183:0/0".into(), "127.0.0.183/32".into()],
    };
    assert_eq!(reply["reason"], "ssh-unreachable", "{reply:#}");
    assert_eq!(reply["evidence"]["blocklist"]["scope"], "host", "{reply:#}");
    let id = reply["fence_id"].as_str().unwrap().to_string();

    // Past the entry's own expiry (60 s), the host still hung: still fenced, by an entry that
    // lasts, and the fence is still in force.
    tokio::time::sleep(Duration::from_secs(63).saturating_sub(approved.elapsed())).await;
    let now = OffsetDateTime::now_utc();
    let covering = fencing("127.0.0.183:0/1").await;
    assert!(
        covering
            .iter()
            .any(|(_, until)| *until > now + time::Duration::seconds(20)),
        "the VM's host is no longer fenced after the first entry's expiry: {covering:?}"
    );
    let view = fence_view(&http, &svc.base, &id).await;
    assert_eq!(view["state"]["in_force"], true, "{view:#}");
    assert!(!view["renewed"].as_array().unwrap().is_empty(), "{view:#}");

    // The service dies (SIGKILL) and another takes over: the gauges come from the ledger.
    svc.kill9();
    let svc = ServeProcess::start(&stack.config);
    // (The dead instance's lifecycle lease runs out within 10 s.)
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = http
            .get(format!("{}/metrics", svc.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let value = |name: &str| {
            text.lines()
                .find_map(|l| {
                    l.strip_prefix(name)
                        .and_then(|v| v.trim().parse::<f64>().ok())
                })
                .unwrap_or(0.0)
        };
        let seen = (
            value("rbdfence_fences_unproven "),
            value("rbdfence_fences_in_force "),
            value("rbdfence_lifecycle_leader "),
            value("rbdfence_blocklist_entries ") >= 1.0,
        );
        if seen == (1.0, 1.0, 1.0, true) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "gauges after a restart: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // The host answers again: the leftover qemu is killed, the entries lifted, it is recorded.
    sshd.thaw();
    let deadline = Instant::now() + Duration::from_secs(45);
    let view = loop {
        let view = fence_view(&http, &svc.base, &id).await;
        if view["state"]["in_force"] == false {
            break view;
        }
        assert!(Instant::now() < deadline, "never lifted: {view:#}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(view["state"]["trigger"], "auto", "{view:#}");
    assert!(
        vm.wait_gone(Duration::from_secs(5)),
        "the leftover qemu was killed"
    );
    assert!(
        fencing("127.0.0.183:0/1").await.is_empty(),
        "every entry the fence made is lifted"
    );
    let fresh = TestImage::create("lifecycle-after");
    let mut holder = Holder::start(&fresh, "127.0.0.183");
    assert_eq!(
        holder.write(0, 7),
        Ok(()),
        "a new client of the host writes again"
    );
}
