//! The error of a Ceph call: which operation, on what, the errno and Ceph's own message.

use std::fmt;

use super::errno;

/// The librados operation that failed. Bounded: it doubles as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    LibraryVersion,
    Create,
    ConfReadFile,
    ConfSet,
    Connect,
    MonCommand,
    WaitForLatestOsdmap,
    OsdmapEpoch,
    GetAddrs,
    IoCtxCreate,
    LocateImage,
    ReadHeader,
    BlocklistAdd,
    BlocklistRm,
    BlocklistLs,
    BlocklistProbe,
    ObjectWrite,
    ObjectRead,
    ObjectList,
    ObjectLock,
}

impl Op {
    /// The operation as operators and metric labels name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::LibraryVersion => "library version",
            Op::Create => "create",
            Op::ConfReadFile => "conf read",
            Op::ConfSet => "conf set",
            Op::Connect => "connect",
            Op::MonCommand => "mon command",
            Op::WaitForLatestOsdmap => "wait for latest osdmap",
            Op::OsdmapEpoch => "osdmap epoch",
            Op::GetAddrs => "client addresses",
            Op::IoCtxCreate => "open pool",
            Op::LocateImage => "locate image",
            Op::ReadHeader => "read image header",
            Op::BlocklistAdd => "blocklist add",
            Op::BlocklistRm => "blocklist rm",
            Op::BlocklistLs => "blocklist ls",
            Op::BlocklistProbe => "blocklist permission probe",
            Op::ObjectWrite => "write object",
            Op::ObjectRead => "read object",
            Op::ObjectList => "list objects",
            Op::ObjectLock => "lock object",
        }
    }

    /// A snake_case label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Op::LibraryVersion => "library_version",
            Op::Create => "create",
            Op::ConfReadFile => "conf_read_file",
            Op::ConfSet => "conf_set",
            Op::Connect => "connect",
            Op::MonCommand => "mon_command",
            Op::WaitForLatestOsdmap => "wait_for_latest_osdmap",
            Op::OsdmapEpoch => "osdmap_epoch",
            Op::GetAddrs => "getaddrs",
            Op::IoCtxCreate => "ioctx_create",
            Op::LocateImage => "locate_image",
            Op::ReadHeader => "read_header",
            Op::BlocklistAdd => "blocklist_add",
            Op::BlocklistRm => "blocklist_rm",
            Op::BlocklistLs => "blocklist_ls",
            Op::BlocklistProbe => "blocklist_probe",
            Op::ObjectWrite => "object_write",
            Op::ObjectRead => "object_read",
            Op::ObjectList => "object_list",
            Op::ObjectLock => "object_lock",
        }
    }
}

impl Op {
    /// A call served by the OSDs (object reads and writes), not the monitors.
    pub fn is_osd(self) -> bool {
        matches!(
            self,
            Op::LocateImage
                | Op::ReadHeader
                | Op::ObjectWrite
                | Op::ObjectRead
                | Op::ObjectList
                | Op::ObjectLock
        )
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed Ceph call. `Display`: `blocklist add 127.0.0.2:0/0 failed: EACCES (access denied)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CephError {
    pub op: Op,
    /// What the call was about (`rbd/vm-root`, `127.0.0.2:0/0`); may be empty.
    pub target: String,
    /// Positive errno.
    pub errno: i32,
    /// Ceph's own message when it gave one (a mon command's status string), else the C
    /// library's description of the errno.
    pub message: String,
}

impl CephError {
    /// From a negative return code of a C call; `message` empty means "describe the errno".
    pub fn from_code(
        op: Op,
        target: impl Into<String>,
        code: i64,
        message: impl Into<String>,
    ) -> Self {
        let errno = i32::try_from(code.unsigned_abs()).unwrap_or(libc::EIO);
        Self::new(op, target, errno, message)
    }

    pub fn new(op: Op, target: impl Into<String>, errno: i32, message: impl Into<String>) -> Self {
        let mut message = message.into().trim().to_string();
        if message.is_empty() {
            message = errno::describe(errno);
        }
        CephError {
            op,
            target: target.into(),
            errno,
            message,
        }
    }

    /// The errno's symbolic name (`ENOENT`).
    pub fn errno_name(&self) -> String {
        errno::name(self.errno)
    }

    pub fn is_not_found(&self) -> bool {
        self.errno == libc::ENOENT
    }

    pub fn is_timeout(&self) -> bool {
        self.errno == libc::ETIMEDOUT
    }
}

impl fmt::Display for CephError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.target.is_empty() {
            write!(
                f,
                "{} failed: {} ({})",
                self.op,
                self.errno_name(),
                self.message
            )
        } else {
            write!(
                f,
                "{} {} failed: {} ({})",
                self.op,
                self.target,
                self.errno_name(),
                self.message
            )
        }
    }
}

impl std::error::Error for CephError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_op_target_errno_and_message() {
        let e = CephError::from_code(Op::BlocklistAdd, "127.0.0.2:0/0", -13, "access denied");
        assert_eq!(
            e.to_string(),
            "blocklist add 127.0.0.2:0/0 failed: EACCES (access denied)"
        );
        let e = CephError::from_code(Op::LocateImage, "rbd/x", -2, "");
        assert_eq!(
            e.to_string(),
            "locate image rbd/x failed: ENOENT (No such file or directory)"
        );
        assert!(e.is_not_found());
        let e = CephError::from_code(Op::Connect, "", -110, "");
        assert!(e.is_timeout());
        assert_eq!(
            e.to_string(),
            "connect failed: ETIMEDOUT (Connection timed out)"
        );
    }
}
