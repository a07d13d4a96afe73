//! Acks of one consumer channel, sent together.
//!
//! Every ack is a frame that lapin's I/O loop writes and RabbitMQ's channel
//! process parses; at tens of thousands of messages a second those frames
//! cost both more CPU than the rest of the delivery. The engine settles
//! deliveries out of order but nearly in order, so most acks can be folded
//! into one `basic.ack(multiple = true)`:
//!
//! - A delivery handed out and not yet settled is *open*. The lowest open
//!   tag is the *floor*.
//! - An ack is *held*. Held tags below the floor go out as one
//!   `basic.ack(multiple)` of the highest of them: everything at or below
//!   it is settled, so the multiple ack covers exactly the held ones.
//! - A held tag above the floor waits for the floor to settle, for at most
//!   the configured delay, or until `limit` are held; then the held tags go
//!   out one by one, as without batching.
//! - Nacks and rejects go out alone at once; their tag stays open until
//!   the frame is written, so no multiple ack can cover it first.
//! - A multiple ack covers every unacked delivery of the channel, not only
//!   the ones the batcher knows: a tag that was never handed out (skipped
//!   between two handed-out tags) is *unseen*, and no multiple ack passes
//!   the lowest unseen tag for the rest of the channel incarnation. Such a
//!   delivery sits in some client buffer; acking it would drop a message
//!   nobody handled.
//! - One task at a time writes ack frames (the others' acks are held and
//!   picked up by its next round), so multiple acks go out in rising order.
//!
//! A held ack is lost if the connection drops before it is written; the
//! broker then delivers the message again, and the dedup record answers it
//! as a duplicate. Closing the broker drains first: it writes what is held
//! and waits for a writer at work (the timer's, say) to finish. lapin's recovery restarts delivery tags at 1 on a fresh
//! channel incarnation: a tag at or below the last one seen starts afresh
//! (the old incarnation's ackers are poisoned and its deliveries come back).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::Acker;
use lapin::options::BasicAckOptions;
use tracing::debug;

/// What writes the ack frame of one delivery: lapin's [`Acker`] (a fake
/// in the tests).
pub(crate) trait AckFrame: Send + Sync + 'static {
    /// Writes `basic.ack` for this delivery (with `multiple`, for every
    /// unacked delivery of the channel up to it).
    fn write_ack(&self, multiple: bool) -> impl Future<Output = lapin::Result<()>> + Send;
}

impl AckFrame for Acker {
    async fn write_ack(&self, multiple: bool) -> lapin::Result<()> {
        self.ack(BasicAckOptions { multiple }).await.map(drop)
    }
}

/// The acks of one consumer channel.
pub(crate) struct AckBatcher<A = Acker> {
    state: Mutex<State<A>>,
    /// How long an ack above the floor may be held.
    delay: Duration,
    /// How many acks above the floor may be held.
    limit: usize,
}

struct State<A> {
    last_tag: u64,
    open: BTreeSet<u64>,
    /// The lowest tag of this incarnation never handed out, if any.
    unseen: Option<u64>,
    held: BTreeMap<u64, A>,
    /// A task is writing ack frames.
    flushing: bool,
    /// A timer will force the held acks out.
    timer: bool,
}

impl<A> Default for State<A> {
    fn default() -> Self {
        State {
            last_tag: 0,
            open: BTreeSet::new(),
            unseen: None,
            held: BTreeMap::new(),
            flushing: false,
            timer: false,
        }
    }
}

/// What the writer sends next.
enum Job<A> {
    /// `basic.ack(multiple)` with this acker (the highest held below the floor).
    Multiple(A),
    /// Single acks.
    Singles(Vec<A>),
}

impl<A: AckFrame> AckBatcher<A> {
    pub(crate) fn new(delay: Duration, limit: usize) -> Arc<Self> {
        Arc::new(AckBatcher {
            state: Mutex::new(State::default()),
            delay,
            limit: limit.max(1),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<A>> {
        // Every change is a single step on plain collections; a panic cannot
        // leave them half-changed.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes a delivery handed out (or about to be given back with a
    /// nack of its own, then [`closed`](Self::closed)). Tags are noted in
    /// the order the channel delivered them; answers the tags this one
    /// skipped, which are never covered by a multiple ack (see the module
    /// docs).
    pub(crate) fn opened(&self, tag: u64) -> Option<RangeInclusive<u64>> {
        let mut st = self.lock();
        if tag <= st.last_tag {
            // A new channel incarnation (lapin recovery): the old tags are
            // gone with the old channel.
            st.open.clear();
            st.held.clear();
            st.unseen = None;
            st.last_tag = 0;
        }
        let skipped = (tag > st.last_tag + 1).then(|| st.last_tag + 1..=tag - 1);
        if let Some(skipped) = &skipped
            && st.unseen.is_none()
        {
            st.unseen = Some(*skipped.start());
        }
        st.last_tag = tag;
        st.open.insert(tag);
        skipped
    }

    /// Notes a delivery settled otherwise (nacked, rejected, or given up):
    /// call once its frame is written (or failed).
    pub(crate) async fn closed(self: &Arc<Self>, tag: u64) {
        self.lock().open.remove(&tag);
        // The floor may have risen past held acks.
        let _ = self.flush(false).await;
    }

    /// Whether `tag` was handed out and is not settled yet.
    pub(crate) fn is_open(&self, tag: u64) -> bool {
        self.lock().open.contains(&tag)
    }

    /// Acks `tag`: holds it, and writes what can be written now. Answers
    /// `Ok(false)` for a tag that is not open (settled already, or of an
    /// older channel incarnation), and the error of a frame this call
    /// wrote, if one failed.
    pub(crate) async fn ack(self: &Arc<Self>, tag: u64, acker: A) -> lapin::Result<bool> {
        {
            let mut st = self.lock();
            if !st.open.remove(&tag) {
                return Ok(false);
            }
            st.held.insert(tag, acker);
        }
        self.flush(false).await.map(|()| true)
    }

    /// Writes every held ack (before the channel closes), and waits for a
    /// writer at work to finish: it may have taken held acks already and
    /// not written them yet. Gives up at `deadline`.
    pub(crate) async fn drain(self: &Arc<Self>, deadline: tokio::time::Instant) {
        while tokio::time::Instant::now() < deadline {
            {
                let st = self.lock();
                if st.held.is_empty() && !st.flushing {
                    return;
                }
            }
            if let Err(e) = self.flush(true).await {
                debug!(error = %e, "held acks could not be written; the broker redelivers them");
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Writes held acks while there is something to write and no other
    /// task is writing. With `force`, also the ones above the floor.
    async fn flush(self: &Arc<Self>, force: bool) -> lapin::Result<()> {
        let mut result = Ok(());
        loop {
            let job = {
                let mut st = self.lock();
                if st.flushing {
                    return result;
                }
                match self.next_job(&mut st, force) {
                    Some(job) => {
                        st.flushing = true;
                        job
                    }
                    None => {
                        if !st.held.is_empty() && !st.timer {
                            st.timer = true;
                            self.arm_timer();
                        }
                        return result;
                    }
                }
            };
            let sent = send(job).await;
            self.lock().flushing = false;
            if sent.is_err() {
                result = sent;
            }
        }
    }

    fn next_job(&self, st: &mut State<A>, force: bool) -> Option<Job<A>> {
        let floor = st
            .open
            .first()
            .copied()
            .into_iter()
            .chain(st.unseen)
            .min()
            .unwrap_or(u64::MAX);
        if let Some(upto) = st.held.range(..floor).next_back().map(|(t, _)| *t) {
            let above = st.held.split_off(&(upto + 1));
            let below = std::mem::replace(&mut st.held, above);
            return below.into_iter().next_back().map(|(_, a)| Job::Multiple(a));
        }
        if !st.held.is_empty() && (force || st.held.len() >= self.limit) {
            let all = std::mem::take(&mut st.held);
            return Some(Job::Singles(all.into_values().collect()));
        }
        None
    }

    fn arm_timer(self: &Arc<Self>) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (me, delay) = (Arc::downgrade(self), self.delay);
        rt.spawn(async move {
            loop {
                tokio::time::sleep(delay).await;
                let Some(me) = me.upgrade() else { return };
                {
                    let mut st = me.lock();
                    if st.held.is_empty() {
                        st.timer = false;
                        return;
                    }
                    if st.flushing {
                        // The writer's next round may take them; look again.
                        continue;
                    }
                    st.timer = false;
                }
                if let Err(e) = me.flush(true).await {
                    debug!(error = %e, "held acks could not be written; the broker redelivers them");
                }
                return;
            }
        });
    }
}

async fn send<A: AckFrame>(job: Job<A>) -> lapin::Result<()> {
    match job {
        Job::Multiple(acker) => acker.write_ack(true).await,
        Job::Singles(ackers) => {
            let mut result = Ok(());
            for acker in ackers {
                if let Err(e) = acker.write_ack(false).await {
                    result = Err(e);
                }
            }
            result
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::{Notify, Semaphore};

    /// The "wire": the ack frames written, as (tag, multiple), in order.
    /// A frame is written only with a permit of `gate`.
    struct Wire {
        written: Mutex<Vec<(u64, bool)>>,
        gate: Semaphore,
        writing: Notify,
    }

    impl Wire {
        fn new(open: bool) -> Arc<Wire> {
            let permits = if open { Semaphore::MAX_PERMITS } else { 0 };
            Arc::new(Wire {
                written: Mutex::new(Vec::new()),
                gate: Semaphore::new(permits),
                writing: Notify::new(),
            })
        }

        fn written(&self) -> Vec<(u64, bool)> {
            self.written.lock().map(|w| w.clone()).unwrap_or_default()
        }
    }

    /// The acker of delivery `tag`.
    struct Frame(u64, Arc<Wire>);

    impl AckFrame for Frame {
        async fn write_ack(&self, multiple: bool) -> lapin::Result<()> {
            self.1.writing.notify_one();
            if let Ok(permit) = self.1.gate.acquire().await {
                permit.forget();
            }
            if let Ok(mut w) = self.1.written.lock() {
                w.push((self.0, multiple));
            }
            Ok(())
        }
    }

    const NEVER: Duration = Duration::from_secs(3600);

    fn deadline() -> tokio::time::Instant {
        tokio::time::Instant::now() + Duration::from_secs(30)
    }

    #[tokio::test]
    async fn acks_below_the_lowest_open_tag_go_out_as_one_multiple_ack() {
        let wire = Wire::new(true);
        let acks = AckBatcher::new(NEVER, 100);
        for tag in 1..=3 {
            acks.opened(tag);
        }
        assert!(acks.ack(2, Frame(2, wire.clone())).await.unwrap());
        assert_eq!(wire.written(), [], "2 waits while 1 is open");
        assert!(acks.ack(1, Frame(1, wire.clone())).await.unwrap());
        assert_eq!(wire.written(), [(2, true)], "one frame acks 1 and 2");
        assert!(acks.ack(3, Frame(3, wire.clone())).await.unwrap());
        assert_eq!(wire.written(), [(2, true), (3, true)]);
    }

    #[tokio::test]
    async fn only_open_tags_are_acked_and_only_once() {
        let wire = Wire::new(true);
        let acks = AckBatcher::new(NEVER, 100);
        assert!(!acks.ack(1, Frame(1, wire.clone())).await.unwrap());
        acks.opened(1);
        assert!(acks.ack(1, Frame(1, wire.clone())).await.unwrap());
        assert!(!acks.ack(1, Frame(1, wire.clone())).await.unwrap());
        assert_eq!(wire.written(), [(1, true)]);
        // A new channel incarnation starts its tags at 1 again: the old
        // incarnation's open tags are gone with it.
        acks.opened(9);
        acks.opened(1);
        assert!(!acks.ack(9, Frame(9, wire.clone())).await.unwrap());
        assert!(acks.is_open(1));
    }

    #[tokio::test]
    async fn a_nacked_tag_is_never_covered_by_a_multiple_ack() {
        let wire = Wire::new(true);
        let acks = AckBatcher::new(NEVER, 100);
        for tag in 1..=3 {
            acks.opened(tag);
        }
        assert!(acks.ack(3, Frame(3, wire.clone())).await.unwrap());
        assert!(acks.ack(2, Frame(2, wire.clone())).await.unwrap());
        assert_eq!(wire.written(), []);
        // 1 is nacked (by the caller, with its own frame): only then may
        // the multiple ack pass it.
        acks.closed(1).await;
        assert_eq!(wire.written(), [(3, true)]);
    }

    /// A delivery the channel delivered but nobody handed out (a consumer
    /// left unread, say) is unacked at the broker: a multiple ack past it
    /// would drop a message that was never handled.
    #[tokio::test]
    async fn a_tag_never_handed_out_is_never_covered_by_a_multiple_ack() {
        let wire = Wire::new(true);
        let acks = AckBatcher::new(NEVER, 100);
        assert_eq!(acks.opened(1), None);
        assert_eq!(acks.opened(4), Some(2..=3), "2 and 3 were skipped");
        assert_eq!(acks.opened(5), None);
        assert!(acks.ack(1, Frame(1, wire.clone())).await.unwrap());
        assert!(acks.ack(5, Frame(5, wire.clone())).await.unwrap());
        assert!(acks.ack(4, Frame(4, wire.clone())).await.unwrap());
        assert_eq!(wire.written(), [(1, true)], "4 and 5 wait: 2 is unseen");
        acks.drain(deadline()).await;
        assert_eq!(wire.written(), [(1, true), (4, false), (5, false)]);
        // A new channel incarnation forgets the unseen tags of the old one.
        acks.opened(1);
        acks.opened(2);
        assert!(acks.ack(2, Frame(2, wire.clone())).await.unwrap());
        assert!(acks.ack(1, Frame(1, wire.clone())).await.unwrap());
        assert_eq!(wire.written()[3..], [(2, true)]);
    }

    #[tokio::test]
    async fn a_full_batch_and_the_drain_write_acks_above_the_floor_one_by_one() {
        let wire = Wire::new(true);
        let acks = AckBatcher::new(NEVER, 3);
        for tag in 1..=6 {
            acks.opened(tag);
        }
        for tag in [2, 3] {
            assert!(acks.ack(tag, Frame(tag, wire.clone())).await.unwrap());
        }
        assert_eq!(wire.written(), [], "held below the limit");
        assert!(acks.ack(4, Frame(4, wire.clone())).await.unwrap());
        assert_eq!(wire.written(), [(2, false), (3, false), (4, false)]);
        assert!(acks.ack(6, Frame(6, wire.clone())).await.unwrap());
        acks.drain(deadline()).await;
        assert_eq!(
            wire.written(),
            [(2, false), (3, false), (4, false), (6, false)]
        );
        assert!(acks.is_open(1) && acks.is_open(5));
    }

    /// The timer took the held acks and is writing them when the broker
    /// closes: the drain must wait for it, or the connection closes under
    /// the frames and their messages go back to the queue, though their
    /// acks were confirmed to the engine.
    #[tokio::test]
    async fn the_drain_waits_for_a_writer_at_work() {
        let wire = Wire::new(false);
        let acks = AckBatcher::new(Duration::from_millis(1), 100);
        acks.opened(1);
        acks.opened(2);
        assert!(acks.ack(2, Frame(2, wire.clone())).await.unwrap());
        // The timer fires and its writer blocks on the wire.
        wire.writing.notified().await;
        let drain = tokio::spawn({
            let acks = acks.clone();
            async move { acks.drain(deadline()).await }
        });
        let mut drain = std::pin::pin!(drain);
        assert!(
            tokio::time::timeout(Duration::from_millis(200), &mut drain)
                .await
                .is_err(),
            "the drain returned while an ack was being written"
        );
        wire.gate.add_permits(1);
        drain.await.unwrap();
        assert_eq!(wire.written(), [(2, false)]);
    }
}
