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
        Self::start_with(&cluster().conf, &image.name(), Some(ip), uuid, launch)
    }

    /// Starts qemu on image `image` of the cluster `conf` names. `bind`: the 127.x address its
    /// librados client comes from (the bind-address shim); `None` for a qemu started inside a
    /// test host's network namespace, whose own address it then uses.
    pub fn start_with(
        conf: &std::path::Path,
        image: &str,
        bind: Option<&str>,
        uuid: &str,
        launch: Launch,
    ) -> Vm {
        Self::start_with_extra(conf, image, bind, uuid, launch, &[])
    }

    /// As [`Vm::start_with`], with extra qemu arguments (e.g. a second drive).
    pub fn start_with_extra(
        conf: &std::path::Path,
        image: &str,
        bind: Option<&str>,
        uuid: &str,
        launch: Launch,
        extra: &[String],
    ) -> Vm {
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
            "file=rbd:{image}:conf={}:id=admin,format=raw,if=virtio,cache=none",
            conf.display()
        );
        let mut cmd = Command::new(&program);
        if let Some(ip) = bind {
            cmd.env("LD_PRELOAD", bind_shim())
                .env("RBDFENCE_BIND_ADDR", ip);
        }
        let out = cmd
            .args(["-S", "-nodefaults", "-display", "none", "-m", "64"])
            .args(["-name", &format!("guest={}", &uuid[..8])])
            .args(&uuid_args)
            .args(["-drive", &drive])
            .args(extra)
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .args(["-daemonize", "-pidfile"])
            .arg(&pidfile)
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
        self.try_hmp(command, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("HMP {command:?}: {e}"))
    }

    /// Runs one HMP command through QMP, waiting at most `within` for each reply line: `Err`
    /// when qemu is gone, or does not answer in time (its disk I/O hangs on a lost network).
    pub fn try_hmp(&self, command: &str, within: Duration) -> Result<String, String> {
        let e = |what: &str, err: std::io::Error| format!("{what}: {err}");
        let mut s = UnixStream::connect(self.qmp_path()).map_err(|err| e("connect", err))?;
        s.set_read_timeout(Some(within))
            .map_err(|err| e("set timeout", err))?;
        let mut r = BufReader::new(s.try_clone().map_err(|err| e("clone", err))?);
        let mut line = String::new();
        let next = |r: &mut BufReader<UnixStream>, line: &mut String| {
            line.clear();
            match r.read_line(line) {
                Ok(0) => Err("qemu closed its monitor".to_string()),
                Ok(_) => Ok(()),
                Err(err) => Err(e("read", err)),
            }
        };
        next(&mut r, &mut line)?; // greeting
        writeln!(s, "{}", serde_json::json!({"execute": "qmp_capabilities"}))
            .map_err(|err| e("write", err))?;
        next(&mut r, &mut line)?;
        let cmd = serde_json::json!({"execute": "human-monitor-command", "arguments": {"command-line": command}});
        writeln!(s, "{cmd}").map_err(|err| e("write", err))?;
        loop {
            next(&mut r, &mut line)?;
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if let Some(ret) = v.get("return") {
                return Ok(ret.as_str().unwrap_or_default().to_string());
            }
            if v.get("error").is_some() {
                return Err(format!("QMP error: {line}"));
            }
        }
    }

    /// Writes 4 KiB of `byte` at `offset` from inside qemu (takes the exclusive lock).
    pub fn write(&self, offset: u64, byte: u8) -> String {
        self.hmp(&format!(
            "qemu-io virtio0 \"write -P 0x{byte:02x} {offset} 4k\""
        ))
    }

    /// As [`Vm::write`], bounded by `within`: `Err` when qemu is gone or does not answer.
    pub fn try_write(&self, offset: u64, byte: u8, within: Duration) -> Result<String, String> {
        self.try_hmp(
            &format!("qemu-io virtio0 \"write -P 0x{byte:02x} {offset} 4k\""),
            within,
        )
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
    image_byte_of(&cluster().conf, &image.name(), offset)
}

/// One byte at `offset` of image `image` of the cluster `conf` names (`rbd export`, as admin,
/// from the calling thread's network namespace).
pub fn image_byte_of(conf: &std::path::Path, image: &str, offset: u64) -> u8 {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("img");
    let status = Command::new("rbd")
        .arg("--conf")
        .arg(conf)
        .args(["export", "--no-progress", image])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "rbd export failed");
    let data = std::fs::read(&out).unwrap();
    data[offset as usize]
}
