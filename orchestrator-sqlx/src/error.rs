//! Mapping sqlx / PostgreSQL errors to the backend-neutral [`StoreError`].

use orchestrator_core::error::{StoreError, StoreResult};
use orchestrator_core::state::EntityKind;

/// SQLSTATE classes and codes this store treats specially.
mod code {
    pub const SERIALIZATION_FAILURE: &str = "40001";
    pub const DEADLOCK: &str = "40P01";
    pub const UNIQUE_VIOLATION: &str = "23505";
    pub const LOCK_NOT_AVAILABLE: &str = "55P03";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    pub const CRASH_SHUTDOWN: &str = "57P02";
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    pub const READ_ONLY_TRANSACTION: &str = "25006";
}

/// A unique index whose violation means "another unit of work won a race; run this one again" (the
/// retried unit then finds the winner's row).
const RETRY_ON_UNIQUE: &[&str] = &["work_items_idempotency", "visions_pkey"];

fn entity_of_constraint(c: &str) -> EntityKind {
    match c.split('_').next().unwrap_or_default() {
        "projects" => EntityKind::Project,
        "visions" => EntityKind::Vision,
        "drafts" => EntityKind::RequirementsDraft,
        "approvals" => EntityKind::ApprovalRequest,
        "recipes" => EntityKind::ToolRecipe,
        "runs" => EntityKind::Run,
        "info" => EntityKind::InfoRequest,
        _ => EntityKind::WorkItem,
    }
}

/// Whether a unit of work that failed with `e` should simply run again (serialization failure,
/// deadlock, or a lost race on a unique key).
pub fn is_transient(e: &StoreError) -> bool {
    let StoreError::Backend { source } = e else { return false };
    let Some(sqlx::Error::Database(db)) = source.downcast_ref::<sqlx::Error>() else { return false };
    match db.code().as_deref() {
        Some(code::SERIALIZATION_FAILURE) | Some(code::DEADLOCK) => true,
        Some(code::UNIQUE_VIOLATION) => db.constraint().is_some_and(|c| RETRY_ON_UNIQUE.contains(&c)),
        _ => false,
    }
}

/// Whether the error says the connection (or the server) is gone, so the pool should recover.
fn unavailable(message: String) -> StoreError {
    StoreError::Unavailable { retryable: true, message }
}

/// Maps a sqlx error to the backend-neutral error.
pub fn map_err(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Io(io) => unavailable(format!("PostgreSQL connection failed: {io}")),
        sqlx::Error::Tls(t) => unavailable(format!("PostgreSQL TLS failed: {t}")),
        sqlx::Error::PoolTimedOut => unavailable("timed out waiting for a PostgreSQL connection".into()),
        sqlx::Error::PoolClosed => {
            StoreError::Unavailable { retryable: false, message: "the PostgreSQL pool was closed".into() }
        }
        sqlx::Error::WorkerCrashed => unavailable("the PostgreSQL connection worker stopped".into()),
        sqlx::Error::Protocol(m) => unavailable(format!("PostgreSQL protocol error: {m}")),
        sqlx::Error::Database(db) => {
            let c = db.code().map(|c| c.into_owned()).unwrap_or_default();
            match c.as_str() {
                code::SERIALIZATION_FAILURE | code::DEADLOCK => StoreError::backend(e),
                code::UNIQUE_VIOLATION => {
                    let constraint = db.constraint().unwrap_or_default().to_string();
                    if RETRY_ON_UNIQUE.contains(&constraint.as_str()) {
                        return StoreError::backend(e);
                    }
                    StoreError::Duplicate { entity: entity_of_constraint(&constraint), key: db.message().to_string() }
                }
                code::ADMIN_SHUTDOWN
                | code::CRASH_SHUTDOWN
                | code::CANNOT_CONNECT_NOW
                | code::TOO_MANY_CONNECTIONS
                | code::LOCK_NOT_AVAILABLE
                | code::READ_ONLY_TRANSACTION => unavailable(format!("PostgreSQL: {} ({c})", db.message())),
                // Connection exceptions (08xxx) and system/resource errors (53xxx, 58xxx).
                _ if c.starts_with("08") || c.starts_with("53") || c.starts_with("58") => {
                    unavailable(format!("PostgreSQL: {} ({c})", db.message()))
                }
                _ => StoreError::backend(e),
            }
        }
        _ => StoreError::backend(e),
    }
}

/// `.q()` maps a sqlx result into a store result.
pub trait Q<T> {
    /// Maps the error with [`map_err`].
    fn q(self) -> StoreResult<T>;
}

impl<T> Q<T> for Result<T, sqlx::Error> {
    fn q(self) -> StoreResult<T> {
        self.map_err(map_err)
    }
}
