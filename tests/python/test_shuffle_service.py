"""A worker's shuffle service, as other workers (the fetch tasks do) and people (a plain GET)
use it. End to end it carries every shuffle of test_distributed.py; here its answers are checked
byte for byte, and what it refuses."""

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from conftest import BIN, Cluster
from ports import free_port


@pytest.fixture(scope="module")
def shuffle_worker(tmp_path_factory):
    root = tmp_path_factory.mktemp("shuffle-service")
    cluster = Cluster(root)
    port = free_port("127.0.0.1")
    location = root / "worker" / "shuffle"
    cluster.start_scheduler()
    cluster.start_worker("worker", "127.0.0.1", shuffle_port=port)
    deadline = time.time() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline:
                raise TimeoutError(cluster.logs())
            time.sleep(0.1)
    try:
        yield f"127.0.0.1:{port}", location
    finally:
        cluster.stop()


def get(addr, path):
    url = f"http://{addr}/v1/shuffle?" + urllib.parse.urlencode({"path": str(path)})
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def fetch(addr, path):
    """The fetch tasks do (`bench-shuffle` copies the file the same way), with the bytes it got."""
    out = subprocess.run([BIN, "bench-shuffle", "--peer", addr, "--path", str(path), "--tcp-bytes", "1"],
                         capture_output=True, text=True, timeout=60)
    return out.returncode, (json.loads(out.stdout)["shuffle_bytes"] if out.returncode == 0 else out.stderr)


@pytest.mark.parametrize("size", [0, 1, 3 * (1 << 20) + 17])
def test_files_of_the_shuffle_location_are_sent_whole(shuffle_worker, size):
    addr, location = shuffle_worker
    path = location / "query" / "worker" / "0-0" / f"{size}.ipc"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = os.urandom(size)
    path.write_bytes(data)
    assert get(addr, path) == data
    assert fetch(addr, path) == (0, size)


def test_other_files_are_refused_and_missing_ones_named(shuffle_worker):
    addr, location = shuffle_worker
    with pytest.raises(urllib.error.HTTPError) as refused:
        get(addr, "/etc/hostname")
    assert refused.value.code == 403 and b"not a shuffle file" in refused.value.read()
    with pytest.raises(urllib.error.HTTPError) as escaped:
        get(addr, location / ".." / "worker.toml")
    assert escaped.value.code == 403
    missing = location / "query" / "gone.ipc"
    code, error = fetch(addr, missing)
    assert code != 0 and "404" in error and str(missing) in error, error
