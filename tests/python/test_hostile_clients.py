"""Hostile clients through real sockets, against a cluster whose internal ports need the cluster
token: 10,000 malformed or truncated SubmitQuery messages, Flight tickets and query ids of
other users, oversized headers, and 500 connections that never finish a request while a real
distributed query runs. After each burst the cluster still answers a real query with local
Polars' rows, the scheduler's memory is back near where it was, and no file outside the roots
of results, shuffles and the query table was written."""

import os
import random
import socket
import time

import grpc
import polars as pl
import polars_cloud as pc
import pytest
from polars.testing import assert_frame_equal

from conftest import running_cluster
from test_policy import _field, _varint

CLIENT = "/polars_cloud.compute_plane.client.v1.ClientService/"
FLIGHT = "/arrow.flight.protocol.FlightService/"
WORKERS = {"hw-1": "127.0.0.71", "hw-2": "127.0.0.72"}


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    token = root / "cluster-token"
    token.write_text("5ecret" * 6 + "\n")
    with running_cluster(root, WORKERS, token_file=token) as c:
        yield c


def real_query(cluster) -> None:
    """A distributed query with a shuffle between the workers, checked against local Polars."""
    q = (
        pl.LazyFrame({"k": [i % 97 for i in range(20_000)], "v": list(range(20_000))})
        .group_by("k")
        .agg(pl.col("v").sum(), pl.len())
        .sort("k")
    )
    result = q.remote(pc.ClusterContext(uri=cluster.uri)).distributed(partitions_per_worker=2).execute()
    assert_frame_equal(result.lazy().collect(), q.collect())


def rss_kib(cluster, name: str) -> int:
    status = open(f"/proc/{cluster.procs[name].pid}/status").read()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))


def files(root) -> dict[str, float]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            try:
                out[path] = os.lstat(path).st_mtime
            except FileNotFoundError:
                pass
    return out


def written_outside_roots(cluster, before: dict[str, float]) -> list[str]:
    """Files created or changed since `before` that are not logs, results, shuffle files or the
    query table."""
    allowed = [str(cluster.results), str(cluster.root / "scheduler"), *(str(cluster.root / w) for w in WORKERS)]
    changed = [p for p, t in files(cluster.root).items() if before.get(p) != t]
    return [p for p in changed if not p.endswith(".log") and not any(p.startswith(a + "/") for a in allowed)]


def settings(engine: int = 1, execute_until: int = 0, extra: bytes = b"", distributed: bytes = b"") -> bytes:
    """QuerySettings: `distributed` holds DistributedOpts fields (defaults when empty)."""
    return _field(1, engine) + _field(4, distributed) + (_field(12, execute_until) if execute_until else b"") + extra


def malformed_submissions(n: int, plan: bytes) -> list[tuple[str, bytes]]:
    """(kind, SubmitQueryRequest bytes): every way a message can be wrong."""
    rng = random.Random(17)
    out = []
    for i in range(n):
        kind = ("random", "garbage-plan", "damaged-plan", "huge-length", "unknown-enums", "deep-nesting")[i % 6]
        if kind == "random":
            message = rng.randbytes(rng.randrange(0, 300))
        elif kind == "garbage-plan":
            message = _field(1, settings()) + _field(2, rng.randbytes(rng.randrange(0, 2000)))
        elif kind == "damaged-plan":  # the Polars header and version intact, the rest truncated or flipped
            damaged = bytearray(plan[: rng.randrange(17, len(plan) + 1)])
            for _ in range(rng.randrange(0, 4)):
                damaged[rng.randrange(16, len(damaged))] ^= 1 << rng.randrange(8)
            message = _field(1, settings()) + _field(2, bytes(damaged))
        elif kind == "huge-length":  # a length prefix of up to 4 GiB over a few bytes
            message = _varint(2 << 3 | 2) + _varint(rng.choice([1 << 31, (1 << 32) - 1, 1 << 62])) + rng.randbytes(8)
        elif kind == "unknown-enums":
            extra = _field(6, rng.choice([0, 1, (1 << 32) - 1]))  # n_retries
            extra += _field(8, rng.choice([0, 1 << 31, (1 << 32) - 1]))  # n_workers.single_number
            partitions = _field(5, rng.choice([0, 4097, (1 << 32) - 1]))  # partitions_per_worker
            engine, until = rng.randrange(5, 1 << 31), rng.randrange(4, 1000)
            message = _field(1, settings(engine, until, extra, partitions)) + _field(2, plan)
        else:  # settings nested in settings in ...: a message 100 levels deep
            nested = b""
            for _ in range(100):
                nested = _field(1, nested + _field(1, 2))
            message = nested + _field(2, plan)
        out.append((kind, message))
    return out


def send_all(channel, method: str, messages, metadata=(), in_flight: int = 32):
    """Sends every message, `in_flight` at a time; (kind, outcome) pairs, the outcome being the
    response bytes or the grpc.RpcError."""
    call = channel.unary_unary(CLIENT + method)
    outcomes, pending = [], []
    for kind, message in messages:
        pending.append((kind, call.future(message, timeout=60, metadata=metadata)))
        if len(pending) >= in_flight:
            kind, future = pending.pop(0)
            outcomes.append((kind, future.exception() or future.result()))
    for kind, future in pending:
        outcomes.append((kind, future.exception() or future.result()))
    return outcomes


def top_fields(message: bytes) -> dict[int, list]:
    """The top-level fields of a protobuf message: number -> values (ints or bytes)."""
    def varint(i):
        n = shift = 0
        while True:
            b = message[i]
            n |= (b & 0x7F) << shift
            i, shift = i + 1, shift + 7
            if not b & 0x80:
                return n, i

    fields, i = {}, 0
    while i < len(message):
        tag, i = varint(i)
        if tag & 7 == 0:
            value, i = varint(i)
        elif tag & 7 == 2:
            length, i = varint(i)
            value, i = message[i : i + length], i + length
        else:
            raise ValueError(f"wire type {tag & 7}")
        fields.setdefault(tag >> 3, []).append(value)
    return fields


def query_id_of(response: bytes) -> str:
    # SubmitQueryResponse { QueryId query_id = 1 { string query_id = 1 } }
    return response[4:].decode()


def test_10000_malformed_submissions_leave_the_cluster_serving(target):
    real_query(target)
    real_query(target)
    baseline = rss_kib(target, "scheduler")
    before = files(target.root)
    plan = pl.LazyFrame({"a": [1, 2, 3]}).select(pl.col("a") * 2).sink_parquet("<in-memory>", lazy=True).serialize()
    messages = malformed_submissions(10_000, plan)
    started = time.time()
    with grpc.insecure_channel(target.uri.removeprefix("http://")) as channel:
        metadata = [("x-polars-version", "2.0.0"), ("x-client-version", "0.12.0")]
        outcomes = send_all(channel, "SubmitQuery", messages, metadata)
        accepted = [(k, query_id_of(o)) for k, o in outcomes if isinstance(o, bytes)]
        refused = [(k, o) for k, o in outcomes if isinstance(o, grpc.RpcError)]
        assert len(accepted) + len(refused) == 10_000
        for kind, error in refused:  # undecodable messages: refused, saying why
            assert error.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL), (kind, error)
            assert len(error.details() or "") > 10, (kind, error)
        assert {k for k, _ in refused} >= {"random", "huge-length"}
        # A message that decodes got a query id; its outcome is a query failure that says why,
        # or (unknown enum values default) a result. Sampled: every kind, 50 each.
        result = channel.unary_unary(CLIENT + "GetQueryResult")
        for kind in {k for k, _ in accepted}:
            for _, query_id in [a for a in accepted if a[0] == kind][:50]:
                answer = result(_field(1, _field(1, query_id)), timeout=120, metadata=metadata)
                status = top_fields(answer)[3][0]  # query_status: SUCCESS 3, FAILED 4
                assert status == 3 or (status == 4 and b'"scheduler"' in answer), (kind, answer[:300])
    elapsed = time.time() - started
    real_query(target)
    grown = rss_kib(target, "scheduler") - baseline
    print(f"10,000 malformed submissions in {elapsed:.1f} s; scheduler RSS {baseline} KiB -> +{grown} KiB")
    assert grown < 64 * 1024, f"the scheduler grew by {grown} KiB"
    assert written_outside_roots(target, before) == []
    assert all(p.poll() is None for p in target.procs.values())


def test_tickets_and_ids_of_other_users_or_no_query_are_not_found(target):
    pc.Config.set_user_name("alice")
    try:
        ctx = pc.ClusterContext(uri=target.uri)
        q = pl.LazyFrame({"a": list(range(1000))}).select(pl.col("a").sum())
        assert_frame_equal(q.remote(ctx).collect(), q.collect())  # Flight, as alice
        running = q.remote(ctx).execute(blocking=False)
        running.await_result()
        query_id = str(running._query_id)
    finally:
        pc.Config.set_user_name(None)
    addr = target.uri.removeprefix("http://")
    with grpc.insecure_channel(addr) as channel:
        by_id = _field(1, _field(1, query_id))
        for user in ("mallory", "alice "):  # a caller naming another user
            metadata = [("x-polars-user", user)]
            for method in ("GetQueryResult", "CancelQuery", "DeleteQueryResult", "GetQueryPlans"):
                with pytest.raises(grpc.RpcError) as e:
                    channel.unary_unary(CLIENT + method)(by_id, timeout=30, metadata=metadata)
                assert e.value.code() == grpc.StatusCode.NOT_FOUND, (user, method, e.value)
                assert e.value.details() == f"no query {query_id} on this cluster for this caller"
            with pytest.raises(grpc.RpcError) as e:
                list(channel.unary_stream(FLIGHT + "DoGet")(_field(1, query_id), timeout=30, metadata=metadata))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND, (user, e.value)
        # The owner still reads it, and so does a call naming no user (the official client's
        # status stream and Flight calls name none): the id is the proof there.
        channel.unary_unary(CLIENT + "GetQueryResult")(by_id, timeout=30, metadata=[("x-polars-user", "alice")])
        channel.unary_unary(CLIENT + "GetQueryResult")(by_id, timeout=30)
        # Tickets that name no query: random bytes, a random id, a huge one.
        rng = random.Random(5)
        tickets = [rng.randbytes(rng.randrange(0, 64)) for _ in range(300)]
        tickets += ["%08x-0000-4000-8000-%012x" % (rng.getrandbits(32), rng.getrandbits(48)) for _ in range(300)]
        tickets += [b"x" * (1 << 20)]
        for ticket in tickets:
            raw = ticket.encode() if isinstance(ticket, str) else ticket
            with pytest.raises(grpc.RpcError) as e:
                list(channel.unary_stream(FLIGHT + "DoGet")(_field(1, raw), timeout=30))
            assert e.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT), e.value
            assert len(e.value.details()) < 200  # a huge ticket is not echoed back
        # Unknown ids are answered as another user's query is: nothing tells which ids exist.
        unknown = "%08x-0000-4000-8000-%012x" % (rng.getrandbits(32), rng.getrandbits(48))
        with pytest.raises(grpc.RpcError) as e:
            channel.unary_unary(CLIENT + "GetQueryResult")(_field(1, _field(1, unknown)), timeout=30)
        assert e.value.details() == f"no query {unknown} on this cluster for this caller"
    real_query(target)


def test_oversized_headers_are_refused_and_the_ports_serve_on(target):
    addr = target.uri.removeprefix("http://")
    with grpc.insecure_channel(addr) as channel:
        for size in (64 << 10, 1 << 20, 8 << 20):
            with pytest.raises(grpc.RpcError) as e:
                channel.unary_unary(CLIENT + "GetComputeVersions")(b"", timeout=30, metadata=[("x-big", "a" * size)])
            assert e.value.code() != grpc.StatusCode.OK
    shuffle = shuffle_addr(target, "hw-1")
    for size in (64 << 10, 1 << 20, 8 << 20):
        host, port = shuffle.split(":")
        with socket.create_connection((host, int(port)), timeout=30) as s:
            try:
                s.sendall(b"GET /v1/shuffle?path=/x HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * size + b"\r\n\r\n")
                answer = s.recv(4096)
            except (ConnectionResetError, BrokenPipeError):
                answer = b""  # closed on us: also a refusal
            assert not answer.startswith(b"HTTP/1.1 200"), answer[:100]
    real_query(target)


def shuffle_addr(cluster, worker: str) -> str:
    config = (cluster.root / f"{worker}.toml").read_text()
    return next(line.split('"')[1] for line in config.splitlines() if line.startswith("shuffle_service.bind_addr"))


def test_500_idle_or_stalled_connections_do_not_starve_a_query(target):
    """Connections that send nothing, half an HTTP/2 preface or half an HTTP/1 request, to the
    client port and a worker's shuffle port: a distributed query (with a shuffle) still
    completes while all are open, and both ports let go of the ones that stay silent or stop
    within their opening."""
    host, port = target.uri.removeprefix("http://").split(":")
    shuffle_host, shuffle_port = shuffle_addr(target, "hw-2").split(":")
    held, silent = [], []
    starts = [b"", b"PRI * HTTP/2.0\r\n", b"GET /v1/shuffle?path=/etc/passwd HTTP/1.1\r\nHost: x\r\n"]
    for i in range(500):
        to = (host, int(port)) if i % 2 == 0 else (shuffle_host, int(shuffle_port))
        s = socket.create_connection(to, timeout=10)
        if starts[i % 3]:
            s.sendall(starts[i % 3])
        held.append(s)
        if i % 3 < 2:
            silent.append(s)
    try:
        started = time.time()
        real_query(target)
        assert time.time() - started < 60
        time.sleep(12)  # past the 10 s (client port) and 5 s (shuffle port) openings
        closed = 0
        for s in silent:
            s.setblocking(False)
            try:
                closed += s.recv(1) == b""
            except BlockingIOError:
                pass
            except ConnectionResetError:
                closed += 1
        assert closed == len(silent), f"only {closed} of {len(silent)} silent connections were closed"
    finally:
        for s in held:
            s.close()
    real_query(target)


def test_readers_that_stop_reading_hold_only_their_own_streams(target):
    """A Flight reader that takes one message of a large result and then reads no more, and
    peers that ask a worker for a large shuffle file and never read it: flow control holds
    their streams where they are, and a distributed query (with a shuffle through that worker)
    still completes alongside them."""
    addr = target.uri.removeprefix("http://")
    plan = pl.LazyFrame().select(pl.int_range(0, 5_000_000).alias("a")).sink_ipc("<flight>", lazy=True).serialize()
    flight = _field(10, b"")  # sink_options.flight: the result is read over Flight
    submit = _field(1, _field(1, 1) + _field(2, b"") + flight) + _field(2, plan)
    channel = grpc.insecure_channel(addr)
    answer = channel.unary_unary(CLIENT + "SubmitQuery")(submit, timeout=60)
    query_id = query_id_of(answer)
    result = channel.unary_unary(CLIENT + "GetQueryResult")(_field(1, _field(1, query_id)), timeout=120)
    assert top_fields(result)[3][0] == 3, result[:300]
    stream = channel.unary_stream(FLIGHT + "DoGet")(_field(1, query_id), timeout=300)
    next(stream)  # the first message, then nothing more is read

    token = (target.root / "cluster-token").read_text().strip()
    big = target.root / "hw-2" / "shuffle" / "q-stalled" / "hw-2" / "0-0" / "0.arrow"
    big.parent.mkdir(parents=True, exist_ok=True)
    big.write_bytes(os.urandom(64 << 20))
    host, port = shuffle_addr(target, "hw-2").split(":")
    stalled = []
    for _ in range(20):
        s = socket.create_connection((host, int(port)), timeout=10)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(
            f"GET /v1/shuffle?path={big} HTTP/1.1\r\nHost: {host}\r\nx-polars-node-token: {token}\r\n"
            "Connection: upgrade\r\nUpgrade: polars-node-shuffle\r\n\r\n".encode()
        )
        stalled.append(s)
    try:
        started = time.time()
        real_query(target)
        assert time.time() - started < 60
    finally:
        stream.cancel()
        channel.close()
        for s in stalled:
            s.close()
    real_query(target)
