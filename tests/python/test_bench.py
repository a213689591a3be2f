"""The benchmark harness's own measurements keep working (bench/run.py prints the figures; these
only check that what it measures is what it says, on the debug build)."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))  # the harness
import dispatch  # noqa: E402
from memory import PeakSampler  # noqa: E402


def test_dispatch_timing_sees_one_task_per_simulated_worker(tmp_path):
    # The official client submits a query over 40 files of 10,000 rows to a scheduler with 40
    # simulated workers, twice: each time its first stage reaches every worker, each with one
    # task (the second time over the connections the first made).
    timing = dispatch.time_dispatch(os.environ["POLARS_NODE_BIN"], tmp_path, 40)
    for query in [timing["cold"], timing["warm"]]:
        assert query["tasks"] == 40, timing
        assert query["workers_reached"] == 40, timing
        assert 0 < query["until_first_task_ms"] <= query["plan_and_dispatch_ms"] < 60_000, timing
        assert "simulated worker" in query["query_error"], timing


def test_peak_sampler_counts_a_child_process_that_has_ended(tmp_path):
    # A worker's execution processes come and go: the peak of one that ended between the
    # reset and the reading still counts.
    import subprocess
    import time

    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                               "subprocess.run([sys.executable, '-c', 'b = bytes(1) * (300 << 20); import time; time.sleep(1)']); "
                               "time.sleep(30)"])
    try:
        sampler = PeakSampler({"parent": parent.pid}, interval=0.05)
        sampler.reset()
        time.sleep(2.5)
        peak = sampler.peak_bytes()["parent"]
        sampler.stop()
    finally:
        parent.kill()
        parent.wait()
    assert peak > 300 << 20, peak


def test_time_breakdown_accounts_for_a_distributed_query(tmp_path, tpch):
    # q3 (joins and an aggregation) runs in several stages at this scale; its spans reach the
    # observatory of the harness's monitored cluster and add up.
    import run

    (row,) = run.time_breakdown(os.environ["POLARS_NODE_BIN"], tmp_path / "cluster", tpch, [3], workers=2)
    assert row["stages"] >= 2 and row["tasks"] >= row["stages"], row
    parts = ["planning_ms", "engine_ms", "data_movement_ms", "task_calls_ms"]
    assert all(row[p] >= 0 for p in parts) and row["engine_ms"] > 0, row
    assert sum(row[p] for p in parts) <= row["total_ms"] * 1.01, row


def test_scale_out_mode_pins_workers_and_measures_each_ones_memory(tmp_path, tpch):
    import run

    # The test tables are small: split anyway.
    (row,) = run.scale_out(os.environ["POLARS_NODE_BIN"], tmp_path / "cluster", tpch, 1, [1], workers=2, min_split_bytes=0)
    assert row["single_s"] > 0 and row["cluster_s"] > 0, row
    # Every worker ran a part of q1 in an execution process of its own: its peak is more than
    # the node process alone.
    assert sorted(row["worker_peak_rss_bytes"]) == ["worker-1", "worker-2"], row
    assert all(peak > 20 << 20 for peak in row["worker_peak_rss_bytes"].values()), row
    assert row["single_peak_rss_bytes"] > 20 << 20, row
    cores = row["worker_cores"]
    assert all(len(c) == 1 for c in cores.values()), cores
    assert len({c[0] for c in cores.values()}) == min(2, os.cpu_count()), cores
