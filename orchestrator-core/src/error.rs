//! Errors: the backend-neutral [`StoreError`] and the facade's [`Error`].

use crate::crypto::CryptoError;
use crate::ids::RunId;
use crate::recipe::RecipeErrors;
use crate::retry::PolicyError;
use crate::state::{EntityKind, TransitionError};

/// Result of a store operation.
pub type StoreResult<T> = Result<T, StoreError>;

/// The one error type every `Store` backend returns.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No such entity.
    #[error("{entity} `{id}` not found")]
    NotFound {
        /// Kind of entity.
        entity: EntityKind,
        /// The id (or key) looked up.
        id: String,
    },
    /// The state machine refused the move.
    #[error(transparent)]
    InvalidTransition(#[from] TransitionError),
    /// A guard failed (stale approval, edit of a running item, ...).
    #[error("conflict: {message}")]
    Conflict {
        /// What conflicted.
        message: String,
    },
    /// The caller's lease is no longer valid: expired, reaped, cancelled or the run was reclaimed.
    #[error("lease lost for run `{run_id}`: {reason}")]
    LeaseLost {
        /// The run.
        run_id: RunId,
        /// Why.
        reason: String,
    },
    /// A unique key (idempotency key, name) is taken by different content.
    #[error("duplicate {entity} for key `{key}`")]
    Duplicate {
        /// Kind of entity.
        entity: EntityKind,
        /// The key.
        key: String,
    },
    /// The input is invalid (unknown dependency, dependency cycle, bad value).
    #[error("invalid {field}: {message}")]
    Invalid {
        /// The offending field.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// The backend cannot be reached.
    #[error("store unavailable: {message}")]
    Unavailable {
        /// Whether trying again may succeed.
        retryable: bool,
        /// What happened.
        message: String,
    },
    /// Any other backend failure.
    #[error("store backend error: {source}")]
    Backend {
        /// The backend's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}

impl StoreError {
    /// Shorthand for [`StoreError::NotFound`].
    pub fn not_found(entity: EntityKind, id: impl ToString) -> Self {
        StoreError::NotFound { entity, id: id.to_string() }
    }
    /// Shorthand for [`StoreError::Conflict`].
    pub fn conflict(message: impl Into<String>) -> Self {
        StoreError::Conflict { message: message.into() }
    }
    /// Shorthand for [`StoreError::Invalid`].
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        StoreError::Invalid { field: field.into(), message: message.into() }
    }
    /// Shorthand for [`StoreError::LeaseLost`].
    pub fn lease_lost(run_id: RunId, reason: impl Into<String>) -> Self {
        StoreError::LeaseLost { run_id, reason: reason.into() }
    }
    /// Wraps a backend error.
    pub fn backend(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        StoreError::Backend { source: Box::new(e) }
    }
    /// A stable machine-readable code (used by the HTTP layer).
    pub fn code(&self) -> &'static str {
        match self {
            StoreError::NotFound { .. } => "not_found",
            StoreError::InvalidTransition(_) => "invalid_transition",
            StoreError::Conflict { .. } => "conflict",
            StoreError::LeaseLost { .. } => "lease_lost",
            StoreError::Duplicate { .. } => "duplicate",
            StoreError::Invalid { .. } => "invalid",
            StoreError::Unavailable { .. } => "unavailable",
            StoreError::Backend { .. } => "backend",
        }
    }
}

/// Errors of the [`crate::Orchestrator`] facade.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Bad input caught before reaching the store.
    #[error("invalid {field}: {message}")]
    Invalid {
        /// The offending field.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// A tool recipe did not parse or validate.
    #[error("invalid recipe: {0}")]
    Recipe(#[from] RecipeErrors),
    /// A retry policy is invalid.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// Encryption or decryption failed.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// A secret answer was given but no encryption key is configured.
    #[error("secret answers need an encryption key: set ORCH_SECRET_KEY")]
    EncryptionKeyMissing,
}

impl Error {
    /// Shorthand for [`Error::Invalid`].
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Invalid { field: field.into(), message: message.into() }
    }
    /// A stable machine-readable code (used by the HTTP layer).
    pub fn code(&self) -> &'static str {
        match self {
            Error::Store(e) => e.code(),
            Error::Invalid { .. } => "invalid",
            Error::Recipe(_) => "invalid_recipe",
            Error::Policy(_) => "invalid_policy",
            Error::Crypto(_) => "crypto",
            Error::EncryptionKeyMissing => "encryption_key_missing",
        }
    }
}
