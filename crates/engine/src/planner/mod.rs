//! Splits a query into stages that run on several workers and exchange data through shuffles.
//!
//! Planning works on Polars' optimized IR (globs expanded, SQL resolved, predicates and
//! projections pushed into the scans, every schema known) and emits, per stage task, a DSL
//! fragment that the worker executes with the ordinary engine. Inputs that come from another
//! stage appear in a fragment as a placeholder scan (`polars-node-input://STAGE/PART`), which
//! the worker replaces by the shuffle files it fetched.
//!
//! A relation is either *whole* (one task can compute it: small scans, gathered data) or
//! *spread* over several tasks (a scan split by files or row ranges, and whatever row-wise
//! operations follow it). Operators that need all rows of a group in one place shuffle by
//! hash; anything this planner cannot distribute is gathered to one task. Plans with IR nodes
//! it cannot express as DSL are not split at all: [`plan_stages`] returns `None` and the query
//! runs whole on one worker.
//!
//! Here: the relations, the walk over the IR (`Planner::visit`, with filters, projections,
//! sorts, slices, distincts, unions and caches) and the stage building blocks (map, gather,
//! shuffle). Beside it: `scans` (how scans are split), `joins` (broadcast, range and hash joins,
//! key filters), `aggregate` (partial and final aggregates) and `fragments` (task DSL).

use std::collections::HashMap;
use std::sync::Mutex;

use polars::prelude::*;
use polars_defs::join::{IEJoinOptions, InequalityOperator};
use polars_plan::plans::expr_ir::ExprIR;
use polars_plan::plans::options::{JoinOptionsIR, ProjectionOptions};
use polars_plan::plans::{
    AExpr, Card, DslFunction, FileInfo, IR, IRAggExpr, IRPlan, ToFieldContext, is_elementwise_rec, node_to_expr,
};
use polars_plan::prelude::{FileScanDsl, FileScanIR, JoinTypeOptionsIR};
use polars_utils::arena::{Arena, Node};
use polars_utils::unique_id::UniqueId;

use crate::clustering::RangePart;
use crate::stage_graph::{StageGraph, StageOutput, StagePlan, input_path, parse_input_path};

mod aggregate;
mod fragments;
mod joins;
mod scans;

use aggregate::order_free;
pub use fragments::{fuse, reads_only_inputs};
use fragments::{inputs_of, placeholder, select_columns, serialize};
use joins::KeyFilter;
use scans::{largest_scan, shared_keys};

/// How far a query may be split.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Tasks per spread stage (workers x partitions per worker).
    pub max_tasks: usize,
    /// Scans at most this large (bytes on disk of the columns they read) are read whole by
    /// every task that needs them (a broadcast) instead of being split; the client's
    /// `allow_equi_join_broadcast_limit`.
    pub broadcast_limit: u64,
    /// Smallest number of rows worth a task of its own when a single file is split.
    pub min_rows_per_task: u64,
    /// Queries whose scans read less than this (bytes on disk of the columns they read) run
    /// whole.
    pub min_split_bytes: u64,
    /// Aggregate within each part before shuffling (the client's `allow_pre_aggregation`).
    pub pre_aggregate: bool,
    /// Sort by range partitions rather than in one task (`allow_partitioned_sort`).
    pub partitioned_sort: bool,
}

/// The planner's decision.
#[derive(Debug)]
pub enum Split {
    Stages(StageGraph),
    /// The query runs whole on one worker, for this reason.
    Whole(String),
}

/// Plans `query` (without its result sink) into stages, or says why it runs whole on one
/// worker (nothing worth splitting, or something this planner cannot express).
pub fn plan_stages(query: &DslPlan, optimization_flags: Option<u32>, limits: Limits) -> PolarsResult<Split> {
    if limits.max_tasks < 2 {
        return Ok(Split::Whole("the query may use one worker with one partition".into()));
    }
    let mut lf = LazyFrame::from(query.clone());
    if let Some(bits) = optimization_flags {
        lf = lf.with_optimizations(OptFlags::from_bits_truncate(bits));
    }
    // Common subexpressions become hidden columns (`__POLARS_CSER_*`) whose broadcasting only
    // Polars' own executor knows how to undo; every task re-optimizes its fragment with them.
    let ir = lf.with_comm_subexpr_elim(false).to_alp_optimized()?;
    let mut planner = Planner {
        ir: &ir,
        limits,
        graph: StageGraph::default(),
        largest_scan: largest_scan(&ir),
        shared_keys: shared_keys(&ir),
        shared: HashMap::new(),
        range_hints: HashMap::new(),
        key_filters: HashMap::new(),
        inexpressible: Default::default(),
    };
    if planner.largest_scan.is_none() {
        return Ok(Split::Whole("the query reads no files".into()));
    }
    let read = scans::read_bytes(&ir);
    if read < limits.min_split_bytes {
        return Ok(Split::Whole(format!(
            "its scans read about {} in all, less than a split pays for (scheduler.min_split_bytes = {}; \
             single_worker_ops=\"forbid\" splits it anyway)",
            scans::size(read),
            scans::size(limits.min_split_bytes)
        )));
    }
    let root = match planner.visit(ir.lp_top) {
        Ok(rel) => rel,
        Err(Unsupported(what)) => {
            return Ok(Split::Whole(format!("the distributed planner does not split {what} yet")));
        }
    };
    if let Some(what) = planner.inexpressible.take() {
        return Ok(Split::Whole(format!("the distributed planner cannot express `{what}` in a task")));
    }
    if planner.graph.stages.is_empty() && matches!(root, Rel::Whole(_)) {
        return Ok(Split::Whole("its scans are too small to split".into()));
    }
    let whole = planner.gather(root, "result");
    let label = "result".to_string();
    let inputs = inputs_of(&whole);
    planner.graph.stages.push(StagePlan {
        tasks: vec![serialize(&whole)?],
        output: StageOutput::Result,
        inputs,
        label,
    });
    planner.graph.logical_plan = ir.describe();
    Ok(Split::Stages(planner.graph))
}

/// The columns by which a spread relation's rows are placed in its parts.
fn partition_keys(rel: &Rel) -> Option<Vec<&str>> {
    match rel {
        Rel::Spread { partitioned: Some(p), .. } => Some(p.keys()),
        _ => None,
    }
}

/// Whether every group of `keys` lies within one part of `rel` (it is spread by some of them).
fn grouped(rel: &Rel, keys: &[String]) -> bool {
    partition_keys(rel).is_some_and(|by| !by.is_empty() && by.iter().all(|k| keys.iter().any(|key| key == k)))
}

/// Why a plan is not split.
struct Unsupported(String);

type Planned<T> = Result<T, Unsupported>;

fn unsupported<T>(what: impl Into<String>) -> Planned<T> {
    Err(Unsupported(what.into()))
}

/// A relation during planning.
#[derive(Clone)]
enum Rel {
    /// Computed as one piece by whichever task needs it.
    Whole(DslPlan),
    /// Spread over tasks: task `i` computes `parts[i]`, placed by `partitioned` if known.
    Spread { parts: Vec<DslPlan>, partitioned: Option<Partitioning>, label: String },
}

/// How a spread relation's rows are placed in its parts: rows with equal keys are in the same
/// part.
#[derive(Debug, Clone, PartialEq)]
enum Partitioning {
    /// By the hash of these columns (a shuffle's output, `max_tasks` partitions).
    Hash(Vec<String>),
    /// Part `i` holds the rows whose `key` is at least `lows[i - 1]` (part 0: any) and below
    /// `lows[i]` (the last part: any); rows with a null key only part 0. A scan of files laid
    /// out by the key is split so (see [`crate::clustering`]).
    Ranges { key: String, lows: Vec<i64> },
}

impl Partitioning {
    fn keys(&self) -> Vec<&str> {
        match self {
            Partitioning::Hash(keys) => keys.iter().map(String::as_str).collect(),
            Partitioning::Ranges { key, .. } => vec![key.as_str()],
        }
    }
}

struct Planner<'a> {
    ir: &'a IRPlan,
    limits: Limits,
    graph: StageGraph,
    /// The scan that is always split (the largest one), by node.
    largest_scan: Option<Node>,
    /// Subplans read more than once (IR caches) whose readers all group or join them by one
    /// key: see [`shared_keys`].
    shared_keys: HashMap<UniqueId, String>,
    /// Those subplans once planned (shuffled by their key), for their other readers.
    shared: HashMap<UniqueId, Rel>,
    /// Group_by nodes whose shuffle goes by ranges of a key (key, lows) a join after them
    /// wants, instead of by hash.
    range_hints: HashMap<Node, (String, Vec<i64>)>,
    /// Group_by nodes whose input rows may first be semi-joined on a group key (the column)
    /// with a small filtered scan that holds every value of it a join after the group_by can
    /// match: the groups of other values would be dropped by that join (see `key_source`).
    key_filters: HashMap<Node, KeyFilter>,
    /// The first IR expression met that has no DSL form (see [`Self::expr`]).
    inexpressible: std::cell::RefCell<Option<String>>,
}

impl Planner<'_> {
    fn arena(&self) -> &Arena<IR> {
        &self.ir.lp_arena
    }

    fn exprs(&self) -> &Arena<AExpr> {
        &self.ir.expr_arena
    }

    /// An IR expression as DSL. Dynamic predicates (runtime filters Polars attaches to scans
    /// for a top-k or a join) are dropped: each task's optimizer attaches its own. Other IR
    /// that has no DSL form reads back as a display-only expression no task could run: noted
    /// in `inexpressible`, and the query is not split.
    fn expr(&self, e: &ExprIR) -> Expr {
        node_to_expr(e.node(), self.exprs()).map_expr(|e| match e {
            Expr::Display { fmt_str, .. } if fmt_str.starts_with("dynamic_pred") => lit(true),
            Expr::Display { fmt_str, inputs } => {
                self.inexpressible.borrow_mut().get_or_insert_with(|| fmt_str.to_string());
                Expr::Display { fmt_str, inputs }
            }
            e => e,
        })
    }

    /// An expression that keeps its IR output name.
    fn named(&self, e: &ExprIR) -> Expr {
        self.expr(e).alias(e.output_name().clone())
    }

    /// Whether the rows of `node` come out of an aggregation (group_by, unique).
    fn aggregated(&self, node: Node) -> bool {
        match self.arena().get(node) {
            IR::GroupBy { .. } | IR::Distinct { .. } => true,
            ir => ir.inputs().any(|input| self.aggregated(input)),
        }
    }

    fn elementwise(&self, exprs: &[ExprIR]) -> bool {
        exprs.iter().all(|e| is_elementwise_rec(e.node(), self.exprs()))
    }

    fn visit(&mut self, node: Node) -> Planned<Rel> {
        let ir = self.arena().get(node).clone();
        match ir {
            IR::Scan { .. } => self.scan(node),
            IR::DataFrameScan { df, schema, output_schema } => {
                let mut plan = DslPlan::DataFrameScan { df, schema };
                if let Some(out) = output_schema {
                    plan = select_columns(plan, out.iter_names());
                }
                Ok(Rel::Whole(plan))
            }
            IR::Filter { input, predicate } => {
                // A predicate that looks at other rows (`x > x.mean()`) needs all of them.
                let rowwise = self.elementwise(std::slice::from_ref(&predicate));
                let predicate = self.expr(&predicate);
                let rel = self.visit(input)?;
                let rel = if rowwise { rel } else { Rel::Whole(self.gather(rel, "filter")) };
                Ok(self
                    .map(rel, "filter", true, |p| DslPlan::Filter { input: Arc::new(p), predicate: predicate.clone() }))
            }
            IR::SimpleProjection { input, columns } => {
                let rel = self.visit(input)?;
                let names: Vec<PlSmallStr> = columns.iter_names().cloned().collect();
                Ok(self.map(rel, "project", true, |p| select_columns(p, names.iter())))
            }
            IR::Select { input, expr, options, schema } => {
                let exprs: Vec<Expr> = expr.iter().map(|e| self.named(e)).collect();
                let rowwise = self.elementwise(&expr);
                let rel = self.visit(input)?;
                // Aggregates over all rows: each part aggregates its rows, one task combines.
                if !rowwise
                    && matches!(rel, Rel::Spread { .. })
                    && let Some(split) = self.decompose(&expr, input, &schema)
                {
                    let Rel::Spread { parts, label, .. } = rel else { unreachable!() };
                    let partial = split.partial.clone();
                    let parts = parts
                        .into_iter()
                        .map(|p| DslPlan::Select {
                            expr: partial.clone(),
                            input: Arc::new(p),
                            options: Default::default(),
                        })
                        .collect();
                    let rel =
                        Rel::Spread { parts, partitioned: None, label: format!("{label} → partial aggregates") };
                    let gathered = self.gather(rel, "final aggregates");
                    return Ok(Rel::Whole(DslPlan::Select { expr: split.finals, input: Arc::new(gathered), options }));
                }
                let rel = if rowwise { rel } else { Rel::Whole(self.gather(rel, "select")) };
                let passed: Vec<String> = self.column_names_each(&expr);
                let keeps = partition_keys(&rel).is_some_and(|keys| keys.iter().all(|k| passed.iter().any(|p| p == k)));
                Ok(self.map(rel, "select", keeps, |p| DslPlan::Select {
                    expr: exprs.clone(),
                    input: Arc::new(p),
                    options,
                }))
            }
            IR::HStack { input, exprs, options, .. } => {
                let rowwise = self.elementwise(&exprs);
                let replaced: Vec<String> = exprs.iter().map(|e| e.output_name().to_string()).collect();
                let exprs: Vec<Expr> = exprs.iter().map(|e| self.named(e)).collect();
                let rel = self.visit(input)?;
                let rel = if rowwise { rel } else { Rel::Whole(self.gather(rel, "with_columns")) };
                let keeps =
                    partition_keys(&rel).is_some_and(|keys| keys.iter().all(|k| !replaced.iter().any(|r| r == k)));
                Ok(self.map(rel, "with_columns", keeps, |p| DslPlan::HStack {
                    input: Arc::new(p),
                    exprs: exprs.clone(),
                    options,
                }))
            }
            IR::GroupBy { input, keys, aggs, maintain_order, options, apply, schema } => {
                if apply.is_some() || options.is_dynamic() || options.is_rolling() {
                    return unsupported("group_by with a function, dynamic or rolling windows");
                }
                let key_names = self.column_names(&keys);
                let split = match maintain_order || options.slice.is_some() || keys.is_empty() {
                    true => None,
                    false => self.decompose(&aggs, input, &schema),
                };
                let key_outputs: Vec<String> = keys.iter().map(|k| k.output_name().to_string()).collect();
                let order_free_aggs = aggs.iter().all(|a| order_free(a.node(), self.exprs()));
                let keys: Vec<Expr> = keys.iter().map(|e| self.named(e)).collect();
                let aggs: Vec<Expr> = aggs.iter().map(|e| self.named(e)).collect();
                let slice = options.slice;
                let build_keys = keys.clone();
                let build = move |p: DslPlan| DslPlan::GroupBy {
                    input: Arc::new(p),
                    keys: build_keys.clone(),
                    predicates: vec![],
                    aggs: aggs.clone(),
                    maintain_order,
                    options: Arc::new(GroupbyOptions { slice, ..Default::default() }),
                    apply: None,
                };
                let mut rel = self.visit(input)?;
                // Rows of groups a join after this group_by drops are dropped before they are
                // aggregated and shuffled (not when no shuffle is needed: the join drops them
                // where they are, without reading the filter's scan in every part).
                if let Some(filter) = self.key_filters.remove(&node)
                    && matches!(rel, Rel::Spread { .. })
                    && !key_names.as_ref().is_some_and(|names| grouped(&rel, names))
                {
                    rel = self.map(rel, &format!("semi join by {}", filter.column), true, |p| filter.apply(p));
                }
                // Partial aggregates per part, shuffled by key, combined per partition.
                if let (Rel::Spread { .. }, Some(split)) = (&rel, split)
                    && !key_names.as_ref().is_some_and(|names| grouped(&rel, names))
                {
                    let group = |input: DslPlan, keys: Vec<Expr>, aggs: Vec<Expr>| DslPlan::GroupBy {
                        input: Arc::new(input),
                        keys,
                        predicates: vec![],
                        aggs,
                        maintain_order: false,
                        options: Default::default(),
                        apply: None,
                    };
                    let (partial_keys, partial) = (keys.clone(), split.partial.clone());
                    let rel =
                        self.map(rel, "partial group_by", false, |p| group(p, partial_keys.clone(), partial.clone()));
                    let rel = self.grouped_by(rel, &key_outputs, Some(node));
                    let final_keys: Vec<Expr> = key_outputs.iter().map(|k| col(k.as_str())).collect();
                    // Each group's row stays in its key's partition (a join on the keys needs
                    // no new shuffle).
                    return Ok(
                        self.map(rel, "final group_by", true, |p| group(p, final_keys.clone(), split.finals.clone()))
                    );
                }
                match (rel, key_names) {
                    // Every row of a group lands in the same partition: each part aggregates
                    // its groups completely.
                    (rel @ Rel::Spread { .. }, Some(names))
                        if !maintain_order && slice.is_none() && !names.is_empty() && order_free_aggs =>
                    {
                        let rel = self.grouped_by(rel, &names, Some(node));
                        Ok(self.map(rel, "group_by", true, build))
                    }
                    (rel, _) => Ok(Rel::Whole(build(self.gather(rel, "group_by")))),
                }
            }
            IR::Join { input_left, input_right, options, schema: _ } => self.join(input_left, input_right, &options),
            IR::Sort { input, by_column, slice, sort_options } => {
                let by: Vec<Expr> = by_column.iter().map(|e| self.expr(e)).collect();
                let slice = slice.map(|(offset, len, _)| (offset, len));
                let rel = self.visit(input)?;
                let sort = |p: DslPlan, slice: Option<(i64, usize)>| DslPlan::Sort {
                    input: Arc::new(p),
                    by_column: by.clone(),
                    slice,
                    sort_options: sort_options.clone(),
                };
                // A top-k: every part keeps its own first offset+len rows, the gathered
                // candidates are sorted once more.
                // A whole sort: sample the first key's boundaries, send each row to the
                // partition of its key range, sort every partition; the partitions, in order,
                // are the sorted rows.
                let first_key =
                    self.column_names(&by_column[..1.min(by_column.len())]).and_then(|k| k.into_iter().next());
                // Not after an aggregation (its output is mostly small: one task sorts it
                // faster than four stages would).
                if let (Rel::Spread { .. }, None, Some(key)) = (&rel, slice, first_key)
                    && self.limits.partitioned_sort
                    && !self.aggregated(input)
                    && !sort_options.maintain_order
                    && self.orderable(input, &key)
                {
                    let Rel::Spread { parts, label, .. } = rel else { unreachable!() };
                    let (descending, nulls_last) = (sort_options.descending[0], sort_options.nulls_last[0]);
                    let partitions = self.limits.max_tasks;
                    let keys = parts
                        .iter()
                        .map(|p| select_columns(p.clone(), [PlSmallStr::from(key.as_str())].iter()))
                        .collect();
                    let sample = self.add_stage(keys, StageOutput::Single, format!("{label} → sort keys"));
                    let boundaries = self.add_stage(
                        vec![placeholder(sample, None)],
                        StageOutput::Boundaries { key: key.clone(), descending, nulls_last, partitions },
                        format!("boundaries of {key}"),
                    );
                    let ranged = self.add_stage(
                        parts,
                        StageOutput::Range { key: key.clone(), descending, nulls_last, partitions, boundaries },
                        format!("{label} → range partition by {key}"),
                    );
                    self.graph.stages[ranged].inputs.push(boundaries);
                    let parts = (0..partitions).map(|i| sort(placeholder(ranged, Some(i)), None)).collect();
                    return Ok(Rel::Spread {
                        parts,
                        partitioned: None,
                        label: format!("stage {ranged} ranges → sort"),
                    });
                }
                let rel = match (rel, slice) {
                    (Rel::Spread { parts, label, .. }, Some((offset, len))) if offset >= 0 => {
                        let keep = Some((0, offset as usize + len));
                        let parts = parts.into_iter().map(|p| sort(p, keep)).collect();
                        Rel::Spread {
                            parts,
                            partitioned: None,
                            label: format!("{label} → top {}", offset as usize + len),
                        }
                    }
                    (rel, _) => rel,
                };
                Ok(Rel::Whole(sort(self.gather(rel, "sort"), slice)))
            }
            IR::Slice { input, offset, len } => {
                let rel = self.visit(input)?;
                Ok(Rel::Whole(DslPlan::Slice { input: Arc::new(self.gather(rel, "slice")), offset, len }))
            }
            IR::Distinct { input, options } => {
                let subset = options.subset.clone();
                let names: Option<Vec<String>> = subset.as_ref().map(|s| s.iter().map(|n| n.to_string()).collect());
                // The columns that make a row distinct (without a subset: all of them).
                let compared: Vec<String> = names.clone().unwrap_or_else(|| {
                    self.arena().get(input).schema(self.arena()).iter_names().map(|n| n.to_string()).collect()
                });
                let distinct = move |p: DslPlan| {
                    let plan = DslPlan::Distinct {
                        input: Arc::new(p),
                        options: DistinctOptionsDSL {
                            subset: subset.as_ref().map(|s| s.iter().map(|n| col(n.clone())).collect()),
                            maintain_order: options.maintain_order,
                            keep_strategy: options.keep_strategy,
                        },
                    };
                    match options.slice {
                        Some((offset, len)) => DslPlan::Slice { input: Arc::new(plan), offset, len: len as IdxSize },
                        None => plan,
                    }
                };
                let rel = self.visit(input)?;
                // Duplicates dropped within each part first (a pre-aggregation): less to
                // shuffle or gather.
                let rel = match rel {
                    Rel::Spread { .. }
                        if self.limits.pre_aggregate
                            && !grouped(&rel, &compared)
                            && !options.maintain_order
                            && options.slice.is_none()
                            && matches!(options.keep_strategy, UniqueKeepStrategy::Any) =>
                    {
                        let partial = options.subset.clone();
                        self.map(rel, "partial unique", true, |p| DslPlan::Distinct {
                            input: Arc::new(p),
                            options: DistinctOptionsDSL {
                                subset: partial.as_ref().map(|s| s.iter().map(|n| col(n.clone())).collect()),
                                maintain_order: false,
                                keep_strategy: UniqueKeepStrategy::Any,
                            },
                        })
                    }
                    rel => rel,
                };
                let by_part = !options.maintain_order
                    && options.slice.is_none()
                    && matches!(options.keep_strategy, UniqueKeepStrategy::Any | UniqueKeepStrategy::None);
                match (rel, names) {
                    // Spread by some of the compared columns: duplicates are within a part.
                    (rel @ Rel::Spread { .. }, _) if by_part && grouped(&rel, &compared) => {
                        Ok(self.map(rel, "unique", true, distinct))
                    }
                    (rel @ Rel::Spread { .. }, Some(names)) if by_part => {
                        let rel = self.grouped_by(rel, &names, None);
                        Ok(self.map(rel, "unique", true, distinct))
                    }
                    (rel, _) => Ok(Rel::Whole(distinct(self.gather(rel, "unique")))),
                }
            }
            IR::Union { inputs, options } => {
                let mut rels = Vec::new();
                for input in inputs {
                    rels.push(self.visit(input)?);
                }
                // A concatenation of split inputs stays split: its parts are the inputs' parts
                // in order (a gather later reads them in that order).
                if options.slice.is_none() && rels.iter().any(|r| matches!(r, Rel::Spread { .. })) {
                    let mut parts = Vec::new();
                    for rel in rels {
                        match rel {
                            Rel::Whole(p) => parts.push(p),
                            Rel::Spread { parts: p, .. } => parts.extend(p),
                        }
                    }
                    let n = parts.len();
                    return Ok(Rel::Spread { parts, partitioned: None, label: format!("concat ({n} parts)") });
                }
                let mut plans = Vec::new();
                for rel in rels {
                    plans.push(self.gather(rel, "concat"));
                }
                let args = UnionArgs {
                    parallel: options.parallel,
                    rechunk: options.rechunk,
                    to_supertypes: false,
                    diagonal: false,
                    strict: false,
                    from_partitioned_ds: options.from_partitioned_ds,
                    maintain_order: options.maintain_order,
                };
                let union = DslPlan::Union { inputs: plans, args };
                Ok(Rel::Whole(match options.slice {
                    Some((offset, len)) => DslPlan::Slice { input: Arc::new(union), offset, len: len as IdxSize },
                    None => union,
                }))
            }
            // A subplan read twice or more: each reader plans it again (its parts then run in the
            // same tasks, where Polars computes them once), unless all its readers group or
            // join it by one key: then it is computed once, partitioned by that key.
            IR::Cache { input, id } => {
                if let Some(rel) = self.shared.get(&id) {
                    return Ok(rel.clone());
                }
                let rel = self.visit(input)?;
                match self.shared_keys.get(&id).cloned() {
                    Some(key) if matches!(rel, Rel::Spread { .. }) => {
                        let rel = self.grouped_by(rel, &[key], None);
                        self.shared.insert(id, rel.clone());
                        Ok(rel)
                    }
                    _ => Ok(rel),
                }
            }
            IR::MapFunction { input, function } => {
                use polars_plan::plans::FunctionIR;
                match function {
                    FunctionIR::Rechunk | FunctionIR::Hint(_) => self.visit(input),
                    FunctionIR::RowIndex { name, offset, .. } => {
                        let rel = self.visit(input)?;
                        let plan = self.gather(rel, "with_row_index");
                        Ok(Rel::Whole(DslPlan::MapFunction {
                            input: Arc::new(plan),
                            function: DslFunction::RowIndex { name, offset },
                        }))
                    }
                    other => unsupported(format!("map function {other}")),
                }
            }
            other => unsupported(format!("{} node", other.name())),
        }
    }

    /// The names of `exprs` when each is a plain column, for hash partitioning.
    fn column_names(&self, exprs: &[ExprIR]) -> Option<Vec<String>> {
        exprs
            .iter()
            .map(|e| match self.exprs().get(e.node()) {
                AExpr::Column(name) if name == e.output_name() => Some(name.to_string()),
                _ => None,
            })
            .collect()
    }

    /// The output names of those expressions that pass a column through unchanged.
    fn column_names_each(&self, exprs: &[ExprIR]) -> Vec<String> {
        exprs.iter().filter_map(|e| self.column_names(std::slice::from_ref(e))).flatten().collect()
    }

    /// Applies `f` to a relation: to every part of a spread one (`keeps_partitioning`: the
    /// partitioning still holds after it: rows stay where they are with their key columns, or
    /// the operation groups by those keys and more).
    fn map(&self, rel: Rel, what: &str, keeps_partitioning: bool, f: impl Fn(DslPlan) -> DslPlan) -> Rel {
        match rel {
            Rel::Whole(p) => Rel::Whole(f(p)),
            Rel::Spread { parts, partitioned, label } => Rel::Spread {
                parts: parts.into_iter().map(&f).collect(),
                partitioned: if keeps_partitioning { partitioned } else { None },
                label: format!("{label} → {what}"),
            },
        }
    }

    /// A whole relation that every task of a join will read: if it aggregates (costly to
    /// compute, small to keep), one task computes it in a stage of its own and the others read
    /// its output, instead of every task computing it. (A join of dimension tables is not
    /// worth it: measured, its output costs more to write and read than to compute again.)
    fn computed_once(&mut self, plan: DslPlan, consumer: &str) -> DslPlan {
        let mut costly = false;
        crate::walk(&plan, &mut |p| costly |= matches!(p, DslPlan::GroupBy { .. } | DslPlan::Distinct { .. }));
        if !costly {
            return plan;
        }
        let stage = self.add_stage(vec![plan], StageOutput::Single, format!("computed once for a {consumer}"));
        placeholder(stage, None)
    }

    /// Ends a spread relation in a stage whose tasks each write one partition, read whole by
    /// the consumer; a whole relation stays as it is.
    fn gather(&mut self, rel: Rel, consumer: &str) -> DslPlan {
        match rel {
            Rel::Whole(p) => p,
            Rel::Spread { parts, label, .. } => {
                let stage = self.add_stage(parts, StageOutput::Single, format!("{label} → gather for {consumer}"));
                placeholder(stage, None)
            }
        }
    }

    /// A spread relation hash-partitioned by `keys` (shuffling it unless it already is).
    fn hashed_by(&mut self, rel: Rel, keys: &[String]) -> Rel {
        match rel {
            Rel::Spread { partitioned: Some(Partitioning::Hash(h)), parts, label } if h == keys => {
                Rel::Spread { parts, partitioned: Some(Partitioning::Hash(h)), label }
            }
            Rel::Spread { parts, label, .. } => self.shuffle(parts, keys, label),
            Rel::Whole(p) => self.shuffle(vec![p], keys, "whole".into()),
        }
    }

    /// A spread relation with each group of `keys` within one part: as it is if it already is
    /// (spread by some of the keys), else shuffled: by the ranges a join after the group_by
    /// `node` wants (see `range_hints`), or by hash.
    fn grouped_by(&mut self, rel: Rel, keys: &[String], node: Option<Node>) -> Rel {
        if grouped(&rel, keys) {
            return rel;
        }
        match node.and_then(|n| self.range_hints.get(&n).cloned()) {
            Some((key, lows)) => self.shuffle_by_ranges(rel, &key, lows),
            None => self.hashed_by(rel, keys),
        }
    }

    fn shuffle(&mut self, parts: Vec<DslPlan>, keys: &[String], label: String) -> Rel {
        let partitions = self.limits.max_tasks;
        let stage = self.add_stage(
            parts,
            StageOutput::Hash { keys: keys.to_vec(), partitions },
            format!("{label} → shuffle by {}", keys.join(", ")),
        );
        Rel::Spread {
            parts: (0..partitions).map(|i| placeholder(stage, Some(i))).collect(),
            partitioned: Some(Partitioning::Hash(keys.to_vec())),
            label: format!("stage {stage} partitions"),
        }
    }

    fn add_stage(&mut self, parts: Vec<DslPlan>, output: StageOutput, label: String) -> usize {
        let inputs = {
            let mut all: Vec<usize> = parts.iter().flat_map(inputs_of).collect();
            all.sort_unstable();
            all.dedup();
            all
        };
        let tasks = parts.iter().map(|p| serialize(p).expect("planned fragments serialize")).collect();
        self.graph.stages.push(StagePlan { tasks, output, inputs, label });
        self.graph.stages.len() - 1
    }

    /// Whether the column `name` of `node`'s output has a type range partitioning can order.
    fn orderable(&self, node: Node, name: &str) -> bool {
        let schema = self.arena().get(node).schema(self.arena());
        schema.get(name).is_some_and(|dtype| {
            dtype.is_primitive_numeric()
                || matches!(dtype, DataType::String | DataType::Date | DataType::Datetime(..) | DataType::Boolean)
        })
    }
}
