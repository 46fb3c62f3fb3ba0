//! The SQL postbox needs, shipped with the crate and applied by
//! [`Postgres::migrate`](crate::Postgres::migrate).
//!
//! Teams that run their own migrations can take the SQL from
//! [`MIGRATIONS`] (or `migrations/*.sql` in the crate), replacing `{schema}`
//! with their schema and `{channel}` with [`notify_channel`] of it, and never
//! call `migrate`.

use postbox_core::Error;

use crate::error::pg;

/// One migration: a version and its SQL (with `{schema}` / `{channel}` placeholders).
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Increasing version number.
    pub version: i32,
    /// Short name.
    pub name: &'static str,
    /// The SQL, with placeholders.
    pub sql: &'static str,
}

/// Every migration, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "idempotency",
        sql: include_str!("../migrations/0001_idempotency.sql"),
    },
    Migration {
        version: 2,
        name: "outbox",
        sql: include_str!("../migrations/0002_outbox.sql"),
    },
];

/// The `LISTEN`/`NOTIFY` channel of the outbox in `schema`.
pub fn notify_channel(schema: &str) -> String {
    format!("{schema}_postbox_outbox")
}

impl Migration {
    /// The SQL for `schema` (an already validated identifier).
    pub fn render(&self, schema: &str) -> String {
        self.sql
            .replace("{schema}", &format!("\"{schema}\""))
            .replace("{channel}", &notify_channel(schema))
    }
}

/// Applies the migrations not applied yet, under an advisory lock so that
/// concurrent callers (replicas starting together) apply each one once.
/// Returns the versions applied now.
pub(crate) async fn migrate(
    client: &mut tokio_postgres::Client,
    schema: &str,
) -> Result<Vec<i32>, Error> {
    let tx = client
        .transaction()
        .await
        .map_err(|e| pg("starting the migration transaction", e))?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('postbox_migrations'))",
        &[],
    )
    .await
    .map_err(|e| pg("taking the migration lock", e))?;
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS \"{schema}\";
         CREATE TABLE IF NOT EXISTS \"{schema}\".postbox_migrations (
             version    integer     PRIMARY KEY,
             name       text        NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         );"
    ))
    .await
    .map_err(|e| pg("creating the migrations table", e))?;
    let applied: Vec<i32> = tx
        .query(
            &format!("SELECT version FROM \"{schema}\".postbox_migrations"),
            &[],
        )
        .await
        .map_err(|e| pg("reading applied migrations", e))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut now = Vec::new();
    for m in MIGRATIONS {
        if applied.contains(&m.version) {
            continue;
        }
        tx.batch_execute(&m.render(schema))
            .await
            .map_err(|e| pg(&format!("applying migration {} ({})", m.version, m.name), e))?;
        tx.execute(
            &format!("INSERT INTO \"{schema}\".postbox_migrations (version, name) VALUES ($1, $2)"),
            &[&m.version, &m.name],
        )
        .await
        .map_err(|e| pg("recording a migration", e))?;
        now.push(m.version);
    }
    tx.commit()
        .await
        .map_err(|e| pg("committing the migrations", e))?;
    if !now.is_empty() {
        tracing::info!(schema, versions = ?now, "postbox migrations applied");
    }
    Ok(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendering_fills_every_placeholder() {
        for m in MIGRATIONS {
            let sql = m.render("app");
            assert!(!sql.contains('{') || sql.contains("$$"), "{sql}");
            assert!(!sql.contains("{schema}") && !sql.contains("{channel}"));
            assert!(sql.contains("\"app\"."));
        }
        assert!(MIGRATIONS[1].render("app").contains("'app_postbox_outbox'"));
        assert!(MIGRATIONS.windows(2).all(|w| w[0].version < w[1].version));
    }
}
