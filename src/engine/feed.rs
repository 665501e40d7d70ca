//! Zone states as the engine commits them, for readers in the same
//! process: the status page.
//!
//! Why: the page otherwise follows KV `presence` through nats-server, so
//! every zone write the engine makes is pushed back to the daemon that
//! made it, through one more consumer, and read again. On a busy site
//! that was most of what an open page cost (docs/PERFORMANCE.md, "Status
//! pages open"). Here each commit's writes are handed over in memory, after
//! the leaf has acknowledged them, with the revisions the leaf gave them;
//! a reader that wants them must still take its snapshot from KV and
//! follow KV wherever the feed cannot vouch for completeness (before its
//! first batch, after it lagged, while no engine here is writing).
//!
//! The feed is open while this instance's engine runs as the writer and
//! closed when it stops (lease lost, daemon stopping) or when it writes
//! around the feed (`forget-zone` purges a key): a reader then sees its
//! channel close and goes back to KV.

use bytes::Bytes;
use std::sync::Arc;
use tokio::sync::{broadcast, watch};

/// Batches a reader may fall behind by before it is told it lagged.
const CAPACITY: usize = 256;

/// One key of KV `presence` as a commit left it.
#[derive(Clone, Debug)]
pub struct Committed {
    pub key: String,
    /// The revision the leaf gave the write (its stream sequence).
    pub revision: u64,
    /// The value written; `None` for a deletion.
    pub value: Option<Bytes>,
}

/// One commit's writes, in revision order.
pub type Batch = Arc<[Committed]>;

/// The open feed, if any: a reader subscribes to the sender it holds.
pub type Current = Option<broadcast::Sender<Batch>>;

/// Where the engine's runner opens the feed and readers find it.
#[derive(Debug)]
pub struct Feed {
    current: watch::Sender<Current>,
}

impl Default for Feed {
    fn default() -> Self {
        Feed {
            current: watch::Sender::new(None),
        }
    }
}

impl Feed {
    /// Opens a new feed (closing the one before, if any).
    pub fn open(self: &Arc<Self>) -> Publisher {
        let (tx, _) = broadcast::channel(CAPACITY);
        self.current.send_replace(Some(tx.clone()));
        Publisher {
            tx: Some(tx),
            feed: Arc::clone(self),
        }
    }

    /// The feed as it is opened and closed.
    pub fn watch(&self) -> watch::Receiver<Current> {
        self.current.subscribe()
    }

    /// Readers of the open feed.
    pub fn readers(&self) -> usize {
        self.current
            .borrow()
            .as_ref()
            .map_or(0, |tx| tx.receiver_count())
    }
}

/// The runner's end of an open feed; dropping it closes the feed.
pub struct Publisher {
    tx: Option<broadcast::Sender<Batch>>,
    feed: Arc<Feed>,
}

impl Publisher {
    /// Whether anyone reads: build a batch only then.
    pub fn wanted(&self) -> bool {
        self.tx.as_ref().is_some_and(|tx| tx.receiver_count() > 0)
    }

    pub fn send(&self, batch: Vec<Committed>) {
        if let (false, Some(tx)) = (batch.is_empty(), self.tx.as_ref()) {
            let _ = tx.send(batch.into());
        }
    }

    /// The engine wrote around the feed: readers start over from KV, and
    /// a new feed opens for what follows.
    pub fn restart(&mut self) {
        self.close();
        let reopened = self.feed.open();
        *self = reopened;
    }

    fn close(&mut self) {
        if let Some(tx) = self.tx.take() {
            self.feed.current.send_if_modified(|c| {
                if c.as_ref().is_some_and(|open| open.same_channel(&tx)) {
                    *c = None;
                    true
                } else {
                    false
                }
            });
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, revision: u64) -> Committed {
        Committed {
            key: key.into(),
            revision,
            value: Some(Bytes::from_static(b"{}")),
        }
    }

    /// A reader receives what is sent while the feed is open, and sees it
    /// close when the runner's end is dropped or restarted.
    #[tokio::test]
    async fn readers_see_batches_then_the_feed_close() {
        let feed = Arc::new(Feed::default());
        assert!(feed.watch().borrow().is_none(), "closed until opened");
        let mut publisher = feed.open();
        assert!(!publisher.wanted(), "nobody reads yet");
        let mut rx = feed.watch().borrow().as_ref().unwrap().subscribe();
        assert!(publisher.wanted());
        assert_eq!(feed.readers(), 1);
        publisher.send(vec![put("hall", 7), put("kitchen", 8)]);
        let batch = rx.recv().await.unwrap();
        assert_eq!(batch.iter().map(|c| c.revision).collect::<Vec<_>>(), [7, 8]);
        publisher.restart();
        assert!(matches!(
            rx.recv().await,
            Err(broadcast::error::RecvError::Closed)
        ));
        let mut rx = feed.watch().borrow().as_ref().unwrap().subscribe();
        drop(publisher);
        assert!(feed.watch().borrow().is_none(), "closed with its runner");
        assert!(matches!(
            rx.recv().await,
            Err(broadcast::error::RecvError::Closed)
        ));
    }
}
