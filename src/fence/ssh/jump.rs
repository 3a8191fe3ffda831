//! Jump sessions shared by the tunnels that run through them at the same time.
//!
//! When a rack fails, every failed host is reached through the same bystander sibling. One
//! login to the sibling per failed host costs the sibling a key exchange and an sshd process
//! each, and a burst of them runs into sshd's `MaxStartups` (by default it starts dropping new
//! connections at 10 unauthenticated ones). So the tunnels opened at the same time through
//! one jump host share one login to it: [`Jumps`] hands out the session that is open, or
//! lets every caller wait for the one being opened.
//!
//! # Guarantees
//! - A jump session lives only while a tunnel through it is held (a [`super::Connected`]);
//!   the last holder closes it. Nothing is kept for later: there is no idle session whose
//!   death would be found only when the next fence needs it.
//! - A session that is found closed is never handed out: the caller that finds it forgets it
//!   and opens a new one. A login that failed is not remembered either: the callers waiting
//!   for it get its error (they would have failed the same way, within the same budget), and
//!   the next caller tries again.
//! - The login is the one [`super::connect`] makes: the host key verified against
//!   `known_hosts`, public-key authentication, bounded by `connect_timeout` from the start of
//!   the attempt that opens it (a caller joining late waits at most the rest of it).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::OnceCell;

use super::{Credentials, Session, SshError, SshSettings, SshTarget, close, open_direct};

/// The jump sessions open now, by jump host. Cheap to clone (shared).
#[derive(Clone, Default)]
pub struct Jumps {
    open: Arc<Mutex<HashMap<JumpKey, Weak<Jump>>>>,
}

/// A jump host as the pool knows it: inventory uuid and ssh address.
type JumpKey = (String, SocketAddr);

/// One login to a jump host, being opened or open; shared by the tunnels through it.
pub(super) struct Jump {
    key: JumpKey,
    session: OnceCell<Result<Session, SshError>>,
}

impl Jump {
    /// The open session. Only called on a `Jump` that [`Jumps::get`] returned, whose login
    /// succeeded.
    pub(super) fn session(&self) -> Option<&Session> {
        match self.session.get() {
            Some(Ok(session)) => Some(session),
            _ => None,
        }
    }

    /// Closes the session if `jump` is its last holder; otherwise only lets go of it.
    pub(super) async fn release(jump: Arc<Jump>) {
        if let Some(last) = Arc::into_inner(jump)
            && let Some(Ok(session)) = last.session.into_inner()
        {
            close(session).await;
        }
    }
}

impl Jumps {
    /// How many jump sessions are held now (open or being opened).
    pub fn held(&self) -> usize {
        self.lock()
            .values()
            .filter(|w| w.strong_count() > 0)
            .count()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<JumpKey, Weak<Jump>>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The entry for `key`: the one held now, or a new empty one.
    fn entry(&self, key: &JumpKey) -> Arc<Jump> {
        let mut map = self.lock();
        map.retain(|_, w| w.strong_count() > 0);
        if let Some(jump) = map.get(key).and_then(Weak::upgrade) {
            return jump;
        }
        let jump = Arc::new(Jump {
            key: key.clone(),
            session: OnceCell::new(),
        });
        map.insert(key.clone(), Arc::downgrade(&jump));
        jump
    }

    /// Forgets `jump` unless the pool already holds another entry for its host.
    fn forget(&self, jump: &Arc<Jump>) {
        let mut map = self.lock();
        if map
            .get(&jump.key)
            .is_some_and(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(jump)))
        {
            map.remove(&jump.key);
        }
    }

    /// A logged-in session to `jump`: the one open now, the one being opened (waited for),
    /// or a new one.
    pub(super) async fn get(
        &self,
        settings: &SshSettings,
        creds: &Arc<Credentials>,
        jump: &SshTarget,
    ) -> Result<Arc<Jump>, SshError> {
        let key = (jump.host_uuid.clone(), jump.addr);
        // A session found closed is replaced once; a new one found closed at once is a
        // failure of the jump host like any other.
        for _ in 0..2 {
            let entry = self.entry(&key);
            let result = entry
                .session
                .get_or_init(|| open_direct(settings, creds, jump))
                .await;
            match result {
                Ok(session) if !session.is_closed() => return Ok(entry),
                Ok(_) => self.forget(&entry),
                Err(e) => {
                    let e = e.clone();
                    self.forget(&entry);
                    return Err(e);
                }
            }
        }
        Err(SshError::Handshake {
            peer: jump.into(),
            message: "the jump session closed as soon as it was opened".into(),
        })
    }
}
