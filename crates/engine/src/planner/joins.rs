//! Joins of spread and whole relations: broadcast, by ranges both sides share, by hash; and the
//! key filters that drop rows of groups a later join cannot match.

use super::*;

impl Planner<'_> {
    /// A relation shuffled by ranges `lows` of `key`.
    pub(super) fn shuffle_by_ranges(&mut self, rel: Rel, key: &str, lows: Vec<i64>) -> Rel {
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
    pub(super) fn aligned_by_ranges(&mut self, l: Rel, r: Rel, pairs: &[(String, String)]) -> (Rel, Rel) {
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
    pub(super) fn table_ranges_for(
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
    pub(super) fn key_source(&self, node: Node, column: &str) -> Option<KeySource> {
        self.key_source_below(node, column, Vec::new())
    }

    /// `key_source` with the `filters` met on the way down that apply to the scan's rows as
    /// they are (those above a join, a renaming selection or new columns do not; dropping a
    /// filter only widens the values).
    pub(super) fn key_source_below(&self, node: Node, column: &str, mut filters: Vec<ExprIR>) -> Option<KeySource> {
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
    pub(super) fn key_values(&self, source: &KeySource) -> Option<DslPlan> {
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
    pub(super) fn key_target(&self, node: Node, column: &str) -> Option<(Node, String)> {
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
    pub(super) fn join_column_origins(
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
    pub(super) fn below_selections(&self, mut node: Node) -> Node {
        while let IR::SimpleProjection { input, .. } | IR::Filter { input, .. } = self.arena().get(node) {
            node = *input;
        }
        node
    }

    pub(super) fn join(&mut self, left: Node, right: Node, options: &JoinOptionsIR) -> Planned<Rel> {
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
    pub(super) fn cut(&self, rel: Rel, key: &str, lows: &[i64], node: Node) -> Vec<DslPlan> {
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
    pub(super) fn inequality(
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

    /// Hash partitioning sends equal keys to the same partition only when both sides hash
    /// the same types.
    pub(super) fn same_key_dtypes(&self, left: Node, right: Node, on: &[(ExprIR, ExprIR)]) -> bool {
        let (ls, rs) = (self.arena().get(left).schema(self.arena()), self.arena().get(right).schema(self.arena()));
        on.iter().all(|(l, r)| match (ls.get(l.output_name()), rs.get(r.output_name())) {
            (Some(a), Some(b)) => a == b && hashable(a),
            _ => false,
        })
    }
}

/// Where the values of a key come from: a scan, the filters on its rows, the key's column.
pub(super) struct KeySource {
    pub(super) scan: Node,
    pub(super) filters: Vec<ExprIR>,
    pub(super) column: String,
    /// What the whole scan reads (`scan_read_bytes`).
    pub(super) read_bytes: u64,
}

/// Rows kept only where `column` holds one of the `values` (in `values_column`): a semi join
/// with the distinct values, read whole by every part.
pub(super) struct KeyFilter {
    pub(super) column: String,
    pub(super) values: DslPlan,
    pub(super) values_column: String,
    pub(super) nulls_equal: bool,
}

impl KeyFilter {
    pub(super) fn apply(&self, rows: DslPlan) -> DslPlan {
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

/// The ranges both sides of a join on `pairs` of key columns (left, right) can be joined by,
/// part by part: a pair by whose ranges both sides are spread alike, or one side is spread and
/// the other whole.
pub(super) fn same_ranges(l: &Rel, r: &Rel, pairs: &[(String, String)]) -> Option<(String, String, Vec<i64>)> {
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
pub(super) fn ranges_of(rel: &Rel) -> Option<(String, Vec<i64>)> {
    match rel {
        Rel::Spread { partitioned: Some(Partitioning::Ranges { key, lows }), .. } => Some((key.clone(), lows.clone())),
        _ => None,
    }
}

pub(super) fn hashable(dtype: &DataType) -> bool {
    dtype.is_primitive_numeric()
        || matches!(
            dtype,
            DataType::String | DataType::Boolean | DataType::Date | DataType::Datetime(..) | DataType::Binary
        )
        || matches!(dtype, DataType::Decimal(..))
}
