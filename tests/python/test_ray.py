"""End to end with Polars' own Ray launcher (`polars-cloud-ray==0.1.1`, `ray[default]`, in the
environment `.ci/run` makes and names in POLARS_NODE_RAY_PYTHON): a single-host Ray cluster runs
this project's binary as the launcher's scheduler and workers with autoscaling on; a query
that needs three workers on a cluster started with one succeeds with local Polars' rows, and
the extra workers are released after the idle time."""

import json
import os
import random
import socket
import subprocess
import uuid
from pathlib import Path

import polars as pl
import pytest

from conftest import BIN, free_port

RAY_PYTHON = os.environ.get("POLARS_NODE_RAY_PYTHON")
pytestmark = pytest.mark.skipif(not RAY_PYTHON, reason="needs POLARS_NODE_RAY_PYTHON (set by .ci/run)")


def free_span(count: int, step: int) -> int:
    """A port p with p, p+step, ... p+(count-1)*step all free (the launcher offsets each
    worker's ports by 2 on one host)."""
    for _ in range(200):
        base = random.randrange(20000, 40000)
        try:
            for i in range(count):
                with socket.socket() as s:
                    s.bind(("0.0.0.0", base + i * step))
            return base
        except OSError:
            continue
    raise RuntimeError("no free port span")


def test_the_ray_launcher_grows_the_cluster_for_a_query_and_releases_the_extra_workers(tmp_path):
    ray = str(Path(RAY_PYTHON).parent / "ray")
    data = tmp_path / "data"
    data.mkdir()
    for i in range(6):
        pl.DataFrame({"k": [j % 17 for j in range(20_000)], "v": list(range(i, 20_000 + i))}).write_parquet(data / f"{i}.parquet")
    # Ray's sockets live under its temp dir, whose path must stay short.
    ray_tmp = Path(f"/tmp/ray-{uuid.uuid4().hex[:8]}")
    gcs, dashboard = free_port("127.0.0.1"), free_port("127.0.0.1")
    task = free_span(3, 2)
    shuffle = free_span(3, 2)
    spec = {
        "binary": BIN,
        "ray_address": f"127.0.0.1:{gcs}",
        "cluster_id": f"ray-test-{uuid.uuid4().hex[:6]}",
        "client_port": free_port(),
        "worker_port": free_port(),
        "otlp_port": free_port(),
        "rest_port": free_port(),
        "scaler_port": free_port("127.0.0.1"),
        "task_port": task,
        "shuffle_port": shuffle if shuffle != task else task + 1,
        "data": str(data),
        "work": str(tmp_path),
    }
    started = subprocess.run(
        [ray, "start", "--head", f"--port={gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=8",
         "--include-dashboard=true", f"--dashboard-port={dashboard}", "--object-store-memory=200000000",
         # The launcher places its scheduler and scaler on the node with the `head` resource.
         "--resources={\"head\": 1}",
         f"--temp-dir={ray_tmp}", "--disable-usage-stats"],
        capture_output=True, text=True, timeout=180,
    )
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        run = subprocess.run(
            [RAY_PYTHON, str(Path(__file__).parent / "ray_launcher.py"), json.dumps(spec)],
            capture_output=True, text=True, timeout=900,
        )
        logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in ray_tmp.glob("session_latest/logs/worker-*.err"))
        lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
        assert lines, f"driver failed:\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}\n{logs[-5000:]}"
        out = json.loads(lines[-1])
        print(out)
        assert out.get("workers_at_start") == ["worker-0"], (out, run.stderr[-3000:])
        assert out["rows_equal"] and out["workers_used"] == 3, out
        assert len(out["workers_after_query"]) == 3, out
        assert len(out["workers_after_idle"]) == 1, (out, logs[-5000:])
        assert out["after_release_equal"] and out.get("stopped"), (out, run.stderr[-3000:])
        binary_logs = "\n".join(p.read_text(errors="replace") for p in ray_tmp.glob("session_latest/logs/worker-*.err"))
        assert "asked the scaler for more workers" in binary_logs and "released idle workers to the scaler" in binary_logs
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, timeout=120)
        subprocess.run(["rm", "-rf", str(ray_tmp)])
