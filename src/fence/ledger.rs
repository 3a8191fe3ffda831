//! The fence ledger: every decision with its evidence, recorded before the reply is sent.
//!
//! Kept in memory (the most recent [`MEMORY_LIMIT`] records, for `GET /v1/fences` and
//! `request_id` replays) and, when configured, appended to a JSON-lines file and synced to
//! disk before the caller may reply. Earlier records in the file are loaded at start-up.

use std::collections::VecDeque;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::record::FenceRecord;

/// Records kept in memory.
pub const MEMORY_LIMIT: usize = 10_000;
/// How long one durable write may take before it counts as failed: a hung file system must
/// not wedge a fence.
pub const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
#[error("ledger {path}: {source}")]
pub struct LedgerError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

#[derive(Clone, Default)]
pub struct Ledger {
    file: Option<PathBuf>,
    records: Arc<Mutex<VecDeque<FenceRecord>>>,
}

impl Ledger {
    /// A ledger in memory only.
    pub fn in_memory() -> Ledger {
        Ledger::default()
    }

    /// A ledger backed by `path` (created if missing); loads the records already there.
    pub fn open(path: PathBuf) -> Result<Ledger, LedgerError> {
        let err = |source| LedgerError {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let mut records = VecDeque::new();
        match std::fs::File::open(&path) {
            Ok(f) => {
                for (n, line) in std::io::BufReader::new(f).lines().enumerate() {
                    let line = line.map_err(err)?;
                    if line.trim().is_empty() {
                        continue;
                    }
                    match serde_json::from_str::<FenceRecord>(&line) {
                        Ok(r) => push_bounded(&mut records, r),
                        Err(e) => {
                            tracing::warn!(path = %path.display(), line = n + 1, error = %e, "skipping unreadable ledger line")
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
        Ok(Ledger {
            file: Some(path),
            records: Arc::new(Mutex::new(records)),
        })
    }

    /// Records one decision: appended and synced to the file first (when there is one), then
    /// kept in memory. Blocking file I/O runs off the async threads, bounded by
    /// [`WRITE_TIMEOUT`] (a write still hanging then is left to its thread and counts as failed).
    pub async fn record(&self, record: FenceRecord) -> Result<(), LedgerError> {
        if let Some(path) = self.file.clone() {
            let line = serde_json::to_string(&record).map_err(|e| LedgerError {
                path: path.clone(),
                source: std::io::Error::other(e),
            })?;
            let p = path.clone();
            let write = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&p)?;
                f.write_all(format!("{line}\n").as_bytes())?;
                f.sync_data()
            });
            let written = match tokio::time::timeout(WRITE_TIMEOUT, write).await {
                Ok(joined) => joined.unwrap_or_else(|e| Err(std::io::Error::other(e.to_string()))),
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no write within {WRITE_TIMEOUT:?}"),
                )),
            };
            written.map_err(|source| LedgerError { path, source })?;
        }
        push_bounded(&mut self.lock(), record);
        Ok(())
    }

    /// Records a deny that must not be lost although the ledger may be failing (a
    /// `ledger-failed` or `internal-error` deny): durably if the ledger takes it, else at least
    /// in memory (so a replay of its `request_id` does not act again) and in the error log.
    pub async fn record_deny(&self, record: FenceRecord) {
        if let Err(e) = self.record(record.clone()).await {
            tracing::error!(
                fence_id = %record.reply.fence_id,
                error = %e,
                record = %serde_json::to_string(&record).unwrap_or_default(),
                "the ledger cannot record this deny; kept in memory only"
            );
            push_bounded(&mut self.lock(), record);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<FenceRecord>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most recent records, newest first.
    pub fn recent(&self, limit: usize) -> Vec<FenceRecord> {
        self.lock().iter().rev().take(limit).cloned().collect()
    }

    pub fn get(&self, fence_id: &str) -> Option<FenceRecord> {
        self.lock()
            .iter()
            .rev()
            .find(|r| r.reply.fence_id == fence_id)
            .cloned()
    }

    /// The recorded answer to an earlier request with this `request_id`.
    pub fn by_request_id(&self, request_id: &str) -> Option<FenceRecord> {
        self.lock()
            .iter()
            .rev()
            .find(|r| r.request_id.as_deref() == Some(request_id))
            .cloned()
    }
}

fn push_bounded(records: &mut VecDeque<FenceRecord>, r: FenceRecord) {
    if records.len() >= MEMORY_LIMIT {
        records.pop_front();
    }
    records.push_back(r);
}
