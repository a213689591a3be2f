"""Scheduler policies, refused before any worker runs the query, with a clear message on the
client side."""

import os

import polars as pl
import pytest
from polars.testing import assert_frame_equal

import polars_cloud as pc


@pytest.fixture
def named_user():
    pc.Config.set_user_name("alice")
    yield
    pc.Config.set_user_name(None)


def test_anonymous_queries_are_refused(restricted):
    ctx = pc.ClusterContext(uri=restricted.uri)
    with pytest.raises(RuntimeError, match="does not accept anonymous queries.*x-polars-user"):
        pl.LazyFrame({"a": [1]}).remote(ctx).execute()


def test_a_named_user_runs_in_memory_data(restricted, named_user):
    ctx = pc.ClusterContext(uri=restricted.uri)
    q = pl.LazyFrame({"a": [3, 1, 2]}).sort("a")
    assert_frame_equal(q.remote(ctx).execute().head, q.collect())


def test_local_scans_are_refused(restricted, named_user, tmp_path):
    pl.DataFrame({"a": [1]}).write_parquet(tmp_path / "local.parquet")
    ctx = pc.ClusterContext(uri=restricted.uri)
    with pytest.raises(pl.exceptions.InvalidOperationError, match="allow_local_scans = false.*local.parquet"):
        pl.scan_parquet(tmp_path / "local.parquet").remote(ctx).execute()
    assert not any(restricted.root.glob("worker-r/**/*.parquet"))


def test_local_sinks_are_refused(restricted, named_user, tmp_path):
    ctx = pc.ClusterContext(uri=restricted.uri)
    target = tmp_path / "out.parquet"
    with pytest.raises(pl.exceptions.InvalidOperationError, match="allow_local_sinks = false"):
        pl.LazyFrame({"a": [1]}).remote(ctx).sink_parquet(str(target), sink_to_single_file=True).await_result()
    assert not target.exists()
