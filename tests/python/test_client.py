"""The official client (polars-cloud 0.12.0, polars 2.0.0) against a real cluster. Every
result is compared with the same query collected by local Polars."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

import polars_cloud as pc
from conftest import busy_task_processes
from polars_cloud.query.query_status import QueryStatus


def sales() -> pl.LazyFrame:
    return pl.LazyFrame(
        {
            "region": ["north", "south", "north", "east", "south", "north", "west"] * 30,
            "units": list(range(210)),
            "price": [1.5, 2.0, 3.25, 4.0, 0.5, 1.0, 2.5] * 30,
        }
    )


def revenue() -> pl.LazyFrame:
    return (
        sales()
        .with_columns(revenue=pl.col("units") * pl.col("price"))
        .group_by("region")
        .agg(pl.col("revenue").sum(), pl.len(), pl.col("units").max().alias("max_units"))
        .sort("region")
    )


def test_show_versions(ctx, capsys):
    ctx.show_versions()
    out = capsys.readouterr().out
    assert "Polars Python Version: 2.0.0" in out
    assert "Compute Plane Version: polars-node" in out


def test_execute_head_and_lazy(ctx):
    expected = revenue().collect()
    result = revenue().remote(ctx).execute()
    assert result.status == QueryStatus.SUCCESS
    assert_frame_equal(result.head, expected.head(10))
    assert_frame_equal(result.lazy().collect(), expected)
    assert result.n_rows_total == expected.height
    # len() is UInt64 on the client's 64-bit-index build: the engine must match it.
    assert result.lazy().collect().schema["len"] == pl.UInt64


def test_single_node(ctx):
    q = sales().filter(pl.col("units") > 100).select("region", "units").sort("units")
    result = q.remote(ctx).single_node().execute()
    assert_frame_equal(result.lazy().collect(), q.collect())


def test_parquet_file_set(ctx, tmp_path):
    for i in range(3):
        pl.DataFrame({"k": [i % 2, 1, 0] * 100, "v": [float(i)] * 300}).write_parquet(tmp_path / f"part-{i}.parquet")
    q = pl.scan_parquet(tmp_path / "*.parquet").group_by("k").agg(pl.col("v").mean(), pl.len()).sort("k")
    result = q.remote(ctx).execute()
    assert_frame_equal(result.lazy().collect(), q.collect())


def test_sink_parquet_and_await_result(ctx, tmp_path):
    target = tmp_path / "out" / "revenue.parquet"
    target.parent.mkdir()
    query = revenue().remote(ctx).sink_parquet(str(target), sink_to_single_file=True)
    result = query.await_result()
    assert result.status == QueryStatus.SUCCESS
    assert_frame_equal(pl.read_parquet(target), revenue().collect())


def test_plan_ir(ctx):
    result = revenue().remote(ctx).execute()
    ir = result.plan("ir")
    assert "AGGREGATE" in ir.upper() and "region" in ir, ir


def test_get_status_then_await(ctx):
    query = revenue().remote(ctx).execute(blocking=False)
    assert query.get_status() in (QueryStatus.SCHEDULED, QueryStatus.INPROGRESS, QueryStatus.SUCCESS)
    result = query.await_result()
    assert query.get_status() == QueryStatus.SUCCESS
    assert_frame_equal(result.lazy().collect(), revenue().collect())


def busy_execution_processes(cluster) -> set[int]:
    """Execution processes of this cluster's workers that are running a task (idle ones wait
    for their next task)."""
    return {pid for name, proc in cluster.procs.items() if name.startswith("worker") for pid in busy_task_processes(proc.pid)}


def test_cancel_a_long_query(ctx, cluster):
    long = pl.LazyFrame({"a": range(3000)}).join(pl.LazyFrame({"b": range(3000)}), how="cross")
    long = long.with_columns((pl.col("a") * pl.col("b")).alias("c")).sort("c").select(pl.col("c").sum())
    query = long.remote(ctx).execute(blocking=False)
    deadline = time.time() + 20
    running = set()
    while not running and time.time() < deadline:
        running = busy_execution_processes(cluster) if query.get_status() == QueryStatus.INPROGRESS else set()
    assert running, "the query's task never ran in an execution process"
    query.cancel()
    assert query.get_status() == QueryStatus.CANCELED
    # The work stops on the worker: the task's execution process is killed, not kept.
    deadline = time.time() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in running) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{pid}").exists() for pid in running), "the canceled task's process still runs"
    # The spare that replaces it warms up (briefly busy on a loaded machine), then idles.
    while busy_execution_processes(cluster) and time.time() < deadline:
        time.sleep(0.2)
    assert not busy_execution_processes(cluster)


def worker_exec_pids(cluster) -> dict[str, set[int]]:
    """Per worker, the execution processes that ran its tasks (from its log)."""
    import re

    pids = {}
    for name in cluster.procs:
        if name.startswith("worker"):
            log = (cluster.root / f"{name}.log").read_text()
            lines = [line for line in log.splitlines() if "task ran in execution process" in line]
            pids[name] = {int(m.group(1)) for line in lines if (m := re.search(r"pid=(\d+)", line))}
    return pids


def test_execution_processes_serve_many_tasks_and_dead_ones_are_replaced(ctx, cluster):
    before = {name: len(p) for name, p in worker_exec_pids(cluster).items()}
    tasks_before = sum(1 for name in before for _ in re.finditer("task ran in", (cluster.root / f"{name}.log").read_text()))
    for _ in range(6):
        assert_frame_equal(revenue().remote(ctx).execute().lazy().collect(), revenue().collect())
    tasks = sum(1 for name in before for _ in re.finditer("task ran in", (cluster.root / f"{name}.log").read_text())) - tasks_before
    new_pids = sum(len(p) for p in worker_exec_pids(cluster).values()) - sum(before.values())
    assert tasks >= 6 and new_pids < tasks, (tasks, new_pids)
    # Idle processes that die (OOM killer, operator): their next task runs in a new process.
    for name, proc in cluster.procs.items():
        if name.startswith("worker"):
            out = subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "exec-task"], capture_output=True, text=True)
            for pid in out.stdout.split():
                os.kill(int(pid), 9)
    for _ in range(2):
        assert_frame_equal(revenue().remote(ctx).execute().lazy().collect(), revenue().collect())


def test_delete_result(ctx):
    result = revenue().remote(ctx).execute()
    location = [Path(p) for p in result.location]
    assert location and all(p.exists() for p in location)
    result.delete()
    assert not any(p.exists() for p in location)


def test_unknown_column_raises_the_polars_exception(ctx):
    with pytest.raises(pl.exceptions.ColumnNotFoundError, match="no_such_column"):
        sales().select("no_such_column").remote(ctx).execute()


def test_a_client_of_another_polars_version_gets_a_clear_error(cluster):
    python = os.environ.get("POLARS_CLOUD_OLD_PYTHON")
    if not python:
        pytest.skip("POLARS_CLOUD_OLD_PYTHON (a venv with polars-cloud==0.11.3) is not set")
    script = f"""
import polars as pl, polars_cloud as pc
ctx = pc.ClusterContext(uri="{cluster.uri}")
try:
    pl.LazyFrame({{"a": [1]}}).remote(ctx).execute()
except Exception as e:
    print("ERROR", type(e).__name__, e)
else:
    print("NO ERROR")
"""
    out = subprocess.run([python, "-c", script], capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    assert "ERROR" in out.stdout, text
    assert "1.44.2" in text and "2.0.0" in text and "polars-cloud==0.12.0" in text, text
    # The scheduler keeps serving the right client.
    assert cluster.live_workers() == ["worker-1", "worker-2"]


def test_collect_over_flight(ctx):
    expected = revenue().collect()
    df = revenue().remote(ctx).collect()
    if isinstance(df, pl.LazyFrame):
        df = df.collect()
    assert_frame_equal(df, expected)


def test_python_functions_fail_with_a_clear_error_not_a_lost_worker(ctx, cluster, tmp_path):
    """These workers have no Python (worker.python_executable): a Python function in a plan is
    refused before any worker runs it, never a machine lost; the workers keep serving.
    (tests/python/test_python_udfs.py runs them on workers with Python.)"""
    path = tmp_path / "a.parquet"
    pl.DataFrame({"a": [1, 2, 3]}).write_parquet(path)
    queries = {
        "map_elements": lambda lf: lf.select(pl.col("a").map_elements(lambda x: x + 1, return_dtype=pl.Int64)),
        "map_batches": lambda lf: lf.select(pl.col("a").map_batches(lambda s: s * 2, return_dtype=pl.Int64)),
        "LazyFrame.map_batches": lambda lf: lf.map_batches(lambda df: df),
        "name.map": lambda lf: lf.select(pl.col("a").name.map(str.upper)),
    }
    for name, query in queries.items():
        for lf in (pl.LazyFrame({"a": [1, 2, 3]}), pl.scan_parquet(path)):
            for spec in (query(lf).remote(ctx), query(lf).remote(ctx).single_node()):
                with pytest.raises(pl.exceptions.ComputeError, match="no live worker can run them") as raised:
                    spec.execute().lazy().collect()
                assert "lost" not in str(raised.value), name
    assert cluster.live_workers() == ["worker-1", "worker-2"]
    assert_frame_equal(revenue().remote(ctx).execute().lazy().collect(), revenue().collect())


def test_collect_of_a_failing_query_raises(ctx):
    with pytest.raises(pl.exceptions.ColumnNotFoundError):
        df = sales().select("no_such_column").remote(ctx).collect()
        if isinstance(df, pl.LazyFrame):
            df.collect()


def long_query() -> pl.LazyFrame:
    lf = pl.LazyFrame({"a": range(2500)}).join(pl.LazyFrame({"b": range(2500)}), how="cross")
    return lf.with_columns((pl.col("a") * pl.col("b") % 1000).alias("c")).group_by("c").agg(pl.len()).sort("c")


@pytest.fixture
def two_worker_cluster(tmp_path):
    """A cluster of its own: these tests kill workers."""
    from conftest import running_cluster

    with running_cluster(tmp_path, {"worker-a": "127.0.0.5", "worker-b": "127.0.0.6"}) as c:
        yield c


def kill_the_busy_worker(cluster, query) -> str:
    """Waits until the query runs, then kills (SIGKILL) the worker running it."""
    deadline = time.time() + 30
    while time.time() < deadline:
        if query.get_status() == QueryStatus.INPROGRESS:
            for name, proc in cluster.procs.items():
                if name.startswith("worker") and busy_task_processes(proc.pid):
                    proc.kill()
                    proc.wait()
                    return name
        time.sleep(0.02)
    raise AssertionError("the query never ran on a worker")


def test_a_worker_killed_mid_query_is_replaced(two_worker_cluster):
    ctx = pc.ClusterContext(uri=two_worker_cluster.uri)
    query = long_query().remote(ctx, n_retries=1).execute(blocking=False)
    killed = kill_the_busy_worker(two_worker_cluster, query)
    result = query.await_result()
    assert_frame_equal(result.lazy().collect(), long_query().collect())
    assert killed not in two_worker_cluster.live_workers()


def test_with_the_clients_defaults_a_lost_worker_is_replaced(two_worker_cluster):
    """The client's default is n_retries=0: a machine dying is still not the user's problem."""
    ctx = pc.ClusterContext(uri=two_worker_cluster.uri)
    query = long_query().remote(ctx).execute(blocking=False)
    killed = kill_the_busy_worker(two_worker_cluster, query)
    result = query.await_result()
    assert_frame_equal(result.lazy().collect(), long_query().collect())
    assert killed not in two_worker_cluster.live_workers()


def test_a_frozen_worker_loses_its_task_and_is_accepted_back_when_it_wakes(two_worker_cluster):
    """SIGSTOP (a machine that freezes instead of dying) past the heartbeat timeout, with the
    client's defaults: the task reruns on the other worker although the frozen one's
    connection stays open; after SIGCONT the worker registers again and serves queries."""
    import signal

    c = two_worker_cluster
    ctx = pc.ClusterContext(uri=c.uri)
    query = long_query().remote(ctx).execute(blocking=False)
    deadline = time.time() + 30
    frozen = None
    while frozen is None and time.time() < deadline:
        if query.get_status() == QueryStatus.INPROGRESS:
            frozen = next((n for n, p in c.procs.items() if n.startswith("worker") and busy_task_processes(p.pid)), None)
        time.sleep(0.02)
    assert frozen, "the query never ran on a worker"
    pids = [c.procs[frozen].pid] + [int(x) for x in subprocess.run(["pgrep", "-P", str(c.procs[frozen].pid)], capture_output=True, text=True).stdout.split()]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        result = query.await_result()
        assert_frame_equal(result.lazy().collect(), long_query().collect())
        assert frozen not in c.live_workers()
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    c.wait_for_workers(["worker-a", "worker-b"], timeout=30)
    for _ in range(4):  # round robin: both workers serve
        assert_frame_equal(revenue().remote(ctx).execute().lazy().collect(), revenue().collect())
    log = (c.root / "scheduler.log").read_text()
    assert "declared lost (no heartbeats)" in log, log[-3000:]
    # Woken up, the worker learns it was given up and kills the task it was still running (it
    # ran elsewhere): nothing of it goes on writing.
    worker_log = (c.root / f"{frozen}.log").read_text()
    assert "tasks the scheduler gave up on this worker were killed" in worker_log, worker_log[-3000:]
    assert not busy_task_processes(c.procs[frozen].pid)


def test_a_task_that_failed_max_task_attempts_times_fails_its_query_naming_the_workers(tmp_path):
    from conftest import running_cluster

    with running_cluster(tmp_path, {"worker-a": "127.0.0.5", "worker-b": "127.0.0.6"}, "max_task_attempts = 2") as c:
        ctx = pc.ClusterContext(uri=c.uri)
        query = long_query().remote(ctx).execute(blocking=False)
        first = kill_the_busy_worker(c, query)
        second = kill_the_busy_worker(c, query)
        with pytest.raises(pl.exceptions.ComputeError, match="failed 2 time\\(s\\), as many as scheduler.max_task_attempts") as raised:
            query.await_result()
        assert f"on `{first}`" in str(raised.value) and f"on `{second}`" in str(raised.value), raised.value


def test_explain_of_a_query_that_is_not_split_shows_the_plan_that_will_run(ctx, cluster, tmp_path):
    path = tmp_path / "small.parquet"
    sales().collect().write_parquet(path)
    for q in (revenue(), pl.scan_parquet(path).filter(pl.col("units") > 3).select("region")):
        for spec in (q.remote(ctx), q.remote(ctx).single_node()):
            text = spec.explain()
            assert "the whole query on one worker" in text, text
            # The optimized plan, as Polars prints it.
            assert q.explain().splitlines()[0].strip() in text, text


def test_explain_plans_without_executing(ctx, cluster):
    q = revenue().filter(pl.col("region") != "west")
    tasks_before = sum(p.read_text().count("task started") for p in cluster.root.glob("worker-*.log"))
    assert q.remote(ctx).explain(plan_stage="ir") == q.explain()
    tasks_after = sum(p.read_text().count("task started") for p in cluster.root.glob("worker-*.log"))
    assert tasks_after == tasks_before, "explain must not run the query"


@pytest.mark.parametrize("kind", ["csv", "ipc"])  # the sinks polars-cloud 0.12.0 offers besides parquet
def test_user_sinks(ctx, tmp_path, kind):
    target = tmp_path / f"revenue.{kind}"
    sink = getattr(revenue().remote(ctx), f"sink_{kind}")
    sink(str(target), sink_to_single_file=True).await_result()
    expected = revenue().collect()
    got = pl.read_ipc(target) if kind == "ipc" else pl.read_csv(target).cast(expected.schema)
    assert_frame_equal(got, expected)


def test_the_local_cluster_of_the_readme(tmp_path):
    """`polars-node local` (README's first command): scheduler, worker and observatory in one
    process; the official client runs a query on it and the dashboard answers. Its addresses
    are moved to free ports through the PC_CUBLET__ environment overrides."""
    import urllib.request

    from conftest import BIN
    from ports import free_port

    ports = {key: free_port() for key in ("client", "worker", "task", "shuffle", "otlp", "rest")}
    env = dict(os.environ)
    for var, key in [
        ("PC_CUBLET__SCHEDULER__CLIENT_SERVICE__BIND_ADDR", "client"),
        ("PC_CUBLET__SCHEDULER__WORKER_SERVICE__BIND_ADDR", "worker"),
        ("PC_CUBLET__WORKER__TASK_SERVICE__BIND_ADDR", "task"),
        ("PC_CUBLET__WORKER__SHUFFLE_SERVICE__BIND_ADDR", "shuffle"),
        ("PC_CUBLET__OBSERVATORY__SERVICE__BIND_ADDR", "otlp"),
        ("PC_CUBLET__OBSERVATORY__REST_API__SERVICE__BIND_ADDR", "rest"),
    ]:
        env[var] = f'"127.0.0.1:{ports[key]}"'
    log = open(tmp_path / "local.log", "w")
    node = subprocess.Popen([BIN, "local", "--data-dir", str(tmp_path / "data")], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 30
        while "local cluster ready" not in (tmp_path / "local.log").read_text():
            assert node.poll() is None and time.time() < deadline, (tmp_path / "local.log").read_text()
            time.sleep(0.1)
        ctx = pc.ClusterContext(uri=f"http://127.0.0.1:{ports['client']}")
        assert_frame_equal(revenue().remote(ctx).execute().lazy().collect(), revenue().collect())
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['rest']}/", timeout=10) as page:
            assert page.status == 200
        # [monitoring] is on: the query and this node's host metrics reach the dashboard.
        api = f"http://127.0.0.1:{ports['rest']}/api/v1"
        deadline = time.time() + 30
        while time.time() < deadline:
            queries = json.loads(urllib.request.urlopen(f"{api}/queries", timeout=10).read())["queries"]
            nodes = json.loads(urllib.request.urlopen(f"{api}/nodes", timeout=10).read())["nodes"]
            if queries and nodes:
                break
            time.sleep(0.5)
        assert queries and nodes, (queries, nodes)
    finally:
        node.terminate()
        assert node.wait(timeout=20) == 0, (tmp_path / "local.log").read_text()


@pytest.mark.parametrize("journal", [False, True], ids=["file", "journald"])
def test_logs_carry_no_colour_escapes_and_no_timestamps_under_journald(tmp_path, journal):
    """Logs going to a file, a pipe or `docker logs` have no ANSI escapes; under systemd
    (JOURNAL_STREAM names stderr) they have no timestamps either: the journal adds its own."""
    from conftest import BIN
    from ports import free_port

    config = tmp_path / "node.toml"
    config.write_text(
        f'[scheduler]\nenabled = true\nclient_service.bind_addr = "127.0.0.1:{free_port()}"\n'
        f'worker_service.bind_addr = "127.0.0.1:{free_port()}"\nanonymous_result_location.local.path = "{tmp_path}/r"\n'
        f'database_path = "{tmp_path}/queries.db"\n'
    )
    log_path = tmp_path / "node.log"
    with open(log_path, "w") as log:
        env = dict(os.environ, PLC_LOG_LEVEL="info")
        env.pop("JOURNAL_STREAM", None)
        if journal:
            st = os.fstat(log.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        proc = subprocess.Popen([BIN, "service", "--config-path", str(config)], stderr=log, stdout=log, env=env)
        try:
            deadline = time.time() + 30
            while "listening" not in log_path.read_text() and time.time() < deadline:
                time.sleep(0.05)
        finally:
            proc.kill()
            proc.wait()
    text = log_path.read_text()
    assert "listening" in text, text
    assert "\x1b[" not in text, text
    first = text.splitlines()[0]
    starts_with_time = re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", first) is not None
    assert starts_with_time != journal, first
