"""The cluster token (`internal.token_file`): every internal port (worker service, task
service, shuffle service) refuses calls without it and accepts them with it; the nodes of a
cluster carry it in every call (a distributed query with shuffles between workers gives local
Polars' rows); a worker without it cannot register."""

import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

import grpc
import polars as pl
import polars_cloud as pc
import pytest
from polars.testing import assert_frame_equal

import pdsh
from conftest import BIN, free_port, running_cluster

TOKEN = "c0ffee" * 8
HEADER = "x-polars-node-token"


@pytest.fixture(scope="module")
def token_cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("token")
    token = root / "cluster-token"
    token.write_text(TOKEN + "\n")
    with running_cluster(root, {"kw-1": "127.0.0.55", "kw-2": "127.0.0.56"}, token_file=token) as c:
        yield c


def test_a_distributed_query_runs_with_the_token_on_every_internal_call(token_cluster, tpch):
    q = pdsh.q18(pdsh.tables(tpch))
    result = q.remote(pc.ClusterContext(uri=token_cluster.uri)).distributed(equi_join_broadcast_limit=0).execute()
    assert_frame_equal(result.lazy().collect(), q.collect(), check_exact=False, rel_tol=1e-9)
    assert max(s.num_workers_used for s in result.stage_statistics()) == 2
    assert "serve anyone who can reach them" not in (token_cluster.root / "scheduler.log").read_text()


def test_a_worker_without_the_token_cannot_register(token_cluster):
    token_cluster.token_file, saved = None, token_cluster.token_file
    try:
        token_cluster.start_worker("rogue", "127.0.0.57")
    finally:
        token_cluster.token_file = saved
    log = token_cluster.wait_for_log("rogue", "takes calls only from nodes of the cluster")
    assert "serve anyone who can reach them" in log  # the rogue's own warning
    assert token_cluster.live_workers() == ["kw-1", "kw-2"]
    token_cluster.procs.pop("rogue").kill()


def test_listing_workers_needs_the_token(token_cluster):
    out = subprocess.run([BIN, "workers", "--scheduler", f"127.0.0.1:{token_cluster.worker_port}"], capture_output=True, text=True)
    assert out.returncode != 0 and "takes calls only from nodes of the cluster" in out.stderr, out.stderr


def task_addr(cluster, worker: str) -> str:
    config = (cluster.root / f"{worker}.toml").read_text()
    return next(line.split('"')[1] for line in config.splitlines() if line.startswith("task_service.bind_addr"))


def test_the_task_service_refuses_calls_without_the_token(token_cluster):
    with grpc.insecure_channel(task_addr(token_cluster, "kw-1")) as channel:
        cancel = channel.unary_unary("/polars_node.v1.Task/CancelTask")
        with pytest.raises(grpc.RpcError) as e:
            cancel(b"", timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            cancel(b"", timeout=10, metadata=[(HEADER, "c0ffee" * 7 + "c0ffef")])
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert cancel(b"", timeout=10, metadata=[(HEADER, TOKEN)]) == b""  # was_running = false
        health = channel.unary_unary("/grpc.health.v1.Health/Check")
        assert health(b"", timeout=10) == b"\x08\x01"  # SERVING, without the token


def test_a_plain_get_of_a_shuffle_file_needs_the_token(token_cluster):
    worker = "kw-2"
    planted = token_cluster.root / worker / "shuffle" / "q" / worker / "0-0" / "0.arrow"
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.write_bytes(b"shuffle bytes")
    config = (token_cluster.root / f"{worker}.toml").read_text()
    addr = next(line.split('"')[1] for line in config.splitlines() if line.startswith("shuffle_service.bind_addr"))
    url = f"http://{addr}/v1/shuffle?" + urllib.parse.urlencode({"path": str(planted)})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url, timeout=10)
    assert e.value.code == 401 and b"internal.token_file" in e.value.read()
    with urllib.request.urlopen(urllib.request.Request(url, headers={HEADER: TOKEN}), timeout=10) as answer:
        assert answer.read() == b"shuffle bytes"


def test_an_unreadable_or_short_token_file_stops_the_node_before_it_binds(tmp_path):
    short = tmp_path / "short"
    short.write_text("tiny\n")
    for path, why in [(tmp_path / "missing", "cannot read it"), (short, "the token must be at least 16 characters")]:
        config = tmp_path / "node.toml"
        client, worker = free_port(), free_port()
        config.write_text(
            f'[scheduler]\nenabled = true\nclient_service.bind_addr = "127.0.0.1:{client}"\n'
            f'worker_service.bind_addr = "127.0.0.1:{worker}"\ndatabase_path = "{tmp_path}/q.db"\n[internal]\ntoken_file = "{path}"\n'
        )
        for command in (["check-config"], ["service", "--config-path"]):
            out = subprocess.run([BIN, *command, str(config)], capture_output=True, text=True, timeout=60)
            assert out.returncode != 0, out.stderr
            assert f'internal.token_file = "{path}": {why}' in out.stderr, out.stderr
        # Offline checks (a Nix build) have no secrets: the file is not read there.
        offline = subprocess.run([BIN, "check-config", "--no-resolve", str(config)], capture_output=True, text=True)
        assert offline.returncode == 0, offline.stderr


def test_without_a_token_the_node_says_its_internal_ports_are_open(cluster):
    log = (cluster.root / "scheduler.log").read_text()
    assert log.count("serve anyone who can reach them: set internal.token_file (the same file on every node) or internal.tls") == 1, log[-2000:]


def test_monitoring_exports_carry_the_token_to_an_observatory_that_requires_it(tmp_path):
    """An observatory with the cluster token refuses OTLP exports without it; the scheduler's
    and workers' exports (with it) arrive: the query and host metrics show in the REST API."""
    import json

    from conftest import Cluster

    token = tmp_path / "cluster-token"
    token.write_text(TOKEN + "\n")
    c = Cluster(tmp_path, token)
    otlp, rest = free_port("127.0.0.1"), free_port("127.0.0.1")
    try:
        c.start_observatory(rest, otlp=otlp)
        c.start_scheduler(tables=f'[monitoring]\nenabled = true\n[static_leader]\nobservatory_service.public_addr = "127.0.0.1:{otlp}"')
        c.start_worker("ow-1", "127.0.0.58", tables="[monitoring]\nenabled = true", leader=f'observatory_service.public_addr = "127.0.0.1:{otlp}"')
        c.wait_for_workers(["ow-1"])
        with grpc.insecure_channel(f"127.0.0.1:{otlp}") as channel:
            export = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export")
            with pytest.raises(grpc.RpcError) as e:
                export(b"", timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        running = pl.LazyFrame({"a": [1, 2]}).select(pl.col("a").sum()).remote(pc.ClusterContext(uri=c.uri)).execute(blocking=False)
        running.await_result()
        deadline = time.time() + 30
        while True:
            listed = json.load(urllib.request.urlopen(f"http://127.0.0.1:{rest}/api/v1/queries", timeout=10))["queries"]
            nodes = {n["node"] for n in json.load(urllib.request.urlopen(f"http://127.0.0.1:{rest}/api/v1/nodes", timeout=10))["nodes"]}
            if str(running._query_id) in {q["query_id"] for q in listed} and {"scheduler", "ow-1"} <= nodes:
                break
            assert time.time() < deadline, (listed, nodes, c.logs())
            time.sleep(0.3)
    finally:
        c.stop()
