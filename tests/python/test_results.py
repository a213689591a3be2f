"""Results of the sizes users bring, through every result path of the official client:
`collect()` (Arrow Flight, read by the client with gRPC's 4 MiB message limit) and
`execute()` (`head` and the stored files). Each is compared with local Polars 2.0.0."""

import polars as pl
from polars.testing import assert_frame_equal


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
