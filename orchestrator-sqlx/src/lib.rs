//! # orchestrator-sqlx
//!
//! The production [`Store`] on PostgreSQL, through sqlx (the `postgres` driver only).
//!
//! - Every operation is one transaction (READ COMMITTED) that locks the rows it reads and then writes,
//!   so concurrent orchestrator replicas serialize exactly where they touch the same rows. Serialization
//!   failures, deadlocks and lost races on unique keys are retried a few times, then reported as
//!   [`StoreError::Unavailable`] `{ retryable: true }`.
//! - Claims are one statement: a CTE picks ready rows (`priority DESC, run_at, id`) with
//!   `FOR UPDATE SKIP LOCKED LIMIT n` from a partial index that holds exactly the ready rows, marks them
//!   running and inserts their runs. Successful completions of many runs are one statement too.
//! - Concurrent claims (same capabilities and lease duration) are combined into one statement and
//!   concurrent completions into one transaction ([`PgOptions::combine_max_runs`]), each call keeping its
//!   own agent, lease and answers; [`PgStore::combining`] counts calls and statements.
//! - Wake-ups: operations that make work claimable `pg_notify` the schema's channel once per
//!   transaction, at most once per [`PgOptions::notify_interval`] per store (PostgreSQL serializes the
//!   commits of notifying transactions): within the interval, one notification follows at its end,
//!   after the commits it covers. A background task LISTENs on a dedicated connection and bumps the store's
//!   [`Notifier`]. When that connection drops it reconnects with backoff, bumping the notifier
//!   meanwhile so waiting claimers fall back to polling.
//! - Embedded, versioned migrations in a configurable schema (default `orchestrator`), applied under an
//!   advisory lock; a schema newer than this build is refused unless the newer build recorded that
//!   builds of this one still run on it.
//! - Hosts can create (and enqueue) work items inside their own transaction:
//!   [`PgStore::work_items_create_in`].

#![forbid(unsafe_code)]

mod combine;
mod error;
mod ops;
mod rows;
mod schema;
mod throttle;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use orchestrator_core::domain::*;
use orchestrator_core::error::{StoreError, StoreResult};
use orchestrator_core::ids::*;
use orchestrator_core::retry::RetryOverrides;
use orchestrator_core::store::*;
use orchestrator_core::Notifier;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use sqlx::{Connection, PgConnection, Postgres, Transaction};
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{is_transient, map_err, Q};

pub use crate::combine::CombiningStats;
pub use crate::error::map_err as map_sqlx_error;
pub use schema::latest_version as schema_version;

/// Options of [`PgStore::connect_with`] and [`PgStore::from_pool`].
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// The schema that holds the store's tables (created when missing). Lowercase letters, digits and
    /// underscores, starting with a letter or underscore, at most 63 characters.
    pub schema: String,
    /// Most pooled connections (the LISTEN connection comes on top).
    pub max_connections: u32,
    /// Connections kept open while idle.
    pub min_connections: u32,
    /// How long an operation waits for a pooled connection (and a new connection for its handshake)
    /// before failing with `Unavailable { retryable: true }`.
    pub acquire_timeout: Duration,
    /// Apply pending migrations when connecting. Without it the host applies them
    /// ([`PgStore::migrate`]) before this build writes: it needs the latest schema version (builds of
    /// earlier versions keep working on it).
    pub migrate: bool,
    /// Start the LISTEN task that turns notifications from every replica into wake-ups.
    pub listen: bool,
    /// How many times a unit of work is run again after a serialization failure or deadlock.
    pub max_retries: u32,
    /// At most one wake-up `NOTIFY` per this interval from this store: a transaction that makes work
    /// claimable notifies itself only when none was sent in the last interval, otherwise one
    /// notification follows at the interval's end (PostgreSQL serializes the commits of notifying
    /// transactions). Zero: every such transaction notifies.
    pub notify_interval: Duration,
    /// Concurrent claims (with equal capabilities and lease durations) are combined into one statement
    /// of at most this many runs, and concurrent completions into one transaction of at most this many:
    /// a transaction's fixed cost is paid once for many calls. A call that finds nothing running of its
    /// kind runs at once. 0 or 1: every call runs on its own.
    pub combine_max_runs: u32,
    /// With combining, at most this many combined claim statements (and as many completion
    /// transactions) run at once; calls that arrive meanwhile wait and are combined. While one runs,
    /// another starts only when it carries at least a quarter of `combine_max_runs` (or has waited a
    /// second beside a free slot).
    pub combine_in_flight: u32,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            schema: "orchestrator".into(),
            max_connections: 16,
            min_connections: 0,
            acquire_timeout: Duration::from_secs(5),
            migrate: true,
            listen: true,
            max_retries: 5,
            notify_interval: Duration::from_millis(2),
            combine_max_runs: 512,
            combine_in_flight: 2,
        }
    }
}

impl PgOptions {
    /// Default options with another schema.
    pub fn with_schema(schema: impl Into<String>) -> Self {
        PgOptions { schema: schema.into(), ..Default::default() }
    }

    /// Options read through `lookup` (e.g. `|k| std::env::var(k).ok()`): `ORCH_PG_SCHEMA`,
    /// `ORCH_PG_MAX_CONNECTIONS`, `ORCH_PG_MIN_CONNECTIONS`, `ORCH_PG_ACQUIRE_TIMEOUT_SECONDS`,
    /// `ORCH_PG_MIGRATE` (`true`/`false`), `ORCH_PG_NOTIFY_INTERVAL_MS`, `ORCH_PG_COMBINE_MAX_RUNS` and
    /// `ORCH_PG_COMBINE_IN_FLIGHT`. Missing or blank values keep
    /// their defaults; invalid ones are `Invalid` errors naming the variable.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, StoreError> {
        fn num<T: FromStr>(name: &str, v: &str, ok: impl Fn(&T) -> bool, what: &str) -> Result<T, StoreError> {
            v.trim()
                .parse::<T>()
                .ok()
                .filter(|n| ok(n))
                .ok_or_else(|| StoreError::invalid(name, format!("expected {what}, got `{v}`")))
        }
        let get = |k: &str| lookup(k).filter(|v| !v.trim().is_empty());
        let mut o = PgOptions::default();
        if let Some(v) = get("ORCH_PG_SCHEMA") {
            let v = v.trim().to_string();
            check_schema_name(&v).map_err(|e| StoreError::invalid("ORCH_PG_SCHEMA", e.to_string()))?;
            o.schema = v;
        }
        if let Some(v) = get("ORCH_PG_MAX_CONNECTIONS") {
            o.max_connections = num("ORCH_PG_MAX_CONNECTIONS", &v, |n| (1..=1000).contains(n), "1 to 1000")?;
        }
        if let Some(v) = get("ORCH_PG_MIN_CONNECTIONS") {
            o.min_connections = num("ORCH_PG_MIN_CONNECTIONS", &v, |n| *n <= 1000, "0 to 1000")?;
        }
        if o.min_connections > o.max_connections {
            return Err(StoreError::invalid(
                "ORCH_PG_MIN_CONNECTIONS",
                format!("{} is more than the {} of ORCH_PG_MAX_CONNECTIONS", o.min_connections, o.max_connections),
            ));
        }
        if let Some(v) = get("ORCH_PG_ACQUIRE_TIMEOUT_SECONDS") {
            let s: u64 =
                num("ORCH_PG_ACQUIRE_TIMEOUT_SECONDS", &v, |n| (1..=600).contains(n), "whole seconds from 1 to 600")?;
            o.acquire_timeout = Duration::from_secs(s);
        }
        if let Some(v) = get("ORCH_PG_MIGRATE") {
            o.migrate = orchestrator_core::config::parse_bool("ORCH_PG_MIGRATE", &v).map_err(|e| match e {
                orchestrator_core::Error::Invalid { field, message } => StoreError::invalid(field, message),
                other => StoreError::invalid("ORCH_PG_MIGRATE", other.to_string()),
            })?;
        }
        if let Some(v) = get("ORCH_PG_NOTIFY_INTERVAL_MS") {
            let ms: u64 = num("ORCH_PG_NOTIFY_INTERVAL_MS", &v, |n| *n <= 10_000, "milliseconds from 0 to 10000")?;
            o.notify_interval = Duration::from_millis(ms);
        }
        if let Some(v) = get("ORCH_PG_COMBINE_MAX_RUNS") {
            o.combine_max_runs = num("ORCH_PG_COMBINE_MAX_RUNS", &v, |n| *n <= 1000, "0 to 1000")?;
        }
        if let Some(v) = get("ORCH_PG_COMBINE_IN_FLIGHT") {
            o.combine_in_flight = num("ORCH_PG_COMBINE_IN_FLIGHT", &v, |n| (1..=64).contains(n), "1 to 64")?;
        }
        Ok(o)
    }

    /// [`PgOptions::from_lookup`] over the process environment.
    pub fn from_env() -> Result<Self, StoreError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }
}

fn check_schema_name(s: &str) -> StoreResult<()> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && !s.starts_with("pg_");
    if ok {
        Ok(())
    } else {
        Err(StoreError::invalid(
            "schema",
            format!("`{s}` is not a usable schema name (lowercase letters, digits and `_`, not starting with a digit or `pg_`)"),
        ))
    }
}

/// The PostgreSQL store. Dropping it stops its LISTEN task; the pool closes when its last handle goes.
pub struct PgStore {
    shared: Arc<Shared>,
    /// Combine concurrent claims and completions (absent when [`PgOptions::combine_max_runs`] is 0).
    claims: Option<combine::Sender<combine::ClaimJob>>,
    completions: Option<combine::Sender<combine::CompleteJob>>,
    listener: Option<tokio::task::JoinHandle<()>>,
    // Dropped with the store (after the LISTEN task stops), e.g. a test's schema cleanup.
    _guard: Option<Box<dyn std::any::Any + Send + Sync>>,
}

/// What the store's operations need, shared with the tasks that run combined claims and completions.
pub(crate) struct Shared {
    pool: PgPool,
    schema: String,
    channel: String,
    notifier: Notifier,
    /// The pool came from the host: set `search_path` in every transaction instead of per connection.
    per_tx_path: bool,
    max_retries: u32,
    throttle: Arc<throttle::NotifyThrottle>,
    combined: combine::Counters,
}

impl PgStore {
    pub(crate) fn sh(&self) -> &Shared {
        &self.shared
    }
}

impl Shared {
    pub(crate) fn sh(&self) -> &Shared {
        self
    }
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").field("schema", &self.shared.schema).finish_non_exhaustive()
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        if let Some(h) = self.listener.take() {
            h.abort();
        }
    }
}

/// A connection for one operation: plain, or inside a transaction that sets `search_path`.
enum Conn {
    Plain(sqlx::pool::PoolConnection<Postgres>),
    Tx(Transaction<'static, Postgres>),
}

impl std::ops::Deref for Conn {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        match self {
            Conn::Plain(c) => c,
            Conn::Tx(t) => t,
        }
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut PgConnection {
        match self {
            Conn::Plain(c) => &mut *c,
            Conn::Tx(t) => &mut *t,
        }
    }
}

impl Conn {
    async fn done(self) -> StoreResult<()> {
        match self {
            Conn::Plain(_) => Ok(()),
            Conn::Tx(t) => t.commit().await.q(),
        }
    }
}

/// Runs a write unit of work in a transaction, retrying transient failures. The body evaluates to
/// `StoreResult<(R, bool)>`; the bool says whether claimers should be woken (one `pg_notify` in the
/// transaction, and the local notifier after commit).
macro_rules! write_tx {
    ($s:expr, |$c:ident| $body:expr) => {{
        let s: &Shared = $s.sh();
        let mut attempt: u32 = 0;
        loop {
            let res = async {
                let mut tx = s.begin().await?;
                let out = {
                    let $c: &mut PgConnection = &mut *tx;
                    $body
                };
                match out {
                    Ok((v, notify)) => {
                        let in_tx = notify && s.throttle.leading();
                        if in_tx {
                            s.send_notify(&mut *tx).await?;
                        }
                        tx.commit().await.q()?;
                        if notify {
                            s.notifier.notify();
                            if !in_tx {
                                s.throttle.after_commit(&s.pool, &s.channel);
                            }
                        }
                        Ok(v)
                    }
                    Err(e) => {
                        let _ = tx.rollback().await;
                        Err(e)
                    }
                }
            }
            .await;
            match res {
                Err(e) if is_transient(&e) => {
                    attempt += 1;
                    if attempt > s.max_retries {
                        break Err(StoreError::Unavailable {
                            retryable: true,
                            message: format!("gave up after {attempt} attempts: {e}"),
                        });
                    }
                    s.backoff(attempt).await;
                }
                other => break other,
            }
        }
    }};
}

/// Runs a read (or a single self-contained statement) on one connection.
macro_rules! read_conn {
    ($s:expr, |$c:ident| $body:expr) => {{
        let s: &Shared = $s.sh();
        let mut conn = s.conn().await?;
        let out = {
            let $c: &mut PgConnection = &mut *conn;
            $body
        };
        match out {
            Ok(v) => {
                conn.done().await?;
                Ok(v)
            }
            Err(e) => Err(e),
        }
    }};
}

impl PgStore {
    /// Connects with default options (schema `orchestrator`, migrations applied).
    pub async fn connect(url: &str) -> Result<PgStore, StoreError> {
        Self::connect_with(url, PgOptions::default()).await
    }

    /// Connects with options: a pool whose connections use the schema, migrations when asked, and the
    /// LISTEN task.
    pub async fn connect_with(url: &str, options: PgOptions) -> Result<PgStore, StoreError> {
        check_schema_name(&options.schema)?;
        let connect = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::invalid("database_url", e.to_string()))?
            // Generic plans: the hot statements are planned once per connection, not on every call. A plan
            // made while a table was still small must not become a sequential scan of the grown table:
            // every hot statement has an index path, so sequential scans are taken only when no index
            // fits.
            .options([
                ("search_path", options.schema.as_str()),
                ("plan_cache_mode", "force_generic_plan"),
                ("enable_seqscan", "off"),
            ])
            // Every statement of the store stays prepared on each connection.
            .statement_cache_capacity(256);
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .min_connections(options.min_connections)
            .acquire_timeout(options.acquire_timeout)
            .test_before_acquire(false)
            .connect_lazy_with(connect);
        Self::build(pool, options, false).await
    }

    /// A store over a host's pool. Its connections keep their own `search_path`: every operation sets
    /// the store's schema for its own transaction.
    pub async fn from_pool(pool: PgPool, options: PgOptions) -> Result<PgStore, StoreError> {
        check_schema_name(&options.schema)?;
        Self::build(pool, options, true).await
    }

    async fn build(pool: PgPool, options: PgOptions, per_tx_path: bool) -> Result<PgStore, StoreError> {
        let channel = format!("orchestrator_{}", options.schema).chars().take(63).collect::<String>();
        let shared = Arc::new(Shared {
            pool,
            schema: options.schema.clone(),
            channel,
            notifier: Notifier::new(),
            per_tx_path,
            max_retries: options.max_retries,
            throttle: Arc::new(throttle::NotifyThrottle::new(options.notify_interval)),
            combined: combine::Counters::default(),
        });
        let combining = options.combine_max_runs > 1;
        let mut store = PgStore {
            claims: combining.then(|| {
                combine::spawn::<combine::ClaimJob>(shared.clone(), options.combine_max_runs, options.combine_in_flight)
            }),
            completions: combining.then(|| {
                combine::spawn::<combine::CompleteJob>(
                    shared.clone(),
                    options.combine_max_runs,
                    options.combine_in_flight,
                )
            }),
            shared,
            listener: None,
            _guard: None,
        };
        if options.migrate {
            store.migrate().await?;
        }
        if options.listen {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let connect = (*store.shared.pool.connect_options()).clone();
            store.listener = Some(tokio::spawn(listen_loop(
                connect,
                options.acquire_timeout,
                store.shared.channel.clone(),
                store.shared.notifier.clone(),
                tx,
            )));
            // Wait (bounded) until notifications flow, so work enqueued right after connecting wakes.
            let _ = tokio::time::timeout(options.acquire_timeout, rx).await;
        }
        Ok(store)
    }

    /// Keeps `guard` alive as long as the store and drops it right after the store (tests use it to drop
    /// their schema).
    pub fn with_guard(mut self, guard: impl std::any::Any + Send + Sync) -> Self {
        self._guard = Some(Box::new(guard));
        self
    }

    /// The pool (for hosts that want to run their own queries beside the store's).
    pub fn pool(&self) -> &PgPool {
        &self.shared.pool
    }

    /// The schema that holds the store's tables.
    pub fn schema(&self) -> &str {
        &self.shared.schema
    }

    /// How many claim and completion calls this store took, and in how many statements (claims) and
    /// transactions (completions) it ran them: with [`PgOptions::combine_max_runs`], concurrent calls
    /// share them.
    pub fn combining(&self) -> CombiningStats {
        self.shared.combined.stats()
    }

    /// The channel this store's operations notify and its LISTEN task listens on.
    pub fn channel(&self) -> &str {
        &self.shared.channel
    }

    /// Applies pending migrations (idempotent; safe when several processes start at once: an advisory
    /// lock serializes them). Refuses a schema written by a newer build, unless that build recorded that
    /// builds of this one still run on it (so older replicas keep restarting during a rolling upgrade).
    pub async fn migrate(&self) -> StoreResult<()> {
        self.migrate_to(schema::latest_version()).await
    }

    /// Applies pending migrations up to schema version `version` (for hosts that roll schema changes out
    /// step by step; [`PgStore::migrate`] applies them all). A version this build does not know is refused.
    pub async fn migrate_to(&self, version: i32) -> StoreResult<()> {
        if !(1..=schema::latest_version()).contains(&version) {
            return Err(StoreError::invalid(
                "version",
                format!("schema versions of this build are 1 to {}", schema::latest_version()),
            ));
        }
        let mut conn = self.shared.pool.acquire().await.q()?;
        let mut tx = conn.begin().await.q()?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('orchestrator-migrations:' || $1))")
            .bind(&self.shared.schema)
            .execute(&mut *tx)
            .await
            .q()?;
        let s = &self.shared.schema;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE SCHEMA IF NOT EXISTS {s}; SET LOCAL search_path TO {s};
             CREATE TABLE IF NOT EXISTS orchestrator_migrations (version int4 PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now());
             DO $$ BEGIN
                 -- Only when missing: ALTER TABLE locks the table exclusively even when it changes nothing.
                 IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'orchestrator_migrations'::regclass
                                AND attname = 'compatible_from' AND NOT attisdropped) THEN
                     ALTER TABLE orchestrator_migrations ADD COLUMN compatible_from int4;
                 END IF;
             END $$;"
        )))
        .execute(&mut *tx)
        .await
        .q()?;
        let found: i32 = sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM orchestrator_migrations")
            .fetch_one(&mut *tx)
            .await
            .q()?;
        let supported = schema::latest_version();
        if found > supported {
            // Written by a newer build: run on it only when every version this build does not know says
            // builds of this one still work (a version recorded without the column never said so).
            let needs: Option<i32> = sqlx::query_scalar(
                "SELECT MAX(COALESCE(compatible_from, version)) FROM orchestrator_migrations WHERE version > $1",
            )
            .bind(supported)
            .fetch_one(&mut *tx)
            .await
            .q()?;
            if needs.is_some_and(|n| n > supported) {
                return Err(StoreError::Unavailable {
                    retryable: false,
                    message: format!(
                        "schema `{s}` has version {found}, newer than this build's {supported} and not compatible with it; upgrade the orchestrator"
                    ),
                });
            }
            tracing::info!(schema = %s, found, supported, "schema is newer than this build and compatible with it");
            return tx.commit().await.q();
        }
        for (i, m) in schema::MIGRATIONS.iter().enumerate().take(version as usize).skip(found.max(0) as usize) {
            sqlx::raw_sql(*m).execute(&mut *tx).await.q()?;
            sqlx::query("INSERT INTO orchestrator_migrations (version, compatible_from) VALUES ($1, $2)")
                .bind(i as i32 + 1)
                .bind(schema::COMPATIBLE_FROM.get(i).copied())
                .execute(&mut *tx)
                .await
                .q()?;
        }
        tx.commit().await.q()
    }

    /// The schema version stored in the database (0 before the first migration).
    pub async fn stored_version(&self) -> StoreResult<i32> {
        read_conn!(self, |c| {
            sqlx::query_scalar::<_, i32>("SELECT COALESCE(MAX(version), 0) FROM orchestrator_migrations")
                .fetch_one(&mut *c)
                .await
                .q()
        })
    }

    /// Drops the store's schema and everything in it (tests, benchmarks). The store is unusable after.
    pub async fn drop_schema(&self) -> StoreResult<()> {
        let s = &self.shared.schema;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP SCHEMA IF EXISTS {s} CASCADE")))
            .execute(&self.shared.pool)
            .await
            .q()?;
        Ok(())
    }

    /// Creates (and, when asked, enqueues) work items inside the host's own transaction, with the same
    /// rules and SQL as [`Store::work_items_create`]: they commit or roll back with the host's data.
    /// Claimers are notified when the host commits. The transaction's `search_path` is restored after.
    pub async fn work_items_create_in(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        items: Vec<NewWorkItem>,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<WorkItemCreated>> {
        let c: &mut PgConnection = tx;
        let old: String = sqlx::query_scalar("SELECT current_setting('search_path')").fetch_one(&mut *c).await.q()?;
        sqlx::query("SELECT set_config('search_path', $1, true)")
            .bind(&self.shared.schema)
            .execute(&mut *c)
            .await
            .q()?;
        let res = ops::work_items_create(c, &items, now).await;
        let res = match res {
            Ok((out, notify)) => {
                if notify {
                    self.shared.send_notify(c).await.map(|_| out)
                } else {
                    Ok(out)
                }
            }
            Err(e) => Err(e),
        };
        // A failed statement aborted the host's transaction: nothing more can run in it.
        if res.is_ok() {
            sqlx::query("SELECT set_config('search_path', $1, true)").bind(old).execute(&mut *c).await.q()?;
        }
        res
    }
}

impl Shared {
    async fn begin(&self) -> StoreResult<Transaction<'static, Postgres>> {
        let mut tx = self.pool.begin().await.q()?;
        if self.per_tx_path {
            sqlx::query("SELECT set_config('search_path', $1, true)").bind(&self.schema).execute(&mut *tx).await.q()?;
        }
        Ok(tx)
    }

    async fn conn(&self) -> StoreResult<Conn> {
        if self.per_tx_path {
            Ok(Conn::Tx(self.begin().await?))
        } else {
            Ok(Conn::Plain(self.pool.acquire().await.q()?))
        }
    }

    async fn send_notify(&self, c: &mut PgConnection) -> StoreResult<()> {
        sqlx::query(throttle::NOTIFY_SQL).bind(&self.channel).execute(c).await.q()?;
        Ok(())
    }

    async fn backoff(&self, attempt: u32) {
        let ms = (5u64 << attempt.min(6)) + fastrand_ms();
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    /// Claims for one or more callers in one self-contained statement (atomic without an explicit
    /// transaction), retrying transient failures: the runs of each claim, in order.
    pub(crate) async fn claim(&self, claims: &[&Claim]) -> StoreResult<Vec<Vec<ClaimedRun>>> {
        self.combined.claim_statements.fetch_add(1, Ordering::Relaxed);
        let mut attempt = 0u32;
        loop {
            match read_conn!(self, |c| ops::runs_claim_many(c, claims).await) {
                Err(e) if is_transient(&e) && attempt < self.max_retries => {
                    attempt += 1;
                    self.backoff(attempt).await;
                }
                Err(e) if is_transient(&e) => {
                    return Err(StoreError::Unavailable { retryable: true, message: e.to_string() })
                }
                other => return other,
            }
        }
    }

    /// Completes runs in one transaction (see [`ops::runs_complete_many`]).
    pub(crate) async fn complete_many(&self, p: &CompleteMany) -> StoreResult<Vec<StoreResult<CompletionResult>>> {
        self.combined.completion_transactions.fetch_add(1, Ordering::Relaxed);
        write_tx!(self, |c| ops::runs_complete_many(c, p).await)
    }

    /// Completes the runs of combined calls in one transaction, each at its caller's time, giving up
    /// with an error when a row lock is not granted within `lock_timeout`: the calls then run on their
    /// own, so one waiting completion does not hold the others.
    pub(crate) async fn complete_combined(
        &self,
        completions: &[RunCompletion],
        nows: &[DateTime<Utc>],
        retry_defaults: &orchestrator_core::retry::RetryPolicy,
        lock_timeout: Duration,
    ) -> StoreResult<Vec<StoreResult<CompletionResult>>> {
        self.combined.completion_transactions.fetch_add(1, Ordering::Relaxed);
        let timeout = format!("{}ms", lock_timeout.as_millis().max(1));
        write_tx!(self, |c| {
            match sqlx::query("SELECT set_config('lock_timeout', $1, true)").bind(&timeout).execute(&mut *c).await.q() {
                Ok(_) => ops::runs_complete_many_at(c, completions, nows, retry_defaults).await,
                Err(e) => Err(e),
            }
        })
    }
}

/// A few milliseconds of jitter without a random-number dependency.
fn fastrand_ms() -> u64 {
    let n = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    u64::from(n % 7)
}

/// Holds a LISTEN on a dedicated connection and bumps the notifier on each notification. When the
/// connection drops it reconnects with backoff; while it is down the notifier is bumped on every
/// attempt so waiting claimers poll.
async fn listen_loop(
    connect: PgConnectOptions,
    acquire_timeout: Duration,
    channel: String,
    notifier: Notifier,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    let mut backoff = Duration::from_millis(50);
    let max_backoff = Duration::from_secs(1);
    loop {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .acquire_timeout(acquire_timeout)
            .test_before_acquire(false)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_lazy_with(connect.clone());
        let listener = async {
            let mut l = PgListener::connect_with(&pool).await?;
            l.ignore_pool_close_event(true);
            l.listen(&channel).await?;
            Ok::<_, sqlx::Error>(l)
        }
        .await;
        match listener {
            Ok(mut l) => {
                backoff = Duration::from_millis(50);
                // Anything may have become ready while nobody listened.
                notifier.notify();
                if let Some(r) = ready.take() {
                    let _ = r.send(());
                }
                loop {
                    match l.try_recv().await {
                        Ok(Some(_)) => notifier.notify(),
                        // The connection dropped and was re-established: notifications may be lost.
                        Ok(None) => notifier.notify(),
                        Err(e) => {
                            tracing::warn!(error = %e, channel = %channel, "LISTEN connection lost; reconnecting");
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, channel = %channel, "LISTEN connection unavailable; retrying");
            }
        }
        pool.close().await;
        notifier.notify();
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(max_backoff);
    }
}

#[async_trait]
impl Store for PgStore {
    fn notifier(&self) -> &Notifier {
        &self.shared.notifier
    }

    async fn ping(&self) -> StoreResult<()> {
        read_conn!(self, |c| sqlx::query("SELECT 1").execute(&mut *c).await.map(|_| ()).map_err(map_err))
    }

    async fn project_create(&self, p: NewProject) -> StoreResult<Project> {
        write_tx!(self, |c| ops::project_create(c, p.clone()).await.map(|r| (r, false)))
    }
    async fn project_get(&self, id: ProjectId) -> StoreResult<Project> {
        read_conn!(self, |c| ops::project_get(c, id).await)
    }
    async fn project_list(&self, page: Page) -> StoreResult<Vec<Project>> {
        read_conn!(self, |c| ops::project_list(c, page).await)
    }
    async fn project_update(&self, p: ProjectUpdate) -> StoreResult<Project> {
        write_tx!(self, |c| ops::project_update(c, p.clone()).await.map(|r| (r, false)))
    }
    async fn project_delete(&self, id: ProjectId) -> StoreResult<()> {
        write_tx!(self, |c| ops::project_delete(c, id).await.map(|r| (r, false)))
    }

    async fn vision_put(&self, p: VisionPut) -> StoreResult<Vision> {
        write_tx!(self, |c| ops::vision_put(c, p.clone()).await.map(|r| (r, false)))
    }
    async fn vision_get(&self, project_id: ProjectId, version: Option<u32>) -> StoreResult<Vision> {
        read_conn!(self, |c| ops::vision_get(c, project_id, version).await)
    }
    async fn vision_list(&self, project_id: ProjectId) -> StoreResult<Vec<Vision>> {
        read_conn!(self, |c| ops::vision_list(c, project_id).await)
    }

    async fn draft_create(&self, p: NewDraft) -> StoreResult<(RequirementsDraft, Option<ApprovalRequest>)> {
        write_tx!(self, |c| ops::draft_create(c, p.clone()).await.map(|r| (r, false)))
    }
    async fn draft_get(&self, id: DraftId) -> StoreResult<RequirementsDraft> {
        read_conn!(self, |c| ops::draft_get(c, id).await)
    }
    async fn draft_list(&self, project_id: ProjectId, page: Page) -> StoreResult<Vec<RequirementsDraft>> {
        read_conn!(self, |c| ops::draft_list(c, project_id, page).await)
    }
    async fn draft_decide(&self, id: DraftId, d: Decide) -> StoreResult<DecisionOutcome> {
        write_tx!(self, |c| ops::decide(c, None, Some(id), &d).await.map(|r| (r, false)))
    }

    async fn approval_get(&self, id: ApprovalId) -> StoreResult<ApprovalRequest> {
        read_conn!(self, |c| ops::approval_get(c, id).await)
    }
    async fn approval_list(&self, f: ApprovalFilter) -> StoreResult<Vec<ApprovalRequest>> {
        read_conn!(self, |c| ops::approval_list(c, &f).await)
    }
    async fn approval_decide(&self, id: ApprovalId, d: Decide) -> StoreResult<DecisionOutcome> {
        write_tx!(self, |c| ops::decide(c, Some(id), None, &d).await.map(|r| (r, false)))
    }

    async fn recipe_create(&self, p: NewRecipe) -> StoreResult<ToolRecipe> {
        write_tx!(self, |c| ops::recipe_create(c, p.clone()).await.map(|r| (r, false)))
    }
    async fn recipe_get(&self, id: RecipeId) -> StoreResult<ToolRecipe> {
        read_conn!(self, |c| ops::recipe_get(c, id).await)
    }
    async fn recipe_list(&self, page: Page) -> StoreResult<Vec<ToolRecipe>> {
        read_conn!(self, |c| ops::recipe_list(c, page).await)
    }

    async fn work_items_create(
        &self,
        items: Vec<NewWorkItem>,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<WorkItemCreated>> {
        // Items that need nothing but their insert (the common enqueue) go in one self-contained
        // statement: one round trip instead of a transaction's five.
        if let Some(rows) = ops::plain_creates(&items, now) {
            if rows.is_empty() {
                return Ok(Vec::new());
            }
            let wake = rows.iter().any(|w| w.state == orchestrator_core::state::WorkItemState::Queued);
            let mut attempt = 0u32;
            loop {
                let in_stmt = wake && self.shared.throttle.leading();
                let channel = in_stmt.then_some(self.shared.channel.as_str());
                match read_conn!(self, |c| ops::insert_plain(c, &rows, channel).await) {
                    Ok(()) => {
                        if wake {
                            self.shared.notifier.notify();
                            if !in_stmt {
                                self.shared.throttle.after_commit(&self.shared.pool, &self.shared.channel);
                            }
                        }
                        return Ok(rows
                            .into_iter()
                            .map(|work_item| WorkItemCreated { work_item, created: true, approval: None })
                            .collect());
                    }
                    Err(e) if is_transient(&e) && attempt < self.shared.max_retries => {
                        attempt += 1;
                        self.shared.backoff(attempt).await;
                    }
                    Err(e) if is_transient(&e) => {
                        return Err(StoreError::Unavailable { retryable: true, message: e.to_string() })
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        write_tx!(self, |c| ops::work_items_create(c, &items, now).await)
    }
    async fn work_item_get(&self, id: WorkItemId) -> StoreResult<WorkItem> {
        read_conn!(self, |c| ops::work_item_get(c, id).await)
    }
    async fn work_item_list(&self, f: WorkItemFilter) -> StoreResult<Vec<WorkItem>> {
        read_conn!(self, |c| ops::work_item_list(c, &f).await)
    }
    async fn work_item_update(&self, p: WorkItemUpdate) -> StoreResult<WorkItemChanged> {
        write_tx!(self, |c| ops::work_item_update(c, p.clone()).await.map(|r| (r, false)))
    }
    async fn work_item_submit(
        &self,
        id: WorkItemId,
        require_approval: bool,
        now: DateTime<Utc>,
    ) -> StoreResult<WorkItemChanged> {
        write_tx!(self, |c| ops::work_item_submit(c, id, require_approval, now).await.map(|r| (r, false)))
    }
    async fn work_item_set_policy(
        &self,
        id: WorkItemId,
        retry: RetryOverrides,
        now: DateTime<Utc>,
    ) -> StoreResult<WorkItem> {
        write_tx!(self, |c| ops::work_item_set_policy(c, id, retry.clone(), now).await.map(|r| (r, false)))
    }
    async fn work_item_cancel(&self, id: WorkItemId, x: Cancel) -> StoreResult<WorkItem> {
        write_tx!(self, |c| ops::cancel_item(c, id, &x.reason, x.now).await.map(|r| (r, false)))
    }
    async fn work_item_requeue(&self, id: WorkItemId, r: Requeue) -> StoreResult<WorkItem> {
        write_tx!(self, |c| ops::work_item_requeue(c, id, &r).await.map(|w| (w, true)))
    }

    async fn enqueue_many(&self, items: Vec<Enqueue>, now: DateTime<Utc>) -> StoreResult<Vec<ScheduledTask>> {
        write_tx!(self, |c| ops::enqueue_checked(c, &items, now).await.map(|r| (r, true)))
    }
    async fn scheduled_task_get(&self, id: WorkItemId) -> StoreResult<ScheduledTask> {
        read_conn!(self, |c| ops::scheduled_task_get(c, id).await)
    }
    async fn queue_list(&self, f: QueueFilter) -> StoreResult<Vec<ScheduledTask>> {
        read_conn!(self, |c| ops::queue_list(c, &f).await)
    }
    async fn tick(&self, t: Tick) -> StoreResult<TickReport> {
        write_tx!(self, |c| ops::tick(c, &t).await)
    }
    async fn leases_reap_expired(&self, t: Tick) -> StoreResult<Vec<ReapedRun>> {
        write_tx!(self, |c| ops::reap(c, &t).await.map(|r| {
            let n = !r.is_empty();
            (r, n)
        }))
    }

    async fn runs_claim(&self, cl: Claim) -> StoreResult<Vec<ClaimedRun>> {
        self.shared.combined.claim_calls.fetch_add(1, Ordering::Relaxed);
        match &self.claims {
            Some(tx) if cl.limit > 0 => combine::ClaimJob::submit(tx, cl).await,
            _ => Ok(self.shared.claim(&[&cl]).await?.pop().unwrap_or_default()),
        }
    }
    async fn lease_renew(&self, p: LeaseRenew) -> StoreResult<Lease> {
        write_tx!(self, |c| ops::lease_renew(c, &p).await.map(|r| (r, false)))
    }
    async fn run_start(&self, p: RunStart) -> StoreResult<Run> {
        write_tx!(self, |c| ops::run_start(c, &p).await.map(|r| (r, false)))
    }
    async fn runs_complete_many(&self, p: CompleteMany) -> StoreResult<Vec<StoreResult<CompletionResult>>> {
        self.shared.combined.completion_calls.fetch_add(1, Ordering::Relaxed);
        match &self.completions {
            Some(tx) if !p.completions.is_empty() => combine::CompleteJob::submit(tx, p).await,
            _ => self.shared.complete_many(&p).await,
        }
    }
    async fn runs_complete_and_claim(&self, p: CompleteMany, cl: Claim) -> StoreResult<CompletedAndClaimed> {
        if self.claims.is_some() && self.completions.is_some() {
            // With combining, the completions and then the claim join the statements of concurrent
            // callers: two shared statements cost less than one transaction of each caller's own. The
            // completions commit first, so under concurrency another claimer may take a dependent they
            // released before this claim does.
            return complete_then_claim(self, p, cl).await;
        }
        // One transaction, one commit: the completions, then the claim (which sees them).
        let both = write_tx!(self, |c| {
            match ops::runs_complete_many(c, &p).await {
                Ok((completed, notify)) => ops::runs_claim(c, &cl).await.map(|claimed| ((completed, claimed), notify)),
                Err(e) => Err(e),
            }
        });
        settle_complete_and_claim(self, both, p, cl).await
    }
    async fn run_get(&self, id: RunId) -> StoreResult<Run> {
        read_conn!(self, |c| ops::run_get(c, id).await)
    }
    async fn run_list(&self, f: RunFilter) -> StoreResult<Vec<Run>> {
        read_conn!(self, |c| ops::run_list(c, &f).await)
    }
    async fn run_cancel(&self, id: RunId, x: Cancel) -> StoreResult<Run> {
        write_tx!(self, |c| ops::run_cancel(c, id, &x).await.map(|r| (r, false)))
    }
    async fn run_requeue(&self, id: RunId, r: Requeue) -> StoreResult<WorkItem> {
        write_tx!(self, |c| ops::run_requeue(c, id, &r).await.map(|w| (w, true)))
    }

    async fn runs_release(&self, p: RunRelease) -> StoreResult<Run> {
        write_tx!(self, |c| ops::runs_release(c, &p).await.map(|r| (r, true)))
    }
    async fn run_result_put(&self, p: RunResultPut) -> StoreResult<()> {
        write_tx!(self, |c| ops::run_result_put(c, &p).await.map(|r| (r, false)))
    }
    async fn run_result_get(&self, run_id: RunId) -> StoreResult<Option<RunResultRecord>> {
        read_conn!(self, |c| ops::run_result_get(c, run_id).await)
    }

    async fn logs_append(&self, p: LogAppend) -> StoreResult<u64> {
        write_tx!(self, |c| ops::logs_append(c, p.clone()).await.map(|r| (r, false)))
    }
    async fn logs_read_after(&self, run_id: RunId, after: u64, limit: u32) -> StoreResult<Vec<LogEntry>> {
        read_conn!(self, |c| ops::logs_read_after(c, run_id, after, limit).await)
    }
    async fn step_events_append(&self, p: StepEventsAppend) -> StoreResult<Vec<StepEvent>> {
        write_tx!(self, |c| ops::step_events_append(c, p.clone()).await.map(|r| (r, false)))
    }
    async fn step_events_read_after(&self, run_id: RunId, after: u64, limit: u32) -> StoreResult<Vec<StepEvent>> {
        read_conn!(self, |c| ops::step_events_read_after(c, run_id, after, limit).await)
    }

    async fn info_requests_create(&self, p: InfoAsk) -> StoreResult<Vec<InfoRequest>> {
        write_tx!(self, |c| ops::info_requests_create(c, p.clone()).await.map(|r| (r, false)))
    }
    async fn info_request_get(&self, id: InfoRequestId) -> StoreResult<InfoRequest> {
        read_conn!(self, |c| ops::info_request_get(c, id).await)
    }
    async fn info_request_list(&self, f: InfoRequestFilter) -> StoreResult<Vec<InfoRequest>> {
        read_conn!(self, |c| ops::info_request_list(c, &f).await)
    }
    async fn info_request_answer(&self, p: InfoAnswer) -> StoreResult<InfoAnswered> {
        write_tx!(self, |c| ops::info_request_answer(c, p.clone()).await.map(|r| {
            let n = r.resumed;
            (r, n)
        }))
    }
    async fn info_answers_for_run(
        &self,
        run_id: RunId,
        token: u64,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<InfoRequest>> {
        read_conn!(self, |c| ops::info_answers_for_run(c, run_id, token, now).await)
    }

    async fn stats(&self) -> StoreResult<QueueStats> {
        read_conn!(self, |c| ops::stats(c).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn read(vars: &[(&str, &str)]) -> Result<PgOptions, StoreError> {
        let env: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        PgOptions::from_lookup(|k| env.get(k).cloned())
    }

    #[test]
    fn options_from_the_environment() {
        let d = read(&[]).unwrap();
        assert_eq!((d.schema.as_str(), d.max_connections, d.migrate), ("orchestrator", 16, true));
        assert_eq!(d.notify_interval, Duration::from_millis(2));
        assert_eq!((d.combine_max_runs, d.combine_in_flight), (512, 2));
        let o = read(&[
            ("ORCH_PG_SCHEMA", " jobs_1 "),
            ("ORCH_PG_MAX_CONNECTIONS", "40"),
            ("ORCH_PG_MIN_CONNECTIONS", "4"),
            ("ORCH_PG_ACQUIRE_TIMEOUT_SECONDS", "9"),
            ("ORCH_PG_MIGRATE", "off"),
            ("ORCH_PG_NOTIFY_INTERVAL_MS", "0"),
            ("ORCH_PG_COMBINE_MAX_RUNS", "0"),
            ("ORCH_PG_COMBINE_IN_FLIGHT", "4"),
        ])
        .unwrap();
        assert_eq!((o.combine_max_runs, o.combine_in_flight), (0, 4));
        assert_eq!(o.schema, "jobs_1");
        assert_eq!((o.max_connections, o.min_connections), (40, 4));
        assert_eq!(o.acquire_timeout, Duration::from_secs(9));
        assert!(!o.migrate);
        assert!(o.notify_interval.is_zero());
        assert_eq!(read(&[("ORCH_PG_SCHEMA", "  ")]).unwrap().schema, "orchestrator");
    }

    #[test]
    fn bad_options_name_their_variable() {
        for (k, v) in [
            ("ORCH_PG_SCHEMA", "Jobs"),
            ("ORCH_PG_SCHEMA", "pg_jobs"),
            ("ORCH_PG_MAX_CONNECTIONS", "0"),
            ("ORCH_PG_MAX_CONNECTIONS", "many"),
            ("ORCH_PG_ACQUIRE_TIMEOUT_SECONDS", "0"),
            ("ORCH_PG_MIGRATE", "maybe"),
            ("ORCH_PG_NOTIFY_INTERVAL_MS", "-1"),
            ("ORCH_PG_NOTIFY_INTERVAL_MS", "20000"),
            ("ORCH_PG_COMBINE_MAX_RUNS", "1001"),
            ("ORCH_PG_COMBINE_IN_FLIGHT", "0"),
        ] {
            let e = read(&[(k, v)]).unwrap_err();
            assert!(matches!(e, StoreError::Invalid { .. }) && e.to_string().contains(k), "{k}={v}: {e}");
        }
        let e = read(&[("ORCH_PG_MIN_CONNECTIONS", "20")]).unwrap_err();
        assert!(e.to_string().contains("ORCH_PG_MIN_CONNECTIONS"), "{e}");
    }
}
