"""The observatory's OTLP receiver and REST API, fed by the OpenTelemetry SDK's own exporter
(not the project's), and its behaviour on bad input."""

import json
import os
import socket
import time
import urllib.error
import urllib.request
import uuid

import grpc
import polars as pl
import polars_cloud as pc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import Status, StatusCode

from conftest import Cluster, free_port


@pytest.fixture(scope="module")
def observatory(tmp_path_factory):
    root = tmp_path_factory.mktemp("observatory")
    c = Cluster(root)
    otlp, rest = free_port("127.0.0.1"), free_port("127.0.0.1")
    c.start(
        "observatory",
        f"""instance_id = "observatory"
cluster_id = "obs-test"
[observatory]
enabled = true
service.bind_addr = "127.0.0.1:{otlp}"
rest_api.service.bind_addr = "127.0.0.1:{rest}"
database_path = "{root / 'data.db'}"
max_metrics_bytes_total = 200000
[static_leader]
scheduler_service.public_addr = "127.0.0.1:1"
""",
    )
    c.wait_ready(f"http://127.0.0.1:{rest}")
    try:
        yield c, f"127.0.0.1:{otlp}", f"http://127.0.0.1:{rest}", root
    finally:
        c.stop()


def get(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def test_spans_from_an_sdk_are_served_by_the_rest_api(observatory):
    _, otlp, rest, root = observatory
    provider = TracerProvider(resource=Resource.create({"service.name": "polars-node", "service.instance.id": "worker-7"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=otlp, insecure=True)))
    tracer = provider.get_tracer("test")
    query_id = str(uuid.uuid4())
    with tracer.start_as_current_span("query", attributes={"polars.query_id": query_id}):
        with tracer.start_as_current_span("task", attributes={"polars.query_id": query_id, "polars.stage": 0, "rows": 42}):
            pass
        with tracer.start_as_current_span("task", attributes={"polars.query_id": query_id, "polars.stage": 1}) as s:
            s.set_status(Status(StatusCode.ERROR, "boom"))
    provider.shutdown()

    listed = get(f"{rest}/api/v1/queries")["queries"]
    mine = [q for q in listed if q["query_id"] == query_id]
    assert mine and mine[0]["spans"] == 3 and mine[0]["status"] == "failed", listed
    detail = get(f"{rest}/api/v1/query/{query_id}")
    assert detail["workers"] == ["worker-7"]
    assert sorted(s["stage"] for s in detail["stages"]) == [0, 1]
    task = next(s for s in detail["spans"] if s["attributes"].get("rows") == 42)
    assert task["name"] == "task" and task["service"] == "polars-node"
    assert (root / "data.obs-test.db").exists(), "the cluster id is in the database file name"


def test_metrics_from_an_sdk_are_served_per_node(observatory):
    _, otlp, rest, _ = observatory
    reader = PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=otlp, insecure=True), export_interval_millis=100_000)
    provider = MeterProvider(resource=Resource.create({"service.instance.id": "worker-8"}), metric_readers=[reader])
    gauge = provider.get_meter("test").create_gauge("host.cpu.utilization")
    gauge.set(0.25)
    reader.force_flush()
    gauge.set(0.75)
    reader.force_flush()
    provider.shutdown()
    points = get(f"{rest}/api/v1/metrics?node=worker-8&name=host.cpu.utilization")["points"]
    values = [p["value"] for p in points]
    # Two flushes, and shutdown exports the last value once more.
    assert values[:2] == [0.25, 0.75] and set(values[2:]) <= {0.75}, values
    assert any(n["node"] == "worker-8" for n in get(f"{rest}/api/v1/nodes")["nodes"])
    prom = urllib.request.urlopen(f"{rest}/metrics", timeout=5).read().decode()
    assert "polars_observatory_metric_points" in prom


def test_malformed_and_oversized_payloads_are_refused_without_harm(observatory):
    cluster, otlp, rest, _ = observatory
    channel = grpc.insecure_channel(otlp, options=[("grpc.max_send_message_length", 64 << 20)])
    export = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export")
    with pytest.raises(grpc.RpcError) as bad:
        export(b"\xff\xff\xff\xff not protobuf", timeout=5)
    assert bad.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT)
    with pytest.raises(grpc.RpcError) as big:
        export(b"\x0a" + b"\x80" * 3 + b"\x01" + b"x" * (20 << 20), timeout=10)
    # tonic answers OUT_OF_RANGE, naming the limit.
    assert big.value.code() in (grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED), big.value
    assert "limit is: 16777216 bytes" in big.value.details()
    # Raw garbage on the port does not take it down either.
    with socket.create_connection(otlp.split(":")) as s:
        s.sendall(b"GET / HTTP/1.1\r\n\r\n" + b"\x00" * 1000)
    assert get(f"{rest}/api/v1/queries") is not None
    assert cluster.procs["observatory"].poll() is None


def test_a_flood_of_metrics_stays_within_the_byte_bound(observatory):
    _, otlp, rest, _ = observatory
    reader = PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=otlp, insecure=True), export_interval_millis=100_000)
    provider = MeterProvider(resource=Resource.create({"service.instance.id": "flood"}), metric_readers=[reader])
    meter = provider.get_meter("flood")
    gauges = [meter.create_gauge(f"flood.metric.{i}") for i in range(200)]
    for round_ in range(15):
        for g in gauges:
            g.set(round_)
        reader.force_flush()
    provider.shutdown()
    prom = urllib.request.urlopen(f"{rest}/metrics", timeout=5).read().decode()
    stored = int(next(line.split()[1] for line in prom.splitlines() if line.startswith("polars_observatory_metric_bytes ")))
    assert 0 < stored <= 200_000
    # The newest round survived.
    latest = get(f"{rest}/api/v1/metrics?node=flood&name=flood.metric.0")["points"]
    assert latest and latest[-1]["value"] == 14


@pytest.fixture(scope="module")
def monitored(tmp_path_factory):
    """A scheduler + observatory node and two workers, every node with [monitoring] on."""
    root = tmp_path_factory.mktemp("monitored")
    c = Cluster(root)
    otlp, rest = free_port("127.0.0.1"), free_port("127.0.0.1")
    c.start_scheduler(
        tables=f"""[observatory]
enabled = true
service.bind_addr = "127.0.0.1:{otlp}"
rest_api.service.bind_addr = "127.0.0.1:{rest}"
database_path = "{root / 'data.db'}"
[monitoring]
enabled = true
host_metrics.disk_usage_metrics = true
"""
    )
    for name, ip in (("worker-1", "127.0.0.2"), ("worker-2", "127.0.0.3")):
        c.start_worker(name, ip, tables="[monitoring]\nenabled = true",
                       leader=f'observatory_service.public_addr = "127.0.0.1:{otlp}"')
    try:
        c.wait_for_workers(["worker-1", "worker-2"])
        yield c, f"http://127.0.0.1:{rest}"
    finally:
        c.stop()


def test_queries_of_the_official_client_show_up_with_stages_workers_and_host_metrics(monitored):

    cluster, rest = monitored
    ctx = pc.ClusterContext(uri=cluster.uri)
    q = pl.LazyFrame({"a": [1, 2, 3]}).select(pl.col("a").sum())
    ids = []
    for _ in range(2):
        running = q.remote(ctx).execute(blocking=False)
        running.await_result()
        ids.append(str(running._query_id))
    deadline = time.time() + 20
    while True:
        listed = {x["query_id"] for x in get(f"{rest}/api/v1/queries")["queries"]}
        nodes = {n["node"] for n in get(f"{rest}/api/v1/nodes")["nodes"]}
        if set(ids) <= listed and {"scheduler", "worker-1", "worker-2"} <= nodes:
            break
        assert time.time() < deadline, (listed, nodes)
        time.sleep(0.3)
    for query_id in ids:
        detail = get(f"{rest}/api/v1/query/{query_id}")
        names = {s["name"] for s in detail["spans"]}
        assert {"query", "task", "task.execute"} <= names, names
        assert detail["status"] == "Success" and detail["query_type"] == "Distributed"
        assert 'sum' in detail["plans"]["ir"] and "DF [" in detail["plans"]["ir"], detail["plans"]
        stage = detail["stages"][0]
        assert stage["stage"] == 0 and set(stage["workers"]) & {"worker-1", "worker-2"}, detail["stages"]
    workers = {w for i in ids for w in get(f"{rest}/api/v1/query/{i}")["stages"][0]["workers"]}
    assert workers <= {"worker-1", "worker-2"}, workers
    for node in ("scheduler", "worker-1", "worker-2"):
        memory = get(f"{rest}/api/v1/metrics?node={node}&name=host.memory.used")["points"]
        assert memory and memory[-1]["value"] > 0, node
    assert get(f"{rest}/api/v1/metrics?node=scheduler&name=host.disk.used")["points"]


def split_query(tmp_path):
    """A query the scheduler splits: four files, a hash-partitioned group-by."""
    for i in range(4):
        pl.DataFrame({"k": [j % 17 for j in range(4000)], "v": range(i * 4000, (i + 1) * 4000)}).write_parquet(tmp_path / f"f{i}.parquet")
    return pl.scan_parquet(tmp_path / "f*.parquet").group_by("k").agg(pl.col("v").n_unique().alias("n")).sort("k")


def wait_for_query(rest, query_id, timeout=20):
    """The query's detail once the scheduler's span of it has arrived."""
    deadline = time.time() + timeout
    while True:
        try:
            detail = get(f"{rest}/api/v1/query/{query_id}")
            if detail["status"] not in ("InProgress", "Queued", "Scheduled"):
                return detail
        except urllib.error.HTTPError:
            pass
        assert time.time() < deadline, f"query {query_id} never reached the observatory"
        time.sleep(0.3)


def test_split_query_stages_and_the_official_clients_query_detail(monitored, tmp_path):
    """A split query shows its stage graph with per-stage rows, bytes shuffled, time and
    workers; the official client reads the detail with its own model."""
    cluster, rest = monitored
    ctx = pc.ClusterContext(uri=cluster.uri, observatory=pc.ClientOptions(uri=rest))
    q = split_query(tmp_path)
    pc.Config.set_user_name("carol")
    try:
        running = q.remote(ctx).execute(blocking=False)
    finally:
        pc.Config.set_user_name(None)
    result = running.await_result()
    assert result.lazy().collect().equals(q.collect())
    query_id = str(running._query_id)
    detail = wait_for_query(rest, query_id)
    assert detail["status"] == "Success" and detail["total_num_stages"] == result.total_stages >= 3, detail
    stages = {s["stage"]: s for s in detail["stages"]}
    assert sorted(stages) == list(range(result.total_stages))
    assert stages[1]["inputs"] == [0] and stages[0]["output"].startswith("hash(k)"), stages
    # Stage 1's inputs are a few KB: the result task computed it (a stage without tasks).
    assert stages[1]["fused"] is True and stages[1]["task_runs"] == 0 and not stages[0]["fused"], stages
    assert detail["finished_stages"] == list(range(result.total_stages)), detail["finished_stages"]
    assert stages[0]["bytes_shuffled"] > 0 and stages[0]["rows"] > 0 and stages[0]["time_ms"] > 0, stages[0]
    assert set(stages[0]["workers"]) == {"worker-1", "worker-2"}, stages[0]
    assert detail["total_bytes_shuffled"] == sum(s["bytes_shuffled"] for s in stages.values())
    assert "shuffle by k" in detail["plans"]["physical"]
    # Each node exports its spans on its own schedule: the workers' may come after the
    # scheduler's.
    expected = {"query", "planning", "stage", "task", "task.execute", "shuffle.write", "shuffle.read"}
    deadline = time.time() + 20
    while not expected <= {s["name"] for s in detail["spans"]} and time.time() < deadline:
        time.sleep(0.3)
        detail = get(f"{rest}/api/v1/query/{query_id}")
    names = {s["name"] for s in detail["spans"]}
    assert expected <= names, names
    reads = [s for s in detail["spans"] if s["name"] == "shuffle.read"]
    assert sum(s["attributes"]["polars.shuffle.bytes_read"] for s in reads) > 0, reads
    listed = next(x for x in get(f"{rest}/api/v1/queries")["queries"] if x["query_id"] == query_id)
    assert listed["query_type"] == "Distributed" and listed["user"] == detail["user"]["name"] == "carol", listed
    # The official client's own model of the observatory's answer.
    official = ctx._get_direct_client().get_query_details(running._query_id)
    assert official.status == "Success" and official.query_type == "Distributed" and official.engine == "Auto"
    assert official.total_num_stages == result.total_stages
    assert sorted(official.finished_stages) == list(range(result.total_stages))
    assert official.total_bytes_shuffled == detail["total_bytes_shuffled"] > 0
    assert official.output_rows == 17 and official.output_files == 1


def chromium(*args, timeout=60):
    import shutil
    import subprocess

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("chromium is not installed (.ci/run installs Debian's package)")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
           "--virtual-time-budget=8000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_the_dashboard_lists_queries_and_draws_the_stage_graph(monitored, tmp_path):
    from pathlib import Path

    cluster, rest = monitored
    running = split_query(tmp_path).remote(pc.ClusterContext(uri=cluster.uri)).execute(blocking=False)
    running.await_result()
    query_id = str(running._query_id)
    wait_for_query(rest, query_id)

    listing = chromium("--dump-dom", f"{rest}/#/").stdout
    assert f'data-query="{query_id}"' in listing, listing[:2000]

    page = chromium("--dump-dom", f"{rest}/#/query/{query_id}").stdout
    assert 'class="stage-graph"' in page and 'data-stage="0"' in page and 'data-stage="2"' in page, page[:2000]
    assert 'id="plan-ir"' in page and 'id="plan-physical"' in page
    assert "bytes shuffled" in page
    assert "worker-1" in page or "worker-2" in page

    nodes = chromium("--dump-dom", f"{rest}/#/nodes").stdout
    assert 'id="nodes"' in nodes and 'class="chart"' in nodes, nodes[:2000]

    # A screenshot of the query page, kept as a test artifact.
    artifacts = Path(os.environ.get("POLARS_NODE_ARTIFACTS", Path(__file__).parents[2] / "target" / "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / "dashboard-query.png"
    chromium(f"--screenshot={shot}", "--window-size=1280,800", f"{rest}/#/query/{query_id}")
    assert shot.exists() and shot.stat().st_size > 10_000


def required_keys_hold(schema, value, components):
    """The response carries every key the OpenAPI document requires (recursively)."""
    if "$ref" in schema:
        return required_keys_hold(components[schema["$ref"].split("/")[-1]], value, components)
    if schema.get("type") == "object":
        assert isinstance(value, dict), value
        for key in schema.get("required", []):
            assert key in value, (key, value)
        for key, sub in schema.get("properties", {}).items():
            if key in value and value[key] is not None:
                required_keys_hold(sub, value[key], components)
    if schema.get("type") == "array":
        for item in value:
            required_keys_hold(schema["items"], item, components)
    return True


def test_the_openapi_document_describes_the_responses(monitored):
    _, rest = monitored
    doc = get(f"{rest}/api/v1/openapi.json")
    components = doc["components"]["schemas"]
    query_id = get(f"{rest}/api/v1/queries")["queries"][0]["query_id"]
    for path, concrete in [("/api/v1/queries", "/api/v1/queries"), ("/api/v1/query/{id}", f"/api/v1/query/{query_id}"),
                           ("/api/v1/nodes", "/api/v1/nodes"), ("/api/v1/metrics", "/api/v1/metrics?name=host.memory.used")]:
        schema = doc["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
        assert required_keys_hold(schema, get(f"{rest}{concrete}"), components)


def test_the_database_survives_restarts_and_is_exported(tmp_path):
    import sqlite3

    c = Cluster(tmp_path)
    otlp, rest = free_port("127.0.0.1"), free_port("127.0.0.1")
    def start():
        c.start_observatory(rest, otlp=otlp, keys=f'database_export = "{tmp_path / "export" / "copy.db"}"')
        c.wait_ready(f"http://127.0.0.1:{rest}")

    start()
    provider = TracerProvider(resource=Resource.create({"service.instance.id": "n1"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"127.0.0.1:{otlp}", insecure=True)))
    query_id = str(uuid.uuid4())
    with provider.get_tracer("t").start_as_current_span("query", attributes={"polars.query_id": query_id}):
        pass
    provider.shutdown()
    c.procs["observatory"].terminate()
    c.procs["observatory"].wait(timeout=30)
    exported = sqlite3.connect(tmp_path / "export" / "copy.db").execute("SELECT query_id FROM spans").fetchall()
    assert (query_id,) in exported
    start()
    try:
        assert get(f"http://127.0.0.1:{rest}/api/v1/query/{query_id}")["query_id"] == query_id
    finally:
        c.stop()


def test_an_unreachable_observatory_costs_a_warning_not_an_error(tmp_path):
    """Monitoring towards an address where no observatory listens: queries run as usual and
    the node only logs that it cannot export."""
    c = Cluster(tmp_path)
    dead = free_port("127.0.0.1")  # nothing listens here
    c.start_scheduler(tables=f'[monitoring]\nenabled = true\n[static_leader]\nobservatory_service.public_addr = "127.0.0.1:{dead}"')
    c.start_worker("worker-u", "127.0.0.2", tables="[monitoring]\nenabled = true", leader=f'observatory_service.public_addr = "127.0.0.1:{dead}"')
    try:
        c.wait_for_workers(["worker-u"])
        ctx = pc.ClusterContext(uri=c.uri)
        q = pl.LazyFrame({"a": list(range(100))}).select(pl.col("a").sum())
        for _ in range(5):
            assert q.remote(ctx).execute().lazy().collect().item() == 4950
        deadline = time.time() + 20
        while True:
            log = (tmp_path / "scheduler.log").read_text()
            if "cannot export" in log and f"observatory at 127.0.0.1:{dead}" in log:
                break
            assert time.time() < deadline, log[-3000:]
            time.sleep(0.5)
        # A warning, once a minute at most; no error.
        assert "ERROR" not in log and log.count("cannot export host metrics") == 1, log[-3000:]
        assert all(p.poll() is None for p in c.procs.values()), "a node stopped"
    finally:
        c.stop()


def test_a_node_with_the_observatory_and_monitoring_stops_cleanly_with_its_last_spans(tmp_path):
    """As Polars' Ray launcher configures the scheduler: scheduler, observatory and monitoring
    in one node. On SIGTERM the node flushes its own monitoring into its receiver before that
    stops: the last query's scheduler spans (still buffered) reach the database, the log has no
    warning, and the stop is quick."""
    import signal
    import sqlite3

    c = Cluster(tmp_path)
    otlp, rest = free_port("127.0.0.1"), free_port("127.0.0.1")
    export = tmp_path / "export" / "copy.db"
    c.start_scheduler(
        tables=f'[observatory]\nenabled = true\nservice.bind_addr = "127.0.0.1:{otlp}"\n'
        f'rest_api.service.bind_addr = "127.0.0.1:{rest}"\ndatabase_path = "{tmp_path}/o.db"\n'
        f'database_export = "{export}"\n[monitoring]\nenabled = true\n'
        f'[static_leader]\nobservatory_service.public_addr = "127.0.0.1:{otlp}"'
    )
    c.start_worker("worker-s", "127.0.0.2")
    try:
        c.wait_for_workers(["worker-s"])
        running = pl.LazyFrame({"a": [1, 2, 3]}).select(pl.col("a").sum()).remote(pc.ClusterContext(uri=c.uri)).execute(blocking=False)
        running.await_result()
        query_id = str(running._query_id)
        scheduler = c.procs["scheduler"]
        started = time.time()
        scheduler.send_signal(signal.SIGTERM)
        assert scheduler.wait(timeout=30) == 0
        took = time.time() - started
        print(f"stopped in {took:.2f} s")
        assert took < 5, took
        log = (tmp_path / "scheduler.log").read_text()
        after = log[log.index("SIGTERM received"):]
        assert " WARN " not in after and " ERROR " not in after, after
        spans = sqlite3.connect(export).execute(
            "SELECT name FROM spans WHERE query_id = ? AND instance = 'scheduler'", (query_id,)
        ).fetchall()
        assert spans, "the scheduler's spans of the last query were lost"
    finally:
        c.stop()
