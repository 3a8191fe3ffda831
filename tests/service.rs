//! The service over HTTP, in-process, against the real micro cluster, real qemu and real
//! sshd: validation, auth, images, pre-instantiate and its replays, coalescing, the ZStack
//! endpoint, unfence, metrics against metrics/README.md, and readiness.
//! Tests named e2e_* drive real VMs and run one at a time (nextest test group).
//!
//! Loopback addresses used: 127.0.0.91 – 127.0.0.99, 127.0.0.101 – 127.0.0.119 and
//! 127.0.0.161 – 127.0.0.169.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use common::running::Running;
use common::stack::{Stack, new_uuid};
use common::vm::Vm;
use common::{BlocklistGuard, TestImage, admin, eventually};
use rbdfence::config::Config;
use serde_json::{Value, json};

fn pre(vm: &str, volumes: &[&TestImage]) -> Value {
    json!({"vm_uuid": vm, "failed_host": "h1", "target_host": "h2",
           "volumes": volumes.iter().map(|v| v.name()).collect::<Vec<_>>()})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_400_naming_the_field_and_change_nothing() {
    let mut stack = Stack::new(91);
    let token_file = stack.dir.path().join("token");
    std::fs::write(&token_file, "s3cret-token-for-tests-0123456789\n").unwrap();
    stack.api_extra = format!(
        "token_file = \"{}\"\nmax_body_bytes = 4096",
        token_file.display()
    );
    stack.write_config("rbdfence", &common::cluster().conf.clone());
    let svc = Running::start(&stack).await;
    let img = TestImage::create("api-bad");
    let before = admin().await.blocklist_ls().await.unwrap();
    let good = pre(&new_uuid(), &[&img]);
    let mut cases: Vec<(Value, &str)> = Vec::new();
    for (field, value) in [
        ("vm_uuid", json!("$(reboot)")),
        ("vm_uuid", json!(42)),
        ("failed_host", json!("h1; rm -rf /")),
        ("target_host", json!("")),
        ("volumes", json!([])),
        ("volumes[0]", json!(["rbd"])),
        ("volumes[1]", json!([img.name(), "rbd/a@snap"])),
        ("request_id", json!("with space")),
        ("dry_run", json!("yes")),
    ] {
        let mut b = good.clone();
        let key = field.split('[').next().unwrap();
        b[key] = if field.contains('[') && !value.is_array() {
            json!([value])
        } else {
            value
        };
        cases.push((b, field));
    }
    let mut missing = good.clone();
    missing.as_object_mut().unwrap().remove("vm_uuid");
    cases.push((missing, "vm_uuid"));
    let mut unknown = good.clone();
    unknown["bogus"] = json!(1);
    cases.push((unknown, "bogus"));
    let mut same = good.clone();
    same["target_host"] = json!("h1");
    cases.push((same, "target_host"));
    for (body, field) in cases {
        let (status, reply) = svc.post("/v1/pre-instantiate", &body).await;
        assert_eq!(status, 400, "{field}: {reply}");
        let msg = reply["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(field), "{field} not named in {reply}");
        assert_eq!(reply["error"]["code"], "invalid_request");
    }
    // Not JSON, too large, no token.
    let r = svc
        .http
        .post(format!("{}/v1/pre-instantiate", svc.base))
        .bearer_auth(svc.token.as_ref().unwrap())
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 415);
    // A valid JSON object followed by anything but whitespace is no request: it is refused
    // whole, never acted on up to its first object.
    let zstack = json!({"failedHostUuid": "h1", "vmUuid": new_uuid(), "clusterUuid": "c1",
        "haTargetHostUuid": "h2", "volumes": [img.name()]});
    for tail in [" {\"dry_run\":true}", "x", "\n]", "{}"] {
        for (path, body) in [
            ("/v1/pre-instantiate", &good),
            ("/ha/sibling-fence-vm", &zstack),
        ] {
            let r = svc
                .http
                .post(format!("{}{path}", svc.base))
                .bearer_auth(svc.token.as_ref().unwrap())
                .header("content-type", "application/json")
                .body(format!("{body}{tail}"))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let reply: Value = r.json().await.unwrap_or_default();
            assert_eq!(
                status, 400,
                "{path} with {tail:?} after the object: {reply}"
            );
            assert_eq!(reply["error"]["code"], "invalid_request", "{reply}");
            let msg = reply["error"]["message"].as_str().unwrap_or_default();
            assert!(msg.contains("trailing"), "{reply}");
        }
    }
    // The token under another scheme is no token.
    let r = svc
        .http
        .post(format!("{}/v1/pre-instantiate", svc.base))
        .header(
            "authorization",
            format!("Basic {}", svc.token.as_ref().unwrap()),
        )
        .json(&good)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let big = json!({"vm_uuid": "x".repeat(10_000)});
    let (status, reply) = svc.post("/v1/pre-instantiate", &big).await;
    assert_eq!(status, 413, "{reply}");
    let r = svc
        .http
        .post(format!("{}/v1/pre-instantiate", svc.base))
        .json(&good)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = svc
        .http
        .get(format!("{}/v1/fences", svc.base))
        .bearer_auth("wrong-token-wrong-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");
    // /metrics, /healthz, /readyz need no token.
    assert_eq!(
        svc.http
            .get(format!("{}/healthz", svc.base))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    assert_eq!(
        svc.http
            .get(format!("{}/readyz", svc.base))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    // Nothing was done: no entry added, none lifted. (Other tests run meanwhile on the same
    // cluster; an entry of theirs may lapse by its own expiry in between.)
    let after = admin().await.blocklist_ls().await.unwrap();
    let now = time::OffsetDateTime::now_utc();
    let lapsed = |until: &str| {
        time::OffsetDateTime::parse(until, &time::format_description::well_known::Rfc3339)
            .is_ok_and(|u| u <= now)
    };
    assert!(
        after.iter().all(|i| before.contains(i)),
        "an entry was added: {after:?} (before: {before:?})"
    );
    assert!(
        before.iter().all(|i| after.contains(i) || lapsed(&i.until)),
        "an entry was lifted: {after:?} (before: {before:?})"
    );
    assert!(svc.svc.engine.ledger.recent(10).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_endpoint_matches_the_cli_shape() {
    let stack = Stack::new(94);
    let svc = Running::start(&stack).await;
    let img = TestImage::create("api-image");
    let vm = Vm::start(&img, "127.0.0.94", &new_uuid());
    vm.write(0, 1);
    let (status, body) = svc.get(&format!("/v1/images/{}", img.name())).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["image"], img.name());
    let addr = v["watchers"][0]["address"].as_str().unwrap();
    assert!(addr.starts_with("127.0.0.94:"), "{v}");
    assert_eq!(
        v["lock_owners"],
        json!([{"mode": "exclusive", "address": addr}])
    );
    let (status, body) = svc.get("/v1/images/rbd/no-such-image").await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("ENOENT"));
    let (status, body) = svc.get("/v1/images/rbd/bad@snap").await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_pre_instantiate_approves_records_and_replays_without_acting_again() {
    let stack = Stack::new(97);
    let svc = Running::start(&stack).await;
    let img = TestImage::create("api-pre");
    let uuid = new_uuid();
    let vm = Vm::start(&img, "127.0.0.97", &uuid);
    vm.write(0, 0xab);
    vm.freeze();
    let mut body = pre(&uuid, &[&img]);
    body["request_id"] = json!("r-e2e-1");
    let (status, reply) = svc.post("/v1/pre-instantiate", &body).await;
    let _g = BlocklistGuard::for_reply(&reply);
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        (reply["decision"].as_str(), reply["outcome"].as_str()),
        (Some("approve"), Some("success-killed")),
        "{reply:#}"
    );
    assert!(vm.wait_gone(Duration::from_secs(5)));
    let adds = svc
        .metric("rbdfence_ceph_calls_total{op=\"blocklist_add\",result=\"ok\"}")
        .await;
    let sessions = svc
        .metric("rbdfence_ssh_sessions_total{result=\"ok\"}")
        .await;
    assert!(adds >= 1.0 && sessions >= 1.0);

    // The same request_id: the recorded answer, nothing done again.
    let (status, again) = svc.post("/v1/pre-instantiate", &body).await;
    assert_eq!(status, 200);
    assert_eq!(again, reply);
    assert_eq!(
        svc.metric("rbdfence_ceph_calls_total{op=\"blocklist_add\",result=\"ok\"}")
            .await,
        adds
    );
    assert_eq!(
        svc.metric("rbdfence_ssh_sessions_total{result=\"ok\"}")
            .await,
        sessions
    );
    assert_eq!(
        svc.metric("rbdfence_fence_outcomes_total{outcome=\"success-killed\"}")
            .await,
        1.0
    );

    // The same request_id for another request is a conflict, never the old approval.
    let mut other = body.clone();
    other["vm_uuid"] = json!(new_uuid());
    let (status, conflict) = svc.post("/v1/pre-instantiate", &other).await;
    assert_eq!(status, 409, "{conflict}");
    assert_eq!(conflict["error"]["code"], "request_id_reused");

    // The ledger.
    let id = reply["fence_id"].as_str().unwrap();
    let (status, rec) = svc.get(&format!("/v1/fences/{id}")).await;
    assert_eq!(status, 200);
    let rec: Value = serde_json::from_str(&rec).unwrap();
    assert_eq!(rec["request_id"], "r-e2e-1");
    assert_eq!(rec["vm_uuid"], uuid);
    assert_eq!(rec["decision"], "approve");
    let (_, list) = svc.get("/v1/fences").await;
    assert!(list.contains(id));
    assert_eq!(svc.get("/v1/fences/nope").await.0, 404);
    assert_eq!(
        svc.metric("rbdfence_blocklist_entries").await,
        1.0,
        "the VM's exact address (scope vm), not the whole host"
    );

    // Unfence lifts the entries the host's fences made (and only those).
    let (status, lifted) = svc.post("/v1/hosts/h1/unfence", &json!({})).await;
    assert_eq!(status, 200, "{lifted}");
    assert_eq!(lifted["lifted"], reply["evidence"]["blocklist"]["entries"]);
    let listed = admin().await.blocklist_ls().await.unwrap();
    for e in reply["evidence"]["blocklist"]["entries"]
        .as_array()
        .unwrap()
    {
        assert!(
            !listed.iter().any(|i| i.entry == e.as_str().unwrap()),
            "{e} still listed: {listed:?}"
        );
    }
    assert_eq!(svc.metric("rbdfence_blocklist_entries").await, 0.0);
    assert_eq!(svc.post("/v1/hosts/nope/unfence", &json!({})).await.0, 404);
}

/// Ten VMs of one failed host, asked for at once: all approved, one storage fence, one SSH
/// session; and a second request for a VM while its fence runs waits for that fence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_concurrent_requests_for_one_host_share_the_fence_and_the_session() {
    let stack = Stack::new(101);
    let svc = Arc::new(Running::start(&stack).await);
    let mut vms = Vec::new();
    for i in 0..10 {
        let img = TestImage::create(&format!("api-many{i}"));
        let uuid = new_uuid();
        let vm = Vm::start(&img, "127.0.0.101", &uuid);
        vm.write(0, i);
        vms.push((img, uuid, vm));
    }
    let sessions = svc
        .metric("rbdfence_ssh_sessions_total{result=\"ok\"}")
        .await;
    let adds = svc
        .metric("rbdfence_ceph_calls_total{op=\"blocklist_add\",result=\"ok\"}")
        .await;
    let mut tasks = Vec::new();
    for (img, uuid, _) in &vms {
        let body = pre(uuid, &[img]);
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            svc.post("/v1/pre-instantiate", &body).await
        }));
    }
    // A duplicate for the first VM, concurrently: it waits for the same fence.
    let dup = {
        let body = pre(&vms[0].1, &[&vms[0].0]);
        let svc = svc.clone();
        tokio::spawn(async move { svc.post("/v1/pre-instantiate", &body).await })
    };
    let mut replies = Vec::new();
    for t in tasks {
        let (status, reply) = t.await.unwrap();
        assert_eq!(status, 200, "{reply}");
        replies.push(reply);
    }
    let (_, dup) = dup.await.unwrap();
    let _guards: Vec<BlocklistGuard> = replies.iter().map(BlocklistGuard::for_reply).collect();
    for r in &replies {
        assert_eq!(r["outcome"], "success-killed", "{r:#}");
    }
    assert_eq!(
        dup["fence_id"], replies[0]["fence_id"],
        "the duplicate shared the first VM's fence"
    );
    for (_, _, vm) in &vms {
        assert!(vm.wait_gone(Duration::from_secs(5)));
    }
    let used_sessions = svc
        .metric("rbdfence_ssh_sessions_total{result=\"ok\"}")
        .await
        - sessions;
    assert_eq!(used_sessions, 1.0, "one SSH session killed all ten");
    let used_adds = svc
        .metric("rbdfence_ceph_calls_total{op=\"blocklist_add\",result=\"ok\"}")
        .await
        - adds;
    assert!(
        used_adds <= 11.0,
        "one storage fence (IP + exact addresses), not one per VM: {used_adds}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_the_zstack_endpoint_speaks_zstacks_message_shape() {
    let stack = Stack::new(104);
    let svc = Running::start(&stack).await;
    let img = TestImage::create("api-zstack");
    let uuid = new_uuid();
    let vm = Vm::start(&img, "127.0.0.104", &uuid);
    vm.write(0, 1);
    let body = json!({"failedHostUuid": "h1", "vmUuid": uuid.replace('-', ""), "clusterUuid": "c1",
                      "haTargetHostUuid": "h2", "volumes": [img.name()]});
    let (status, reply) = svc.post("/ha/sibling-fence-vm", &body).await;
    let listed: Vec<String> = admin()
        .await
        .blocklist_ls()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.entry)
        .filter(|e| e.starts_with("127.0.0.104:"))
        .collect();
    let _g = BlocklistGuard { entries: listed };
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["success"], true, "{reply:#}");
    assert_eq!(reply["error"], Value::Null);
    assert_eq!(reply["alive"], false);
    assert_eq!(reply["killed"], true);
    assert_eq!(reply["sshReachable"], true);
    assert_eq!(reply["qemuFound"], true);
    assert_eq!(reply["executorHostUuid"], "h3");
    assert_eq!(reply["executorRole"], "sibling");
    assert_eq!(reply["reason"], "killed");
    assert!(vm.wait_gone(Duration::from_secs(5)));
    let mut wrong = body.clone();
    wrong["clusterUuid"] = json!("c9");
    let (status, reply) = svc.post("/ha/sibling-fence-vm", &wrong).await;
    assert_eq!(status, 400);
    assert!(
        reply["error"]["message"]
            .as_str()
            .unwrap()
            .contains("clusterUuid")
    );
}

/// The README table (see its "Table format" section): series → (type, label → values).
fn contract() -> BTreeMap<String, (String, BTreeMap<String, BTreeSet<String>>)> {
    let text = std::fs::read_to_string(common::repo().join("metrics/README.md")).unwrap();
    let mut lines = text
        .lines()
        .skip_while(|l| l.trim() != "| series | type | labels | allowed values | meaning |");
    assert!(
        lines.next().is_some(),
        "metrics/README.md has no series table"
    );
    lines.next(); // separator
    let mut out = BTreeMap::new();
    for line in lines.take_while(|l| l.starts_with('|')) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        let series = cells[0].trim_matches('`').to_string();
        let mut labels = BTreeMap::new();
        if cells[3] != "—" {
            for group in cells[3].split("; ") {
                let (label, values) = group.split_once(": ").unwrap();
                let values = values
                    .split(", ")
                    .map(|v| {
                        if v == "{crate-version}" {
                            env!("CARGO_PKG_VERSION").to_string()
                        } else {
                            v.to_string()
                        }
                    })
                    .collect();
                labels.insert(label.to_string(), values);
            }
        }
        out.insert(series, (cells[1].to_string(), labels));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_metrics_equal_the_contract_in_metrics_readme() {
    let stack = Stack::new(107);
    let svc = Running::start(&stack).await;
    let _ = svc.get("/healthz").await;
    let (status, text) = svc.get("/metrics").await;
    assert_eq!(status, 200);
    let contract = contract();
    let mut types = BTreeMap::new();
    for l in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let (name, ty) = l.split_once(' ').unwrap();
        types.insert(name.to_string(), ty.to_string());
    }
    // Every series of the contract is served with its type.
    for (series, (ty, _)) in &contract {
        let family = series.strip_suffix("_total").unwrap_or(series);
        assert_eq!(
            types.get(family),
            Some(ty),
            "{series} ({ty}) not served; served: {types:?}"
        );
    }
    // Every served family is in the contract, and every label value is allowed.
    for name in types.keys() {
        assert!(
            contract.contains_key(name) || contract.contains_key(&format!("{name}_total")),
            "{name} is served but not in metrics/README.md"
        );
    }
    for sample in text.lines().filter(|l| l.starts_with("rbdfence_")) {
        let (name, rest) = sample.split_once(['{', ' ']).unwrap();
        let series = ["_bucket", "_sum", "_count", "_created"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|b| contract.get(*b).is_some_and(|c| c.0 == "histogram"))
            })
            .unwrap_or(name);
        if name.ends_with("_created") {
            continue;
        }
        let (_, labels) = contract
            .get(series)
            .unwrap_or_else(|| panic!("{name} not in the contract"));
        if let Some(body) = sample
            .split_once('{')
            .map(|(_, b)| b.split_once('}').unwrap().0)
        {
            for pair in body.split(',').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').unwrap();
                if k == "le" {
                    continue;
                }
                let allowed = labels
                    .get(k)
                    .unwrap_or_else(|| panic!("{series}: label {k} not in the contract"));
                assert!(
                    allowed.contains(v.trim_matches('"')),
                    "{series}: {k}={v} not allowed ({allowed:?})"
                );
            }
        }
        let _ = rest;
    }
}

/// Readiness follows the Ceph connection: a throw-away cluster is stopped and rebuilt, and
/// the service reconnects by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_ceph_and_the_service_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let script = common::repo().join("scripts/ceph-micro.sh");
    let micro = |args: &[&str]| {
        let out = std::process::Command::new("bash")
            .arg(&script)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ceph-micro {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let d = dir.path().to_str().unwrap().to_string();
    micro(&["up", &d, "--ip", "127.0.0.8"]);
    struct Down(std::path::PathBuf, String);
    impl Drop for Down {
        fn drop(&mut self) {
            let _ = std::process::Command::new("bash")
                .arg(&self.0)
                .args(["down", &self.1])
                .output();
        }
    }
    let _down = Down(script.clone(), d.clone());
    let mut stack = Stack::new(110);
    stack.write_config("admin", &dir.path().join("ceph.conf"));
    let text = std::fs::read_to_string(&stack.config).unwrap();
    std::fs::write(
        &stack.config,
        text.replace(
            "connect_timeout_secs = 5\n",
            "connect_timeout_secs = 2\nhealth_interval_secs = 1\n",
        )
        .replace("op_timeout_secs = 5", "op_timeout_secs = 2"),
    )
    .unwrap();
    let cfg = Config::load(&stack.config).unwrap();
    let svc = Running::start(&stack).await;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(
        svc.svc
            .link
            .clone()
            .maintain(Duration::from_secs(cfg.ceph.health_interval_secs), stop_rx),
    );
    assert_eq!(svc.get("/readyz").await.0, 200);
    assert_eq!(svc.metric("rbdfence_ceph_connected").await, 1.0);

    micro(&["down", &d]);
    eventually("readyz turns 503", Duration::from_secs(20), || async {
        (svc.get("/readyz").await.0 == 503).then_some(())
    })
    .await;
    assert_eq!(svc.metric("rbdfence_ceph_connected").await, 0.0);
    // A fence now denies at once: no evidence without Ceph.
    let (status, reply) = svc.post("/v1/pre-instantiate", &json!({"vm_uuid": new_uuid(), "failed_host": "h1", "target_host": "h2", "volumes": ["rbd/x"]})).await;
    assert_eq!(status, 200);
    assert_eq!(
        (reply["decision"].as_str(), reply["reason"].as_str()),
        (Some("deny"), Some("ceph-unavailable")),
        "{reply:#}"
    );

    // The cluster comes back (rebuilt: new keys, new fsid); the service reconnects.
    micro(&["up", &d, "--ip", "127.0.0.8"]);
    eventually(
        "readyz turns 200 again",
        Duration::from_secs(40),
        || async { (svc.get("/readyz").await.0 == 200).then_some(()) },
    )
    .await;
    assert_eq!(svc.metric("rbdfence_ceph_connected").await, 1.0);
    let _ = stop_tx.send(true);
}

/// A child process ended by its pid when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A real Prometheus (Debian's) scrapes the running service, loads metrics/alerts.yml, and
/// the outcome counter is read back through Prometheus' HTTP API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_service_and_loads_the_alerts() {
    let stack = Stack::new(113);
    let svc = Running::start(&stack).await;
    let img = TestImage::create("api-prom");
    let dir = tempfile::tempdir().unwrap();
    let target = svc.base.trim_start_matches("http://").to_string();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {rules}\nscrape_configs:\n  - job_name: rbdfence\n    static_configs:\n      - targets: ['{target}']\n",
        rules = common::repo().join("metrics/alerts.yml").display()
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    let _prom = Child(
        std::process::Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("prometheus (Debian package 'prometheus') must be installed"),
    );
    // One fence (a dry run: a recorded deny, outcome failed) to count.
    let mut body = pre(&new_uuid(), &[&img]);
    body["dry_run"] = json!(true);
    let (status, reply) = svc.post("/v1/pre-instantiate", &body).await;
    assert_eq!(
        (status, reply["reason"].as_str()),
        (200, Some("dry-run")),
        "{reply}"
    );

    let http = reqwest::Client::new();
    let query = |q: &'static str| {
        let http = http.clone();
        async move {
            let v: Value = http
                .get(format!("http://127.0.0.1:{port}/api/v1/query"))
                .query(&[("query", q)])
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            v["data"]["result"][0]["value"][1]
                .as_str()
                .map(String::from)
        }
    };
    let seen = eventually(
        "Prometheus has scraped the fence outcome",
        Duration::from_secs(60),
        || async {
            query(r#"rbdfence_fence_outcomes_total{job="rbdfence",outcome="failed"}"#)
                .await
                .filter(|v| v == "1")
        },
    )
    .await;
    assert_eq!(seen, "1");
    assert_eq!(
        query(r#"rbdfence_fence_decisions_total{decision="deny",reason="dry-run"}"#)
            .await
            .as_deref(),
        Some("1")
    );
    assert_eq!(query(r#"up{job="rbdfence"}"#).await.as_deref(), Some("1"));
    assert_eq!(query("rbdfence_ceph_connected").await.as_deref(), Some("1"));
    let rules: Value = http
        .get(format!("http://127.0.0.1:{port}/api/v1/rules"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let groups = rules["data"]["groups"].as_array().unwrap();
    assert!(
        groups.iter().any(|g| g["name"] == "rbdfence"),
        "alert rules loaded: {rules}"
    );
}

/// `rbdfence serve` as a process: SIGTERM while a fence is in flight (the failed host's
/// sshd hangs, so the kill step waits out its timeout) — the fence still finishes, is
/// recorded and answered, and then the service exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_sigterm_lets_fences_in_flight_finish() {
    use std::io::BufRead;
    let stack = Stack::new(116);
    stack.failed_sshd.as_ref().unwrap().freeze();
    let img = TestImage::create("api-drain");
    let mut child = Child(
        std::process::Command::new(env!("CARGO_BIN_EXE_rbdfence"))
            .args(["serve", "--config"])
            .arg(&stack.config)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = child.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let listen = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("rbdfence serve did not start");
        if let Some(rest) = line.split("listen=").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    let http = reqwest::Client::new();
    let body = pre(&new_uuid(), &[&img]);
    let url = format!("http://{listen}/v1/pre-instantiate");
    let request = tokio::spawn(async move {
        http.post(url)
            .json(&body)
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    common::signal(child.0.id() as i32, libc::SIGTERM);
    let reply = request.await.unwrap();
    let _g = BlocklistGuard::for_reply(&reply);
    assert_eq!(
        (reply["decision"].as_str(), reply["outcome"].as_str()),
        (Some("approve"), Some("success-ssh-unreachable")),
        "{reply:#}"
    );
    let status = eventually(
        "rbdfence serve exits after SIGTERM",
        Duration::from_secs(20),
        || {
            let s = child.0.try_wait().unwrap();
            async move { s }
        },
    )
    .await;
    assert!(status.success(), "{status:?}");
    assert!(
        stack.ledger().contains(reply["fence_id"].as_str().unwrap()),
        "recorded before the reply"
    );
}

/// A host fenced on the blocklist alone (its qemu never seen gone) is not unfenced unless
/// the operator forces it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_unfence_refuses_while_a_vm_was_never_seen_gone() {
    let stack = Stack::new(119);
    stack.failed_sshd.as_ref().unwrap().freeze();
    let svc = Running::start(&stack).await;
    let img = TestImage::create("api-unfence");
    let (status, reply) = svc
        .post("/v1/pre-instantiate", &pre(&new_uuid(), &[&img]))
        .await;
    let _g = BlocklistGuard::for_reply(&reply);
    assert_eq!(
        (status, reply["outcome"].as_str()),
        (200, Some("success-ssh-unreachable")),
        "{reply:#}"
    );
    let (status, refused) = svc.post("/v1/hosts/h1/unfence", &json!({})).await;
    assert_eq!(status, 409, "{refused}");
    assert_eq!(refused["error"]["code"], "vms_not_confirmed_gone");
    assert!(
        admin()
            .await
            .blocklist_ls()
            .await
            .unwrap()
            .iter()
            .any(|i| i.entry == "127.0.0.119:0/0"),
        "still fenced"
    );
    let (status, lifted) = svc
        .post("/v1/hosts/h1/unfence", &json!({"force": true}))
        .await;
    assert_eq!(status, 200, "{lifted}");
    assert_eq!(lifted["lifted"], json!(["127.0.0.119:0/0"]));
}

/// A caller gives up in the middle of a fence (its HTTP client times out); the fence finishes
/// alone. The host is unfenced, and later fails again: the identical request must get a new
/// fence, never the earlier answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_a_caller_that_gave_up_never_hands_its_answer_to_a_later_incident() {
    let stack = Stack::new(161);
    stack.failed_sshd.as_ref().unwrap().freeze();
    let svc = Running::start(&stack).await;
    let img = TestImage::create("api-stale");
    let body = pre(&new_uuid(), &[&img]);
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let gave_up = impatient
        .post(format!("{}/v1/pre-instantiate", svc.base))
        .json(&body)
        .send()
        .await;
    assert!(
        gave_up.is_err(),
        "the caller gave up before the fence ended"
    );
    let first: Value = eventually(
        "the first fence is recorded",
        Duration::from_secs(40),
        || {
            let svc = &svc;
            async move {
                let (_, text) = svc.get("/v1/fences").await;
                let v: Value = serde_json::from_str(&text).ok()?;
                v["fences"].as_array()?.first().cloned()
            }
        },
    )
    .await;
    let _g1 = BlocklistGuard::for_reply(&first);
    assert_eq!(first["decision"], "approve", "{first:#}");
    let (status, lifted) = svc
        .post("/v1/hosts/h1/unfence", &json!({"force": true}))
        .await;
    assert_eq!(status, 200, "{lifted}");

    let (status, second) = svc.post("/v1/pre-instantiate", &body).await;
    let _g2 = BlocklistGuard::for_reply(&second);
    assert_eq!(status, 200, "{second:#}");
    assert_ne!(
        second["fence_id"], first["fence_id"],
        "a new incident gets a new fence, not the answer of an earlier one"
    );
    assert_eq!(second["decision"], "approve", "{second:#}");
    let listed = admin().await.blocklist_ls().await.unwrap();
    assert!(
        listed.iter().any(|i| i.entry == "127.0.0.161:0/0"),
        "the host is fenced again: {listed:?}"
    );
}

/// The ZStack endpoint without volumes (a drop-in for ZStack's own message): allowed, but with
/// no Ceph evidence there is no VM fence and no running-elsewhere check; the reply, the ledger
/// and a metric say so. `[zstack] require_volumes = true` makes such a request a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_the_zstack_endpoint_without_volumes_says_it_has_no_evidence() {
    let mut stack = Stack::new(164);
    let svc = Running::start(&stack).await;
    let img = TestImage::create("api-zstack-novol");
    let uuid = new_uuid();
    let vm = Vm::start(&img, "127.0.0.164", &uuid);
    vm.write(0, 1);
    let body = json!({"failedHostUuid": "h1", "vmUuid": uuid, "clusterUuid": "c1",
                      "haTargetHostUuid": "h2"});
    let (status, reply) = svc.post("/ha/sibling-fence-vm", &body).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["success"], true, "{reply:#}");
    assert_eq!(reply["withoutVolumes"], true, "{reply:#}");
    assert_eq!(reply["reason"], "killed", "{reply:#}");
    assert_eq!(
        reply["scope"], "none",
        "no evidence names a client: {reply:#}"
    );
    assert!(vm.wait_gone(Duration::from_secs(5)));
    let (_, rec) = svc
        .get(&format!(
            "/v1/fences/{}",
            reply["fenceId"].as_str().unwrap()
        ))
        .await;
    let rec: Value = serde_json::from_str(&rec).unwrap();
    assert_eq!(rec["evidence"]["without_volumes"], true, "{rec:#}");
    assert_eq!(
        svc.metric("rbdfence_fences_without_volumes_total").await,
        1.0
    );
    assert_eq!(
        svc.metric("rbdfence_fence_scope_total{scope=\"none\"}")
            .await,
        1.0
    );

    stack.api_extra = "[zstack]\nrequire_volumes = true\n".into();
    stack.write_config("rbdfence", &common::cluster().conf.clone());
    let strict = Running::start(&stack).await;
    let (status, refused) = strict.post("/ha/sibling-fence-vm", &body).await;
    assert_eq!(status, 400, "{refused}");
    assert_eq!(refused["error"]["field"], "volumes", "{refused}");
    let (_, list) = strict.get("/v1/fences").await;
    let list: Value = serde_json::from_str(&list).unwrap();
    assert_eq!(
        list["fences"].as_array().unwrap().len(),
        1,
        "nothing was done for the refused request"
    );
}

/// The ledger's file system hangs (the ledger file replaced by a FIFO nobody reads: opening it
/// for writing blocks forever). The fence must still end, within its bounds, in a recorded
/// `ledger-failed` deny — never wedge every identical retry (REVIEW-SAFETY H3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_a_hung_ledger_ends_in_a_recorded_deny_not_a_wedged_fence() {
    let stack = Stack::new(167);
    let svc = Running::start(&stack).await;
    let ledger = stack.dir.path().join("ledger.jsonl");
    let _ = std::fs::remove_file(&ledger);
    let status = std::process::Command::new("mkfifo")
        .arg(&ledger)
        .status()
        .unwrap();
    assert!(status.success());
    // Unblocks the writer threads stuck opening the FIFO, so the test's runtime can shut down:
    // a reader's open (non-blocking, so it never waits itself) lets their opens complete.
    struct Drain(std::path::PathBuf);
    impl Drop for Drain {
        fn drop(&mut self) {
            use std::os::unix::fs::OpenOptionsExt;
            let reader = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&self.0);
            std::thread::sleep(Duration::from_millis(300));
            drop(reader);
        }
    }
    let _drain = Drain(ledger.clone());
    let img = TestImage::create("api-hung-ledger");
    let mut body = pre(&new_uuid(), &[&img]);
    body["request_id"] = json!("r-hung-ledger");
    let started = std::time::Instant::now();
    let (status, reply) = svc.post("/v1/pre-instantiate", &body).await;
    let _g = BlocklistGuard::for_reply(&reply);
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        (reply["decision"].as_str(), reply["reason"].as_str()),
        (Some("deny"), Some("ledger-failed")),
        "{reply:#}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    // The deny itself is kept: a replay answers it without acting again.
    let (status, again) = svc.post("/v1/pre-instantiate", &body).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["fence_id"], reply["fence_id"], "{again:#}");
}
