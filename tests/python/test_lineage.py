"""OpenLineage run events (`[lineage]`), as the Ray launcher renders the section: every query
gets START and then COMPLETE, FAIL or ABORT, over HTTP (to a receiver written here) and as JSON
lines on the scheduler's standard output. Each event is rebuilt with the models of
`openlineage-python` and must serialize back to exactly what was sent (so every field and
facet, with its schema URL, is one the specification knows). A receiver that is down costs a
warning, never a query."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import polars as pl
import polars_cloud as pc
import pytest
from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.generated.error_message_run import ErrorMessageRunFacet
from openlineage.client.generated.job_type_job import JobTypeJobFacet
from openlineage.client.generated.processing_engine_run import ProcessingEngineRunFacet
from openlineage.client.generated.schema_dataset import SchemaDatasetFacet, SchemaDatasetFacetFields
from openlineage.client.serde import Serde
from polars.testing import assert_frame_equal

from conftest import Cluster, free_port


class Receiver:
    """An OpenLineage HTTP endpoint that keeps what it is sent."""

    def __init__(self):
        self.events: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                assert self.headers.get_content_type() == "application/json"
                receiver.events.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(201)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}/api/v1/lineage"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def of(self, query_id: str) -> list[dict]:
        return [e for e in self.events if e["run"]["runId"] == query_id]


def rebuilt(event: dict) -> dict:
    """`event` through openlineage-python's models and back."""
    def dataset(kind, d):
        facets = {}
        if "schema" in d["facets"]:
            s = d["facets"]["schema"]
            fields = [SchemaDatasetFacetFields(name=f["name"], type=f["type"]) for f in s["fields"]]
            facets["schema"] = SchemaDatasetFacet(fields=fields, producer=s["_producer"])
        assert set(d["facets"]) <= {"schema"}, d["facets"]
        return kind(namespace=d["namespace"], name=d["name"], facets=facets)

    run_facets = {}
    for name, f in event["run"]["facets"].items():
        fields = {k: v for k, v in f.items() if not k.startswith("_")}
        model = {"processing_engine": ProcessingEngineRunFacet, "errorMessage": ErrorMessageRunFacet}[name]
        run_facets[name] = model(**fields, producer=f["_producer"])
    job_type = event["job"]["facets"]["jobType"]
    job = Job(
        namespace=event["job"]["namespace"],
        name=event["job"]["name"],
        facets={"jobType": JobTypeJobFacet(**{k: v for k, v in job_type.items() if not k.startswith("_")}, producer=job_type["_producer"])},
    )
    model = RunEvent(
        eventType=RunState(event["eventType"]),
        eventTime=event["eventTime"],
        run=Run(runId=event["run"]["runId"], facets=run_facets),
        job=job,
        inputs=[dataset(InputDataset, d) for d in event["inputs"]],
        outputs=[dataset(OutputDataset, d) for d in event["outputs"]],
        producer=event["producer"],
    )
    return json.loads(Serde.to_json(model))


@pytest.fixture(scope="module")
def lineage_cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("lineage")
    receiver = Receiver()
    c = Cluster(root)
    c.start_scheduler(tables=f'[lineage]\ntransport.http.endpoint = "{receiver.endpoint}"\ntransport.stdio.output_stream = "stdout"\n')
    c.start_worker("lw-1", "127.0.0.91")
    try:
        c.wait_for_workers(["lw-1"])
        c.receiver = receiver
        yield c
    finally:
        c.stop()
        receiver.server.shutdown()


def events_of(cluster, query_id: str, count: int) -> list[dict]:
    deadline = time.time() + 30
    while len(cluster.receiver.of(query_id)) < count:
        assert time.time() < deadline, (cluster.receiver.events, cluster.logs())
        time.sleep(0.1)
    return cluster.receiver.of(query_id)


def test_a_scan_group_by_sink_query_sends_start_and_complete_with_its_datasets(lineage_cluster, tmp_path):
    data = tmp_path / "in"
    data.mkdir()
    for i in range(2):
        pl.DataFrame({"k": [1, 2, 1], "v": [1.5, 2.5, float(i)]}).write_parquet(data / f"{i}.parquet")
    out = tmp_path / "out.parquet"
    q = pl.scan_parquet(data / "*.parquet").group_by("k").agg(pl.col("v").sum()).sort("k")
    q.remote(pc.ClusterContext(uri=lineage_cluster.uri)).sink_parquet(str(out), sink_to_single_file=True).await_result()
    assert_frame_equal(pl.read_parquet(out), q.collect())
    query_id = next(
        e["run"]["runId"] for e in lineage_cluster.receiver.events if e["outputs"] and e["outputs"][0]["name"] == str(out)
    )
    start, complete = events_of(lineage_cluster, query_id, 2)
    assert (start["eventType"], complete["eventType"]) == ("START", "COMPLETE")
    for event in (start, complete):
        assert rebuilt(event) == event
        assert event["job"] == {**event["job"], "namespace": "polars-onprem", "name": f"anonymous.{query_id}"}
        [source] = event["inputs"]
        assert (source["namespace"], source["name"]) == ("file", str(data / "*.parquet"))
        assert [(f["name"], f["type"]) for f in source["facets"]["schema"]["fields"]] == [("k", "i64"), ("v", "f64")]
        [sink] = event["outputs"]
        assert (sink["namespace"], sink["name"]) == ("file", str(out))
        assert [(f["name"], f["type"]) for f in sink["facets"]["schema"]["fields"]] == [("k", "i64"), ("v", "f64")]
    # The same events as JSON lines on the scheduler's standard output.
    deadline = time.time() + 10
    while True:
        lines = [json.loads(line) for line in (lineage_cluster.root / "scheduler.log").read_text().splitlines() if line.startswith("{")]
        if [e for e in lines if e["run"]["runId"] == query_id] == [start, complete]:
            break
        assert time.time() < deadline, lines[-4:]
        time.sleep(0.2)


def test_failed_and_canceled_queries_send_fail_and_abort(lineage_cluster, tmp_path):
    ctx = pc.ClusterContext(uri=lineage_cluster.uri)
    missing = tmp_path / "missing.parquet"
    failing = pl.scan_parquet(missing).select(pl.len()).remote(ctx).execute(blocking=False)
    with pytest.raises(Exception):
        failing.await_result()
    start, fail = events_of(lineage_cluster, str(failing._query_id), 2)
    assert (start["eventType"], fail["eventType"]) == ("START", "FAIL")
    assert "missing.parquet" in fail["run"]["facets"]["errorMessage"]["message"]
    assert rebuilt(fail) == fail
    slow = pl.LazyFrame({"a": range(20_000)}).join(pl.LazyFrame({"b": range(20_000)}), how="cross")
    canceled = slow.select((pl.col("a") * pl.col("b")).sort().last()).remote(ctx).execute(blocking=False)
    canceled.cancel()
    start, abort = events_of(lineage_cluster, str(canceled._query_id), 2)
    assert (start["eventType"], abort["eventType"]) == ("START", "ABORT")
    assert rebuilt(abort) == abort


def test_an_endpoint_that_is_down_costs_a_warning_not_a_query(tmp_path):
    dead = free_port("127.0.0.1")
    c = Cluster(tmp_path)
    c.start_scheduler(tables=f'[lineage]\ntransport.http.endpoint = "http://127.0.0.1:{dead}/api/v1/lineage"\n')
    c.start_worker("lw-2", "127.0.0.92")
    try:
        c.wait_for_workers(["lw-2"])
        q = pl.LazyFrame({"a": [1, 2, 3]}).select(pl.col("a").sum())
        for _ in range(3):
            assert q.remote(pc.ClusterContext(uri=c.uri)).execute().lazy().collect().item() == 6
        log = c.wait_for_log("scheduler", "cannot send a lineage event")
        assert log.count("cannot send a lineage event") == 1  # once a minute at most
    finally:
        c.stop()
