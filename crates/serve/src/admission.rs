//! Bounded concurrency: a fixed number of workers score images, a bounded number of requests wait
//! for them, and a request beyond both is refused at once (the caller answers 503).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct Admission {
    workers: Arc<Semaphore>,
    /// Requests admitted and not finished: waiting for a worker or being scored.
    admitted: AtomicUsize,
    capacity: usize,
    waiting: AtomicUsize,
    pub worker_count: usize,
    pub queue_capacity: usize,
}

/// A request's place in the service; dropping it frees the place.
pub struct Ticket {
    admission: Arc<Admission>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.admission.admitted.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Counts a request as waiting while it exists (also when the wait is cancelled by a timeout).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Admission {
    pub fn new(workers: usize, queue: usize) -> Arc<Admission> {
        Arc::new(Admission {
            workers: Arc::new(Semaphore::new(workers)),
            admitted: AtomicUsize::new(0),
            capacity: workers + queue,
            waiting: AtomicUsize::new(0),
            worker_count: workers,
            queue_capacity: queue,
        })
    }

    /// A place for one more request, or None when every worker is busy and the queue is full.
    pub fn try_admit(self: &Arc<Self>) -> Option<Ticket> {
        self.admitted
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < self.capacity).then_some(n + 1))
            .ok()
            .map(|_| Ticket { admission: self.clone() })
    }

    /// Requests waiting for a worker.
    pub fn queue_depth(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Workers scoring now.
    pub fn busy_workers(&self) -> usize {
        self.worker_count - self.workers.available_permits()
    }
}

impl Ticket {
    /// Waits for a free worker; the permit is held until the scoring ends.
    pub async fn worker(&self) -> OwnedSemaphorePermit {
        let a = &self.admission;
        a.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&a.waiting);
        a.workers.clone().acquire_owned().await.expect("the worker semaphore is never closed")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_workers_plus_queue_then_refuses_until_a_place_frees() {
        let a = Admission::new(2, 1);
        let tickets: Vec<Ticket> = (0..3).map(|_| a.try_admit().expect("a place")).collect();
        assert!(a.try_admit().is_none());
        drop(tickets);
        assert!(a.try_admit().is_some());
    }
}
