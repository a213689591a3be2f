//! Polars 2.0.0 for polars-node: reads the plans the official client sends and executes them.
//!
//! A plan is `lf.sink_parquet(TARGET, lazy=True).serialize()` of the client's py-polars:
//! `DSL_VERSION` + 4 bytes + the 64-hex `DSL_SCHEMA_HASH` + MessagePack. `TARGET` is the
//! placeholder `<in-memory>` (results go to the cluster's result storage), `<flight>` (results
//! stream back through Arrow Flight) or the user's own sink.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub use polars;
use polars::prelude::*;
/// The global allocator of the client's wheel (jemalloc with Polars' memory accounting).
pub use polars_ooc::Allocator;
use polars_plan::prelude::PlanCallback;

pub mod clustering;
pub mod planner;
pub mod python;
pub mod shuffle;
pub mod stage_graph;

/// The Polars version whose plans this engine reads.
pub const POLARS_VERSION: &str = "2.0.0";

const DSL_MAGIC: &[u8] = b"DSL_VERSION";

/// Registers what plans may need at execution (the SQL resolver for SQL-built frames).
pub fn init() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(polars::sql::register_sql_resolver);
}

/// Runs a tiny query on each engine, so that the thread pools and the streaming executor exist
/// before a task arrives (a new execution process does this while it waits for its first task).
pub fn warm_up() {
    if let Ok(df) = DataFrame::new(1, vec![Column::new("a".into(), [1i64])]) {
        for engine in [Engine::Streaming, Engine::InMemory] {
            let _ = df.clone().lazy().select([col("a") + lit(1)]).collect_with_engine(engine);
        }
    }
}

/// The `DSL_SCHEMA_HASH` in the header of a serialized plan, if it has one.
pub fn schema_hash_of(plan: &[u8]) -> Option<&str> {
    let rest = plan.strip_prefix(DSL_MAGIC)?;
    let hash = rest.get(4..4 + 64)?;
    std::str::from_utf8(hash).ok().filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The `DSL_SCHEMA_HASH` this engine reads (written into every plan it serializes).
pub fn own_schema_hash() -> &'static str {
    static HASH: OnceLock<String> = OnceLock::new();
    HASH.get_or_init(|| {
        let mut bytes = Vec::new();
        let plan = DslPlan::default();
        plan.serialize_versioned(&mut bytes, Default::default()).expect("an empty plan serializes");
        schema_hash_of(&bytes).expect("own plans have a header").to_string()
    })
}

/// Where the client wants the result.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Target {
    /// `execute()`: the cluster stores the result and hands back its location.
    InMemory,
    /// `collect()`: the result streams back through Arrow Flight.
    Flight,
    /// A sink of the user's (`sink_parquet("s3://...")`): the plan writes it itself.
    User,
}

/// A plan read from the client.
#[derive(Clone)]
pub struct Plan {
    /// The query without the placeholder sink (the whole plan for user sinks).
    query: DslPlan,
    pub target: Target,
}

/// Which engine the client asked for (the client protocol's `Engine` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineChoice {
    Auto,
    Streaming,
    InMemory,
    Gpu,
}

impl EngineChoice {
    fn polars(self) -> PolarsResult<Engine> {
        Ok(match self {
            EngineChoice::Auto => Engine::Auto,
            EngineChoice::Streaming => Engine::Streaming,
            EngineChoice::InMemory => Engine::InMemory,
            EngineChoice::Gpu => {
                polars_bail!(InvalidOperation: "the GPU engine is not available on this cluster; use engine=\"auto\"")
            }
        })
    }
}

impl Plan {
    /// Reads a serialized plan. A plan of another Polars version fails here with Polars'
    /// own message naming both schema hashes.
    pub fn read(bytes: &[u8]) -> PolarsResult<Plan> {
        let dsl = deserialize(bytes)?;
        let placeholder = |payload: &SinkType| match payload {
            SinkType::File(FileSinkOptions { target: SinkTarget::Path(p), .. }) => match p.as_str() {
                "<in-memory>" => Some(Target::InMemory),
                "<flight>" => Some(Target::Flight),
                _ => None,
            },
            _ => None,
        };
        Ok(match dsl {
            DslPlan::Sink { input, payload } if placeholder(&payload).is_some() => {
                Plan { query: Arc::unwrap_or_clone(input), target: placeholder(&payload).unwrap() }
            }
            other => Plan { query: other, target: Target::User },
        })
    }

    /// Reads a stage fragment the scheduler planned (a plan without a result sink) that
    /// delivers to `target`.
    pub fn fragment(bytes: &[u8], target: Target) -> PolarsResult<Plan> {
        Ok(Plan { query: deserialize(bytes)?, target })
    }

    /// The query without its result sink.
    pub fn query(&self) -> &DslPlan {
        &self.query
    }

    /// Whether the plan reads files (or object stores): a plan of in-memory frames only is
    /// never worth splitting, and needs no planning pass to know it.
    pub fn reads_files(&self) -> bool {
        let mut found = false;
        walk(&self.query, &mut |p| found |= matches!(p, DslPlan::Scan { .. }));
        found
    }

    /// Splits the query into stages (see [`planner`]).
    pub fn plan_stages(
        &self,
        optimization_flags: Option<u32>,
        limits: planner::Limits,
    ) -> PolarsResult<planner::Split> {
        // A user's sink: the query below it is split, and its last task writes the sink as the
        // client wrote it.
        let (query, sink) = match &self.query {
            DslPlan::Sink { input, payload } => (input.as_ref(), Some(payload)),
            DslPlan::SinkMultiple { .. } => {
                return Ok(planner::Split::Whole("queries with several sinks are not split yet".into()));
            }
            query => (query, None),
        };
        let mut split = planner::plan_stages(query, optimization_flags, limits)?;
        if let (planner::Split::Stages(graph), Some(payload)) = (&mut split, sink) {
            let last = graph.stages.last_mut().expect("a stage graph ends in its result stage");
            let fragment = DslPlan::deserialize_versioned(last.tasks[0].as_slice())?;
            let sunk = DslPlan::Sink { input: Arc::new(fragment), payload: payload.clone() };
            let mut bytes = Vec::new();
            sunk.serialize_versioned(&mut bytes, Default::default())?;
            last.tasks[0] = bytes;
            last.label = "write the query's sink".into();
        }
        Ok(split)
    }

    /// Points the fragment's input placeholders at the local shuffle files fetched for them.
    pub fn with_inputs(&mut self, inputs: &std::collections::HashMap<String, Vec<PathBuf>>) -> PolarsResult<()> {
        shuffle::substitute_inputs(&mut self.query, inputs)
    }

    /// Runs a stage fragment and writes its output partitions under `dir` (`boundaries`: those
    /// of a range-partitioned output).
    pub fn execute_stage(
        &self,
        engine: EngineChoice,
        optimization_flags: Option<u32>,
        output: &stage_graph::StageOutput,
        boundaries: Option<&Series>,
        format: shuffle::ShuffleFormat,
        dir: &Path,
    ) -> PolarsResult<shuffle::Written> {
        let lf = self.lazy(optimization_flags);
        let streams = matches!(engine, EngineChoice::Auto | EngineChoice::Streaming);
        if !streams || matches!(output, stage_graph::StageOutput::Boundaries { .. }) {
            // The boundaries come from all rows at once; the in-memory engine has no stream.
            let df = lf.collect_with_engine(engine.polars()?)?.unwrap_single();
            return shuffle::write_partitions(df, output, boundaries, format, dir);
        }
        // The partitions are written as the engine streams the output: it never exists whole.
        let schema = lf.clone().collect_schema()?;
        let writers = Arc::new(shuffle::PartitionWriters::create(
            dir,
            &schema,
            shuffle::Dealer::new(output, boundaries)?,
            format,
        )?);
        let sink = writers.clone();
        // Order matters where the consumer reads a gathered output or a range in order.
        let maintain_order = !matches!(output, stage_graph::StageOutput::Hash { .. });
        let callback = PlanCallback::new(move |df: DataFrame| sink.write(df).map(|()| false));
        lf.sink_batches(callback, maintain_order, None)?.collect_with_engine(Engine::Streaming)?;
        let writers =
            Arc::into_inner(writers).ok_or_else(|| polars_err!(ComputeError: "the engine kept the shuffle writers"))?;
        writers.finish()
    }

    fn lazy(&self, optimization_flags: Option<u32>) -> LazyFrame {
        let lf = LazyFrame::from(self.query.clone());
        match optimization_flags {
            Some(bits) => lf.with_optimizations(OptFlags::from_bits_truncate(bits)),
            None => lf,
        }
    }

    /// Paths on the local file system that the plan reads (`scans`) and writes (`sinks`);
    /// object-store and HTTP URLs are not local. Read from the plan itself, without touching
    /// any file, so the scheduler can judge plans whose files only workers can see.
    pub fn local_paths(&self) -> LocalPaths {
        let mut found = LocalPaths::default();
        let local = |p: &PlRefPath| p.scheme().is_none_or(|s| s.is_file());
        walk(&self.query, &mut |plan| match plan {
            DslPlan::Scan { sources: ScanSources::Paths(paths), .. } => {
                found.scans.extend(paths.iter().filter(|p| local(p)).map(|p| p.as_str().to_string()));
            }
            DslPlan::Sink { payload, .. } => match payload {
                SinkType::File(FileSinkOptions { target: SinkTarget::Path(p), .. }) if local(p) => {
                    found.sinks.push(p.as_str().to_string())
                }
                SinkType::Partitioned(opts) if local(&opts.base_path) => {
                    found.sinks.push(opts.base_path.as_str().to_string())
                }
                _ => {}
            },
            _ => {}
        });
        found
    }

    /// The datasets the plan reads and writes (for lineage): every scan's sources and every
    /// sink's target, as written (paths or URLs), each with its schema where Polars can tell
    /// it here (a scan's schema is read from the files' metadata: unknown when this host
    /// cannot read them). The result placeholders of `execute()`/`collect()` are not datasets.
    pub fn datasets(&self) -> Datasets {
        let mut found = Datasets::default();
        let schema_of = |plan: &DslPlan| {
            let schema = guard_panics(|| LazyFrame::from(plan.clone()).collect_schema()).ok()?;
            Some(schema.iter().map(|(name, dtype)| (name.to_string(), dtype.to_string())).collect::<Vec<_>>())
        };
        walk(&self.query, &mut |plan| match plan {
            DslPlan::Scan { sources: ScanSources::Paths(paths), .. } => {
                let schema = schema_of(plan);
                found
                    .inputs
                    .extend(paths.iter().map(|p| Dataset { url: p.as_str().to_string(), schema: schema.clone() }));
            }
            DslPlan::Sink { input, payload } => {
                let url = match payload {
                    SinkType::File(FileSinkOptions { target: SinkTarget::Path(p), .. }) => p.as_str().to_string(),
                    SinkType::Partitioned(opts) => opts.base_path.as_str().to_string(),
                    _ => return,
                };
                found.outputs.push(Dataset { url, schema: schema_of(input) });
            }
            _ => {}
        });
        found
    }

    /// The optimized logical plan as text (`plan("ir")`, `explain()`).
    pub fn explain(&self, optimization_flags: Option<u32>) -> PolarsResult<String> {
        self.lazy(optimization_flags).explain(true)
    }

    /// The optimized logical plan as a Graphviz graph.
    pub fn dot(&self, optimization_flags: Option<u32>) -> PolarsResult<String> {
        self.lazy(optimization_flags).to_dot(true)
    }

    /// Runs the query. For `InMemory` and `Flight` targets the result is written to
    /// `result_dir` (Parquet for in-memory results; an Arrow IPC *stream* for Flight, whose
    /// messages map one to one onto Flight data messages) and the first `head_rows` rows come
    /// back as Arrow IPC file bytes; a `User` plan writes its own sink.
    pub fn execute(
        &self,
        engine: EngineChoice,
        optimization_flags: Option<u32>,
        result_dir: &Path,
        head_rows: usize,
    ) -> PolarsResult<Executed> {
        let engine = engine.polars()?;
        let lf = self.lazy(optimization_flags);
        if self.target == Target::User {
            lf.collect_with_engine(engine)?;
            return Ok(Executed { n_rows: 0, files: Vec::new(), head_ipc: Vec::new(), flight_schema: Vec::new() });
        }
        let mut df = lf.collect_with_engine(engine)?.unwrap_single();
        std::fs::create_dir_all(result_dir)
            .map_err(|e| polars_err!(ComputeError: "cannot create result directory {}: {e}", result_dir.display()))?;
        let mut flight_schema = Vec::new();
        let path = match self.target {
            Target::InMemory => {
                let path = result_dir.join("0.parquet");
                ParquetWriter::new(create(&path)?).finish(&mut df)?;
                path
            }
            _ => {
                let path = result_dir.join("0.arrows");
                write_flight_stream(&df, create(&path)?)?;
                flight_schema = first_ipc_message(&path)?;
                path
            }
        };
        // One chunk, so one record batch: the IPC file format allows one dictionary per
        // Categorical/Enum column, and each chunk would carry its own.
        let mut head = df.head(Some(head_rows));
        head.rechunk_mut();
        let mut head_ipc = Vec::new();
        IpcWriter::new(&mut head_ipc).finish(&mut head)?;
        Ok(Executed { n_rows: df.height() as u64, files: vec![path], head_ipc, flight_schema })
    }
}

/// The official client reads Flight with gRPC's default 4 MiB message limit: a record batch whose
/// encoded message is larger cannot be read. The stream is written in pieces of about
/// `FLIGHT_PIECE_BYTES`, and a piece still over `FLIGHT_MESSAGE_BYTES` once encoded (rows of
/// uneven size) is halved until it fits, leaving room for the Flight envelope.
pub const FLIGHT_MESSAGE_BYTES: usize = 4 * 1024 * 1024 - 64 * 1024;
const FLIGHT_PIECE_BYTES: usize = 2 * 1024 * 1024;

/// Writes `df` as an Arrow IPC stream whose every message fits one Flight data message.
/// Dictionaries (Categorical, Enum) are written before the batches that use them and again
/// when they change, as the stream format allows.
pub fn write_flight_stream(df: &DataFrame, mut out: impl std::io::Write) -> PolarsResult<()> {
    use polars_arrow::io::ipc::write::common_sync::{write_continuation, write_message};
    use polars_arrow::io::ipc::write::{
        DictionaryTracker, EncodedData, WriteOptions, default_ipc_fields, encode_new_dictionaries, encode_record_batch,
        schema_to_bytes,
    };
    type Batch = polars_arrow::record_batch::RecordBatchT<Box<dyn polars_arrow::array::Array>>;

    fn write_pieces(
        batch: &Batch,
        options: &WriteOptions,
        encoded: &mut EncodedData,
        out: &mut impl std::io::Write,
    ) -> PolarsResult<()> {
        encode_record_batch(batch, options, encoded);
        let rows = batch.len();
        if encoded.ipc_message.len() + encoded.arrow_data.len() <= FLIGHT_MESSAGE_BYTES || rows <= 1 {
            write_message(out, encoded)?;
            return Ok(());
        }
        let schema = Arc::new(batch.schema().clone());
        for (offset, len) in [(0, rows / 2), (rows / 2, rows - rows / 2)] {
            let arrays = batch.arrays().iter().map(|a| a.sliced(offset, len)).collect();
            write_pieces(&Batch::new(len, schema.clone(), arrays), options, encoded, out)?;
        }
        Ok(())
    }

    let compat = CompatLevel::oldest();
    let schema = df.schema().to_arrow(compat);
    let fields = default_ipc_fields(schema.iter_values());
    let options = WriteOptions::default();
    write_message(
        &mut out,
        &EncodedData { ipc_message: schema_to_bytes(&schema, &fields, None), arrow_data: Vec::new() },
    )?;
    let mut dictionaries = DictionaryTracker { dictionaries: Default::default(), cannot_replace: false };
    let mut encoded = EncodedData::default();
    let rows_per_piece = (df.height() * FLIGHT_PIECE_BYTES / df.estimated_size(true).max(1)).max(1);
    for offset in (0..df.height()).step_by(rows_per_piece) {
        let mut piece = df.slice(offset as i64, rows_per_piece);
        piece.align_chunks(); // batches are cut where every column's chunks end
        for batch in piece.iter_chunks(compat, true) {
            let mut new_dictionaries = Vec::new();
            for (field, array) in fields.iter().zip(batch.arrays()) {
                encode_new_dictionaries(field, array.as_ref(), &options, &mut dictionaries, &mut new_dictionaries)?;
            }
            for dictionary in &new_dictionaries {
                write_message(&mut out, dictionary)?;
            }
            write_pieces(&batch, &options, &mut encoded, &mut out)?;
        }
    }
    write_continuation(&mut out, 0)?;
    Ok(())
}

/// Why a plan that calls Python does not run here, in the words the client shows.
const PYTHON_FUNCTION: &str = "the query calls a Python function (`map_elements`, `map_batches`, \
     `LazyFrame.map_batches`, `pipe_with_schema`, a `name` function with a Python callback, or a \
     Python scan), and the workers of this cluster run Polars without a Python interpreter: \
     express it with Polars expressions, or run it locally";

/// Whether an error or panic of the engine says the plan needs Python: Python nodes are not
/// compiled in (unknown `OpaquePython`, `PlanCallback`), or Python UDFs inside expressions,
/// which are read as bytes and only fail when the plan is converted ("activate 'serde, python'").
fn needs_python(message: &str) -> bool {
    message.contains("OpaquePython")
        || message.contains("PlanCallback")
        || message.contains("python' feature")
        || message.contains("python, ' feature")
}

fn deserialize(bytes: &[u8]) -> PolarsResult<DslPlan> {
    DslPlan::deserialize_versioned(bytes).map_err(|e| match needs_python(&e.to_string()) {
        true => polars_err!(InvalidOperation: "{PYTHON_FUNCTION}"),
        false => e,
    })
}

/// Runs `f`, turning a panic of the engine into an error of the query: a query that trips a
/// Polars assertion fails with the panic's message (deterministically, so not worth a retry)
/// instead of taking down the execution process as if the machine had died.
pub fn guard_panics<T>(f: impl FnOnce() -> PolarsResult<T>) -> PolarsResult<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|m| m.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into());
        match needs_python(&message) {
            true => Err(polars_err!(InvalidOperation: "{PYTHON_FUNCTION}")),
            false => Err(polars_err!(ComputeError: "the Polars engine panicked on this query: {message}")),
        }
    })
}

/// The first encapsulated message of an Arrow IPC stream (its schema), as Flight's
/// `FlightInfo.schema` wants it.
fn first_ipc_message(path: &Path) -> PolarsResult<Vec<u8>> {
    use std::io::Read;
    let mut file = File::open(path)?;
    let mut prefix = [0u8; 8];
    file.read_exact(&mut prefix)?;
    let len = if prefix[..4] == [0xff; 4] {
        u32::from_le_bytes(prefix[4..8].try_into().unwrap()) as usize + 8
    } else {
        u32::from_le_bytes(prefix[..4].try_into().unwrap()) as usize + 4
    };
    let mut message = vec![0u8; len];
    File::open(path)?.read_exact(&mut message)?;
    Ok(message)
}

/// What a plan reads and writes (see `Plan::datasets`).
#[derive(Debug, Default, Clone)]
pub struct Datasets {
    pub inputs: Vec<Dataset>,
    pub outputs: Vec<Dataset>,
}

#[derive(Debug, Clone)]
pub struct Dataset {
    /// A path or URL, as the plan names it.
    pub url: String,
    /// Column names and Polars types, where known.
    pub schema: Option<Vec<(String, String)>>,
}

/// Local file-system paths a plan touches.
#[derive(Debug, Default, PartialEq)]
pub struct LocalPaths {
    pub scans: Vec<String>,
    pub sinks: Vec<String>,
}

/// Runs `$body` with `$p` bound to each input of a DSL node: the one list of the variants that
/// have inputs, for read-only visits (`walk`) and rewriting ones (`rewrite`), so the
/// two cannot drift apart. `$one`/`$many` reach into an `Arc` / `Arc<[_]>`, `$iter` walks a `Vec`.
macro_rules! for_each_input {
    ($plan:expr, |$p:ident| $body:expr, $one:ident, $many:ident, $iter:ident) => {
        match $plan {
            DslPlan::Filter { input, .. }
            | DslPlan::Cache { input, .. }
            | DslPlan::Select { input, .. }
            | DslPlan::GroupBy { input, .. }
            | DslPlan::HStack { input, .. }
            | DslPlan::MatchToSchema { input, .. }
            | DslPlan::Pivot { input, .. }
            | DslPlan::Distinct { input, .. }
            | DslPlan::Sort { input, .. }
            | DslPlan::Slice { input, .. }
            | DslPlan::MapFunction { input, .. }
            | DslPlan::Sink { input, .. }
            | DslPlan::IR { dsl: input, .. } => {
                let $p = $one(input);
                $body;
            }
            DslPlan::Join { input_left, input_right, .. } | DslPlan::MergeSorted { input_left, input_right, .. } => {
                let $p = $one(input_left);
                $body;
                let $p = $one(input_right);
                $body;
            }
            DslPlan::Gather { input, idxs, .. } => {
                let $p = $one(input);
                $body;
                let $p = $one(idxs);
                $body;
            }
            DslPlan::PipeWithSchema { input, .. } => {
                for $p in $many(input) {
                    $body;
                }
            }
            DslPlan::Union { inputs, .. } | DslPlan::HConcat { inputs, .. } | DslPlan::SinkMultiple { inputs } => {
                for $p in inputs.$iter() {
                    $body;
                }
            }
            DslPlan::SQL { relations, .. } => {
                for (_, $p) in relations.$iter() {
                    $body;
                }
            }
            DslPlan::Scan { .. } | DslPlan::DataFrameScan { .. } | DslPlan::Resolver { .. } => {}
        }
    };
}

/// Calls `f` on every node of a plan, parents first.
fn walk(plan: &DslPlan, f: &mut impl FnMut(&DslPlan)) {
    fn one(a: &Arc<DslPlan>) -> &DslPlan {
        a
    }
    fn many(a: &Arc<[DslPlan]>) -> &[DslPlan] {
        a
    }
    f(plan);
    for_each_input!(plan, |input| walk(input, f), one, many, iter);
}

/// Calls `f` on every node of `plan`, parents before children, allowing replacement (shared
/// inputs are copied on write).
pub(crate) fn rewrite(plan: &mut DslPlan, f: &mut dyn FnMut(&mut DslPlan)) {
    fn one(a: &mut Arc<DslPlan>) -> &mut DslPlan {
        Arc::make_mut(a)
    }
    fn many(a: &mut Arc<[DslPlan]>) -> &mut [DslPlan] {
        Arc::make_mut(a)
    }
    f(plan);
    for_each_input!(plan, |input| rewrite(input, f), one, many, iter_mut);
}

fn create(path: &Path) -> PolarsResult<File> {
    File::create(path).map_err(|e| polars_err!(ComputeError: "cannot write {}: {e}", path.display()))
}

/// The outcome of a query run to completion.
#[derive(Debug)]
pub struct Executed {
    pub n_rows: u64,
    pub files: Vec<PathBuf>,
    pub head_ipc: Vec<u8>,
    /// The schema message of a Flight result.
    pub flight_schema: Vec<u8>,
}

/// The Python exception py-polars raises for this error, and its message: the client
/// re-raises `"<Exception>: message"` as that exception.
pub fn describe_error(error: &PolarsError) -> String {
    // As py-polars does: context wrappers are folded into the message of the error they wrap,
    // whose kind names the exception.
    let traced = error.clone().context_trace();
    let (name, message) = match &traced {
        PolarsError::AssertionError(m) => ("AssertionError", m.to_string()),
        PolarsError::ColumnNotFound(m) => ("ColumnNotFoundError", m.to_string()),
        PolarsError::ComputeError(m) => ("ComputeError", m.to_string()),
        PolarsError::Duplicate(m) => ("DuplicateError", m.to_string()),
        PolarsError::InvalidOperation(m) => ("InvalidOperationError", m.to_string()),
        PolarsError::IO { error, msg } => {
            let name = match error.kind() {
                std::io::ErrorKind::NotFound => "FileNotFoundError",
                std::io::ErrorKind::PermissionDenied => "PermissionError",
                _ => "OSError",
            };
            (name, msg.as_ref().map(|m| m.to_string()).unwrap_or_else(|| error.to_string()))
        }
        PolarsError::NoData(m) => ("NoDataError", m.to_string()),
        PolarsError::OutOfBounds(m) => ("OutOfBoundsError", m.to_string()),
        PolarsError::SchemaFieldNotFound(m) => ("SchemaFieldNotFoundError", m.to_string()),
        PolarsError::SchemaMismatch(m) => ("SchemaError", m.to_string()),
        PolarsError::ShapeMismatch(m) => ("ShapeError", m.to_string()),
        PolarsError::SQLInterface(m) => ("SQLInterfaceError", m.to_string()),
        PolarsError::SQLSyntax(m) => ("SQLSyntaxError", m.to_string()),
        PolarsError::StringCacheMismatch(m) => ("StringCacheMismatchError", m.to_string()),
        PolarsError::StructFieldNotFound(m) => ("StructFieldNotFoundError", m.to_string()),
        other => ("ComputeError", other.to_string()),
    };
    format!("{name}: {message}")
}
