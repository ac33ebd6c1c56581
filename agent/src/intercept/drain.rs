//! Draining after a hand-over: the connections this agent still serves finish what they are
//! doing and go, so that their clients' next requests reach the new agent.
//!
//! Once draining, every HTTP/1.1 answer carries `Connection: close` (the client opens its next
//! connection, which the new agent accepts) and every HTTP/2 connection gets GOAWAY (streams in
//! flight finish); at the deadline, whatever is left — idle keep-alive connections, SSE streams
//! — is closed.

use tokio::sync::watch;

#[derive(Debug)]
pub struct Drain {
    started: watch::Sender<bool>,
    deadline: watch::Sender<bool>,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            started: watch::channel(false).0,
            deadline: watch::channel(false).0,
        }
    }
}

impl Drain {
    /// From now on, answers close their connections.
    pub fn start(&self) {
        self.started.send_replace(true);
    }

    /// Close every connection still open now.
    pub fn force(&self) {
        self.started.send_replace(true);
        self.deadline.send_replace(true);
    }

    pub fn is_draining(&self) -> bool {
        *self.started.borrow()
    }

    /// Resolves once draining has started.
    pub async fn started(&self) {
        let mut rx = self.started.subscribe();
        let _ = rx.wait_for(|v| *v).await;
    }

    /// Resolves at the deadline.
    pub async fn deadline(&self) {
        let mut rx = self.deadline.subscribe();
        let _ = rx.wait_for(|v| *v).await;
    }
}
