//! State machines for work items, runs, approvals and requirements drafts.
//!
//! Each machine is a transition table ([`WorkItemState::TRANSITIONS`], ...) and a pure function
//! ([`WorkItemState::transition`], ...) that accepts a move or names the entity, the from-state and the
//! requested state in a typed [`TransitionError`]. Stores re-check the expected state in the same statement
//! or transaction that writes the new one.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The kind of entity a state machine belongs to (used in errors).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntityKind {
    /// A project.
    Project,
    /// A project's vision.
    Vision,
    /// A requirements draft.
    RequirementsDraft,
    /// A work item.
    WorkItem,
    /// A run.
    Run,
    /// An approval request.
    ApprovalRequest,
    /// A scheduled task.
    ScheduledTask,
    /// A tool recipe.
    ToolRecipe,
    /// An info request.
    InfoRequest,
}

impl fmt::Display for EntityKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            EntityKind::Project => "project",
            EntityKind::Vision => "vision",
            EntityKind::RequirementsDraft => "requirements_draft",
            EntityKind::WorkItem => "work_item",
            EntityKind::Run => "run",
            EntityKind::ApprovalRequest => "approval_request",
            EntityKind::ScheduledTask => "scheduled_task",
            EntityKind::ToolRecipe => "tool_recipe",
            EntityKind::InfoRequest => "info_request",
        };
        f.write_str(s)
    }
}

/// A move that the state machine does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("invalid {entity} transition from `{from}` to `{to}`")]
pub struct TransitionError {
    /// Which machine refused.
    pub entity: EntityKind,
    /// The current state.
    pub from: String,
    /// The requested state.
    pub to: String,
}

/// The error returned when a state name does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown state `{0}`")]
pub struct UnknownState(pub String);

macro_rules! state_enum {
    (
        $(#[$meta:meta])*
        $name:ident, $entity:expr, {
            $( $(#[$vmeta:meta])* $variant:ident = $text:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name {
            $( $(#[$vmeta])* $variant ),+
        }

        impl $name {
            /// Every state, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The snake_case name used in JSON and in storage.
            pub fn as_str(&self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }

            /// Whether `self -> to` is in the transition table.
            pub fn can_transition(self, to: $name) -> bool {
                Self::TRANSITIONS.iter().any(|(f, t)| *f == self && *t == to)
            }

            /// Checks `self -> to` against the transition table.
            pub fn transition(self, to: $name) -> Result<$name, TransitionError> {
                if self.can_transition(to) {
                    Ok(to)
                } else {
                    Err(TransitionError { entity: $entity, from: self.as_str().to_string(), to: to.as_str().to_string() })
                }
            }

            /// Whether no transition leaves this state.
            pub fn is_terminal(self) -> bool {
                !Self::TRANSITIONS.iter().any(|(f, _)| *f == self)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownState;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(UnknownState(other.to_string())),
                }
            }
        }
    };
}

state_enum!(
    /// Life cycle of a work item.
    ///
    /// `draft -> awaiting_approval -> ready -> queued -> running -> (waiting_input -> queued -> running)
    /// -> succeeded | failed | cancelled`, with `retrying` between attempts and `blocked` when a
    /// dependency failed or was cancelled.
    WorkItemState, EntityKind::WorkItem, {
        /// Created or sent back by a rejected approval; editable, not schedulable.
        Draft = "draft",
        /// Waiting for a human approval (policy `ORCH_REQUIRE_APPROVAL`).
        AwaitingApproval = "awaiting_approval",
        /// Approved (or no approval needed); may be enqueued.
        Ready = "ready",
        /// In the scheduler: claimable once its dependencies succeeded and its not-before time passed.
        Queued = "queued",
        /// A run holds it under a lease.
        Running = "running",
        /// Its run asked a human for input; no lease or slot is held.
        WaitingInput = "waiting_input",
        /// An attempt failed; the next attempt is due at the scheduled time.
        Retrying = "retrying",
        /// A dependency failed or was cancelled; the reason is recorded.
        Blocked = "blocked",
        /// Finished successfully.
        Succeeded = "succeeded",
        /// Failed permanently or ran out of retries.
        Failed = "failed",
        /// Cancelled by a person.
        Cancelled = "cancelled",
    }
);

impl WorkItemState {
    /// The transition table: `(from, to)` pairs.
    pub const TRANSITIONS: &'static [(WorkItemState, WorkItemState)] = {
        use WorkItemState::*;
        &[
            (Draft, AwaitingApproval),
            (Draft, Ready),
            (Draft, Cancelled),
            (AwaitingApproval, Ready),
            (AwaitingApproval, Draft),
            (AwaitingApproval, Cancelled),
            (Ready, Queued),
            (Ready, AwaitingApproval),
            (Ready, Cancelled),
            (Queued, Running),
            (Queued, Blocked),
            (Queued, Cancelled),
            (Running, WaitingInput),
            (Running, Succeeded),
            (Running, Failed),
            (Running, Retrying),
            (Running, Cancelled),
            (Running, Queued),
            (WaitingInput, Queued),
            (WaitingInput, Retrying),
            (WaitingInput, Failed),
            (WaitingInput, Cancelled),
            (Retrying, Queued),
            (Retrying, Running),
            (Retrying, Blocked),
            (Retrying, Cancelled),
            (Blocked, Queued),
            (Blocked, Cancelled),
            (Succeeded, Queued),
            (Failed, Queued),
            (Cancelled, Queued),
        ]
    };

    /// States from which the item can be edited (content changes).
    pub fn is_editable(self) -> bool {
        matches!(self, WorkItemState::Draft | WorkItemState::AwaitingApproval | WorkItemState::Ready)
    }

    /// States in which a run is attached and active (claimed, running or waiting for input).
    pub fn has_active_run(self) -> bool {
        matches!(self, WorkItemState::Running | WorkItemState::WaitingInput)
    }

    /// States that a requeue may start from.
    pub fn is_requeueable(self) -> bool {
        matches!(
            self,
            WorkItemState::Queued
                | WorkItemState::Retrying
                | WorkItemState::Succeeded
                | WorkItemState::Failed
                | WorkItemState::Cancelled
        )
    }

    /// Finished states (no run will be created unless requeued).
    pub fn is_finished(self) -> bool {
        matches!(self, WorkItemState::Succeeded | WorkItemState::Failed | WorkItemState::Cancelled)
    }

    /// States a dependent treats as "this dependency will never succeed" (it becomes blocked).
    pub fn blocks_dependents(self) -> bool {
        matches!(self, WorkItemState::Failed | WorkItemState::Cancelled | WorkItemState::Blocked)
    }
}

state_enum!(
    /// Life cycle of a run (one attempt at a work item by one agent).
    RunState, EntityKind::Run, {
        /// Created by a claim; the lease is held, no step started yet.
        Claimed = "claimed",
        /// The agent started executing.
        Running = "running",
        /// Asked a human for input; lease released, slot freed; resumes as a new claim.
        WaitingInput = "waiting_input",
        /// Finished successfully.
        Succeeded = "succeeded",
        /// Finished with a failure.
        Failed = "failed",
        /// Cancelled by a person (or its work item was cancelled).
        Cancelled = "cancelled",
        /// Its lease expired and was reaped.
        Lost = "lost",
    }
);

impl RunState {
    /// The transition table: `(from, to)` pairs.
    pub const TRANSITIONS: &'static [(RunState, RunState)] = {
        use RunState::*;
        &[
            (Claimed, Running),
            (Claimed, WaitingInput),
            (Claimed, Succeeded),
            (Claimed, Failed),
            (Claimed, Cancelled),
            (Claimed, Lost),
            (Running, WaitingInput),
            (Running, Succeeded),
            (Running, Failed),
            (Running, Cancelled),
            (Running, Lost),
            (WaitingInput, Claimed),
            (WaitingInput, Failed),
            (WaitingInput, Cancelled),
        ]
    };

    /// States in which the run holds a lease.
    pub fn holds_lease(self) -> bool {
        matches!(self, RunState::Claimed | RunState::Running)
    }
}

state_enum!(
    /// Life cycle of an approval request.
    ApprovalState, EntityKind::ApprovalRequest, {
        /// Waiting for a decision.
        Pending = "pending",
        /// Approved.
        Approved = "approved",
        /// Rejected.
        Rejected = "rejected",
        /// The subject was edited while pending; a new request replaced this one.
        Superseded = "superseded",
    }
);

impl ApprovalState {
    /// The transition table: `(from, to)` pairs.
    pub const TRANSITIONS: &'static [(ApprovalState, ApprovalState)] = &[
        (ApprovalState::Pending, ApprovalState::Approved),
        (ApprovalState::Pending, ApprovalState::Rejected),
        (ApprovalState::Pending, ApprovalState::Superseded),
    ];
}

state_enum!(
    /// Life cycle of a requirements draft.
    DraftState, EntityKind::RequirementsDraft, {
        /// Proposed, waiting for approval.
        Proposed = "proposed",
        /// Approved: its work items exist.
        Approved = "approved",
        /// Rejected.
        Rejected = "rejected",
    }
);

impl DraftState {
    /// The transition table: `(from, to)` pairs.
    pub const TRANSITIONS: &'static [(DraftState, DraftState)] =
        &[(DraftState::Proposed, DraftState::Approved), (DraftState::Proposed, DraftState::Rejected)];
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_roundtrip() {
        for s in WorkItemState::ALL {
            assert_eq!(s.as_str().parse::<WorkItemState>().unwrap(), *s);
            assert_eq!(serde_json::to_string(s).unwrap(), format!("\"{}\"", s.as_str()));
        }
        for s in RunState::ALL {
            assert_eq!(s.as_str().parse::<RunState>().unwrap(), *s);
        }
        assert!("nope".parse::<RunState>().is_err());
    }

    #[test]
    fn error_names_entity_and_states() {
        let e = RunState::Succeeded.transition(RunState::Running).unwrap_err();
        assert_eq!(e.entity, EntityKind::Run);
        assert_eq!(e.from, "succeeded");
        assert_eq!(e.to, "running");
        assert_eq!(e.to_string(), "invalid run transition from `succeeded` to `running`");
    }

    #[test]
    fn terminal_states() {
        assert!(RunState::Succeeded.is_terminal());
        assert!(RunState::Lost.is_terminal());
        assert!(!RunState::WaitingInput.is_terminal());
        assert!(ApprovalState::Approved.is_terminal());
        assert!(!WorkItemState::Failed.is_terminal()); // requeue
    }

    #[test]
    fn every_work_item_state_is_reachable_from_draft() {
        let mut seen = vec![WorkItemState::Draft];
        let mut i = 0;
        while i < seen.len() {
            for (f, t) in WorkItemState::TRANSITIONS {
                if *f == seen[i] && !seen.contains(t) {
                    seen.push(*t);
                }
            }
            i += 1;
        }
        assert_eq!(seen.len(), WorkItemState::ALL.len());
    }

    proptest! {
        /// Walking the table: a random sequence of requested moves only ever lands in states
        /// the table allows, and every refusal names the state it was in.
        #[test]
        fn random_walks_follow_the_table(moves in proptest::collection::vec(0usize..11, 0..64)) {
            let mut s = WorkItemState::Draft;
            for m in moves {
                let to = WorkItemState::ALL[m];
                match s.transition(to) {
                    Ok(n) => { prop_assert!(WorkItemState::TRANSITIONS.contains(&(s, to))); s = n; }
                    Err(e) => { prop_assert_eq!(e.from, s.as_str()); prop_assert!(!s.can_transition(to)); }
                }
            }
        }

        #[test]
        fn run_walks_follow_the_table(moves in proptest::collection::vec(0usize..7, 0..32)) {
            let mut s = RunState::Claimed;
            for m in moves {
                let to = RunState::ALL[m];
                if let Ok(n) = s.transition(to) { s = n; } else { prop_assert!(!RunState::TRANSITIONS.contains(&(s, to))); }
            }
        }
    }
}
