//! Shuffle partitions on disk: how a stage task writes its output for the next stage, and how
//! a task reads the partitions it fetched in place of its input placeholders.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use polars::prelude::*;
use polars_utils::aliases::{PlSeedableRandomStateQuality, SeedableFromU64SeedExt};

use crate::stage_graph::{StageOutput, parse_input_path};

/// The file format of shuffle partitions (the client's `ShuffleOpts`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShuffleFormat {
    /// Arrow IPC, optionally compressed (`AUTO` is IPC with LZ4).
    Ipc(Option<IpcCompression>),
    Parquet(ParquetCompression),
}

/// Compression of shuffle files, as the client names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Lz4,
    Zstd,
    Uncompressed,
}

impl ShuffleFormat {
    /// The format for a query's shuffle options. The level applies to IPC with ZSTD; Parquet
    /// uses its writer's default level.
    pub fn new(parquet: bool, codec: Codec, level: Option<i32>) -> PolarsResult<ShuffleFormat> {
        let zstd = match level {
            Some(l) => polars_utils::compression::ZstdLevel::try_new(l).map_err(
                |_| polars_err!(InvalidOperation: "shuffle_compression_level {l} is not a ZSTD level (1 to 22)"),
            )?,
            None => Default::default(),
        };
        Ok(match (parquet, codec) {
            (true, Codec::Lz4) => ShuffleFormat::Parquet(ParquetCompression::Lz4Raw),
            (true, Codec::Zstd) => ShuffleFormat::Parquet(ParquetCompression::Zstd(None)),
            (true, Codec::Uncompressed) => ShuffleFormat::Parquet(ParquetCompression::Uncompressed),
            (false, Codec::Lz4) => ShuffleFormat::Ipc(Some(IpcCompression::LZ4)),
            (false, Codec::Zstd) => ShuffleFormat::Ipc(Some(IpcCompression::ZSTD(zstd))),
            (false, Codec::Uncompressed) => ShuffleFormat::Ipc(None),
        })
    }

    /// The format files of `schema` are written in. The IPC file format allows one dictionary
    /// per column, and every batch of a Categorical column carries the categories it uses: such
    /// outputs are written as Parquet (with the same codec), which keeps them per row group.
    /// Readers tell the formats apart by the files' extensions.
    pub fn for_schema(self, schema: &Schema) -> ShuffleFormat {
        match self {
            ShuffleFormat::Ipc(codec) if schema.iter_values().any(|dtype| dtype.contains_categoricals()) => {
                ShuffleFormat::Parquet(match codec {
                    Some(IpcCompression::LZ4) => ParquetCompression::Lz4Raw,
                    Some(IpcCompression::ZSTD(_)) => ParquetCompression::Zstd(None),
                    None => ParquetCompression::Uncompressed,
                })
            }
            format => format,
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            ShuffleFormat::Ipc(_) => "arrow",
            ShuffleFormat::Parquet(_) => "parquet",
        }
    }
}

/// What a stage task wrote.
#[derive(Debug, Default)]
pub struct Written {
    /// One file per output partition, in partition order.
    pub files: Vec<PathBuf>,
    pub rows: u64,
    pub bytes: u64,
}

/// Rows of a batch above which its partitions are written on several threads.
const PARALLEL_ROWS: usize = 1 << 18;

/// Seed of the partitioning hash: every worker must send a key to the same partition.
const PARTITION_SEED: u64 = 0x706f_6c61_7273;

/// Splits `df` into its output partitions and writes them under `dir` as `<i>.<ext>`.
/// Every partition is written, empty ones too, so readers always find their files.
/// `boundaries`: for a `Range` output, the boundaries its sample stage wrote.
pub fn write_partitions(
    df: DataFrame,
    output: &StageOutput,
    boundaries: Option<&Series>,
    format: ShuffleFormat,
    dir: &Path,
) -> PolarsResult<Written> {
    let (df, dealer) = match output {
        StageOutput::Boundaries { key, descending, partitions, .. } => {
            (sample_boundaries(&df, key, *descending, *partitions)?, Dealer::One)
        }
        _ => (df, Dealer::new(output, boundaries)?),
    };
    let rows = df.height() as u64;
    let writers = PartitionWriters::create(dir, df.schema(), dealer, format)?;
    writers.write(df)?;
    // The rows the task produced (not the boundaries sampled from them).
    Ok(Written { rows, ..writers.finish()? })
}

/// How the rows of a stage task's output are dealt to its partitions.
#[derive(Clone)]
pub enum Dealer {
    /// One partition.
    One,
    Hash {
        keys: Vec<String>,
        partitions: usize,
    },
    Range {
        key: String,
        descending: bool,
        nulls_last: bool,
        partitions: usize,
        boundaries: Series,
    },
    /// Partition `i` from `lows[i - 1]` on, below `lows[i]`; nulls in partition 0.
    KeyRanges {
        key: String,
        lows: Series,
    },
}

impl Dealer {
    /// The dealer of a stage output (`boundaries`: those a `Range` output's sample stage found).
    pub fn new(output: &StageOutput, boundaries: Option<&Series>) -> PolarsResult<Dealer> {
        Ok(match output {
            StageOutput::Hash { keys, partitions } => Dealer::Hash { keys: keys.clone(), partitions: *partitions },
            StageOutput::Range { key, descending, nulls_last, partitions, .. } => Dealer::Range {
                key: key.clone(),
                descending: *descending,
                nulls_last: *nulls_last,
                partitions: *partitions,
                boundaries: boundaries
                    .ok_or_else(|| polars_err!(ComputeError: "a range partitioning task got no boundaries"))?
                    .clone(),
            },
            StageOutput::KeyRanges { key, lows } => {
                Dealer::KeyRanges { key: key.clone(), lows: Series::new("lows".into(), lows) }
            }
            StageOutput::Single | StageOutput::Result | StageOutput::Boundaries { .. } => Dealer::One,
        })
    }

    pub fn partitions(&self) -> usize {
        match self {
            Dealer::One => 1,
            Dealer::Hash { partitions, .. } | Dealer::Range { partitions, .. } => *partitions,
            Dealer::KeyRanges { lows, .. } => lows.len() + 1,
        }
    }

    /// The rows of `df` each partition gets (None: all of them, to the only partition).
    fn deal(&self, df: &DataFrame) -> PolarsResult<Option<Vec<Vec<IdxSize>>>> {
        Ok(match self {
            Dealer::One => None,
            Dealer::Hash { keys, partitions } => Some(split_by_hash(df, keys, *partitions)?),
            Dealer::Range { key, descending, nulls_last, partitions, boundaries } => Some(split_by_range(
                df,
                key,
                *descending,
                *nulls_last,
                *partitions,
                boundaries,
                SearchSortedSide::Left,
            )?),
            // A key equal to a low starts that low's partition.
            Dealer::KeyRanges { key, lows } => {
                Some(split_by_range(df, key, false, false, lows.len() + 1, lows, SearchSortedSide::Right)?)
            }
        })
    }
}

/// Partition files written batch by batch as the engine streams a task's output (the task
/// never holds its whole output). Every partition file exists from the start, so empty
/// partitions are valid, empty files.
pub struct PartitionWriters {
    dealer: Dealer,
    writers: Vec<Mutex<BatchWriter>>,
    paths: Vec<PathBuf>,
    rows: std::sync::atomic::AtomicU64,
}

enum BatchWriter {
    Ipc(polars::io::ipc::BatchedWriter<File>),
    Parquet(polars::io::parquet::write::BatchedWriter<File>),
}

impl PartitionWriters {
    pub fn create(
        dir: &Path,
        schema: &Schema,
        dealer: Dealer,
        format: ShuffleFormat,
    ) -> PolarsResult<PartitionWriters> {
        std::fs::create_dir_all(dir)
            .map_err(|e| polars_err!(ComputeError: "cannot create shuffle directory {}: {e}", dir.display()))?;
        let format = format.for_schema(schema);
        let paths: Vec<PathBuf> = (0..dealer.partitions()).map(|i| partition_path(dir, i, format)).collect();
        let writers = paths
            .iter()
            .map(|path| {
                let file = File::create(path)
                    .map_err(|e| polars_err!(ComputeError: "cannot write {}: {e}", path.display()))?;
                let writer = match format {
                    ShuffleFormat::Ipc(compression) => {
                        let arrow = schema.to_arrow(CompatLevel::newest());
                        let fields = polars_arrow::io::ipc::write::default_ipc_fields(arrow.iter_values());
                        BatchWriter::Ipc(IpcWriter::new(file).with_compression(compression).batched(schema, fields)?)
                    }
                    ShuffleFormat::Parquet(compression) => {
                        BatchWriter::Parquet(ParquetWriter::new(file).with_compression(compression).batched(schema)?)
                    }
                };
                Ok(Mutex::new(writer))
            })
            .collect::<PolarsResult<Vec<_>>>()?;
        Ok(PartitionWriters { dealer, writers, paths, rows: Default::default() })
    }

    /// Deals a batch of rows to the partitions and appends each part to its file.
    pub fn write(&self, mut df: DataFrame) -> PolarsResult<()> {
        if df.height() == 0 {
            return Ok(());
        }
        self.rows.fetch_add(df.height() as u64, std::sync::atomic::Ordering::Relaxed);
        match self.dealer.deal(&df)? {
            None => {
                df.align_chunks();
                append(&self.writers[0], &df)
            }
            Some(rows) => {
                let parts: Vec<(&Mutex<BatchWriter>, Vec<IdxSize>)> =
                    self.writers.iter().zip(rows).filter(|(_, r)| !r.is_empty()).collect();
                let one = |(writer, rows): (&Mutex<BatchWriter>, Vec<IdxSize>)| {
                    append(writer, &df.take(&IdxCa::from_vec(PlSmallStr::EMPTY, rows))?)
                };
                // A large batch (a whole output) is taken and compressed on several threads;
                // streamed batches are small and the engine keeps the other cores busy.
                let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(parts.len());
                if df.height() < PARALLEL_ROWS || threads < 2 {
                    return parts.into_iter().try_for_each(one);
                }
                let queue = Mutex::new(parts);
                std::thread::scope(|scope| {
                    let workers: Vec<_> = (0..threads)
                        .map(|_| {
                            scope.spawn(|| {
                                loop {
                                    let Some(part) = queue.lock().unwrap().pop() else { return Ok(()) };
                                    one(part)?;
                                }
                            })
                        })
                        .collect();
                    workers.into_iter().try_for_each(|w| w.join().expect("a partition writer panicked"))
                })
            }
        }
    }

    /// Closes every file (footers written) and says what was written.
    pub fn finish(self) -> PolarsResult<Written> {
        let mut written = Written { rows: self.rows.into_inner(), ..Default::default() };
        for (writer, path) in self.writers.into_iter().zip(self.paths) {
            match writer.into_inner().unwrap() {
                BatchWriter::Ipc(mut w) => w.finish()?,
                BatchWriter::Parquet(w) => {
                    w.finish()?;
                }
            }
            written.bytes += std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            written.files.push(path);
        }
        Ok(written)
    }
}

fn append(writer: &Mutex<BatchWriter>, df: &DataFrame) -> PolarsResult<()> {
    match &mut *writer.lock().unwrap() {
        BatchWriter::Ipc(w) => w.write_batch(df),
        BatchWriter::Parquet(w) => w.write_batch(df),
    }
}

fn partition_path(dir: &Path, i: usize, format: ShuffleFormat) -> PathBuf {
    dir.join(format!("{i}.{}", format.extension()))
}

/// The rows of each hash partition.
fn split_by_hash(df: &DataFrame, keys: &[String], partitions: usize) -> PolarsResult<Vec<Vec<IdxSize>>> {
    let mut key_df = df.select(keys.iter().map(|k| PlSmallStr::from(k.as_str())))?;
    let hashes = key_df.hash_rows(Some(PlSeedableRandomStateQuality::seed_from_u64(PARTITION_SEED)))?;
    let mut indices: Vec<Vec<IdxSize>> = vec![Vec::new(); partitions];
    for (row, hash) in hashes.iter().enumerate() {
        // Rows with a null hash (never for hash_rows) would go to partition 0.
        let p = hash.map(|h| (h % partitions as u64) as usize).unwrap_or(0);
        indices[p].push(row as IdxSize);
    }
    Ok(indices)
}

/// `partitions - 1` values of `key` that cut its sorted non-null values into equal runs.
fn sample_boundaries(df: &DataFrame, key: &str, descending: bool, partitions: usize) -> PolarsResult<DataFrame> {
    let values = df.column(key)?.as_materialized_series().drop_nulls();
    let sorted = values.sort(SortOptions { descending, ..Default::default() })?;
    let n = sorted.len();
    let idx: Vec<IdxSize> =
        if n == 0 { Vec::new() } else { (1..partitions).map(|j| (n * j / partitions) as IdxSize).collect() };
    let boundaries = sorted.take(&IdxCa::from_vec(PlSmallStr::EMPTY, idx))?;
    DataFrame::new(boundaries.len(), vec![boundaries.into_column()])
}

/// Rows by the range of `key` they fall in: partition `i` holds keys after boundary `i - 1`
/// up to boundary `i` in sort order (equal keys always in the same partition); nulls go to the
/// first or the last partition as the sort puts them.
/// The rows of each range partition.
fn split_by_range(
    df: &DataFrame,
    key: &str,
    descending: bool,
    nulls_last: bool,
    partitions: usize,
    boundaries: &Series,
    side: SearchSortedSide,
) -> PolarsResult<Vec<Vec<IdxSize>>> {
    let values = df.column(key)?.as_materialized_series().clone();
    let boundaries = boundaries.cast(values.dtype())?;
    let positions = search_sorted(&boundaries, &values, side, descending)?;
    let mut indices: Vec<Vec<IdxSize>> = vec![Vec::new(); partitions];
    let nulls = values.is_null();
    for (row, (position, null)) in positions.iter().zip(nulls.iter()).enumerate() {
        let p = match (null, position) {
            (Some(true), _) => {
                if nulls_last {
                    partitions - 1
                } else {
                    0
                }
            }
            (_, Some(p)) => (p as usize).min(partitions - 1),
            (_, None) => 0,
        };
        indices[p].push(row as IdxSize);
    }
    Ok(indices)
}

/// Reads the boundaries a sample stage wrote (one column).
pub fn read_boundaries(files: &[PathBuf]) -> PolarsResult<Series> {
    let df = LazyFrame::from(input_scan(files)?).collect()?;
    let column = df.columns().first().ok_or_else(|| polars_err!(ComputeError: "the boundaries file has no column"))?;
    Ok(column.as_materialized_series().clone())
}

/// Replaces every input placeholder of `plan` by a scan of the local files given for it
/// (keyed by placeholder path). A placeholder without files is an error naming it.
pub fn substitute_inputs(plan: &mut DslPlan, inputs: &HashMap<String, Vec<PathBuf>>) -> PolarsResult<()> {
    let mut missing = None;
    crate::rewrite(plan, &mut |node| {
        if let DslPlan::Scan { sources: ScanSources::Paths(paths), .. } = node
            && paths.len() == 1
            && parse_input_path(paths[0].as_str()).is_some()
        {
            let key = paths[0].as_str().to_string();
            match inputs.get(&key) {
                Some(files) => match input_scan(files) {
                    Ok(scan) => *node = scan,
                    Err(e) => missing = Some(e.to_string()),
                },
                None => missing = Some(format!("no files for the stage input {key}")),
            }
        }
    });
    match missing {
        Some(m) => polars_bail!(ComputeError: "{m}"),
        None => Ok(()),
    }
}

/// A scan of one input's files, in the format their extension names (see
/// [`ShuffleFormat::for_schema`]; all files of an input come from one stage and share it).
fn input_scan(files: &[PathBuf]) -> PolarsResult<DslPlan> {
    let parquet = files.first().is_some_and(|f| f.extension().is_some_and(|e| e == "parquet"));
    let sources = ScanSources::Paths(files.iter().map(|p| PlRefPath::new(p.display().to_string())).collect());
    let lf = match parquet {
        false => LazyFrame::scan_ipc_sources(sources, Default::default(), Default::default())?,
        true => LazyFrame::scan_parquet_sources(sources, Default::default())?,
    };
    Ok(lf.logical_plan)
}
