//! The supervisor task: watches the current generation (lapin's events,
//! its recovery, the consumer channel) and replaces it once it is lost for
//! good; and the reaper of abandoned connections lapin may still recover.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use lapin::{Connection, Event};
use tokio::time::{Instant, sleep, timeout};
use tracing::{debug, info, warn};

use super::generation::{ERROR_EVENT_WAIT, Events, Generation, first_error};
use super::quarantine::{Quarantined, caused_by_parse_error, is_parse_error};
use super::{CLOSE_TIMEOUT, Shared};

/// How often the supervisor looks at the connection's state, to see a
/// stalled recovery early (a read of lapin's state: cheap).
const RECOVERY_POLL: Duration = Duration::from_millis(100);
/// Slack beyond lapin's first backoff step before a recovery that has not
/// started to reconnect counts as stalled (scheduling of lapin's thread
/// and tasks on a busy machine).
const STALL_SLACK: Duration = Duration::from_secs(1);
/// How long lapin may stay `Connecting` before the attempt counts as hung:
/// a handshake with a server that answers takes milliseconds, and lapin's
/// can hang until the server's own handshake timeout (10 s for RabbitMQ).
/// Longer only while the server refuses connections, when a rebuild (with
/// its own backoff) does as well.
const ATTEMPT_HANG: Duration = Duration::from_secs(5);

enum Ending {
    Closing,
    Lost(String),
}

/// Where lapin's recovery of a connection stands, as the supervisor polls
/// it ([`RecoveryWatch`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ConnState {
    Up,
    /// Lost; lapin waits out a backoff step before it reconnects.
    Reconnecting,
    /// lapin is making a reconnection attempt.
    Connecting,
    /// Closing, closed or failed: not lapin's recovery any more.
    Other,
}

impl ConnState {
    fn of(conn: &Connection) -> ConnState {
        let s = conn.status();
        if s.connected() {
            ConnState::Up
        } else if s.reconnecting() {
            ConnState::Reconnecting
        } else if s.connecting() {
            ConnState::Connecting
        } else {
            ConnState::Other
        }
    }
}

/// What [`RecoveryWatch::observe`] concludes.
#[derive(Debug, PartialEq, Eq)]
enum RecoveryVerdict {
    /// Up, or not lapin's recovery (closing, failed: seen elsewhere).
    Quiet,
    /// The connection was just found lost; lapin is recovering it.
    Lost,
    /// lapin is recovering it, within bounds.
    Recovering,
    /// lapin's recovery will not finish: rebuild (the reason).
    GiveUp(String),
}

/// Tells a lapin recovery under way from one that will never finish.
///
/// lapin 4.12.3 can stall at the very start of a recovery: when a write
/// fails (a broken pipe, a reset) after frames were serialized, its I/O
/// loop goes on waiting to write them to the dead socket. It only clears
/// them once that loop ends, and the loop does not end while they are
/// there (`IoLoop::should_continue` in its `io_loop.rs`), so it never
/// reconnects: the connection stays `Reconnecting` for good, with no error
/// event. (The same happens when a command it waits for is dropped without
/// waking it: `InternalRPC::run` skips its wake-up for a channel already
/// lost.) A recovery that is on its way leaves `Reconnecting` after
/// lapin's first backoff step, at most twice `min_delay` with its jitter;
/// still `Reconnecting` after that (plus [`STALL_SLACK`]), without having
/// made an attempt, it has stalled.
///
/// A reconnection attempt can hang too: some of lapin's hang in the AMQP
/// handshake until the server gives up on it (RabbitMQ, after 10 s), and
/// its TCP connect has no timeout. One still `Connecting` after
/// [`ATTEMPT_HANG`] is given up on. Every recovery is also bounded by
/// `max_recovery_time`, whatever its state.
#[derive(Debug)]
struct RecoveryWatch {
    /// When lapin must have made its first attempt.
    first_attempt_within: Duration,
    max_recovery: Duration,
    /// When the connection was found lost.
    lost_at: Option<Instant>,
    /// lapin made a reconnection attempt since.
    attempted: bool,
    /// Since when lapin is `Connecting`, without a break seen.
    connecting_since: Option<Instant>,
}

impl RecoveryWatch {
    fn new(min_delay: Duration, max_recovery: Duration) -> RecoveryWatch {
        RecoveryWatch {
            first_attempt_within: min_delay.saturating_mul(2).saturating_add(STALL_SLACK),
            max_recovery,
            lost_at: None,
            attempted: false,
            connecting_since: None,
        }
    }

    /// lapin reported the connection up again (its `Connected` event): a
    /// later loss is a new recovery, even when no poll saw it up.
    fn connected(&mut self) {
        self.lost_at = None;
        self.attempted = false;
        self.connecting_since = None;
    }

    fn observe(&mut self, state: ConnState, now: Instant) -> RecoveryVerdict {
        match state {
            ConnState::Up | ConnState::Other => {
                self.connected();
                return RecoveryVerdict::Quiet;
            }
            ConnState::Connecting => {
                self.attempted = true;
                let since = *self.connecting_since.get_or_insert(now);
                let hung = now.saturating_duration_since(since);
                if hung > ATTEMPT_HANG {
                    return RecoveryVerdict::GiveUp(format!(
                        "a reconnection attempt of lapin's hung for {hung:?}"
                    ));
                }
            }
            ConnState::Reconnecting => self.connecting_since = None,
        }
        let Some(lost_at) = self.lost_at else {
            self.lost_at = Some(now);
            return RecoveryVerdict::Lost;
        };
        let spent = now.saturating_duration_since(lost_at);
        if !self.attempted && spent > self.first_attempt_within {
            return RecoveryVerdict::GiveUp(format!(
                "lapin's recovery stalled: no reconnection attempt after {spent:?}"
            ));
        }
        if spent > self.max_recovery {
            return RecoveryVerdict::GiveUp(format!(
                "lapin's recovery did not finish within {:?}",
                self.max_recovery
            ));
        }
        RecoveryVerdict::Recovering
    }
}

/// Watches the current generation until it must be replaced.
async fn watch_generation(shared: &Shared, generation: &Generation, events: &mut Events) -> Ending {
    let url = shared.cfg.redacted_url();
    let rec = shared.cfg.recovery();
    let mut tick = tokio::time::interval(rec.health_check);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut poll = tokio::time::interval(RECOVERY_POLL.min(rec.health_check));
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut recovery = RecoveryWatch::new(rec.min_delay, rec.max_recovery_time);
    // The consumer failed (see `Shared::next`): rebuild once lapin's
    // recovery under way, if any, has finished or given up.
    let mut broken = false;
    loop {
        tokio::select! {
            _ = shared.closed.cancelled() => return Ending::Closing,
            _ = generation.broken.cancelled(), if !broken => broken = true,
            event = events.next() => match event {
                Some(Event::Connected) => {
                    recovery.connected();
                    info!(%url, generation = generation.id, "RabbitMQ connection recovered by lapin");
                }
                Some(Event::Error(e)) => {
                    generation.error_event_seen.store(true, Ordering::SeqCst);
                    if is_parse_error(&e) {
                        generation.note_parse_error(&e);
                        return Ending::Lost(format!("lapin could not parse a frame from RabbitMQ: {e}"));
                    }
                    if generation.conn_dead() {
                        return Ending::Lost(if rec.auto_recover {
                            format!("lapin recovery gave up: {e}")
                        } else {
                            e.to_string()
                        });
                    }
                    warn!(%url, generation = generation.id, error = %e, "RabbitMQ reported an error");
                }
                Some(Event::ConnectionBlocked(reason)) => {
                    warn!(%url, %reason, "RabbitMQ blocked the connection (resource alarm)");
                }
                Some(Event::ConnectionUnblocked) => info!(%url, "RabbitMQ unblocked the connection"),
                Some(_) => {}
                None => return Ending::Lost("lapin's event stream ended".into()),
            },
            _ = poll.tick() => {
                match recovery.observe(ConnState::of(&generation.conn), Instant::now()) {
                    RecoveryVerdict::Lost => {
                        warn!(%url, generation = generation.id, "RabbitMQ connection lost; lapin is recovering it");
                    }
                    RecoveryVerdict::GiveUp(reason) => return Ending::Lost(reason),
                    RecoveryVerdict::Quiet | RecoveryVerdict::Recovering => {}
                }
                if broken && !generation.recovering() {
                    let reason = generation
                        .broken_reason
                        .lock()
                        .ok()
                        .and_then(|r| r.clone())
                        .unwrap_or_default();
                    return Ending::Lost(reason);
                }
            }
            _ = tick.tick() => {
                if generation.conn_dead() {
                    return Ending::Lost("the connection is closed".into());
                }
                if generation.conn.status().connected()
                    && let Some(slot) = generation.consumer.as_ref()
                {
                    let s = slot.channel.status();
                    if !(s.connected() || s.initializing()) {
                        return Ending::Lost("the consumer channel is closed".into());
                    }
                }
            }
        }
    }
}

/// The supervisor: replaces lost generations until the link is closed.
pub(super) async fn supervise(
    shared: Arc<Shared>,
    mut generation: Arc<Generation>,
    mut events: Events,
) {
    let url = shared.cfg.redacted_url();
    let rec = shared.cfg.recovery().clone();
    loop {
        let ending = watch_generation(&shared, &generation, &mut events).await;
        shared.current.send_replace(None);
        generation.retired.cancel();
        match ending {
            Ending::Closing => {
                // A connection lapin is recovering is not waited for: the
                // reaper closes it should it come back.
                generation.close(CLOSE_TIMEOUT).await;
                reap(generation.clone());
                info!(%url, generation = generation.id, "RabbitMQ connection closed");
                return;
            }
            Ending::Lost(reason) => {
                warn!(%url, generation = generation.id, %reason,
                    "RabbitMQ connection lost for good; rebuilding connection, topology and consumer");
                generation.close(CLOSE_TIMEOUT).await;
                reap(generation.clone());
            }
        }
        // A parse error the watch did not see may still be queued, or
        // about to be (lapin marks the connection errored first).
        let mut error_seen = generation.error_event_seen.load(Ordering::SeqCst);
        while let Some(Some(event)) = events.next().now_or_never() {
            if let Event::Error(e) = &event {
                error_seen = true;
                if is_parse_error(e) {
                    generation.note_parse_error(e);
                }
            }
        }
        if !error_seen && generation.parse_error().is_none() && generation.conn.status().errored() {
            let waited = tokio::select! {
                _ = shared.closed.cancelled() => return,
                waited = timeout(ERROR_EVENT_WAIT, first_error(&mut events)) => waited,
            };
            if let Ok(Some(e)) = waited
                && is_parse_error(&e)
            {
                generation.note_parse_error(&e);
            }
        }
        let mut malformed = generation.parse_error();
        let mut failures: u32 = 0;
        loop {
            if let Some(cause) = malformed.take() {
                warn!(%url, queue = shared.cfg.queue(), %cause,
                    "lapin could not parse a message from RabbitMQ; moving the work queue's \
                     unparseable messages to the dead-letter queue before rebuilding");
                if let Quarantined::Moved(_) = shared.quarantine().await {
                    // Build again at once.
                    failures = 0;
                } else {
                    failures = failures.saturating_add(1);
                    let delay = idemq::Backoff::new(rec.rebuild_min_delay, rec.rebuild_max_delay)
                        .delay(failures);
                    tokio::select! {
                        _ = shared.closed.cancelled() => return,
                        _ = sleep(delay) => {}
                    }
                }
            }
            let built = tokio::select! {
                _ = shared.closed.cancelled() => return,
                built = shared.build() => built,
            };
            match built {
                Ok((next, next_events)) => {
                    info!(%url, generation = next.id, "RabbitMQ connection rebuilt");
                    generation = next;
                    events = next_events;
                    shared.current.send_replace(Some(generation.clone()));
                    break;
                }
                Err(e) => {
                    if caused_by_parse_error(&e) && shared.consume {
                        // Quarantine first; it decides on the delay.
                        malformed = Some(e.to_string());
                        continue;
                    }
                    failures = failures.saturating_add(1);
                    let delay = idemq::Backoff::new(rec.rebuild_min_delay, rec.rebuild_max_delay)
                        .delay(failures);
                    warn!(%url, error = %e, attempt = failures, ?delay,
                        "rebuilding the RabbitMQ connection failed; retrying");
                    tokio::select! {
                        _ = shared.closed.cancelled() => return,
                        _ = sleep(delay) => {}
                    }
                }
            }
        }
    }
}

/// Watches an abandoned connection that lapin may still recover: should
/// the recovery ever complete, it would bring back a consumer nobody reads
/// (holding prefetched messages), so it is closed as soon as it is up.
/// Nothing to watch when it is closed or failed for good.
pub(super) fn reap(generation: Arc<Generation>) {
    const REAP_FOR: Duration = Duration::from_secs(3600);
    if generation.conn_finished() {
        return;
    }
    debug!(
        generation = generation.id,
        "watching an abandoned RabbitMQ connection"
    );
    tokio::spawn(async move {
        let until = Instant::now() + REAP_FOR;
        while Instant::now() < until && !generation.conn_finished() {
            if generation.conn.status().connected() {
                warn!(
                    generation = generation.id,
                    "an abandoned RabbitMQ connection was recovered by lapin; closing it"
                );
                generation.close(CLOSE_TIMEOUT).await;
                if generation.conn_finished() {
                    return;
                }
            }
            sleep(Duration::from_secs(1)).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch() -> (RecoveryWatch, Instant) {
        // First attempt due within 2 x 200 ms + STALL_SLACK = 1.4 s.
        let w = RecoveryWatch::new(Duration::from_millis(200), Duration::from_secs(15));
        (w, Instant::now())
    }

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn a_recovery_stuck_before_its_first_attempt_is_given_up_early() {
        let (mut w, t0) = watch();
        assert_eq!(w.observe(ConnState::Up, t0), RecoveryVerdict::Quiet);
        assert_eq!(
            w.observe(ConnState::Reconnecting, at(t0, 100)),
            RecoveryVerdict::Lost
        );
        assert_eq!(
            w.observe(ConnState::Reconnecting, at(t0, 1400)),
            RecoveryVerdict::Recovering
        );
        assert!(matches!(
            w.observe(ConnState::Reconnecting, at(t0, 1600)),
            RecoveryVerdict::GiveUp(r) if r.contains("stalled")
        ));
    }

    #[test]
    fn a_recovery_that_attempts_is_bounded_by_max_recovery_time() {
        let (mut w, t0) = watch();
        assert_eq!(
            w.observe(ConnState::Reconnecting, t0),
            RecoveryVerdict::Lost
        );
        assert_eq!(
            w.observe(ConnState::Connecting, at(t0, 300)),
            RecoveryVerdict::Recovering
        );
        // Longer backoff steps between later attempts are lapin's right.
        assert_eq!(
            w.observe(ConnState::Reconnecting, at(t0, 9_000)),
            RecoveryVerdict::Recovering
        );
        assert_eq!(
            w.observe(ConnState::Connecting, at(t0, 11_000)),
            RecoveryVerdict::Recovering
        );
        assert_eq!(
            w.observe(ConnState::Reconnecting, at(t0, 14_000)),
            RecoveryVerdict::Recovering
        );
        assert!(matches!(
            w.observe(ConnState::Connecting, at(t0, 15_100)),
            RecoveryVerdict::GiveUp(r) if r.contains("within 15s")
        ));
    }

    #[test]
    fn a_reconnection_attempt_that_hangs_is_given_up() {
        let (mut w, t0) = watch();
        assert_eq!(w.observe(ConnState::Connecting, t0), RecoveryVerdict::Lost);
        assert_eq!(
            w.observe(ConnState::Connecting, at(t0, 5_000)),
            RecoveryVerdict::Recovering
        );
        assert!(matches!(
            w.observe(ConnState::Connecting, at(t0, 5_100)),
            RecoveryVerdict::GiveUp(r) if r.contains("hung")
        ));
    }

    #[test]
    fn every_loss_is_a_new_recovery() {
        let (mut w, t0) = watch();
        w.observe(ConnState::Reconnecting, t0);
        w.observe(ConnState::Connecting, at(t0, 300));
        // Back up (seen, or only reported by lapin's event), then lost again.
        w.connected();
        assert_eq!(
            w.observe(ConnState::Reconnecting, at(t0, 10_000)),
            RecoveryVerdict::Lost
        );
        assert!(matches!(
            w.observe(ConnState::Reconnecting, at(t0, 11_500)),
            RecoveryVerdict::GiveUp(_)
        ));
        assert_eq!(
            w.observe(ConnState::Up, at(t0, 12_000)),
            RecoveryVerdict::Quiet
        );
        assert_eq!(
            w.observe(ConnState::Connecting, at(t0, 20_000)),
            RecoveryVerdict::Lost
        );
        assert_eq!(
            w.observe(ConnState::Reconnecting, at(t0, 25_000)),
            RecoveryVerdict::Recovering
        );
        assert_eq!(
            w.observe(ConnState::Other, at(t0, 40_000)),
            RecoveryVerdict::Quiet
        );
    }
}
