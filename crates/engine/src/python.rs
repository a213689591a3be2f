//! Plans that call Python (`map_elements`, `map_batches`, `LazyFrame.map_batches`, Python
//! scans): this engine is built without an interpreter and cannot read their Python nodes, so
//! they are recognised in the plan's MessagePack itself, and run by py-polars on a worker that
//! has a Python environment (see the worker's `python_executable`).
//!
//! The client pickles every Python object with cloudpickle (`prepare_cloud_plan` sets
//! `use_cloudpickle`), and Polars writes before each pickle one byte saying so and the Python
//! version that made it, `[1, minor, micro]`; py-polars refuses to load a cloudpickled object
//! in any other `3.minor.micro`. Reading those bytes here lets the scheduler refuse a plan no
//! worker's Python can load before any worker runs it.

use std::fmt;
use std::io::Cursor;
use std::path::Path;

use polars::prelude::*;
use rmpv::Value;

use crate::{DSL_MAGIC, Plan, Target};

/// What Polars writes before a Python UDF inside an expression (then the UDF's metadata as
/// MessagePack, then the pickle header).
const PYTHON_UDF_MARK: &[u8] = b"PLPYFN";
/// The pickle protocol opcode that starts every pickle of protocol 2 and later.
const PICKLE_PROTO: u8 = 0x80;

/// The Python version an object was cloudpickled with (always 3.x).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PythonVersion {
    pub minor: u8,
    pub micro: u8,
}

impl fmt::Display for PythonVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "3.{}.{}", self.minor, self.micro)
    }
}

impl PythonVersion {
    /// Reads `3.minor.micro` (as `sys.version_info` prints it).
    pub fn parse(text: &str) -> Option<PythonVersion> {
        let mut parts = text.trim().split('.');
        let (major, minor, micro) = (parts.next()?, parts.next()?, parts.next()?);
        (major == "3").then_some(())?;
        Some(PythonVersion { minor: minor.parse().ok()?, micro: micro.parse().ok()? })
    }
}

/// A plan that calls Python, as far as it can be read without Python.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PythonPlan {
    pub target: Target,
    /// The versions of Python that cloudpickled its objects (sorted, without repeats); a
    /// worker's Python must be one of them to load the plan.
    pub pickled_by: Vec<PythonVersion>,
}

impl PythonPlan {
    /// Finds the Python objects of a serialized plan; `None` when it has none (or is not a
    /// plan at all: reading it properly then says what is wrong).
    pub fn find(bytes: &[u8]) -> Option<PythonPlan> {
        let body = bytes.strip_prefix(DSL_MAGIC)?.get(4 + 64..)?;
        let plan = rmpv::decode::read_value(&mut Cursor::new(body)).ok()?;
        let mut found = Found::default();
        visit(&plan, &mut found);
        if !found.any {
            return None;
        }
        found.versions.sort();
        found.versions.dedup();
        Some(PythonPlan { target: target_of(&plan), pickled_by: found.versions })
    }

    /// The reason a worker with Python `worker` (or without Python) cannot load the plan.
    pub fn refusal(&self, worker: Option<PythonVersion>) -> Option<String> {
        let Some(worker) = worker else {
            return Some("it has no Python environment (worker.python_executable is not set)".into());
        };
        let other: Vec<String> = self.pickled_by.iter().filter(|v| **v != worker).map(|v| v.to_string()).collect();
        match other.is_empty() {
            true => None,
            false => Some(format!(
                "its Python is {worker}, and the query's functions were pickled by Python {} (cloudpickle loads \
                 only in the same 3.minor.micro)",
                other.join(", ")
            )),
        }
    }
}

#[derive(Default)]
struct Found {
    any: bool,
    versions: Vec<PythonVersion>,
}

fn visit(value: &Value, found: &mut Found) {
    match value {
        Value::Binary(bytes) => python_object(bytes, found),
        Value::Array(items) => {
            // Polars writes some byte strings as arrays of integers.
            if items.len() > 4 && items.iter().take(8).all(|v| v.as_u64().is_some_and(|n| n <= 255)) {
                let prefix: Vec<u8> = items.iter().take(8).map_while(|v| v.as_u64().map(|n| n as u8)).collect();
                if prefix.starts_with(PYTHON_UDF_MARK) || pickle_header(&prefix).is_some() {
                    let bytes: Option<Vec<u8>> =
                        items.iter().map(|v| v.as_u64().filter(|n| *n <= 255).map(|n| n as u8)).collect();
                    if let Some(bytes) = bytes {
                        python_object(&bytes, found);
                    }
                }
                return;
            }
            items.iter().for_each(|v| visit(v, found));
        }
        Value::Map(entries) => entries.iter().for_each(|(k, v)| {
            visit(k, found);
            visit(v, found);
        }),
        Value::Ext(_, bytes) => python_object(bytes, found),
        _ => {}
    }
}

/// A Python object's bytes: a UDF of an expression (its mark, metadata, then the pickle) or
/// a pickled object of a plan node (a Python scan, `LazyFrame.map_batches`).
fn python_object(bytes: &[u8], found: &mut Found) {
    let header = match bytes.strip_prefix(PYTHON_UDF_MARK) {
        Some(rest) => {
            let mut cursor = Cursor::new(rest);
            let Ok(_metadata) = rmpv::decode::read_value(&mut cursor) else { return };
            rest.get(cursor.position() as usize..).and_then(pickle_header)
        }
        None => pickle_header(bytes),
    };
    if let Some((cloudpickle, version)) = header {
        found.any = true;
        if cloudpickle {
            found.versions.push(version);
        }
    }
}

/// `[cloudpickle, minor, micro]` followed by the pickle itself.
fn pickle_header(bytes: &[u8]) -> Option<(bool, PythonVersion)> {
    match bytes {
        [flag @ (0 | 1), minor, micro, PICKLE_PROTO, protocol, ..] if (2..=5).contains(protocol) => {
            Some((*flag == 1, PythonVersion { minor: *minor, micro: *micro }))
        }
        _ => None,
    }
}

/// Where the plan's result goes: the client's placeholder sink at its root (`<in-memory>`,
/// `<flight>`), else the user's own sink. Plans are an arena: `root` indexes `dsl_plans`.
fn target_of(plan: &Value) -> Target {
    let get = |v: &Value, key: &str| -> Option<Value> {
        v.as_map()?.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v.clone())
    };
    let root = (|| {
        let index = get(&get(plan, "root")?, "idx")?.as_u64()? as usize;
        let node = get(&get(plan, "dsl_plans")?.as_array()?.get(index)?.clone(), "value")?;
        get(&get(&node, "Sink")?, "payload")
    })();
    let mut strings = Vec::new();
    if let Some(payload) = &root {
        collect_strings(payload, &mut strings);
    }
    match () {
        _ if strings.iter().any(|s| s == "<in-memory>") => Target::InMemory,
        _ if strings.iter().any(|s| s == "<flight>") => Target::Flight,
        _ => Target::User,
    }
}

fn collect_strings(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::String(s) => out.extend(s.as_str().map(str::to_string)),
        Value::Array(items) => items.iter().for_each(|v| collect_strings(v, out)),
        Value::Map(entries) => entries.iter().for_each(|(_, v)| collect_strings(v, out)),
        _ => {}
    }
}

impl Plan {
    /// The rest of a query that py-polars ran: its output, written as Parquet by the
    /// client's placeholder sink, read back to become the result like any other query's.
    pub fn python_output(path: &Path, target: Target) -> PolarsResult<Plan> {
        let sources = ScanSources::Paths([PlRefPath::new(path.display().to_string())].into_iter().collect());
        let lf = LazyFrame::scan_parquet_sources(sources, Default::default())?;
        Ok(Plan { query: lf.logical_plan, target })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_with(objects: Vec<Value>, sink_path: &str) -> Vec<u8> {
        let map = |pairs: Vec<(&str, Value)>| Value::Map(pairs.into_iter().map(|(k, v)| (Value::from(k), v)).collect());
        let sink = map(vec![(
            "Sink",
            map(vec![
                ("input", map(vec![("idx", Value::from(1))])),
                ("payload", map(vec![("File", map(vec![("target", Value::from(sink_path))]))])),
            ]),
        )]);
        let plan = map(vec![
            ("root", map(vec![("idx", Value::from(2)), ("version", Value::from(1))])),
            (
                "dsl_plans",
                Value::Array(vec![
                    map(vec![("value", Value::Nil)]),
                    map(vec![("value", Value::Array(objects))]),
                    map(vec![("value", sink)]),
                ]),
            ),
        ]);
        let mut bytes = DSL_MAGIC.to_vec();
        bytes.extend([0u8; 4]);
        bytes.extend([b'0'; 64]);
        rmpv::encode::write_value(&mut bytes, &plan).unwrap();
        bytes
    }

    fn udf(minor: u8, micro: u8) -> Vec<u8> {
        let mut bytes = PYTHON_UDF_MARK.to_vec();
        rmpv::encode::write_value(&mut bytes, &Value::Array(vec![Value::Nil, Value::Nil, true.into(), false.into()]))
            .unwrap();
        bytes.extend([1, minor, micro, PICKLE_PROTO, 5, 0x95]);
        bytes
    }

    #[test]
    fn finds_udfs_in_bytes_and_in_integer_arrays_with_their_versions() {
        let as_ints = |b: &[u8]| Value::Array(b.iter().map(|x| Value::from(*x)).collect());
        let scan = [1u8, 11, 2, PICKLE_PROTO, 5, 1, 2, 3];
        let plan = plan_with(vec![Value::Binary(udf(11, 7)), as_ints(&scan), as_ints(&udf(11, 7))], "<flight>");
        let found = PythonPlan::find(&plan).expect("Python objects");
        assert_eq!(found.target, Target::Flight);
        let (v7, v2) = (PythonVersion { minor: 11, micro: 7 }, PythonVersion { minor: 11, micro: 2 });
        assert_eq!(found.pickled_by, vec![v2, v7]);
        assert!(found.refusal(Some(v7)).unwrap().contains("pickled by Python 3.11.2"));
        assert!(found.refusal(None).unwrap().contains("worker.python_executable"));
    }

    #[test]
    fn plain_pickles_need_python_but_no_version_and_other_bytes_are_not_python() {
        let plain = Value::Binary(vec![0, 9, 9, PICKLE_PROTO, 4, 7]);
        let found = PythonPlan::find(&plan_with(vec![plain], "<in-memory>")).expect("a pickle");
        assert_eq!((found.target.clone(), found.pickled_by.len()), (Target::InMemory, 0));
        assert_eq!(found.refusal(Some(PythonVersion { minor: 12, micro: 0 })), None);
        // Arrow IPC bytes, a literal that only looks like a header, a user's sink path.
        let ipc = Value::Array([255u8, 255, 255, 255, 184, 0].iter().map(|x| Value::from(*x)).collect());
        let near = Value::Binary(vec![1, 11, 7, PICKLE_PROTO, 9]);
        assert_eq!(PythonPlan::find(&plan_with(vec![ipc, near], "/data/out.parquet")), None);
        let user = PythonPlan::find(&plan_with(vec![Value::Binary(udf(12, 1))], "s3://bucket/x.parquet"));
        assert_eq!(user.unwrap().target, Target::User);
        assert_eq!(PythonPlan::find(b"not a plan"), None);
    }

    #[test]
    fn versions_parse_as_python_prints_them() {
        assert_eq!(PythonVersion::parse("3.11.7\n"), Some(PythonVersion { minor: 11, micro: 7 }));
        assert_eq!(PythonVersion::parse("2.7.18"), None);
        assert_eq!(PythonVersion::parse("3.11"), None);
    }
}
