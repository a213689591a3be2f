"""A scheduler that is killed (SIGKILL) and started again with the same configuration forgets
nothing: finished queries are still served by id, a queued query runs, and a running query
resumes from its checkpointed stages (`scheduler.checkpoint.period`) or, with checkpoints off,
fails with a message that says how to turn them on. The official client's `await_result()`
started while the scheduler is down waits until it is back; one in flight when the scheduler dies
raises `RuntimeError: Error calling gRPC endpoint, ... transport error`, and the same handle's
`await_result()` gets the outcome once the scheduler is back (`await_across`)."""

import shutil
import threading
import time

import polars as pl
import pytest
from polars.testing import assert_frame_equal

import pdsh
import polars_cloud as pc
from conftest import running_cluster
from polars_cloud.query.query_status import QueryStatus


def restart_scheduler(cluster, down_for: float = 0.0, while_down=None) -> None:
    """SIGKILLs the scheduler and starts it again with the same configuration (calling
    `while_down` in between)."""
    proc = cluster.procs["scheduler"]
    proc.kill()
    proc.wait()
    log = cluster.root / "scheduler.log"
    (cluster.root / "scheduler-before-restart.log").write_text(log.read_text())
    time.sleep(down_for)
    if while_down:
        while_down()
    cluster.start("scheduler", (cluster.root / "scheduler.toml").read_text())


def restart_in_background(cluster, down_for: float) -> threading.Thread:
    thread = threading.Thread(target=restart_scheduler, args=(cluster, down_for))
    thread.start()
    return thread


def await_across(query, restarting: threading.Thread, **kwargs):
    """`query.await_result()` across a restart of the scheduler, as a user would retry it."""
    try:
        return query.await_result(**kwargs)
    except RuntimeError as e:  # the call in flight when the scheduler died
        assert "transport error" in str(e), e
        restarting.join()
        return query.await_result(**kwargs)
    finally:
        restarting.join()


def wait_for_log(cluster, needle: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while needle not in (cluster.root / "scheduler.log").read_text():
        assert time.time() < deadline, f"`{needle}` never in the scheduler's log\n{cluster.logs()}"
        time.sleep(0.01)


def q18_until_a_checkpoint(cluster, tpch):
    """Starts PDS-H q18 (hash joins, the client's defaults) and returns once the scheduler has
    written a checkpoint of it: (the query's handle, local Polars' rows)."""
    q = pdsh.q18(pdsh.tables(tpch))
    expected = q.collect()
    query = q.remote(pc.ClusterContext(uri=cluster.uri)).distributed(equi_join_broadcast_limit=0).execute(blocking=False)
    wait_for_log(cluster, "checkpoint written")
    return query, expected


def test_finished_queries_are_still_served_after_a_restart(tmp_path):
    with running_cluster(tmp_path, {"rw-1": "127.0.0.30"}) as c:
        ctx = pc.ClusterContext(uri=c.uri)
        lf = pl.LazyFrame({"a": range(1000), "b": [i % 7 for i in range(1000)]}).group_by("b").agg(pl.col("a").sum())
        done = lf.remote(ctx).execute(blocking=False)
        first = done.await_result()
        failed = pl.LazyFrame({"a": [1, 2]}).select(pl.col("a").str.len_bytes()).remote(ctx).execute(blocking=False)
        with pytest.raises(pl.exceptions.PolarsError) as before:
            failed.await_result()
        restart_scheduler(c)
        c.wait_for_workers(["rw-1"])
        # Asked again by id, the restarted scheduler answers from its query table.
        assert done.get_status() == QueryStatus.SUCCESS
        assert failed.get_status() == QueryStatus.FAILED
        with pytest.raises(type(before.value)) as after:
            failed.await_result()
        assert str(after.value) == str(before.value)
        assert_frame_equal(first.lazy().collect(), lf.collect(), check_row_order=False)
        log = (c.root / "scheduler.log").read_text()
        assert "served=2 queued=0 resumed=0 failed=0" in log, log
        # And it serves new queries.
        assert_frame_equal(lf.remote(ctx).collect(), lf.collect(), check_row_order=False)


def test_a_query_queued_when_the_scheduler_stops_runs_after_the_restart(tpch, tmp_path):
    """A query waiting for a second worker (min_workers=2) is still queued when the scheduler
    dies; after the restart it runs, once the second worker is there."""
    with running_cluster(tmp_path, {"qw-1": "127.0.0.31"}) as c:
        ctx = pc.ClusterContext(uri=c.uri)
        q = pdsh.q6(pdsh.tables(tpch))
        query = q.remote(ctx).distributed(min_workers=2).execute(blocking=False)
        wait_for_log(c, "query submitted")
        assert query.get_status() == QueryStatus.SCHEDULED
        restart_scheduler(c)
        c.start_worker("qw-2", "127.0.0.32")
        result = query.await_result()
        assert_frame_equal(result.lazy().collect(), q.collect(), check_exact=False, rel_tol=1e-9)
        log = (c.root / "scheduler.log").read_text()
        assert "queued=1" in log and "query queued before the scheduler restarted: it runs now" in log, log


def test_with_checkpoints_a_running_query_resumes_from_its_finished_stages(tpch, tmp_path):
    """Drill 4: SIGKILL of the scheduler during a distributed PDS-H query with hash joins, with
    checkpoints on and the client's defaults. The client waits through the restart; the query
    resumes from the stage outputs its workers still hold and returns local Polars' rows."""
    workers = {"cw-1": "127.0.0.33", "cw-2": "127.0.0.34", "cw-3": "127.0.0.35"}
    with running_cluster(tmp_path, workers, 'checkpoint.period = "100ms"') as c:
        ctx = pc.ClusterContext(uri=c.uri)
        query, expected = q18_until_a_checkpoint(c, tpch)
        restarting = restart_in_background(c, down_for=1.0)
        result = await_across(query, restarting)
        before = (c.root / "scheduler-before-restart.log").read_text()
        assert "query succeeded" not in before, "the query finished before the scheduler was killed"
        assert_frame_equal(result.lazy().collect(), expected, check_exact=False, rel_tol=1e-9)
        log = (c.root / "scheduler.log").read_text()
        assert "resumed=1" in log and "query resumes from its checkpoint" in log, log
        resumed = next(line for line in log.splitlines() if "query resumes from its checkpoint" in line)
        assert "outputs=0" not in resumed and "missing=[]" in resumed, resumed
        # The next query runs as usual.
        q1 = pdsh.q1(pdsh.tables(tpch))
        assert_frame_equal(q1.remote(ctx).distributed().execute().lazy().collect(), q1.collect(), check_exact=False, rel_tol=1e-9)


def test_without_checkpoints_a_running_query_fails_saying_how_to_turn_them_on(tpch, tmp_path):
    """Drill 5: the same kill without checkpoints: the query fails with a clear message (the
    client gets it once the scheduler is back), its shuffle files are removed, the next query
    works."""
    workers = {"nw-1": "127.0.0.36", "nw-2": "127.0.0.37"}
    with running_cluster(tmp_path, workers) as c:
        ctx = pc.ClusterContext(uri=c.uri)
        q = pdsh.q18(pdsh.tables(tpch))
        query = q.remote(ctx).distributed(equi_join_broadcast_limit=0).execute(blocking=False)
        wait_for_log(c, "query split into stages")
        time.sleep(0.3)  # its first tasks run
        restarting = restart_in_background(c, down_for=1.0)
        with pytest.raises(pl.exceptions.ComputeError) as e:
            await_across(query, restarting)
        message = str(e.value)
        assert "the scheduler restarted while query" in message and "checkpoints are off" in message, message
        assert 'set scheduler.checkpoint.period (for example "30s")' in message, message
        c.wait_for_workers(list(workers))
        q6 = pdsh.q6(pdsh.tables(tpch))
        assert_frame_equal(q6.remote(ctx).distributed().execute().lazy().collect(), q6.collect(), check_exact=False, rel_tol=1e-9)
        # The failed query's shuffle files are gone from every worker.
        leftovers = lambda: [p for w in workers for p in (c.root / w / "shuffle").glob(f"{query._query_id}*")]  # noqa: E731
        deadline = time.time() + 10
        while leftovers():
            assert time.time() < deadline, leftovers()
            time.sleep(0.1)


def test_checkpoint_copies_on_shared_storage_outlive_their_worker(tpch, tmp_path):
    """With `worker.checkpoint_location` on a shared file system, finished stage outputs are
    copied there: the scheduler and a worker holding finished stages both die (the worker's
    shuffle files go with its machine), the scheduler restarts, and the query resumes from the
    copies and returns local Polars' rows. The copies are removed when the query ends."""
    shared = tmp_path / "checkpoints"
    workers = {"sw-1": "127.0.0.50", "sw-2": "127.0.0.51", "sw-3": "127.0.0.52"}
    with running_cluster(tmp_path, {}, 'checkpoint.period = "100ms"') as c:
        for name, ip in workers.items():
            c.start_worker(name, ip, tables=f'checkpoint_location.shared_filesystem.path = "{shared}"')
        c.wait_for_workers(list(workers))
        query, expected = q18_until_a_checkpoint(c, tpch)
        lost = []

        def lose_a_worker_with_copies():
            copied = sorted({p.parent.parent.name for p in (shared / str(query._query_id)).glob("*/*/*")})
            assert copied, "no stage output was copied to the checkpoint location"
            victim = copied[0]
            c.procs[victim].kill()
            c.procs[victim].wait()
            shutil.rmtree(c.root / victim / "shuffle")
            lost.append(victim)

        restart_scheduler(c, while_down=lose_a_worker_with_copies)
        result = query.await_result()
        assert_frame_equal(result.lazy().collect(), expected, check_exact=False, rel_tol=1e-9)
        log = (c.root / "scheduler.log").read_text()
        resumed = next(line for line in log.splitlines() if "query resumes from its checkpoint" in line)
        assert "shared_copies=0" not in resumed, resumed
        assert c.live_workers() == sorted(w for w in workers if w not in lost)
        deadline = time.time() + 10
        while (shared / str(query._query_id)).exists():
            assert time.time() < deadline, "the checkpoint copies were not removed"
            time.sleep(0.1)
