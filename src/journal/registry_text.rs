//! Backend-independent rules and messages of the device registry (both backends use them, so
//! the API answers the same on either store).

use super::{Assignment, JournalError};

/// An instant as RFC 3339 UTC text.
pub fn instant(ms: i64) -> String {
    crate::normalise::datetime::render(ms, 0, false)
}

/// `from .. to` (or `from ..` when open-ended).
pub fn period(from: i64, to: Option<i64>) -> String {
    match to {
        Some(t) => format!("{} .. {}", instant(from), instant(t)),
        None => format!("{} ..", instant(from)),
    }
}

/// Why a new assignment is refused: it overlaps `other` (never names the patient).
pub fn overlap_message(other: &Assignment) -> String {
    format!(
        "device {}/{} is already assigned for {} (assignment {}); a device has at most one patient \
         at a time: end that assignment first or choose a period that does not overlap it",
        other.vendor,
        other.device_id,
        period(other.valid_from_ms, other.valid_to_ms),
        other.id
    )
}

/// An assignment may be ended at `at_ms` only inside its period.
pub fn check_end(a: &Assignment, at_ms: i64) -> Result<(), JournalError> {
    if at_ms <= a.valid_from_ms {
        return Err(JournalError::Conflict(format!(
            "assignment {} starts at {}; its end must be later",
            a.id,
            instant(a.valid_from_ms)
        )));
    }
    if let Some(to) = a.valid_to_ms
        && to <= at_ms
    {
        return Err(JournalError::Conflict(format!(
            "assignment {} already ended at {}",
            a.id,
            instant(to)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(from: i64, to: Option<i64>) -> Assignment {
        Assignment {
            id: 7,
            vendor: "v".into(),
            device_id: "d".into(),
            patient_id: "p".into(),
            tenant: "0301".into(),
            valid_from_ms: from,
            valid_to_ms: to,
            created_at_ms: 0,
            note: None,
        }
    }

    #[test]
    fn end_only_inside_the_period() {
        assert!(check_end(&a(1000, None), 1000).is_err());
        assert!(check_end(&a(1000, None), 1001).is_ok());
        assert!(check_end(&a(1000, Some(5000)), 4999).is_ok());
        assert!(check_end(&a(1000, Some(5000)), 5000).is_err());
    }

    #[test]
    fn messages_name_the_period_not_the_patient() {
        let m = overlap_message(&a(0, Some(86_400_000)));
        assert!(
            m.contains("1970-01-01T00:00:00Z .. 1970-01-02T00:00:00Z"),
            "{m}"
        );
        assert!(!m.contains(" p "), "{m}");
    }
}
