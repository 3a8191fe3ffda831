//! The `rbdfence` binary as an operator runs it, against the real test cluster: output
//! shapes, exit codes (0 ok, 2 bad input naming the argument, 1 Ceph failure naming the call
//! and errno).
#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Output};

use common::{Holder, TestImage, cluster, rbd_status_watchers};

fn rbdfence(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rbdfence"))
        .env_remove("CEPH_ID")
        .env("CEPH_CONF", &cluster().conf)
        .args(args)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn watchers_json_has_the_contract_shape_and_matches_rbd_status() {
    let img = TestImage::create("cli-watchers");
    let mut holder = Holder::start(&img, "127.0.0.31");
    holder.write(0, 1).unwrap();
    let out = rbdfence(&["watchers", &img.name(), "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["image"], img.name());
    let mut ours: Vec<(String, i64, u64)> = v["watchers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["address"].as_str().unwrap().into(),
                w["client"].as_i64().unwrap(),
                w["cookie"].as_u64().unwrap(),
            )
        })
        .collect();
    ours.sort();
    assert_eq!(ours, rbd_status_watchers(&img.name()));
    assert_eq!(
        v["lock_owners"],
        serde_json::json!([{"mode": "exclusive", "address": holder.address}])
    );

    let text = rbdfence(&["watchers", &img.name()]);
    assert!(text.status.success());
    assert!(String::from_utf8_lossy(&text.stdout).contains(&holder.address));
}

#[test]
fn bad_input_exits_2_naming_the_argument() {
    for (args, names) in [
        (vec!["watchers", "no-slash"], "POOL/IMAGE"),
        (vec!["watchers", "rbd/img@snap"], "POOL/IMAGE"),
        (vec!["blocklist", "add", "not-an-address"], "ENTRY"),
        (vec!["blocklist", "add", "127.0.0.1/40"], "ENTRY"),
        (
            vec!["blocklist", "add", "127.0.0.40", "--expire", "0"],
            "--expire",
        ),
        (vec!["blocklist", "rm", "1.2.3.4:x/1"], "ENTRY"),
        (vec!["--timeout", "0", "blocklist", "ls"], "--timeout"),
        (vec!["frobnicate"], "frobnicate"),
    ] {
        let out = rbdfence(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(names), "{args:?}: {}", stderr(&out));
    }
}

#[test]
fn ceph_failures_exit_1_naming_the_call_and_errno() {
    let out = rbdfence(&["watchers", "rbd/no-such-image"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("locate image rbd/no-such-image failed: ENOENT"),
        "{}",
        stderr(&out)
    );

    let out = rbdfence(&["--id", "nobody", "blocklist", "ls"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("connect client.nobody"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("EACCES"), "{}", stderr(&out));

    let out = rbdfence(&["-c", "/nonexistent/ceph.conf", "blocklist", "ls"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("conf read /nonexistent/ceph.conf failed: ENOENT"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn blocklist_round_trip_through_the_cli() {
    let _guard = common::BlocklistGuard {
        entries: vec!["127.0.0.32:0/0".into()],
    };
    let out = rbdfence(&[
        "--id",
        "rbdfence",
        "blocklist",
        "add",
        "127.0.0.32",
        "--expire",
        "120",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("osdmap epoch"));
    let out = rbdfence(&["blocklist", "ls", "--json"]);
    assert!(out.status.success());
    let items: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let item = items
        .iter()
        .find(|i| i["entry"] == "127.0.0.32:0/0")
        .unwrap();
    assert_eq!(item["kind"], "addr");
    assert!(item["until"].as_str().unwrap().ends_with('Z'));
    let out = rbdfence(&["--id", "rbdfence", "blocklist", "rm", "127.0.0.32"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = rbdfence(&["blocklist", "ls", "--json"]);
    let items: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!items.iter().any(|i| i["entry"] == "127.0.0.32:0/0"));
}
