//! The per-delivery state machine, step by step as in the design:
//! key, claim, then one of duplicate / deferral / dead copy / attempt
//! limit / handler run, and the settlement that follows each.
//!
//! A comment that starts with a row in brackets, such as `[Done]`, marks
//! the code of that row of the README's table "What happens to a
//! delivery", which is the user's description of this file.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::FutureExt;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span};

use super::Shared;
use super::meters::{BrokerOp, Outcome, StoreOp};
use crate::handler::{Completion, HandlerError};
use crate::message::Message;
use crate::message::{DeadLetter, DeadReason, Delivery, headers};
use crate::policy::OnDead;
use crate::spans::{self, PERMANENT, TRANSIENT};
use crate::store::{Claim, ClaimTtl, Fenced, Lease, RecordState, Release};
use crate::{Broker, DedupStore, Error, Handler};

/// How often a failing publish-and-ack settlement is retried before the
/// delivery is requeued instead.
const SETTLE_TRIES: u32 = 4;

/// Takes one delivery through the state machine; answers what became of it.
pub(crate) async fn process<B: Broker, S: DedupStore, H: Handler>(
    sh: &Shared<B, S, H>,
    delivery: Delivery,
    abort: &CancellationToken,
) -> Outcome {
    let d = Arc::new(delivery);
    // The key: message id, else the configured header, else (opt-in) the
    // body hash. [no key] dead-letters `missing-key`.
    let key = sh.cfg.key.extract(&d);
    let span = sh.spans.message(&sh.cfg.scope, &d, key.as_deref());
    let outcome = match key {
        Some(key) => {
            claim_and_handle(sh, d, key, abort)
                .instrument(span.clone())
                .await
        }
        None => {
            let letter = DeadLetter::new(
                DeadReason::MissingKey,
                "no message_id, no key header, and body hashing is not enabled",
                0,
            );
            spans::record_error(&span, PERMANENT, &letter.detail);
            dead_letter(sh, &d, &letter).instrument(span.clone()).await
        }
    };
    span.record("idemq.outcome", outcome.as_str());
    outcome
}

/// Marks the current (the delivery's) span failed.
fn failed(kind: &'static str, what: &dyn std::fmt::Display) {
    spans::record_error(&Span::current(), kind, what);
}

async fn claim_and_handle<B: Broker, S: DedupStore, H: Handler>(
    sh: &Shared<B, S, H>,
    d: Arc<Delivery>,
    key: String,
    abort: &CancellationToken,
) -> Outcome {
    let cfg = &sh.cfg;
    // Claim with the lease. The record is kept for the dedup window even
    // if the lease lapses, so its attempt count survives a crash.
    let ttl = ClaimTtl {
        lease: cfg.lease,
        retain: cfg.keep_for,
    };
    let claim = match sh
        .store_call(StoreOp::Claim, sh.store.claim(&cfg.scope, &key, ttl))
        .await
    {
        Ok(claim) => {
            sh.store_ok();
            claim
        }
        Err(e) => {
            // [store unreachable] Fail closed. No handler, no ack: hand the
            // delivery back to the broker, at once when the consumer is
            // paused (others that reach the store take it), else after the
            // backoff (it would come straight back to this one).
            failed(spans::error_type(&e), &e);
            let delay = sh.store_failed(StoreOp::Claim, &e);
            if !sh.pausable.load(Ordering::Relaxed) {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = abort.cancelled() => {}
                }
            }
            sh.counters.requeued.inc();
            nack_requeue(sh, &d).await;
            return Outcome::Requeued;
        }
    };
    if let Claim::Claimed(lease) = &claim {
        Span::current().record("idemq.attempt", i64::from(lease.attempt));
    }
    match claim {
        // [Done]
        Claim::Done => {
            tracing::debug!("duplicate of a completed message; acking");
            sh.counters.duplicates.inc();
            ack(sh, &d).await;
            Outcome::Duplicate
        }
        Claim::InProgress { retry_after } => {
            // [InProgress] The other consumer usually finishes long before its lease
            // lapses: wait min_defer, then twice as long each time, never
            // past the lapse of its lease, at most max_defer.
            let deferrals = d.deferrals();
            let grown = cfg.min_defer.saturating_mul(1u32 << deferrals.min(20));
            let delay = grown.min(retry_after).clamp(cfg.min_defer, cfg.max_defer);
            tracing::debug!(
                ?delay,
                deferrals,
                "another consumer holds the key; deferring"
            );
            sh.counters.deferred.inc();
            let mut copy = Delivery::clone(&d);
            copy.headers.insert(
                headers::DEFERRALS.into(),
                (deferrals.saturating_add(1)).into(),
            );
            retry_later(sh, &copy, delay, d.retry_attempt()).await;
            Outcome::Deferred
        }
        // [Dead]
        Claim::Dead if cfg.on_dead == OnDead::Ack => {
            tracing::debug!("copy of a dead message; acking");
            sh.counters.dead_duplicates.inc();
            ack(sh, &d).await;
            Outcome::DeadDuplicate
        }
        Claim::Dead => {
            let letter = DeadLetter::new(
                DeadReason::DuplicateOfDead,
                "the key is dead (buried); this copy is dead-lettered as well",
                d.retry_attempt(),
            )
            .with_record(&cfg.scope, &key);
            dead_letter(sh, &d, &letter).await
        }
        Claim::Claimed(lease) if lease.attempt > cfg.max_attempts => {
            // [Claimed, attempt > max_attempts] A crash loop (the handler
            // never returned) used up the attempts.
            let letter = DeadLetter::new(
                DeadReason::MaxAttempts,
                format!(
                    "claimed for attempt {} of at most {}; the handler was not run again",
                    lease.attempt, cfg.max_attempts
                ),
                lease.attempt - 1,
            )
            .with_record(&lease.scope, &lease.key);
            dead_letter_and_bury(sh, &d, &lease, &letter).await
        }
        // [Claimed]
        Claim::Claimed(lease) => run_handler(sh, d, lease, abort).await,
    }
}

async fn run_handler<B: Broker, S: DedupStore, H: Handler>(
    sh: &Shared<B, S, H>,
    d: Arc<Delivery>,
    lease: Lease,
    abort: &CancellationToken,
) -> Outcome {
    let cfg = &sh.cfg;
    let lease = Arc::new(lease);
    let msg = Message::new(d.clone(), lease.clone(), cfg.keep_for);
    let lost = AtomicBool::new(false);
    let running = sh.meters.handler_running();
    let handled = AssertUnwindSafe(sh.handler.handle(msg)).catch_unwind();
    let outcome = tokio::select! {
        biased;
        r = handled => Some(r),
        _ = abort.cancelled() => None,
        _ = renew_while_running(sh, &lease, &lost) => None, // never completes
    };
    drop(running);
    let result = match outcome {
        None => {
            // [shutdown] The grace period is over: give the claim back
            // uncounted and let the broker deliver the message again.
            tracing::warn!("handler did not finish within the shutdown grace period; releasing");
            let release = sh.store.fail(&lease, Release::RefundAttempt);
            if let Err(e) = sh.store_call(StoreOp::Fail, release).await {
                tracing::warn!(error = %e, "could not release the claim; its lease will lapse");
            }
            sh.counters.released.inc();
            nack_requeue(sh, &d).await;
            return Outcome::Released;
        }
        Some(Err(panic)) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".into());
            tracing::error!(panic = %what, "handler panicked; treating it as a retryable failure");
            Err(HandlerError::retry(format!("handler panicked: {what}")))
        }
        Some(Ok(result)) => result,
    };
    let in_handler = sh.handler.completion() == Completion::InHandler;
    if in_handler && matches!(result, Err(HandlerError::Retry(_))) {
        // [handler Err(Retry)] A handler that commits its own done mark
        // failed transiently: its COMMIT may have landed with the answer
        // lost. Find out first.
        match commit_outcome(sh, &lease, abort).await {
            Commit::Committed => {
                tracing::info!(
                    "the handler's commit landed though it reported a failure (its answer was \
                     lost): the message is handled; acking"
                );
                sh.counters.handled.inc();
                ack(sh, &d).await;
                return Outcome::Handled;
            }
            Commit::NotCommitted => {}
            Commit::Unknown => {
                if let Err(e) = &result {
                    failed(TRANSIENT, e);
                }
                // Keep the lease: a redelivery waits for it to lapse, then
                // finds the key done (committed) or takes it over (not).
                tracing::error!(
                    "could not find out whether the handler's commit landed; requeueing (a \
                     redelivery waits for the lease to lapse, then finds the key done or \
                     retries it)"
                );
                sh.counters.requeued.inc();
                nack_requeue(sh, &d).await;
                return Outcome::Requeued;
            }
        }
    }
    match result {
        // [handler Ok] Fenced completion, then ack.
        Ok(()) if in_handler => {
            sh.counters.handled.inc();
            ack(sh, &d).await;
            Outcome::Handled
        }
        Ok(()) => complete(sh, &d, &lease, abort).await,
        Err(HandlerError::LeaseLost) => lease_lost(sh, &d, "handler").await,
        // [handler Err(Retry)] Release (the attempt was counted at claim)
        // and retry with backoff, or bury and dead-letter at the limit.
        Err(HandlerError::Retry(e)) if lease.attempt >= cfg.max_attempts => {
            failed(TRANSIENT, &e);
            let letter = DeadLetter::new(DeadReason::MaxAttempts, e.to_string(), lease.attempt)
                .with_record(&lease.scope, &lease.key);
            tracing::warn!(attempt = lease.attempt, error = %e, "attempts exhausted; dead-lettering");
            dead_letter_and_bury(sh, &d, &lease, &letter).await
        }
        Err(HandlerError::Retry(e)) => {
            failed(TRANSIENT, &e);
            tracing::info!(attempt = lease.attempt, error = %e, "handler failed; retrying later");
            let release = sh.store.fail(&lease, Release::CountAttempt);
            match sh.store_call(StoreOp::Fail, release).await {
                Ok(Fenced::Applied) => sh.store_ok(),
                Ok(Fenced::LeaseLost) => return lease_lost(sh, &d, "fail").await,
                // The lease then lapses by itself and the count is kept.
                Err(e) => {
                    sh.store_failed(StoreOp::Fail, &e);
                }
            }
            sh.counters.retried.inc();
            let delay = cfg.retry_backoff.delay(lease.attempt);
            retry_later(sh, &d, delay, lease.attempt).await;
            Outcome::Retried
        }
        // [handler Err(Permanent), undecodable body] Bury and dead-letter
        // at once.
        Err(HandlerError::Permanent(e)) => {
            permanent(sh, &d, &lease, DeadReason::Permanent, e).await
        }
        Err(HandlerError::Decode(e)) => permanent(sh, &d, &lease, DeadReason::Decode, e).await,
    }
}

async fn permanent<B: Broker, S: DedupStore, H: Handler>(
    sh: &Shared<B, S, H>,
    d: &Delivery,
    lease: &Lease,
    reason: DeadReason,
    e: crate::BoxError,
) -> Outcome {
    failed(PERMANENT, &e);
    tracing::warn!(%reason, error = %e, "handler failed permanently; dead-lettering");
    let letter =
        DeadLetter::new(reason, e.to_string(), lease.attempt).with_record(&lease.scope, &lease.key);
    dead_letter_and_bury(sh, d, lease, &letter).await
}

/// Renews the lease every third of it while the handler runs. Never returns.
async fn renew_while_running<B: Broker, S: DedupStore, H: Handler>(
    sh: &Shared<B, S, H>,
    lease: &Lease,
    lost: &AtomicBool,
) {
    let every = sh.cfg.lease / 3;
    loop {
        tokio::time::sleep(every).await;
        if lost.load(Ordering::Relaxed) {
            continue;
        }
        let renewal = sh.store.renew(lease, sh.cfg.lease);
        match sh.store_call(StoreOp::Renew, renewal).await {
            Ok(Fenced::Applied) => sh.store_ok(),
            Ok(Fenced::LeaseLost) => {
                lost.store(true, Ordering::Relaxed);
                // Completion reports a loss for sure; a transactional handler's
                // own commit can look like one to a renewal racing it.
                tracing::warn!("renewal found the lease lost while the handler runs");
            }
            Err(e) => tracing::warn!(error = %e, "lease renewal failed; will try again"),
        }
    }
}

/// What became of a transactional handler's commit that reported a failure.
enum Commit {
    /// The key is done under this lease: the commit landed.
    Committed,
    /// The lease still holds the claim (or lost it): it did not.
    NotCommitted,
    /// The store could not be read.
    Unknown,
}

/// Reads the record as the lease sees it (a fenced read), retried like a
/// settlement while the store fails transiently, until the shutdown grace
/// is over.
async fn commit_outcome<B: Broker, S: DedupStore, H: Handler>(
    sh: &Shared<B, S, H>,
    lease: &Lease,
    abort: &CancellationToken,
) -> Commit {
    for attempt in 1..=SETTLE_TRIES {
        if abort.is_cancelled() {
            break;
        }
        match sh
            .store_call(StoreOp::LeaseState, sh.store.lease_state(lease))
            .await
        {
            Ok(Some(RecordState::Done)) => {
                sh.store_ok();
                return Commit::Committed;
            }
            Ok(_) => {
                sh.store_ok();
                return Commit::NotCommitted;
            }
            Err(e) => {
                let delay = sh.store_failed(StoreOp::LeaseState, &e);
                if attempt == SETTLE_TRIES || !e.is_transient() {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = abort.cancelled() => break,
                }
            }
        }
    }
    Commit::Unknown
}

/// Marks the key done and acks. A completion that fails is retried: the
/// store answers a retry that finds this lease's own done record with
/// `Applied`, so an answer lost on the way is not mistaken for a lost
/// lease. Retries stop when the shutdown grace is over.
async fn complete<B: Broker, S: DedupStore, H: Handler>(
    sh: &Shared<B, S, H>,
    d: &Delivery,
    lease: &Lease,
    abort: &CancellationToken,
) -> Outcome {
    for attempt in 1..=SETTLE_TRIES {
        let completion = sh.store.complete(lease, sh.cfg.keep_for);
        match sh.store_call(StoreOp::Complete, completion).await {
            Ok(Fenced::Applied) => {
                sh.store_ok();
                sh.counters.handled.inc();
                ack(sh, d).await;
                return Outcome::Handled;
            }
            Ok(Fenced::LeaseLost) => return lease_lost(sh, d, "complete").await,
            Err(e) => {
                let delay = sh.store_failed(StoreOp::Complete, &e);
                if attempt == SETTLE_TRIES || abort.is_cancelled() {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = abort.cancelled() => break,
                }
            }
        }
    }
    // The effect happened but is not recorded. Keep the lease (do not
    // release it): a redelivery meets InProgress until it lapses.
    failed(TRANSIENT, &"could not record completion");
    tracing::error!(
        "could not record completion; requeueing (the handler may run again after the lease lapses)"
    );
    nack_requeue(sh, d).await;
    Outcome::Requeued
}

async fn lease_lost<B: Broker, S: DedupStore, H: Handler>(
    sh: &Shared<B, S, H>,
    d: &Delivery,
    during: &'static str,
) -> Outcome {
    sh.counters.lease_lost.inc();
    tracing::error!(
        during,
        "LEASE LOST: another consumer took this key over after the lease lapsed; \
        its record is left untouched and this delivery is acked (raise the lease if handlers are slow)"
    );
    ack(sh, d).await;
    Outcome::LeaseLost
}

/// Dead-letters first, then buries the key, so that a `Dead` record always
/// means "a copy is in the dead-letter queue": copies of a dead message can
/// then be acked safely. If the dead-lettering does not land, the claim is
/// released instead and the delivery requeued; its next copy comes back
/// here (or, past the attempt limit, straight to the dead-letter queue).
async fn dead_letter_and_bury<B: Broker, S: DedupStore, H: Handler>(
    sh: &Shared<B, S, H>,
    d: &Delivery,
    lease: &Lease,
    letter: &DeadLetter,
) -> Outcome {
    let outcome = dead_letter(sh, d, letter).await;
    if outcome != Outcome::DeadLettered {
        let release = sh.store.fail(lease, Release::CountAttempt);
        if let Err(e) = sh.store_call(StoreOp::Fail, release).await {
            // The lease lapses by itself; the count is kept.
            sh.store_failed(StoreOp::Fail, &e);
        }
        return outcome;
    }
    let burial = sh.store.bury(lease, sh.cfg.keep_for);
    match sh.store_call(StoreOp::Bury, burial).await {
        Ok(Fenced::Applied) => sh.store_ok(),
        Ok(Fenced::LeaseLost) => {
            sh.counters.lease_lost.inc();
            tracing::error!(
                "LEASE LOST before burying a dead-lettered message; the new owner's record stands"
            );
        }
        // The message is in the dead-letter queue; the unburied claim lapses,
        // and a later copy counts one more attempt and comes here too.
        Err(e) => {
            sh.store_failed(StoreOp::Bury, &e);
        }
    }
    outcome
}

/// Publishes the dead letter (retrying transient failures); answers
/// `DeadLettered` when it landed. When it did not, the delivery is
/// requeued (never dropped) and the answer is `Requeued`.
async fn dead_letter<B: Broker, S: DedupStore, H: Handler>(
    sh: &Shared<B, S, H>,
    d: &Delivery,
    letter: &DeadLetter,
) -> Outcome {
    tracing::warn!(reason = %letter.reason, detail = %letter.detail, "dead-lettering");
    Span::current().record("idemq.dead_letter.reason", letter.reason.as_str());
    let mut last = None;
    for attempt in 1..=SETTLE_TRIES {
        let span = sh.spans.settle(BrokerOp::DeadLetter);
        match sh
            .broker
            .dead_letter(d, letter)
            .instrument(span.clone())
            .await
        {
            Ok(()) => {
                sh.counters.dead_lettered.inc();
                sh.meters.dead_lettered(letter.reason);
                return Outcome::DeadLettered;
            }
            Err(e) => {
                spans::record_error(&span, spans::error_type(&e), &e);
                sh.broker_failed(BrokerOp::DeadLetter);
                let retry = e.is_transient() && attempt < SETTLE_TRIES;
                last = Some(e);
                if !retry {
                    break;
                }
                tokio::time::sleep(sh.cfg.failure_backoff.delay(attempt)).await;
            }
        }
    }
    if let Some(e) = last {
        failed(spans::error_type(&e), &e);
        tracing::error!(error = %e, "dead-lettering failed; requeueing the delivery so it is not lost");
    }
    nack_requeue(sh, d).await;
    Outcome::Requeued
}

async fn retry_later<B: Broker, S: DedupStore, H: Handler>(
    sh: &Shared<B, S, H>,
    d: &Delivery,
    delay: Duration,
    attempt: u32,
) {
    let span = sh.spans.settle(BrokerOp::RetryLater);
    let scheduled = sh
        .broker
        .retry_later(d, delay, attempt)
        .instrument(span.clone())
        .await;
    if let Err(e) = scheduled {
        spans::record_error(&span, spans::error_type(&e), &e);
        sh.broker_failed(BrokerOp::RetryLater);
        tracing::warn!(error = %e, "could not schedule the retry; requeueing after a pause");
        tokio::time::sleep(delay.min(sh.cfg.failure_backoff.delay(1))).await;
        nack_requeue(sh, d).await;
    }
}

async fn ack<B: Broker, S: DedupStore, H: Handler>(sh: &Shared<B, S, H>, d: &Delivery) {
    let span = sh.spans.settle(BrokerOp::Ack);
    if let Err(e) = sh.broker.ack(d).instrument(span.clone()).await {
        settle_failed(sh, BrokerOp::Ack, &span, &e);
    }
}

async fn nack_requeue<B: Broker, S: DedupStore, H: Handler>(sh: &Shared<B, S, H>, d: &Delivery) {
    let span = sh.spans.settle(BrokerOp::Nack);
    if let Err(e) = sh.broker.nack(d, true).instrument(span.clone()).await {
        settle_failed(sh, BrokerOp::Nack, &span, &e);
    }
}

fn settle_failed<B: Broker, S: DedupStore, H: Handler>(
    sh: &Shared<B, S, H>,
    op: BrokerOp,
    span: &Span,
    e: &Error,
) {
    spans::record_error(span, spans::error_type(e), e);
    sh.broker_failed(op);
    // The broker redelivers an unsettled message; its dedup record makes
    // the redelivery harmless.
    tracing::warn!(op = op.as_str(), error = %e, "could not settle the delivery; the broker will redeliver it");
}
