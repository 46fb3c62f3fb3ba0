//! The in-flight futures of the concurrent dispatcher: a fixed set of slots,
//! each boxed once and reused, each with a waker of its own (also made once).
//!
//! Why not `FuturesUnordered`: it allocates a task node per future pushed,
//! i.e. per message. Here starting a handler writes it into a free slot in
//! place, and only slots that were woken are polled again.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// Which slots were woken (one bit per slot), and the dispatcher to wake.
struct Woken {
    bits: Vec<AtomicU64>,
    dispatcher: AtomicWaker,
}

struct SlotWaker {
    index: usize,
    woken: Arc<Woken>,
}

impl Wake for SlotWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.bits[self.index / 64].fetch_or(1 << (self.index % 64), Ordering::AcqRel);
        self.woken.dispatcher.wake();
    }
}

struct Slot<F> {
    future: Pin<Box<Option<F>>>,
    waker: Waker,
}

/// Up to `capacity` futures in flight.
pub(crate) struct Slots<F> {
    slots: Vec<Slot<F>>,
    free: Vec<usize>,
    busy: usize,
    woken: Arc<Woken>,
}

impl<F: Future<Output = ()>> Slots<F> {
    pub(crate) fn new(capacity: usize) -> Self {
        Slots {
            slots: Vec::with_capacity(capacity),
            free: Vec::with_capacity(capacity),
            busy: 0,
            woken: Arc::new(Woken {
                bits: (0..capacity.div_ceil(64))
                    .map(|_| AtomicU64::new(0))
                    .collect(),
                dispatcher: AtomicWaker::new(),
            }),
        }
    }

    /// Futures in flight.
    pub(crate) fn len(&self) -> usize {
        self.busy
    }

    /// Starts `future` in a free slot and polls it once: one that does not
    /// wait finishes here. The caller keeps `len() < capacity`.
    pub(crate) fn start(&mut self, future: F, cx: &mut Context<'_>) {
        self.woken.dispatcher.register(cx.waker());
        let index = match self.free.pop() {
            Some(i) => {
                self.slots[i].future.as_mut().set(Some(future));
                i
            }
            None => {
                let index = self.slots.len();
                assert!(
                    index < self.woken.bits.len() * 64,
                    "more futures started than slots"
                );
                let waker = Waker::from(Arc::new(SlotWaker {
                    index,
                    woken: self.woken.clone(),
                }));
                self.slots.push(Slot {
                    future: Box::pin(Some(future)),
                    waker,
                });
                index
            }
        };
        self.busy += 1;
        self.poll_slot(index);
    }

    /// Polls the slots woken since the last call, and registers `cx` to be
    /// woken when another one is.
    pub(crate) fn drive(&mut self, cx: &mut Context<'_>) {
        // Register before reading the bits: a wake in between is not lost.
        self.woken.dispatcher.register(cx.waker());
        for word in 0..self.woken.bits.len() {
            let mut bits = self.woken.bits[word].swap(0, Ordering::AcqRel);
            while bits != 0 {
                let bit = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let index = word * 64 + bit;
                if index < self.slots.len() {
                    self.poll_slot(index);
                }
            }
        }
    }

    fn poll_slot(&mut self, index: usize) {
        let slot = &mut self.slots[index];
        let Some(future) = slot.future.as_mut().as_pin_mut() else {
            return; // woken after it finished
        };
        let mut cx = Context::from_waker(&slot.waker);
        if future.poll(&mut cx).is_ready() {
            slot.future.as_mut().set(None);
            self.free.push(index);
            self.busy -= 1;
        }
    }
}

/// Waits until fewer than `limit` futures are in flight, driving them.
pub(crate) async fn below<F: Future<Output = ()>>(slots: &mut Slots<F>, limit: usize) {
    std::future::poll_fn(|cx| {
        slots.drive(cx);
        if slots.len() < limit {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn futures_run_to_completion_in_reused_slots() {
        let done = Arc::new(AtomicU64::new(0));
        let mut slots = Slots::new(3);
        for round in 0..4u64 {
            for i in 0..3u64 {
                let done = done.clone();
                let fut = async move {
                    tokio::time::sleep(Duration::from_millis(10 * (3 - i) + round)).await;
                    done.fetch_add(1, Ordering::Relaxed);
                };
                let mut fut = Some(fut);
                std::future::poll_fn(|cx| {
                    slots.start(fut.take().unwrap(), cx);
                    Poll::Ready(())
                })
                .await;
            }
            assert_eq!(slots.len(), 3);
            below(&mut slots, 1).await;
            assert_eq!(slots.len(), 0);
        }
        assert_eq!(done.load(Ordering::Relaxed), 12);
        assert_eq!(slots.slots.len(), 3, "slots are reused, not added");
    }

    #[tokio::test]
    async fn a_ready_future_finishes_when_started() {
        let mut slots = Slots::new(1);
        let mut fut = Some(async {});
        std::future::poll_fn(|cx| {
            slots.start(fut.take().unwrap(), cx);
            Poll::Ready(())
        })
        .await;
        assert_eq!(slots.len(), 0);
    }

    #[tokio::test]
    async fn more_than_64_slots() {
        let mut slots = Slots::new(130);
        let (tx, rx) = tokio::sync::watch::channel(false);
        for _ in 0..130 {
            let mut rx = rx.clone();
            let mut fut = Some(async move {
                let _ = rx.wait_for(|go| *go).await;
            });
            std::future::poll_fn(|cx| {
                slots.start(fut.take().unwrap(), cx);
                Poll::Ready(())
            })
            .await;
        }
        assert_eq!(slots.len(), 130);
        tx.send(true).unwrap();
        below(&mut slots, 1).await;
        assert_eq!(slots.len(), 0);
    }
}
