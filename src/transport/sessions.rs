//! The session manager behind `/mcp`: rmcp's local one, telling the ceiling which session ids
//! this server issued (and which it closed), so only those earn their own ceiling bucket.
//!
//! Idle sessions are closed here, not by rmcp's worker: a `tools/call` on a session takes the
//! transport's direct path and never reaches the worker, whose idle timer would close a session
//! in steady use. Every request naming a live session touches it ([`TrackedSessions::touch`]);
//! [`TrackedSessions::sweep`] closes those untouched for [`SESSION_IDLE`].

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::Stream;
use rmcp::model::{ClientJsonRpcMessage, ServerJsonRpcMessage};
use rmcp::transport::streamable_http_server::session::local::{LocalSessionManager, SessionConfig};
use rmcp::transport::streamable_http_server::session::{
    RestoreOutcome, ServerSseMessage, SessionId, SessionManager,
};

use crate::ceiling::LiveSessions;

/// A session nobody used for this long is closed (rmcp's own default idle time).
pub const SESSION_IDLE: Duration = SessionConfig::DEFAULT_KEEP_ALIVE;

pub struct TrackedSessions {
    inner: LocalSessionManager,
    live: Arc<LiveSessions>,
    /// When each open session was last named by a request.
    last_used: dashmap::DashMap<SessionId, Instant>,
}

impl TrackedSessions {
    pub fn new(live: Arc<LiveSessions>) -> TrackedSessions {
        let mut inner = LocalSessionManager::default();
        inner.session_config.keep_alive = None;
        TrackedSessions { inner, live, last_used: Default::default() }
    }

    /// Records that a request named session `id` at `now`.
    pub fn touch(&self, id: &str, now: Instant) {
        if let Some(mut seen) = self.last_used.get_mut(id) {
            *seen = now;
        }
    }

    /// Closes every session untouched since `now - idle`.
    pub async fn sweep(&self, now: Instant, idle: Duration) {
        let stale: Vec<SessionId> = self
            .last_used
            .iter()
            .filter(|seen| now.saturating_duration_since(*seen.value()) >= idle)
            .map(|seen| seen.key().clone())
            .collect();
        for id in stale {
            tracing::debug!(session = %id, "closing an idle session");
            let _ = self.close_session(&id).await;
        }
    }
}

impl SessionManager for TrackedSessions {
    type Error = <LocalSessionManager as SessionManager>::Error;
    type Transport = <LocalSessionManager as SessionManager>::Transport;

    async fn create_session(&self) -> Result<(SessionId, Self::Transport), Self::Error> {
        let (id, transport) = self.inner.create_session().await?;
        self.live.issued(&id);
        self.last_used.insert(id.clone(), Instant::now());
        Ok((id, transport))
    }

    fn initialize_session(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> impl Future<Output = Result<ServerJsonRpcMessage, Self::Error>> + Send {
        self.inner.initialize_session(id, message)
    }

    fn has_session(&self, id: &SessionId) -> impl Future<Output = Result<bool, Self::Error>> + Send {
        self.inner.has_session(id)
    }

    async fn close_session(&self, id: &SessionId) -> Result<(), Self::Error> {
        self.live.closed(id);
        self.last_used.remove(id);
        self.inner.close_session(id).await
    }

    fn create_stream(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> impl Future<
        Output = Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error>,
    > + Send {
        self.inner.create_stream(id, message)
    }

    fn accept_message(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send {
        self.inner.accept_message(id, message)
    }

    fn create_standalone_stream(
        &self,
        id: &SessionId,
    ) -> impl Future<
        Output = Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error>,
    > + Send {
        self.inner.create_standalone_stream(id)
    }

    fn resume(
        &self,
        id: &SessionId,
        last_event_id: String,
    ) -> impl Future<
        Output = Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error>,
    > + Send {
        self.inner.resume(id, last_event_id)
    }

    fn restore_session(
        &self,
        id: SessionId,
    ) -> impl Future<Output = Result<RestoreOutcome<Self::Transport>, Self::Error>> + Send {
        self.inner.restore_session(id)
    }

    fn event_store(&self) -> Option<Arc<dyn rmcp::transport::streamable_http_server::session::EventStore>> {
        self.inner.event_store()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_session_in_use_stays_open_and_an_idle_one_is_closed() {
        let live = Arc::new(LiveSessions::new(100, 10));
        let sessions = TrackedSessions::new(live.clone());
        let (used, _used_transport) = sessions.create_session().await.unwrap();
        let (idle, _idle_transport) = sessions.create_session().await.unwrap();
        let later = Instant::now() + SESSION_IDLE;
        // Only direct-path tools/calls named `used` meanwhile: each touched it.
        sessions.touch(&used, later);
        sessions.sweep(later + Duration::from_secs(1), SESSION_IDLE).await;
        assert!(live.is_live(&used), "a session in use stays open");
        assert!(!live.is_live(&idle), "an idle session is closed");
        assert!(!sessions.has_session(&idle).await.unwrap());
    }
}
