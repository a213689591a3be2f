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

    /// Splits aggregations into partial aggregates (computed per part) and final expressions
    /// that combine them, cast to the dtypes the whole aggregation has (`schema`). `None` when
    /// an aggregation cannot be split this way (medians, distinct counts, first/last, ...).
    fn decompose(&self, aggs: &[ExprIR], input: Node, schema: &Schema) -> Option<PreAggregation> {
        if !self.limits.pre_aggregate {
            return None;
        }
        let input_schema = self.arena().get(input).schema(self.arena()).into_owned();
        let mut arena = self.exprs().clone();
        let mut partial: Vec<Expr> = Vec::new();
        let mut finals = Vec::new();
        for agg in aggs {
            let mut leaves = Vec::new();
            collect_aggregates(agg.node(), &arena, &input_schema, &mut leaves)?;
            for leaf in leaves {
                let mut column = |expr: Expr, arena: &mut Arena<AExpr>| {
                    let name = format!("__polars_node_partial_{}", partial.len());
                    partial.push(expr.alias(name.as_str()));
                    arena.add(AExpr::Column(name.as_str().into()))
                };
                let combined = match arena.get(leaf).clone() {
                    AExpr::Len => {
                        let c = column(len(), &mut arena);
                        AExpr::Agg(IRAggExpr::Sum { input: c, null_on_empty: false })
                    }
                    AExpr::Agg(IRAggExpr::Sum { null_on_empty, .. }) => {
                        let c = column(node_to_expr(leaf, &arena), &mut arena);
                        AExpr::Agg(IRAggExpr::Sum { input: c, null_on_empty })
                    }
                    AExpr::Agg(IRAggExpr::Count { .. }) => {
                        let c = column(node_to_expr(leaf, &arena), &mut arena);
                        AExpr::Agg(IRAggExpr::Sum { input: c, null_on_empty: false })
                    }
                    AExpr::Agg(IRAggExpr::Min { propagate_nans, .. }) => {
                        let c = column(node_to_expr(leaf, &arena), &mut arena);
                        AExpr::Agg(IRAggExpr::Min { input: c, propagate_nans })
                    }
                    AExpr::Agg(IRAggExpr::Max { propagate_nans, .. }) => {
                        let c = column(node_to_expr(leaf, &arena), &mut arena);
                        AExpr::Agg(IRAggExpr::Max { input: c, propagate_nans })
                    }
                    AExpr::Agg(IRAggExpr::Mean(input)) => {
                        // mean = sum / count of the non-null values, in Float64.
                        let value = node_to_expr(input, &arena);
                        let sum = column(value.clone().sum(), &mut arena);
                        let count = column(value.count(), &mut arena);
                        let f64 = |node, arena: &mut Arena<AExpr>| {
                            let agg = arena.add(AExpr::Agg(IRAggExpr::Sum { input: node, null_on_empty: false }));
                            arena.add(AExpr::Cast {
                                expr: agg,
                                dtype: DataType::Float64,
                                options: polars::chunked_array::cast::CastOptions::NonStrict,
                            })
                        };
                        let (sum, count) = (f64(sum, &mut arena), f64(count, &mut arena));
                        AExpr::BinaryExpr { left: sum, op: Operator::TrueDivide, right: count }
                    }
                    _ => return None,
                };
                arena.replace(leaf, combined);
            }
            let name = agg.output_name();
            let dtype = schema.get(name)?.clone();
            finals.push(node_to_expr(agg.node(), &arena).cast(dtype).alias(name.clone()));
        }
        Some(PreAggregation { partial, finals })
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

    /// A relation shuffled by ranges `lows` of `key`.
    fn shuffle_by_ranges(&mut self, rel: Rel, key: &str, lows: Vec<i64>) -> Rel {
        let (parts, label) = match rel {
            Rel::Spread { parts, label, .. } => (parts, label),
            Rel::Whole(p) => (vec![p], "whole".into()),
        };
        let output = StageOutput::KeyRanges { key: key.to_string(), lows: lows.clone() };
        let stage = self.add_stage(parts, output, format!("{label} → shuffle by ranges of {key}"));
        Rel::Spread {
            parts: (0..=lows.len()).map(|i| placeholder(stage, Some(i))).collect(),
            partitioned: Some(Partitioning::Ranges { key: key.to_string(), lows }),
            label: format!("stage {stage} partitions"),
        }
    }

    /// One side spread by ranges of a join key and the other spread otherwise: the other is
    /// shuffled by those ranges (the first stays where it is) rather than both by hash.
    fn aligned_by_ranges(&mut self, l: Rel, r: Rel, pairs: &[(String, String)]) -> (Rel, Rel) {
        if !matches!((&l, &r), (Rel::Spread { .. }, Rel::Spread { .. })) || same_ranges(&l, &r, pairs).is_some() {
            return (l, r);
        }
        if let Some((key, lows)) = ranges_of(&l)
            && let Some((_, other)) = pairs.iter().find(|(a, _)| *a == key)
        {
            let r = self.shuffle_by_ranges(r, other, lows);
            return (l, r);
        }
        if let Some((key, lows)) = ranges_of(&r)
            && let Some((other, _)) = pairs.iter().find(|(_, b)| *b == key)
        {
            let l = self.shuffle_by_ranges(l, other, lows);
            return (l, r);
        }
        (l, r)
    }

    /// For a whole side `table` (a table laid out by its join key) and a spread side not in its
    /// ranges: the spread side's key and the table's ranges to shuffle it by, when that beats the
    /// alternative: always when the table would be shuffled too, and when it would be read
    /// whole by every task (a broadcast), if it reads at least an eighth of the broadcast limit
    /// and the spread side is not in ranges of its own (a scan's ranges cost nothing and serve
    /// later joins: PDS-H q9 joins lineitem with partsupp, then with orders by order key).
    fn table_ranges_for(
        &self,
        table: Node,
        table_is_left: bool,
        spread: &Rel,
        pairs: &[(String, String)],
        broadcast: bool,
    ) -> Option<(String, Vec<i64>)> {
        let spread_ranges = ranges_of(spread);
        pairs.iter().map(|(l, r)| if table_is_left { (l, r) } else { (r, l) }).find_map(|(table_key, spread_key)| {
            if spread_ranges.as_ref().is_some_and(|(key, _)| key == spread_key) {
                return None;
            }
            let (lows, read) = self.scan_ranges(table, table_key)?;
            (!broadcast || (read >= self.limits.broadcast_limit / 8 && spread_ranges.is_none()))
                .then(|| (spread_key.clone(), lows))
        })
    }

    /// A filtered scan that holds every value `column` of `node` can take: found below
    /// filters, projections, caches, distincts and inner or semi joins (through either side of
    /// a key pair); of two, the one that reads less. None when nothing filters the scan (likely
    /// all values of the key: nothing to filter by).
    fn key_source(&self, node: Node, column: &str) -> Option<KeySource> {
        self.key_source_below(node, column, Vec::new())
    }

    /// `key_source` with the `filters` met on the way down that apply to the scan's rows as
    /// they are (those above a join, a renaming selection or new columns do not; dropping a
    /// filter only widens the values).
    fn key_source_below(&self, node: Node, column: &str, mut filters: Vec<ExprIR>) -> Option<KeySource> {
        match self.arena().get(node) {
            IR::Scan { predicate, .. } => {
                let has = self.arena().get(node).schema(self.arena()).contains(column);
                let filtered = has && (predicate.is_some() || !filters.is_empty());
                filtered.then(|| KeySource {
                    scan: node,
                    column: column.to_string(),
                    filters,
                    read_bytes: self.scan_read_bytes(node),
                })
            }
            IR::Filter { input, predicate } => {
                filters.push(predicate.clone());
                self.key_source_below(*input, column, filters)
            }
            IR::Distinct { input, .. } | IR::Cache { input, .. } => self.key_source_below(*input, column, filters),
            IR::SimpleProjection { input, columns } => {
                columns.contains(column).then(|| self.key_source_below(*input, column, filters)).flatten()
            }
            IR::Select { input, expr, .. } => {
                let e = expr.iter().find(|e| e.output_name() == column)?;
                let AExpr::Column(name) = self.exprs().get(e.node()) else { return None };
                self.key_source_below(*input, name, Vec::new())
            }
            IR::HStack { input, exprs, .. } => (!exprs.iter().any(|e| e.output_name() == column))
                .then(|| self.key_source_below(*input, column, Vec::new()))
                .flatten(),
            IR::Join { input_left, input_right, options, .. }
                if matches!(options.args.how, JoinType::Inner | JoinType::Semi) =>
            {
                self.join_column_origins(*input_left, *input_right, options, column)
                    .into_iter()
                    .filter_map(|(side, name)| self.key_source_below(side, &name, Vec::new()))
                    .min_by_key(|source| source.read_bytes)
            }
            _ => None,
        }
    }

    /// The distinct values a key filter reads: the source's scan, filtered, in one column.
    fn key_values(&self, source: &KeySource) -> Option<DslPlan> {
        let scan = self.scan_dsl(source.scan).ok()?;
        let mut plan = scan.plan(scan.sources.clone(), None);
        for predicate in &source.filters {
            plan = DslPlan::Filter { input: Arc::new(plan), predicate: self.expr(predicate) };
        }
        Some(select_columns(plan, [PlSmallStr::from(source.column.as_str())].iter()))
    }

    /// The group_by below `node` whose plain key `column` of `node` comes from, and that key's
    /// name: found below filters, projections and inner, semi or left joins (through the side
    /// the column comes from or, from a key of the kept side, through the key it equals), so
    /// that every row of `node` derived from a group holds that group's key in `column`. A
    /// group_by with a slice is not (losing groups would change which it keeps).
    fn key_target(&self, node: Node, column: &str) -> Option<(Node, String)> {
        let follow = |input: Node| self.key_target(input, column);
        match self.arena().get(node) {
            IR::GroupBy { keys, options, apply: None, .. }
                if options.slice.is_none() && !options.is_dynamic() && !options.is_rolling() =>
            {
                self.column_names_each(keys).iter().any(|k| k == column).then(|| (node, column.to_string()))
            }
            IR::Filter { input, .. } => follow(*input),
            IR::SimpleProjection { input, columns } => columns.contains(column).then(|| follow(*input)).flatten(),
            IR::Select { input, expr, .. } => {
                let e = expr.iter().find(|e| e.output_name() == column)?;
                let AExpr::Column(name) = self.exprs().get(e.node()) else { return None };
                self.key_target(*input, name)
            }
            IR::HStack { input, exprs, .. } => {
                (!exprs.iter().any(|e| e.output_name() == column)).then(|| follow(*input)).flatten()
            }
            IR::Join { input_left, input_right, options, .. }
                if matches!(options.args.how, JoinType::Inner | JoinType::Semi | JoinType::Left) =>
            {
                self.join_column_origins(*input_left, *input_right, options, column)
                    .into_iter()
                    .find_map(|(side, name)| self.key_target(side, &name))
            }
            _ => None,
        }
    }

    /// Where `column` of an equi join's output comes from (inner joins: either side; others:
    /// the left side only): the side that has it and, through a pair of plain key columns of
    /// one type, the other side's key it equals.
    fn join_column_origins(
        &self,
        left: Node,
        right: Node,
        options: &JoinOptionsIR,
        column: &str,
    ) -> Vec<(Node, String)> {
        let JoinTypeOptionsIR::Equi { on, .. } = &options.options else { return Vec::new() };
        let inner = options.args.how == JoinType::Inner;
        let on_left = self.arena().get(left).schema(self.arena()).contains(column);
        if !on_left && !inner {
            return Vec::new();
        }
        let mut origins = vec![(if on_left { left } else { right }, column.to_string())];
        for pair in on.iter().filter(|pair| self.same_key_dtypes(left, right, std::slice::from_ref(*pair))) {
            let (Some(l), Some(r)) =
                (self.column_names(std::slice::from_ref(&pair.0)), self.column_names(std::slice::from_ref(&pair.1)))
            else {
                continue;
            };
            match (on_left, &l[..], &r[..]) {
                (true, [l], [r]) if l == column => origins.push((right, r.clone())),
                (false, [l], [r]) if r == column => origins.push((left, l.clone())),
                _ => {}
            }
        }
        origins
    }

    /// Under column selections and filters (which keep a relation's partitioning).
    fn below_selections(&self, mut node: Node) -> Node {
        while let IR::SimpleProjection { input, .. } | IR::Filter { input, .. } = self.arena().get(node) {
            node = *input;
        }
        node
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

    fn join(&mut self, left: Node, right: Node, options: &JoinOptionsIR) -> Planned<Rel> {
        let mut args = options.args.clone();
        if args.slice.is_some() {
            return unsupported("a join with a slice");
        }
        let (on, fused): (Vec<(ExprIR, ExprIR)>, Option<Expr>) = match &options.options {
            JoinTypeOptionsIR::Equi { on, fused_predicate } => {
                (on.clone(), fused_predicate.as_ref().map(|p| self.expr(p)))
            }
            // Inequality joins and fused cross-join filters: a cross join filtered by the same
            // condition (the worker's optimizer fuses them again).
            // Only for inner joins: a filter after a cross join drops the unmatched rows that a
            // left join keeps.
            JoinTypeOptionsIR::CrossAndFilter { .. } | JoinTypeOptionsIR::IEJoin { .. }
                if !matches!(args.how, JoinType::Inner | JoinType::Cross | JoinType::IEJoin | JoinType::Range) =>
            {
                return unsupported(format!("a {} join on inequalities", <&'static str>::from(&args.how)));
            }
            JoinTypeOptionsIR::CrossAndFilter { predicate } => {
                args.how = JoinType::Cross;
                (Vec::new(), Some(self.expr(predicate)))
            }
            JoinTypeOptionsIR::IEJoin { ie_options, left_on, right_on } => {
                let predicate = self.inequality(left, ie_options, left_on, right_on, args.suffix())?;
                args.how = JoinType::Cross;
                (Vec::new(), Some(predicate))
            }
            other => return unsupported(format!("{} join", <&'static str>::from(other))),
        };
        // Rows in the order of a side: the parts of a split side are not in it.
        if args.maintain_order != MaintainOrderJoin::None {
            return unsupported("a join that maintains the order of its rows");
        }
        // Keys of different types are cast to a common one by Polars, and the casts read back
        // as key expressions would keep both key columns in the output.
        let (ls, rs) = (self.arena().get(left).schema(self.arena()), self.arena().get(right).schema(self.arena()));
        if on
            .iter()
            .any(|(l, r)| matches!((ls.get(l.output_name()), rs.get(r.output_name())), (Some(a), Some(b)) if a != b))
        {
            return unsupported("a join on keys of different types");
        }
        // Join keys may not carry an alias.
        let left_on: Vec<Expr> = on.iter().map(|(l, _)| self.expr(l)).collect();
        let right_on: Vec<Expr> = on.iter().map(|(_, r)| self.expr(r)).collect();
        let cross = on.is_empty();
        let join_options = Arc::new(JoinOptions {
            allow_parallel: options.allow_parallel,
            force_parallel: options.force_parallel,
            args: args.clone(),
        });
        let build = move |l: DslPlan, r: DslPlan| {
            let plan = DslPlan::Join {
                input_left: Arc::new(l),
                input_right: Arc::new(r),
                condition: match cross {
                    true => JoinCondition::default(),
                    false => JoinCondition::Equi { left_on: left_on.clone(), right_on: right_on.clone() },
                },
                options: join_options.clone(),
            };
            // A fused predicate only ever comes with an inner or cross join: filtering after
            // the join is the same.
            match &fused {
                Some(predicate) => DslPlan::Filter { input: Arc::new(plan), predicate: predicate.clone() },
                None => plan,
            }
        };
        // Pairs of keys that are plain columns of one type on both sides (others may be
        // expressions: equal keys agree on these too).
        let plain: Vec<(String, String)> = on
            .iter()
            .filter(|pair| self.same_key_dtypes(left, right, std::slice::from_ref(*pair)))
            .filter_map(|(l, r)| {
                Some((
                    self.column_names(std::slice::from_ref(l))?.pop()?,
                    self.column_names(std::slice::from_ref(r))?.pop()?,
                ))
            })
            .collect();
        // A group_by joined on one of its keys with a table laid out by the join key: the
        // group_by shuffles by that table's ranges, to which the table is then cut rather than
        // read whole by every task (PDS-H q20: lineitem's sums per part and supplier joined
        // with partsupp).
        for (group_side, table_side, flip) in [(left, right, false), (right, left, true)] {
            let group = self.below_selections(group_side);
            let IR::GroupBy { keys: group_keys, .. } = self.arena().get(group) else { continue };
            let group_keys = self.column_names_each(group_keys);
            let hint = plain.iter().map(|(l, r)| if flip { (r, l) } else { (l, r) }).find_map(|(mine, theirs)| {
                let (lows, _) = group_keys.contains(mine).then(|| self.scan_ranges(table_side, theirs)).flatten()?;
                Some((mine.clone(), lows))
            });
            if let Some(hint) = hint.filter(|_| !cross) {
                self.range_hints.insert(group, hint);
            }
        }
        // A group_by below one side whose groups of key values the other side cannot hold are
        // dropped by this join (PDS-H q20: lineitem's sums per part and supplier, joined with
        // partsupp, then semi-joined with the parts of one name): its rows of those groups
        // are dropped before they are aggregated (see `key_filters`).
        for (target_side, filter_side, flip) in [(left, right, false), (right, left, true)] {
            let drops_unmatched = match args.how {
                JoinType::Inner | JoinType::Semi => true,
                JoinType::Anti | JoinType::Left => flip,
                JoinType::Right => !flip,
                _ => false,
            };
            if !drops_unmatched || cross {
                continue;
            }
            for (mine, theirs) in plain.iter().map(|(l, r)| if flip { (r, l) } else { (l, r) }) {
                let Some((group, key)) = self.key_target(target_side, mine) else { continue };
                let Some(source) = self.key_source(filter_side, theirs) else { continue };
                let IR::GroupBy { input: group_input, .. } = self.arena().get(group) else { unreachable!() };
                // Not when the group_by's rows come from the same filtered scan already.
                if self.key_filters.contains_key(&group)
                    || self.key_source(*group_input, &key).is_some_and(|own| own.scan == source.scan)
                {
                    continue;
                }
                if source.read_bytes > self.limits.broadcast_limit || Some(source.scan) == self.largest_scan {
                    continue;
                }
                let Some(values) = self.key_values(&source) else { continue };
                self.key_filters.insert(
                    group,
                    KeyFilter { column: key, values, values_column: source.column, nulls_equal: args.nulls_equal },
                );
            }
        }
        let (l, r) = (self.visit(left)?, self.visit(right)?);
        let how = args.how.clone();
        let keys = (
            self.column_names(&on.iter().map(|(l, _)| l.clone()).collect::<Vec<_>>()),
            self.column_names(&on.iter().map(|(_, r)| r.clone()).collect::<Vec<_>>()),
        );
        let same_dtypes = self.same_key_dtypes(left, right, &on);
        // Which side may stay spread while the other is read whole by every task.
        let (left_may_spread, right_may_spread) = match how {
            JoinType::Inner | JoinType::Cross => (true, true),
            JoinType::Left => (true, false),
            JoinType::Right => (false, true),
            JoinType::Semi | JoinType::Anti => (true, false),
            _ => (false, false),
        };
        // Every output row is a left row with its left columns as they were (so the left side's
        // hash partitioning still holds).
        let keeps_left_rows = matches!(how, JoinType::Inner | JoinType::Left | JoinType::Semi | JoinType::Anti);
        // Sides spread by the same ranges of a pair of join keys, or one side spread so and the
        // other whole: joined part by part, the whole side cut to each part's range.
        // A whole side that is a table laid out by its join key, joined with a spread side that
        // is not in its ranges: the spread side is shuffled by the table's ranges and the table
        // cut to them, where it would otherwise be shuffled by hash too (it is kept whole, see
        // below) or, being large, read whole by every task (PDS-H q13's customers, q10's).
        let (l, r) = match (l, r) {
            (l, r) if cross => (l, r),
            (Rel::Whole(w), s @ Rel::Spread { .. }) if !matches!(how, JoinType::Semi | JoinType::Anti) => {
                let broadcast = right_may_spread;
                match self.table_ranges_for(left, true, &s, &plain, broadcast) {
                    Some((key, lows)) => (Rel::Whole(w), self.shuffle_by_ranges(s, &key, lows)),
                    None => (Rel::Whole(w), s),
                }
            }
            (s @ Rel::Spread { .. }, Rel::Whole(w)) => {
                let broadcast = left_may_spread;
                match self.table_ranges_for(right, false, &s, &plain, broadcast) {
                    Some((key, lows)) => (self.shuffle_by_ranges(s, &key, lows), Rel::Whole(w)),
                    None => (s, Rel::Whole(w)),
                }
            }
            (l, r) => self.aligned_by_ranges(l, r, &plain),
        };
        if !cross && let Some((left_key, right_key, lows)) = same_ranges(&l, &r, &plain) {
            let label = [&l, &r].into_iter().find_map(|rel| match rel {
                Rel::Spread { label, .. } => Some(label.clone()),
                Rel::Whole(_) => None,
            });
            let left_parts = self.cut(l, &left_key, &lows, left);
            let right_parts = self.cut(r, &right_key, &lows, right);
            let parts = left_parts.into_iter().zip(right_parts).map(|(l, r)| build(l, r)).collect();
            let partitioned = keeps_left_rows.then(|| Partitioning::Ranges { key: left_key.clone(), lows });
            return Ok(Rel::Spread {
                parts,
                partitioned,
                label: format!("{} → join by ranges of {left_key}", label.unwrap_or_default()),
            });
        }
        match (l, r) {
            (Rel::Whole(l), Rel::Whole(r)) => Ok(Rel::Whole(build(l, r))),
            (Rel::Spread { parts, label, partitioned }, Rel::Whole(r)) if left_may_spread => {
                let r = self.computed_once(r, "broadcast");
                let parts = parts.into_iter().map(|p| build(p, r.clone())).collect();
                let partitioned = partitioned.filter(|_| keeps_left_rows);
                Ok(Rel::Spread { parts, partitioned, label: format!("{label} → join (broadcast right)") })
            }
            (Rel::Whole(l), Rel::Spread { parts, label, partitioned }) if right_may_spread => {
                let l = self.computed_once(l, "broadcast");
                let parts = parts.into_iter().map(|p| build(l.clone(), p)).collect();
                // An inner join keeps the right rows' columns, under their names unless a left
                // column has the same name (then the right one is suffixed).
                let left_schema = self.arena().get(left).schema(self.arena()).into_owned();
                let partitioned = partitioned.filter(|p| {
                    matches!(how, JoinType::Inner | JoinType::Cross)
                        && p.keys().iter().all(|k| !left_schema.contains(k))
                });
                Ok(Rel::Spread { parts, partitioned, label: format!("{label} → join (broadcast left)") })
            }
            // A semi or anti join of a whole (small) side needs only the distinct keys of the
            // spread side: each part reduces its rows to its keys, one task joins.
            (Rel::Whole(l), Rel::Spread { parts, label, .. })
                if matches!(how, JoinType::Semi | JoinType::Anti) && keys.1.is_some() =>
            {
                let names: Vec<PlSmallStr> =
                    keys.1.unwrap_or_default().iter().map(|k| PlSmallStr::from(k.as_str())).collect();
                let distinct = |p: DslPlan| DslPlan::Distinct {
                    input: Arc::new(select_columns(p, names.iter())),
                    options: DistinctOptionsDSL {
                        subset: None,
                        maintain_order: false,
                        keep_strategy: UniqueKeepStrategy::Any,
                    },
                };
                let parts = parts.into_iter().map(distinct).collect();
                let keys = self.gather(
                    Rel::Spread { parts, partitioned: None, label: format!("{label} → distinct join keys") },
                    "join",
                );
                Ok(Rel::Whole(build(l, keys)))
            }
            (l, r) => match keys {
                (Some(lk), Some(rk)) if !lk.is_empty() && same_dtypes && !matches!(how, JoinType::Cross) => {
                    let Rel::Spread { parts: lp, partitioned, .. } = self.hashed_by(l, &lk) else { unreachable!() };
                    let Rel::Spread { parts: rp, .. } = self.hashed_by(r, &rk) else { unreachable!() };
                    let parts = lp.into_iter().zip(rp).map(|(l, r)| build(l, r)).collect();
                    let partitioned = partitioned.filter(|_| keeps_left_rows);
                    Ok(Rel::Spread { parts, partitioned, label: format!("hash join on {}", lk.join(", ")) })
                }
                // Inner and cross joins: the right side, gathered, is broadcast to the left parts.
                (_, _) if matches!(how, JoinType::Inner | JoinType::Cross) => {
                    let r = self.gather(r, "join");
                    Ok(self.map(l, "join (broadcast right)", false, |p| build(p, r.clone())))
                }
                (_, _) => {
                    let (l, r) = (self.gather(l, "join"), self.gather(r, "join"));
                    Ok(Rel::Whole(build(l, r)))
                }
            },
        }
    }

    /// The parts of `rel` for ranges `lows` of `key`: a spread relation's own (already so), a
    /// whole one filtered to each range (rows with a null key in the first). The filter is pushed
    /// into the scans, where the Parquet reader skips row groups outside the range by their
    /// statistics: a table laid out by the key is read once across the parts, not by each.
    fn cut(&self, rel: Rel, key: &str, lows: &[i64], node: Node) -> Vec<DslPlan> {
        let plan = match rel {
            Rel::Spread { parts, .. } => return parts,
            Rel::Whole(plan) => plan,
        };
        let schema = self.arena().get(node).schema(self.arena());
        let dtype = schema.get(key).cloned().unwrap_or(DataType::Int64);
        let bound = |v: i64| lit(v).cast(dtype.clone());
        (0..=lows.len())
            .map(|i| {
                let above = (i > 0).then(|| col(key).gt_eq(bound(lows[i - 1])));
                let below = lows.get(i).map(|&high| col(key).lt(bound(high)));
                let range = match (above, below) {
                    (Some(a), Some(b)) => a.and(b),
                    (Some(a), None) => a,
                    (None, Some(b)) => b.or(col(key).is_null()),
                    (None, None) => unreachable!("a split has two parts or more"),
                };
                DslPlan::Filter { input: Arc::new(plan.clone()), predicate: range }
            })
            .collect()
    }

    /// An inequality join's condition in the joined output's names (right columns that clash
    /// with left ones carry the suffix).
    fn inequality(
        &self,
        left: Node,
        ie: &IEJoinOptions,
        left_on: &[ExprIR],
        right_on: &[ExprIR],
        suffix: &PlSmallStr,
    ) -> Planned<Expr> {
        let left_schema = self.arena().get(left).schema(self.arena()).into_owned();
        let ops = [Some(ie.operator1), ie.operator2];
        let mut condition: Option<Expr> = None;
        for (i, (l, r)) in left_on.iter().zip(right_on).enumerate() {
            let Some(Some(op)) = ops.get(i).copied() else {
                return unsupported("an inequality join with more keys than operators");
            };
            // Left columns keep their names in the output; a right key is used as it is when
            // none of its columns clashes with a left one (a plain column is renamed).
            let r = match self.exprs().get(r.node()) {
                AExpr::Column(name) if left_schema.contains(name) => col(format!("{name}{suffix}").as_str()),
                _ if polars_plan::utils::aexpr_to_leaf_names(r.node(), self.exprs())
                    .iter()
                    .any(|n| left_schema.contains(n)) =>
                {
                    return unsupported("an inequality join whose right key reads a column named like a left one");
                }
                _ => self.expr(r),
            };
            let l = self.expr(l);
            let e = match op {
                InequalityOperator::Lt => l.lt(r),
                InequalityOperator::LtEq => l.lt_eq(r),
                InequalityOperator::Gt => l.gt(r),
                InequalityOperator::GtEq => l.gt_eq(r),
            };
            condition = Some(match condition {
                Some(c) => c.and(e),
                None => e,
            });
        }
        condition.map_or_else(|| unsupported("an inequality join without keys"), Ok)
    }

    /// Whether the column `name` of `node`'s output has a type range partitioning can order.
    fn orderable(&self, node: Node, name: &str) -> bool {
        let schema = self.arena().get(node).schema(self.arena());
        schema.get(name).is_some_and(|dtype| {
            dtype.is_primitive_numeric()
                || matches!(dtype, DataType::String | DataType::Date | DataType::Datetime(..) | DataType::Boolean)
        })
    }

    /// Hash partitioning sends equal keys to the same partition only when both sides hash
    /// the same types.
    fn same_key_dtypes(&self, left: Node, right: Node, on: &[(ExprIR, ExprIR)]) -> bool {
        let (ls, rs) = (self.arena().get(left).schema(self.arena()), self.arena().get(right).schema(self.arena()));
        on.iter().all(|(l, r)| match (ls.get(l.output_name()), rs.get(r.output_name())) {
            (Some(a), Some(b)) => a == b && hashable(a),
            _ => false,
        })
    }

    /// How a scan of Parquet `paths` laid out by ranges of one of the `columns` it returns (all:
    /// `None`) is split: that column and the parts.
    fn range_split(
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
    fn scan_ranges(&self, mut node: Node, column: &str) -> Option<(Vec<i64>, u64)> {
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
    fn scan_dsl(&self, node: Node) -> Planned<ScanDsl> {
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
    fn scan_read_bytes(&self, node: Node) -> u64 {
        let IR::Scan { sources, file_info, output_schema, .. } = self.arena().get(node) else { unreachable!() };
        let columns: Option<Vec<PlSmallStr>> = output_schema.as_ref().map(|s| s.iter_names().cloned().collect());
        (scan_bytes(sources) as f64 * read_share(&file_info.schema, columns.as_deref())) as u64
    }

    fn scan(&mut self, node: Node) -> Planned<Rel> {
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

/// Where the values of a key come from: a scan, the filters on its rows, the key's column.
struct KeySource {
    scan: Node,
    filters: Vec<ExprIR>,
    column: String,
    /// What the whole scan reads (`scan_read_bytes`).
    read_bytes: u64,
}

/// Rows kept only where `column` holds one of the `values` (in `values_column`): a semi join
/// with the distinct values, read whole by every part.
struct KeyFilter {
    column: String,
    values: DslPlan,
    values_column: String,
    nulls_equal: bool,
}

impl KeyFilter {
    fn apply(&self, rows: DslPlan) -> DslPlan {
        let values = DslPlan::Distinct {
            input: Arc::new(self.values.clone()),
            options: DistinctOptionsDSL { subset: None, maintain_order: false, keep_strategy: UniqueKeepStrategy::Any },
        };
        let mut args = JoinArgs::new(JoinType::Semi);
        args.nulls_equal = self.nulls_equal;
        DslPlan::Join {
            input_left: Arc::new(rows),
            input_right: Arc::new(values),
            condition: JoinCondition::Equi {
                left_on: vec![col(self.column.as_str())],
                right_on: vec![col(self.values_column.as_str())],
            },
            options: Arc::new(JoinOptions { args, ..Default::default() }),
        }
    }
}

/// A scan of the plan as DSL, for any of its sources (a part's files or all of them).
struct ScanDsl {
    sources: ScanSources,
    file_info: FileInfo,
    args: UnifiedScanArgs,
    scan_type: FileScanDsl,
    predicate: Option<Expr>,
    columns: Option<Vec<PlSmallStr>>,
}

impl ScanDsl {
    fn plan(&self, sources: ScanSources, slice: Option<(i64, IdxSize)>) -> DslPlan {
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

/// The ranges both sides of a join on `pairs` of key columns (left, right) can be joined by,
/// part by part: a pair by whose ranges both sides are spread alike, or one side is spread and
/// the other whole.
fn same_ranges(l: &Rel, r: &Rel, pairs: &[(String, String)]) -> Option<(String, String, Vec<i64>)> {
    let pairs = || pairs.iter().map(|(a, b)| (a, b));
    match (ranges_of(l), ranges_of(r)) {
        (Some((lkey, llows)), Some((rkey, rlows)))
            if llows == rlows && pairs().any(|(a, b)| *a == lkey && *b == rkey) =>
        {
            Some((lkey, rkey, llows))
        }
        (Some((lkey, lows)), None) if matches!(r, Rel::Whole(_)) => {
            pairs().find(|(a, _)| **a == lkey).map(|(a, b)| (a.clone(), b.clone(), lows))
        }
        (None, Some((rkey, lows))) if matches!(l, Rel::Whole(_)) => {
            pairs().find(|(_, b)| **b == rkey).map(|(a, b)| (a.clone(), b.clone(), lows))
        }
        _ => None,
    }
}

/// The key and lows of a relation spread by ranges.
fn ranges_of(rel: &Rel) -> Option<(String, Vec<i64>)> {
    match rel {
        Rel::Spread { partitioned: Some(Partitioning::Ranges { key, lows }), .. } => Some((key.clone(), lows.clone())),
        _ => None,
    }
}

/// Aggregations split into per-part partial aggregates and the expressions combining them.
struct PreAggregation {
    partial: Vec<Expr>,
    finals: Vec<Expr>,
}

/// The aggregation nodes of an aggregation expression (`sum(a) / sum(b)` has two), or `None`
/// when one cannot be combined from partial results or reads non-row-wise inputs.
/// Whether an aggregation expression reads its group's values as a set: its result does not
/// depend on the order of the rows (`first`, `implode`, `cum_sum().sum()` do). A shuffle does
/// not keep the rows' order, so only such aggregations may run after one.
fn order_free(node: Node, arena: &Arena<AExpr>) -> bool {
    match arena.get(node) {
        AExpr::Len | AExpr::Literal(_) | AExpr::Column(_) => true,
        AExpr::Agg(agg) => match agg {
            IRAggExpr::Min { input, .. }
            | IRAggExpr::Max { input, .. }
            | IRAggExpr::Sum { input, .. }
            | IRAggExpr::Count { input, .. }
            | IRAggExpr::Mean(input)
            | IRAggExpr::Median(input)
            | IRAggExpr::NUnique(input)
            | IRAggExpr::Std(input, _)
            | IRAggExpr::Var(input, _) => is_elementwise_rec(*input, arena),
            _ => false,
        },
        AExpr::BinaryExpr { left, right, .. } => order_free(*left, arena) && order_free(*right, arena),
        AExpr::Cast { expr, .. } => order_free(*expr, arena),
        AExpr::Ternary { predicate, truthy, falsy } => {
            [predicate, truthy, falsy].iter().all(|n| order_free(**n, arena))
        }
        AExpr::Function { input, options, .. } if options.is_elementwise() => {
            input.iter().all(|i| order_free(i.node(), arena))
        }
        _ => false,
    }
}

/// `schema` is the aggregation's input schema.
fn collect_aggregates(node: Node, arena: &Arena<AExpr>, schema: &Schema, out: &mut Vec<Node>) -> Option<()> {
    match arena.get(node) {
        AExpr::Len => out.push(node),
        AExpr::Agg(agg) => {
            let input = match agg {
                IRAggExpr::Sum { input, .. }
                | IRAggExpr::Count { input, .. }
                | IRAggExpr::Min { input, .. }
                | IRAggExpr::Max { input, .. } => *input,
                // Combined as sum / count: numbers only (the mean of a date is a date, and
                // dates have no sum).
                IRAggExpr::Mean(input) => {
                    let dtype = arena.get(*input).to_dtype(&ToFieldContext::new(arena, schema)).ok()?;
                    if !(dtype.is_primitive_numeric() || dtype.is_bool()) {
                        return None;
                    }
                    *input
                }
                _ => return None,
            };
            if !is_elementwise_rec(input, arena) {
                return None;
            }
            out.push(node);
        }
        AExpr::Column(_) => return None, // a bare column outside an aggregation
        AExpr::Literal(_) => {}
        AExpr::BinaryExpr { left, right, .. } => {
            collect_aggregates(*left, arena, schema, out)?;
            collect_aggregates(*right, arena, schema, out)?;
        }
        AExpr::Cast { expr, .. } => collect_aggregates(*expr, arena, schema, out)?,
        AExpr::Ternary { predicate, truthy, falsy } => {
            collect_aggregates(*predicate, arena, schema, out)?;
            collect_aggregates(*truthy, arena, schema, out)?;
            collect_aggregates(*falsy, arena, schema, out)?;
        }
        // Row-wise functions of aggregates (`round`, `abs`, ...).
        AExpr::Function { input, options, .. } if options.is_elementwise() => {
            for i in input {
                collect_aggregates(i.node(), arena, schema, out)?;
            }
        }
        _ => return None,
    }
    Some(())
}

fn exact_rows(info: &FileInfo) -> Option<u64> {
    match info.stats.rows {
        Card::Exact(rows) => Some(rows),
        _ => None,
    }
}

fn hashable(dtype: &DataType) -> bool {
    dtype.is_primitive_numeric()
        || matches!(
            dtype,
            DataType::String | DataType::Boolean | DataType::Date | DataType::Datetime(..) | DataType::Binary
        )
        || matches!(dtype, DataType::Decimal(..))
}

/// The IR caches (subplans read more than once, found by Polars' common-subplan elimination)
/// whose every reader, through column selections, groups them by one key column or joins them
/// on it: planned once and partitioned by that key, the readers need no shuffle of their own.
/// PDS-H q17 joins the parts of lineitem it reads with their averages per part key: lineitem is
/// then read once instead of twice.
fn shared_keys(ir: &IRPlan) -> HashMap<UniqueId, String> {
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
fn largest_scan(ir: &IRPlan) -> Option<Node> {
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

fn scan_bytes(sources: &ScanSources) -> u64 {
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
fn read_share(schema: &Schema, columns: Option<&[PlSmallStr]>) -> f64 {
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

fn scan_name(sources: &ScanSources) -> String {
    match sources {
        ScanSources::Paths(paths) => {
            let first =
                paths.first().map(|p| p.as_str().rsplit('/').next().unwrap_or("").to_string()).unwrap_or_default();
            if paths.len() > 1 { format!("{first} and {} more", paths.len() - 1) } else { first }
        }
        _ => "in-memory data".into(),
    }
}

/// A selection of columns keeps the height of its input, even of none (`select(pl.len())` of a
/// scan reads no column but counts its rows).
fn select_columns<'a>(plan: DslPlan, names: impl Iterator<Item = &'a PlSmallStr>) -> DslPlan {
    let options = ProjectionOptions { maintain_dataframe_height: true, ..Default::default() };
    DslPlan::Select { expr: names.map(|n| col(n.clone())).collect(), input: Arc::new(plan), options }
}

/// The placeholder scan for another stage's output.
fn placeholder(stage: usize, part: Option<usize>) -> DslPlan {
    let path = PlRefPath::new(input_path(stage, part));
    DslPlan::Scan {
        sources: ScanSources::Paths(vec![path].into()),
        unified_scan_args: Box::default(),
        scan_type: Box::new(FileScanDsl::Ipc { options: Default::default() }),
        cached_ir: Arc::new(Mutex::new(None)),
    }
}

/// The stages a fragment reads.
fn inputs_of(plan: &DslPlan) -> Vec<usize> {
    let mut found = Vec::new();
    crate::walk(plan, &mut |p| {
        if let DslPlan::Scan { sources: ScanSources::Paths(paths), .. } = p {
            found.extend(paths.iter().filter_map(|p| parse_input_path(p.as_str())).map(|(s, _)| s));
        }
    });
    found.sort_unstable();
    found.dedup();
    found
}

/// Whether a task fragment reads nothing but other stages' outputs (no files of its own).
pub fn reads_only_inputs(task: &[u8]) -> PolarsResult<bool> {
    let plan = DslPlan::deserialize_versioned(task)?;
    let mut only = true;
    crate::walk(&plan, &mut |p| {
        if let DslPlan::Scan { sources, .. } = p {
            only &= matches!(sources, ScanSources::Paths(paths) if paths.iter().all(|p| parse_input_path(p.as_str()).is_some()));
        }
    });
    Ok(only)
}

/// `consumer` (a task fragment reading all of gather stage `stage`) with that stage's work done
/// inside it: the placeholder replaced by the concatenation, in task order, of the stage's task
/// fragments, which read the stage's own inputs. For a gather whose inputs turned out small,
/// one task beats a stage of tasks and a shuffle.
pub fn fuse(consumer: &[u8], stage: usize, tasks: &[Vec<u8>]) -> PolarsResult<Vec<u8>> {
    let mut plan = DslPlan::deserialize_versioned(consumer)?;
    let parts = tasks.iter().map(|t| DslPlan::deserialize_versioned(t.as_slice())).collect::<PolarsResult<Vec<_>>>()?;
    let args = UnionArgs {
        parallel: true,
        rechunk: false,
        to_supertypes: false,
        diagonal: false,
        strict: false,
        from_partitioned_ds: false,
        maintain_order: true,
    };
    let concat = DslPlan::Union { inputs: parts, args };
    let all = input_path(stage, None);
    let mut replaced = false;
    crate::rewrite(&mut plan, &mut |node| {
        if let DslPlan::Scan { sources: ScanSources::Paths(paths), .. } = node
            && paths.len() == 1
            && paths[0].as_str() == all
        {
            *node = concat.clone();
            replaced = true;
        }
    });
    polars_ensure!(replaced, ComputeError: "the fragment does not read stage {stage}");
    serialize(&plan)
}

fn serialize(plan: &DslPlan) -> PolarsResult<Vec<u8>> {
    let mut bytes = Vec::new();
    plan.serialize_versioned(&mut bytes, Default::default())?;
    Ok(bytes)
}
