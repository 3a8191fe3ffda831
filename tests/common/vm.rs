//! A real qemu VM whose disk is an RBD image, opened from a chosen 127.x address (the
//! bind-address shim), driven through QMP. Ended by its pid when dropped.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use super::{TestImage, bind_shim, cluster, signal};

pub struct Vm {
    pub uuid: String,
    pub pid: i32,
    dir: tempfile::TempDir,
}

/// How a launcher starts qemu: the name argv\[0\] carries and where the uuid goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launch {
    /// `qemu-system-x86_64 … -uuid UUID`, as libvirt does.
    Libvirt,
    /// Through a symlink named `kvm` (Proxmox's `/usr/bin/kvm`), with `-uuid`.
    KvmName,
    /// The uuid only in `-smbios type=1,uuid=UUID` (Proxmox), no `-uuid`.
    SmbiosOnly,
}

impl Vm {
    /// Starts qemu (paused CPU, no display) with `image` as its virtio disk, its librados
    /// client bound to `ip`. Returns once qemu has daemonized (the disk is open).
    pub fn start(image: &TestImage, ip: &str, uuid: &str) -> Vm {
        Self::start_as(image, ip, uuid, Launch::Libvirt)
    }

    /// As [`Vm::start`], launched the way `launch` says.
    pub fn start_as(image: &TestImage, ip: &str, uuid: &str, launch: Launch) -> Vm {
        let dir = tempfile::Builder::new()
            .prefix("rbdfence-vm-")
            .tempdir()
            .unwrap();
        let program = match launch {
            Launch::KvmName => {
                let link = dir.path().join("kvm");
                std::os::unix::fs::symlink("/usr/bin/qemu-system-x86_64", &link).unwrap();
                link
            }
            Launch::Libvirt | Launch::SmbiosOnly => PathBuf::from("qemu-system-x86_64"),
        };
        let uuid_args: Vec<String> = match launch {
            Launch::SmbiosOnly => vec![
                "-smbios".into(),
                format!("type=1,manufacturer=test,uuid={uuid}"),
            ],
            Launch::Libvirt | Launch::KvmName => vec!["-uuid".into(), uuid.into()],
        };
        let pidfile = dir.path().join("qemu.pid");
        let qmp = dir.path().join("qmp.sock");
        let drive = format!(
            "file=rbd:{}:conf={}:id=admin,format=raw,if=virtio,cache=none",
            image.name(),
            cluster().conf.display()
        );
        let out = Command::new(&program)
            .args(["-S", "-nodefaults", "-display", "none", "-m", "64"])
            .args(["-name", &format!("guest={}", &uuid[..8])])
            .args(&uuid_args)
            .args(["-drive", &drive])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .args(["-daemonize", "-pidfile"])
            .arg(&pidfile)
            .env("LD_PRELOAD", bind_shim())
            .env("RBDFENCE_BIND_ADDR", ip)
            .output()
            .unwrap_or_else(|e| panic!("cannot run qemu-system-x86_64: {e}"));
        assert!(
            out.status.success(),
            "qemu failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        Vm {
            uuid: uuid.to_string(),
            pid,
            dir,
        }
    }

    fn qmp_path(&self) -> PathBuf {
        self.dir.path().join("qmp.sock")
    }

    /// Runs one HMP command through QMP; returns its text output.
    pub fn hmp(&self, command: &str) -> String {
        let mut s = UnixStream::connect(self.qmp_path()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).unwrap(); // greeting
        writeln!(s, "{}", serde_json::json!({"execute": "qmp_capabilities"})).unwrap();
        line.clear();
        r.read_line(&mut line).unwrap();
        let cmd = serde_json::json!({"execute": "human-monitor-command", "arguments": {"command-line": command}});
        writeln!(s, "{cmd}").unwrap();
        loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if let Some(ret) = v.get("return") {
                return ret.as_str().unwrap_or_default().to_string();
            }
            assert!(v.get("error").is_none(), "QMP error: {line}");
        }
    }

    /// Writes 4 KiB of `byte` at `offset` from inside qemu (takes the exclusive lock).
    pub fn write(&self, offset: u64, byte: u8) -> String {
        self.hmp(&format!(
            "qemu-io virtio0 \"write -P 0x{byte:02x} {offset} 4k\""
        ))
    }

    /// Whether the qemu process still exists as a live (non-zombie) process.
    pub fn alive(&self) -> bool {
        alive(self.pid)
    }

    pub fn freeze(&self) {
        signal(self.pid, libc::SIGSTOP);
    }

    pub fn thaw(&self) {
        signal(self.pid, libc::SIGCONT);
    }

    /// Waits until the process is gone or a zombie.
    pub fn wait_gone(&self, within: Duration) -> bool {
        let t = Instant::now();
        while t.elapsed() < within {
            if !self.alive() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.alive() {
            signal(self.pid, libc::SIGKILL);
            self.wait_gone(Duration::from_secs(5));
        }
    }
}

/// Live = exists and not a zombie.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                != Some("Z")
        }
        Err(_) => false,
    }
}

/// One byte of the image at `offset`, read by exporting it with the `rbd` CLI.
pub fn image_byte(image: &TestImage, offset: u64) -> u8 {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("img");
    let status = Command::new("rbd")
        .arg("--conf")
        .arg(&cluster().conf)
        .args(["export", "--no-progress", &image.name()])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "rbd export failed");
    let data = std::fs::read(&out).unwrap();
    data[offset as usize]
}
