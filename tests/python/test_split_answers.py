"""Split plans give Polars' answers: queries over frames stored as two Parquet files each (so
the planner splits them by file) run distributed on two workers and must equal local Polars
2.0.0, row order included where Polars defines it. Each case was once a wrong answer."""

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from polars_cloud.query.query_status import QueryStatus


@pytest.fixture
def files(tmp_path):
    """`files(name, frame)`: the frame written to two Parquet files, scanned over both."""

    def write(name: str, df: pl.DataFrame) -> pl.LazyFrame:
        half = df.height // 2
        paths = [tmp_path / f"{name}-0.parquet", tmp_path / f"{name}-1.parquet"]
        df.slice(0, half).write_parquet(paths[0])
        df.slice(half).write_parquet(paths[1])
        return pl.scan_parquet(paths)

    return write


def distributed(lf: pl.LazyFrame, ctx) -> tuple[pl.DataFrame, int]:
    result = lf.remote(ctx).distributed().execute()
    assert result.status == QueryStatus.SUCCESS
    return result.lazy().collect(), result.total_stages


def assert_same(lf: pl.LazyFrame, ctx, ordered: bool = True, split: bool = True) -> None:
    got, stages = distributed(lf, ctx)
    assert_frame_equal(got, lf.collect(), check_row_order=ordered)
    if split:
        assert stages >= 2, "the query was not split: the case does not test the planner"


def nums(files) -> pl.LazyFrame:
    return files("nums", pl.DataFrame({"x": [1, 2, 3, 4, 5, 6], "g": ["a", "b", "a", "b", "a", "c"]}))


def test_aggregates_sharing_a_subexpression(ctx, files):
    assert_same(nums(files).select(a=pl.col("x").sum(), b=pl.col("x").sum() + 1), ctx)


def test_eq_missing_with_a_literal_on_a_narrow_integer(ctx, files):
    lf = files("narrow", pl.DataFrame({"x": pl.Series([1, None, 100, 3], dtype=pl.Int8)}))
    assert_same(lf.with_columns(e=pl.col("x").eq_missing(1000), f=pl.col("x").eq_missing(100), n=pl.col("x").ne_missing(3)), ctx)


def test_len_of_a_split_scan(ctx, files):
    assert_same(nums(files).select(pl.len()), ctx)
    assert_same(nums(files).select(pl.len(), n=pl.col("x").count()), ctx)


def test_left_join_where_keeps_unmatched_rows(ctx, files):
    left = nums(files)
    right = files("bounds", pl.DataFrame({"lo": [2, 4], "hi": [3, 5]}))
    lf = left.join_where(right, pl.col("x") >= pl.col("lo"), pl.col("x") <= pl.col("hi"), how="left")
    assert_same(lf, ctx, ordered=False, split=False)


def test_group_by_after_a_sort_sees_the_sorted_rows(ctx, files):
    df = pl.DataFrame({"id": [6, 2, 5, 1, 4, 3], "grp": ["a", "b", "a", "b", "a", "b"], "v": [2, 3, 4, 5, 6, 7]})
    lf = files("sorted", df).sort("id").group_by("grp").agg(pl.col("v").implode(), s=pl.col("v").cum_prod().sum())
    assert_same(lf, ctx, ordered=False, split=False)


def test_left_join_keeping_left_order_and_a_slice_after_it(ctx, files):
    left = files("l", pl.DataFrame({"k": [5, 1, 4, 2, 3, 9], "a": list("uvwxyz")}))
    right = files("r", pl.DataFrame({"k": [1, 2, 3, 4, 5], "b": [10, 20, 30, 40, 50]}))
    lf = left.join(right, on="k", how="left", maintain_order="left")
    assert_same(lf, ctx, split=False)
    assert_same(lf.slice(1, 3), ctx, split=False)
    assert_same(lf.head(2), ctx, split=False)


def test_left_join_of_keys_of_different_integer_widths(ctx, files):
    left = files("i8", pl.DataFrame({"a": pl.Series([1, 2, 3, 4], dtype=pl.Int8)}))
    right = files("i16", pl.DataFrame({"a": pl.Series([2, 3, 5, 6], dtype=pl.Int16), "b": [1, 2, 3, 4]}))
    lf = left.join(right, on="a", how="left")
    got, _ = distributed(lf, ctx)
    assert got.columns == ["a", "b"]
    assert_frame_equal(got, lf.collect(), check_row_order=False)


def test_mean_of_temporal_columns(ctx, files):
    from datetime import date, datetime

    df = pl.DataFrame(
        {
            "d": [date(2024, 1, i) for i in range(1, 7)],
            "t": [datetime(2024, 1, 1, i) for i in range(6)],
            "g": ["a", "b", "a", "b", "a", "b"],
        }
    )
    lf = files("temporal", df)
    assert_same(lf.select(pl.col("d").mean(), pl.col("t").mean()), ctx, split=False)
    assert_same(lf.group_by("g").agg(pl.col("d").mean(), pl.col("t").mean()).sort("g"), ctx, split=False)


def test_sorted_head(ctx, files):
    assert_same(nums(files).sort("x").head(2), ctx, split=False)
    assert_same(nums(files).sort("x", descending=True).head(3), ctx, split=False)


def test_right_non_equi_join_raises_as_polars_does(ctx, files):
    left = nums(files)
    right = files("rb", pl.DataFrame({"lo": [2, 4]}))
    for how in ["right", "full", "semi", "anti"]:
        lf = left.join_where(right, pl.col("x") != pl.col("lo"), how=how)
        with pytest.raises(pl.exceptions.InvalidOperationError, match="not supported with non-equi join conditions"):
            lf.collect()
        with pytest.raises(pl.exceptions.InvalidOperationError, match="not supported with non-equi join conditions"):
            lf.remote(ctx).distributed().execute().lazy().collect()
