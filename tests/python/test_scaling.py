"""Autoscaling (`[scaling]`) against a scaler written here: it speaks the REST protocol of
Polars' Ray launcher (GET /scale_config, POST /scale_to), records every request, and starts and
stops real worker processes. A cluster that starts with no workers grows for a query that
needs two, releases idle workers (naming them, never below the scaler's minimum), and with a
scaler that fails or does not answer, queries still run on the workers there are."""

import json
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import polars as pl
import polars_cloud as pc
import pytest
from polars.testing import assert_frame_equal

from conftest import BIN, Cluster, free_port

IPS = ["127.0.0.81", "127.0.0.82", "127.0.0.83"]


class Scaler:
    """The launcher's scaler protocol over this test's worker processes."""

    def __init__(self, cluster: Cluster, minimum: int = 0, maximum: int | None = 3):
        self.cluster, self.min, self.max = cluster, minimum, maximum
        self.desired = 0
        self.workers: dict[str, str] = {}  # instance id -> ip
        self.requests: list[dict] = []
        self.mode = "ok"  # "error": 500 to everything; "silent": never answers
        self.next_id = 0
        self.lock = threading.Lock()
        scaler = self

        class Handler(BaseHTTPRequestHandler):
            def answer(self, status: int, payload=None):
                body = json.dumps(payload).encode() if payload is not None else b""
                self.send_response(status)
                if body:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def stall_or_fail(self) -> bool:
                if scaler.mode == "silent":
                    time.sleep(30)
                if scaler.mode != "ok":
                    self.answer(500, {"detail": "the scaler is broken (test)"})
                    return True
                return False

            def do_GET(self):
                if self.stall_or_fail():
                    return
                if self.path != "/scale_config":
                    return self.answer(404, {"detail": "not found"})
                with scaler.lock:
                    self.answer(200, {"available": len(scaler.workers), "desired": scaler.desired, "min": scaler.min, "max": scaler.max})

            def do_POST(self):
                if self.stall_or_fail():
                    return
                if self.path != "/scale_to":
                    return self.answer(404, {"detail": "not found"})
                if self.headers.get_content_type() != "application/json":
                    return self.answer(415, {"detail": "expected an application/json request body"})
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                if not isinstance(request.get("amount"), int) or request["amount"] < 0:
                    return self.answer(400, {"detail": "amount must be an integer >= 0"})
                scaler.requests.append(request)
                scaler.scale_to(request["amount"], set(request.get("workers_to_delete") or []))
                self.answer(204)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def scale_to(self, amount: int, delete: set[str]):
        with self.lock:
            amount = max(self.min, amount if self.max is None else min(self.max, amount))
            while len(self.workers) < amount:  # asynchronous, as Ray actors: 204 before they exist
                name, self.next_id = f"worker-{self.next_id}", self.next_id + 1
                ip = next(ip for ip in IPS if ip not in self.workers.values())
                self.workers[name] = ip
                self.cluster.start_worker(name, ip)
            remove = [n for n in self.workers if n in delete] or list(self.workers)
            for name in remove[: max(0, len(self.workers) - amount)]:
                del self.workers[name]
                self.cluster.procs.pop(name).terminate()  # SIGTERM: the worker deregisters
            self.desired = amount

    def close(self):
        self.server.shutdown()


def scheduler_tables(scaler: Scaler, idle: str = "3s", registration: str = "60s") -> str:
    return f'[scaling]\nenabled = true\nrest.uri = "{scaler.uri}"\nidle_timeout = "{idle}"\nregistration_timeout = "{registration}"\n'


def scaling_cluster(tmp_path, minimum=0, idle="3s", registration="60s", tables=""):
    c = Cluster(tmp_path)
    scaler = Scaler(c, minimum)
    c.start_scheduler(
        extra="default_workers_per_query = 1\nmax_workers_per_query = 3",
        tables=scheduler_tables(scaler, idle, registration) + tables,
    )
    return c, scaler


def wait_until(check, timeout: float, what: str, logs=lambda: ""):
    deadline = time.time() + timeout
    while not check():
        assert time.time() < deadline, f"{what}\n{logs()}"
        time.sleep(0.2)


def grouped(tmp_path) -> pl.LazyFrame:
    """A query over files (so it is split over the workers it asks for)."""
    data = tmp_path / "data"
    if not data.exists():
        data.mkdir()
        for i in range(4):
            pl.DataFrame({"k": [j % 13 for j in range(5000)], "v": list(range(i, 5000 + i))}).write_parquet(data / f"{i}.parquet")
    return pl.scan_parquet(data / "*.parquet").group_by("k").agg(pl.col("v").sum()).sort("k")


def test_a_cluster_with_no_workers_grows_for_a_query_and_releases_idle_workers(tmp_path):
    otlp, rest = free_port("127.0.0.1"), free_port("127.0.0.1")
    observatory = (
        f'[observatory]\nenabled = true\nservice.bind_addr = "127.0.0.1:{otlp}"\n'
        f'rest_api.service.bind_addr = "127.0.0.1:{rest}"\ndatabase_path = "{tmp_path}/o.db"\n'
        f'[monitoring]\nenabled = true\n[static_leader]\nobservatory_service.public_addr = "127.0.0.1:{otlp}"\n'
    )
    c, scaler = scaling_cluster(tmp_path, minimum=1, tables=observatory)
    try:
        c.wait_ready(f"http://127.0.0.1:{rest}")
        assert c.live_workers() == []
        q = grouped(tmp_path)
        result = q.remote(pc.ClusterContext(uri=c.uri)).distributed(min_workers=2).execute()
        assert_frame_equal(result.lazy().collect(), q.collect())
        assert max(s.num_workers_used for s in result.stage_statistics()) == 2
        assert scaler.requests[0] == {"amount": 2, "workers_to_keep": None, "workers_to_delete": None}, scaler.requests
        # Idle for 3 s: released by name, down to the scaler's minimum of one.
        wait_until(lambda: len(scaler.workers) == 1, 30, f"not released: {scaler.requests}", c.logs)
        release = scaler.requests[-1]
        assert release["amount"] == 1 and len(release["workers_to_delete"]) == 1, scaler.requests
        wait_until(lambda: len(c.live_workers()) == 1, 20, "the released worker did not leave", c.logs)
        time.sleep(5)  # and the last one stays: the minimum
        assert len(scaler.workers) == 1 and len(scaler.requests) == 2, scaler.requests
        log = (tmp_path / "scheduler.log").read_text()
        assert "asked the scaler for more workers" in log and "released idle workers to the scaler" in log
        # The decisions are metrics of the scheduler node in the observatory.
        def points(name):
            url = f"http://127.0.0.1:{rest}/api/v1/metrics?node=scheduler&name={name}"
            return [p["value"] for p in json.load(urllib.request.urlopen(url, timeout=10))["points"]]
        wait_until(lambda: 2 in points("polars.scaling.desired_workers") and points("polars.scaling.requests"), 30, "no scaling metrics", c.logs)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{rest}/metrics", timeout=10).read().decode()
        assert 'polars_scaling_live_workers{node="scheduler"}' in metrics and "# TYPE polars_scaling_requests counter" in metrics, metrics
        # A query still runs on the worker that was kept.
        assert_frame_equal(q.remote(pc.ClusterContext(uri=c.uri)).execute().lazy().collect(), q.collect())
    finally:
        scaler.close()
        c.stop()


@pytest.mark.parametrize("mode", ["error", "silent"])
def test_a_scaler_that_fails_or_does_not_answer_costs_a_warning(tmp_path, mode):
    c, scaler = scaling_cluster(tmp_path, idle="1s", registration="5s")
    try:
        c.start_worker("static-1", "127.0.0.84")  # not the scaler's
        c.wait_for_workers(["static-1"])
        scaler.mode = mode
        ctx = pc.ClusterContext(uri=c.uri)
        q = grouped(tmp_path)
        assert_frame_equal(q.remote(ctx).execute().lazy().collect(), q.collect())
        with pytest.raises(pl.exceptions.ComputeError, match="needs at least 2 live worker"):
            q.remote(ctx).distributed(min_workers=2).execute()
        # A silent scaler is given up on after 10 s; a warning either way.
        c.wait_for_log("scheduler", "queries run on the workers there are", timeout=30)
        assert c.live_workers() == ["static-1"]
        assert_frame_equal(q.remote(ctx).execute().lazy().collect(), q.collect())
    finally:
        scaler.mode = "ok"
        scaler.close()
        c.stop()


def test_scaling_needs_default_workers_per_query(tmp_path):
    config = tmp_path / "node.toml"
    config.write_text(
        f'[scheduler]\nenabled = true\nclient_service.bind_addr = "127.0.0.1:{free_port()}"\n'
        f'worker_service.bind_addr = "127.0.0.1:{free_port()}"\n[scaling]\nenabled = true\nrest.uri = "ftp://x"\n'
    )
    out = subprocess.run([BIN, "check-config", str(config)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "`scaling.enabled` needs `scheduler.default_workers_per_query`" in out.stderr, out.stderr
    assert '`scaling.rest.uri` = "ftp://x" is not an http:// or https:// URL' in out.stderr, out.stderr
