//! Database connections, the schema and its migrations, and what database errors
//! answer.

use std::collections::HashMap;

use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls, Statement, Transaction};
use tracing::{info, warn};

use jrs_stream::StanzaErrorCondition;
use jrs_xdb::Refusal;

/// The schema, one step per version; a step runs once, in the transaction that records
/// its version in `schema_version`. Add steps, never edit released ones.
pub const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        r#"
    -- Fragments (get/set), by owner: host and user ('' for the host's own data).
    CREATE TABLE fragments (
        host     text NOT NULL,
        node     text NOT NULL,
        ns       text NOT NULL,
        content  bytea NOT NULL,
        elements integer NOT NULL,          -- top-level elements, for append max-items
        PRIMARY KEY (host, node, ns)
    );
    -- Elements appended after a fragment (offline messages): an append is an insert.
    CREATE TABLE list_items (
        host     text NOT NULL,
        node     text NOT NULL,
        ns       text NOT NULL,
        seq      bigserial,
        content  bytea NOT NULL,
        elements integer NOT NULL,
        PRIMARY KEY (host, node, ns, seq)
    );
    -- Message archives: next sequence number and last item, kept when retention
    -- removed every item (ids must keep increasing).
    CREATE TABLE archives (
        archive   bigserial PRIMARY KEY,
        host      text NOT NULL,
        node      text NOT NULL,
        ns        text NOT NULL,
        next_seq  bigint NOT NULL DEFAULT 0,
        last_id   text COLLATE "C",
        last_time bigint,
        UNIQUE (host, node, ns)
    );
    CREATE TABLE archive_items (
        archive   bigint NOT NULL REFERENCES archives ON DELETE CASCADE,
        seq       bigint NOT NULL,
        id        text COLLATE "C" NOT NULL,
        time      bigint NOT NULL,
        with_full text NOT NULL,
        with_bare text NOT NULL,
        stanza    bytea NOT NULL,
        PRIMARY KEY (archive, seq)
    );
    CREATE UNIQUE INDEX archive_items_by_id ON archive_items (archive, id);
    CREATE INDEX archive_items_by_time ON archive_items (archive, time);
    CREATE INDEX archive_items_by_with ON archive_items (archive, with_bare, seq);
    "#,
    ),
    (
        2,
        r#"
    -- No foreign key from items to their archive: its check (a query per inserted
    -- item) was a third of the database's time in appends. xdb-pg inserts items
    -- with the archive's row locked, and deletes them with it (archive::delete).
    ALTER TABLE archive_items DROP CONSTRAINT archive_items_archive_fkey;
    -- Items numbered by bare `with` (1, 2, ... in append order), kept in the with-index:
    -- a count of one contact's items is then two index reads, not a scan of them.
    ALTER TABLE archive_items ADD COLUMN with_seq bigint;
    UPDATE archive_items i SET with_seq = n.k
      FROM (SELECT archive, seq,
                   row_number() OVER (PARTITION BY archive, with_bare ORDER BY seq) AS k
              FROM archive_items) n
     WHERE i.archive = n.archive AND i.seq = n.seq;
    ALTER TABLE archive_items ALTER COLUMN with_seq SET NOT NULL;
    DROP INDEX archive_items_by_with;
    CREATE INDEX archive_items_by_with ON archive_items (archive, with_bare, seq) INCLUDE (with_seq);
    "#,
    ),
];

/// One connection and the statements prepared on it.
pub struct Conn {
    pub client: Client,
    statements: HashMap<String, Statement>,
}

pub async fn connect(config: &tokio_postgres::Config) -> Result<Conn, tokio_postgres::Error> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            warn!("database connection lost: {e}");
        }
    });
    Ok(Conn {
        client,
        statements: HashMap::new(),
    })
}

impl Conn {
    /// A transaction and the statement cache, borrowed apart.
    pub async fn begin(&mut self) -> Result<Tx<'_>, Refusal> {
        let tx = self.client.transaction().await.map_err(refusal)?;
        Ok(Tx {
            tx,
            statements: &mut self.statements,
        })
    }
}

/// A transaction that prepares each statement once per connection.
pub struct Tx<'a> {
    pub tx: Transaction<'a>,
    statements: &'a mut HashMap<String, Statement>,
}

impl Tx<'_> {
    pub async fn statement(&mut self, sql: &str) -> Result<Statement, Refusal> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.tx.prepare(sql).await.map_err(refusal)?;
        // Archive queries make a bounded number of shapes; this only guards mistakes.
        if self.statements.len() > 512 {
            self.statements.clear();
        }
        self.statements.insert(sql.to_owned(), s.clone());
        Ok(s)
    }

    pub async fn query(
        &mut self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, Refusal> {
        let s = self.statement(sql).await?;
        self.tx.query(&s, params).await.map_err(refusal)
    }

    pub async fn query_opt(
        &mut self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Option<tokio_postgres::Row>, Refusal> {
        let s = self.statement(sql).await?;
        self.tx.query_opt(&s, params).await.map_err(refusal)
    }

    pub async fn execute(
        &mut self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64, Refusal> {
        let s = self.statement(sql).await?;
        self.tx.execute(&s, params).await.map_err(refusal)
    }

    /// Lets this transaction's commit return before its WAL is on disk
    /// (`synchronous_commit = off` for it alone): PostgreSQL writes it within three
    /// `wal_writer_delay`s (0.6 s by default). For `flush='later'` requests only.
    pub async fn flush_later(&mut self) -> Result<(), Refusal> {
        self.tx
            .batch_execute("SET LOCAL synchronous_commit TO OFF")
            .await
            .map_err(refusal)
    }

    /// Makes the request's writes durable; only then may it be answered.
    pub async fn commit(self) -> Result<(), Refusal> {
        self.tx.commit().await.map_err(refusal)
    }
}

/// Creates or migrates the schema (in one transaction, so two instances starting at
/// once do not both migrate).
pub async fn migrate(config: &tokio_postgres::Config) -> anyhow::Result<()> {
    let mut conn = connect(config).await?;
    let tx = conn.client.transaction().await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL);
         LOCK TABLE schema_version IN EXCLUSIVE MODE;",
    )
    .await?;
    let current: i32 = tx
        .query_one("SELECT COALESCE(MAX(version), 0) FROM schema_version", &[])
        .await?
        .get(0);
    let latest = MIGRATIONS.last().map_or(0, |(v, _)| *v);
    if current > latest {
        anyhow::bail!(
            "the database schema is version {current}, newer than this xdb-pg knows ({latest}): upgrade xdb-pg"
        );
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        info!(version, "migrating the database schema");
        tx.batch_execute(sql).await?;
    }
    if latest > current {
        tx.execute("DELETE FROM schema_version", &[]).await?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES ($1)",
            &[&latest],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// What a database error answers: `service-unavailable` when the database cannot be
/// reached (the worker reconnects for the next request), else `internal-server-error`.
/// Either way the request's transaction did not commit.
pub fn refusal(e: tokio_postgres::Error) -> Refusal {
    let unavailable = e.is_closed()
        || match e.code() {
            Some(code) => {
                code.code().starts_with("08") // connection exception
                    || code.code().starts_with("53") // insufficient resources
                    || *code == SqlState::ADMIN_SHUTDOWN
                    || *code == SqlState::CRASH_SHUTDOWN
                    || *code == SqlState::CANNOT_CONNECT_NOW
                    || *code == SqlState::READ_ONLY_SQL_TRANSACTION
            }
            // No answer from the server: an I/O error or a timeout.
            None => e.as_db_error().is_none(),
        };
    if unavailable {
        unavailable_refusal(format!("the database is unavailable: {e}"))
    } else {
        tracing::error!("database error: {e}");
        Refusal::new(
            StanzaErrorCondition::InternalServerError,
            format!("database error: {e}"),
        )
    }
}

pub fn unavailable_refusal(text: String) -> Refusal {
    tracing::error!("{text}");
    Refusal::new(StanzaErrorCondition::ServiceUnavailable, text)
}
