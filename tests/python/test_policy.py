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


def _varint(n: int) -> bytes:
    out = b""
    while True:
        byte, n = n & 0x7F, n >> 7
        out += bytes([byte | (0x80 if n else 0)])
        if not n:
            return out


def _field(number: int, value) -> bytes:
    """One protobuf field: bytes/str as length-delimited, int as varint."""
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _run_task(addr: str, plan: bytes, result_dir: str, deny_scans: bool, deny_sinks: bool) -> bytes:
    """A RunTask call to a worker's task service as a scheduler would make it (a user-sink
    target), with the scheduler's policy flags; the raw RunTaskResponse."""
    import grpc

    request = (
        _field(1, "00000000-0000-0000-0000-00000000beef")
        + _field(2, plan)
        + _field(5, result_dir)
        + _field(7, 3)  # RESULT_TARGET_USER
        + (_field(14, 1) if deny_scans else b"")
        + (_field(15, 1) if deny_sinks else b"")
    )
    with grpc.insecure_channel(addr) as channel:
        return channel.unary_unary("/polars_node.v1.Task/RunTask")(request, timeout=120)


def test_the_worker_refuses_local_files_its_scheduler_forbids_even_when_the_task_comes_directly(cluster, tmp_path):
    """Defence in depth: the policy travels with every task and the worker checks it again, so
    a task that did not pass the scheduler's check (sent straight to the task service) is
    refused too; without the flags the same task runs (the check is what refuses it)."""
    source, sink = tmp_path / "secret.csv", tmp_path / "copy.csv"
    source.write_text("a\n1\n2\n")
    plan = pl.scan_csv(source).sink_csv(sink, lazy=True).serialize()
    config = (cluster.root / "worker-1.toml").read_text()
    addr = next(line.split('"')[1] for line in config.splitlines() if line.startswith("task_service.bind_addr"))

    refused = _run_task(addr, plan, str(tmp_path / "r"), deny_scans=True, deny_sinks=False)
    assert b"refused by the worker" in refused and b"scheduler.allow_local_scans = false" in refused, refused
    assert str(source).encode() in refused and not sink.exists()
    refused = _run_task(addr, plan, str(tmp_path / "r"), deny_scans=False, deny_sinks=True)
    assert b"scheduler.allow_local_sinks = false" in refused and str(sink).encode() in refused, refused
    assert not sink.exists()

    ran = _run_task(addr, plan, str(tmp_path / "r"), deny_scans=False, deny_sinks=False)
    assert b"refused" not in ran, ran
    assert sink.read_text() == "a\n1\n2\n"
