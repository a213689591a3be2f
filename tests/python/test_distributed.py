"""Distributed execution through the official client: the 22 PDS-H queries on a scheduler and
three workers, split into stages that exchange data through the workers' shuffle services,
each result compared with local Polars on the same files; worker loss during a stage."""

import os
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

import polars_cloud as pc
from polars_cloud.query.query_status import QueryStatus

sys.path.insert(0, str(Path(__file__).parent))
import pdsh  # noqa: E402
from conftest import free_port, kill_busy_workers, running_cluster  # noqa: E402

@pytest.fixture(scope="module")
def dcluster(tmp_path_factory):
    workers = {"dw-1": "127.0.0.5", "dw-2": "127.0.0.6", "dw-3": "127.0.0.7"}
    with running_cluster(tmp_path_factory.mktemp("distributed"), workers, "max_workers_per_query = 3") as c:
        yield c


@pytest.fixture(scope="module")
def dctx(dcluster):
    return pc.ClusterContext(uri=dcluster.uri)


def split_log(cluster) -> str:
    return (cluster.root / "scheduler.log").read_text()


@pytest.mark.parametrize("n", range(1, 23))
def test_pdsh(n, tpch, dcluster, dctx):
    t = pdsh.tables(tpch)
    expected = pdsh.QUERIES[n](t).collect()
    result = pdsh.QUERIES[n](t).remote(dctx).execute()
    assert result.status == QueryStatus.SUCCESS, dcluster.logs()
    got = result.lazy().collect()
    # Sums over differently ordered rows may differ in the last bits of a float.
    assert_frame_equal(got, expected, check_exact=False, rel_tol=1e-9, abs_tol=1e-9)
    # Every query reads lineitem (4 files) or orders: it must have been split.
    assert result.total_stages >= 2, f"query {n} ran as one stage\n{split_log(dcluster)[-3000:]}"
    used = [s.num_workers_used for s in result.stage_statistics()]
    assert len(used) == result.total_stages and max(used) >= 2, used


def test_stage_statistics_and_cleanup(tpch, dcluster, dctx):
    """A hash-partitioned group-by: several workers in its stages, shuffle files gone after."""
    t = pdsh.tables(tpch)
    q = t("lineitem").group_by("l_partkey").agg(pl.len(), pl.sum("l_quantity")).sort("l_partkey")
    result = q.remote(dctx).execute()
    assert_frame_equal(result.lazy().collect(), q.collect())
    assert result.total_stages == result.finished_stages >= 3
    assert all(s.num_workers_used >= 1 for s in result.stage_statistics())
    log = split_log(dcluster)
    assert "shuffle by l_partkey" in log, log[-3000:]
    # The final aggregation's inputs are a few MB: its gather runs inside the result task.
    assert "small gather stage runs inside the result task" in log, log[-3000:]
    deadline = time.time() + 10
    while time.time() < deadline:
        leftovers = [p for w in ("dw-1", "dw-2", "dw-3") for p in (dcluster.root / w / "shuffle").rglob("*") if p.is_file()]
        if not leftovers:
            break
        time.sleep(0.2)
    assert not leftovers, leftovers


def test_tables_laid_out_by_a_key_are_grouped_and_joined_by_it_without_shuffles(tpch, dcluster, dctx):
    """lineitem's files and orders' row groups are sorted by order key (their Parquet statistics
    say so): PDS-H q18 groups lineitem by it and joins orders and lineitem on it part by part,
    orders cut to each part's range instead of read whole by every task."""
    t = pdsh.tables(tpch)
    q = pdsh.q18(t)
    result = q.remote(dctx).execute()
    assert_frame_equal(result.lazy().collect(), q.collect())
    plan = result.plan()
    assert "parts by ranges of l_orderkey" in plan and "join by ranges of o_orderkey" in plan, plan
    assert "shuffle by l_orderkey" not in plan and "shuffle by o_orderkey" not in plan, plan
    assert result.total_stages == 2, plan


@pytest.mark.parametrize(
    "shuffle",
    [
        dict(shuffle_format="ipc", shuffle_compression="zstd", shuffle_compression_level=3),
        dict(shuffle_format="parquet", shuffle_compression="lz4"),
        dict(shuffle_format="ipc", shuffle_compression="uncompressed"),
    ],
    ids=["ipc-zstd", "parquet", "ipc-plain"],
)
def test_shuffle_formats(shuffle, tpch, dcluster, dctx):
    t = pdsh.tables(tpch)
    q = pdsh.q3(t)
    result = q.remote(dctx).distributed(equi_join_broadcast_limit=0, **shuffle).execute()
    assert_frame_equal(result.lazy().collect(), q.collect(), check_exact=False, rel_tol=1e-9)
    assert result.total_stages >= 2


@pytest.mark.parametrize("engine", ["auto", "streaming"])
def test_stage_outputs_stream_into_shuffle_files(engine, tpch, dctx):
    """Stage tasks write their hash-partitioned and gathered outputs as the engine streams
    them, whichever streaming choice the client makes (it allows no in-memory engine for
    distributed queries); range outputs: test_range_partitioned_sort."""
    t = pdsh.tables(tpch)
    q = pdsh.q18(t)
    result = q.remote(dctx, engine=engine).distributed(equi_join_broadcast_limit=0).execute()
    assert_frame_equal(result.lazy().collect(), q.collect(), check_exact=False, rel_tol=1e-9)
    assert result.total_stages >= 3


def test_collect_over_flight(tpch, dctx):
    t = pdsh.tables(tpch)
    q = pdsh.q1(t)
    got = q.remote(dctx).collect()
    got = got.collect() if isinstance(got, pl.LazyFrame) else got
    assert_frame_equal(got, q.collect(), check_exact=False, rel_tol=1e-9)


def test_single_node_is_not_split(tpch, dcluster, dctx):
    t = pdsh.tables(tpch)
    q = pdsh.q6(t)
    result = q.remote(dctx).single_node().execute()
    assert_frame_equal(result.lazy().collect(), q.collect())
    assert result.total_stages == 1


def test_forbid_single_worker(dctx):
    """A query with nothing to split fails with single_worker_ops = forbid, naming why."""
    q = pl.LazyFrame({"a": [1, 2, 3]}).select(pl.col("a").sum())
    with pytest.raises(pl.exceptions.InvalidOperationError, match="single_worker_ops"):
        q.remote(dctx).distributed(single_worker_ops="forbid").execute().lazy().collect()


def test_worker_bounds(tpch, dcluster, dctx):
    """`max_workers` bounds the workers of every stage; asking for more than the scheduler's
    max_workers_per_query fails at once, naming the bound."""
    t = pdsh.tables(tpch)
    q = pdsh.q1(t)
    result = q.remote(dctx).distributed(max_workers=2).execute()
    assert_frame_equal(result.lazy().collect(), q.collect(), check_exact=False, rel_tol=1e-9)
    assert max(s.num_workers_used for s in result.stage_statistics()) == 2
    with pytest.raises(pl.exceptions.InvalidOperationError, match="at most 3 per query"):
        q.remote(dctx).distributed(min_workers=4).execute()


def test_hash_joins(tpch, dcluster, dctx):
    """Without broadcasts every large scan is split and joins shuffle both sides by key."""
    t = pdsh.tables(tpch)
    for n in (3, 5, 10, 18):
        q = pdsh.QUERIES[n](t)
        result = q.remote(dctx).distributed(equi_join_broadcast_limit=0).execute()
        assert_frame_equal(result.lazy().collect(), q.collect(), check_exact=False, rel_tol=1e-9, abs_tol=1e-9)
    assert "hash join on" in split_log(dcluster)


def test_worker_killed_during_a_stage(tpch, tmp_path):
    """A worker dies while the query runs: its tasks and the shuffle files it held are
    recomputed on the others, and the result is exactly the local one."""
    workers = {"kw-1": "127.0.0.8", "kw-2": "127.0.0.9", "kw-3": "127.0.0.10"}
    with running_cluster(tmp_path, workers) as c:
        ctx = pc.ClusterContext(uri=c.uri)
        t = pdsh.tables(tpch)
        q = pdsh.q18(t)
        expected = q.collect()
        # The client's defaults (n_retries=0): task attempts are the scheduler's business.
        query = q.remote(ctx).distributed(equi_join_broadcast_limit=0).execute(blocking=False)
        # Kill a worker while it runs a task (outputs of earlier stages may live on it too).
        (killed,) = kill_busy_workers(c, list(workers), 1)
        result = query.await_result()
        assert_frame_equal(result.lazy().collect(), expected, check_exact=False, rel_tol=1e-9)
        log = (c.root / "scheduler.log").read_text()
        assert "task must run again" in log or "recomputed" in log, log[-3000:]
        # The worker comes back and is used again.
        c.start(killed, (c.root / f"{killed}.toml").read_text())
        c.wait_for_workers(list(workers))
        q1 = pdsh.q1(t)
        again = q1.remote(ctx).execute()
        assert_frame_equal(again.lazy().collect(), q1.collect(), check_exact=False, rel_tol=1e-9)
        assert max(s.num_workers_used for s in again.stage_statistics()) == 3


def test_two_workers_killed_one_after_the_other_in_the_same_query(tpch, tmp_path):
    """Two of three workers die during one distributed query (the second once the first one's
    tasks run elsewhere), with the client's defaults: the last worker finishes it, exactly."""
    workers = {"tw-1": "127.0.0.11", "tw-2": "127.0.0.12", "tw-3": "127.0.0.13"}
    with running_cluster(tmp_path, workers) as c:
        ctx = pc.ClusterContext(uri=c.uri)
        t = pdsh.tables(tpch)
        q = pdsh.q18(t)
        expected = q.collect()
        query = q.remote(ctx).distributed(equi_join_broadcast_limit=0).execute(blocking=False)
        killed = kill_busy_workers(c, list(workers), 2)
        result = query.await_result()
        assert_frame_equal(result.lazy().collect(), expected, check_exact=False, rel_tol=1e-9)
        (alive,) = [w for w in workers if w not in killed]
        assert c.live_workers() == [alive]


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """A real S3-compatible server on loopback (moto's), with a bucket for shuffle files."""
    exe = Path(sys.executable).parent / "moto_server"
    if not exe.exists():
        pytest.fail("moto_server is not installed next to the test interpreter: run .ci/run (it installs moto[server])")
    port = free_port("127.0.0.1")
    log = tmp_path_factory.mktemp("s3") / "s3.log"
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=open(log, "w"), stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        import boto3

        deadline = time.time() + 30
        while True:
            try:
                s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test")
                s3.create_bucket(Bucket="shuffle")
                break
            except Exception:
                assert time.time() < deadline, log.read_text()
                time.sleep(0.2)
        yield endpoint, s3, log
    finally:
        proc.kill()
        proc.wait()


def test_shuffle_through_an_object_store(tpch, tmp_path, s3_server):
    """Workers with `shuffle_location.s3` upload their outputs and download their inputs from
    the store (no shuffle service is bound); the files are deleted when the query ends."""
    endpoint, s3, log = s3_server
    store = (
        f'shuffle_location = {{ s3 = {{ url = "s3://shuffle/runs", endpoint = "{endpoint}", region = "us-east-1", '
        f'access_key_id = "test", secret_access_key = "test", allow_http = "true" }} }}'
    )
    from conftest import Cluster

    c = Cluster(tmp_path)
    c.start_scheduler()
    try:
        for name, ip in (("s3-1", "127.0.0.11"), ("s3-2", "127.0.0.12")):
            c.start(name, f"""instance_id = "{name}"
[worker]
enabled = true
heartbeat_period = "300ms"
task_service.bind_addr = "{ip}:{free_port(ip)}"
{store}
[static_leader]
scheduler_service.public_addr = "127.0.0.1:{c.worker_port}"
""")
        c.wait_for_workers(["s3-1", "s3-2"])
        ctx = pc.ClusterContext(uri=c.uri)
        t = pdsh.tables(tpch)
        for q in (pdsh.q3(t), pdsh.q18(t)):
            result = q.remote(ctx).distributed(equi_join_broadcast_limit=0).execute()
            assert_frame_equal(result.lazy().collect(), q.collect(), check_exact=False, rel_tol=1e-9)
            assert max(s.num_workers_used for s in result.stage_statistics()) == 2
        requests = log.read_text()
        assert "PUT /shuffle/runs/" in requests and "GET /shuffle/runs/" in requests, requests[-2000:]
        deadline = time.time() + 10
        while s3.list_objects_v2(Bucket="shuffle").get("KeyCount", 0):
            assert time.time() < deadline, s3.list_objects_v2(Bucket="shuffle")
            time.sleep(0.2)
        # More workers than are live: a bounded wait (30 s), then an error naming the shortfall.
        started = time.time()
        with pytest.raises(pl.exceptions.ComputeError, match=r"needs at least 3 live worker\(s\) and 2 are live"):
            pdsh.q6(t).remote(ctx).distributed(min_workers=3).execute()
        assert 25 < time.time() - started < 60
    finally:
        c.stop()


def test_physical_plan_is_the_stage_graph(tpch, dctx):
    """`plan()`, `graph()` and `explain()` show the stage graph, decoded by the client itself."""
    t = pdsh.tables(tpch)
    q = pdsh.q3(t)
    result = q.remote(dctx).distributed(equi_join_broadcast_limit=0).execute()
    text = result.plan()
    assert "STAGE 0:" in text and "SHUFFLE WRITE" in text and "SHUFFLE READ" in text and "RESULT" in text, text
    dot = result.graph(raw_output=True, show=False)
    assert dot.startswith("digraph stage_graph") and "cluster_0" in dot, dot
    explained = q.remote(dctx).distributed(equi_join_broadcast_limit=0).explain()
    # Orders are split too (no broadcast), in other ranges of the order key than lineitem's four
    # files: one side is shuffled by the other's ranges, and the two are joined range by range.
    assert "SHUFFLE WRITE (0) [partitioning: Hash range of" in explained and "join by ranges of" in explained, explained


def test_range_partitioned_sort(tpch, dcluster, dctx):
    """A sort of split rows: boundaries sampled from the first key, rows sent to their range,
    each range sorted; the result is exactly the locally sorted frame."""
    t = pdsh.tables(tpch)
    q = t("lineitem").select("l_orderkey", "l_linenumber", "l_quantity").sort("l_orderkey", "l_linenumber", descending=[True, False])
    result = q.remote(dctx).execute()
    assert_frame_equal(result.lazy().collect(), q.collect())
    assert result.total_stages >= 5, result.total_stages
    assert "ranges of l_orderkey" in result.plan() or "range of l_orderkey" in result.plan(), result.plan()


def test_user_sink_of_a_split_query(tpch, tmp_path, dctx):
    """`sink_parquet(path)`: the query below the sink is split, its last task writes the file."""
    t = pdsh.tables(tpch)
    q = pdsh.q3(t)
    target = tmp_path / "q3.parquet"
    result = q.remote(dctx).sink_parquet(str(target), sink_to_single_file=True).await_result()
    assert result.total_stages >= 2, result.total_stages
    assert_frame_equal(pl.read_parquet(target), q.collect(), check_exact=False, rel_tol=1e-9)


def test_small_queries_run_whole_unless_the_client_forbids_it(tpch, tmp_path):
    """A distributed query whose scans read less than scheduler.min_split_bytes runs whole on
    one worker (a split costs more than it wins on small inputs), and the scheduler says why;
    `single_worker_ops="forbid"` splits it anyway."""
    workers = {"mw-1": "127.0.0.8", "mw-2": "127.0.0.9"}
    with running_cluster(tmp_path, workers, 'min_split_bytes = "1GiB"') as c:
        ctx = pc.ClusterContext(uri=c.uri)
        q = pdsh.q1(pdsh.tables(tpch))
        whole = q.remote(ctx).distributed().execute()
        assert_frame_equal(whole.lazy().collect(), q.collect(), check_exact=False, rel_tol=1e-9)
        assert whole.total_stages == 1
        assert "less than a split pays for (scheduler.min_split_bytes = 1.0 GiB" in split_log(c), split_log(c)[-2000:]
        split = q.remote(ctx).distributed(single_worker_ops="forbid").execute()
        assert_frame_equal(split.lazy().collect(), q.collect(), check_exact=False, rel_tol=1e-9)
        assert split.total_stages >= 2
