//! # orchestrator-core
//!
//! The domain, rules and contracts of the orchestrator: an embeddable job orchestrator for autonomous
//! coding agents.
//!
//! - [`domain`]: the nine entities (Project, Vision, RequirementsDraft, WorkItem, Run, ApprovalRequest,
//!   ScheduledTask, ToolRecipe, InfoRequest) and their value types.
//! - [`state`]: the state machines as transition tables and pure functions.
//! - [`retry`]: exponential backoff with a cap and jitter, and the retry decision.
//! - [`store`]: the [`Store`] contract every backend implements; [`MemoryStore`] is the reference.
//! - [`rules`]: pure decisions every backend applies identically.
//! - [`crypto`]: AES-256-GCM encryption of info-request answers with key rotation.
//! - [`recipe`]: YAML tool recipes with located validation errors.
//! - [`agent`]: the [`AgentApi`], [`Planner`] and [`Executor`] seams.
//! - [`Orchestrator`]: the facade applying policy over any store; it implements [`AgentApi`].
//! - `testing` (feature): the conformance suite every store must pass.

#![forbid(unsafe_code)]

pub mod agent;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod domain;
mod due;
pub mod error;
pub mod ids;
pub mod memory;
mod meter;
pub mod notify;
pub mod orchestrator;
pub mod recipe;
pub mod retry;
pub mod rules;
pub mod state;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;

pub use agent::{AgentApi, Executor, Planner};
pub use clock::{Clock, ManualClock, SystemClock};
pub use config::OrchestratorConfig;
pub use error::{Error, StoreError, StoreResult};
pub use memory::MemoryStore;
pub use notify::Notifier;
pub use orchestrator::Orchestrator;
pub use store::Store;
