//! What this project changes in Polars 2.0.0 as it builds it (polars-source/patches, polars-source/hashbrown),
//! through the engine's public API.

use std::collections::HashMap;

use polars_node_engine::polars::prelude::*;

const ROWS: i64 = 400_000;
const KEYS: i64 = 150_000;

fn key(i: i64) -> i64 {
    (i * 7_919) % KEYS
}

fn facts() -> DataFrame {
    let k: Vec<i64> = (0..ROWS).map(key).collect();
    let k2: Vec<i64> = (0..ROWS).map(|i| i % 3).collect();
    let v: Vec<i64> = (0..ROWS).map(|i| i % 1_000).collect();
    df!("k" => k, "k2" => k2, "v" => v).unwrap()
}

fn streaming(lf: LazyFrame) -> DataFrame {
    lf.collect_with_engine(Engine::Streaming).unwrap().unwrap_single()
}

/// (key columns..., value) rows of a result as a map from keys to value.
fn as_map(df: &DataFrame, keys: &[&str], value: &str) -> HashMap<Vec<i64>, i64> {
    let keys: Vec<_> = keys.iter().map(|k| df.column(k).unwrap().i64().unwrap().clone()).collect();
    let value = df.column(value).unwrap().i64().unwrap();
    (0..df.height()).map(|r| (keys.iter().map(|k| k.get(r).unwrap()).collect(), value.get(r).unwrap())).collect()
}

/// Polars' hash tables with crates.io's hashbrown and the prefetch hints Polars calls
/// (polars-source/hashbrown). Group-bys and joins here have enough distinct keys (tables of 2^15
/// buckets or more) to take the prefetching paths of the streaming engine: one integer key
/// (single-key group and join tables) and two keys (row-encoded key tables). Their results must
/// equal the same sums computed with std's HashMap.
#[test]
fn large_group_bys_and_joins_take_the_prefetching_paths_and_stay_exact() {
    let mut by_key: HashMap<Vec<i64>, i64> = HashMap::new();
    let mut by_two: HashMap<Vec<i64>, i64> = HashMap::new();
    for i in 0..ROWS {
        *by_key.entry(vec![key(i)]).or_default() += i % 1_000;
        *by_two.entry(vec![key(i), i % 3]).or_default() += i % 1_000;
    }
    assert!(by_key.len() > 1 << 15 && by_two.len() > 1 << 15, "enough keys for the prefetching paths");

    let grouped = streaming(facts().lazy().group_by([col("k")]).agg([col("v").sum()]));
    assert_eq!(as_map(&grouped, &["k"], "v"), by_key);

    let grouped = streaming(facts().lazy().group_by([col("k"), col("k2")]).agg([col("v").sum()]));
    assert_eq!(as_map(&grouped, &["k", "k2"], "v"), by_two);

    // Each key joined with its own row of a dimension table (its key times 10), then summed.
    let dims = df!("k" => (0..KEYS).collect::<Vec<_>>(), "w" => (0..KEYS).map(|k| k * 10).collect::<Vec<_>>()).unwrap();
    let joined = streaming(
        facts()
            .lazy()
            .join(dims.lazy(), [col("k")], [col("k")], JoinArgs::new(JoinType::Inner))
            .unwrap()
            .group_by([col("k")])
            .agg([(col("w") + col("v")).sum().alias("s")]),
    );
    let mut expected: HashMap<Vec<i64>, i64> = HashMap::new();
    for i in 0..ROWS {
        *expected.entry(vec![key(i)]).or_default() += key(i) * 10 + i % 1_000;
    }
    assert_eq!(as_map(&joined, &["k"], "s"), expected);
}

/// A group_by of an empty file joined with another table: Polars 2.0.0 panics while estimating
/// the group count of an input estimated at no rows ("min > max"; the client's wheel does too).
/// Empty shuffle partitions are read this way. polars-source/patches/0002 fixes the estimate.
#[test]
fn a_group_by_of_an_empty_file_can_be_joined() {
    let dir = tempfile::tempdir().unwrap();
    let (empty, other) = (dir.path().join("empty.parquet"), dir.path().join("other.parquet"));
    let mut df = df!("k" => Vec::<i64>::new(), "v" => Vec::<i64>::new()).unwrap();
    ParquetWriter::new(std::fs::File::create(&empty).unwrap()).finish(&mut df).unwrap();
    let mut df = df!("k" => [1i64, 2], "w" => [3i64, 4]).unwrap();
    ParquetWriter::new(std::fs::File::create(&other).unwrap()).finish(&mut df).unwrap();
    let scan =
        |p: &std::path::Path| LazyFrame::scan_parquet(PlRefPath::new(p.to_str().unwrap()), Default::default()).unwrap();
    for engine in [Engine::Streaming, Engine::InMemory] {
        let grouped = scan(&empty).group_by([col("k")]).agg([col("v").sum()]);
        let joined = grouped.join(scan(&other), [col("k")], [col("k")], JoinArgs::new(JoinType::Inner)).unwrap();
        let got = joined.collect_with_engine(engine).unwrap().unwrap_single();
        assert_eq!((got.height(), got.width()), (0, 3));
    }
}

/// polars-source/patches/0003: `to_titlecase` (the client's wheel is a nightly build, so its plans may
/// hold it) and `erf`/`erfc` on stable Rust, with the titlecase of characters whose titlecase is
/// not their uppercase.
#[test]
fn titlecase_and_erf_work_on_stable() {
    let df =
        df!("s" => ["hello wORLD", "ǆemal ǉubljana", "straße ﬁsh", "ᾳ ᾀ", "ა"], "x" => [0.0f64, 0.5, -1.0, 3.0, 1e-3])
            .unwrap();
    let out = df
        .lazy()
        .select([col("s").str().to_titlecase().alias("t"), col("x").erf().alias("erf"), col("x").erfc().alias("erfc")])
        .collect()
        .unwrap();
    let titles: Vec<&str> = out.column("t").unwrap().str().unwrap().iter().map(Option::unwrap).collect();
    assert_eq!(titles, ["Hello World", "ǅemal ǈubljana", "Straße Fish", "ᾼ ᾈ", "ა"]);
    let erf: Vec<f64> = out.column("erf").unwrap().f64().unwrap().into_no_null_iter().collect();
    let erfc: Vec<f64> = out.column("erfc").unwrap().f64().unwrap().into_no_null_iter().collect();
    for ((e, c), want) in erf.iter().zip(&erfc).zip([
        0.0,
        0.520_499_877_813_046_5,
        -0.842_700_792_949_714_9,
        0.999_977_909_503_001_4,
        0.001_128_378_790_969_9,
    ]) {
        assert!((e - want).abs() < 1e-12, "erf {e} != {want}");
        assert!((c - (1.0 - want)).abs() < 1e-12, "erfc {c} != {}", 1.0 - want);
    }
}
