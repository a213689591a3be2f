"""Mutual TLS between the nodes under a cluster CA (`internal.tls`): every internal port (worker
service, task service, shuffle service, OTLP receiver) takes only connections with a
certificate the CA signed; the nodes use theirs on every call (a distributed query with
shuffles between workers and the monitoring exports); a worker of another CA cannot register;
broken files stop a node before it binds, naming the key."""

import json
import socket
import ssl
import subprocess
import time
import urllib.parse

import grpc
import polars as pl
import polars_cloud as pc
import pytest
from polars.testing import assert_frame_equal

import pdsh
from cluster_ca import ClusterCA
from conftest import BIN, Cluster, free_port, running_cluster

WORKERS = {"tw-1": "127.0.0.61", "tw-2": "127.0.0.62"}


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return ClusterCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory, ca):
    """Two workers and a scheduler that is also the observatory, all monitored, over TLS."""
    root = tmp_path_factory.mktemp("tls")
    otlp, rest = free_port("127.0.0.1"), free_port("127.0.0.1")
    ips = {"scheduler": "127.0.0.1", **WORKERS}
    internal = lambda name: ca.internal(name, [ips.get(name, "127.0.0.1")])  # noqa: E731
    leader = f'observatory_service.public_addr = "127.0.0.1:{otlp}"'
    observatory = (
        f'[observatory]\nenabled = true\nservice.bind_addr = "127.0.0.1:{otlp}"\n'
        f'rest_api.service.bind_addr = "127.0.0.1:{rest}"\ndatabase_path = "{root}/observatory.db"\n'
        f"[monitoring]\nenabled = true\n[static_leader]\n{leader}\n"
    )
    c = Cluster(root, internal=internal)
    c.start_scheduler(tables=observatory)
    for name, ip in WORKERS.items():
        c.start_worker(name, ip, tables="[monitoring]\nenabled = true", leader=leader)
    try:
        c.wait_for_workers(list(WORKERS))
        c.otlp, c.rest = otlp, rest
        yield c
    finally:
        c.stop()


def service_addr(cluster, node: str, key: str) -> str:
    config = (cluster.root / f"{node}.toml").read_text()
    return next(line.split('"')[1] for line in config.splitlines() if line.startswith(f"{key}.bind_addr"))


def test_a_distributed_query_runs_over_mutual_tls(tls_cluster, tpch):
    q = pdsh.q18(pdsh.tables(tpch))
    result = q.remote(pc.ClusterContext(uri=tls_cluster.uri)).distributed(equi_join_broadcast_limit=0).execute()
    assert_frame_equal(result.lazy().collect(), q.collect(), check_exact=False, rel_tol=1e-9)
    assert max(s.num_workers_used for s in result.stage_statistics()) == 2  # shuffles between the workers
    assert "serve anyone who can reach them" not in (tls_cluster.root / "scheduler.log").read_text()


def test_monitoring_exports_arrive_over_tls(tls_cluster):
    import urllib.request

    pl.LazyFrame({"a": [1, 2]}).select(pl.col("a").sum()).remote(pc.ClusterContext(uri=tls_cluster.uri)).execute()
    deadline = time.time() + 30
    while True:
        answer = urllib.request.urlopen(f"http://127.0.0.1:{tls_cluster.rest}/api/v1/nodes", timeout=10)
        nodes = {n["node"] for n in json.load(answer)["nodes"]}
        if {"scheduler", *WORKERS} <= nodes:
            break
        assert time.time() < deadline, (nodes, tls_cluster.logs())
        time.sleep(0.3)


def grpc_call(addr: str, method: str, credentials=None, metadata=()):
    """Calls `method` with an empty message: plaintext, or TLS with `credentials`."""
    channel = grpc.secure_channel(addr, credentials) if credentials else grpc.insecure_channel(addr)
    with channel:
        return channel.unary_unary(method)(b"", timeout=10, metadata=metadata)


def test_every_grpc_internal_port_takes_only_certificates_of_the_cluster_ca(tls_cluster, ca, tmp_path):
    stranger = ClusterCA(tmp_path / "stranger", "another CA")
    cert, key = ca.node("caller", ["127.0.0.1"])
    foreign_cert, foreign_key = stranger.node("caller", ["127.0.0.1"])
    root = ca.ca_file.read_bytes()
    member = grpc.ssl_channel_credentials(root, key.read_bytes(), cert.read_bytes())
    anonymous = grpc.ssl_channel_credentials(root)
    foreign = grpc.ssl_channel_credentials(root, foreign_key.read_bytes(), foreign_cert.read_bytes())
    ports = {
        "worker service": (f"127.0.0.1:{tls_cluster.worker_port}", "/polars_node.v1.Membership/ListWorkers"),
        "task service": (service_addr(tls_cluster, "tw-1", "task_service"), "/polars_node.v1.Task/CancelTask"),
        "OTLP receiver": (f"127.0.0.1:{tls_cluster.otlp}", "/opentelemetry.proto.collector.trace.v1.TraceService/Export"),
    }
    for what, (addr, method) in ports.items():
        for refused in (None, anonymous, foreign):
            with pytest.raises(grpc.RpcError) as e:
                grpc_call(addr, method, refused)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE, (what, refused, e.value)
        grpc_call(addr, method, member)  # answers
    # The client port keeps serving the client, but takes no registrations under TLS.
    with pytest.raises(grpc.RpcError) as e:
        grpc_call(f"127.0.0.1:{tls_cluster.client_port}", "/polars_node.v1.Membership/ListWorkers")
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "worker service" in e.value.details()


def test_a_shuffle_file_is_served_only_over_tls_with_a_cluster_certificate(tls_cluster, ca, tmp_path):
    worker = "tw-2"
    planted = tls_cluster.root / worker / "shuffle" / "q" / worker / "0-0" / "0.arrow"
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.write_bytes(b"shuffle bytes" * 1000)
    host, port = service_addr(tls_cluster, worker, "shuffle_service").split(":")
    request = (
        f"GET /v1/shuffle?{urllib.parse.urlencode({'path': str(planted)})} HTTP/1.1\r\nHost: {host}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()

    def get(context: ssl.SSLContext | None) -> bytes:
        with socket.create_connection((host, int(port)), timeout=10) as raw:
            conn = context.wrap_socket(raw, server_hostname=host) if context else raw
            conn.sendall(request)
            out = b""
            while chunk := conn.recv(1 << 16):
                out += chunk
            return out

    # Plaintext: the service takes the request as a TLS handshake that fails, and closes.
    assert b"shuffle bytes" not in get(None)
    anonymous = ssl.create_default_context(cafile=str(ca.ca_file))
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        get(anonymous)
    member = ssl.create_default_context(cafile=str(ca.ca_file))
    member.load_cert_chain(*ca.node("fetcher", ["127.0.0.1"]))
    answer = get(member)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"shuffle bytes" * 1000), answer[:200]


def test_a_worker_of_another_ca_cannot_register(tls_cluster, tmp_path):
    stranger = ClusterCA(tmp_path / "rogue-ca", "rogue CA")
    saved = tls_cluster.internal
    tls_cluster.internal = lambda name: stranger.internal(name, ["127.0.0.63"])
    try:
        tls_cluster.start_worker("rogue", "127.0.0.63")
    finally:
        tls_cluster.internal = saved
    tls_cluster.wait_for_log("rogue", "accept registration: invalid peer certificate: UnknownIssuer")
    assert tls_cluster.live_workers() == sorted(WORKERS)
    tls_cluster.procs.pop("rogue").kill()
    assert "rogue" not in (tls_cluster.root / "scheduler.log").read_text()


def check(config_path, *flags) -> subprocess.CompletedProcess:
    return subprocess.run([BIN, "check-config", *flags, str(config_path)], capture_output=True, text=True, timeout=60)


def test_broken_tls_files_stop_the_node_before_it_binds_naming_the_key(tmp_path, ca):
    cert, key = ca.node("node", ["127.0.0.1"])
    other_cert, other_key = ca.node("other", ["127.0.0.1"])
    stranger_cert, stranger_key = ClusterCA(tmp_path / "stranger").node("node", ["127.0.0.1"])
    expired_cert, expired_key = ca.node("expired", ["127.0.0.1"], days=-1)
    elsewhere_cert, elsewhere_key = ca.node("elsewhere", ["10.9.9.9"])
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cases = [
        (tmp_path / "missing.pem", cert, key, 'internal.tls.ca_file = "{ca}": cannot read it'),
        (ca.ca_file, garbage, key, 'internal.tls.certificate_key_file = "{cert}": holds no certificate'),
        (ca.ca_file, cert, garbage, 'internal.tls.private_key_file = "{key}": not a PEM private key'),
        (ca.ca_file, cert, other_key, "internal.tls.certificate_key_file and internal.tls.private_key_file do not belong together"),
        (ca.ca_file, stranger_cert, stranger_key, 'internal.tls.certificate_key_file = "{cert}" is not accepted under the cluster CA (internal.tls.ca_file): BadSignature (the CA did not sign it)'),
        (ca.ca_file, expired_cert, expired_key, "is not accepted under the cluster CA (internal.tls.ca_file): certificate expired"),
        (ca.ca_file, elsewhere_cert, elsewhere_key, "internal.tls.certificate_key_file does not name 127.0.0.1, where other nodes reach the scheduler worker service (`scheduler.worker_service.bind_addr`)"),
    ]
    for ca_file, cert_file, key_file, message in cases:
        client, worker = free_port(), free_port()
        config = tmp_path / "node.toml"
        config.write_text(
            f'[scheduler]\nenabled = true\nclient_service.bind_addr = "127.0.0.1:{client}"\n'
            f'worker_service.bind_addr = "127.0.0.1:{worker}"\ndatabase_path = "{tmp_path}/q.db"\n'
            f'[internal]\ntls.ca_file = "{ca_file}"\ntls.certificate_key_file = "{cert_file}"\n'
            f'tls.private_key_file = "{key_file}"\n'
        )
        expected = message.format(ca=ca_file, cert=cert_file, key=key_file)
        out = check(config)
        assert out.returncode != 0 and expected in out.stderr, (expected, out.stderr)
        started = subprocess.run([BIN, "service", "--config-path", str(config)], capture_output=True, text=True, timeout=60)
        assert started.returncode != 0 and expected in started.stderr, (expected, started.stderr)
        for port in (client, worker):  # nothing was left bound
            with socket.socket() as s:
                s.bind(("127.0.0.1", port))
        assert check(config, "--no-resolve").returncode == 0  # offline checks read no secrets
