"""A real cluster for the official client: a scheduler and two workers as separate
`polars-node` processes on 127.0.0.1 / 127.0.0.2 / 127.0.0.3."""

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

BIN = os.environ.get("POLARS_NODE_BIN") or str(
    Path(os.environ.get("CARGO_TARGET_DIR", Path(__file__).parents[2] / "target")) / "debug" / "polars-node"
)


from ports import free_port  # noqa: E402,F401  (tests import it from here)


class Cluster:
    def __init__(self, root: Path, token_file: Path | None = None, internal=None):
        """`token_file`: the cluster token (`internal.token_file`) every node is given;
        `internal(name)`: the [internal] table of node `name` (TLS under a cluster CA)."""
        self.root = root
        self.token_file = token_file
        self.internal = internal
        self.procs: dict[str, subprocess.Popen] = {}
        self.client_port = free_port("127.0.0.1")
        self.worker_port = free_port("127.0.0.1")
        self.results = root / "results"
        self.uri = f"http://127.0.0.1:{self.client_port}"

    def start(self, name: str, config: str) -> None:
        if self.internal and "[internal]" not in config:
            config += "\n" + self.internal(name)
        elif self.token_file and "[internal]" not in config:
            config += f'\n[internal]\ntoken_file = "{self.token_file}"\n'
        path = self.root / f"{name}.toml"
        path.write_text(config)
        log = open(self.root / f"{name}.log", "w")
        env = dict(os.environ, PLC_LOG_LEVEL="info")
        self.procs[name] = subprocess.Popen(
            [BIN, "service", "--config-path", str(path)], stdout=log, stderr=subprocess.STDOUT, env=env
        )

    def start_scheduler(self, extra: str = "", tables: str = "") -> None:
        """`extra`: further [scheduler] keys; `tables`: further TOML tables."""
        # The tests' inputs are small: they are split as large ones would be (by default a
        # query reading under 64 MiB runs whole on one worker).
        if "min_split_bytes" not in extra:
            extra = f"min_split_bytes = 0\n{extra}"
        self.start(
            "scheduler",
            f"""instance_id = "scheduler"
[scheduler]
enabled = true
{extra}
client_service.bind_addr = "127.0.0.1:{self.client_port}"
worker_service.bind_addr = "127.0.0.1:{self.worker_port}"
anonymous_result_location.local.path = "{self.results}"
database_path = "{self.root / 'scheduler' / 'queries.db'}"
{tables}
""",
        )

    def start_worker(
        self,
        name: str,
        ip: str,
        tables: str = "",
        leader: str = "",
        shuffle_port: int | None = None,
        shuffle_dir: Path | None = None,
        top: str = "",
    ) -> None:
        """`tables`: further [worker] keys and TOML tables; `leader`: further keys of
        [static_leader]; `top`: top-level keys (memory_limit); its shuffle service on
        `shuffle_port` (default: a free one), its files under `shuffle_dir` (default
        <root>/<name>/shuffle)."""
        self.start(
            name,
            f"""instance_id = "{name}"
{top}
[worker]
enabled = true
heartbeat_period = "300ms"
task_service.bind_addr = "{ip}:{free_port(ip)}"
shuffle_service.bind_addr = "{ip}:{shuffle_port or free_port(ip)}"
shuffle_location.local.path = "{shuffle_dir or self.root / name / 'shuffle'}"
{tables}
[static_leader]
scheduler_service.public_addr = "127.0.0.1:{self.worker_port}"
{leader}
""",
        )

    def start_observatory(self, rest: int, tables: str = "", otlp: int | None = None, keys: str = "") -> None:
        """An observatory-only node on loopback; `keys`: more [observatory] keys, `tables`: more tables."""
        self.start(
            "observatory",
            f"""instance_id = "observatory"
[observatory]
enabled = true
service.bind_addr = "127.0.0.1:{otlp or free_port('127.0.0.1')}"
rest_api.service.bind_addr = "127.0.0.1:{rest}"
database_path = "{self.root / 'data.db'}"
{keys}
{tables}
[static_leader]
scheduler_service.public_addr = "127.0.0.1:1"
""",
        )

    def wait_ready(self, base_url: str, timeout: float = 20) -> None:
        """Waits for a node's REST port to answer /readyz."""
        import urllib.request

        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{base_url}/readyz", timeout=1)
                return
            except Exception:
                if time.time() > deadline:
                    raise TimeoutError(f"{base_url} is not ready\n{self.logs()}")
                time.sleep(0.1)

    def live_workers(self) -> list[str]:
        token = ["--token-file", str(self.token_file)] if self.token_file else []
        if self.internal:  # the scheduler's own credentials
            token = ["--config-path", str(self.root / "scheduler.toml")]
        out = subprocess.run(
            [BIN, "workers", "--json", "--scheduler", f"127.0.0.1:{self.worker_port}", *token], capture_output=True, text=True
        )
        if out.returncode != 0:
            return []
        return sorted(w["instance_id"] for w in json.loads(out.stdout)["workers"] if w["state"] == "alive")

    def wait_for_workers(self, names: list[str], timeout: float = 30) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.live_workers() == sorted(names):
                return
            time.sleep(0.2)
        raise TimeoutError(f"workers {names} did not register: {self.live_workers()}\n{self.logs()}")

    def wait_for_log(self, name: str, text: str, timeout: float = 20) -> str:
        """Waits until node `name`'s log says `text`; the log."""
        deadline = time.time() + timeout
        while text not in (log := (self.root / f"{name}.log").read_text()):
            assert time.time() < deadline, f"{name}'s log never said {text!r}:\n{log[-4000:]}"
            time.sleep(0.1)
        return log

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted(self.root.glob("*.log")))

    def stop(self) -> None:
        for p in self.procs.values():
            p.kill()
            p.wait()


def busy_task_processes(pid: int) -> list[int]:
    """Execution processes of the worker `pid` that are working on a task: running, or using
    CPU over a short look (idle ones wait for their next task on stdin)."""
    import subprocess
    import time

    def cpu(child: str) -> tuple[str, int] | None:
        try:
            stat = open(f"/proc/{child}/stat").read().rsplit(")", 1)[1].split()
            return stat[0], int(stat[11]) + int(stat[12])  # state, utime + stime
        except (OSError, IndexError, ValueError):
            return None

    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    before = {c: cpu(c) for c in children}
    time.sleep(0.05)
    busy = []
    for child, first in before.items():
        now = cpu(child)
        if first and now and (now[0] == "R" or now[1] > first[1]):
            busy.append(int(child))
    return busy


@contextlib.contextmanager
def running_cluster(
    root: Path, workers: dict[str, str], scheduler: str = "", token_file: Path | None = None, internal=None, tables: str = ""
):
    """A scheduler (with `scheduler` extra keys and `tables`) and `workers` (name -> loopback
    address); with `token_file`, every node has that cluster token; `internal`: as for Cluster."""
    c = Cluster(root, token_file, internal)
    c.start_scheduler(scheduler, tables)
    for name, ip in workers.items():
        c.start_worker(name, ip)
    try:
        c.wait_for_workers(list(workers))
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    with running_cluster(tmp_path_factory.mktemp("cluster"), {"worker-1": "127.0.0.2", "worker-2": "127.0.0.3"}) as c:
        yield c


@pytest.fixture(scope="session")
def restricted(tmp_path_factory):
    """A cluster that forbids local scans and sinks and anonymous queries."""
    policy = "allow_local_scans = false\nallow_local_sinks = false\ndeny_anonymous_users = true"
    with running_cluster(tmp_path_factory.mktemp("restricted"), {"worker-r": "127.0.0.4"}, policy) as c:
        yield c


@pytest.fixture(scope="session")
def ctx(cluster):
    import polars_cloud as pc

    return pc.ClusterContext(uri=cluster.uri)


# TPC-H data and worker kills, for the distributed tests and the fault drills.
SCALE = os.environ.get("PDSH_SCALE", "0.1")


def tpchgen() -> str:
    exe = Path(sys.executable).parent / "tpchgen-cli"
    if not exe.exists():
        pytest.fail("tpchgen-cli is not installed next to the test interpreter: run .ci/run (it installs it)")
    return str(exe)


@pytest.fixture(scope="session")
def tpch(tmp_path_factory):
    """TPC-H tables as Parquet: lineitem in 4 files (split by file), the others in one file
    each (orders is split by row ranges)."""
    d = tmp_path_factory.mktemp("tpch")
    others = "region,nation,supplier,customer,part,partsupp,orders"
    subprocess.run([tpchgen(), "parquet", "-s", SCALE, f"--tables={others}", f"--output-dir={d}"], check=True)
    subprocess.run([tpchgen(), "parquet", "-s", SCALE, "--tables=lineitem", "--parts=4", f"--output-dir={d}"], check=True)
    return d


def busy_worker(cluster, names) -> str | None:
    """A worker that runs a task now (an execution process of its is working)."""
    for name in names:
        if busy_task_processes(cluster.procs[name].pid):
            return name
    return None


def kill_busy_workers(cluster, names, n) -> list[str]:
    """SIGKILLs `n` of the workers `names`, each while it runs a task, one after the other
    (the next once the scheduler has had time to move the first one's tasks)."""
    killed = []
    deadline = time.time() + 60
    while len(killed) < n and time.time() < deadline:
        busy = busy_worker(cluster, [w for w in names if w not in killed])
        if busy:
            cluster.procs[busy].kill()
            cluster.procs[busy].wait()
            killed.append(busy)
            time.sleep(0.3)
        time.sleep(0.01)
    assert len(killed) == n, f"only {killed} ever ran a task"
    return killed
