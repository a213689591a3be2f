//! The distributed planner and shuffle files without a cluster: plans are split into stages,
//! every task fragment is run in this process the way a worker runs it (inputs replaced by the
//! shuffle files of earlier stages), and the result must equal the query run whole.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use polars_node_engine::planner::{Limits, Split, plan_stages};
use polars_node_engine::polars::prelude::*;
use polars_node_engine::shuffle::{Codec, ShuffleFormat, read_boundaries};
use polars_node_engine::stage_graph::{StageGraph, StageOutput, input_path};
use polars_node_engine::{EngineChoice, Plan, Target};

const LIMITS: Limits = Limits {
    max_tasks: 3,
    broadcast_limit: 1 << 30,
    min_rows_per_task: 100,
    min_split_bytes: 0,
    pre_aggregate: true,
    partitioned_sort: true,
};

/// Four Parquet files of facts and one small dimension table.
fn tables(dir: &Path) -> (String, String) {
    for part in 0..4i64 {
        let n = 500;
        let key: Vec<i64> = (0..n).map(|i| (i * 7 + part) % 23).collect();
        let value: Vec<f64> = (0..n).map(|i| (i + part * n) as f64 * 0.5).collect();
        let amount: Vec<i32> = (0..n).map(|i| (i % 11) as i32).collect();
        let mut df = df!("key" => key, "value" => value, "amount" => amount).unwrap();
        let file = std::fs::File::create(dir.join(format!("facts-{part}.parquet"))).unwrap();
        ParquetWriter::new(file).finish(&mut df).unwrap();
    }
    let mut dims =
        df!("key" => (0..23i64).collect::<Vec<_>>(), "name" => (0..23).map(|i| format!("k{i}")).collect::<Vec<_>>())
            .unwrap();
    ParquetWriter::new(std::fs::File::create(dir.join("dims.parquet")).unwrap()).finish(&mut dims).unwrap();
    (format!("{}/facts-*.parquet", dir.display()), format!("{}/dims.parquet", dir.display()))
}

fn scan(path: &str) -> LazyFrame {
    LazyFrame::scan_parquet(PlRefPath::new(path), Default::default()).unwrap()
}

/// Runs every stage's tasks in order, as workers would, and returns the result.
fn run(graph: &StageGraph, dir: &Path, format: ShuffleFormat) -> DataFrame {
    run_with(graph, dir, format, EngineChoice::Auto)
}

/// `run` with stage tasks on `engine` (streaming: outputs written as they stream; in-memory:
/// collected, then written).
fn run_with(graph: &StageGraph, dir: &Path, format: ShuffleFormat, engine: EngineChoice) -> DataFrame {
    let mut outputs: Vec<Vec<Vec<PathBuf>>> = Vec::new();
    for (s, stage) in graph.stages.iter().enumerate() {
        let mut files = Vec::new();
        for (t, bytes) in stage.tasks.iter().enumerate() {
            let mut inputs = HashMap::new();
            for &input in &stage.inputs {
                let hashed = graph.stages[input].output.is_partitioned();
                let (key, part) = if hashed { (input_path(input, Some(t)), t) } else { (input_path(input, None), 0) };
                inputs
                    .insert(key, outputs[input].iter().map(|task_files| task_files[part].clone()).collect::<Vec<_>>());
            }
            let target = if stage.output == StageOutput::Result { Target::Flight } else { Target::User };
            let mut plan = Plan::fragment(bytes, target).unwrap();
            plan.with_inputs(&inputs).unwrap();
            let boundaries = match &stage.output {
                StageOutput::Range { boundaries, .. } => {
                    Some(read_boundaries(&[outputs[*boundaries][0][0].clone()]).unwrap())
                }
                _ => None,
            };
            if stage.output == StageOutput::Result {
                let result_dir = dir.join("result");
                let done = plan.execute(EngineChoice::InMemory, None, &result_dir, 5).unwrap();
                return IpcStreamReader::new(std::fs::File::open(&done.files[0]).unwrap()).finish().unwrap();
            }
            let written = plan
                .execute_stage(engine, None, &stage.output, boundaries.as_ref(), format, &dir.join(format!("{s}-{t}")))
                .unwrap();
            files.push(written.files);
        }
        outputs.push(files);
    }
    unreachable!("the last stage is the result")
}

fn split(lf: &LazyFrame, limits: Limits) -> StageGraph {
    match plan_stages(&lf.logical_plan, None, limits).unwrap() {
        Split::Stages(graph) => graph,
        Split::Whole(why) => panic!("not split: {why}"),
    }
}

fn sorted(df: DataFrame, by: &[&str]) -> DataFrame {
    df.sort(by.iter().map(|s| PlSmallStr::from(*s)).collect::<Vec<_>>(), Default::default()).unwrap()
}

/// Runs `graph` with its stage tasks on each engine and checks that both give the rows of `lf`
/// run whole (compared sorted by `by`). Returns how many rows that is.
fn assert_both_engines_equal_the_whole_query(
    graph: &StageGraph,
    lf: &LazyFrame,
    dir: &Path,
    format: ShuffleFormat,
    by: &[&str],
) -> usize {
    let expected = sorted(lf.clone().collect().unwrap(), by);
    for engine in [EngineChoice::Streaming, EngineChoice::InMemory] {
        let got = sorted(run_with(graph, dir, format, engine), by);
        assert!(got.equals_missing(&expected), "{engine:?}:\n{got}\nexpected:\n{expected}\n{}", graph.describe());
    }
    expected.height()
}

#[test]
fn pre_aggregated_group_by_equals_the_whole_query() {
    let dir = tempfile::tempdir().unwrap();
    let (facts, _) = tables(dir.path());
    let lf = scan(&facts).group_by([col("key")]).agg([
        col("value").sum().alias("total"),
        col("value").mean().alias("mean"),
        col("amount").max().alias("max"),
        len().alias("n"),
        (col("value").sum() / col("amount").sum().cast(DataType::Float64)).alias("ratio"),
    ]);
    let graph = split(&lf, LIMITS);
    let text = graph.describe();
    assert!(text.contains("partial group_by") && text.contains("shuffle by key"), "{text}");
    let format = ShuffleFormat::new(false, Codec::Lz4, None).unwrap();
    let got = sorted(run(&graph, dir.path(), format), &["key"]);
    let expected = sorted(lf.collect().unwrap(), &["key"]);
    assert_eq!(got.schema(), expected.schema());
    assert_eq!(got.height(), 23);
    for name in ["key", "max", "n"] {
        assert!(got.column(name).unwrap().equals(expected.column(name).unwrap()), "{name}");
    }
    for name in ["total", "mean", "ratio"] {
        let (a, b) = (got.column(name).unwrap().f64().unwrap(), expected.column(name).unwrap().f64().unwrap());
        for (x, y) in a.iter().zip(b.iter()) {
            let (x, y) = (x.unwrap(), y.unwrap());
            assert!((x - y).abs() <= 1e-9 * y.abs().max(1.0), "{name}: {x} != {y}");
        }
    }
}

#[test]
fn means_of_decimals_are_pre_aggregated() {
    // TPC-H's money columns are decimals: PDS-H q1 averages them. Without a partial mean of
    // decimals every row of lineitem was shuffled (q1 at SF-10: 4x one process).
    let dir = tempfile::tempdir().unwrap();
    let (facts, _) = tables(dir.path());
    let money = DataType::Decimal(15, 2);
    let lf = scan(&facts)
        .group_by([col("key")])
        .agg([col("value").cast(money.clone()).mean().alias("mean"), col("value").cast(money).sum().alias("total")]);
    let graph = split(&lf, LIMITS);
    let text = graph.describe();
    assert!(text.contains("partial group_by"), "{text}");
    let format = ShuffleFormat::new(false, Codec::Lz4, None).unwrap();
    let got = sorted(run(&graph, dir.path(), format), &["key"]);
    let expected = sorted(lf.collect().unwrap(), &["key"]);
    assert_eq!(got.schema(), expected.schema());
    assert!(got.column("total").unwrap().equals(expected.column("total").unwrap()));
    let (a, b) = (got.column("mean").unwrap().f64().unwrap(), expected.column("mean").unwrap().f64().unwrap());
    for (x, y) in a.iter().zip(b.iter()) {
        let (x, y) = (x.unwrap(), y.unwrap());
        assert!((x - y).abs() <= 1e-9 * y.abs().max(1.0), "mean: {x} != {y}");
    }
}

#[test]
fn without_pre_aggregation_rows_are_shuffled_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let (facts, _) = tables(dir.path());
    let lf = scan(&facts).group_by([col("key")]).agg([col("amount").n_unique().alias("distinct")]);
    let graph = split(&lf, Limits { pre_aggregate: false, ..LIMITS });
    assert!(!graph.describe().contains("partial"), "{}", graph.describe());
    let format = ShuffleFormat::new(true, Codec::Zstd, None).unwrap();
    let got = sorted(run(&graph, dir.path(), format), &["key"]);
    assert!(got.equals(&sorted(lf.collect().unwrap(), &["key"])));
}

#[test]
fn joins_broadcast_small_sides_and_hash_large_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (facts, dims) = tables(dir.path());
    let q = |lf: LazyFrame| lf.select([col("key"), col("value"), col("name")]);
    let joined = q(scan(&facts).join(scan(&dims), [col("key")], [col("key")], JoinArgs::new(JoinType::Inner)).unwrap());
    let broadcast = split(&joined, LIMITS);
    assert!(broadcast.describe().contains("broadcast"), "{}", broadcast.describe());
    // With no broadcast allowed, both sides are split and shuffled by key.
    let self_join = scan(&facts)
        .select([col("key"), col("amount")])
        .join(
            scan(&facts).select([col("key"), col("value")]),
            [col("key")],
            [col("key")],
            JoinArgs::new(JoinType::Left),
        )
        .unwrap()
        .group_by([col("key")])
        .agg([len().alias("n"), col("value").sum().alias("s")]);
    let hashed = split(&self_join, Limits { broadcast_limit: 0, ..LIMITS });
    assert!(hashed.describe().contains("hash join on key"), "{}", hashed.describe());
    let format = ShuffleFormat::new(false, Codec::Uncompressed, None).unwrap();
    for (lf, graph, by) in [(&joined, &broadcast, vec!["key", "value"]), (&self_join, &hashed, vec!["key"])] {
        assert_both_engines_equal_the_whole_query(graph, lf, dir.path(), format, &by);
    }
}

#[test]
fn a_single_large_file_is_split_by_row_ranges_and_tiny_plans_are_not_split() {
    let dir = tempfile::tempdir().unwrap();
    let (_, dims) = tables(dir.path());
    let mut big = df!("x" => (0..1000i64).collect::<Vec<_>>()).unwrap();
    let path = dir.path().join("big.parquet");
    ParquetWriter::new(std::fs::File::create(&path).unwrap()).finish(&mut big).unwrap();
    let lf = scan(path.to_str().unwrap()).filter(col("x").gt(lit(10))).select([col("x").sum()]);
    let graph = split(&lf, LIMITS);
    assert!(graph.describe().contains("1000 rows in 3 parts"), "{}", graph.describe());
    let format = ShuffleFormat::new(false, Codec::Zstd, Some(3)).unwrap();
    assert!(run(&graph, dir.path(), format).equals(&lf.collect().unwrap()));
    // 23 rows are below `min_rows_per_task`: nothing to split.
    assert!(matches!(plan_stages(&scan(&dims).logical_plan, None, LIMITS).unwrap(), Split::Whole(_)));
    assert!(ShuffleFormat::new(false, Codec::Zstd, Some(99)).is_err());
}

#[test]
fn a_concatenation_of_split_scans_stays_split_and_keeps_its_order() {
    let dir = tempfile::tempdir().unwrap();
    let (facts, dims) = tables(dir.path());
    let lf = concat([scan(&facts).select([col("key")]), scan(&dims).select([col("key")])], Default::default())
        .unwrap()
        .filter(col("key").gt(lit(3)));
    let graph = split(&lf, LIMITS);
    assert!(graph.describe().contains("concat (4 parts)"), "{}", graph.describe());
    let format = ShuffleFormat::new(false, Codec::Lz4, None).unwrap();
    assert!(run(&graph, dir.path(), format).equals(&lf.collect().unwrap()));
}

#[test]
fn a_sort_of_split_data_is_range_partitioned_and_stays_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (facts, _) = tables(dir.path());
    for descending in [false, true] {
        let lf = scan(&facts)
            .with_columns([when(col("amount").eq(lit(3))).then(lit(NULL)).otherwise(col("value")).alias("v")])
            .sort(["v"], SortMultipleOptions::default().with_order_descending(descending).with_nulls_last(!descending));
        let graph = split(&lf, LIMITS);
        let text = graph.describe();
        assert!(text.contains("boundaries of v") && text.contains("ranges of v into 3 partitions"), "{text}");
        let format = ShuffleFormat::new(false, Codec::Lz4, None).unwrap();
        let got = run(&graph, dir.path(), format);
        let expected = lf.clone().collect().unwrap();
        // Equal keys may come in another order; the keys themselves must match row for row.
        assert!(got.column("v").unwrap().equals_missing(expected.column("v").unwrap()), "descending={descending}");
        assert_eq!(got.height(), 2000);
    }
    // Without it, the sort is gathered to one task.
    let lf = scan(&facts).sort(["value"], Default::default());
    assert!(!split(&lf, Limits { partitioned_sort: false, ..LIMITS }).describe().contains("boundaries"));
}

#[test]
fn data_already_partitioned_by_a_key_is_not_shuffled_again() {
    let dir = tempfile::tempdir().unwrap();
    let (facts, _) = tables(dir.path());
    // Grouped by key (hash-partitioned by it), then semi-joined with itself and left-joined on
    // key, renamed around it and grouped by key again: one shuffle per side, no more.
    let totals = scan(&facts)
        .group_by([col("key")])
        .agg([col("value").sum().alias("total")])
        .filter(col("total").gt(lit(100.0)));
    let lf = totals
        .clone()
        .join(totals.clone(), [col("key")], [col("key")], JoinArgs::new(JoinType::Semi))
        .unwrap()
        .join(
            scan(&facts).select([col("key"), col("amount")]),
            [col("key")],
            [col("key")],
            JoinArgs::new(JoinType::Left),
        )
        .unwrap()
        .with_columns([(col("amount") * lit(2)).alias("twice")])
        .select([col("key"), col("twice"), col("total").alias("t")])
        .group_by([col("key")])
        .agg([col("twice").sum(), col("t").first(), len().alias("n")]);
    let graph = split(&lf, Limits { broadcast_limit: 0, ..LIMITS });
    let text = graph.describe();
    let shuffles = graph.stages.iter().filter(|s| matches!(s.output, StageOutput::Hash { .. })).count();
    assert_eq!(shuffles, 2, "partial totals once (read twice: a shared subplan), the second facts scan once:\n{text}");
    // A sort after an aggregation is gathered, not range-partitioned.
    assert!(!split(&totals.clone().sort(["total"], Default::default()), LIMITS).describe().contains("boundaries"));
    let format = ShuffleFormat::new(false, Codec::Lz4, None).unwrap();
    let got = sorted(run(&graph, dir.path(), format), &["key"]);
    assert!(got.equals_missing(&sorted(lf.collect().unwrap(), &["key"])), "{text}");
}

#[test]
fn a_side_is_broadcast_by_the_size_of_the_columns_it_reads() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, mut df: DataFrame| {
        let path = dir.path().join(name);
        ParquetWriter::new(std::fs::File::create(&path).unwrap())
            .with_compression(ParquetCompression::Uncompressed)
            .finish(&mut df)
            .unwrap();
        path.display().to_string()
    };
    let big = write("big.parquet", df!("key" => (0..200_000i64).map(|i| i % 23).collect::<Vec<_>>()).unwrap());
    // A wide table: a small key column and a long text column.
    let wide = write(
        "wide.parquet",
        df!("key" => (0..1000i64).map(|i| i % 23).collect::<Vec<_>>(), "text" => (0..1000).map(|i| format!("{i:>100}")).collect::<Vec<_>>())
            .unwrap(),
    );
    let size = std::fs::metadata(&wide).unwrap().len();
    let joined =
        |wide: LazyFrame| scan(&big).join(wide, [col("key")], [col("key")], JoinArgs::new(JoinType::Inner)).unwrap();
    let keys_only = joined(scan(&wide).select([col("key")])).group_by([col("key")]).agg([len().alias("n")]);
    let with_text = joined(scan(&wide))
        .select([col("key"), col("text").str().len_bytes().alias("bytes")])
        .group_by([col("key")])
        .agg([col("bytes").sum()]);
    // Below the file's size, above what its key column takes: only the key column is broadcast.
    let limits = Limits { broadcast_limit: size / 3, ..LIMITS };
    let graph = split(&keys_only, limits);
    assert!(graph.describe().contains("broadcast"), "{}", graph.describe());
    let text = split(&with_text, limits).describe();
    assert!(!text.contains("broadcast") && text.contains("hash join"), "{text}");
    let format = ShuffleFormat::new(false, Codec::Lz4, None).unwrap();
    let got = sorted(run(&graph, dir.path(), format), &["key"]);
    assert!(got.equals(&sorted(keys_only.collect().unwrap(), &["key"])));
}

#[test]
fn semi_and_anti_joins_of_a_small_side_read_only_the_distinct_keys_of_the_split_side() {
    let dir = tempfile::tempdir().unwrap();
    let (facts, dims) = tables(dir.path());
    let format = ShuffleFormat::new(false, Codec::Lz4, None).unwrap();
    let few = scan(&facts).filter(col("amount").eq(lit(3)).and(col("key").lt(lit(15))));
    for how in [JoinType::Semi, JoinType::Anti] {
        let lf = scan(&dims).join(few.clone(), [col("key")], [col("key")], JoinArgs::new(how.clone())).unwrap();
        let graph = split(&lf, LIMITS);
        assert!(graph.describe().contains("distinct join keys"), "{}", graph.describe());
        assert!(!graph.stages.iter().any(|s| matches!(s.output, StageOutput::Hash { .. })), "{}", graph.describe());
        let got = sorted(run(&graph, dir.path(), format), &["key"]);
        assert!(got.equals(&sorted(lf.collect().unwrap(), &["key"])), "{how:?}\n{}", graph.describe());
    }
}

#[test]
fn an_aggregated_broadcast_side_is_computed_once() {
    let dir = tempfile::tempdir().unwrap();
    let (facts, dims) = tables(dir.path());
    let counts = scan(&dims).group_by([col("key")]).agg([len().alias("n")]);
    let lf = scan(&facts).join(counts, [col("key")], [col("key")], JoinArgs::new(JoinType::Inner)).unwrap().select([
        col("key"),
        col("value"),
        col("n"),
    ]);
    let graph = split(&lf, LIMITS);
    let once = graph
        .stages
        .iter()
        .position(|s| s.label.contains("computed once"))
        .unwrap_or_else(|| panic!("{}", graph.describe()));
    assert_eq!(graph.stages[once].tasks.len(), 1);
    assert!(graph.stages.iter().any(|s| s.inputs.contains(&once) && s.tasks.len() > 1), "{}", graph.describe());
    let format = ShuffleFormat::new(false, Codec::Lz4, None).unwrap();
    let got = sorted(run(&graph, dir.path(), format), &["key", "value"]);
    assert!(got.equals(&sorted(lf.collect().unwrap(), &["key", "value"])));
}

#[test]
fn unique_drops_duplicates_within_each_part_first_unless_it_keeps_none() {
    let dir = tempfile::tempdir().unwrap();
    let (facts, _) = tables(dir.path());
    let format = ShuffleFormat::new(false, Codec::Lz4, None).unwrap();
    let any = scan(&facts).select([col("key"), col("amount")]).unique(None, UniqueKeepStrategy::Any);
    let by_key = scan(&facts).select([col("key"), col("amount")]).unique(Some(cols(["key"])), UniqueKeepStrategy::Any);
    let none =
        scan(&facts).select([col("key"), col("amount")]).unique(Some(cols(["amount"])), UniqueKeepStrategy::None);
    for (lf, partial, exact) in [(any, true, true), (by_key, true, false), (none, false, true)] {
        let graph = split(&lf, LIMITS);
        assert_eq!(graph.describe().contains("partial unique"), partial, "{}", graph.describe());
        let got = sorted(run(&graph, dir.path(), format), &["key", "amount"]);
        let expected = sorted(lf.collect().unwrap(), &["key", "amount"]);
        // keep=any may keep another row of a key: compare the keys (and, without a subset, rows).
        assert_eq!(got.column("key").unwrap().n_unique().unwrap(), expected.column("key").unwrap().n_unique().unwrap());
        assert_eq!(got.height(), expected.height(), "{}", graph.describe());
        assert!(!exact || got.equals(&expected), "{}", graph.describe());
    }
}

#[test]
fn files_laid_out_by_a_key_are_split_by_its_ranges_and_grouped_or_joined_without_shuffles() {
    let dir = tempfile::tempdir().unwrap();
    // Lines: four files sorted by `key` (three lines per key, so a key may span two row
    // groups), in row groups of 100 rows; orders: one file, one row per key (and one without a
    // key), in row groups of 50.
    let mut lines = Vec::new();
    for part in 0..4i64 {
        let rows: Vec<i64> = (part * 600..(part + 1) * 600).collect();
        let mut df = df!(
            "key" => rows.iter().map(|r| r / 3).collect::<Vec<_>>(),
            "supp" => rows.iter().map(|r| (r * 7) % 13 + (r % 3 == 0 && r % 2 == 0) as i64 * 13).collect::<Vec<_>>(),
            "late" => rows.iter().map(|r| r % 5 < 2).collect::<Vec<_>>(),
        )
        .unwrap();
        let path = dir.path().join(format!("lines-{part}.parquet"));
        ParquetWriter::new(std::fs::File::create(&path).unwrap())
            .with_row_group_size(Some(100))
            .finish(&mut df)
            .unwrap();
        lines.push(path);
    }
    let keys: Vec<Option<i64>> = (0..800i64).map(Some).chain([None]).collect();
    let mut orders = df!("okey" => keys, "status" => (0..801).map(|i| ["F", "O"][i % 2]).collect::<Vec<_>>()).unwrap();
    let orders_path = dir.path().join("orders.parquet");
    ParquetWriter::new(std::fs::File::create(&orders_path).unwrap())
        .with_row_group_size(Some(50))
        .finish(&mut orders)
        .unwrap();
    let lines = format!("{}/lines-*.parquet", dir.path().display());
    let orders = orders_path.display().to_string();

    // Shaped like PDS-H q21: groups of the key, semi joins of the table with itself, a join with
    // the orders, grouped by another column at the end.
    let multi =
        scan(&lines).group_by([col("key")]).agg([col("supp").n_unique().alias("n")]).filter(col("n").gt(lit(1)));
    let q21 = scan(&lines)
        .filter(col("late"))
        .join(multi, [col("key")], [col("key")], JoinArgs::new(JoinType::Semi))
        .unwrap()
        .join(
            scan(&orders).filter(col("status").eq(lit("F"))),
            [col("key")],
            [col("okey")],
            JoinArgs::new(JoinType::Inner),
        )
        .unwrap()
        .group_by([col("supp")])
        .agg([len().alias("n")]);
    // The orders (whole) left-joined with the lines (split): the orders are cut to the ranges.
    let left = scan(&orders)
        .join(scan(&lines).filter(col("late")), [col("okey")], [col("key")], JoinArgs::new(JoinType::Left))
        .unwrap()
        .select([col("okey"), col("supp"), col("status")]);
    // Shaped like q4: the orders semi-joined with the distinct keys of some lines.
    let q4 = scan(&orders)
        .join(
            scan(&lines).filter(col("late")).select([col("key")]).unique(None, UniqueKeepStrategy::Any),
            [col("okey")],
            [col("key")],
            JoinArgs::new(JoinType::Semi),
        )
        .unwrap();
    // Shaped like q9: a small frame joined with the lines first (broadcast, on another column),
    // then the orders: the lines keep their ranges through the first join.
    let small = df!("supp" => (0..26i64).collect::<Vec<_>>(), "tag" => (0..26).map(|i| i % 3).collect::<Vec<_>>())
        .unwrap()
        .lazy();
    let q9 = small
        .join(scan(&lines), [col("supp")], [col("supp")], JoinArgs::new(JoinType::Inner))
        .unwrap()
        .join(scan(&orders), [col("key")], [col("okey")], JoinArgs::new(JoinType::Inner))
        .unwrap()
        .select([col("key"), col("supp"), col("tag"), col("status")]);
    let format = ShuffleFormat::new(false, Codec::Lz4, None).unwrap();
    for (lf, by) in [(q21, vec!["supp"]), (left, vec!["okey", "supp"]), (q4, vec!["okey"]), (q9, vec!["key", "supp"])] {
        let graph = split(&lf, LIMITS);
        let text = graph.describe();
        assert!(text.contains("3 parts by ranges of key") && text.contains("join by ranges of"), "{text}");
        assert!(!graph.stages.iter().any(|s| matches!(s.output, StageOutput::KeyRanges { .. })), "{text}");
        let by_key = graph
            .stages
            .iter()
            .filter(|s| matches!(&s.output, StageOutput::Hash { keys, .. } if keys.iter().any(|k| k.contains("key"))));
        assert_eq!(by_key.count(), 0, "{text}");
        assert_both_engines_equal_the_whole_query(&graph, &lf, dir.path(), format, &by);
    }
}

#[test]
fn a_subplan_its_readers_group_and_join_by_one_key_is_computed_once_partitioned_by_it() {
    let dir = tempfile::tempdir().unwrap();
    let (facts, dims) = tables(dir.path());
    // Shaped like PDS-H q17: the rows of some keys, joined with their own averages per key.
    let items = scan(&dims)
        .filter(col("key").lt(lit(12)))
        .join(scan(&facts), [col("key")], [col("key")], JoinArgs::new(JoinType::Inner))
        .unwrap();
    let averages = items.clone().group_by([col("key")]).agg([col("value").mean().alias("average")]);
    let lf = items
        .join(averages, [col("key")], [col("key")], JoinArgs::new(JoinType::Inner))
        .unwrap()
        .filter(col("value").lt(col("average")))
        .select([col("value").sum(), len()]);
    let graph = split(&lf, LIMITS);
    let text = graph.describe();
    let facts_read =
        graph.stages.iter().flat_map(|s| &s.tasks).filter(|t| String::from_utf8_lossy(t).contains("facts-")).count();
    assert_eq!(facts_read, 3, "the facts are read once, by the three tasks of one stage:\n{text}");
    let shuffles =
        graph.stages.iter().filter(|s| matches!(&s.output, StageOutput::Hash { keys, .. } if keys == &["key"])).count();
    assert_eq!(shuffles, 1, "{text}");
    let format = ShuffleFormat::new(false, Codec::Lz4, None).unwrap();
    let got = run(&graph, dir.path(), format);
    let expected = lf.collect().unwrap();
    assert_eq!(got.column("len").unwrap(), expected.column("len").unwrap(), "{text}");
    let (a, b) = (
        got.column("value").unwrap().f64().unwrap().get(0).unwrap(),
        expected.column("value").unwrap().f64().unwrap().get(0).unwrap(),
    );
    assert!((a - b).abs() <= 1e-9 * b.abs(), "{a} != {b}");
}

#[test]
fn rows_joined_with_a_table_laid_out_by_the_key_are_shuffled_by_its_ranges() {
    let dir = tempfile::tempdir().unwrap();
    // Sales in four files, in no order of key; prices sorted by key in row groups of 50 rows.
    for part in 0..4i64 {
        let n = 5000;
        let mut df = df!(
            "key" => (0..n).map(|i| (i * 7 + part) % 301).collect::<Vec<_>>(),
            "qty" => (0..n).map(|i| (i * 2_654_435_761 + part) % 1_000_003).collect::<Vec<_>>(),
        )
        .unwrap();
        ParquetWriter::new(std::fs::File::create(dir.path().join(format!("sales-{part}.parquet"))).unwrap())
            .finish(&mut df)
            .unwrap();
    }
    let mut prices = df!("pkey" => (0..300i64).collect::<Vec<_>>(), "price" => (0..300).map(|i| i as f64 * 0.25).collect::<Vec<_>>()).unwrap();
    let prices_path = dir.path().join("prices.parquet");
    ParquetWriter::new(std::fs::File::create(&prices_path).unwrap())
        .with_row_group_size(Some(50))
        .finish(&mut prices)
        .unwrap();
    let sales = scan(&format!("{}/sales-*.parquet", dir.path().display()));
    let prices = scan(prices_path.to_str().unwrap());
    // Totals per key (shuffled by the prices' ranges, the prices cut to them), and the sales
    // themselves joined with prices that are split too (only the sales are shuffled).
    let totals = sales
        .clone()
        .group_by([col("key")])
        .agg([col("qty").sum()])
        .join(prices.clone(), [col("key")], [col("pkey")], JoinArgs::new(JoinType::Left))
        .unwrap();
    let lines =
        sales.clone().join(prices.clone(), [col("key")], [col("pkey")], JoinArgs::new(JoinType::Inner)).unwrap();
    // All prices (whole, the side a left join keeps) with their sales (split): the sales are
    // shuffled by the prices' ranges rather than both sides by hash.
    let kept = prices
        .join(sales, [col("pkey")], [col("key")], JoinArgs::new(JoinType::Left))
        .unwrap()
        .group_by([col("pkey")])
        .agg([col("qty").sum(), len().alias("n")]);
    let format = ShuffleFormat::new(false, Codec::Lz4, None).unwrap();
    let cases = [
        (totals, LIMITS, vec!["key"]),
        (lines, Limits { broadcast_limit: 0, ..LIMITS }, vec!["key", "qty"]),
        (kept, LIMITS, vec!["pkey"]),
    ];
    for (lf, limits, by) in cases {
        let graph = split(&lf, limits);
        let text = graph.describe();
        assert!(
            graph
                .stages
                .iter()
                .any(|s| matches!(&s.output, StageOutput::KeyRanges { key, lows } if key == "key" && lows.len() == 2)),
            "{text}"
        );
        assert!(!graph.stages.iter().any(|s| matches!(&s.output, StageOutput::Hash { .. })), "{text}");
        assert!(text.contains("join by ranges of"), "{text}");
        assert_both_engines_equal_the_whole_query(&graph, &lf, dir.path(), format, &by);
    }
}

#[test]
fn rows_of_groups_a_later_join_drops_are_dropped_before_the_group_by_shuffles_them() {
    let dir = tempfile::tempdir().unwrap();
    let (facts, dims) = tables(dir.path());
    let some =
        || scan(&dims).filter(col("name").eq(lit("k1")).or(col("name").eq(lit("k5"))).or(col("name").eq(lit("k7"))));
    let totals = || scan(&facts).group_by([col("key")]).agg([col("value").sum(), len().alias("n")]);
    let inner = totals().join(some(), [col("key")], [col("key")], JoinArgs::new(JoinType::Inner)).unwrap();
    let semi = totals().join(some(), [col("key")], [col("key")], JoinArgs::new(JoinType::Semi)).unwrap();
    let kept = some().join(totals(), [col("key")], [col("key")], JoinArgs::new(JoinType::Left)).unwrap();
    // The group_by joined with every key first, the result with the few keys after (q20's shape).
    let below = totals()
        .join(scan(&dims), [col("key")], [col("key")], JoinArgs::new(JoinType::Inner))
        .unwrap()
        .join(
            some().select([col("key").alias("some_key")]),
            [col("key")],
            [col("some_key")],
            JoinArgs::new(JoinType::Semi),
        )
        .unwrap();
    // The join keeps groups without a match, or the other side is every key: nothing to drop.
    let all_groups = totals().join(some(), [col("key")], [col("key")], JoinArgs::new(JoinType::Left)).unwrap();
    let all_keys = totals().join(scan(&dims), [col("key")], [col("key")], JoinArgs::new(JoinType::Inner)).unwrap();
    let format = ShuffleFormat::new(false, Codec::Lz4, None).unwrap();
    for (lf, filtered, rows) in [
        (inner, true, 3),
        (semi, true, 3),
        (kept, true, 3),
        (below, true, 3),
        (all_groups, false, 23),
        (all_keys, false, 23),
    ] {
        let graph = split(&lf, LIMITS);
        let text = graph.describe();
        assert_eq!(text.contains("semi join by key"), filtered, "{text}");
        assert!(text.contains("shuffle by key"), "{text}");
        assert_eq!(
            assert_both_engines_equal_the_whole_query(&graph, &lf, dir.path(), format, &["key"]),
            rows,
            "{text}"
        );
    }
}

/// Facts in four Parquet files with a column of every common kind (nulls in `value`, a unique
/// `id` in file order), and a small dimension table.
fn typed_tables(dir: &Path) -> (String, String) {
    for part in 0..4i64 {
        let n = 400i64;
        let rows = 0..n;
        let id: Vec<i64> = rows.clone().map(|i| part * n + i).collect();
        let key: Vec<i64> = rows.clone().map(|i| (i * 7 + part) % 23).collect();
        let grp: Vec<&str> = rows.clone().map(|i| ["a", "b", "c", "d", "e"][((i + part) % 5) as usize]).collect();
        let value: Vec<Option<f64>> =
            rows.clone().map(|i| (i % 13 != 0).then_some((i * 31 % 97) as f64 * 0.25 + part as f64)).collect();
        let amount: Vec<i32> = rows.clone().map(|i| ((i * 3 + part) % 11) as i32).collect();
        let day: Vec<i32> = rows.clone().map(|i| 19000 + ((i * 5 + part) % 40) as i32).collect();
        let mut df =
            df!("id" => id, "key" => key, "grp" => grp, "value" => value, "amount" => amount, "day" => day).unwrap();
        df.with_column(df.column("day").unwrap().cast(&DataType::Date).unwrap()).unwrap();
        let file = std::fs::File::create(dir.join(format!("typed-{part}.parquet"))).unwrap();
        ParquetWriter::new(file).finish(&mut df).unwrap();
    }
    let keys = 0..20i64; // keys 20..22 have no dimension row
    let mut dims =
        df!("key" => keys.clone().collect::<Vec<_>>(), "name" => keys.map(|i| format!("k{i}")).collect::<Vec<_>>())
            .unwrap();
    ParquetWriter::new(std::fs::File::create(dir.join("dimensions.parquet")).unwrap()).finish(&mut dims).unwrap();
    (format!("{}/typed-*.parquet", dir.display()), format!("{}/dimensions.parquet", dir.display()))
}

/// Whether two results hold the same rows (in order when `ordered`), floats to 1e-9.
fn same_rows(got: &DataFrame, expected: &DataFrame, ordered: bool) -> Result<(), String> {
    if got.schema() != expected.schema() {
        return Err(format!("schema {:?} != {:?}", got.schema(), expected.schema()));
    }
    let (got, expected) = match ordered {
        true => (got.clone(), expected.clone()),
        false => {
            let by: Vec<PlSmallStr> =
                got.schema().iter().filter(|(_, dt)| !dt.is_nested()).map(|(name, _)| name.clone()).collect();
            let options = SortMultipleOptions::default().with_maintain_order(true);
            (got.sort(by.clone(), options.clone()).unwrap(), expected.sort(by, options).unwrap())
        }
    };
    if got.height() != expected.height() {
        return Err(format!("{} rows != {}", got.height(), expected.height()));
    }
    for (a, b) in got.columns().iter().zip(expected.columns()) {
        let same = match a.dtype() {
            DataType::Float64 | DataType::Float32 => {
                let (a, b) = (a.cast(&DataType::Float64).unwrap(), b.cast(&DataType::Float64).unwrap());
                a.f64().unwrap().iter().zip(b.f64().unwrap().iter()).all(|(x, y)| match (x, y) {
                    (Some(x), Some(y)) => (x - y).abs() <= 1e-9 * y.abs().max(1.0) || (x.is_nan() && y.is_nan()),
                    (x, y) => x.is_none() && y.is_none(),
                })
            }
            _ => a.equals_missing(b),
        };
        if !same {
            return Err(format!("column {} differs", a.name()));
        }
    }
    Ok(())
}

/// The planner's guard: a generated set of queries (aggregations of every kind, group_bys,
/// joins of every kind, sorts with slices, windows, order-sensitive operators) over multi-file
/// inputs, each split and run stage by stage, must give the rows of the query run whole, in
/// order where Polars defines the order. A rewrite the planner cannot prove must not split.
#[test]
fn generated_queries_give_the_same_rows_split_and_whole() {
    let dir = tempfile::tempdir().unwrap();
    let (facts, dims) = typed_tables(dir.path());
    let facts = || scan(&facts);
    let dims = || scan(&dims);
    let join = |how: JoinType, order: MaintainOrderJoin| {
        facts().join(dims(), [col("key")], [col("key")], JoinArgs::new(how).with_maintain_order(order)).unwrap()
    };
    let by_id = || SortMultipleOptions::default();
    // (name, query of the prepared facts, whether Polars defines its row order)
    type Query = Box<dyn Fn(LazyFrame) -> LazyFrame>;
    // Row-wise steps before the main operator: nothing, a filter, new columns.
    let before: Vec<(&str, Query)> = vec![
        ("", Box::new(|lf| lf)),
        ("filter", Box::new(|lf: LazyFrame| lf.filter(col("amount").gt(lit(3))))),
        (
            "with_columns",
            Box::new(|lf: LazyFrame| {
                lf.with_columns([
                    (col("value") * lit(2.0)).alias("value"),
                    (col("amount") + col("key")).alias("amount"),
                ])
            }),
        ),
    ];
    let aggregates = || {
        vec![
            col("value").sum().alias("sum"),
            (col("value").sum() + lit(1.0)).alias("sum1"),
            col("value").mean().alias("mean"),
            col("amount").min().alias("min"),
            col("day").max().alias("max_day"),
            col("day").mean().alias("mean_day"),
            len().alias("len"),
            col("value").count().alias("count"),
            col("grp").n_unique().alias("n_unique"),
            col("amount").median().alias("median"),
            col("value").std(1).alias("std"),
        ]
    };
    let main: Vec<(&str, Query, bool)> = vec![
        ("select aggregates", Box::new(move |lf: LazyFrame| lf.select(aggregates())), true),
        ("select len", Box::new(|lf: LazyFrame| lf.select([len()])), true),
        (
            "select first/last",
            Box::new(|lf: LazyFrame| lf.select([col("id").first().alias("f"), col("id").last().alias("l")])),
            true,
        ),
        ("group_by aggregates", Box::new(move |lf: LazyFrame| lf.group_by([col("key")]).agg(aggregates())), false),
        (
            "group_by two keys",
            Box::new(|lf: LazyFrame| lf.group_by([col("grp"), col("amount")]).agg([col("value").sum(), len()])),
            false,
        ),
        (
            "group_by order-sensitive",
            Box::new(|lf: LazyFrame| {
                lf.group_by([col("grp")]).agg([
                    col("id").first().alias("f"),
                    col("id").last().alias("l"),
                    col("id").implode(true).alias("ids"),
                ])
            }),
            false,
        ),
        (
            "sort then group_by",
            Box::new(|lf: LazyFrame| {
                lf.sort(["amount", "id"], SortMultipleOptions::default().with_order_descending_multi([true, false]))
                    .group_by([col("grp")])
                    .agg([col("id").implode(true).alias("ids"), col("amount").cum_sum(false).sum().alias("cum")])
            }),
            false,
        ),
        (
            "group_by stable",
            Box::new(|lf: LazyFrame| lf.group_by_stable([col("key")]).agg([col("value").sum(), col("id").first()])),
            true,
        ),
        (
            "unique",
            Box::new(|lf: LazyFrame| lf.select([col("key"), col("grp")]).unique(None, UniqueKeepStrategy::Any)),
            false,
        ),
        (
            "unique stable",
            Box::new(|lf: LazyFrame| lf.select([col("key"), col("id")]).unique_stable(None, UniqueKeepStrategy::First)),
            true,
        ),
        ("sort", Box::new(move |lf: LazyFrame| lf.sort(["id"], by_id())), true),
        (
            "sort desc nulls last",
            Box::new(|lf: LazyFrame| {
                lf.sort(
                    ["value", "id"],
                    SortMultipleOptions::default().with_order_descending(true).with_nulls_last(true),
                )
            }),
            true,
        ),
        ("sort head", Box::new(move |lf: LazyFrame| lf.sort(["id"], by_id()).limit(5)), true),
        ("sort slice", Box::new(move |lf: LazyFrame| lf.sort(["id"], by_id()).slice(10, 7)), true),
        ("head", Box::new(|lf: LazyFrame| lf.limit(7)), true),
        ("slice", Box::new(|lf: LazyFrame| lf.slice(395, 10)), true),
        (
            "window",
            Box::new(|lf: LazyFrame| {
                lf.with_columns([col("value").sum().over([col("key")]).unwrap().alias("per_key")])
            }),
            true,
        ),
        ("cum_sum", Box::new(|lf: LazyFrame| lf.with_columns([col("amount").cum_sum(false).alias("running")])), true),
        ("concat", Box::new(|lf: LazyFrame| concat([lf.clone(), lf], Default::default()).unwrap()), true),
    ];
    let joins: Vec<(&str, LazyFrame, bool)> = vec![
        ("inner join", join(JoinType::Inner, MaintainOrderJoin::None), false),
        ("left join", join(JoinType::Left, MaintainOrderJoin::None), false),
        ("left join keeping order", join(JoinType::Left, MaintainOrderJoin::Left), true),
        ("left join keeping order, sliced", join(JoinType::Left, MaintainOrderJoin::Left).slice(3, 9), true),
        ("right join", join(JoinType::Right, MaintainOrderJoin::None), false),
        ("full join", join(JoinType::Full, MaintainOrderJoin::None), false),
        ("semi join", join(JoinType::Semi, MaintainOrderJoin::None), false),
        ("anti join", join(JoinType::Anti, MaintainOrderJoin::None), false),
        ("cross join", facts().filter(col("id").lt(lit(10))).cross_join(dims(), None), false),
        (
            "left join_where",
            dims()
                .join_builder()
                .with(facts().filter(col("id").lt(lit(50))))
                .how(JoinType::Left)
                .join_where(vec![col("key").lt(col("amount"))]),
            false,
        ),
        (
            "join then group_by",
            join(JoinType::Inner, MaintainOrderJoin::None)
                .group_by([col("name")])
                .agg([col("value").sum(), col("day").mean()]),
            false,
        ),
    ];
    let mut queries: Vec<(String, LazyFrame, bool)> = Vec::new();
    for (step, prepare) in &before {
        for (name, query, ordered) in &main {
            queries.push((format!("{step} {name}"), query(prepare(facts())), *ordered));
        }
    }
    queries.extend(joins.into_iter().map(|(name, lf, ordered)| (name.to_string(), lf, ordered)));

    let format = ShuffleFormat::new(false, Codec::Lz4, None).unwrap();
    let (mut split_count, mut failures) = (0, Vec::new());
    for (i, (name, lf, ordered)) in queries.iter().enumerate() {
        let expected = lf.clone().collect().unwrap();
        let graph = match plan_stages(&lf.logical_plan, None, LIMITS).unwrap() {
            Split::Stages(graph) => graph,
            Split::Whole(_) => continue,
        };
        split_count += 1;
        let got = run_with(&graph, &dir.path().join(format!("q{i}")), format, EngineChoice::Auto);
        if let Err(why) = same_rows(&got, &expected, *ordered) {
            failures.push(format!("{name}: {why}\n{}", graph.describe()));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} split queries differ:\n{}",
        failures.len(),
        split_count,
        failures.join("\n")
    );
    // Most of them must really have been split, or this test proves nothing.
    assert!(split_count * 3 >= queries.len() * 2, "only {split_count} of {} queries were split", queries.len());
}
