//! Replay of dead letters: back into the work queue, with their dedup
//! records forgotten so they are handled again.

use crate::error::Error;
use crate::key::KeyStrategy;
use crate::message::{OutgoingMessage, headers};
use crate::{Broker, DedupStore};

/// What [`replay_dead_letters`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Dead letters published back to the work queue.
    pub replayed: u64,
    /// Dedup records deleted on the way (a key may have had none).
    pub forgotten: u64,
}

/// Moves up to `max` messages from the dead-letter queue back to the work
/// queue, oldest first.
///
/// For each: its key (found with the same `strategy` the engine uses) is
/// forgotten in `scope`, so the message is not taken for a duplicate of a
/// dead one; then it is republished with its body, id and own headers
/// (idemq's reason/attempt headers removed); only then is the dead letter
/// acked. On an error the dead letter is put back and the error returned:
/// nothing is lost, at worst a message is published twice (and deduplicated).
pub async fn replay_dead_letters<B, S>(
    broker: &B,
    store: &S,
    scope: &str,
    strategy: &KeyStrategy,
    max: usize,
) -> Result<ReplayReport, Error>
where
    B: Broker + ?Sized,
    S: DedupStore + ?Sized,
{
    crate::key::check_scope(scope)?;
    let mut report = ReplayReport::default();
    while (report.replayed as usize) < max {
        let Some(dead) = broker.next_dead_letter().await? else {
            break;
        };
        let step = async {
            let forgot = match strategy.extract(&dead) {
                Some(key) => store.forget(scope, &key).await?,
                None => false,
            };
            let mut msg = OutgoingMessage::new(dead.body.clone());
            msg.message_id.clone_from(&dead.message_id);
            msg.headers = dead.headers.clone();
            for name in headers::ALL {
                msg.headers.remove(name);
            }
            broker.publish(msg).await?;
            Ok::<bool, Error>(forgot)
        };
        match step.await {
            Ok(forgot) => {
                report.forgotten += u64::from(forgot);
                report.replayed += 1;
                broker.ack(&dead).await?;
            }
            Err(e) => {
                // Best effort: if this fails too, the broker returns the
                // unacked dead letter to its queue when the channel closes.
                let _ = broker.nack(&dead, true).await;
                return Err(e);
            }
        }
    }
    Ok(report)
}
