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
//! - One task at a time writes ack frames (the others' acks are held and
//!   picked up by its next round), so multiple acks go out in rising order.
//!
//! A held ack is lost if the connection drops before it is written; the
//! broker then delivers the message again, and the dedup record answers it
//! as a duplicate. lapin's recovery restarts delivery tags at 1 on a fresh
//! channel incarnation: a tag at or below the last one seen starts afresh
//! (the old incarnation's ackers are poisoned and its deliveries come back).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::Acker;
use lapin::options::BasicAckOptions;
use tracing::debug;

/// The acks of one consumer channel.
pub(crate) struct AckBatcher {
    state: Mutex<State>,
    /// How long an ack above the floor may be held.
    delay: Duration,
    /// How many acks above the floor may be held.
    limit: usize,
}

#[derive(Default)]
struct State {
    last_tag: u64,
    open: BTreeSet<u64>,
    held: BTreeMap<u64, Acker>,
    /// A task is writing ack frames.
    flushing: bool,
    /// A timer will force the held acks out.
    timer: bool,
}

/// What the writer sends next.
enum Job {
    /// `basic.ack(multiple)` with this acker (the highest held below the floor).
    Multiple(Acker),
    /// Single acks.
    Singles(Vec<Acker>),
}

impl AckBatcher {
    pub(crate) fn new(delay: Duration, limit: usize) -> Arc<Self> {
        Arc::new(AckBatcher {
            state: Mutex::new(State::default()),
            delay,
            limit: limit.max(1),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every change is a single step on plain collections; a panic cannot
        // leave them half-changed.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes a delivery handed out.
    pub(crate) fn opened(&self, tag: u64) {
        let mut st = self.lock();
        if tag <= st.last_tag {
            // A new channel incarnation (lapin recovery): the old tags are
            // gone with the old channel.
            st.open.clear();
            st.held.clear();
        }
        st.last_tag = tag;
        st.open.insert(tag);
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
    pub(crate) async fn ack(self: &Arc<Self>, tag: u64, acker: Acker) -> lapin::Result<bool> {
        {
            let mut st = self.lock();
            if !st.open.remove(&tag) {
                return Ok(false);
            }
            st.held.insert(tag, acker);
        }
        self.flush(false).await.map(|()| true)
    }

    /// Writes every held ack (before the channel closes), waiting for a
    /// writer at work to finish first; gives up at `deadline`.
    pub(crate) async fn drain(self: &Arc<Self>, deadline: tokio::time::Instant) {
        while tokio::time::Instant::now() < deadline {
            if self.lock().held.is_empty() {
                return;
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

    fn next_job(&self, st: &mut State, force: bool) -> Option<Job> {
        let floor = st.open.first().copied().unwrap_or(u64::MAX);
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

async fn send(job: Job) -> lapin::Result<()> {
    match job {
        Job::Multiple(acker) => acker
            .ack(BasicAckOptions { multiple: true })
            .await
            .map(drop),
        Job::Singles(ackers) => {
            let mut result = Ok(());
            for acker in ackers {
                if let Err(e) = acker.ack(BasicAckOptions::default()).await {
                    result = Err(e);
                }
            }
            result
        }
    }
}
