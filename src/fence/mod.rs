//! The fence engine: evidence, storage fence, sibling SSH kill, decision.
//!
//! `decision` is pure (no I/O) and decides; `driver` runs its steps through ports (Ceph,
//! SSH, ledger) under per-stage timeouts and a whole-fence deadline; `ssh` is the kill step;
//! `ledger` records every decision with its evidence before the reply; `unfence` lifts a
//! host's fences once they are no longer needed.

pub mod decision;
pub mod driver;
pub mod inventory;
pub mod ledger;
pub mod link;
pub mod record;
pub mod ssh;
pub mod unfence;
pub mod vm;
