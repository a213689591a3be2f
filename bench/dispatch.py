"""Time to plan and dispatch a stage of one task per worker on many simulated workers.

`polars-node bench-scheduler --dispatch` starts a real scheduler and simulated workers whose
task services note when each RunTask arrives; this submits, with the official client, a query
over one Parquet file of 10,000 rows per worker (the planner gives a task at least 10,000 rows;
the client asks for a split although the files are small), so its first stage has one task per
worker, and measures from just before `execute()` to the last task's arrival, on the same
clock: once on a scheduler that has not connected to the workers' task services yet, once more
on the connections that made.
"""

import json
import subprocess
import time
from pathlib import Path

import polars as pl
import polars_cloud as pc

ROWS_PER_FILE = 10_000


def files(directory: Path, n: int) -> Path:
    """`n` Parquet files of 10,000 rows each, written once."""
    d = directory / f"dispatch-{n}"
    if not (d / "done").exists():
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            start = i * ROWS_PER_FILE
            pl.DataFrame({"k": pl.arange(start, start + ROWS_PER_FILE, eager=True)}).write_parquet(d / f"part-{i:05}.parquet")
        (d / "done").write_text("ok")
    return d


def time_dispatch(binary: str, directory: Path, workers: int) -> dict:
    """Two queries, timed from `execute()` to the last task's arrival: `cold` finds no
    connections to the workers' task services (the first query after they registered), `warm`
    finds those the first made (a cluster that has run queries)."""
    data = files(directory, workers)
    proc = subprocess.Popen([binary, "bench-scheduler", "--workers", str(workers), "--seconds", "1", "--dispatch"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    submitted, errors = [], []
    try:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"bench-scheduler ended before it was ready (exit {proc.wait()})")
        ctx = pc.ClusterContext(uri=json.loads(line)["ready"])
        q = pl.scan_parquet(str(data / "*.parquet")).group_by(pl.col("k") % 7).agg(pl.len())
        for _ in range(2):
            submitted.append(time.time_ns())
            try:
                q.remote(ctx).distributed(min_workers=workers, single_worker_ops="forbid").execute()
                errors.append(None)
            except Exception as e:  # the simulated workers fail every task once the stage is in
                errors.append(str(e))
        proc.stdin.close()
        report = json.loads(proc.stdout.read().strip().splitlines()[-1])
    finally:
        proc.kill()
        proc.wait()
    timed = {"workers": workers}
    for name, stage, at, error in zip(["cold", "warm"], report["dispatch"], submitted, errors):
        timed[name] = {"tasks": stage["tasks"], "workers_reached": stage["workers"],
                       "plan_and_dispatch_ms": (stage["last_arrival_unix_ns"] - at) / 1e6,
                       "until_first_task_ms": (stage["first_arrival_unix_ns"] - at) / 1e6,
                       "dispatch_spread_ms": (stage["last_arrival_unix_ns"] - stage["first_arrival_unix_ns"]) / 1e6,
                       "query_error": error}
    return timed
