//! Unfence against the ledger in RADOS (REVIEW-SAFETY H1, M6): the guard outlives a restart,
//! only entries rbdfence made are lifted, a fence in flight is never undercut, and the unfence
//! is recorded with the fences it lifted. Real cluster, real sshd, the service in-process.
//! Named e2e_* so nextest runs them one at a time.
//!
//! Loopback addresses used: 127.0.0.174 – 127.0.0.179 and 127.0.0.186 – 127.0.0.188.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::running::Running;
use common::stack::{Stack, new_uuid};
use common::{BlocklistGuard, TestImage, admin, unique};
use serde_json::{Value, json};

async fn listed(entry: &str) -> bool {
    admin()
        .await
        .blocklist_ls()
        .await
        .unwrap()
        .iter()
        .any(|i| i.entry == entry)
}

fn rados_stack(base: u8) -> Stack {
    let mut stack = Stack::new(base);
    stack.ledger_namespace = Some(unique("rbdfence-test"));
    stack.write_config("rbdfence", &common::cluster().conf.clone());
    stack
}

/// A host fenced on the blocklist alone; the service restarts (another instance, the same
/// ledger): unfence still refuses without force. Forced, it lifts exactly the entries its
/// fences made — not an operator's entry on the same IP — and records that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_unfence_after_a_restart_refuses_then_lifts_only_its_own_entries() {
    let stack = rados_stack(174);
    stack.failed_sshd.as_ref().unwrap().freeze();
    let img = TestImage::create("unfence-restart");
    let first = Running::start(&stack).await;
    let body = json!({"vm_uuid": new_uuid(), "failed_host": "h1", "target_host": "h2",
                      "volumes": [img.name()]});
    let (status, reply) = first.post("/v1/pre-instantiate", &body).await;
    let _g = BlocklistGuard::for_reply(&reply);
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["reason"], "ssh-unreachable", "{reply:#}");
    assert!(listed("127.0.0.174:0/0").await);
    drop(first);

    // An entry rbdfence did not make, on the same host's IP.
    let foreign = BlocklistGuard {
        entries: vec!["127.0.0.174:0/777".into()],
    };
    admin()
        .await
        .blocklist_add("127.0.0.174:0/777".parse().unwrap(), None)
        .await
        .unwrap();

    let second = Running::start(&stack).await;
    let (status, refused) = second.post("/v1/hosts/h1/unfence", &json!({})).await;
    assert_eq!(status, 409, "{refused}");
    assert_eq!(refused["error"]["code"], "vms_not_confirmed_gone");
    assert!(listed("127.0.0.174:0/0").await, "still fenced");

    let (status, lifted) = second
        .post("/v1/hosts/h1/unfence", &json!({"force": true}))
        .await;
    assert_eq!(status, 200, "{lifted}");
    assert_eq!(lifted["lifted"], json!(["127.0.0.174:0/0"]));
    assert!(!listed("127.0.0.174:0/0").await);
    assert!(
        listed("127.0.0.174:0/777").await,
        "an entry rbdfence did not make is never lifted"
    );
    drop(foreign);
    let (_, fence) = second
        .get(&format!(
            "/v1/fences/{}",
            reply["fence_id"].as_str().unwrap()
        ))
        .await;
    let fence: Value = serde_json::from_str(&fence).unwrap();
    assert_eq!(fence["state"]["in_force"], false, "{fence:#}");
    assert_eq!(fence["state"]["trigger"], "forced", "{fence:#}");
    assert_eq!(
        fence["state"]["unfence_id"], lifted["unfence_id"],
        "{fence:#}"
    );
}

/// An unfence while a fence of the same host is in flight (between its storage fence and its
/// approval) would leave that approval resting on nothing: refused, even forced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_unfence_refuses_while_a_fence_of_the_host_is_in_flight() {
    let stack = rados_stack(177);
    stack.failed_sshd.as_ref().unwrap().freeze();
    let img = TestImage::create("unfence-inflight");
    let svc = Arc::new(Running::start(&stack).await);
    let body = json!({"vm_uuid": new_uuid(), "failed_host": "h1", "target_host": "h2",
                      "volumes": [img.name()]});
    let fencing = {
        let svc = svc.clone();
        tokio::spawn(async move { svc.post("/v1/pre-instantiate", &body).await })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (status, refused) = svc
        .post("/v1/hosts/h1/unfence", &json!({"force": true}))
        .await;
    let (_, reply) = fencing.await.unwrap();
    let _g = BlocklistGuard::for_reply(&reply);
    assert_eq!(status, 409, "{refused}");
    assert_eq!(refused["error"]["code"], "fence_in_flight", "{refused}");
    assert_eq!(reply["decision"], "approve", "{reply:#}");
    assert!(
        listed("127.0.0.177:0/0").await,
        "the approval's entry is in force"
    );
}

fn cli(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rbdfence"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The operator's CLI on the shared ledger: `fences ls`, `fences show ID`, and `unfence HOST`
/// (refused while the VM was never seen gone, then forced).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_the_cli_lists_shows_and_unfences_from_the_ledger() {
    let stack = rados_stack(186);
    stack.failed_sshd.as_ref().unwrap().freeze();
    let img = TestImage::create("unfence-cli");
    let svc = Running::start(&stack).await;
    let body = json!({"vm_uuid": new_uuid(), "failed_host": "h1", "target_host": "h2",
                      "volumes": [img.name()]});
    let (_, reply) = svc.post("/v1/pre-instantiate", &body).await;
    let _g = BlocklistGuard::for_reply(&reply);
    let id = reply["fence_id"].as_str().unwrap();
    let config = stack.config.to_str().unwrap();

    let (code, out, err) = cli(&["fences", "ls", "--config", config]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(id) && out.contains("in force"), "{out}");
    let (code, out, err) = cli(&["fences", "show", "--config", config, id]);
    assert_eq!(code, 0, "{err}");
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["state"]["in_force"], true, "{shown:#}");

    let (code, _, err) = cli(&["unfence", "--config", config, "h1"]);
    assert_eq!(code, 1);
    assert!(err.contains("never seen gone"), "{err}");
    assert!(listed("127.0.0.186:0/0").await);
    let (code, out, err) = cli(&["unfence", "--config", config, "h1", "--force"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("forced") && out.contains("127.0.0.186:0/0"),
        "{out}"
    );
    assert!(!listed("127.0.0.186:0/0").await);
    let (_, out, _) = cli(&["fences", "show", "--config", config, id]);
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["state"]["in_force"], false, "{shown:#}");
    assert_eq!(shown["state"]["trigger"], "forced", "{shown:#}");
}
