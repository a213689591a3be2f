"""Fault drills on shuffle files, during distributed PDS-H queries with hash joins on three
workers, with the client's defaults, each result compared with local Polars 2.0.0: a file
damaged on disk before it is read (drill 6), a worker killed while its files are fetched
(drill 3), a worker whose shuffle file system is full (drill 7)."""

import subprocess
import time
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

import pdsh
import polars_cloud as pc
from conftest import running_cluster
from test_restarts import q18_until_a_checkpoint, restart_scheduler


def shuffle_outputs(cluster, workers, query_id) -> list[Path]:
    """The stage output files of a query on every worker (not the copies fetched from others)."""
    found = []
    for w in workers:
        base = cluster.root / w / "shuffle" / str(query_id) / w
        found += [f for f in base.glob("*-*/*") if f.is_file() and f.stat().st_size > 0]
    return sorted(found)


def test_damaged_shuffle_files_are_detected_and_recomputed(tpch, tmp_path):
    """Drill 6: stage outputs flipped or truncated on disk before the next stage reads them
    (the scheduler is down meanwhile, with checkpoints on, so nothing reads them early): every
    reader checks the files' checksums, the damaged outputs are written again, and the rows are
    exactly local Polars'. No worker is taken for lost."""
    workers = {"fw-1": "127.0.0.40", "fw-2": "127.0.0.41", "fw-3": "127.0.0.42"}
    with running_cluster(tmp_path, workers, 'checkpoint.period = "100ms"') as c:
        query, expected = q18_until_a_checkpoint(c, tpch)
        damaged = []

        def damage():
            files = shuffle_outputs(c, workers, query._query_id)
            assert files, "no stage output on any worker"
            for i, f in enumerate(files):
                data = bytearray(f.read_bytes())
                if i % 2 == 0:
                    data[len(data) // 2] ^= 0xFF  # one flipped byte
                else:
                    data = data[: len(data) // 2]  # cut short
                f.write_bytes(bytes(data))
                damaged.append(f)

        restart_scheduler(c, while_down=damage)
        result = query.await_result()
        assert_frame_equal(result.lazy().collect(), expected, check_exact=False, rel_tol=1e-9)
        log = (c.root / "scheduler.log").read_text()
        assert "damaged shuffle files, to be written again" in log, log[-5000:]
        assert "stage output damaged; it will be recomputed" in log, log[-5000:]
        assert "worker lost" not in log, log[-5000:]
        assert c.live_workers() == sorted(workers)


def test_a_worker_killed_while_its_files_are_fetched(tpch, tmp_path):
    """Drill 3: as soon as a worker starts fetching stage outputs, another worker that holds
    some of them is SIGKILLed: the fetches from it fail, its outputs are recomputed on the
    survivors, and the rows are local Polars' (client defaults)."""
    workers = {"xw-1": "127.0.0.46", "xw-2": "127.0.0.47", "xw-3": "127.0.0.48"}
    with running_cluster(tmp_path, workers) as c:
        ctx = pc.ClusterContext(uri=c.uri)
        q = pdsh.q18(pdsh.tables(tpch))
        expected = q.collect()
        query = q.remote(ctx).distributed(equi_join_broadcast_limit=0).execute(blocking=False)
        victim = None
        deadline = time.time() + 60
        while victim is None:
            assert time.time() < deadline, "no worker ever fetched a shuffle file"
            fetching = [w for w in workers if list((c.root / w / "shuffle").glob("*/*/fetched/*/*"))]
            holders = [w for w in workers if w not in fetching and shuffle_outputs(c, [w], query._query_id)]
            if fetching and holders:
                victim = holders[0]
                c.procs[victim].kill()
                c.procs[victim].wait()
            time.sleep(0.005)
        result = query.await_result()
        assert_frame_equal(result.lazy().collect(), expected, check_exact=False, rel_tol=1e-9)
        log = (c.root / "scheduler.log").read_text()
        assert "recomputed" in log or "task must run again" in log, log[-5000:]
        assert c.live_workers() == sorted(w for w in workers if w != victim)


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (the machine's root may mount one): a shuffle location that fills up."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the disk-full drill (run the tests as root, as CI does): {out.stderr}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)])


def test_a_full_shuffle_disk_moves_the_work_elsewhere_and_the_worker_serves_again(tpch, tmp_path, small_disk):
    """Drill 7: one worker's shuffle location is a 1 MiB file system that fills up during a
    distributed query: its tasks run again on the other workers (the error names the worker and
    the path), the rows are local Polars'; once space is back the worker serves again."""
    workers = {"dw-a": "127.0.0.43", "dw-b": "127.0.0.44", "dw-full": "127.0.0.45"}
    with running_cluster(tmp_path, {}) as c:
        for name, ip in workers.items():
            c.start_worker(name, ip, shuffle_dir=small_disk if name == "dw-full" else None)
        c.wait_for_workers(list(workers))
        ctx = pc.ClusterContext(uri=c.uri)
        t = pdsh.tables(tpch)
        q = pdsh.q18(t)
        result = q.remote(ctx).distributed(equi_join_broadcast_limit=0).execute()
        assert_frame_equal(result.lazy().collect(), q.collect(), check_exact=False, rel_tol=1e-9)
        log = (c.root / "scheduler.log").read_text()
        full = [line for line in log.splitlines() if "No space left on device" in line]
        assert full, log[-5000:]
        assert "dw-full" in full[0] and str(small_disk) in full[0], full[0]
        assert c.live_workers() == sorted(workers)
        # The query's files are released from the full disk too; then space is back (the
        # file system grows) and the worker runs tasks of the next query.
        assert not [p for p in small_disk.rglob("*") if p.is_file()]
        subprocess.run(["mount", "-o", "remount,size=256m", str(small_disk)], check=True)
        q1 = pdsh.q1(t)
        again = q1.remote(ctx).distributed().execute()
        assert_frame_equal(again.lazy().collect(), q1.collect(), check_exact=False, rel_tol=1e-9)
        assert max(s.num_workers_used for s in again.stage_statistics()) == 3


def test_a_query_over_the_memory_limit_fails_naming_it_and_the_worker_serves_on(tmp_path):
    """A query that needs more memory than the worker's `memory_limit` (enforced in the node's
    cgroup): the kernel kills its execution process, the query fails saying so and naming the
    limit (after one more try, as any crash), and the worker runs the next query."""
    with running_cluster(tmp_path, {}) as c:
        c.start_worker("mw-1", "127.0.0.53", top='memory_limit = "640MiB"')
        c.wait_for_workers(["mw-1"])
        assert "memory limit enforced" in (c.root / "mw-1.log").read_text()
        ctx = pc.ClusterContext(uri=c.uri)
        greedy = pl.LazyFrame().select(pl.int_range(0, 200_000_000, dtype=pl.Int64).alias("a")).select(
            pl.col("a").shuffle(seed=1).sum()
        )
        with pytest.raises(pl.exceptions.ComputeError) as e:
            greedy.remote(ctx).execute()
        message = str(e.value)
        assert "needs more memory than the worker's memory_limit = 671088640 bytes (0.6 GiB)" in message, message
        assert "OOM killer" in message and "`mw-1`" in message, message
        assert c.live_workers() == ["mw-1"]
        small = pl.LazyFrame({"x": [1, 2, 3]}).select(pl.col("x").sum())
        assert small.remote(ctx).collect()["x"].to_list() == [6]
