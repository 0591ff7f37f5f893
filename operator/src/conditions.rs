//! Standard status conditions (Ready, Progressing, Degraded) with `observedGeneration`, and
//! `lastTransitionTime` kept unless the status of a condition changes.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";

/// The overall state a reconcile reached; it sets all three conditions consistently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Everything applied.
    Ready { reason: String, message: String },
    /// Waiting on something that should resolve by itself (a dependency, members starting).
    Progressing { reason: String, message: String },
    /// A problem someone must fix (bad Secret, name mismatch, backend errors).
    Degraded { reason: String, message: String },
}

impl Outcome {
    pub fn ready(reason: &str, message: impl Into<String>) -> Self {
        Outcome::Ready {
            reason: reason.into(),
            message: message.into(),
        }
    }
    pub fn progressing(reason: &str, message: impl Into<String>) -> Self {
        Outcome::Progressing {
            reason: reason.into(),
            message: message.into(),
        }
    }
    pub fn degraded(reason: &str, message: impl Into<String>) -> Self {
        Outcome::Degraded {
            reason: reason.into(),
            message: message.into(),
        }
    }
    pub fn is_ready(&self) -> bool {
        matches!(self, Outcome::Ready { .. })
    }
    pub fn reason(&self) -> &str {
        match self {
            Outcome::Ready { reason, .. }
            | Outcome::Progressing { reason, .. }
            | Outcome::Degraded { reason, .. } => reason,
        }
    }
    pub fn message(&self) -> &str {
        match self {
            Outcome::Ready { message, .. }
            | Outcome::Progressing { message, .. }
            | Outcome::Degraded { message, .. } => message,
        }
    }
}

fn cond(
    old: &[Condition],
    type_: &str,
    on: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = if on { "True" } else { "False" };
    let last = old
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        // The API caps messages at 32768 bytes.
        message: message.chars().take(4096).collect(),
        observed_generation: generation,
        last_transition_time: last,
    }
}

/// The three conditions for `outcome`, keeping the transition times of `old` ones whose
/// status does not change.
pub fn conditions(old: &[Condition], outcome: &Outcome, generation: Option<i64>) -> Vec<Condition> {
    conditions_at(old, outcome, generation, Timestamp::now())
}

pub fn conditions_at(
    old: &[Condition],
    outcome: &Outcome,
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    let (r, m) = (outcome.reason(), outcome.message());
    let (ready, progressing, degraded) = match outcome {
        Outcome::Ready { .. } => (true, false, false),
        Outcome::Progressing { .. } => (false, true, false),
        Outcome::Degraded { .. } => (false, false, true),
    };
    let other = |on: bool| if on { (r, m) } else { ("AsExpected", "") };
    let (pr, pm) = other(progressing);
    let (dr, dm) = other(degraded);
    vec![
        cond(old, READY, ready, r, m, generation, now),
        cond(old, PROGRESSING, progressing, pr, pm, generation, now),
        cond(old, DEGRADED, degraded, dr, dm, generation, now),
    ]
}

/// Whether `conds` says Ready=True.
pub fn is_ready(conds: &[Condition]) -> bool {
    conds.iter().any(|c| c.type_ == READY && c.status == "True")
}

/// The reason of the Ready condition, if any.
pub fn ready_reason(conds: &[Condition]) -> Option<&str> {
    conds
        .iter()
        .find(|c| c.type_ == READY)
        .map(|c| c.reason.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_is_kept_while_status_stays() {
        let t0 = Timestamp::from_second(1_000).unwrap();
        let t1 = Timestamp::from_second(2_000).unwrap();
        let first = conditions_at(&[], &Outcome::ready("Formatted", "ok"), Some(1), t0);
        assert_eq!(first.len(), 3);
        assert!(is_ready(&first));
        let again = conditions_at(&first, &Outcome::ready("Adopted", "ok"), Some(2), t1);
        assert_eq!(again[0].last_transition_time, Time(t0));
        assert_eq!(again[0].observed_generation, Some(2));
        let bad = conditions_at(
            &again,
            &Outcome::degraded("SecretNotFound", "x"),
            Some(2),
            t1,
        );
        assert_eq!(bad[0].status, "False");
        assert_eq!(bad[0].last_transition_time, Time(t1));
        assert_eq!(bad[2].type_, DEGRADED);
        assert_eq!(bad[2].status, "True");
        assert_eq!(bad[2].reason, "SecretNotFound");
        assert_eq!(bad[1].status, "False");
        assert_eq!(bad[1].last_transition_time, Time(t0));
        assert!(!is_ready(&bad));
    }
}
