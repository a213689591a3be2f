"""Every Polars 2.0.0 dtype through every result path of the official client, compared with the
frame it came from: `execute()` (`head`, and the stored files read back), `collect()` (Arrow
Flight), and a split query whose stages exchange the column through shuffle files.
Where the 0.12 client itself cannot decode a dtype, the case is an expected failure with the
client's own error (README, "Known client limitations")."""

from datetime import date, datetime, time, timedelta
from decimal import Decimal

import polars as pl
import pytest
from polars.testing import assert_frame_equal

COLUMNS = {
    "Int8": pl.Series([1, -2, None, 4, 5, 127], dtype=pl.Int8),
    "Int16": pl.Series([1, -2, None, 4, 5, 6], dtype=pl.Int16),
    "Int32": pl.Series([1, -2, None, 4, 5, 6], dtype=pl.Int32),
    "Int64": pl.Series([1, -2, None, 4, 5, -(2**63)], dtype=pl.Int64),
    "Int128": pl.Series([1, -2, None, 4, 5, 2**100], dtype=pl.Int128),
    "UInt8": pl.Series([1, 2, None, 4, 5, 255], dtype=pl.UInt8),
    "UInt16": pl.Series([1, 2, None, 4, 5, 6], dtype=pl.UInt16),
    "UInt32": pl.Series([1, 2, None, 4, 5, 6], dtype=pl.UInt32),
    "UInt64": pl.Series([1, 2, None, 4, 5, 2**63], dtype=pl.UInt64),
    "Float16": pl.Series([1.5, None, 2.0, 4.0, 5.0, 6.0], dtype=pl.Float16),
    "Float32": pl.Series([1.5, None, float("nan"), 4, 5, 6], dtype=pl.Float32),
    "Float64": pl.Series([1.5, None, float("inf"), 4, 5, -0.0], dtype=pl.Float64),
    "Decimal": pl.Series([Decimal("1.25"), None, Decimal("-3.50"), Decimal("4"), Decimal("5"), Decimal("6")], dtype=pl.Decimal(10, 2)),
    "Boolean": pl.Series([True, False, None, True, False, True]),
    "String": pl.Series(["a", "bé", None, "", "x" * 100, "z"]),
    "Binary": pl.Series([b"a", b"\x00\xff", None, b"", b"x", b"z"]),
    "Date": pl.Series([date(2024, 1, i) for i in range(1, 7)]),
    "Datetime[ms]": pl.Series([datetime(2024, 1, 1, i) for i in range(6)], dtype=pl.Datetime("ms")),
    "Datetime[us, tz]": pl.Series([datetime(2024, 1, 1, i) for i in range(6)], dtype=pl.Datetime("us", "Europe/Amsterdam")),
    "Datetime[ns]": pl.Series([datetime(2024, 1, 1, i) for i in range(6)], dtype=pl.Datetime("ns")),
    "Duration": pl.Series([timedelta(seconds=i) for i in range(6)], dtype=pl.Duration("us")),
    "Time": pl.Series([time(i, 30) for i in range(6)]),
    "Categorical": pl.Series(["foo", "bar", None, "foo", "ham", "bar"], dtype=pl.Categorical),
    "Enum": pl.Series(["lo", "hi", None, "lo", "mid", "hi"], dtype=pl.Enum(["lo", "mid", "hi"])),
    "List": pl.Series([[1, 2], [], None, [3], [4, None], [5]]),
    "Array": pl.Series([[1, 2], [3, 4], None, [5, 6], [7, 8], [9, 0]], dtype=pl.Array(pl.Int64, 2)),
    "Array[0]": pl.Series([[]] * 6, dtype=pl.Array(pl.Int64, 0)),
    "Struct": pl.Series([{"a": 1, "b": {"c": "x"}}, None, {"a": 3, "b": None}, {"a": 4, "b": {"c": "y"}}, {"a": 5, "b": {"c": "z"}}, {"a": 6, "b": {"c": "w"}}]),
    "Null": pl.Series([None] * 6, dtype=pl.Null),
}

PATHS = ["head", "stored", "flight", "shuffle"]

# (dtype, path) -> (exception type, message) the 0.12 client or Polars 2.0.0 itself raises.
CLIENT_LIMITS = {
    # The client's Flight decoder has no 128-bit integers (Arrow's IPC format has none either).
    ("Int128", "flight"): (BaseException, "Int type with bit width of 128"),
    # The client turns a Flight dictionary column into Categorical, then rejects it as Enum.
    ("Enum", "flight"): (pl.exceptions.SchemaError, "incoming: Categorical != target: Enum"),
    # Polars 2.0.0 cannot read zero-width arrays from IPC, its own files included.
    **{("Array[0]", path): (pl.exceptions.ComputeError, "zero sized arrays") for path in PATHS},
}


def frame(dtype: str) -> pl.DataFrame:
    return pl.DataFrame({"k": list(range(6)), "v": COLUMNS[dtype]})


def through(path: str, ctx, tmp_path, df: pl.DataFrame) -> pl.DataFrame:
    if path == "head":
        return df.lazy().remote(ctx).execute().head
    if path == "stored":
        return df.lazy().remote(ctx).execute().lazy().collect()
    if path == "flight":
        got = df.lazy().remote(ctx).collect()
        return got.collect() if isinstance(got, pl.LazyFrame) else got
    # Two files, sorted by k: range-partitioned over both workers through shuffle files.
    files = [tmp_path / "0.parquet", tmp_path / "1.parquet"]
    df.slice(0, 3).write_parquet(files[0])
    df.slice(3).write_parquet(files[1])
    result = pl.scan_parquet(files).sort("k").remote(ctx).distributed().execute()
    assert result.total_stages >= 2, "not split: the column never went through a shuffle file"
    return result.lazy().collect()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", list(COLUMNS))
def test_dtype_round_trip(dtype, path, ctx, tmp_path):
    df = frame(dtype)
    limit = CLIENT_LIMITS.get((dtype, path))
    if limit is None:
        assert_frame_equal(through(path, ctx, tmp_path, df), df)
        return
    kind, message = limit
    with pytest.raises(kind, match=message):
        through(path, ctx, tmp_path, df)


def test_categorical_with_changing_dictionaries_through_shuffles_and_flight(ctx, tmp_path):
    """600,000 rows, 50,000 categories, many record batches: each batch's dictionary holds the
    categories it uses, so dictionaries change from batch to batch."""
    n = 600_000
    df = pl.DataFrame({"k": range(n)}).with_columns(
        v=(pl.lit("cat-") + (pl.col("k") * 7919 % 50_000).cast(pl.String)).cast(pl.Categorical)
    )
    files = [tmp_path / "a.parquet", tmp_path / "b.parquet"]
    df.slice(0, n // 2).write_parquet(files[0], row_group_size=50_000)
    df.slice(n // 2).write_parquet(files[1], row_group_size=50_000)
    lf = pl.scan_parquet(files).sort("k")
    result = lf.remote(ctx).distributed().execute()
    assert result.total_stages >= 2
    assert_frame_equal(result.lazy().collect(), df, categorical_as_str=True)
    got = lf.remote(ctx).distributed().collect()
    got = got.collect() if isinstance(got, pl.LazyFrame) else got
    assert_frame_equal(got, df, categorical_as_str=True)
