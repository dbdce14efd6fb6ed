//! A PostgreSQL database of the bench's own: created through an admin URL, dropped at
//! the end, so a measurement never meets another run's rows or a server's real queue.

use anyhow::{Context, Result};
use sqlx::{Connection, PgConnection};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Where `slate bench` looks for PostgreSQL when neither `--database` nor
/// `SLATE_BENCH_DATABASE` says: the database `scripts/postgres.sh` creates.
pub const DEFAULT_URL: &str = "postgres://slate:slate@127.0.0.1:5432/slate_test";

/// The admin URL to create scratch databases through: the flag, else the environment,
/// else the scripts' default.
pub fn admin_url(flag: Option<&str>) -> String {
    flag.map(str::to_owned)
        .or_else(|| std::env::var("SLATE_BENCH_DATABASE").ok())
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| DEFAULT_URL.to_owned())
}

/// `url` with its database replaced by `db` (query parameters kept).
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let authority = base.find("://").map_or(0, |i| i + 3);
    let end = base[authority..]
        .find('/')
        .map_or(base.len(), |i| authority + i);
    format!("{}/{db}{query}", &base[..end])
}

/// Why PostgreSQL cannot be used, or `None` when it can (the section is then run).
pub async fn unreachable(admin: &str) -> Option<String> {
    match PgConnection::connect(admin).await {
        Ok(conn) => {
            let _ = conn.close().await;
            None
        }
        Err(e) => Some(format!(
            "no postgresql at {} ({e}); run scripts/postgres.sh or pass --database",
            redact(admin)
        )),
    }
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    match (rest.find('@'), rest.find(':')) {
        (Some(at), Some(colon)) if colon < at => {
            format!(
                "{}{}:***{}",
                &url[..scheme_end],
                &rest[..colon],
                &rest[at..]
            )
        }
        _ => url.to_owned(),
    }
}

/// A scratch database; [`ScratchDb::drop_now`] removes it (callers do so on every path).
pub struct ScratchDb {
    admin: String,
    pub name: String,
    pub url: String,
}

impl ScratchDb {
    /// `slate_bench_<pid>_<tag>_<n>`: unique across runs on one server and within one.
    pub async fn create(admin: &str, tag: &str) -> Result<ScratchDb> {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "slate_bench_{}_{tag}_{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let mut conn = PgConnection::connect(admin)
            .await
            .with_context(|| format!("connecting to {}", redact(admin)))?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .with_context(|| format!("creating database {name} (does the role have CREATEDB?)"))?;
        let _ = conn.close().await;
        Ok(ScratchDb {
            admin: admin.to_owned(),
            url: with_database(admin, &name),
            name,
        })
    }

    /// Drop the database; FORCE ends connections a failed run may have left open.
    pub async fn drop_now(self) -> Result<()> {
        let mut conn = PgConnection::connect(&self.admin).await?;
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&mut conn)
        .await
        .with_context(|| format!("dropping database {}", self.name))?;
        let _ = conn.close().await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_and_password_are_replaced() {
        assert_eq!(
            with_database("postgres://u:p@h:5432/slate_test?sslmode=disable", "x"),
            "postgres://u:p@h:5432/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://u:p@h", "x"), "postgres://u:p@h/x");
        assert_eq!(
            redact("postgres://u:p@h:5432/d"),
            "postgres://u:***@h:5432/d"
        );
        assert_eq!(redact("postgres://h:5432/d"), "postgres://h:5432/d");
    }
}
