"""The OCI image built without Nix (images/build.sh): `docker run` it and serve a query to
the official client through a published port."""

import shutil
import subprocess
import time
import uuid
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

import polars_cloud as pc
from conftest import BIN, free_port

ROOT = Path(__file__).parents[2]


def docker_available() -> bool:
    return shutil.which("docker") is not None and subprocess.run(["docker", "info"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def container():
    if not docker_available():
        pytest.skip("no Docker engine on this machine")
    tag = f"polars-node:test-{uuid.uuid4().hex[:8]}"
    subprocess.run([ROOT / "images" / "build.sh", BIN, tag], check=True, capture_output=True)
    port = free_port("127.0.0.1")
    name = f"polars-node-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(["docker", "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:5051", tag], check=True, capture_output=True)
    try:
        deadline = time.time() + 60
        while "node ready" not in subprocess.run(["docker", "logs", name], capture_output=True, text=True).stderr:
            assert time.time() < deadline, subprocess.run(["docker", "logs", name], capture_output=True, text=True).stderr
            time.sleep(0.2)
        yield name, f"http://127.0.0.1:{port}"
    finally:
        subprocess.run(["docker", "rm", "-fv", name], capture_output=True)
        subprocess.run(["docker", "rmi", tag], capture_output=True)


def test_the_image_serves_queries(container):
    _, uri = container
    ctx = pc.ClusterContext(uri=uri)
    q = pl.LazyFrame({"k": ["a", "b", "a"], "v": [1, 2, 3]}).group_by("k").agg(pl.col("v").sum()).sort("k")
    assert_frame_equal(q.remote(ctx).collect(), q.collect())
    assert_frame_equal(q.remote(ctx).execute().head, q.collect())


def test_the_node_runs_unprivileged(container):
    name, _ = container
    user = subprocess.run(["docker", "inspect", "-f", "{{.Config.User}}", name], capture_output=True, text=True).stdout.strip()
    assert user == "65534:65534"
    pid = subprocess.run(["docker", "inspect", "-f", "{{.State.Pid}}", name], capture_output=True, text=True).stdout.strip()
    status = Path(f"/proc/{pid}/status").read_text()
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    assert uid_line.split()[1:] == ["65534"] * 4, uid_line
