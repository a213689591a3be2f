//! Scans: how a file scan is split (by files, row ranges, or ranges of a key the files are laid
//! out by), how big it is, and the subplans read more than once.

use super::*;

impl Planner<'_> {
    /// How a scan of Parquet `paths` laid out by ranges of one of the `columns` it returns (all:
    /// `None`) is split: that column and the parts.
    pub(super) fn range_split(
        &self,
        paths: &[PlRefPath],
        file_info: &FileInfo,
        columns: Option<&[PlSmallStr]>,
    ) -> Option<(String, Vec<RangePart>)> {
        let returned: Vec<PlSmallStr> =
            columns.map(<[_]>::to_vec).unwrap_or_else(|| file_info.schema.iter_names().cloned().collect());
        let clustered = crate::clustering::clustered(paths, &file_info.schema, &returned)?;
        let by_rows = (clustered.rows() / self.limits.min_rows_per_task.max(1)) as usize;
        let n = by_rows.max(paths.len()).clamp(1, self.limits.max_tasks);
        Some((clustered.key.to_string(), clustered.split(n)?))
    }

    /// The ranges of `column` by which `node`, a (filtered, projected) scan of Parquet files
    /// laid out by that column, is or can be split (see [`Self::range_split`]), and the bytes
    /// the scan reads.
    pub(super) fn scan_ranges(&self, mut node: Node, column: &str) -> Option<(Vec<i64>, u64)> {
        loop {
            match self.arena().get(node) {
                IR::Filter { input, .. } | IR::SimpleProjection { input, .. } | IR::Cache { input, .. } => {
                    node = *input
                }
                IR::Scan {
                    sources: sources @ ScanSources::Paths(paths), file_info, output_schema, scan_type, ..
                } if matches!(**scan_type, FileScanIR::Parquet { .. }) => {
                    let columns: Option<Vec<PlSmallStr>> =
                        output_schema.as_ref().map(|s| s.iter_names().cloned().collect());
                    let (key, parts) = self.range_split(paths, file_info, columns.as_deref())?;
                    let read = (scan_bytes(sources) as f64 * read_share(&file_info.schema, columns.as_deref())) as u64;
                    return (key == column).then(|| (parts.iter().filter_map(|p| p.low).collect(), read));
                }
                _ => return None,
            }
        }
    }

    /// An IR scan as DSL: what its parts and whole copies are built from.
    pub(super) fn scan_dsl(&self, node: Node) -> Planned<ScanDsl> {
        let IR::Scan { sources, file_info, predicate, output_schema, scan_type, unified_scan_args, .. } =
            self.arena().get(node).clone()
        else {
            unreachable!()
        };
        let scan_type = match *scan_type {
            FileScanIR::Parquet { options, .. } => FileScanDsl::Parquet { options },
            FileScanIR::Ipc { options, .. } => FileScanDsl::Ipc { options },
            FileScanIR::Csv { options } => FileScanDsl::Csv { options },
            FileScanIR::NDJson { options } => FileScanDsl::NDJson { options },
            other => return unsupported(format!("{} scan", <&'static str>::from(&other))),
        };
        let predicate = predicate.map(|p| self.expr(&p));
        let mut args = *unified_scan_args;
        // Facts the optimizer derived for these exact sources; a split scan has other sources.
        args.row_count = None;
        args.source_sizes = None;
        args.projection = None;
        let columns: Option<Vec<PlSmallStr>> = output_schema.map(|s| s.iter_names().cloned().collect());
        Ok(ScanDsl { sources, file_info, args, scan_type, predicate, columns })
    }

    /// What a scan reads: its files' bytes in the share of the columns it reads (a join side of
    /// two integer columns of a wide table is cheap to broadcast). A stat per file.
    pub(super) fn scan_read_bytes(&self, node: Node) -> u64 {
        let IR::Scan { sources, file_info, output_schema, .. } = self.arena().get(node) else { unreachable!() };
        let columns: Option<Vec<PlSmallStr>> = output_schema.as_ref().map(|s| s.iter_names().cloned().collect());
        (scan_bytes(sources) as f64 * read_share(&file_info.schema, columns.as_deref())) as u64
    }

    pub(super) fn scan(&mut self, node: Node) -> Planned<Rel> {
        let scan = self.scan_dsl(node)?;
        let dsl = |sources: ScanSources, slice: Option<(i64, IdxSize)>| scan.plan(sources, slice);
        let ScanDsl { sources, file_info, args, scan_type, columns, .. } = &scan;
        let (sources, read_bytes) = (sources.clone(), self.scan_read_bytes(node));
        let name = scan_name(&sources);
        let split = Some(node) == self.largest_scan || read_bytes > self.limits.broadcast_limit;
        let ordered = args.row_index.is_none() && args.pre_slice.is_none();
        if !split || !ordered {
            return Ok(Rel::Whole(dsl(sources, None)));
        }
        let ScanSources::Paths(paths) = &sources else {
            return Ok(Rel::Whole(dsl(sources, None)));
        };
        // Files laid out by ranges of a column the scan returns: parts cut between row groups,
        // each holding one range of that column (grouping or joining by it needs no shuffle).
        if matches!(scan_type, FileScanDsl::Parquet { .. })
            && let Some((key, ranges)) = self.range_split(paths, file_info, columns.as_deref())
        {
            let parts = ranges
                .iter()
                .map(|part| {
                    let files: Vec<PlRefPath> = paths[part.files.clone()].to_vec();
                    dsl(
                        ScanSources::Paths(files.into()),
                        part.slice.map(|(offset, len)| (offset as i64, len as IdxSize)),
                    )
                })
                .collect();
            let lows = ranges.iter().filter_map(|part| part.low).collect();
            let label = format!("scan {name} ({} parts by ranges of {key})", ranges.len());
            return Ok(Rel::Spread { parts, partitioned: Some(Partitioning::Ranges { key, lows }), label });
        }
        if paths.len() >= 2 {
            // Whole files per task, in order.
            let n = paths.len().min(self.limits.max_tasks);
            let parts = (0..n)
                .map(|i| {
                    let chunk: Vec<PlRefPath> = paths
                        .iter()
                        .skip(i * paths.len() / n)
                        .take((i + 1) * paths.len() / n - i * paths.len() / n)
                        .cloned()
                        .collect();
                    dsl(ScanSources::Paths(chunk.into()), None)
                })
                .collect();
            return Ok(Rel::Spread {
                parts,
                partitioned: None,
                label: format!("scan {name} ({} files in {n} parts)", paths.len()),
            });
        }
        // One file: row ranges (a Parquet reader skips the row groups outside its range).
        let rows = exact_rows(file_info);
        let n = match rows {
            Some(rows) if matches!(scan_type, FileScanDsl::Parquet { .. } | FileScanDsl::Ipc { .. }) => {
                (rows / self.limits.min_rows_per_task.max(1)).clamp(1, self.limits.max_tasks as u64) as usize
            }
            _ => 1,
        };
        if n < 2 {
            return Ok(Rel::Whole(dsl(sources, None)));
        }
        let rows = rows.unwrap();
        let parts = (0..n as u64)
            .map(|i| {
                let (start, end) = (i * rows / n as u64, (i + 1) * rows / n as u64);
                dsl(sources.clone(), Some((start as i64, (end - start) as IdxSize)))
            })
            .collect();
        Ok(Rel::Spread { parts, partitioned: None, label: format!("scan {name} ({rows} rows in {n} parts)") })
    }
}

/// A scan of the plan as DSL, for any of its sources (a part's files or all of them).
pub(super) struct ScanDsl {
    pub(super) sources: ScanSources,
    pub(super) file_info: FileInfo,
    pub(super) args: UnifiedScanArgs,
    pub(super) scan_type: FileScanDsl,
    pub(super) predicate: Option<Expr>,
    pub(super) columns: Option<Vec<PlSmallStr>>,
}

impl ScanDsl {
    pub(super) fn plan(&self, sources: ScanSources, slice: Option<(i64, IdxSize)>) -> DslPlan {
        let mut plan = DslPlan::Scan {
            sources,
            unified_scan_args: Box::new(self.args.clone()),
            scan_type: Box::new(self.scan_type.clone()),
            cached_ir: Arc::new(Mutex::new(None)),
        };
        if let Some((offset, len)) = slice {
            plan = DslPlan::Slice { input: Arc::new(plan), offset, len };
        }
        if let Some(p) = &self.predicate {
            plan = DslPlan::Filter { input: Arc::new(plan), predicate: p.clone() };
        }
        if let Some(c) = &self.columns {
            plan = select_columns(plan, c.iter());
        }
        plan
    }
}

pub(super) fn exact_rows(info: &FileInfo) -> Option<u64> {
    match info.stats.rows {
        Card::Exact(rows) => Some(rows),
        _ => None,
    }
}

/// The IR caches (subplans read more than once, found by Polars' common-subplan elimination)
/// whose every reader, through column selections, groups them by one key column or joins them
/// on it: planned once and partitioned by that key, the readers need no shuffle of their own.
/// PDS-H q17 joins the parts of lineitem it reads with their averages per part key: lineitem is
/// then read once instead of twice.
pub(super) fn shared_keys(ir: &IRPlan) -> HashMap<UniqueId, String> {
    let arena = &ir.lp_arena;
    let exprs = &ir.expr_arena;
    let plain = |keys: &[ExprIR]| match keys {
        [k] => match exprs.get(k.node()) {
            AExpr::Column(name) if name == k.output_name() => Some(name.to_string()),
            _ => None,
        },
        _ => None,
    };
    // The cache a reader's input is, through column selections.
    let cache_below = |mut node: Node| loop {
        match arena.get(node) {
            IR::SimpleProjection { input, .. } => node = *input,
            IR::Cache { id, .. } => return Some(*id),
            _ => return None,
        }
    };
    let mut demands: HashMap<UniqueId, Vec<Option<String>>> = HashMap::new();
    let mut stack = vec![ir.lp_top];
    let mut expanded = std::collections::HashSet::new();
    while let Some(node) = stack.pop() {
        let plan = arena.get(node);
        let inputs: Vec<Node> = plan.inputs().collect();
        for (side, &input) in inputs.iter().enumerate() {
            // A selection of columns is part of its reader's way to the cache.
            let Some(id) = cache_below(input).filter(|_| !matches!(plan, IR::SimpleProjection { .. })) else {
                continue;
            };
            let demand = match plan {
                IR::GroupBy { keys, maintain_order: false, apply: None, options, .. }
                    if options.slice.is_none() && !options.is_dynamic() && !options.is_rolling() =>
                {
                    plain(keys)
                }
                IR::Join { options, .. } => match &options.options {
                    JoinTypeOptionsIR::Equi { on, .. } if options.args.slice.is_none() => {
                        let keys: Vec<ExprIR> =
                            on.iter().map(|(l, r)| if side == 0 { l.clone() } else { r.clone() }).collect();
                        plain(&keys)
                    }
                    _ => None,
                },
                _ => None,
            };
            demands.entry(id).or_default().push(demand);
        }
        for input in inputs {
            // A cache's subplan is shared by its readers: walk it once.
            if let IR::Cache { id, .. } = arena.get(input)
                && !expanded.insert(*id)
            {
                continue;
            }
            stack.push(input);
        }
    }
    demands
        .into_iter()
        .filter_map(|(id, keys)| {
            let first = keys.first()?.clone()?;
            (keys.len() >= 2 && keys.iter().all(|k| k.as_deref() == Some(first.as_str()))).then_some((id, first))
        })
        .collect()
}

/// The largest file scan of the plan (by bytes on disk; unknown sizes count as large): the
/// one that is split even when smaller than the broadcast limit.
pub(super) fn largest_scan(ir: &IRPlan) -> Option<Node> {
    let mut best: Option<(u64, Node)> = None;
    let mut stack = vec![ir.lp_top];
    while let Some(node) = stack.pop() {
        let plan = ir.lp_arena.get(node);
        if let IR::Scan { sources, .. } = plan {
            let size = scan_bytes(sources);
            if best.is_none_or(|(b, _)| size > b) {
                best = Some((size, node));
            }
        }
        stack.extend(plan.inputs());
    }
    best.map(|(_, n)| n)
}

/// What all the scans of `ir` read (bytes on disk of the columns they return).
pub(super) fn read_bytes(ir: &IRPlan) -> u64 {
    let mut total = 0u64;
    let mut stack = vec![ir.lp_top];
    while let Some(node) = stack.pop() {
        let plan = ir.lp_arena.get(node);
        if let IR::Scan { sources, file_info, output_schema, .. } = plan {
            let columns: Option<Vec<PlSmallStr>> = output_schema.as_ref().map(|s| s.iter_names().cloned().collect());
            let read = scan_bytes(sources) as f64 * read_share(&file_info.schema, columns.as_deref());
            total = total.saturating_add(read as u64);
        }
        stack.extend(plan.inputs());
    }
    total
}

/// `bytes` for people: "12.3 MiB".
pub(super) fn size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

pub(super) fn scan_bytes(sources: &ScanSources) -> u64 {
    match sources {
        ScanSources::Paths(paths) => paths
            .iter()
            .map(|p| {
                if p.scheme().is_none_or(|s| s.is_file()) {
                    std::fs::metadata(p.as_str()).map(|m| m.len()).unwrap_or(0)
                } else {
                    u64::MAX / 1024
                }
            })
            .fold(0u64, |a, b| a.saturating_add(b)),
        _ => 0,
    }
}

/// The share of a file's bytes that reading `columns` of it takes (all columns: 1), with
/// columns weighed by the typical width of their type.
pub(super) fn read_share(schema: &Schema, columns: Option<&[PlSmallStr]>) -> f64 {
    let weight = |dtype: &DataType| -> f64 {
        match dtype {
            DataType::Boolean | DataType::Int8 | DataType::UInt8 => 1.0,
            DataType::Int16 | DataType::UInt16 => 2.0,
            DataType::Int32 | DataType::UInt32 | DataType::Float32 | DataType::Date => 4.0,
            DataType::Int64
            | DataType::UInt64
            | DataType::Float64
            | DataType::Datetime(..)
            | DataType::Duration(_)
            | DataType::Time => 8.0,
            DataType::String | DataType::Binary => 32.0,
            DataType::List(_) | DataType::Array(..) | DataType::Struct(_) => 64.0,
            _ => 16.0,
        }
    };
    let Some(columns) = columns else { return 1.0 };
    let total: f64 = schema.iter_values().map(weight).sum();
    let read: f64 = columns.iter().filter_map(|c| schema.get(c)).map(weight).sum();
    if total > 0.0 { (read / total).min(1.0) } else { 1.0 }
}

pub(super) fn scan_name(sources: &ScanSources) -> String {
    match sources {
        ScanSources::Paths(paths) => {
            let first =
                paths.first().map(|p| p.as_str().rsplit('/').next().unwrap_or("").to_string()).unwrap_or_default();
            if paths.len() > 1 { format!("{first} and {} more", paths.len() - 1) } else { first }
        }
        _ => "in-memory data".into(),
    }
}
