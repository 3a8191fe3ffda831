//! The native layer against a real Ceph cluster (scripts/ceph-micro.sh), with real librados
//! clients holding images from their own 127.x addresses.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    BlocklistGuard, Holder, TestImage, admin, ceph_cli, no_watchers, rbd_status_watchers,
};
use rbdfence::rbd::{BlocklistEntry, Ceph, ConnectOptions, LockMode, Timeouts};

const ESHUTDOWN: i32 = 108;

fn entry(s: &str) -> BlocklistEntry {
    s.parse().unwrap()
}

#[tokio::test]
async fn watchers_equal_rbd_status_for_a_client_from_another_address() {
    let ceph = admin().await;
    let img = TestImage::create("watchers");
    let holder = Holder::start(&img, "127.0.0.21");
    let ours = ceph.image_status(&img.spec).await.unwrap();
    let mut ours: Vec<(String, i64, u64)> = ours
        .watchers
        .into_iter()
        .map(|w| (w.address, w.client, w.cookie))
        .collect();
    ours.sort();
    assert_eq!(ours, rbd_status_watchers(&img.name()));
    assert_eq!(ours.len(), 1);
    assert_eq!(ours[0].0, holder.address);
    assert!(ours[0].0.starts_with("127.0.0.21:"));
}

#[tokio::test]
async fn observing_adds_no_watcher_and_the_writer_owns_the_lock() {
    let ceph = admin().await;
    let img = TestImage::create("lockowner");
    let status = ceph.image_status(&img.spec).await.unwrap();
    assert!(status.watchers.is_empty() && status.lock_owners.is_empty());

    let mut holder = Holder::start(&img, "127.0.0.22");
    for _ in 0..3 {
        // Observing repeatedly never makes the observer a watcher.
        let status = ceph.image_status(&img.spec).await.unwrap();
        assert_eq!(status.watchers.len(), 1, "{status:?}");
        assert_eq!(status.watchers[0].address, holder.address);
    }
    assert!(
        ceph.image_status(&img.spec)
            .await
            .unwrap()
            .lock_owners
            .is_empty(),
        "no lock before a write"
    );

    holder.write(0, 0xab).unwrap();
    let status = ceph.image_status(&img.spec).await.unwrap();
    assert_eq!(status.lock_owners.len(), 1, "{status:?}");
    assert_eq!(status.lock_owners[0].mode, LockMode::Exclusive);
    assert_eq!(status.lock_owners[0].address, holder.address);
    assert_eq!(status.watchers.len(), 1);
}

/// An image renamed away and a new one created under its name: the next look at the name
/// reports the new image, not the one it named a moment ago (the service remembers where an
/// image's header was, and checks it on every read).
#[tokio::test]
async fn an_image_replaced_under_its_name_is_read_afresh() {
    let ceph = admin().await;
    let img = TestImage::create("replaced");
    let holder = Holder::start(&img, "127.0.0.192");
    let before = ceph.image_status(&img.spec).await.unwrap();
    assert_eq!(before.watchers.len(), 1, "{before:?}");
    assert_eq!(before.watchers[0].address, holder.address);

    let moved = TestImage {
        spec: format!("{}-moved", img.name()).parse().unwrap(),
    };
    ceph_cli("rbd", &["mv", &img.name(), &moved.name()]);
    ceph_cli("rbd", &["create", &img.name(), "--size", "16M"]);
    let after = ceph.image_status(&img.spec).await.unwrap();
    assert!(
        after.watchers.is_empty() && after.lock_owners.is_empty(),
        "the new image under the old name has no user, but got {after:?}"
    );
    let moved_status = ceph.image_status(&moved.spec).await.unwrap();
    assert_eq!(moved_status.watchers.len(), 1, "{moved_status:?}");
    assert_eq!(moved_status.watchers[0].address, holder.address);
    drop(holder);
}

/// A format-1 image (`<name>.rbd` as its header object, no `rbd_id.<name>`; Pacific can no
/// longer create one, so its header is made by hand): watchers and the `rbd_lock` holder are
/// read from that object, with the holder's address.
#[tokio::test]
async fn a_format_1_header_is_observed() {
    let ceph = admin().await;
    let name = common::unique("fmt1");
    let header = format!("{name}.rbd");
    let conf = common::cluster().conf.clone();
    let rados = |args: &[&str]| {
        let mut c = Command::new("rados");
        c.arg("--conf")
            .arg(&conf)
            .args(["-p", "rbd"])
            .args(args)
            .env("LD_PRELOAD", common::bind_shim())
            .env("RBDFENCE_BIND_ADDR", "127.0.0.193");
        c
    };
    assert!(
        rados(&["put", &header, "/dev/null"])
            .status()
            .unwrap()
            .success()
    );
    assert!(
        rados(&[
            "lock",
            "get",
            &header,
            "rbd_lock",
            "--lock-type",
            "exclusive"
        ])
        .status()
        .unwrap()
        .success()
    );
    let mut watch = rados(&["watch", &header])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let spec: rbdfence::rbd::ImageSpec = format!("rbd/{name}").parse().unwrap();
    let status = common::eventually("the watch", Duration::from_secs(10), || async {
        let s = ceph.image_status(&spec).await.unwrap();
        (!s.watchers.is_empty()).then_some(s)
    })
    .await;
    let _ = watch.kill();
    let _ = watch.wait();
    let _ = rados(&["rm", &header]).status();
    assert_eq!(status.watchers.len(), 1, "{status:?}");
    assert!(
        status.watchers[0].address.starts_with("127.0.0.193:"),
        "{status:?}"
    );
    assert_eq!(status.lock_owners.len(), 1, "{status:?}");
    assert_eq!(status.lock_owners[0].mode, LockMode::Exclusive);
    assert!(
        status.lock_owners[0].address.starts_with("127.0.0.193:"),
        "{status:?}"
    );
}

#[tokio::test]
async fn a_frozen_holder_loses_its_watch_but_stays_lock_owner() {
    let img = TestImage::create("frozen");
    let mut holder = Holder::start(&img, "127.0.0.23");
    holder.write(0, 0x11).unwrap();
    holder.freeze();
    // osd_client_watch_timeout is 5 s on the micro cluster.
    let status = no_watchers(
        "the frozen holder's watch expires",
        &img,
        Duration::from_secs(40),
    )
    .await;
    assert_eq!(
        status.lock_owners.len(),
        1,
        "the lock owner record outlives the watch: {status:?}"
    );
    assert_eq!(status.lock_owners[0].address, holder.address);
    assert!(
        rbd_status_watchers(&img.name()).is_empty(),
        "rbd status agrees: no watchers"
    );
}

#[tokio::test]
async fn blocklisting_the_exact_address_fences_the_holder() {
    let ceph = admin().await;
    let img = TestImage::create("exact");
    let mut holder = Holder::start(&img, "127.0.0.24");
    holder.write(0, 0x22).unwrap();
    let e = entry(&holder.address);
    let _guard = BlocklistGuard {
        entries: vec![e.to_string()],
    };
    ceph.blocklist_add(e, Some(Duration::from_secs(600)))
        .await
        .unwrap();
    ceph.wait_for_latest_osdmap().await.unwrap();
    no_watchers(
        "the fenced holder's watch is gone",
        &img,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(holder.write(4096, 0x33), Err(ESHUTDOWN));
    let listed = ceph.blocklist_ls().await.unwrap();
    assert!(
        listed
            .iter()
            .any(|i| i.entry == holder.address && i.kind == "addr"),
        "{listed:?}"
    );
}

#[tokio::test]
async fn a_bare_ip_fences_every_client_of_that_ip_and_none_of_another() {
    let ceph = admin().await;
    let (img_a, img_b, img_c) = (
        TestImage::create("ip-a"),
        TestImage::create("ip-b"),
        TestImage::create("ip-c"),
    );
    let mut a1 = Holder::start(&img_a, "127.0.0.25");
    let mut a2 = Holder::start(&img_b, "127.0.0.25");
    let mut other = Holder::start(&img_c, "127.0.0.26");
    for h in [&mut a1, &mut a2, &mut other] {
        h.write(0, 0x44).unwrap();
    }
    let e = entry("127.0.0.25");
    assert_eq!(e.to_string(), "127.0.0.25:0/0");
    let _guard = BlocklistGuard {
        entries: vec![e.to_string()],
    };
    ceph.blocklist_add(e, Some(Duration::from_secs(600)))
        .await
        .unwrap();
    ceph.wait_for_latest_osdmap().await.unwrap();
    assert_eq!(a1.write(4096, 0x55), Err(ESHUTDOWN));
    assert_eq!(a2.write(4096, 0x55), Err(ESHUTDOWN));
    assert_eq!(other.write(4096, 0x55), Ok(()));
    // A new client from the fenced IP cannot even open the image.
    let refused = Holder::try_start(&img_a, "127.0.0.25")
        .err()
        .unwrap_or_default();
    assert!(refused.starts_with("fail 108"), "{refused}");
}

#[tokio::test]
async fn entries_round_trip_through_add_ls_and_rm() {
    let ceph = admin().await;
    let entries = [
        entry("127.0.0.27:0/12345"),
        entry("127.0.0.28"),
        entry("127.0.0.28/31"),
    ];
    let _guard = BlocklistGuard {
        entries: entries.iter().map(|e| e.to_string()).collect(),
    };
    let before = time::OffsetDateTime::now_utc();
    for e in entries {
        ceph.blocklist_add(e, Some(Duration::from_secs(900)))
            .await
            .unwrap();
    }
    let listed = ceph.blocklist_ls().await.unwrap();
    for e in entries {
        let item = listed
            .iter()
            .find(|i| i.entry == e.to_string())
            .unwrap_or_else(|| panic!("{e} not in {listed:?}"));
        assert_eq!(item.kind, e.kind());
        let until = time::OffsetDateTime::parse(
            &item.until,
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap();
        let secs = (until - before).whole_seconds();
        assert!(
            (895..=960).contains(&secs),
            "{e} expires in {secs} s, wanted ~900"
        );
    }
    for e in entries {
        ceph.blocklist_rm(e).await.unwrap();
    }
    let listed = ceph.blocklist_ls().await.unwrap();
    for e in entries {
        assert!(
            !listed.iter().any(|i| i.entry == e.to_string()),
            "{e} still listed: {listed:?}"
        );
    }
}

#[tokio::test]
async fn the_least_privileged_user_can_fence_and_unfence() {
    let ceph = Ceph::connect(common::connect_options("rbdfence", 10))
        .await
        .unwrap();
    let e = entry("127.0.0.29");
    let _guard = BlocklistGuard {
        entries: vec![e.to_string()],
    };
    ceph.blocklist_add(e, Some(Duration::from_secs(60)))
        .await
        .unwrap();
    ceph.wait_for_latest_osdmap().await.unwrap();
    assert!(
        ceph.blocklist_ls()
            .await
            .unwrap()
            .iter()
            .any(|i| i.entry == "127.0.0.29:0/0")
    );
    ceph.blocklist_rm(e).await.unwrap();
    let img = TestImage::create("leastpriv");
    assert!(
        ceph.image_status(&img.spec)
            .await
            .unwrap()
            .watchers
            .is_empty()
    );
}

#[tokio::test]
async fn missing_pool_or_image_is_enoent_not_a_panic() {
    let ceph = admin().await;
    let err = ceph
        .image_status(&"rbd/no-such-image-here".parse().unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.errno_name(), "ENOENT", "{err}");
    assert!(err.to_string().contains("rbd/no-such-image-here"), "{err}");
    let err = ceph
        .image_status(&"no-such-pool/img".parse().unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.errno_name(), "ENOENT", "{err}");
    assert!(err.to_string().contains("no-such-pool"), "{err}");
}

#[tokio::test]
async fn our_own_client_addresses_are_known() {
    let ceph = admin().await;
    let addrs = ceph.client_addrs().await.unwrap();
    assert!(!addrs.is_empty());
    assert!(addrs.iter().all(|a| a.ip.is_loopback()), "{addrs:?}");
}

#[tokio::test]
async fn bad_credentials_are_eacces() {
    let err = Ceph::connect(common::connect_options("nobody", 5))
        .await
        .err()
        .unwrap();
    assert_eq!(err.errno_name(), "EACCES", "{err}");
}

/// A cluster that stops answering gives ETIMEDOUT within the configured bound, both for a
/// new connection and for calls on an open one. Uses its own throw-away cluster.
#[tokio::test]
async fn a_stopped_cluster_is_a_timeout_within_the_bound_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let script = common::repo().join("scripts/ceph-micro.sh");
    let ip = "127.0.0.9";
    let up = Command::new("bash")
        .arg(&script)
        .arg("up")
        .arg(dir.path())
        .args(["--ip", ip])
        .output()
        .unwrap();
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    struct Down(std::path::PathBuf, std::path::PathBuf);
    impl Drop for Down {
        fn drop(&mut self) {
            let _ = Command::new("bash")
                .arg(&self.0)
                .arg("down")
                .arg(&self.1)
                .output();
        }
    }
    let down = Down(script.clone(), dir.path().to_path_buf());
    let conf = dir.path().join("ceph.conf");
    let status = Command::new("rbd")
        .arg("--conf")
        .arg(&conf)
        .args(["create", "rbd/t", "--size", "4M"])
        .status()
        .unwrap();
    assert!(status.success());
    let bound = Duration::from_secs(3);
    let opts = ConnectOptions {
        conf,
        id: "admin".into(),
        timeouts: Timeouts {
            op: bound,
            mount: bound,
        },
    };
    let ceph = Ceph::connect(opts.clone()).await.unwrap();
    let spec = "rbd/t".parse().unwrap();
    ceph.image_status(&spec).await.unwrap();

    drop(down); // stop the cluster
    // Allowed: Ceph's bound, our 2 s margin, and slack for a loaded 2-core machine.
    let allowed = bound + Duration::from_secs(5);
    let t = Instant::now();
    let err = ceph.image_status(&spec).await.unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert!(t.elapsed() < allowed, "took {:?}", t.elapsed());
    let t = Instant::now();
    let err = ceph.blocklist_ls().await.unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert!(t.elapsed() < allowed, "took {:?}", t.elapsed());
    let t = Instant::now();
    let err = Ceph::connect(opts).await.err().unwrap();
    assert!(err.is_timeout(), "{err}");
    assert!(t.elapsed() < allowed, "took {:?}", t.elapsed());
}

/// RBD namespaces (`POOL/NAMESPACE/IMAGE`): the evidence of an image in a namespace, read
/// natively, equals `rbd status`, and names the writer as its lock owner.
#[tokio::test]
async fn an_image_in_an_rbd_namespace_is_observed() {
    let ceph = admin().await;
    let img = TestImage::create_in_namespace("tenant1", "ns");
    assert_eq!(img.spec.namespace, "tenant1");
    let mut holder = Holder::start(&img, "127.0.0.33");
    holder.write(0, 1).unwrap();
    let status = ceph.image_status(&img.spec).await.unwrap();
    let ours: Vec<(String, i64, u64)> = status
        .watchers
        .iter()
        .map(|w| (w.address.clone(), w.client, w.cookie))
        .collect();
    assert_eq!(ours, rbd_status_watchers(&img.name()));
    assert_eq!(status.lock_owners.len(), 1, "{status:?}");
    assert_eq!(status.lock_owners[0].address, holder.address);
    // The same name in the default namespace is another image.
    let plain: rbdfence::rbd::ImageSpec = format!("rbd/{}", img.spec.image).parse().unwrap();
    assert!(ceph.image_status(&plain).await.unwrap_err().is_not_found());
}

/// A micro cluster of its own on `ip`, stopped (and purged) when dropped.
struct OwnCluster {
    dir: tempfile::TempDir,
}

impl OwnCluster {
    fn up(ip: &str) -> OwnCluster {
        let dir = tempfile::tempdir().unwrap();
        let up = Command::new("bash")
            .arg(common::repo().join("scripts/ceph-micro.sh"))
            .arg("up")
            .arg(dir.path())
            .args(["--ip", ip])
            .output()
            .unwrap();
        assert!(
            up.status.success(),
            "{}",
            String::from_utf8_lossy(&up.stderr)
        );
        OwnCluster { dir }
    }

    fn mon_pid(&self) -> i32 {
        std::fs::read_to_string(self.dir.path().join("run/mon.a.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        common::signal(self.mon_pid(), libc::SIGCONT);
        let _ = Command::new("bash")
            .arg(common::repo().join("scripts/ceph-micro.sh"))
            .arg("down")
            .arg(self.dir.path())
            .output();
    }
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// `rados_wait_for_latest_osdmap` has no timeout of its own in librados: with the monitor
/// hung, each call pins a blocking thread until the monitor answers. Many fences during a mon
/// outage must not pile up threads: the calls share one wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_monitor_pins_at_most_one_thread_for_osdmap_waits() {
    let cluster = OwnCluster::up("127.0.0.12");
    let bound = Duration::from_secs(2);
    let ceph = Ceph::connect(ConnectOptions {
        conf: cluster.dir.path().join("ceph.conf"),
        id: "admin".into(),
        timeouts: Timeouts {
            op: bound,
            mount: bound,
        },
    })
    .await
    .unwrap();
    ceph.wait_for_latest_osdmap().await.unwrap();
    // Warm the blocking pool, then count.
    ceph.blocklist_ls().await.unwrap();
    common::signal(cluster.mon_pid(), libc::SIGSTOP);
    let before = threads();
    let waits = futures::future::join_all((0..16).map(|_| ceph.wait_for_latest_osdmap())).await;
    for w in &waits {
        let e = w.as_ref().unwrap_err();
        assert!(e.is_timeout(), "{e}");
    }
    let grown = threads().saturating_sub(before);
    assert!(
        grown <= 2,
        "16 waits on a hung monitor left {grown} more threads (before: {before})"
    );
}

/// The object calls the fence ledger is built on: write, read, exclusive create (exactly one
/// of several creators wins), and listing by prefix within one namespace only.
#[tokio::test]
async fn ledger_objects_round_trip_and_exclusive_create_has_one_winner() {
    let ceph = admin().await;
    let ns = common::unique("ns-objects");
    assert_eq!(ceph.object_read("rbd", &ns, "fence.x").await.unwrap(), None);
    ceph.object_write("rbd", &ns, "fence.x", b"one".to_vec())
        .await
        .unwrap();
    ceph.object_write("rbd", &ns, "fence.x", b"two".to_vec())
        .await
        .unwrap();
    assert_eq!(
        ceph.object_read("rbd", &ns, "fence.x").await.unwrap(),
        Some(b"two".to_vec())
    );
    let creators = futures::future::join_all((0..8).map(|i| {
        ceph.object_create_exclusive("rbd", &ns, "request.r", format!("f-{i}").into_bytes())
    }))
    .await;
    let won: Vec<usize> = creators
        .iter()
        .enumerate()
        .filter(|(_, r)| *r.as_ref().unwrap())
        .map(|(i, _)| i)
        .collect();
    assert_eq!(won.len(), 1, "{creators:?}");
    assert_eq!(
        ceph.object_read("rbd", &ns, "request.r").await.unwrap(),
        Some(format!("f-{}", won[0]).into_bytes()),
        "the winner's data stays"
    );
    let mut listed = ceph.object_list("rbd", &ns, "").await.unwrap();
    listed.sort();
    assert_eq!(listed, vec!["fence.x", "request.r"]);
    assert_eq!(
        ceph.object_list("rbd", &ns, "fence.").await.unwrap(),
        vec!["fence.x"]
    );
    let other = common::unique("ns-objects");
    assert!(
        ceph.object_list("rbd", &other, "")
            .await
            .unwrap()
            .is_empty()
    );
}

/// Least privilege: the user every service test runs as (`client.rbdfence`, made by
/// scripts/ceph-micro.sh) has exactly the caps the README documents — so fencing, the ledger,
/// the leases, unfence and the lifecycle are all proven with those caps and no more.
#[tokio::test]
async fn the_service_user_has_exactly_the_caps_the_readme_documents() {
    let readme = std::fs::read_to_string(common::repo().join("README.md")).unwrap();
    let at = readme
        .find("ceph auth get-or-create client.rbdfence")
        .expect("the README documents the service's cephx user");
    let line = readme[at..].lines().nth(1).unwrap().trim();
    let caps: Vec<&str> = line.split('\'').collect();
    assert_eq!(caps.len(), 5, "mon '…' osd '…' expected: {line}");
    assert_eq!((caps[0].trim(), caps[2].trim()), ("mon", "osd"), "{line}");
    let out = common::ceph_cli(
        "ceph",
        &["auth", "get", "client.rbdfence", "--format", "json"],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let have = &v[0]["caps"];
    assert_eq!(have["mon"], caps[1], "{v}");
    assert_eq!(have["osd"], caps[3], "{v}");
    assert!(
        have.get("mgr").is_none() && have.get("mds").is_none(),
        "{v}"
    );
}
