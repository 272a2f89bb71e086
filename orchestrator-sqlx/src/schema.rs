//! Embedded, versioned migrations. Applied versions are recorded in the `orchestrator_migrations` table
//! of the configured schema; every statement runs with `search_path` set to that schema.

/// Migrations in order; migration `i` brings the schema to version `i + 1`.
pub const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE projects (
    id uuid PRIMARY KEY,
    name text NOT NULL,
    description text NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL
);

CREATE TABLE visions (
    project_id uuid NOT NULL,
    version int4 NOT NULL,
    text text NOT NULL,
    author text,
    created_at timestamptz NOT NULL,
    PRIMARY KEY (project_id, version)
);

CREATE TABLE drafts (
    id uuid PRIMARY KEY,
    project_id uuid NOT NULL,
    title text NOT NULL,
    requirements jsonb NOT NULL,
    state text NOT NULL,
    content_hash text NOT NULL,
    proposed_by text,
    work_item_ids uuid[] NOT NULL,
    created_at timestamptz NOT NULL,
    decided_at timestamptz
);
CREATE INDEX drafts_project ON drafts (project_id, id);

CREATE TABLE approvals (
    id uuid PRIMARY KEY,
    project_id uuid NOT NULL,
    subject_kind text NOT NULL,
    subject_id uuid NOT NULL,
    content_hash text NOT NULL,
    state text NOT NULL,
    requested_at timestamptz NOT NULL,
    decided_by text,
    decided_at timestamptz,
    reason text
);
CREATE INDEX approvals_subject ON approvals (subject_id, state);
CREATE INDEX approvals_project ON approvals (project_id, id);

CREATE TABLE recipes (
    id uuid PRIMARY KEY,
    project_id uuid,
    name text NOT NULL,
    yaml text NOT NULL,
    spec jsonb NOT NULL,
    created_at timestamptz NOT NULL
);
CREATE INDEX recipes_project ON recipes (project_id);

CREATE TABLE work_items (
    id uuid PRIMARY KEY,
    project_id uuid NOT NULL,
    title text NOT NULL,
    description text NOT NULL,
    recipe_id uuid,
    labels text[] NOT NULL,
    state text NOT NULL,
    priority int4 NOT NULL,
    dependencies uuid[] NOT NULL,
    retry jsonb NOT NULL,
    idempotency_key text,
    content_hash text NOT NULL,
    approval_id uuid,
    draft_id uuid,
    blocked_reason text,
    attempts int4 NOT NULL,
    current_run_id uuid,
    run_at timestamptz,
    last_error text,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    enqueued_at timestamptz,
    pending_deps int4 NOT NULL DEFAULT 0,
    -- Whether any item depends on this one (completions skip the dependents lookup when false).
    has_dependents boolean NOT NULL DEFAULT false
) WITH (fillfactor = 80);
CREATE INDEX work_items_project ON work_items (project_id, id);
CREATE UNIQUE INDEX work_items_idempotency ON work_items (project_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
-- Exactly the claimable-but-for-time rows, in claim order: finished rows never enter it.
CREATE INDEX work_items_ready ON work_items (priority DESC, run_at, id) WHERE state IN ('queued', 'retrying') AND pending_deps = 0;
CREATE INDEX work_items_retrying ON work_items (run_at) WHERE state = 'retrying';
CREATE INDEX work_items_queue ON work_items (priority DESC, (COALESCE(run_at, created_at)), id) WHERE state IN ('queued', 'retrying', 'blocked');

CREATE TABLE work_item_deps (
    depends_on uuid NOT NULL,
    work_item_id uuid NOT NULL,
    PRIMARY KEY (depends_on, work_item_id)
);
CREATE INDEX work_item_deps_item ON work_item_deps (work_item_id, depends_on);

CREATE TABLE runs (
    id uuid PRIMARY KEY,
    work_item_id uuid NOT NULL,
    project_id uuid NOT NULL,
    attempt int4 NOT NULL,
    agent_id text NOT NULL,
    state text NOT NULL,
    lease_token int8 NOT NULL,
    lease_expires_at timestamptz,
    heartbeat_at timestamptz,
    claimed_at timestamptz NOT NULL,
    started_at timestamptz,
    finished_at timestamptz,
    exit_code int4,
    error text,
    failure_kind text,
    usage jsonb,
    last_completed_step int4,
    log_seq int8 NOT NULL DEFAULT 0,
    event_seq int8 NOT NULL DEFAULT 0
) WITH (fillfactor = 80);
CREATE INDEX runs_work_item ON runs (work_item_id, id);
CREATE INDEX runs_leased ON runs (lease_expires_at) WHERE state IN ('claimed', 'running');

CREATE TABLE logs (
    run_id uuid NOT NULL,
    seq int8 NOT NULL,
    stream text NOT NULL,
    line text NOT NULL,
    at timestamptz NOT NULL,
    PRIMARY KEY (run_id, seq)
);

CREATE TABLE step_events (
    run_id uuid NOT NULL,
    seq int8 NOT NULL,
    step_index int4,
    kind text NOT NULL,
    name text NOT NULL,
    detail jsonb NOT NULL,
    at timestamptz NOT NULL,
    PRIMARY KEY (run_id, seq)
);

CREATE TABLE info_requests (
    id uuid PRIMARY KEY,
    run_id uuid NOT NULL,
    work_item_id uuid NOT NULL,
    project_id uuid NOT NULL,
    key text NOT NULL,
    prompt text NOT NULL,
    kind text NOT NULL,
    choices text[] NOT NULL,
    state text NOT NULL,
    deadline timestamptz,
    created_at timestamptz NOT NULL,
    answered_at timestamptz,
    answered_by text,
    answer text
);
CREATE INDEX info_requests_run ON info_requests (run_id, id);
CREATE INDEX info_requests_project ON info_requests (project_id);
CREATE INDEX info_requests_deadline ON info_requests (deadline) WHERE state = 'pending' AND deadline IS NOT NULL;
"#,
    r#"
-- Leased runs are found through their running work items: with no index on the columns a run's
-- completion, lease renewal or start changes, those updates are HOT (no index entries written).
CREATE INDEX work_items_running ON work_items (current_run_id) WHERE state = 'running';
DROP INDEX runs_leased;
-- The queue listing merges the ready rows (in the ready index, whose order is the queue order for
-- them) with the rows that wait (blocked, or with dependencies pending): an enqueued row is written to
-- one of the two, not also to an index of the whole queue.
CREATE INDEX work_items_waiting ON work_items (priority DESC, (COALESCE(run_at, created_at)), id)
    WHERE state = 'blocked' OR (state IN ('queued', 'retrying') AND pending_deps > 0);
DROP INDEX work_items_queue;
"#,
    r#"
-- Which project each work item belongs to, written once when the item is inserted and never updated:
-- deleting a project finds its items here. An index on work_items (project_id) would get a new entry
-- on every update of an item that is not HOT (a claim, a completion), for a lookup only a project's
-- deletion needs. This build's inserts write the mapping themselves and mark their rows
-- `projects_mapped`; the trigger maps any other insert (an older build during a rolling upgrade), and
-- its WHEN clause costs a marked row no function call.
CREATE TABLE work_item_projects (
    project_id uuid NOT NULL,
    work_item_id uuid NOT NULL,
    PRIMARY KEY (project_id, work_item_id)
);
ALTER TABLE work_items ADD COLUMN projects_mapped boolean NOT NULL DEFAULT false;
INSERT INTO work_item_projects (project_id, work_item_id) SELECT project_id, id FROM work_items;
CREATE FUNCTION work_item_projects_add() RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO work_item_projects (project_id, work_item_id) VALUES (NEW.project_id, NEW.id);
    RETURN NULL;
END
$$;
CREATE TRIGGER work_items_projects AFTER INSERT ON work_items
    FOR EACH ROW WHEN (NOT NEW.projects_mapped) EXECUTE FUNCTION work_item_projects_add();
DROP INDEX work_items_project;
"#,
    r#"
-- A run's completion writes a new version of its row, and that version stays on the run's page (a HOT
-- update: no index entries) only when the page has room for it. Runs are inserted in claim order and
-- completed soon after, so at 80 a page fills with fresh runs and the completions of most of them go to
-- other pages with new entries in every index of the table. Half a page left free holds the completions
-- of the runs inserted beside them. Pages written before this migration keep their layout.
ALTER TABLE runs SET (fillfactor = 50);
"#,
    r#"
-- A project's git repository (url, base branch) as JSON; NULL when it has none. Adding a nullable
-- column rewrites nothing.
ALTER TABLE projects ADD COLUMN repository jsonb;
-- What a run changed in its repository (branch, commits, diff stats) and its patch, written by the run's
-- lease holder; one row per run that recorded one, kept out of the hot `runs` rows.
CREATE TABLE run_results (
    run_id uuid PRIMARY KEY,
    project_id uuid NOT NULL,
    result jsonb NOT NULL,
    patch text NOT NULL,
    recorded_at timestamptz NOT NULL
);
CREATE INDEX run_results_project ON run_results (project_id);
"#,
];

/// For each migration, the oldest schema version whose builds still run correctly on a schema that
/// includes it (older builds keep running beside newer ones during a rolling upgrade, and restart on
/// the newer schema). A build refuses a newer schema only when one of the versions it does not know
/// says it cannot. Version 3 maps the inserts of version 2 builds through a trigger; version 4 changes
/// a storage parameter; version 5 adds a nullable column and a table older builds do not read.
pub const COMPATIBLE_FROM: &[i32] = &[1, 2, 2, 2, 2];

/// The schema version this build writes.
pub fn latest_version() -> i32 {
    MIGRATIONS.len() as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_migration_says_which_builds_run_on_it() {
        assert_eq!(COMPATIBLE_FROM.len(), MIGRATIONS.len());
        for (i, from) in COMPATIBLE_FROM.iter().enumerate() {
            let version = i as i32 + 1;
            assert!((1..=version).contains(from), "version {version}: compatible from {from}");
            // A build that cannot run on version n cannot run on later versions either.
            if i > 0 {
                assert!(*from >= COMPATIBLE_FROM[i - 1], "version {version}");
            }
        }
    }
}
