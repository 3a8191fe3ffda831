//! Least privilege, on the namespace test network (`common::world`): the service runs as
//! exactly the cephx user the README documents and does its whole job with it; a user that may
//! not blocklist leaves it not ready, saying why, and every fence an SSH scan cannot settle is
//! a deny. Named e2e_* so nextest runs them one at a time with the other end-to-end tests.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::netns::Link;
use common::world::{Settings, World};

/// Splits a shell command line the way sh does for the README's command: blanks separate
/// words, single and double quotes group, a backslash-newline joins lines.
fn shell_words(text: &str) -> Vec<String> {
    let text = text.replace("\\\n", " ");
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut quote: Option<char> = None;
    for c in text.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.get_or_insert_default().push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                word.get_or_insert_default();
            }
            (None, c) if c.is_whitespace() => words.extend(word.take()),
            (None, c) => word.get_or_insert_default().push(c),
        }
    }
    words.extend(word);
    words
}

/// The caps of the user the README documents, read from the README itself.
fn readme_caps() -> Vec<String> {
    let readme = std::fs::read_to_string(common::repo().join("README.md")).unwrap();
    let start = readme
        .find("ceph auth get-or-create client.rbdfence")
        .expect("the README documents the service's cephx user");
    let block = &readme[start..readme[start..].find("```").unwrap() + start];
    let words = shell_words(block);
    assert_eq!(
        words[..4],
        ["ceph", "auth", "get-or-create", "client.rbdfence"],
        "{words:?}"
    );
    words[4..].to_vec()
}

#[test]
fn shell_words_split_the_readme_command() {
    assert_eq!(
        shell_words("a \\\n  mon 'x, y \"z\" w' osd \"q\""),
        ["a", "mon", "x, y \"z\" w", "osd", "q"]
    );
    let caps = readme_caps();
    assert_eq!(caps.len() % 2, 0, "{caps:?}");
    assert!(
        caps.iter().step_by(2).all(|k| k == "mon" || k == "osd"),
        "{caps:?}"
    );
}

/// The README's user: ready, and a whole fence lifecycle — evidence, a VM fence, the ledger
/// and its leases, the lifecycle's kill and the lifting of the entry — works with its caps.
#[test]
fn e2e_the_readme_user_does_the_whole_job() {
    let mut world = World::new(Settings {
        lifecycle_secs: 2,
        ..Settings::default()
    });
    world.use_user("rbdfence-readme", &readme_caps());
    let (status, body) = world.http("GET", "/readyz", None);
    assert_eq!(status, 200, "{body}");
    assert!(
        body.as_str().unwrap().contains("may add and lift"),
        "{body}"
    );

    let img = world.image("readme-user");
    let vm = world.vm(&world.h1, &img);
    vm.write(0, 0xab);
    world.set(&world.h1, Link::Mgmt, false);
    world.set(&world.h1, Link::Storage, false);
    let (status, reply) = world.pre_instantiate(&vm.uuid, &[&img]);
    assert_eq!(status, 200, "{reply:#}");
    assert_eq!(reply["decision"], "approve", "{reply:#}");
    assert_eq!(reply["evidence"]["blocklist"]["scope"], "vm", "{reply:#}");
    let fence_id = reply["fence_id"].as_str().unwrap().to_string();

    world.set(&world.h1, Link::Storage, true);
    world.set(&world.h1, Link::Mgmt, true);
    assert!(
        vm.wait_gone(Duration::from_secs(60)),
        "the lifecycle stops it"
    );
    world.wait_lifted(&fence_id, Duration::from_secs(60));
    assert!(world.blocklist().is_empty(), "{:?}", world.blocklist());
}

/// A user that may read images but not blocklist: `/readyz` is 503 and says why, and a fence
/// that only the storage fence could prove (the management network down) is a deny
/// `blocklist-failed` with nothing done: the VM still writes.
#[test]
fn e2e_a_user_that_cannot_blocklist_is_not_ready_and_denies() {
    let mut world = World::new(Settings::default());
    world.use_user(
        "rbdfence-nobl",
        &[
            "mon".into(),
            "allow r".into(),
            "osd".into(),
            "profile rbd".into(),
        ],
    );
    let (status, body) = world.http("GET", "/readyz", None);
    assert_eq!(status, 503, "{body}");
    let why = body.as_str().unwrap();
    assert!(
        why.contains("may not add blocklist entries") && why.contains("EACCES"),
        "{why}"
    );

    let img = world.image("no-blocklist");
    let vm = world.vm(&world.h1, &img);
    vm.write(0, 0xab);
    world.set(&world.h1, Link::Mgmt, false);
    let (status, reply) = world.pre_instantiate(&vm.uuid, &[&img]);
    assert_eq!(status, 200, "{reply:#}");
    assert_eq!(
        (reply["decision"].as_str(), reply["reason"].as_str()),
        (Some("deny"), Some("blocklist-failed")),
        "{reply:#}"
    );
    assert!(world.blocklist().is_empty());
    vm.write(0, 0xcd);
    assert_eq!(world.image_byte(&img, 0), 0xcd, "nothing was fenced");
}

/// The secrets the service holds — its API token, its cephx key, its SSH private key — never
/// reach its log (at debug level, every crate), its replies, its metrics or the ledger, over
/// a whole fence: a refused request, a VM fence, the lifecycle's kill over SSH and the
/// lifting.
#[test]
fn e2e_no_secret_reaches_the_log_replies_metrics_or_the_ledger() {
    let token = "tok-3f9a1c7e5b2d4f608192a3b4c5d6e7f8".to_string();
    let world = World::new(Settings {
        lifecycle_secs: 2,
        token: Some(token.clone()),
        log: Some("debug".into()),
        ..Settings::default()
    });
    let mut secrets = vec![token.clone()];
    let keyring = std::fs::read_to_string(world.cluster.dir.join("keyring")).unwrap();
    let mut in_ours = false;
    for line in keyring.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_ours = line == "[client.rbdfence]";
        } else if in_ours && let Some(key) = line.strip_prefix("key = ") {
            secrets.push(key.to_string());
        }
    }
    assert_eq!(
        secrets.len(),
        2,
        "the cephx key of client.rbdfence: {keyring}"
    );
    let identity = std::fs::read_to_string(world.key.identity()).unwrap();
    secrets.extend(
        identity
            .lines()
            .filter(|l| !l.starts_with("-----") && l.len() >= 16)
            .map(String::from),
    );
    assert!(secrets.len() > 3, "the private key's lines");

    let mut seen: Vec<String> = Vec::new();
    let img = world.image("secrets");
    let vm = world.vm(&world.h1, &img);
    vm.write(0, 0xab);
    let body = serde_json::json!({"vm_uuid": vm.uuid, "failed_host": "h1",
        "target_host": "h2", "volumes": [img]});
    let (status, reply) = world.http_with(
        "POST",
        "/v1/pre-instantiate",
        Some(&body),
        "Authorization: Bearer wrong-token\r\n",
    );
    assert_eq!(status, 401, "{reply}");
    seen.push(reply.to_string());
    world.set(&world.h1, Link::Mgmt, false);
    let (status, reply) = world.pre_instantiate(&vm.uuid, &[&img]);
    assert_eq!(status, 200, "{reply:#}");
    assert_eq!(reply["decision"], "approve", "{reply:#}");
    seen.push(reply.to_string());
    let fence_id = reply["fence_id"].as_str().unwrap().to_string();
    world.set(&world.h1, Link::Mgmt, true);
    assert!(
        vm.wait_gone(Duration::from_secs(60)),
        "the lifecycle kills it"
    );
    world.wait_lifted(&fence_id, Duration::from_secs(60));
    for path in [
        "/v1/fences",
        &format!("/v1/fences/{fence_id}"),
        "/metrics",
        "/readyz",
    ] {
        seen.push(world.http("GET", path, None).1.to_string());
    }
    let objects = world.cli("rados", &["-p", "rbd", "-N", "rbdfence", "ls"]);
    assert!(objects.lines().count() >= 3, "{objects}");
    for object in objects.lines() {
        let file = world.dir.path().join("object");
        world.cli(
            "rados",
            &[
                "-p",
                "rbd",
                "-N",
                "rbdfence",
                "get",
                object,
                &file.display().to_string(),
            ],
        );
        seen.push(String::from_utf8_lossy(&std::fs::read(&file).unwrap()).into_owned());
    }
    let log = world.service.as_ref().unwrap().log.lock().unwrap().clone();
    assert!(
        log.len() > 50,
        "a debug log was written: {} lines",
        log.len()
    );
    seen.extend(log);
    for secret in &secrets {
        for text in &seen {
            assert!(
                !text.contains(secret.as_str()),
                "a secret ({}…) leaked into: {text}",
                &secret[..6]
            );
        }
    }
}
