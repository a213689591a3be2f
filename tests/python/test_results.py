"""Results of the sizes users bring, through every result path of the official client:
`collect()` (Arrow Flight, read by the client with gRPC's 4 MiB message limit) and
`execute()` (`head` and the stored files). Each is compared with local Polars 2.0.0."""

import os
import time

import polars as pl
import polars_cloud as pc
from polars.testing import assert_frame_equal

from conftest import running_cluster


def flight(lf: pl.LazyFrame, ctx) -> pl.DataFrame:
    df = lf.remote(ctx).collect()
    return df.collect() if isinstance(df, pl.LazyFrame) else df


def test_collect_of_a_parquet_scan_larger_than_a_flight_message(ctx, tmp_path):
    # 3,000,000 rows: one record batch of this would be a 7 MB Flight message.
    path = tmp_path / "big.parquet"
    pl.select(a=pl.int_range(3_000_000, dtype=pl.Int64)).write_parquet(path)
    lf = pl.scan_parquet(path).with_columns(c=pl.col("a") * 3)
    assert_frame_equal(flight(lf, ctx), lf.collect())


def test_collect_of_many_strings_larger_than_a_flight_message(ctx):
    lf = pl.LazyFrame({"s": ["x" * 10] * 500_000}).with_columns(n=pl.col("s").str.len_bytes())
    assert_frame_equal(flight(lf, ctx), lf.collect())


def test_collect_of_rows_of_uneven_size(ctx):
    # A few rows of 1 MiB among small ones: pieces sized by the average row are too large
    # where the big rows sit, and must be cut further.
    lf = pl.LazyFrame({"i": range(20_000)}).with_columns(
        s=pl.when(pl.col("i") % 5000 < 8).then(pl.lit("y" * (1 << 20))).otherwise(pl.col("i").cast(pl.String)),
        l=pl.int_ranges(pl.col("i") % 50),
    )
    assert_frame_equal(flight(lf, ctx), lf.collect())


def test_collect_of_a_one_gigabyte_result(ctx):
    rows = 1 << 26  # two Int64 columns: 1 GiB
    lf = pl.LazyFrame().select(a=pl.int_range(rows, dtype=pl.Int64)).with_columns(b=pl.col("a") * 2)
    df = flight(lf, ctx)
    assert df.estimated_size() >= 1 << 30
    assert_frame_equal(df, lf.collect())


def test_a_streamed_result_leaves_no_files_behind(ctx, cluster):
    before = set(cluster.results.iterdir()) if cluster.results.exists() else set()
    lf = pl.LazyFrame({"a": range(1000)}).with_columns(b=pl.col("a") * 2)
    for _ in range(3):
        assert_frame_equal(flight(lf, ctx), lf.collect())
    deadline = time.time() + 10
    while (left := set(cluster.results.iterdir()) - before) and time.time() < deadline:
        time.sleep(0.1)
    assert not left, left


def test_stored_results_expire_after_the_retention(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    orphan = root / "results" / "00000000-0000-0000-0000-000000000000"
    orphan.mkdir(parents=True)
    (orphan / "0.parquet").write_bytes(b"left by an earlier run")
    hour_ago = time.time() - 3600
    os.utime(orphan, (hour_ago, hour_ago))
    with running_cluster(root, {"worker-x": "127.0.0.9"}, 'result_retention = "3s"') as c:
        ctx = pc.ClusterContext(uri=c.uri)
        result = pl.LazyFrame({"a": [1, 2, 3]}).remote(ctx).execute()
        assert result.lazy().collect()["a"].to_list() == [1, 2, 3]
        stored = [p for p in c.results.iterdir() if p.name != orphan.name]
        assert len(stored) == 1 and not orphan.exists(), list(c.results.iterdir())
        deadline = time.time() + 15
        while stored[0].exists() and time.time() < deadline:
            time.sleep(0.2)
        assert not stored[0].exists(), "a stored result outlived its retention"


def test_collect_of_an_empty_result(ctx):
    lf = pl.LazyFrame({"a": [1, 2], "s": ["x", "y"]}).filter(pl.col("a") > 5)
    got = flight(lf, ctx)
    assert got.height == 0
    assert_frame_equal(got, lf.collect())
