//! The observatory's SQLite store: spans and metric points, kept across restarts; metrics are
//! bounded in bytes (oldest dropped first).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, params};
use serde::Serialize;

/// Where the database of `cluster_id` lives: the cluster id goes into the file name, so several
/// clusters can share a directory (`data.db` -> `data.polars-onprem.db`).
pub fn database_file(configured: &Path, cluster_id: &str) -> PathBuf {
    let stem = configured.file_stem().and_then(|s| s.to_str()).unwrap_or("data");
    let ext = configured.extension().and_then(|s| s.to_str()).unwrap_or("db");
    configured.with_file_name(format!("{stem}.{cluster_id}.{ext}"))
}

#[derive(Clone)]
pub struct Store {
    db: Arc<Mutex<Connection>>,
    max_metrics_bytes: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SpanRow {
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub name: String,
    pub service: String,
    pub instance: String,
    pub start_ns: i64,
    pub end_ns: i64,
    pub status_code: i32,
    pub status_message: String,
    pub query_id: Option<String>,
    pub attributes: serde_json::Value,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MetricRow {
    pub time_ns: i64,
    pub node: String,
    pub name: String,
    pub value: f64,
    pub attributes: serde_json::Value,
}

/// A query as its spans describe it.
#[derive(Debug, Clone)]
pub struct QuerySeen {
    pub query_id: String,
    pub start_ns: i64,
    pub end_ns: i64,
    pub spans: i64,
    pub failed_spans: i64,
    /// From the scheduler's span of the whole query, once it has arrived.
    pub user: Option<String>,
    pub query_type: Option<String>,
}

impl Store {
    pub fn open(path: &Path, max_metrics_bytes: u64) -> rusqlite::Result<Store> {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let db = Connection::open(path)?;
        db.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS spans (
               trace_id TEXT NOT NULL, span_id TEXT NOT NULL, parent_span_id TEXT NOT NULL, name TEXT NOT NULL,
               service TEXT NOT NULL, instance TEXT NOT NULL, start_ns INTEGER NOT NULL, end_ns INTEGER NOT NULL,
               status_code INTEGER NOT NULL, status_message TEXT NOT NULL, query_id TEXT, attributes TEXT NOT NULL,
               PRIMARY KEY (trace_id, span_id));
             CREATE INDEX IF NOT EXISTS spans_by_query ON spans(query_id, start_ns);
             CREATE TABLE IF NOT EXISTS metrics (
               id INTEGER PRIMARY KEY, time_ns INTEGER NOT NULL, node TEXT NOT NULL, name TEXT NOT NULL,
               value REAL NOT NULL, attributes TEXT NOT NULL, bytes INTEGER NOT NULL);
             CREATE INDEX IF NOT EXISTS metrics_by_node ON metrics(node, name, time_ns);",
        )?;
        Ok(Store { db: Arc::new(Mutex::new(db)), max_metrics_bytes })
    }

    pub fn insert_spans(&self, spans: &[SpanRow]) -> rusqlite::Result<()> {
        let mut db = self.db.lock().unwrap();
        let tx = db.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT OR REPLACE INTO spans VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            )?;
            for s in spans {
                stmt.execute(params![
                    s.trace_id,
                    s.span_id,
                    s.parent_span_id,
                    s.name,
                    s.service,
                    s.instance,
                    s.start_ns,
                    s.end_ns,
                    s.status_code,
                    s.status_message,
                    s.query_id,
                    s.attributes.to_string()
                ])?;
            }
        }
        tx.commit()
    }

    /// Stores metric points, then drops the oldest until the stored bytes fit the bound.
    pub fn insert_metrics(&self, points: &[MetricRow]) -> rusqlite::Result<()> {
        let mut db = self.db.lock().unwrap();
        let tx = db.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO metrics (time_ns, node, name, value, attributes, bytes) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for p in points {
                let attributes = p.attributes.to_string();
                // What a row costs: its text plus the fixed-width columns and index entry.
                let bytes = (p.node.len() + p.name.len() + attributes.len() + 40) as i64;
                stmt.execute(params![p.time_ns, p.node, p.name, p.value, attributes, bytes])?;
            }
        }
        let total: i64 = tx.query_row("SELECT COALESCE(SUM(bytes), 0) FROM metrics", [], |r| r.get(0))?;
        if total as u64 > self.max_metrics_bytes {
            let excess = total - self.max_metrics_bytes as i64;
            // Oldest first (ids grow with insertion): delete the shortest prefix covering the excess.
            tx.execute(
                "DELETE FROM metrics WHERE id <= (SELECT id FROM (SELECT id, SUM(bytes) OVER (ORDER BY id) AS run FROM metrics) WHERE run >= ?1 ORDER BY id LIMIT 1)",
                params![excess],
            )?;
        }
        tx.commit()
    }

    /// Writes a consistent copy of the database to `path` (replaced atomically).
    pub fn export_to(&self, path: &Path) -> rusqlite::Result<()> {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = path.with_extension("exporting");
        let _ = std::fs::remove_file(&tmp);
        self.db.lock().unwrap().execute("VACUUM INTO ?1", params![tmp.to_string_lossy()])?;
        std::fs::rename(&tmp, path).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
    }

    pub fn metric_bytes(&self) -> u64 {
        let db = self.db.lock().unwrap();
        db.query_row("SELECT COALESCE(SUM(bytes), 0) FROM metrics", [], |r| r.get::<_, i64>(0)).unwrap_or(0) as u64
    }

    pub fn spans_of_query(&self, query_id: &str) -> rusqlite::Result<Vec<SpanRow>> {
        self.spans("WHERE query_id = ?1 ORDER BY start_ns", params![query_id])
    }

    pub fn recent_spans(&self, limit: u32) -> rusqlite::Result<Vec<SpanRow>> {
        self.spans("ORDER BY start_ns DESC LIMIT ?1", params![limit])
    }

    fn spans(&self, tail: &str, args: impl rusqlite::Params) -> rusqlite::Result<Vec<SpanRow>> {
        let db = self.db.lock().unwrap();
        let mut stmt = db.prepare(&format!(
            "SELECT trace_id, span_id, parent_span_id, name, service, instance, start_ns, end_ns, status_code, status_message, query_id, attributes FROM spans {tail}"
        ))?;
        let rows = stmt.query_map(args, |r| {
            Ok(SpanRow {
                trace_id: r.get(0)?,
                span_id: r.get(1)?,
                parent_span_id: r.get(2)?,
                name: r.get(3)?,
                service: r.get(4)?,
                instance: r.get(5)?,
                start_ns: r.get(6)?,
                end_ns: r.get(7)?,
                status_code: r.get(8)?,
                status_message: r.get(9)?,
                query_id: r.get(10)?,
                attributes: serde_json::from_str(&r.get::<_, String>(11)?).unwrap_or_default(),
            })
        })?;
        rows.collect()
    }

    /// Each query seen in spans, newest first.
    pub fn queries(&self) -> rusqlite::Result<Vec<QuerySeen>> {
        let db = self.db.lock().unwrap();
        let mut stmt = db.prepare(
            "SELECT query_id, MIN(start_ns), MAX(end_ns), COUNT(*), SUM(status_code = 2),
                    NULLIF(MAX(CASE WHEN name = 'query' THEN json_extract(attributes, '$.\"polars.user\"') END), ''),
                    MAX(CASE WHEN name = 'query' THEN json_extract(attributes, '$.\"polars.query_type\"') END)
             FROM spans WHERE query_id IS NOT NULL GROUP BY query_id ORDER BY MIN(start_ns) DESC",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(QuerySeen {
                query_id: r.get(0)?,
                start_ns: r.get(1)?,
                end_ns: r.get(2)?,
                spans: r.get(3)?,
                failed_spans: r.get(4)?,
                user: r.get(5)?,
                query_type: r.get(6)?,
            })
        })?;
        rows.collect()
    }

    pub fn metrics(&self, node: Option<&str>, name: Option<&str>, since_ns: i64) -> rusqlite::Result<Vec<MetricRow>> {
        let db = self.db.lock().unwrap();
        let mut stmt = db.prepare(
            "SELECT time_ns, node, name, value, attributes FROM metrics
             WHERE (?1 IS NULL OR node = ?1) AND (?2 IS NULL OR name = ?2) AND time_ns >= ?3 ORDER BY time_ns",
        )?;
        let rows = stmt.query_map(params![node, name, since_ns], |r| {
            Ok(MetricRow {
                time_ns: r.get(0)?,
                node: r.get(1)?,
                name: r.get(2)?,
                value: r.get(3)?,
                attributes: serde_json::from_str(&r.get::<_, String>(4)?).unwrap_or_default(),
            })
        })?;
        rows.collect()
    }

    /// Nodes that sent metrics, with the time of their latest point.
    pub fn nodes(&self) -> rusqlite::Result<Vec<(String, i64)>> {
        let db = self.db.lock().unwrap();
        let mut stmt = db.prepare("SELECT node, MAX(time_ns) FROM metrics GROUP BY node ORDER BY node")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect()
    }

    /// The latest value of every metric whose name starts with `prefix`, per node and name
    /// (summed over attribute sets at that time, as counters with labels arrive).
    pub fn latest(&self, prefix: &str) -> rusqlite::Result<Vec<(String, String, f64)>> {
        let db = self.db.lock().unwrap();
        let mut stmt = db.prepare(
            "SELECT m.node, m.name, SUM(m.value) FROM metrics m
             JOIN (SELECT node, name, MAX(time_ns) AS t FROM metrics WHERE substr(name, 1, length(?1)) = ?1
                   GROUP BY node, name) l ON m.node = l.node AND m.name = l.name AND m.time_ns = l.t
             GROUP BY m.node, m.name ORDER BY m.node, m.name",
        )?;
        let rows = stmt.query_map(params![prefix], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        rows.collect()
    }

    pub fn counts(&self) -> (i64, i64) {
        let db = self.db.lock().unwrap();
        let spans = db.query_row("SELECT COUNT(*) FROM spans", [], |r| r.get(0)).unwrap_or(0);
        let metrics = db.query_row("SELECT COUNT(*) FROM metrics", [], |r| r.get(0)).unwrap_or(0);
        (spans, metrics)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(i: i64) -> MetricRow {
        MetricRow {
            time_ns: i,
            node: "worker-1".into(),
            name: "cpu".into(),
            value: i as f64,
            attributes: serde_json::json!({}),
        }
    }

    #[test]
    fn metrics_stay_within_their_byte_bound_dropping_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("t.db"), 10_000).unwrap();
        for batch in 0..50 {
            let points: Vec<_> = (0..20).map(|i| point(batch * 20 + i)).collect();
            store.insert_metrics(&points).unwrap();
            assert!(store.metric_bytes() <= 10_000, "{}", store.metric_bytes());
        }
        let kept = store.metrics(Some("worker-1"), Some("cpu"), 0).unwrap();
        assert!(!kept.is_empty());
        // The newest survive.
        assert_eq!(kept.last().unwrap().time_ns, 999);
        assert!(kept.first().unwrap().time_ns > 0);
    }

    #[test]
    fn the_cluster_id_is_in_the_file_name_and_data_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = database_file(&dir.path().join("data.db"), "lab");
        assert_eq!(path.file_name().unwrap(), "data.lab.db");
        Store::open(&path, 1 << 20).unwrap().insert_metrics(&[point(1)]).unwrap();
        assert_eq!(Store::open(&path, 1 << 20).unwrap().counts().1, 1);
    }
}
