//! A channel bounded in bytes rather than in items, for streams whose items range from a few
//! bytes to megabytes (a kernel's output lines): a count bound alone would let a few hundred
//! large items hold gigabytes.

use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

/// Items queued at most, whatever their size (the byte budget is the real bound).
const MAX_ITEMS: usize = 1024;

/// A channel holding at most `budget` bytes of items (as their senders size them). An item
/// larger than the whole budget is let through alone.
pub fn channel<T>(budget: u32) -> (Sender<T>, Receiver<T>) {
    let (tx, rx) = mpsc::channel(MAX_ITEMS);
    let budget = budget.max(1);
    let sem = Arc::new(Semaphore::new(budget as usize));
    (Sender { tx, sem, budget }, Receiver { rx })
}

#[derive(Debug)]
pub struct Sender<T> {
    tx: mpsc::Sender<(T, OwnedSemaphorePermit)>,
    sem: Arc<Semaphore>,
    budget: u32,
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        Sender { tx: self.tx.clone(), sem: self.sem.clone(), budget: self.budget }
    }
}

impl<T> Sender<T> {
    /// Waits until `size` bytes fit, then queues `item`. `Err` gives it back when the receiver
    /// is gone.
    pub async fn send(&self, item: T, size: usize) -> Result<(), T> {
        let n = u32::try_from(size).unwrap_or(u32::MAX).clamp(1, self.budget);
        let Ok(permit) = self.sem.clone().acquire_many_owned(n).await else { return Err(item) };
        self.tx.send((item, permit)).await.map_err(|e| e.0.0)
    }
}

#[derive(Debug)]
pub struct Receiver<T> {
    rx: mpsc::Receiver<(T, OwnedSemaphorePermit)>,
}

impl<T> Receiver<T> {
    /// The next item; its bytes are released to the senders as it is handed over.
    pub async fn recv(&mut self) -> Option<T> {
        self.rx.recv().await.map(|(item, _permit)| item)
    }

    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        self.rx.poll_recv(cx).map(|r| r.map(|(item, _permit)| item))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn senders_wait_for_bytes_not_items() {
        let (tx, mut rx) = channel::<Vec<u8>>(100);
        tx.send(vec![0; 60], 60).await.unwrap();
        // 60 + 60 > 100: the second waits until the first is taken.
        let blocked = tokio::time::timeout(Duration::from_millis(50), tx.send(vec![1; 60], 60));
        assert!(blocked.await.is_err());
        assert_eq!(rx.recv().await.unwrap().len(), 60);
        tx.send(vec![1; 60], 60).await.unwrap();
        assert_eq!(rx.recv().await.unwrap()[0], 1);
        // An item bigger than the budget goes through alone.
        tx.send(vec![2; 500], 500).await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(50), tx.send(vec![3], 1)).await.is_err()
        );
        assert_eq!(rx.recv().await.unwrap().len(), 500);
        drop(rx);
        assert_eq!(tx.send(vec![4], 1).await, Err(vec![4]));
    }
}
