//! What a replay did: [`ReplayReport`], and what it does with each dead
//! letter: [`Action`].

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Serialize;

use crate::error::Error;
use crate::store::RecordState;

/// What a replay does with one dead letter it took.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Action {
    /// Its record was revived (`previous`: what it was; `None` when there
    /// was none) and a copy was published to the work queue; the dead
    /// letter is gone. In a dry run: what would happen.
    Move {
        /// The state of the record the revival removed.
        #[serde(serialize_with = "state_name")]
        previous: Option<RecordState>,
    },
    /// Force mode: its record was forgotten whatever its state (`existed`:
    /// there was one) and a copy was published; the dead letter is gone.
    Force {
        /// Whether a record was forgotten.
        existed: bool,
    },
    /// Its key is done: the dead letter is removed, nothing is published
    /// (a copy would be a duplicate).
    AlreadyDone,
    /// A consumer holds a live lease on its key: left in the queue.
    LeftLive {
        /// Time left on that lease, in milliseconds.
        retry_after_ms: u64,
    },
    /// It names no record and no fallback key strategy finds one: left.
    LeftNoKey,
    /// The filter did not select it: left.
    Skipped,
    /// Taken, then left as it was because the run stopped (limit reached,
    /// interrupted or failed) before it was handled.
    Unhandled,
}

impl Action {
    /// True for [`Action::Move`] and [`Action::Force`]: a copy goes to the
    /// work queue.
    pub fn is_move(&self) -> bool {
        matches!(self, Action::Move { .. } | Action::Force { .. })
    }

    /// A short name: `move`, `force`, `already-done`, `left-live`,
    /// `left-no-key`, `skipped`, `unhandled`.
    pub fn name(&self) -> &'static str {
        match self {
            Action::Move { .. } => "move",
            Action::Force { .. } => "force",
            Action::AlreadyDone => "already-done",
            Action::LeftLive { .. } => "left-live",
            Action::LeftNoKey => "left-no-key",
            Action::Skipped => "skipped",
            Action::Unhandled => "unhandled",
        }
    }
}

fn state_name<S: serde::Serializer>(s: &Option<RecordState>, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(match s {
        None => "absent",
        Some(RecordState::Claimed) => "claimed",
        Some(RecordState::Released) => "released",
        Some(RecordState::Done) => "done",
        Some(RecordState::Dead) => "dead",
    })
}

/// How a replay ended.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum ReplayEnd {
    /// Every dead letter that was in the queue at the start was looked at
    /// (or the queue ran dry earlier).
    Finished,
    /// The limit of moves was reached.
    LimitReached,
    /// The shutdown token was cancelled: the dead letters in hand were
    /// settled, the rest left.
    Interrupted,
    /// A store or broker operation failed for good: what was in hand was
    /// settled or put back, the rest left. Nothing is lost: a dead letter
    /// leaves the queue only once its copy is confirmed.
    Failed(Error),
}

/// Counts of one reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ReasonCounts {
    /// Moved (or, in a dry run, would be).
    pub moved: u64,
    /// Removed as already done.
    pub already_done: u64,
    /// Left in the queue (live claim, no key, skipped, unhandled).
    pub left: u64,
}

/// What a replay did. Every count is of dead letters taken from the queue;
/// in a dry run, of what would have happened.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ReplayReport {
    /// True for a dry run: nothing was changed.
    pub dry_run: bool,
    /// Dead letters in the queue when the run started: it takes no more.
    pub cut_off: u64,
    /// Dead letters taken and looked at.
    pub examined: u64,
    /// Published back to the work queue (revived or forced) and removed.
    pub moved: u64,
    /// Of `moved`, those whose record was forgotten in force mode.
    pub forced: u64,
    /// Removed without a copy: their keys are done.
    pub already_done: u64,
    /// Left: a consumer holds a live lease on their keys.
    pub left_live: u64,
    /// Left: no record named and no fallback key.
    pub left_no_key: u64,
    /// Left: not selected by the filter.
    pub skipped: u64,
    /// Left: taken but not handled because the run stopped.
    pub unhandled: u64,
    /// The same counts by reason ([`super::DeadLetterInfo::reason`]).
    pub by_reason: BTreeMap<String, ReasonCounts>,
    /// How long the run took.
    pub elapsed: Duration,
    /// How it ended.
    pub end: ReplayEnd,
}

impl ReplayReport {
    pub(crate) fn new(dry_run: bool) -> Self {
        ReplayReport {
            dry_run,
            cut_off: 0,
            examined: 0,
            moved: 0,
            forced: 0,
            already_done: 0,
            left_live: 0,
            left_no_key: 0,
            skipped: 0,
            unhandled: 0,
            by_reason: BTreeMap::new(),
            elapsed: Duration::ZERO,
            end: ReplayEnd::Finished,
        }
    }

    /// Counts one dead letter's action under its reason.
    pub(crate) fn count(&mut self, reason: &str, action: &Action) {
        let by = self.by_reason.entry(reason.to_owned()).or_default();
        match action {
            Action::Move { .. } | Action::Force { .. } => {
                self.moved += 1;
                by.moved += 1;
                if matches!(action, Action::Force { .. }) {
                    self.forced += 1;
                }
            }
            Action::AlreadyDone => {
                self.already_done += 1;
                by.already_done += 1;
            }
            other => {
                by.left += 1;
                match other {
                    Action::LeftLive { .. } => self.left_live += 1,
                    Action::LeftNoKey => self.left_no_key += 1,
                    Action::Skipped => self.skipped += 1,
                    _ => self.unhandled += 1,
                }
            }
        }
    }

    /// Dead letters left in the queue by this run (of those it took).
    pub fn left(&self) -> u64 {
        self.left_live + self.left_no_key + self.skipped + self.unhandled
    }

    /// True when the run looked at everything it was asked to (finished,
    /// or reached its limit): not interrupted, not failed.
    pub fn is_complete(&self) -> bool {
        matches!(self.end, ReplayEnd::Finished | ReplayEnd::LimitReached)
    }

    /// Moves per second over the whole run.
    pub fn rate(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.moved as f64 / secs
        } else {
            0.0
        }
    }
}

impl fmt::Display for ReplayReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let would = if self.dry_run {
            " (dry run: nothing changed)"
        } else {
            ""
        };
        writeln!(
            f,
            "dead letters at start {}, examined {}{would}",
            self.cut_off, self.examined
        )?;
        let moved = if self.dry_run { "would move" } else { "moved" };
        let rows = [
            (moved, self.moved),
            ("  of which forced", self.forced),
            ("already done (removed)", self.already_done),
            ("left: live claim", self.left_live),
            ("left: no key", self.left_no_key),
            ("left: skipped by filter", self.skipped),
            ("left: unhandled", self.unhandled),
        ];
        for (name, n) in rows {
            if n > 0 || name == moved {
                writeln!(f, "  {name:<24} {n:>9}")?;
            }
        }
        if !self.by_reason.is_empty() {
            writeln!(
                f,
                "  {:<24} {:>9} {:>12} {:>9}",
                "by reason", moved, "already done", "left"
            )?;
            for (reason, c) in &self.by_reason {
                writeln!(
                    f,
                    "  {reason:<24} {:>9} {:>12} {:>9}",
                    c.moved, c.already_done, c.left
                )?;
            }
        }
        let end = match &self.end {
            ReplayEnd::Finished => "finished".to_owned(),
            ReplayEnd::LimitReached => "stopped at the limit".to_owned(),
            ReplayEnd::Interrupted => "interrupted".to_owned(),
            ReplayEnd::Failed(e) => format!("FAILED: {e}"),
        };
        write!(
            f,
            "{end} in {:.2}s ({:.0} moves/s)",
            self.elapsed.as_secs_f64(),
            self.rate()
        )
    }
}
