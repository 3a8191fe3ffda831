//! The fence ledger in RADOS, against the real micro cluster and `rbdfence serve` as a real
//! process: a decision and every `request_id` that got it (its own, or one that joined its
//! fence) outlive a SIGKILL of the service, and another instance answers them without acting
//! again; two instances given the same request fence once, under the host's lease. Named e2e_* so nextest runs them one at a time.
//!
//! Loopback addresses used: 127.0.0.171 – 127.0.0.173, 127.0.0.180 – 127.0.0.182 and
//! 127.0.0.189 – 127.0.0.191.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::stack::{ServeProcess, Stack, new_uuid};
use common::{BlocklistGuard, TestImage, unique};
use serde_json::{Value, json};

async fn post(http: &reqwest::Client, base: &str, body: &Value) -> Value {
    let resp = http
        .post(format!("{base}/v1/pre-instantiate"))
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

async fn get(http: &reqwest::Client, url: String) -> (u16, String) {
    let resp = http.get(url).send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

async fn metric(http: &reqwest::Client, base: &str, name: &str) -> f64 {
    let (_, text) = get(http, format!("{base}/metrics")).await;
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_decisions_and_request_ids_outlive_a_sigkill_of_the_service() {
    let mut stack = Stack::new(171);
    stack.ledger_namespace = Some(unique("rbdfence-test"));
    stack.write_config("rbdfence", &common::cluster().conf.clone());
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let img = TestImage::create("ledger-kill9");
    let first = ServeProcess::start(&stack.config);
    // One request with its own id, and two identical ones that share one fence.
    let own = json!({"request_id": "r-own", "vm_uuid": new_uuid(), "failed_host": "h1",
                     "target_host": "h2", "volumes": [img.name()]});
    let answer = post(&http, &first.base, &own).await;
    let _g1 = BlocklistGuard::for_reply(&answer);
    assert_eq!(answer["decision"], "approve", "{answer:#}");
    let vm = new_uuid();
    let mut a = json!({"vm_uuid": vm, "failed_host": "h1", "target_host": "h2",
                       "volumes": [img.name()]});
    let mut b = a.clone();
    a["request_id"] = json!("r-a");
    b["request_id"] = json!("r-joined");
    let (ra, rb) = tokio::join!(post(&http, &first.base, &a), post(&http, &first.base, &b));
    let _g2 = BlocklistGuard::for_reply(&ra);
    assert_eq!(ra["fence_id"], rb["fence_id"], "one fence for both");

    first.kill9();
    let second = ServeProcess::start(&stack.config);
    for (body, want) in [(&own, &answer), (&b, &ra)] {
        let again = post(&http, &second.base, body).await;
        assert_eq!(again["fence_id"], want["fence_id"], "{again:#}");
        assert_eq!(again["decision"], want["decision"]);
    }
    assert_eq!(
        metric(
            &http,
            &second.base,
            "rbdfence_ssh_sessions_total{result=\"ok\"}"
        )
        .await,
        0.0,
        "the replays touched nothing"
    );
    assert_eq!(
        metric(
            &http,
            &second.base,
            "rbdfence_fence_outcomes_total{outcome=\"failed\"}"
        )
        .await
            + metric(
                &http,
                &second.base,
                "rbdfence_fence_outcomes_total{outcome=\"success-already-dead\"}"
            )
            .await,
        0.0,
        "no new fence"
    );
    // The ledger lists both fences, newest first, and each by its id.
    let (status, list) = get(&http, format!("{}/v1/fences", second.base)).await;
    assert_eq!(status, 200, "{list}");
    let list: Value = serde_json::from_str(&list).unwrap();
    let ids: Vec<&str> = list["fences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["fence_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        vec![
            ra["fence_id"].as_str().unwrap(),
            answer["fence_id"].as_str().unwrap()
        ]
    );
    let (status, one) = get(
        &http,
        format!(
            "{}/v1/fences/{}",
            second.base,
            answer["fence_id"].as_str().unwrap()
        ),
    )
    .await;
    assert_eq!(status, 200, "{one}");
    let one: Value = serde_json::from_str(&one).unwrap();
    assert_eq!(one["request_id"], "r-own");
}

/// Every series of `name` summed over its labels.
async fn metric_sum(http: &reqwest::Client, base: &str, name: &str) -> f64 {
    let (_, text) = get(http, format!("{base}/metrics")).await;
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

/// Two instances with the same configuration (one per HA management node) get the same
/// request at once, and a retry with another request id: one fence, decided by one instance
/// with one SSH attempt, one answer everywhere. The instance that fenced is then SIGKILLed:
/// the other replays every request id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_two_instances_fence_the_same_request_once() {
    let mut stack = Stack::new(180);
    stack.ledger_namespace = Some(unique("rbdfence-test"));
    stack.write_config("rbdfence", &common::cluster().conf.clone());
    // The failed host hangs: the fence takes the SSH timeout, so the requests overlap.
    stack.failed_sshd.as_ref().unwrap().freeze();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(90))
        .build()
        .unwrap();
    let img = TestImage::create("ledger-two");
    let a = ServeProcess::start(&stack.config);
    let b = ServeProcess::start(&stack.config);
    let body = json!({"request_id": "r-both", "vm_uuid": new_uuid(), "failed_host": "h1",
                      "target_host": "h2", "volumes": [img.name()]});
    let mut retry = body.clone();
    retry["request_id"] = json!("r-retry");
    let late = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        post(&http, &b.base, &retry).await
    };
    let (ra, rb, rr) = tokio::join!(
        post(&http, &a.base, &body),
        post(&http, &b.base, &body),
        late
    );
    let _g = BlocklistGuard::for_reply(&ra);
    assert_eq!(ra["decision"], "approve", "{ra:#}");
    assert_eq!(rb["fence_id"], ra["fence_id"], "{rb:#}");
    assert_eq!(rr["fence_id"], ra["fence_id"], "{rr:#}");
    let fences = [
        metric_sum(&http, &a.base, "rbdfence_fence_outcomes_total").await,
        metric_sum(&http, &b.base, "rbdfence_fence_outcomes_total").await,
    ];
    assert_eq!(
        fences.iter().sum::<f64>(),
        1.0,
        "one fence decided: {fences:?}"
    );
    let sessions = [
        metric_sum(&http, &a.base, "rbdfence_ssh_sessions_total").await,
        metric_sum(&http, &b.base, "rbdfence_ssh_sessions_total").await,
    ];
    assert!(
        sessions.iter().filter(|s| **s > 0.0).count() == 1,
        "one instance tried SSH: {sessions:?}"
    );
    let (fencer, other) = if fences[0] == 1.0 { (a, b) } else { (b, a) };
    fencer.kill9();
    for r in [&body, &retry] {
        let again = post(&http, &other.base, r).await;
        assert_eq!(again["fence_id"], ra["fence_id"], "{again:#}");
    }
}

/// The service is SIGKILLed in the middle of a fence: the VM's client is already blocklisted,
/// the SSH step still waits on the hung host, nothing is recorded or answered. Restarted, the
/// same request id gets one decision — the fence runs again on what is there (the entry that
/// lasts) — and that decision is the only one ever recorded for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_a_sigkill_mid_fence_never_leaves_two_decisions() {
    let mut stack = Stack::new(189);
    stack.ledger_namespace = Some(unique("rbdfence-test"));
    stack.write_config("rbdfence", &common::cluster().conf.clone());
    stack.failed_sshd.as_ref().unwrap().freeze();
    let img = TestImage::create("ledger-midfence");
    let uuid = new_uuid();
    let vm = common::vm::Vm::start(&img, "127.0.0.189", &uuid);
    vm.write(0, 0xab);
    let owner = common::admin()
        .await
        .image_status(&img.spec)
        .await
        .unwrap()
        .lock_owners[0]
        .address
        .clone();
    let _guard = BlocklistGuard {
        entries: vec![owner.clone()],
    };
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(90))
        .build()
        .unwrap();
    let body = json!({"request_id": "r-mid", "vm_uuid": uuid, "failed_host": "h1",
                      "target_host": "h2", "volumes": [img.name()]});
    let first = ServeProcess::start(&stack.config);
    let pending = {
        let (http, base, body) = (http.clone(), first.base.clone(), body.clone());
        tokio::spawn(async move {
            http.post(format!("{base}/v1/pre-instantiate"))
                .json(&body)
                .send()
                .await
        })
    };
    // Wait until the VM fence is in the osdmap (the fence now waits on SSH), then kill.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !common::admin()
        .await
        .blocklist_ls()
        .await
        .unwrap()
        .iter()
        .any(|i| i.entry == owner)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the VM fence never came"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    first.kill9();
    assert!(pending.await.unwrap().is_err(), "the caller got no answer");

    let second = ServeProcess::start(&stack.config);
    let answer = post(&http, &second.base, &body).await;
    assert_eq!(answer["decision"], "approve", "{answer:#}");
    assert_eq!(answer["evidence"]["blocklist"]["scope"], "vm", "{answer:#}");
    let again = post(&http, &second.base, &body).await;
    assert_eq!(again["fence_id"], answer["fence_id"]);
    let (_, list) = get(&http, format!("{}/v1/fences", second.base)).await;
    let list: Value = serde_json::from_str(&list).unwrap();
    let decisions: Vec<&Value> = list["fences"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["vm_uuid"] == uuid.as_str())
        .collect();
    assert_eq!(
        decisions.len(),
        1,
        "one decision for the request: {decisions:#?}"
    );
}
