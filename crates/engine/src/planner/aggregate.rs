//! Aggregations over spread relations: each part aggregates its rows (partial aggregates), one
//! task or each key's partition combines them, where the aggregation allows it.

use super::*;

impl Planner<'_> {
    /// Splits aggregations into partial aggregates (computed per part) and final expressions
    /// that combine them, cast to the dtypes the whole aggregation has (`schema`). `None` when
    /// an aggregation cannot be split this way (medians, distinct counts, first/last, ...).
    pub(super) fn decompose(&self, aggs: &[ExprIR], input: Node, schema: &Schema) -> Option<PreAggregation> {
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
}

/// Aggregations split into per-part partial aggregates and the expressions combining them.
pub(super) struct PreAggregation {
    pub(super) partial: Vec<Expr>,
    pub(super) finals: Vec<Expr>,
}

/// Whether an aggregation expression reads its group's values as a set: its result does not
/// depend on the order of the rows (`first`, `implode`, `cum_sum().sum()` do). A shuffle does
/// not keep the rows' order, so only such aggregations may run after one.
pub(super) fn order_free(node: Node, arena: &Arena<AExpr>) -> bool {
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

/// The aggregation nodes of an aggregation expression (`sum(a) / sum(b)` has two), or `None`
/// when one cannot be combined from partial results or reads non-row-wise inputs. `schema` is
/// the aggregation's input schema.
pub(super) fn collect_aggregates(node: Node, arena: &Arena<AExpr>, schema: &Schema, out: &mut Vec<Node>) -> Option<()> {
    match arena.get(node) {
        AExpr::Len => out.push(node),
        AExpr::Agg(agg) => {
            let input = match agg {
                IRAggExpr::Sum { input, .. }
                | IRAggExpr::Count { input, .. }
                | IRAggExpr::Min { input, .. }
                | IRAggExpr::Max { input, .. } => *input,
                // Combined as sum / count: numbers only (the mean of a date is a date, and
                // dates have no sum). Decimals too (TPC-H's money columns): their partial sums
                // are exact and the mean is a Float64, as Polars' own.
                IRAggExpr::Mean(input) => {
                    let dtype = arena.get(*input).to_dtype(&ToFieldContext::new(arena, schema)).ok()?;
                    if !(dtype.is_primitive_numeric() || dtype.is_bool() || dtype.is_decimal()) {
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
