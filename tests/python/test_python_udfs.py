"""Queries that call Python functions run in the py-polars of a worker's `python_executable`
(here the client's own environment), single-node and distributed, and give local Polars'
answers; where no worker's Python can load the client's pickles the query fails before any
worker runs it, saying what to configure."""

import os
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import polars_cloud as pc
import pytest
from polars.io.plugins import register_io_source
from polars.testing import assert_frame_equal

from conftest import BIN, free_port, running_cluster

# A Python whose micro version differs from the client's, with polars==2.0.0 (.ci/run makes it
# from Debian's python3).
OTHER_PYTHON = Path(os.environ.get("POLARS_NODE_OTHER_PYTHON", Path.home() / ".cache/polars-node/venv-debian-python/bin/python"))
CLIENT_PYTHON = "%d.%d.%d" % sys.version_info[:3]


@pytest.fixture(scope="module")
def python_cluster(tmp_path_factory):
    """Two workers with the client's Python and one without Python (never given such plans)."""
    root = tmp_path_factory.mktemp("python")
    with running_cluster(root, {}) as c:
        for name, ip in [("worker-py1", "127.0.0.20"), ("worker-py2", "127.0.0.21")]:
            c.start_worker(name, ip, tables=f'python_executable = "{sys.executable}"')
        c.start_worker("worker-plain", "127.0.0.22")
        c.wait_for_workers(["worker-plain", "worker-py1", "worker-py2"])
        yield c


@pytest.fixture(scope="module")
def pctx(python_cluster):
    return pc.ClusterContext(uri=python_cluster.uri)


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> pl.LazyFrame:
    """20,000 rows in two Parquet files (so a distributed plan would be split by file)."""
    root = tmp_path_factory.mktemp("udf-data")
    df = pl.DataFrame({"a": range(20_000), "s": [f"row {i % 97}" for i in range(20_000)]})
    df.slice(0, 10_000).write_parquet(root / "0.parquet")
    df.slice(10_000).write_parquet(root / "1.parquet")
    return pl.scan_parquet([root / "0.parquet", root / "1.parquet"])


def python_scan() -> pl.LazyFrame:
    """A scan defined in Python: 30,000 rows in three batches. (Defined inside a function, so
    cloudpickle pickles it by value: module-level functions are pickled by reference.)"""

    def source(with_columns, predicate, n_rows, batch_size):
        for start in range(0, 30_000, 10_000):
            values = [float(i) / 7 for i in range(start, start + 10_000)]
            df = pl.DataFrame({"k": range(start, start + 10_000), "v": values})
            if predicate is not None:
                df = df.filter(predicate)
            if with_columns is not None:
                df = df.select(with_columns)
            yield df

    return register_io_source(source, schema={"k": pl.Int64, "v": pl.Float64})


def module_level_double(x: int) -> int:
    return x * 2


QUERIES = {
    "map_elements": lambda t: t.with_columns(b=pl.col("a").map_elements(lambda x: x * 2 + 1, return_dtype=pl.Int64)),
    "map_batches": lambda t: t.select(pl.col("a").map_batches(lambda s: s.cum_sum(), return_dtype=pl.Int64), "s"),
    "LazyFrame.map_batches": lambda t: t.map_batches(
        lambda df: df.with_columns(c=pl.col("s").str.len_bytes() * 10),
        schema={"a": pl.Int64, "s": pl.String, "c": pl.UInt32},
    ),
    "python scan": lambda t: python_scan()
    .filter(pl.col("k") % 3 == 0)
    .group_by(pl.col("k") % 10)
    .agg(pl.col("v").sum(), pl.len()),
    "name.map": lambda t: t.select(pl.col("a", "s").name.map(str.upper)),
    "pipe_with_schema": lambda t: t.pipe_with_schema(lambda lf, schema: lf.select(pl.col(next(iter(schema))) + 1)),
    "udf then group_by": lambda t: t.with_columns(g=pl.col("s").map_elements(lambda s: s[-1], return_dtype=pl.String))
    .group_by("g")
    .agg(pl.col("a").sum()),
}
ORDERED = {"map_elements", "map_batches", "LazyFrame.map_batches", "name.map", "pipe_with_schema"}


@pytest.mark.filterwarnings("ignore::polars.exceptions.PolarsInefficientMapWarning")
@pytest.mark.parametrize("distributed", [False, True], ids=["single", "distributed"])
@pytest.mark.parametrize("name", list(QUERIES))
def test_python_functions_give_local_polars_answers(pctx, table, name, distributed):
    lf = QUERIES[name](table)
    expected = lf.collect()
    remote = lf.remote(pctx).distributed() if distributed else lf.remote(pctx)
    stored = remote.execute().lazy().collect()  # a stored result (and its head)
    streamed = (lf.remote(pctx).distributed() if distributed else lf.remote(pctx)).collect()  # Flight
    for got in [stored, streamed]:
        assert_frame_equal(got, expected, check_row_order=name in ORDERED)


def test_a_large_result_of_python_functions_streams_in_pieces(pctx):
    """Over the client's 4 MiB message limit: the Python output goes through the same Flight path."""
    lf = pl.LazyFrame({"i": range(400_000)}).with_columns(
        t=pl.col("i").map_elements(lambda i: f"text {i:>12}", return_dtype=pl.String)
    )
    assert_frame_equal(lf.remote(pctx).collect(), lf.collect())


def test_an_exception_of_a_python_function_is_the_query_error_and_is_not_retried(pctx, python_cluster):
    lf = pl.LazyFrame({"a": [1, 2, 0]}).select(pl.col("a").map_elements(lambda x: 10 // x, return_dtype=pl.Int64))
    with pytest.raises(pl.exceptions.ComputeError, match="a Python function of the query raised ZeroDivisionError") as e:
        lf.remote(pctx).collect()
    assert "time(s)" not in str(e.value) and "lost" not in str(e.value)
    # One run on one worker; the workers are all still there.
    logs = "".join((python_cluster.root / f"{w}.log").read_text() for w in ["worker-py1", "worker-py2"])
    assert logs.count("ZeroDivisionError: integer division or modulo by zero") >= 1
    assert python_cluster.live_workers() == ["worker-plain", "worker-py1", "worker-py2"]
    # The next query runs.
    assert lf.head(2).remote(pctx).collect()["a"].to_list() == [10, 5]


def test_a_function_of_a_module_the_worker_cannot_import_says_so(pctx):
    lf = pl.LazyFrame({"a": [1, 2]}).select(pl.col("a").map_batches(lambda s: s.map_elements(module_level_double)))
    with pytest.raises(pl.exceptions.ComputeError, match="No module named 'test_python_udfs'") as e:
        lf.remote(pctx).collect()
    assert "must be able to import the modules the query's functions come from" in str(e.value)


def test_without_a_python_environment_the_error_says_how_to_configure_one(ctx):
    lf = pl.LazyFrame({"a": [1, 2]}).map_batches(lambda df: df, schema={"a": pl.Int64})
    with pytest.raises(pl.exceptions.ComputeError) as e:
        lf.remote(ctx).collect()
    message = str(e.value)
    assert "no live worker can run them" in message and "worker.python_executable is not set" in message
    assert f"set worker.python_executable on the workers to Python {CLIENT_PYTHON} (the client's) with polars==2.0.0" in message


def test_pickles_of_another_python_version_are_refused_before_any_worker_runs_them(tmp_path):
    if not OTHER_PYTHON.exists():
        pytest.fail(f"{OTHER_PYTHON} is missing: .ci/run creates it (a venv of Debian's python3 with polars==2.0.0)")
    other = subprocess.run([OTHER_PYTHON, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"], capture_output=True, text=True).stdout.strip()
    if other == CLIENT_PYTHON:
        pytest.skip(f"Debian's python3 is the client's version ({other}) on this machine")
    marker = tmp_path / "ran"
    with running_cluster(tmp_path, {}) as c:
        c.start_worker("worker-other", "127.0.0.23", tables=f'python_executable = "{OTHER_PYTHON}"')
        c.wait_for_workers(["worker-other"])
        lf = pl.LazyFrame({"a": [1]}).map_batches(lambda df: (marker.touch(), df)[1], schema={"a": pl.Int64})
        with pytest.raises(pl.exceptions.ComputeError) as e:
            lf.remote(pc.ClusterContext(uri=c.uri)).collect()
        assert f"worker-other: its Python is {other}, and the query's functions were pickled by Python {CLIENT_PYTHON}" in str(e.value)
        assert "task started" not in (tmp_path / "worker-other.log").read_text()
    assert not marker.exists()


def test_a_worker_whose_python_lacks_polars_does_not_start(tmp_path):
    config = tmp_path / "worker.toml"
    config.write_text(
        f"""instance_id = "w"
[worker]
enabled = true
task_service.bind_addr = "127.0.0.24:{free_port("127.0.0.24")}"
shuffle_service.bind_addr = "127.0.0.24:{free_port("127.0.0.24")}"
shuffle_location.local.path = "{tmp_path / 'shuffle'}"
python_executable = "/usr/bin/python3"
[static_leader]
scheduler_service.public_addr = "127.0.0.1:1"
"""
    )
    out = subprocess.run([BIN, "service", "--config-path", config], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert 'worker.python_executable = "/usr/bin/python3" cannot run queries that call Python: cannot import polars' in out.stderr + out.stdout


def test_python_functions_are_refused_where_local_files_are(tmp_path):
    with running_cluster(tmp_path, {}, "allow_local_sinks = false") as c:
        c.start_worker("worker-p", "127.0.0.25", tables=f'python_executable = "{sys.executable}"')
        c.wait_for_workers(["worker-p"])
        lf = pl.LazyFrame({"a": [1]}).map_batches(lambda df: df, schema={"a": pl.Int64})
        with pytest.raises(pl.exceptions.InvalidOperationError, match="calls Python functions, which can read and write any file"):
            lf.remote(pc.ClusterContext(uri=c.uri)).collect()
