//! The scheduler's query table: every query's submission, state and outcome, and the finished
//! stages of running split queries (checkpoints), in SQLite at `scheduler.database_path`. A
//! scheduler that restarts reads it back: finished queries are still served, queued ones run,
//! running ones resume from their checkpoints (or fail, saying how to turn checkpoints on).
//!
//! One scheduler per file: the database is opened in SQLite's exclusive locking mode, so a
//! second scheduler given the same path stops at start with an error naming the key.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use polars_node_engine::stage_graph::StageGraph;
use prost::Message as _;
use rusqlite::{Connection, OptionalExtension, params};
use uuid::Uuid;

use crate::proto::{TaskSuccess, WorkerInfo};
use crate::scheduler::query::{QueryOutcome, Status, Submission};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS queries (
    id TEXT PRIMARY KEY,
    submitted_at_ms INTEGER NOT NULL,
    plan BLOB NOT NULL,
    -- Submission without its plan, MessagePack.
    submission BLOB NOT NULL,
    -- engine::Target, MessagePack.
    target BLOB NOT NULL,
    reads_files INTEGER NOT NULL,
    status INTEGER NOT NULL,
    -- QueryOutcome, MessagePack.
    outcome BLOB NOT NULL,
    -- WorkerInfo (protobuf) of the worker that holds the result.
    worker BLOB,
    -- Every worker that ran a task of the query: a MessagePack list of WorkerInfo (protobuf).
    participants BLOB NOT NULL
);
-- The stage graph of a checkpointed split query and the workers it was dealt to.
CREATE TABLE IF NOT EXISTS checkpoint_graphs (
    query_id TEXT PRIMARY KEY,
    graph BLOB NOT NULL,
    workers BLOB NOT NULL
);
-- The output of each finished task of a checkpointed split query.
CREATE TABLE IF NOT EXISTS checkpoint_outputs (
    query_id TEXT NOT NULL,
    stage INTEGER NOT NULL,
    task INTEGER NOT NULL,
    worker BLOB NOT NULL,
    success BLOB NOT NULL,
    PRIMARY KEY (query_id, stage, task)
);
";

/// A query as the table keeps it.
pub struct StoredQuery {
    pub id: Uuid,
    pub submitted_at: SystemTime,
    pub submission: Submission,
    pub target: polars_node_engine::Target,
    pub reads_files: bool,
    pub status: Status,
    pub outcome: QueryOutcome,
    pub worker: Option<WorkerInfo>,
    pub participants: Vec<WorkerInfo>,
}

/// The finished stages of a split query, as recorded.
pub struct Checkpoint {
    pub graph: StageGraph,
    pub workers: Vec<String>,
    /// (stage, task, the worker that holds the output, what the task reported).
    pub outputs: Vec<(usize, usize, WorkerInfo, TaskSuccess)>,
}

#[derive(Clone)]
pub struct QueryStore {
    db: Arc<Mutex<Connection>>,
    path: PathBuf,
}

fn millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or_default()
}

fn pack<T: serde::Serialize>(value: &T) -> Vec<u8> {
    rmp_serde::to_vec(value).expect("scheduler records serialize")
}

impl QueryStore {
    /// Opens (creating it and its directory) the query table at `path`, for this scheduler
    /// alone.
    pub fn open(path: &Path) -> Result<QueryStore, String> {
        let problem = |why: String| {
            format!("cannot open the scheduler's query table {} (scheduler.database_path): {why}", path.display())
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| problem(format!("cannot create {}: {e}", dir.display())))?;
        }
        let db = Connection::open(path).map_err(|e| problem(e.to_string()))?;
        // Exclusive: the lock is taken by the first statement and kept while this scheduler runs.
        db.busy_timeout(Duration::from_millis(200)).map_err(|e| problem(e.to_string()))?;
        let prepared = db
            .execute_batch("PRAGMA locking_mode = EXCLUSIVE; PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")
            .and_then(|()| db.execute_batch(SCHEMA));
        match prepared {
            Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::DatabaseBusy => {
                return Err(problem(
                    "another scheduler is using it: give each scheduler its own scheduler.database_path".into(),
                ));
            }
            Err(e) => return Err(problem(e.to_string())),
            Ok(()) => {}
        }
        Ok(QueryStore { db: Arc::new(Mutex::new(db)), path: path.to_path_buf() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records a new query (its plan is written once, here).
    pub fn insert(&self, q: &StoredQuery, plan: &[u8]) -> rusqlite::Result<()> {
        let db = self.db.lock().unwrap();
        db.execute(
            "INSERT OR REPLACE INTO queries (id, submitted_at_ms, plan, submission, target, reads_files, status, outcome, worker, participants) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                q.id.to_string(),
                millis(q.submitted_at),
                plan,
                pack(&q.submission),
                pack(&q.target),
                q.reads_files,
                q.status as i64,
                pack(&q.outcome),
                q.worker.as_ref().map(|w| w.encode_to_vec()),
                pack(&q.participants.iter().map(|w| w.encode_to_vec()).collect::<Vec<_>>()),
            ],
        )?;
        Ok(())
    }

    /// Records a query's state, outcome and workers as they are now.
    pub fn update(
        &self,
        id: Uuid,
        status: Status,
        outcome: &QueryOutcome,
        worker: Option<&WorkerInfo>,
        participants: &[WorkerInfo],
    ) -> rusqlite::Result<()> {
        let db = self.db.lock().unwrap();
        db.execute(
            "UPDATE queries SET status = ?2, outcome = ?3, worker = ?4, participants = ?5 WHERE id = ?1",
            params![
                id.to_string(),
                status as i64,
                pack(outcome),
                worker.map(|w| w.encode_to_vec()),
                pack(&participants.iter().map(|w| w.encode_to_vec()).collect::<Vec<_>>()),
            ],
        )?;
        if status.is_terminal() {
            db.execute("DELETE FROM checkpoint_outputs WHERE query_id = ?1", params![id.to_string()])?;
            db.execute("DELETE FROM checkpoint_graphs WHERE query_id = ?1", params![id.to_string()])?;
        }
        Ok(())
    }

    /// The queued and running queries of the table, oldest first, with their plans. A
    /// record this version cannot
    /// read is skipped with a warning (it is not deleted). Checkpoints of queries that ended
    /// are dropped on the way.
    pub fn load(&self) -> rusqlite::Result<Vec<(StoredQuery, Vec<u8>)>> {
        let db = self.db.lock().unwrap();
        let running = format!(
            "SELECT id FROM queries WHERE status IN ({}, {})",
            Status::Scheduled as i64,
            Status::Running as i64
        );
        db.execute(&format!("DELETE FROM checkpoint_outputs WHERE query_id NOT IN ({running})"), [])?;
        db.execute(&format!("DELETE FROM checkpoint_graphs WHERE query_id NOT IN ({running})"), [])?;
        Self::select(&db, &format!("WHERE id IN ({running})"), [])
    }

    /// How many finished queries the table holds.
    pub fn finished(&self) -> rusqlite::Result<u64> {
        let db = self.db.lock().unwrap();
        let sql = format!(
            "SELECT COUNT(*) FROM queries WHERE status NOT IN ({}, {})",
            Status::Scheduled as i64,
            Status::Running as i64
        );
        db.query_row(&sql, [], |row| row.get::<_, i64>(0)).map(|n| n.max(0) as u64)
    }

    /// One query of the table (its plan empty when it is finished).
    pub fn load_one(&self, id: Uuid) -> rusqlite::Result<Option<StoredQuery>> {
        let db = self.db.lock().unwrap();
        Ok(Self::select(&db, "WHERE id = ?1", [id.to_string()])?.into_iter().next().map(|(q, _)| q))
    }

    fn select(
        db: &Connection,
        filter: &str,
        args: impl rusqlite::Params,
    ) -> rusqlite::Result<Vec<(StoredQuery, Vec<u8>)>> {
        // Plans of finished queries stay on disk (`plan_of` reads one when asked).
        let mut statement = db.prepare(&format!(
            "SELECT id, submitted_at_ms, CASE WHEN status IN ({}, {}) THEN plan ELSE x'' END, submission, target, \
             reads_files, status, outcome, worker, participants FROM queries {filter} ORDER BY submitted_at_ms",
            Status::Scheduled as i64,
            Status::Running as i64
        ))?;
        let rows = statement.query_map(args, |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, i64>(1)?,
                row.get::<_, Vec<u8>>(2)?,
                row.get::<_, Vec<u8>>(3)?,
                row.get::<_, Vec<u8>>(4)?,
                row.get::<_, bool>(5)?,
                row.get::<_, i64>(6)?,
                row.get::<_, Vec<u8>>(7)?,
                row.get::<_, Option<Vec<u8>>>(8)?,
                row.get::<_, Vec<u8>>(9)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, at, plan, submission, target, reads_files, status, outcome, worker, participants) = row?;
            let read = || -> Result<StoredQuery, String> {
                let participants: Vec<Vec<u8>> = rmp_serde::from_slice(&participants).map_err(|e| e.to_string())?;
                Ok(StoredQuery {
                    id: Uuid::parse_str(&id).map_err(|e| e.to_string())?,
                    submitted_at: UNIX_EPOCH + Duration::from_millis(at.max(0) as u64),
                    submission: rmp_serde::from_slice(&submission).map_err(|e| e.to_string())?,
                    target: rmp_serde::from_slice(&target).map_err(|e| e.to_string())?,
                    reads_files,
                    status: Status::from_number(status).ok_or_else(|| format!("unknown state {status}"))?,
                    outcome: rmp_serde::from_slice(&outcome).map_err(|e| e.to_string())?,
                    worker: worker.map(|w| WorkerInfo::decode(w.as_slice())).transpose().map_err(|e| e.to_string())?,
                    participants: participants
                        .iter()
                        .map(|w| WorkerInfo::decode(w.as_slice()))
                        .collect::<Result<_, _>>()
                        .map_err(|e| e.to_string())?,
                })
            };
            match read() {
                Ok(q) => out.push((q, plan)),
                Err(e) => tracing::warn!(query = %id, "cannot read this query from the query table: {e}"),
            }
        }
        Ok(out)
    }

    /// A query's plan.
    pub fn plan_of(&self, id: Uuid) -> rusqlite::Result<Option<Vec<u8>>> {
        let db = self.db.lock().unwrap();
        db.query_row("SELECT plan FROM queries WHERE id = ?1", params![id.to_string()], |row| row.get(0)).optional()
    }

    /// Forgets terminal queries submitted before `before`; returns their ids.
    pub fn prune(&self, before: SystemTime) -> rusqlite::Result<Vec<Uuid>> {
        let db = self.db.lock().unwrap();
        let terminal = [Status::Success as i64, Status::Failed as i64, Status::Canceled as i64];
        let mut statement =
            db.prepare("DELETE FROM queries WHERE submitted_at_ms < ?1 AND status IN (?2, ?3, ?4) RETURNING id")?;
        let ids = statement
            .query_map(params![millis(before), terminal[0], terminal[1], terminal[2]], |row| row.get::<_, String>(0))?
            .filter_map(|id| id.ok().and_then(|id| Uuid::parse_str(&id).ok()))
            .collect();
        Ok(ids)
    }

    /// Records finished tasks of a split query (and its graph, the first time).
    pub fn checkpoint(
        &self,
        id: Uuid,
        graph: Option<(&StageGraph, &[String])>,
        outputs: &[(usize, usize, WorkerInfo, TaskSuccess)],
    ) -> rusqlite::Result<()> {
        let mut db = self.db.lock().unwrap();
        let tx = db.transaction()?;
        if let Some((graph, workers)) = graph {
            tx.execute(
                "INSERT OR REPLACE INTO checkpoint_graphs (query_id, graph, workers) \
                 SELECT ?1, ?2, ?3 WHERE EXISTS (SELECT 1 FROM queries WHERE id = ?1 AND status IN (?4, ?5))",
                params![id.to_string(), pack(graph), pack(&workers), Status::Scheduled as i64, Status::Running as i64],
            )?;
        }
        // Only for a query still running: one that ended meanwhile keeps no checkpoint.
        for (stage, task, worker, success) in outputs {
            tx.execute(
                "INSERT OR REPLACE INTO checkpoint_outputs (query_id, stage, task, worker, success) \
                 SELECT ?1, ?2, ?3, ?4, ?5 WHERE EXISTS (SELECT 1 FROM queries WHERE id = ?1 AND status IN (?6, ?7))",
                params![
                    id.to_string(),
                    *stage as i64,
                    *task as i64,
                    worker.encode_to_vec(),
                    success.encode_to_vec(),
                    Status::Scheduled as i64,
                    Status::Running as i64
                ],
            )?;
        }
        tx.commit()
    }

    /// The recorded stages of a split query, if any were.
    pub fn checkpoint_of(&self, id: Uuid) -> Result<Option<Checkpoint>, String> {
        let db = self.db.lock().unwrap();
        let graph: Option<(Vec<u8>, Vec<u8>)> = db
            .query_row(
                "SELECT graph, workers FROM checkpoint_graphs WHERE query_id = ?1",
                params![id.to_string()],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()
            .map_err(|e| e.to_string())?;
        let Some((graph, workers)) = graph else {
            return Ok(None);
        };
        let mut statement = db
            .prepare("SELECT stage, task, worker, success FROM checkpoint_outputs WHERE query_id = ?1")
            .map_err(|e| e.to_string())?;
        let rows = statement
            .query_map(params![id.to_string()], |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?, row.get::<_, Vec<u8>>(2)?, row.get::<_, Vec<u8>>(3)?))
            })
            .map_err(|e| e.to_string())?;
        let mut outputs = Vec::new();
        for row in rows {
            let (stage, task, worker, success) = row.map_err(|e| e.to_string())?;
            outputs.push((
                stage as usize,
                task as usize,
                WorkerInfo::decode(worker.as_slice()).map_err(|e| e.to_string())?,
                TaskSuccess::decode(success.as_slice()).map_err(|e| e.to_string())?,
            ));
        }
        Ok(Some(Checkpoint {
            graph: rmp_serde::from_slice(&graph).map_err(|e| e.to_string())?,
            workers: rmp_serde::from_slice(&workers).map_err(|e| e.to_string())?,
            outputs,
        }))
    }
}

/// Finished tasks of running split queries, written to the query table every period
/// (`scheduler.checkpoint.period`) rather than as each task ends.
pub struct Checkpointer {
    store: QueryStore,
    pending: Mutex<std::collections::HashMap<Uuid, Pending>>,
}

#[derive(Default)]
struct Pending {
    graph: Option<(StageGraph, Vec<String>)>,
    outputs: Vec<(usize, usize, WorkerInfo, TaskSuccess)>,
}

impl Checkpointer {
    pub fn new(store: QueryStore) -> Checkpointer {
        Checkpointer { store, pending: Mutex::default() }
    }

    /// The query's stage graph and workers, to be written with its first outputs.
    pub fn graph(&self, id: Uuid, graph: &StageGraph, workers: &[String]) {
        self.pending.lock().unwrap().entry(id).or_default().graph = Some((graph.clone(), workers.to_vec()));
    }

    /// A task of a stage that is not the result finished.
    pub fn task_done(&self, id: Uuid, stage: usize, task: usize, worker: &WorkerInfo, success: &TaskSuccess) {
        let mut pending = self.pending.lock().unwrap();
        pending.entry(id).or_default().outputs.push((stage, task, worker.clone(), success.clone()));
    }

    /// The query ended: nothing more of it is written (its rows go with its final state).
    pub fn forget(&self, id: Uuid) {
        self.pending.lock().unwrap().remove(&id);
    }

    /// Writes what finished since the last time (holding the pending set while it writes, so
    /// that a query forgotten meanwhile is not written after its end).
    pub fn flush(&self) -> usize {
        let mut pending = self.pending.lock().unwrap();
        let mut written = 0;
        for (id, p) in pending.drain() {
            if p.outputs.is_empty() && p.graph.is_none() {
                continue;
            }
            let graph = p.graph.as_ref().map(|(g, w)| (g, w.as_slice()));
            match self.store.checkpoint(id, graph, &p.outputs) {
                Ok(()) => written += p.outputs.len(),
                Err(e) => tracing::warn!(query = %id, "cannot write the query's checkpoint: {e}"),
            }
        }
        written
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::query::StageStats;

    fn query(status: Status, at: SystemTime) -> StoredQuery {
        StoredQuery {
            id: Uuid::new_v4(),
            submitted_at: at,
            submission: Submission {
                engine: crate::proto::EngineChoice::Streaming,
                optimization_flags: Some(7),
                n_retries: 2,
                plan_only: None,
                user: Some("ana".into()),
                distribution: None,
            },
            target: polars_node_engine::Target::Flight,
            reads_files: true,
            status,
            outcome: QueryOutcome::default(),
            worker: None,
            participants: Vec::new(),
        }
    }

    #[test]
    fn queries_and_checkpoints_survive_reopening_and_terminal_ones_lose_their_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/queries.db");
        let now = SystemTime::now();
        let (running, done) = (query(Status::Running, now), query(Status::Scheduled, now - Duration::from_secs(3600)));
        let worker = WorkerInfo { instance_id: "w1".into(), task_addr: "127.0.0.1:1".into(), ..Default::default() };
        let success = TaskSuccess { files: vec!["/shuffle/0-0/0.ipc".into()], n_rows: 5, ..Default::default() };
        {
            let store = QueryStore::open(&path).unwrap();
            store.insert(&running, b"plan one").unwrap();
            store.insert(&done, b"plan two").unwrap();
            let graph = StageGraph { stages: Vec::new(), logical_plan: "PLAN".into() };
            let workers = vec!["w1".to_string()];
            for id in [running.id, done.id] {
                store.checkpoint(id, Some((&graph, &workers)), &[(0, 1, worker.clone(), success.clone())]).unwrap();
            }
            let outcome = QueryOutcome {
                n_rows: 9,
                stages: vec![StageStats { label: "whole".into(), ..Default::default() }],
                ..Default::default()
            };
            store.update(done.id, Status::Success, &outcome, Some(&worker), std::slice::from_ref(&worker)).unwrap();
        }
        let store = QueryStore::open(&path).unwrap();
        // A restart reads back the unfinished queries with their plans; finished ones when asked.
        let loaded = store.load().unwrap();
        let ids: Vec<Uuid> = loaded.iter().map(|(q, _)| q.id).collect();
        assert_eq!(ids, vec![running.id]);
        assert_eq!(store.finished().unwrap(), 1);
        assert_eq!(loaded[0].1, b"plan one", "a running query's plan comes with it");
        let q = &store.load_one(done.id).unwrap().unwrap();
        assert_eq!((q.status, q.outcome.n_rows), (Status::Success, 9));
        assert_eq!(store.plan_of(done.id).unwrap().unwrap(), b"plan two");
        assert!(store.load_one(Uuid::new_v4()).unwrap().is_none());
        assert_eq!(q.worker.as_ref().unwrap().task_addr, "127.0.0.1:1");
        assert_eq!(q.submission.user.as_deref(), Some("ana"));
        assert_eq!(q.submission.engine, crate::proto::EngineChoice::Streaming);
        assert_eq!(q.target, polars_node_engine::Target::Flight);
        let kept = store.checkpoint_of(running.id).unwrap().expect("a running query keeps its checkpoint");
        assert_eq!((kept.graph.logical_plan.as_str(), kept.outputs.len()), ("PLAN", 1));
        assert_eq!((kept.outputs[0].1, kept.outputs[0].3.n_rows), (1, 5));
        assert!(store.checkpoint_of(done.id).unwrap().is_none(), "a finished query's checkpoint is dropped");
        // Pruning forgets old terminal queries only.
        assert_eq!(store.prune(now - Duration::from_secs(60)).unwrap(), vec![done.id]);
        assert!(store.load_one(done.id).unwrap().is_none());
        assert_eq!(store.load().unwrap().len(), 1);
    }

    #[test]
    fn a_second_scheduler_on_the_same_file_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queries.db");
        let _first = QueryStore::open(&path).unwrap();
        let second = QueryStore::open(&path).err().expect("the file is taken");
        assert!(
            second.contains("another scheduler is using it") && second.contains("scheduler.database_path"),
            "{second}"
        );
    }
}
