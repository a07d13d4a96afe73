//! The behaviour every [`DedupStore`] shows. Each function takes a store
//! and a scope nobody else uses, and panics (fails the test) on a
//! deviation. Real stores are timed with real sleeps of well under a second.
//!
//! One file, past 600 lines, because it is the contract: every case of the
//! conformance suite and the macro that runs them all for a backend, so
//! a backend author reads one place.

use std::collections::HashMap;
use std::time::Duration;

use futures::future::join_all;

use crate::error::Error;
use crate::store::{
    Claim, ClaimTtl, DedupStore, Fenced, Lease, LeaseToken, RecordState, Release, Revival,
};

/// The lease used by tests that wait for one to lapse.
pub const SHORT: Duration = Duration::from_millis(400);
/// How long those tests wait: comfortably past [`SHORT`].
pub const PAST_SHORT: Duration = Duration::from_millis(700);
const LONG: Duration = Duration::from_secs(60);

fn ttl(lease: Duration) -> ClaimTtl {
    ClaimTtl {
        lease,
        retain: LONG,
    }
}

async fn sleep(d: Duration) {
    tokio::time::sleep(d).await;
}

/// Claims and insists it is won: the lease, or a panic naming the key and
/// what the store answered instead.
pub async fn must_claim<S: DedupStore + ?Sized>(
    store: &S,
    scope: &str,
    key: &str,
    ttl: ClaimTtl,
) -> Lease {
    match store.claim(scope, key, ttl).await {
        Ok(claim) => claim.into_lease().unwrap_or_else(|other| {
            panic!("claim of {scope}/{key}: expected Claimed, got {other:?}")
        }),
        Err(e) => panic!("claim of {scope}/{key}: expected Claimed, got the error {e} ({e:?})"),
    }
}

/// Insists a fenced operation (`renew`, `complete`, `fail`, `bury`) took
/// effect; panics at the caller with what came back instead.
#[track_caller]
pub fn assert_applied(result: Result<Fenced, Error>) {
    match result {
        Ok(Fenced::Applied) => {}
        Ok(Fenced::LeaseLost) => {
            panic!(
                "expected Fenced::Applied, got Fenced::LeaseLost (the record is not this lease's)"
            )
        }
        Err(e) => panic!("expected Fenced::Applied, got the error {e} ({e:?})"),
    }
}

/// Insists a fenced operation was refused as [`Fenced::LeaseLost`];
/// panics at the caller with what came back instead.
#[track_caller]
pub fn assert_lease_lost(result: Result<Fenced, Error>) {
    match result {
        Ok(Fenced::LeaseLost) => {}
        Ok(Fenced::Applied) => {
            panic!(
                "expected Fenced::LeaseLost, got Fenced::Applied (the lease still owned the record)"
            )
        }
        Err(e) => panic!("expected Fenced::LeaseLost, got the error {e} ({e:?})"),
    }
}

async fn state<S: DedupStore + ?Sized>(
    store: &S,
    scope: &str,
    key: &str,
) -> Option<(RecordState, u32)> {
    store
        .get(scope, key)
        .await
        .expect("get")
        .map(|r| (r.state, r.attempts))
}

/// A new key is won with attempt 1; a second claim meets the live lease.
pub async fn first_claim_wins<S: DedupStore + ?Sized>(store: &S, scope: &str) {
    let lease = must_claim(store, scope, "k1", ttl(LONG)).await;
    assert_eq!(
        (lease.scope.as_str(), lease.key.as_str(), lease.attempt),
        (scope, "k1", 1)
    );
    match store.claim(scope, "k1", ttl(LONG)).await.expect("claim") {
        Claim::InProgress { retry_after } => {
            assert!(
                retry_after <= LONG && retry_after > LONG - Duration::from_secs(10),
                "{retry_after:?}"
            )
        }
        other => panic!("expected InProgress, got {other:?}"),
    }
    assert_eq!(
        state(store, scope, "k1").await,
        Some((RecordState::Claimed, 1))
    );
    let record = store.get(scope, "k1").await.expect("get").expect("record");
    assert!(record.lease_remaining.is_some_and(|r| r > Duration::ZERO));
    assert_eq!(store.get(scope, "absent").await.expect("get"), None);
}

/// 32 concurrent claims of one key: exactly one wins.
pub async fn concurrent_claims_have_one_winner<S: DedupStore + ?Sized>(store: &S, scope: &str) {
    for round in 0..3 {
        let key = format!("race-{round}");
        let claims = join_all((0..32).map(|_| store.claim(scope, &key, ttl(LONG)))).await;
        let won = claims
            .iter()
            .filter(|c| matches!(c, Ok(Claim::Claimed(_))))
            .count();
        let busy = claims
            .iter()
            .filter(|c| matches!(c, Ok(Claim::InProgress { .. })))
            .count();
        assert_eq!((won, busy), (1, 31), "{claims:?}");
    }
}

/// Completion turns later claims into `Done`; a second completion is fenced.
pub async fn complete_makes_duplicates_done<S: DedupStore + ?Sized>(store: &S, scope: &str) {
    let lease = must_claim(store, scope, "k", ttl(LONG)).await;
    assert_applied(store.complete(&lease, LONG).await);
    assert_eq!(
        store.claim(scope, "k", ttl(LONG)).await.expect("claim"),
        Claim::Done
    );
    assert_eq!(state(store, scope, "k").await, Some((RecordState::Done, 1)));
    // The same completion again (its first answer lost): applied, no change.
    assert_applied(store.complete(&lease, LONG).await);
    assert_eq!(state(store, scope, "k").await, Some((RecordState::Done, 1)));
    // Another settlement of a done key is refused.
    assert_lease_lost(store.bury(&lease, LONG).await);
    assert_lease_lost(store.fail(&lease, Release::CountAttempt).await);
    assert_eq!(
        store.claim(scope, "k", ttl(LONG)).await.expect("claim"),
        Claim::Done
    );
}

/// Without the owner's token nobody can renew, complete, fail or bury.
pub async fn non_owner_is_fenced<S: DedupStore + ?Sized>(store: &S, scope: &str) {
    let lease = must_claim(store, scope, "k", ttl(LONG)).await;
    let mut forged = lease.clone();
    forged.token = LeaseToken(lease.token.0.wrapping_add(1));
    assert_lease_lost(store.renew(&forged, LONG).await);
    assert_lease_lost(store.complete(&forged, LONG).await);
    assert_lease_lost(store.fail(&forged, Release::CountAttempt).await);
    assert_lease_lost(store.bury(&forged, LONG).await);
    let mut elsewhere = lease.clone();
    elsewhere.key = "other".into();
    assert_lease_lost(store.complete(&elsewhere, LONG).await);
    assert_eq!(
        state(store, scope, "k").await,
        Some((RecordState::Claimed, 1))
    );
    assert_eq!(
        state(store, scope, "other").await,
        None,
        "a fenced op must not create a record"
    );
    assert_applied(store.renew(&lease, LONG).await);
    assert_applied(store.complete(&lease, LONG).await);
}

/// A lapsed lease is taken over with the attempt counted, and the old owner
/// then finds every fenced operation refused.
pub async fn lapsed_lease_is_taken_over<S: DedupStore + ?Sized>(store: &S, scope: &str) {
    let old = must_claim(store, scope, "k", ttl(SHORT)).await;
    sleep(PAST_SHORT).await;
    let record = store
        .get(scope, "k")
        .await
        .expect("get")
        .expect("a lapsed lease keeps its record");
    assert_eq!((record.state, record.attempts), (RecordState::Claimed, 1));
    assert_eq!(record.lease_remaining, Some(Duration::ZERO));
    let new = must_claim(store, scope, "k", ttl(LONG)).await;
    assert_eq!(new.attempt, 2, "a takeover is an attempt");
    assert_ne!(new.token, old.token);
    assert_lease_lost(store.renew(&old, LONG).await);
    assert_lease_lost(store.complete(&old, LONG).await);
    assert_lease_lost(store.bury(&old, LONG).await);
    assert_eq!(
        state(store, scope, "k").await,
        Some((RecordState::Claimed, 2))
    );
    assert_applied(store.complete(&new, LONG).await);
    assert_eq!(
        store.claim(scope, "k", ttl(LONG)).await.expect("claim"),
        Claim::Done
    );
}

/// `fail` releases at once and keeps the count: attempts go 1, 2, 3.
pub async fn fail_releases_and_counts_attempts<S: DedupStore + ?Sized>(store: &S, scope: &str) {
    for expected in 1..=3 {
        let lease = must_claim(store, scope, "k", ttl(LONG)).await;
        assert_eq!(lease.attempt, expected);
        assert_applied(store.fail(&lease, Release::CountAttempt).await);
        assert_eq!(
            state(store, scope, "k").await,
            Some((RecordState::Released, expected))
        );
        // Retried (its first answer lost): applied, nothing changes.
        assert_applied(store.fail(&lease, Release::CountAttempt).await);
        assert_eq!(
            state(store, scope, "k").await,
            Some((RecordState::Released, expected))
        );
        assert_lease_lost(store.complete(&lease, LONG).await);
    }
}

/// `fail` with [`Release::RefundAttempt`] gives the attempt back.
pub async fn refund_gives_the_attempt_back<S: DedupStore + ?Sized>(store: &S, scope: &str) {
    let first = must_claim(store, scope, "k", ttl(LONG)).await;
    assert_applied(store.fail(&first, Release::CountAttempt).await);
    let second = must_claim(store, scope, "k", ttl(LONG)).await;
    assert_eq!(second.attempt, 2);
    assert_applied(store.fail(&second, Release::RefundAttempt).await);
    assert_eq!(
        state(store, scope, "k").await,
        Some((RecordState::Released, 1))
    );
    // A refund retried does not give back a second attempt.
    assert_applied(store.fail(&second, Release::RefundAttempt).await);
    assert_eq!(
        state(store, scope, "k").await,
        Some((RecordState::Released, 1))
    );
    assert_eq!(must_claim(store, scope, "k", ttl(LONG)).await.attempt, 2);
}

/// A buried key answers `Dead`.
pub async fn bury_makes_dead<S: DedupStore + ?Sized>(store: &S, scope: &str) {
    let lease = must_claim(store, scope, "k", ttl(LONG)).await;
    assert_applied(store.bury(&lease, LONG).await);
    assert_eq!(
        store.claim(scope, "k", ttl(LONG)).await.expect("claim"),
        Claim::Dead
    );
    assert_eq!(state(store, scope, "k").await, Some((RecordState::Dead, 1)));
    assert_applied(store.bury(&lease, LONG).await);
    assert_lease_lost(store.complete(&lease, LONG).await);
    assert_eq!(state(store, scope, "k").await, Some((RecordState::Dead, 1)));
}

/// A settlement whose answer was lost is told apart from a lost lease:
/// [`DedupStore::lease_state`] shows the lease's own record (claimed, then
/// settled) and nothing once another claim owns the key; a completion
/// retried, alone or twice in one batch, answers applied; only another
/// token's record is a lost lease, and no read or settlement of an absent
/// key creates one.
pub async fn settlements_retried_find_their_own<S: DedupStore + ?Sized>(store: &S, scope: &str) {
    let lease = must_claim(store, scope, "k", ttl(LONG)).await;
    let read = |l: Lease| async move { store.lease_state(&l).await.expect("lease_state") };
    assert_eq!(read(lease.clone()).await, Some(RecordState::Claimed));
    let mut forged = lease.clone();
    forged.token = LeaseToken(lease.token.0 ^ 1);
    assert_eq!(read(forged.clone()).await, None);
    let done = store
        .complete_many(&[lease.clone(), lease.clone(), forged], LONG)
        .await
        .expect("complete_many");
    assert_eq!(
        done,
        vec![Fenced::Applied, Fenced::Applied, Fenced::LeaseLost],
        "a lease twice in one batch answers as two calls in a row"
    );
    assert_eq!(read(lease.clone()).await, Some(RecordState::Done));
    for _ in 0..2 {
        assert_applied(store.complete(&lease, LONG).await);
        assert_eq!(
            store
                .complete_many(std::slice::from_ref(&lease), LONG)
                .await
                .expect("complete_many"),
            vec![Fenced::Applied]
        );
    }
    assert_eq!(state(store, scope, "k").await, Some((RecordState::Done, 1)));

    // Released, then taken over by a new claim: the old lease's retries
    // are refused and its reads show nothing.
    let old = must_claim(store, scope, "r", ttl(LONG)).await;
    assert_applied(store.fail(&old, Release::CountAttempt).await);
    assert_eq!(read(old.clone()).await, Some(RecordState::Released));
    let new = must_claim(store, scope, "r", ttl(LONG)).await;
    assert_eq!(new.attempt, 2);
    assert_eq!(read(old.clone()).await, None);
    assert_eq!(read(new.clone()).await, Some(RecordState::Claimed));
    assert_lease_lost(store.fail(&old, Release::CountAttempt).await);
    assert_lease_lost(store.complete(&old, LONG).await);
    assert_eq!(
        state(store, scope, "r").await,
        Some((RecordState::Claimed, 2))
    );

    // Buried: its own reads show it dead.
    assert_applied(store.bury(&new, LONG).await);
    assert_eq!(read(new).await, Some(RecordState::Dead));

    // Absent: nothing to read, nothing created.
    let mut absent = lease.clone();
    absent.key = "absent".into();
    assert_eq!(read(absent.clone()).await, None);
    assert_lease_lost(store.complete(&absent, LONG).await);
    assert_lease_lost(store.fail(&absent, Release::RefundAttempt).await);
    assert_eq!(state(store, scope, "absent").await, None);
}

/// The same key in two scopes is two records.
pub async fn scopes_are_isolated<S: DedupStore + ?Sized>(store: &S, scope: &str) {
    let other = format!("{scope}.b");
    let lease = must_claim(store, scope, "shared", ttl(LONG)).await;
    assert_applied(store.complete(&lease, LONG).await);
    let there = must_claim(store, &other, "shared", ttl(LONG)).await;
    assert_eq!(there.attempt, 1);
    assert!(store.forget(&other, "shared").await.expect("forget"));
    assert_eq!(
        store
            .claim(scope, "shared", ttl(LONG))
            .await
            .expect("claim"),
        Claim::Done
    );
}

/// Done records expire after `keep_for`; the key is then new again.
pub async fn done_expires_after_keep_for<S: DedupStore + ?Sized>(store: &S, scope: &str) {
    let lease = must_claim(store, scope, "k", ttl(SHORT)).await;
    assert_applied(store.complete(&lease, SHORT).await);
    assert_eq!(
        store.claim(scope, "k", ttl(LONG)).await.expect("claim"),
        Claim::Done
    );
    sleep(PAST_SHORT).await;
    assert_eq!(store.get(scope, "k").await.expect("get"), None);
    assert_eq!(must_claim(store, scope, "k", ttl(LONG)).await.attempt, 1);
}

/// `forget` removes any record; the key can be handled again.
pub async fn forget_makes_key_claimable<S: DedupStore + ?Sized>(store: &S, scope: &str) {
    let lease = must_claim(store, scope, "k", ttl(LONG)).await;
    assert_applied(store.complete(&lease, LONG).await);
    assert!(store.forget(scope, "k").await.expect("forget"));
    assert!(!store.forget(scope, "k").await.expect("forget"));
    let again = must_claim(store, scope, "k", ttl(LONG)).await;
    assert_eq!(again.attempt, 1);
    assert!(store.forget(scope, "k").await.expect("forget"));
    assert_lease_lost(store.complete(&again, LONG).await);
    assert_eq!(store.get(scope, "k").await.expect("get"), None);
}

/// `revive` removes a dead, released or lapsed record, so the next claim
/// is attempt 1, answers `Revived` for an absent key, and leaves a done
/// record and a live lease exactly as they are.
pub async fn revive_touches_only_what_is_safe<S: DedupStore + ?Sized>(store: &S, scope: &str) {
    let revive = async |key: &str| store.revive(scope, key).await.expect("revive");
    // Absent: nothing to remove, the key is claimable.
    assert_eq!(revive("absent").await, Revival::Revived { previous: None });
    assert_eq!(
        state(store, scope, "absent").await,
        None,
        "revive created a record"
    );

    // Dead: removed, attempts start again.
    let lease = must_claim(store, scope, "dead", ttl(LONG)).await;
    assert_applied(store.bury(&lease, LONG).await);
    assert_eq!(
        revive("dead").await,
        Revival::Revived {
            previous: Some(RecordState::Dead)
        }
    );
    assert_eq!(state(store, scope, "dead").await, None);
    assert_eq!(must_claim(store, scope, "dead", ttl(LONG)).await.attempt, 1);

    // Released after two failed attempts: removed, the count reset.
    for _ in 0..2 {
        let lease = must_claim(store, scope, "released", ttl(LONG)).await;
        let failed = store.fail(&lease, Release::CountAttempt).await;
        assert_applied(failed);
    }
    assert_eq!(
        revive("released").await,
        Revival::Revived {
            previous: Some(RecordState::Released)
        }
    );
    assert_eq!(
        must_claim(store, scope, "released", ttl(LONG))
            .await
            .attempt,
        1
    );

    // A lapsed claim: removed; its old owner is fenced out.
    let lapsed = must_claim(store, scope, "lapsed", ttl(SHORT)).await;
    // A live lease: left alone, with the time it has left.
    let live = must_claim(store, scope, "live", ttl(LONG)).await;
    // Done: left alone.
    let done = must_claim(store, scope, "done", ttl(LONG)).await;
    assert_applied(store.complete(&done, LONG).await);
    sleep(PAST_SHORT).await;
    assert_eq!(
        revive("lapsed").await,
        Revival::Revived {
            previous: Some(RecordState::Claimed)
        }
    );
    assert_lease_lost(store.complete(&lapsed, LONG).await);
    assert_eq!(state(store, scope, "lapsed").await, None);
    match revive("live").await {
        Revival::InProgress { retry_after } => assert!(
            retry_after <= LONG && retry_after > LONG - Duration::from_secs(10),
            "{retry_after:?}"
        ),
        other => panic!("revive of a live lease: expected InProgress, got {other:?}"),
    }
    assert_eq!(
        state(store, scope, "live").await,
        Some((RecordState::Claimed, 1))
    );
    assert_applied(store.renew(&live, LONG).await);
    assert_eq!(revive("done").await, Revival::Done);
    assert_eq!(
        state(store, scope, "done").await,
        Some((RecordState::Done, 1))
    );
    assert_eq!(
        store.claim(scope, "done", ttl(LONG)).await.expect("claim"),
        Claim::Done
    );

    // A done record that expired is absent.
    let short = must_claim(store, scope, "expired", ttl(SHORT)).await;
    assert_applied(store.complete(&short, SHORT).await);
    sleep(PAST_SHORT).await;
    assert_eq!(revive("expired").await, Revival::Revived { previous: None });

    for (s, k) in [("bad scope", "k"), (scope, "{x}"), (scope, "")] {
        match store.revive(s, k).await {
            Err(Error::InvalidInput { .. }) => {}
            other => panic!("revive({s:?}, {k:?}) must be InvalidInput, got {other:?}"),
        }
    }
}

/// `revive_many` answers per record, in order, like calls in a row: a
/// record named twice is revived once (the repeat finds it gone).
pub async fn revive_many_answers_in_order<S: DedupStore + ?Sized>(store: &S, scope: &str) {
    let other = format!("{scope}.b");
    for (s, key) in [(scope, "dead"), (other.as_str(), "dead")] {
        let lease = must_claim(store, s, key, ttl(LONG)).await;
        assert_applied(store.bury(&lease, LONG).await);
    }
    let done = must_claim(store, scope, "done", ttl(LONG)).await;
    assert_applied(store.complete(&done, LONG).await);
    let _live = must_claim(store, scope, "live", ttl(LONG)).await;
    let records: Vec<(String, String)> = [
        (scope, "dead"),
        (scope, "done"),
        (scope, "live"),
        (scope, "absent"),
        (scope, "dead"),
        (other.as_str(), "dead"),
    ]
    .iter()
    .map(|(s, k)| ((*s).to_owned(), (*k).to_owned()))
    .collect();
    let answers = store.revive_many(&records).await.expect("revive_many");
    let dead = Revival::Revived {
        previous: Some(RecordState::Dead),
    };
    let gone = Revival::Revived { previous: None };
    assert_eq!(answers.len(), 6, "{answers:?}");
    assert_eq!(
        (answers[0], answers[1], answers[3], answers[4], answers[5]),
        (dead, Revival::Done, gone, gone, dead),
        "{answers:?}"
    );
    assert!(
        matches!(answers[2], Revival::InProgress { .. }),
        "{answers:?}"
    );
    assert_eq!(state(store, scope, "dead").await, None);
    assert_eq!(state(store, &other, "dead").await, None);
    assert_eq!(
        state(store, scope, "done").await,
        Some((RecordState::Done, 1))
    );
    assert_eq!(
        state(store, scope, "live").await,
        Some((RecordState::Claimed, 1))
    );
    assert_eq!(store.revive_many(&[]).await.expect("empty"), vec![]);
    let bad = vec![(scope.to_owned(), "{x}".to_owned())];
    assert!(matches!(
        store.revive_many(&bad).await,
        Err(Error::InvalidInput { .. })
    ));
}

/// Concurrent claims and revivals of a dead key never make it claimable
/// twice at once: each round has exactly one winning claim, and a revival
/// never answers for a live lease as if it had removed it.
pub async fn revive_races_claims_safely<S: DedupStore + ?Sized>(store: &S, scope: &str) {
    for round in 0..5 {
        let key = format!("race-{round}");
        let lease = must_claim(store, scope, &key, ttl(LONG)).await;
        assert_applied(store.bury(&lease, LONG).await);
        let revivals = join_all((0..8).map(|_| store.revive(scope, &key)));
        let claims = join_all((0..16).map(|_| store.claim(scope, &key, ttl(LONG))));
        let (revivals, claims) = futures::join!(revivals, claims);
        let won: Vec<&Lease> = claims
            .iter()
            .filter_map(|c| match c {
                Ok(Claim::Claimed(l)) => Some(l),
                _ => None,
            })
            .collect();
        for r in &revivals {
            assert!(r.is_ok(), "{r:?}");
        }
        // Claims before any revival see Dead; after one, exactly one wins
        // (a later revival finds its live lease and leaves it).
        assert!(won.len() <= 1, "two winners: {claims:?} / {revivals:?}");
        if let Some(lease) = won.first() {
            assert_eq!(lease.attempt, 1);
            assert_eq!(
                store.complete(lease, LONG).await.expect("complete"),
                Fenced::Applied,
                "a revival removed a live lease: {revivals:?}"
            );
        }
    }
}

/// `renew` pushes the lease out so nobody can take over.
pub async fn renew_extends_lease<S: DedupStore + ?Sized>(store: &S, scope: &str) {
    let lease = must_claim(store, scope, "k", ttl(SHORT)).await;
    sleep(SHORT / 2).await;
    assert_applied(store.renew(&lease, Duration::from_secs(5)).await);
    sleep(PAST_SHORT).await;
    assert!(
        matches!(
            store.claim(scope, "k", ttl(LONG)).await.expect("claim"),
            Claim::InProgress { .. }
        ),
        "a renewed lease must still hold"
    );
    assert_applied(store.complete(&lease, LONG).await);
}

/// `claim_many` and `complete_many` answer per item, in order.
pub async fn batch_forms_answer_in_order<S: DedupStore + ?Sized>(store: &S, scope: &str) {
    let done = must_claim(store, scope, "b1", ttl(LONG)).await;
    assert_applied(store.complete(&done, LONG).await);
    let keys: Vec<String> = ["b0", "b1", "b2"].map(String::from).to_vec();
    let claims = store
        .claim_many(scope, &keys, ttl(LONG))
        .await
        .expect("claim_many");
    assert_eq!(claims.len(), 3);
    assert_eq!(claims[1], Claim::Done);
    let mut leases: Vec<Lease> = [&claims[0], &claims[2]]
        .map(|c| c.clone().into_lease().expect("a new key is won"))
        .to_vec();
    assert_eq!(
        (leases[0].key.as_str(), leases[1].key.as_str()),
        ("b0", "b2")
    );
    let mut forged = leases[0].clone();
    forged.token = LeaseToken(forged.token.0 ^ 1);
    leases.insert(1, forged);
    let fenced = store
        .complete_many(&leases, LONG)
        .await
        .expect("complete_many");
    assert_eq!(
        fenced,
        vec![Fenced::Applied, Fenced::LeaseLost, Fenced::Applied]
    );
    let again = store
        .claim_many(scope, &keys, ttl(LONG))
        .await
        .expect("claim_many");
    assert_eq!(again, vec![Claim::Done, Claim::Done, Claim::Done]);
    assert_eq!(
        store
            .claim_many(scope, &[], ttl(LONG))
            .await
            .expect("empty batch"),
        vec![]
    );
}

/// A claim without its token, for comparing answers across scopes: a wait
/// on a lease of [`LONG`] (give or take the time a test takes) is just
/// "in progress".
fn shape(claim: &Claim) -> String {
    match claim {
        Claim::Claimed(lease) => format!("claimed {} #{}", lease.key, lease.attempt),
        Claim::Done => "done".into(),
        Claim::Dead => "dead".into(),
        Claim::InProgress { retry_after }
            if *retry_after <= LONG && *retry_after > LONG - Duration::from_secs(10) =>
        {
            "in progress".into()
        }
        Claim::InProgress { retry_after } => format!("in progress for {retry_after:?}"),
    }
}

/// Keys in every state a claim can meet, each made by its own lease:
/// `released` (one failed attempt), `lapsed` (a lease of [`SHORT`]; wait
/// [`PAST_SHORT`] before relying on it), `live`, `done` and `dead`.
/// Answers those leases by key.
async fn keys_in_every_state<S: DedupStore + ?Sized>(
    store: &S,
    scope: &str,
) -> HashMap<&'static str, Lease> {
    let mut leases = HashMap::new();
    for (key, lease) in [
        ("released", LONG),
        ("lapsed", SHORT),
        ("live", LONG),
        ("done", LONG),
        ("dead", LONG),
    ] {
        leases.insert(key, must_claim(store, scope, key, ttl(lease)).await);
    }
    assert_applied(store.fail(&leases["released"], Release::CountAttempt).await);
    assert_applied(store.complete(&leases["done"], LONG).await);
    assert_applied(store.bury(&leases["dead"], LONG).await);
    leases
}

/// A key named more than once in one `claim_many`, and a lease named more
/// than once in one `complete_many`, answer exactly as the same calls made
/// one after another would, and leave the same records. Two scopes start
/// out alike, with a new key and one in every other state; one is handled
/// with batches, the other with single calls.
pub async fn batch_repeats_answer_like_calls_in_a_row<S: DedupStore + ?Sized>(
    store: &S,
    scope: &str,
) {
    let twins = [format!("{scope}.batch"), format!("{scope}.single")];
    let mut made = Vec::new();
    for twin in &twins {
        made.push(keys_in_every_state(store, twin).await);
    }
    sleep(PAST_SHORT).await;
    let keys: Vec<String> = [
        "new", "new", "released", "done", "released", "dead", "live", "lapsed", "new", "lapsed",
        "done", "dead", "live",
    ]
    .map(String::from)
    .to_vec();
    let batched = store
        .claim_many(&twins[0], &keys, ttl(LONG))
        .await
        .expect("claim_many");
    let mut single = Vec::new();
    for key in &keys {
        single.push(store.claim(&twins[1], key, ttl(LONG)).await.expect("claim"));
    }
    let expected = [
        "claimed new #1",
        "in progress",
        "claimed released #2",
        "done",
        "in progress",
        "dead",
        "in progress",
        "claimed lapsed #2",
        "in progress",
        "in progress",
        "done",
        "dead",
        "in progress",
    ];
    let shapes = |claims: &[Claim]| claims.iter().map(shape).collect::<Vec<_>>();
    assert_eq!(shapes(&single), expected, "claims one after another");
    assert_eq!(shapes(&batched), expected, "claim_many with repeats");
    let all = ["new", "released", "lapsed", "live", "done", "dead"];
    let records = async |twin: &str| {
        let mut out = Vec::new();
        for key in all {
            out.push((key, state(store, twin, key).await));
        }
        out
    };
    let claimed = |attempts| Some((RecordState::Claimed, attempts));
    let after_claims = vec![
        ("new", claimed(1)),
        ("released", claimed(2)),
        ("lapsed", claimed(2)),
        ("live", claimed(1)),
        ("done", Some((RecordState::Done, 1))),
        ("dead", Some((RecordState::Dead, 1))),
    ];
    assert_eq!(records(&twins[1]).await, after_claims, "single calls");
    assert_eq!(records(&twins[0]).await, after_claims, "claim_many");

    // The leases to complete, by where they come from: the claims above
    // (the first won per key), the leases that made the records, or a
    // forged token.
    enum From {
        Won,
        Made,
        Forged,
    }
    let settle = [
        ("new", From::Forged),
        ("new", From::Won),
        ("new", From::Won),
        ("released", From::Made),
        ("released", From::Won),
        ("done", From::Made),
        ("live", From::Made),
        ("released", From::Won),
        ("dead", From::Made),
        ("lapsed", From::Made),
        ("lapsed", From::Won),
        ("live", From::Made),
        ("done", From::Made),
        ("lapsed", From::Won),
        ("new", From::Forged),
    ];
    let leases = |claims: &[Claim], made: &HashMap<&str, Lease>| -> Vec<Lease> {
        let won = |key: &str| {
            claims
                .iter()
                .find_map(|c| match c {
                    Claim::Claimed(l) if l.key == key => Some(l.clone()),
                    _ => None,
                })
                .unwrap_or_else(|| panic!("{key} was not won: {claims:?}"))
        };
        settle
            .iter()
            .map(|(key, from)| match from {
                From::Won => won(key),
                From::Made => made[key].clone(),
                From::Forged => {
                    let mut forged = won(key);
                    forged.token = LeaseToken(forged.token.0 ^ 1);
                    forged
                }
            })
            .collect()
    };
    let batched = store
        .complete_many(&leases(&batched, &made[0]), LONG)
        .await
        .expect("complete_many");
    let mut single_answers = Vec::new();
    for lease in leases(&single, &made[1]) {
        single_answers.push(store.complete(&lease, LONG).await.expect("complete"));
    }
    let (ok, lost) = (Fenced::Applied, Fenced::LeaseLost);
    let expected = vec![
        lost, ok, ok, lost, ok, ok, ok, ok, lost, lost, ok, ok, ok, ok, lost,
    ];
    assert_eq!(single_answers, expected, "completions one after another");
    assert_eq!(batched, expected, "complete_many with repeats");
    let done = |attempts| Some((RecordState::Done, attempts));
    let after_completions = vec![
        ("new", done(1)),
        ("released", done(2)),
        ("lapsed", done(2)),
        ("live", done(1)),
        ("done", done(1)),
        ("dead", Some((RecordState::Dead, 1))),
    ];
    assert_eq!(records(&twins[1]).await, after_completions, "single calls");
    assert_eq!(records(&twins[0]).await, after_completions, "complete_many");

    // Completed keeping nothing, a record is gone at once: its repeat
    // finds none.
    let mut gone = Vec::new();
    for twin in &twins {
        gone.push(must_claim(store, twin, "gone", ttl(LONG)).await);
    }
    let batched = store
        .complete_many(&[gone[0].clone(), gone[0].clone()], Duration::ZERO)
        .await
        .expect("complete_many");
    let mut single = Vec::new();
    for _ in 0..2 {
        single.push(
            store
                .complete(&gone[1], Duration::ZERO)
                .await
                .expect("complete"),
        );
    }
    assert_eq!(
        single,
        [ok, lost],
        "completions keeping nothing, one after another"
    );
    assert_eq!(
        batched,
        [ok, lost],
        "complete_many keeping nothing, with a repeat"
    );
    for twin in &twins {
        assert_eq!(state(store, twin, "gone").await, None);
    }
}

/// `renew`, `complete`, `fail`, `bury` and `complete_many` with a lease
/// on a key that has no record (never claimed, forgotten, or expired)
/// answer lease lost, and leave no record behind: the key is new to the
/// next claim.
pub async fn fenced_ops_on_an_absent_key_create_nothing<S: DedupStore + ?Sized>(
    store: &S,
    scope: &str,
) {
    let forgotten = must_claim(store, scope, "forgotten", ttl(LONG)).await;
    assert!(store.forget(scope, "forgotten").await.expect("forget"));
    let expired = must_claim(
        store,
        scope,
        "expired",
        ClaimTtl {
            lease: SHORT,
            retain: SHORT,
        },
    )
    .await;
    let never = Lease {
        key: "never".into(),
        ..forgotten.clone()
    };
    sleep(PAST_SHORT).await;
    for lease in [&never, &forgotten, &expired] {
        let key = lease.key.as_str();
        assert_eq!(state(store, scope, key).await, None, "{key} has a record");
        assert_lease_lost(store.renew(lease, LONG).await);
        assert_lease_lost(store.complete(lease, LONG).await);
        assert_lease_lost(store.fail(lease, Release::CountAttempt).await);
        assert_lease_lost(store.fail(lease, Release::RefundAttempt).await);
        assert_lease_lost(store.bury(lease, LONG).await);
        let batch = [lease.clone(), lease.clone()];
        assert_eq!(
            store
                .complete_many(&batch, LONG)
                .await
                .expect("complete_many"),
            vec![Fenced::LeaseLost; 2],
            "complete_many of {key}"
        );
        assert_eq!(
            store.lease_state(lease).await.expect("lease_state"),
            None,
            "lease_state of {key}"
        );
        assert_eq!(
            state(store, scope, key).await,
            None,
            "a fenced op left a record for {key}"
        );
        assert_eq!(must_claim(store, scope, key, ttl(LONG)).await.attempt, 1);
    }
}

/// Hostile scopes and keys are typed errors, never a record.
pub async fn rejects_bad_scope_and_key<S: DedupStore + ?Sized>(store: &S, scope: &str) {
    let long = "k".repeat(crate::key::MAX_KEY_LEN + 1);
    for (s, k) in [
        ("bad scope", "k"),
        ("a:b", "k"),
        (scope, "{x}"),
        (scope, ""),
        (scope, long.as_str()),
    ] {
        match store.claim(s, k, ttl(LONG)).await {
            Err(Error::InvalidInput { .. }) => {}
            other => panic!("claim({s:?}, {k:?}) must be InvalidInput, got {other:?}"),
        }
    }
}

/// The store `setup` makes, behind [`crate::Coalescing`] with one call out
/// at a time, so the suite's concurrent calls queue up and go out as
/// `claim_many` / `complete_many`: what
/// `dedup_store_conformance!(setup, coalesced)` runs the suite on.
/// `None` when `setup` skips.
pub async fn coalesced<S, F, Fut>(setup: F) -> Option<crate::Coalescing<S>>
where
    S: DedupStore + 'static,
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Option<S>>,
{
    Some(crate::Coalescing::new(setup().await?).with_max_in_flight(1))
}

/// Behind [`crate::Coalescing`] (with at most two calls in flight), 500
/// concurrent tasks claim 400 distinct keys (100 of them twice) and
/// complete what they win: the calls go out in batches (fewer than 250
/// store calls for 500 claims, fewer than 200 for the 400 completions),
/// every key has exactly one winner, and every
/// record ends done after one attempt. For stores whose calls take a round
/// trip; an in-process store answers before a queue can form.
pub async fn coalesced_calls_go_out_in_batches<S: DedupStore + 'static>(
    store: &crate::Coalescing<S>,
    scope: &str,
) {
    let store = store.clone().with_max_in_flight(2);
    let ttl = ttl(LONG);
    let tasks = (0..500).map(|i| {
        let (store, scope) = (store.clone(), scope.to_owned());
        async move {
            match store.claim(&scope, &format!("k{}", i % 400), ttl).await {
                Ok(Claim::Claimed(lease)) => {
                    assert_eq!(lease.attempt, 1, "{}", lease.key);
                    assert_applied(store.complete(&lease, LONG).await);
                    1
                }
                Ok(Claim::InProgress { .. } | Claim::Done) => 0,
                other => panic!("claim: {other:?}"),
            }
        }
    });
    let tasks: Vec<_> = tasks.map(tokio::spawn).collect();
    let mut wins = 0;
    for t in join_all(tasks).await {
        wins += t.expect("claimer");
    }
    assert_eq!(wins, 400, "one winner per key");
    let stats = store.stats();
    assert!(
        stats.claim_batches > 0 && stats.complete_batches > 0,
        "{stats:?}"
    );
    let claims = stats.direct_claims + stats.batched_claims;
    let completions = stats.direct_completes + stats.batched_completes;
    assert_eq!((claims, completions), (500, 400), "{stats:?}");
    let calls = stats.claim_batches + stats.direct_claims;
    assert!(calls < 250, "500 claims took {calls} calls: {stats:?}");
    let calls = stats.complete_batches + stats.direct_completes;
    assert!(calls < 200, "400 completions took {calls} calls: {stats:?}");
    for i in 0..400 {
        let key = format!("k{i}");
        let rec = store.get(scope, &key).await.expect("get").expect("record");
        assert_eq!((rec.state, rec.attempts), (RecordState::Done, 1), "{key}");
    }
}
