//! Embedded, versioned migrations. The schema version lives in `PRAGMA user_version`.

/// Migrations in order; migration `i` brings the schema to version `i + 1`.
pub const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE projects (
    id BLOB PRIMARY KEY,
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE visions (
    project_id BLOB NOT NULL,
    version INTEGER NOT NULL,
    text TEXT NOT NULL,
    author TEXT,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (project_id, version)
) WITHOUT ROWID;

CREATE TABLE drafts (
    id BLOB PRIMARY KEY,
    project_id BLOB NOT NULL,
    title TEXT NOT NULL,
    requirements TEXT NOT NULL,
    state TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    proposed_by TEXT,
    work_item_ids TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    decided_at INTEGER
) WITHOUT ROWID;
CREATE INDEX drafts_project ON drafts (project_id, id);

CREATE TABLE approvals (
    id BLOB PRIMARY KEY,
    project_id BLOB NOT NULL,
    subject_kind TEXT NOT NULL,
    subject_id BLOB NOT NULL,
    content_hash TEXT NOT NULL,
    state TEXT NOT NULL,
    requested_at INTEGER NOT NULL,
    decided_by TEXT,
    decided_at INTEGER,
    reason TEXT
) WITHOUT ROWID;
CREATE INDEX approvals_subject ON approvals (subject_id, state);
CREATE INDEX approvals_pending ON approvals (id) WHERE state = 'pending';

CREATE TABLE recipes (
    id BLOB PRIMARY KEY,
    project_id BLOB,
    name TEXT NOT NULL,
    yaml TEXT NOT NULL,
    spec TEXT NOT NULL,
    created_at INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE work_items (
    id BLOB PRIMARY KEY,
    project_id BLOB NOT NULL,
    title TEXT NOT NULL,
    description TEXT NOT NULL,
    recipe_id BLOB,
    labels TEXT NOT NULL,
    state TEXT NOT NULL,
    priority INTEGER NOT NULL,
    dependencies TEXT NOT NULL,
    retry TEXT NOT NULL,
    idempotency_key TEXT,
    content_hash TEXT NOT NULL,
    approval_id BLOB,
    draft_id BLOB,
    blocked_reason TEXT,
    attempts INTEGER NOT NULL,
    current_run_id BLOB,
    run_at INTEGER,
    last_error TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    enqueued_at INTEGER,
    pending_deps INTEGER NOT NULL DEFAULT 0,
    -- Whether any item depends on this one (completions skip the dependents lookup when 0).
    has_dependents INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX work_items_project ON work_items (project_id, id);
CREATE UNIQUE INDEX work_items_idempotency ON work_items (project_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
-- Exactly the claimable-but-for-time rows, in claim order: finished rows never enter it.
CREATE INDEX work_items_ready ON work_items (priority DESC, run_at, id) WHERE state IN ('queued', 'retrying') AND pending_deps = 0;
CREATE INDEX work_items_retrying ON work_items (run_at) WHERE state = 'retrying';

CREATE TABLE work_item_deps (
    depends_on BLOB NOT NULL,
    work_item_id BLOB NOT NULL,
    PRIMARY KEY (depends_on, work_item_id)
) WITHOUT ROWID;
CREATE INDEX work_item_deps_item ON work_item_deps (work_item_id, depends_on);

CREATE TABLE runs (
    id BLOB PRIMARY KEY,
    work_item_id BLOB NOT NULL,
    project_id BLOB NOT NULL,
    attempt INTEGER NOT NULL,
    agent_id TEXT NOT NULL,
    state TEXT NOT NULL,
    lease_token INTEGER NOT NULL,
    lease_expires_at INTEGER,
    heartbeat_at INTEGER,
    claimed_at INTEGER NOT NULL,
    started_at INTEGER,
    finished_at INTEGER,
    exit_code INTEGER,
    error TEXT,
    failure_kind TEXT,
    usage TEXT,
    last_completed_step INTEGER,
    log_seq INTEGER NOT NULL DEFAULT 0,
    event_seq INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX runs_work_item ON runs (work_item_id, id);
CREATE INDEX runs_leased ON runs (lease_expires_at) WHERE state IN ('claimed', 'running');

CREATE TABLE logs (
    run_id BLOB NOT NULL,
    seq INTEGER NOT NULL,
    stream TEXT NOT NULL,
    line TEXT NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;

CREATE TABLE step_events (
    run_id BLOB NOT NULL,
    seq INTEGER NOT NULL,
    step_index INTEGER,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    detail TEXT NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;

CREATE TABLE info_requests (
    id BLOB PRIMARY KEY,
    run_id BLOB NOT NULL,
    work_item_id BLOB NOT NULL,
    project_id BLOB NOT NULL,
    key TEXT NOT NULL,
    prompt TEXT NOT NULL,
    kind TEXT NOT NULL,
    choices TEXT NOT NULL,
    state TEXT NOT NULL,
    deadline INTEGER,
    created_at INTEGER NOT NULL,
    answered_at INTEGER,
    answered_by TEXT,
    answer TEXT
) WITHOUT ROWID;
CREATE INDEX info_requests_run ON info_requests (run_id, id);
CREATE INDEX info_requests_deadline ON info_requests (deadline) WHERE state = 'pending' AND deadline IS NOT NULL;
"#,
    r#"
ALTER TABLE projects ADD COLUMN repository TEXT;

CREATE TABLE run_results (
    run_id BLOB PRIMARY KEY,
    project_id BLOB NOT NULL,
    result TEXT NOT NULL,
    patch TEXT NOT NULL,
    recorded_at INTEGER NOT NULL
);
"#,
];

/// The schema version this build writes.
pub fn latest_version() -> i64 {
    MIGRATIONS.len() as i64
}
