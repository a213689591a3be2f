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
from test_restarts import restart_scheduler, wait_for_log


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
        ctx = pc.ClusterContext(uri=c.uri)
        q = pdsh.q18(pdsh.tables(tpch))
        expected = q.collect()
        query = q.remote(ctx).distributed(equi_join_broadcast_limit=0).execute(blocking=False)
        wait_for_log(c, "checkpoint written")
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
