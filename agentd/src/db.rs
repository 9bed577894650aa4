//! agentd's persistent state: an embedded, transactional database (redb) in the state dir.
//!
//! Records are JSON values under string keys, one table per kind. Every write is one redb
//! transaction: it is durable once `put`/`delete` returns, and a crash leaves either the old or
//! the new value, never a torn one.
//!
//! A failed write (a full disk) fails its caller, who then changes nothing in memory: what the
//! API shows is what is on disk. After an I/O error redb refuses every later transaction
//! ("previous I/O error"), so the handle is reopened; if that fails too, agentd exits for its
//! supervisor to restart it rather than answer from a state it cannot save.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Sandboxes by id ([`crate::sandbox::SandboxRecord`]).
pub const SANDBOXES: Table = Table(TableDefinition::new("sandboxes"));

/// Tasks by id ([`crate::task::TaskRecord`]).
pub const TASKS: Table = Table(TableDefinition::new("tasks"));

/// Warm pools' sizes by image ([`crate::sandbox::pool::PoolSize`]).
pub const POOLS: Table = Table(TableDefinition::new("pools"));

/// The LLM gateway's usage by UTC day ([`crate::gateway::spend::DayUsage`]).
pub const LLM_DAYS: Table = Table(TableDefinition::new("llm_days"));

/// Every table: `open` makes them, so that reading one never meets a missing table (which
/// redb reports as an error, and an error reopens the database).
const TABLES: [Table; 4] = [SANDBOXES, TASKS, POOLS, LLM_DAYS];

/// A table of JSON records keyed by id.
#[derive(Clone, Copy)]
pub struct Table(TableDefinition<'static, &'static str, &'static [u8]>);

/// Errors of the state database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The database file could not be opened or created.
    #[error("failed to open the state database {path}")]
    Open {
        /// The database file.
        path: String,
        /// Why.
        #[source]
        source: redb::DatabaseError,
    },
    /// A transaction failed.
    #[error("state database: {0}")]
    Redb(String),
    /// The disk is full: nothing was written.
    #[error("state database: the disk is full (nothing was saved): {0}")]
    NoSpace(String),
    /// A record could not be (de)serialized.
    #[error("state database record {key:?}")]
    Json {
        /// The record's key.
        key: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

type Result<T> = std::result::Result<T, DbError>;

fn redb_err(e: impl std::fmt::Display) -> DbError {
    let text = e.to_string();
    if text.contains("No space left")
        || text.contains("os error 28")
        || text.contains("quota exceeded")
    {
        DbError::NoSpace(text)
    } else {
        DbError::Redb(text)
    }
}

/// The state database.
pub struct Db {
    /// The open database; replaced after an I/O error. A std RwLock: held for one
    /// transaction, never across an await.
    db: std::sync::RwLock<Database>,
    /// Its file, for reopening.
    path: std::path::PathBuf,
}

impl Db {
    /// Runs `f` on the database; after an error of the storage, reopens it (redb refuses
    /// everything after one I/O error). The error is returned either way.
    fn with<T>(&self, f: impl Fn(&Database) -> Result<T>) -> Result<T> {
        let result = f(&self.db.read().expect("db lock"));
        if let Err(DbError::Redb(_) | DbError::NoSpace(_)) = &result {
            self.reopen();
        }
        result
    }

    fn reopen(&self) {
        let mut db = self.db.write().expect("db lock");
        // A panic of the storage's code here (seen once on a full disk, its message lost with
        // the log on that disk) would poison the lock, and every later request would fail
        // while agentd lives on: exit for a restart instead, as when the reopen fails.
        let reopened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // The old handle must be closed before the file can be opened again.
            let placeholder = Database::builder()
                .create_with_backend(redb::backends::InMemoryBackend::new())
                .map_err(|e| e.to_string())?;
            drop(std::mem::replace(&mut *db, placeholder));
            Database::create(&self.path).map_err(|e| e.to_string())
        }));
        match reopened {
            Ok(Ok(d)) => {
                *db = d;
                tracing::warn!(path = %self.path.display(), "reopened the state database after an I/O error");
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, path = %self.path.display(), "cannot reopen the state database; exiting for a restart");
                std::process::exit(75);
            }
            Err(_) => {
                tracing::error!(path = %self.path.display(), "reopening the state database panicked; exiting for a restart");
                std::process::exit(75);
            }
        }
    }

    /// Opens (or creates) the database at `path` and makes sure every table exists.
    pub fn open(path: &Path) -> Result<Self> {
        let db = Database::create(path).map_err(|source| DbError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let tx = db.begin_write().map_err(redb_err)?;
        // Every table; more kinds join this list.
        for t in TABLES {
            tx.open_table(t.0).map_err(redb_err)?;
        }
        tx.commit().map_err(redb_err)?;
        Ok(Db {
            db: std::sync::RwLock::new(db),
            path: path.to_path_buf(),
        })
    }

    /// Writes `value` under `key`, replacing what was there.
    pub fn put<T: Serialize>(&self, table: Table, key: &str, value: &T) -> Result<()> {
        let bytes = serde_json::to_vec(value).map_err(|source| DbError::Json {
            key: key.into(),
            source,
        })?;
        self.with(|db| {
            let tx = db.begin_write().map_err(redb_err)?;
            {
                let mut t = tx.open_table(table.0).map_err(redb_err)?;
                t.insert(key, bytes.as_slice()).map_err(redb_err)?;
            }
            tx.commit().map_err(redb_err)
        })
    }

    /// Makes every earlier write durable (those of [`Db::put_lazy`] too): an empty durable
    /// transaction, which redb commits with everything before it.
    pub fn sync(&self) -> Result<()> {
        self.with(|db| {
            db.begin_write()
                .map_err(redb_err)?
                .commit()
                .map_err(redb_err)
        })
    }

    /// Writes `value` under `key` without waiting for the disk: a crash may lose it, but not
    /// what an earlier durable write made durable. For counters that change often.
    pub fn put_lazy<T: Serialize>(&self, table: Table, key: &str, value: &T) -> Result<()> {
        let bytes = serde_json::to_vec(value).map_err(|source| DbError::Json {
            key: key.into(),
            source,
        })?;
        self.with(|db| {
            let mut tx = db.begin_write().map_err(redb_err)?;
            tx.set_durability(redb::Durability::None)
                .map_err(redb_err)?;
            {
                let mut t = tx.open_table(table.0).map_err(redb_err)?;
                t.insert(key, bytes.as_slice()).map_err(redb_err)?;
            }
            tx.commit().map_err(redb_err)
        })
    }

    /// Removes `key`; removing a missing key is not an error.
    pub fn delete(&self, table: Table, key: &str) -> Result<()> {
        self.with(|db| {
            let tx = db.begin_write().map_err(redb_err)?;
            {
                let mut t = tx.open_table(table.0).map_err(redb_err)?;
                t.remove(key).map_err(redb_err)?;
            }
            tx.commit().map_err(redb_err)
        })
    }

    /// The record under `key`.
    pub fn get<T: DeserializeOwned>(&self, table: Table, key: &str) -> Result<Option<T>> {
        self.with(|db| {
            let tx = db.begin_read().map_err(redb_err)?;
            let t = tx.open_table(table.0).map_err(redb_err)?;
            let Some(v) = t.get(key).map_err(redb_err)? else {
                return Ok(None);
            };
            serde_json::from_slice(v.value())
                .map(Some)
                .map_err(|source| DbError::Json {
                    key: key.into(),
                    source,
                })
        })
    }

    /// Every record of `table`, in key order.
    pub fn list<T: DeserializeOwned>(&self, table: Table) -> Result<Vec<T>> {
        Ok(self.entries(table)?.into_iter().map(|(_, v)| v).collect())
    }

    /// Every key and record of `table`, in key order.
    pub fn entries<T: DeserializeOwned>(&self, table: Table) -> Result<Vec<(String, T)>> {
        self.with(|db| {
            let tx = db.begin_read().map_err(redb_err)?;
            let t = tx.open_table(table.0).map_err(redb_err)?;
            let mut out = Vec::new();
            for item in t.iter().map_err(redb_err)? {
                let (k, v) = item.map_err(redb_err)?;
                let value = serde_json::from_slice(v.value()).map_err(|source| DbError::Json {
                    key: k.value().to_string(),
                    source,
                })?;
                out.push((k.value().to_string(), value));
            }
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_a_new_database_has_every_table() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("state.redb")).unwrap();
        for t in TABLES {
            assert!(db.get::<serde_json::Value>(t, "none").unwrap().is_none());
        }
        // Read at every start, before any request was counted.
        assert_eq!(crate::gateway::spend::Daily::load(&db).today().tokens, 0);
    }

    #[test]
    fn test_put_get_list_delete_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        {
            let db = Db::open(&path).unwrap();
            db.put(SANDBOXES, "b", &serde_json::json!({"n": 2}))
                .unwrap();
            db.put(SANDBOXES, "a", &serde_json::json!({"n": 1}))
                .unwrap();
            db.delete(SANDBOXES, "missing").unwrap();
        }
        let db = Db::open(&path).unwrap();
        let all: Vec<serde_json::Value> = db.list(SANDBOXES).unwrap();
        assert_eq!(
            all,
            vec![serde_json::json!({"n": 1}), serde_json::json!({"n": 2})]
        );
        db.delete(SANDBOXES, "a").unwrap();
        assert!(db
            .get::<serde_json::Value>(SANDBOXES, "a")
            .unwrap()
            .is_none());
        assert_eq!(
            db.get::<serde_json::Value>(SANDBOXES, "b").unwrap(),
            Some(serde_json::json!({"n": 2}))
        );
    }
}
