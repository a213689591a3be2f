"""A worker's shuffle service, as other workers (the fetch tasks do) and people (a plain GET)
use it. End to end it carries every shuffle of test_distributed.py; here its answers are checked
byte for byte, what it refuses, how a fetch fails when the peer stops short, and the gRPC health
check it answers on the same port."""

import json
import os
import socket
import subprocess
import threading
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


def fetch(addr, path, copy_to=None):
    """The fetch tasks do (`bench-shuffle` copies the file the same way), with the bytes it got."""
    keep = ["--copy-to", str(copy_to)] if copy_to else []
    out = subprocess.run([BIN, "bench-shuffle", "--peer", addr, "--path", str(path), "--tcp-bytes", "1", *keep],
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
    copy = location.parent / f"copy-{size}"
    assert fetch(addr, path, copy) == (0, size)
    assert copy.read_bytes() == data


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


def raw_get(addr, query: str) -> tuple[int, bytes]:
    """A GET with the query string exactly as given (no encoding by the test)."""
    host, port = addr.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"GET /v1/shuffle?{query} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := s.recv(1 << 16):
            answer += chunk
    return int(answer.split(b" ", 2)[1]), answer


def test_no_path_form_reaches_a_file_outside_the_shuffle_root(shuffle_worker, tmp_path):
    """Traversal in every form a hostile peer might try: dot segments (plain and URL-encoded,
    once and twice), relative paths, NUL bytes, and symbolic links planted in the shuffle root
    that point outside it (to a file, to a directory). Each is refused; a real file still
    serves."""
    addr, location = shuffle_worker
    secret = tmp_path / "secret.txt"
    secret.write_text("outside the shuffle root")
    query = location / "q-traversal" / "worker" / "0-0"
    query.mkdir(parents=True, exist_ok=True)
    (query / "file-link.ipc").symlink_to(secret)
    (query / "dir-link").symlink_to(tmp_path)
    (query / "real.ipc").write_bytes(b"shuffle data")
    inner = f"{query}/0.ipc"
    attempts = [
        f"path={location}/../../../{secret.relative_to('/')}",
        f"path={location}/%2e%2e/%2e%2e/%2e%2e/{secret.relative_to('/')}",
        f"path={location}%2F..%2F..%2F..%2F{str(secret.relative_to('/')).replace('/', '%2F')}",
        f"path={location}/%252e%252e/%252e%252e/{secret.relative_to('/')}",
        f"path=shuffle/../{secret.name}",
        f"path={secret}",
        f"path={query}/file-link.ipc",
        f"path={query}/dir-link/{secret.name}",
        f"path={inner}%00/../../../../{secret.relative_to('/')}",
        f"path={location}",
        "path=",
        "nopath=1",
    ]
    for attempt in attempts:
        status, answer = raw_get(addr, attempt)
        assert status in (400, 403, 404) and b"outside the shuffle root" not in answer, (attempt, answer)
    status, answer = raw_get(addr, urllib.parse.urlencode({"path": str(query / "real.ipc")}))
    assert status == 200 and answer.endswith(b"shuffle data"), answer


def test_a_fetch_from_a_peer_that_stops_short_fails_naming_what_is_missing(tmp_path):
    """A peer that dies mid-file: the fetch must fail (the task reruns), not leave a short copy
    taken as whole."""
    listener = socket.create_server(("127.0.0.1", 0))
    addr = "127.0.0.1:%d" % listener.getsockname()[1]

    def peer():
        conn, _ = listener.accept()
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(4096)
            assert b"upgrade: polars-node-shuffle" in request.lower()
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\n"
                         b"upgrade: polars-node-shuffle\r\npolars-node-shuffle-length: 1000000\r\n\r\n")
            conn.sendall(os.urandom(300000))

    server = threading.Thread(target=peer, daemon=True)
    server.start()
    code, error = fetch(addr, "/shuffle/query/part.ipc", tmp_path / "copy")
    server.join(timeout=10)
    listener.close()
    assert code != 0 and "closed 700000 bytes before the end of the file" in error, error


def test_the_shuffle_port_answers_grpc_health_checks(shuffle_worker):
    import grpc

    addr, _ = shuffle_worker
    with grpc.insecure_channel(addr) as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        # HealthCheckRequest{service: ""} is empty; HealthCheckResponse{status: SERVING} is 08 01.
        assert check(b"", timeout=10) == b"\x08\x01"
