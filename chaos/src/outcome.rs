//! What the handler does with each id, decided from the id alone (and the
//! attempt number), so the expected end state is known in advance.

/// The fate of an id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// Succeeds at once.
    Ok,
    /// Fails transiently on attempt 1, then succeeds.
    FlakyOnce,
    /// Fails transiently on attempts 1 and 2, then succeeds.
    FlakyTwice,
    /// Fails permanently: dead-lettered with reason `permanent`.
    Poison,
    /// Fails transiently every time: dead-lettered with reason
    /// `max-attempts` once the attempts are used up.
    Exhaust,
}

impl Kind {
    /// Whether the handler ever succeeds for such an id.
    pub fn succeeds(self) -> bool {
        matches!(self, Kind::Ok | Kind::FlakyOnce | Kind::FlakyTwice)
    }
}

/// The fate of `id`: about 3.4 % poison, 3.2 % exhausting, 7 % failing
/// twice, 12 % failing once, the rest succeeding.
pub fn kind(id: u32) -> Kind {
    if id % 29 == 11 {
        Kind::Poison
    } else if id % 31 == 17 {
        Kind::Exhaust
    } else if id % 13 == 4 {
        Kind::FlakyTwice
    } else if id % 7 == 2 {
        Kind::FlakyOnce
    } else {
        Kind::Ok
    }
}

/// What one handler run does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Record the effect and succeed.
    Succeed,
    /// Fail transiently (`HandlerError::Retry`).
    Retry,
    /// Fail for good (`HandlerError::Permanent`).
    Permanent,
}

/// What the run of `id` at `attempt` (1-based, as the store counts) does.
pub fn decide(id: u32, attempt: u32) -> Decision {
    match kind(id) {
        Kind::Ok => Decision::Succeed,
        Kind::FlakyOnce if attempt <= 1 => Decision::Retry,
        Kind::FlakyTwice if attempt <= 2 => Decision::Retry,
        Kind::FlakyOnce | Kind::FlakyTwice => Decision::Succeed,
        Kind::Poison => Decision::Permanent,
        Kind::Exhaust => Decision::Retry,
    }
}

/// The message id of `id`.
pub fn message_id(id: u32) -> String {
    format!("chaos-{id}")
}

/// The id of a message id written by [`message_id`].
pub fn parse_id(message_id: &str) -> Option<u32> {
    message_id.strip_prefix("chaos-")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_has_every_kind() {
        let mut counts = std::collections::BTreeMap::new();
        for id in 0..1000 {
            *counts.entry(kind(id)).or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 5, "{counts:?}");
        assert!(counts[&Kind::Ok] > 700, "{counts:?}");
        assert_eq!(parse_id(&message_id(42)), Some(42));
    }
}
