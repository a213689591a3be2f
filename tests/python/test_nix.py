"""The Nix side, checked without Nix builds: every .nix file parses, is formatted and has no
dead code; the NixOS module's pure rendering (nixos/render.nix) turns example options into
TOML that the node accepts; and the VM test's scenario runs on hosts made of network
namespaces, each node started with exactly its rendered file."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import BIN

ROOT = Path(__file__).parents[2]
NIX_FILES = sorted(str(p.relative_to(ROOT)) for p in [ROOT / "flake.nix", *ROOT.glob("nixos/**/*.nix"), *ROOT.glob("tests/nix/*.nix")])


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(Path.home() / ".cargo" / "bin"))
    if path is None:
        pytest.fail(f"{name} is not installed (.ci/run installs it)")
    return path


def run(*args, **kwargs):
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, **kwargs)


@pytest.mark.parametrize("path", NIX_FILES)
def test_nix_file_parses(path):
    out = run(tool("nix-instantiate"), "--parse", path)
    assert out.returncode == 0, out.stderr


def test_nix_formatting():
    out = run(tool("nixpkgs-fmt"), "--check", *NIX_FILES)
    assert out.returncode == 0, out.stdout + out.stderr


def test_nix_has_no_dead_code():
    out = run(tool("deadnix"), "--fail", *NIX_FILES)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, Path]:
    out = run(tool("nix-instantiate"), "--eval", "--strict", "--json", "tests/nix/examples.nix")
    assert out.returncode == 0, out.stderr
    d = tmp_path_factory.mktemp("rendered")
    files = {}
    for name, text in json.loads(out.stdout).items():
        files[name] = d / f"{name}.toml"
        files[name].write_text(text)
    return files


def test_examples_render_to_configurations_the_node_accepts(rendered):
    assert set(rendered) == {"scheduler", "worker-interface", "worker-nat", "all-in-one"}
    for name, path in rendered.items():
        out = subprocess.run([BIN, "check-config", "--no-resolve", str(path)], capture_output=True, text=True)
        assert out.returncode == 0, f"{name}:\n{path.read_text()}\n{out.stderr}"
    assert 'bind_addr = { interface = "eth1", port = 5052 }' in rendered["worker-interface"].read_text()
    nat = rendered["worker-nat"].read_text()
    assert 'bind_addr = { port = 5052 }\npublic_addr = "10.231.1.10:5052"' in nat
    assert "lost_after_missed_heartbeats = 5" in rendered["all-in-one"].read_text()


def test_the_readme_nixos_example_renders_as_shown_and_the_node_accepts_it(tmp_path):
    """README's NixOS section: each `services.polars` value it shows (a ```nix block that is an
    attribute set) renders with nixos/render.nix to exactly the ```toml block after it, which
    `check-config` accepts; monitoring is on for both hosts (the observatory is known)."""
    import re

    text = (ROOT / "README.md").read_text()
    section = text.split("\n## NixOS\n", 1)[1].split("\n## ", 1)[0]
    pairs = re.findall(r"```nix\n(\{\n  instanceId.*?\n\})\n```.*?```toml\n(.*?)```", section, re.S)
    assert len(pairs) == 2, section
    for i, (options, shown) in enumerate(pairs):
        expr = tmp_path / f"{i}.nix"
        expr.write_text(f"(import {ROOT}/nixos/render.nix).render ({options})")
        out = run(tool("nix-instantiate"), "--eval", "--strict", "--json", str(expr))
        assert out.returncode == 0, out.stderr
        rendered = json.loads(out.stdout)
        assert rendered == shown, f"README shows:\n{shown}\nrender.nix gives:\n{rendered}"
        assert "[monitoring]\nenabled = true" in rendered
        path = tmp_path / f"{i}.toml"
        path.write_text(rendered)
        checked = subprocess.run([BIN, "check-config", "--no-resolve", str(path)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stderr


def test_a_bad_address_option_is_a_clear_evaluation_error(tmp_path):
    expr = tmp_path / "bad.nix"
    expr.write_text(f'(import {ROOT}/nixos/render.nix).render {{ worker = {{ enable = true; taskService.bind = 1.5; }}; }}')
    out = run(tool("nix-instantiate"), "--eval", "--strict", str(expr))
    assert out.returncode != 0
    assert 'an address is a port, \\"host:port\\" or an interface name, not a float' in out.stderr or \
        'an address is a port, "host:port" or an interface name, not a float' in out.stderr, out.stderr


# --- the VM test's scenario on network-namespace hosts ------------------------------------

class Hosts:
    """Network namespaces joined by a bridge in a router namespace, which also NATs a private
    subnet. Removed on close."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.names: list[str] = []

    def sh(self, *args):
        out = subprocess.run(args, capture_output=True, text=True)
        assert out.returncode == 0, f"{args}: {out.stderr}"

    def ns(self, host):
        return f"{self.prefix}-{host}"

    def add(self, host):
        self.sh("ip", "netns", "add", self.ns(host))
        self.names.append(self.ns(host))
        self.sh("ip", "-n", self.ns(host), "link", "set", "lo", "up")

    def wire(self, host, peer, addr, gateway=None, bridge=True):
        router = self.ns("router")
        self.sh("ip", "link", "add", peer, "netns", router, "type", "veth", "peer", "name", "eth1", "netns", self.ns(host))
        self.sh("ip", "-n", self.ns(host), "addr", "add", addr, "dev", "eth1")
        self.sh("ip", "-n", self.ns(host), "link", "set", "eth1", "up")
        if bridge:
            self.sh("ip", "-n", router, "link", "set", peer, "master", "br0")
        self.sh("ip", "-n", router, "link", "set", peer, "up")
        if gateway:
            self.sh("ip", "-n", self.ns(host), "route", "add", "default", "via", gateway)

    def close(self):
        for n in self.names:
            subprocess.run(["ip", "netns", "del", n], capture_output=True)


@pytest.fixture
def scenario(rendered, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    hosts = Hosts(f"pnx{os.getpid()}")
    procs: dict[str, subprocess.Popen] = {}
    try:
        for h in ["router", "leader", "worker1", "worker2", "client"]:
            hosts.add(h)
        r = hosts.ns("router")
        hosts.sh("ip", "-n", r, "link", "add", "br0", "type", "bridge")
        hosts.sh("ip", "-n", r, "addr", "add", "10.231.1.254/24", "dev", "br0")
        hosts.sh("ip", "-n", r, "addr", "add", "10.231.1.10/32", "dev", "br0")
        hosts.sh("ip", "-n", r, "link", "set", "br0", "up")
        hosts.wire("leader", "v-leader", "10.231.1.2/24")
        hosts.wire("worker1", "v-worker1", "10.231.1.3/24")
        hosts.wire("client", "v-client", "10.231.1.50/24")
        hosts.wire("worker2", "v-worker2", "10.231.2.2/24", gateway="10.231.2.1", bridge=False)
        hosts.sh("ip", "-n", r, "addr", "add", "10.231.2.1/24", "dev", "v-worker2")
        hosts.sh("ip", "netns", "exec", r, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for port in ("5052", "5053"):
            hosts.sh("ip", "netns", "exec", r, "iptables", "-t", "nat", "-A", "PREROUTING", "-d", "10.231.1.10", "-p", "tcp",
                     "--dport", port, "-j", "DNAT", "--to-destination", f"10.231.2.2:{port}")
        hosts.sh("ip", "netns", "exec", r, "iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "10.231.2.0/24", "-o", "br0",
                 "-j", "MASQUERADE")

        state = tmp_path / "state"
        results = state / "results"
        env = dict(os.environ, PLC_LOG_LEVEL="info",
                   PC_CUBLET__scheduler__anonymous_result_location=f'{{ local = {{ path = "{results}" }} }}',
                   PC_CUBLET__observatory__database_path=str(state / "observatory.db"))

        def start(host, config):
            log = open(tmp_path / f"{host}.log", "w")
            wenv = dict(env, PC_CUBLET__worker__shuffle_location=f'{{ local = {{ path = "{state / host}" }} }}')
            procs[host] = subprocess.Popen(["ip", "netns", "exec", hosts.ns(host), BIN, "service", "--config-path", str(config)],
                                           stdout=log, stderr=subprocess.STDOUT, env=wenv)

        start("leader", rendered["scheduler"])
        start("worker1", rendered["worker-interface"])
        start("worker2", rendered["worker-nat"])
        yield hosts, procs, tmp_path
    finally:
        for p in procs.values():
            p.kill()
            p.wait()
        hosts.close()


def workers_seen_from(hosts, host):
    out = subprocess.run(["ip", "netns", "exec", hosts.ns(host), BIN, "workers", "--json", "--scheduler", "10.231.1.2:5050"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        return {}
    return {w["instance_id"]: (w["state"], w["task_addr"]) for w in json.loads(out.stdout)["workers"]}


CLIENT = """
import sys, polars as pl, polars_cloud as pc
ctx = pc.ClusterContext(uri="http://10.231.1.2:5051")
q = pl.LazyFrame({"k": ["a", "b", "a"] * 50, "v": list(range(150))}).group_by("k").agg(pl.col("v").sum()).sort("k")
assert q.remote(ctx).collect().equals(q.collect())
# A split query: both workers scan parts of the files and exchange shuffle partitions across
# hosts (worker-2 only at its NAT address). The files are small: the client asks for a split.
facts = pl.scan_parquet(sys.argv[1] + "/facts-*.parquet")
joined = facts.join(facts.select("id", w="v"), on="id").group_by("k").agg(pl.len(), pl.col("w").sum()).sort("k")
res = joined.remote(ctx).distributed(equi_join_broadcast_limit=0, single_worker_ops="forbid").execute()
assert res.lazy().collect().equals(joined.collect()), res.lazy().collect()
assert res.total_stages >= 3 and max(s.num_workers_used for s in res.stage_statistics()) == 2, res.stage_statistics()
print("SPLIT", res.total_stages, flush=True)
lf = pl.LazyFrame({"a": range(2500)}).join(pl.LazyFrame({"b": range(2500)}), how="cross")
long = lf.select((pl.col("a") * pl.col("b") % 7).alias("m")).group_by("m").len().sort("m")
running = long.remote(ctx, n_retries=1).execute(blocking=False)
print("SUBMITTED", flush=True)
assert running.await_result().lazy().collect().equals(long.collect())
print("OK", flush=True)
"""


def test_the_vm_scenario_with_rendered_configurations(scenario):
    hosts, procs, tmp_path = scenario
    expected = {"worker-1": ("alive", "10.231.1.3:5052"), "worker-2": ("alive", "10.231.1.10:5052")}
    deadline = time.time() + 30
    while workers_seen_from(hosts, "client") != expected:
        assert time.time() < deadline, (workers_seen_from(hosts, "client"), (tmp_path / "worker2.log").read_text()[-2000:])
        time.sleep(0.2)
    # The official client on its own host; a worker is stopped while the long query runs.
    import polars as pl

    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        pl.DataFrame({"id": range(i * 5000, (i + 1) * 5000), "k": [f"k{j % 13}" for j in range(5000)], "v": range(5000)}).write_parquet(
            data / f"facts-{i}.parquet"
        )
    client = subprocess.Popen(["ip", "netns", "exec", hosts.ns("client"), sys.executable, "-c", CLIENT, str(data)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = client.stdout.readline()
    assert line.startswith("SPLIT"), line + client.stdout.read() + (tmp_path / "leader.log").read_text()[-3000:]
    line = client.stdout.readline()
    assert line.strip() == "SUBMITTED", line + client.stdout.read()
    time.sleep(0.3)
    procs["worker1"].terminate()
    procs["worker1"].wait(timeout=60)
    out, _ = client.communicate(timeout=180)
    assert client.returncode == 0 and "OK" in out, out
