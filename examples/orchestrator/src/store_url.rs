//! `ORCH_DATABASE_URL`: which store `serve` opens.

use std::path::{Path, PathBuf};

/// The SQLite file used when `ORCH_DATABASE_URL` is unset.
pub const DEFAULT_SQLITE_FILE: &str = "orchestrator.db";

/// A parsed `ORCH_DATABASE_URL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// A SQLite database file.
    Sqlite(PathBuf),
    /// A PostgreSQL connection URL (`postgres://` or `postgresql://`).
    Postgres(String),
}

impl StoreUrl {
    /// Parses the variable's value; `None` (or blank) is the default SQLite file in the working directory.
    ///
    /// Accepted: `sqlite://relative/path.db`, `sqlite:///absolute/path.db`, `sqlite:path.db`,
    /// `postgres://...`, `postgresql://...`.
    pub fn parse(value: Option<&str>) -> Result<StoreUrl, String> {
        let Some(v) = value.map(str::trim).filter(|v| !v.is_empty()) else {
            return Ok(StoreUrl::Sqlite(PathBuf::from(DEFAULT_SQLITE_FILE)));
        };
        if v.starts_with("postgres://") || v.starts_with("postgresql://") {
            return Ok(StoreUrl::Postgres(v.to_string()));
        }
        if let Some(rest) = v.strip_prefix("sqlite:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            // Query parameters (`?mode=rwc`, as other tools write them) are not options here.
            let path = path.split('?').next().unwrap_or(path);
            if path.is_empty() || path == ":memory:" {
                return Err(format!(
                    "ORCH_DATABASE_URL `{v}`: give a SQLite file path (sqlite://path/to/file.db); \
                     an in-memory database would lose everything at exit"
                ));
            }
            return Ok(StoreUrl::Sqlite(PathBuf::from(path)));
        }
        Err(format!("ORCH_DATABASE_URL: unsupported URL `{}` (expected sqlite://PATH or postgres://...)", redact(v)))
    }

    /// Where the generated secret key file goes: beside the SQLite database, or in the working directory.
    pub fn key_file(&self) -> PathBuf {
        let dir = match self {
            StoreUrl::Sqlite(p) => p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")),
            StoreUrl::Postgres(_) => Path::new("."),
        };
        dir.join("orchestrator.key")
    }

    /// A description for logs that never shows a password.
    pub fn display(&self) -> String {
        match self {
            StoreUrl::Sqlite(p) => format!("SQLite file {}", p.display()),
            StoreUrl::Postgres(u) => format!("PostgreSQL {}", redact(u)),
        }
    }
}

/// Hides the password of `scheme://user:password@host/...`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, tail) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_accepted_forms() {
        assert_eq!(StoreUrl::parse(None).unwrap(), StoreUrl::Sqlite("orchestrator.db".into()));
        assert_eq!(StoreUrl::parse(Some("  ")).unwrap(), StoreUrl::Sqlite("orchestrator.db".into()));
        assert_eq!(StoreUrl::parse(Some("sqlite://data/o.db")).unwrap(), StoreUrl::Sqlite("data/o.db".into()));
        assert_eq!(StoreUrl::parse(Some("sqlite:///tmp/o.db")).unwrap(), StoreUrl::Sqlite("/tmp/o.db".into()));
        assert_eq!(StoreUrl::parse(Some("sqlite:o.db?mode=rwc")).unwrap(), StoreUrl::Sqlite("o.db".into()));
        assert_eq!(StoreUrl::parse(Some("postgres://u@h/db")).unwrap(), StoreUrl::Postgres("postgres://u@h/db".into()));
        assert!(StoreUrl::parse(Some("postgresql://h/db")).is_ok());
        assert!(StoreUrl::parse(Some("sqlite::memory:")).is_err());
        assert!(StoreUrl::parse(Some("sqlite://")).is_err());
        let e = StoreUrl::parse(Some("mysql://u:pw@h/db")).unwrap_err();
        assert!(e.contains("unsupported") && !e.contains("pw"), "{e}");
    }

    #[test]
    fn key_file_sits_beside_the_database() {
        assert_eq!(StoreUrl::Sqlite("orchestrator.db".into()).key_file(), PathBuf::from("./orchestrator.key"));
        assert_eq!(StoreUrl::Sqlite("/var/lib/o/o.db".into()).key_file(), PathBuf::from("/var/lib/o/orchestrator.key"));
        assert_eq!(StoreUrl::Postgres("postgres://h/db".into()).key_file(), PathBuf::from("./orchestrator.key"));
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact("postgres://u:secret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("postgres://h/db"), "postgres://h/db");
    }
}
