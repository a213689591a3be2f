"""Benchmark harness: prints figures measured side by side in one run (never a pass/fail test).

    bench/run.sh [--scales 1 10] [--repeat 3]

1. PDS-H (22 queries) at each scale: single-process Polars 2.0.0 (`collect()`) and a 2-worker
   loopback cluster of the release binary (`remote(ctx).execute()`, distributed, the client's
   default), alternating per query; the best of `--repeat` runs of each, per query and total.
2. Shuffle throughput: one worker fetches a 1 GiB shuffle file from another worker's shuffle
   service, against raw TCP over loopback, both measured by `polars-node bench-shuffle`.
3. Round trip of a trivial `execute()`: p50 / p99 over `--trips` runs.
4. The scheduler at scale: `polars-node bench-scheduler` registers `--simulated-workers`
   (10,000) workers that heartbeat every second; the scheduler process's CPU and RSS.

Writes results.json, report.md and pdsh.png under bench/results/<time>/ and prints the report.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import polars_cloud as pc

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "python"))
import pdsh  # noqa: E402
from ports import free_port  # noqa: E402


class Cluster:
    def __init__(self, binary: str, root: Path, workers: int, threads: int | None = None):
        self.binary, self.root, self.procs = binary, root, []
        self.client, self.worker_port = free_port(), free_port()
        self.shuffle = {}
        self.start("scheduler", f"""instance_id = "scheduler"
[scheduler]
enabled = true
client_service.bind_addr = "127.0.0.1:{self.client}"
worker_service.bind_addr = "127.0.0.1:{self.worker_port}"
anonymous_result_location.local.path = "{root / 'results'}"
database_path = "{root / 'scheduler' / 'queries.db'}"
""")
        for i in range(1, workers + 1):
            shuffle_port = free_port()
            self.shuffle[f"worker-{i}"] = (f"127.0.0.1:{shuffle_port}", root / f"worker-{i}")
            self.start(f"worker-{i}", f"""instance_id = "worker-{i}"
[worker]
enabled = true
task_service.bind_addr = "127.0.0.1:{free_port()}"
shuffle_service.bind_addr = "127.0.0.1:{shuffle_port}"
shuffle_location.local.path = "{root / f'worker-{i}'}"
{f'env_vars = {{ POLARS_MAX_THREADS = "{threads}" }}' if threads else ""}
[static_leader]
scheduler_service.public_addr = "127.0.0.1:{self.worker_port}"
""")
        deadline = time.time() + 60
        while self.live() < workers:
            if time.time() > deadline:
                raise SystemExit(f"workers did not register; logs in {root}")
            time.sleep(0.2)
        self.uri = f"http://127.0.0.1:{self.client}"

    def start(self, name, config):
        path = self.root / f"{name}.toml"
        path.write_text(config)
        log = open(self.root / f"{name}.log", "w")
        self.procs.append(subprocess.Popen([self.binary, "service", "--config-path", str(path)], stdout=log, stderr=subprocess.STDOUT))

    def live(self) -> int:
        out = subprocess.run([self.binary, "workers", "--json", "--scheduler", f"127.0.0.1:{self.worker_port}"], capture_output=True, text=True)
        if out.returncode:
            return 0
        return sum(w["state"] == "alive" for w in json.loads(out.stdout)["workers"])

    def stop(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait()


def generate(scale: str, cache: Path) -> Path:
    """TPC-H Parquet files (lineitem and orders in 8 files each), generated once and cached."""
    d = cache / f"tpch-sf{scale}"
    if (d / "done").exists():
        return d
    gen = str(Path(sys.executable).parent / "tpchgen-cli")
    d.mkdir(parents=True, exist_ok=True)
    small = "region,nation,supplier,customer,part,partsupp"
    subprocess.run([gen, "parquet", "-s", scale, f"--tables={small}", f"--output-dir={d}"], check=True)
    subprocess.run([gen, "parquet", "-s", scale, "--tables=lineitem,orders", "--parts=8", f"--output-dir={d}"], check=True)
    (d / "done").write_text("ok")
    return d


def best_of(n, f):
    times = []
    for _ in range(n):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return min(times)


def pdsh_side_by_side(ctx, data: Path, repeat: int, queries: list[int]):
    t = pdsh.tables(data)
    rows = []
    for n in queries:
        build = pdsh.QUERIES[n]
        q = build(t)
        local = cluster = float("inf")
        stages = 0
        for _ in range(repeat):  # alternate, so both sides see the same machine state
            local = min(local, best_of(1, q.collect))
            start = time.perf_counter()
            result = q.remote(ctx).execute()
            cluster = min(cluster, time.perf_counter() - start)
            stages = result.total_stages
            result.delete()
        rows.append({"query": n, "local_s": local, "cluster_s": cluster, "ratio": cluster / local, "stages": stages})
        print(f"  q{n:<2} local {local:8.3f} s  cluster {cluster:8.3f} s  ratio {cluster / local:5.2f}  stages {stages}", flush=True)
    return rows


def shuffle_throughput(binary, cluster, size=1 << 30):
    addr, root = cluster.shuffle["worker-1"]
    path = root / "bench" / "payload.arrow"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        block = os.urandom(1 << 20)
        for _ in range(size >> 20):
            f.write(block)
    out = subprocess.run([binary, "bench-shuffle", "--peer", addr, "--path", str(path), "--tcp-bytes", str(size)],
                         capture_output=True, text=True, check=True)
    path.unlink()
    m = json.loads(out.stdout)
    shuffle = m["shuffle_bytes"] / m["shuffle_secs"] / 1e6
    tcp = m["tcp_bytes"] / m["tcp_secs"] / 1e6
    return {"shuffle_MBps": shuffle, "tcp_MBps": tcp, "ratio": shuffle / tcp}


def round_trips(ctx, trips):
    q = pl.LazyFrame({"a": [1, 2, 3]}).select(pl.col("a") + 1)
    q.remote(ctx).execute()  # warm the connection
    times = []
    for _ in range(trips):
        start = time.perf_counter()
        q.remote(ctx).execute()
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return {"p50_ms": statistics.median(times), "p99_ms": times[min(len(times) - 1, int(len(times) * 0.99))], "trips": trips}


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = list(results["pdsh"])
    fig, axes = plt.subplots(len(scales), 1, figsize=(12, 3.6 * len(scales)), squeeze=False)
    for ax, scale in zip(axes[:, 0], scales):
        rows = results["pdsh"][scale]
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["local_s"] for r in rows], width=0.4, label="single-process Polars 2.0.0")
        ax.bar([i + 0.2 for i in x], [r["cluster_s"] for r in rows], width=0.4, label="polars-node, 2 workers")
        ax.set_xticks(list(x), [f"q{r['query']}" for r in rows])
        ax.set_ylabel("seconds (best of runs)")
        ax.set_title(f"PDS-H SF-{scale}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(results) -> str:
    lines = [f"Machine: {results['machine']}", ""]
    for scale, rows in results["pdsh"].items():
        local = sum(r["local_s"] for r in rows)
        cluster = sum(r["cluster_s"] for r in rows)
        lines += [f"PDS-H SF-{scale}: total single-process {local:.2f} s, cluster {cluster:.2f} s, ratio {cluster / local:.2f}", "",
                  "| query | single-process (s) | cluster (s) | ratio | stages |", "|---|---|---|---|---|"]
        lines += [f"| q{r['query']} | {r['local_s']:.3f} | {r['cluster_s']:.3f} | {r['ratio']:.2f} | {r['stages']} |" for r in rows]
        lines.append("")
    s = results["shuffle"]
    lines.append(f"Shuffle fetch {s['shuffle_MBps']:.0f} MB/s vs raw loopback TCP {s['tcp_MBps']:.0f} MB/s: {100 * s['ratio']:.0f}%")
    r = results["round_trip"]
    lines.append(f"Trivial execute() round trip over {r['trips']} runs: p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms")
    if (m := results.get("scheduler_load")):
        lines.append(
            f"Scheduler with {m['workers']} simulated workers heartbeating every second ({m['alive_at_end']} alive at the end, "
            f"{m['heartbeats_acknowledged_per_s']:.0f} heartbeats/s acknowledged): "
            f"CPU {100 * m['scheduler_cpu_of_one_core']:.1f}% of one core (target < 10%), RSS {m['scheduler_rss_mib']:.0f} MiB "
            f"(target < 200 MB), registering them took {m['registration_s']:.1f} s"
        )
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.environ.get("POLARS_NODE_BIN", str(Path.home() / ".cache/polars-node/target-release/release/polars-node")))
    ap.add_argument("--scales", nargs="*", default=["1", "10"], help="PDS-H scale factors (none: skip PDS-H)")
    ap.add_argument("--queries", nargs="*", type=int, default=list(pdsh.QUERIES), help="PDS-H query numbers (default: all 22)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--trips", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--worker-threads", type=int, help="POLARS_MAX_THREADS of each worker's engine (worker.env_vars)")
    ap.add_argument("--cache", default=str(Path.home() / ".cache/polars-node/bench"))
    ap.add_argument("--simulated-workers", type=int, default=10_000, help="membership load on one scheduler (0: skip)")
    args = ap.parse_args()
    out = HERE / "results" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    mem = int(next(l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal"))) // 1024 // 1024
    results = {"machine": f"{os.cpu_count()} cores ({cpu}), {mem} GiB RAM, {platform.platform()}", "pdsh": {},
               "worker_threads": args.worker_threads}
    with tempfile.TemporaryDirectory(prefix="polars-node-bench-") as tmp:
        cluster = Cluster(args.bin, Path(tmp), args.workers, args.worker_threads)
        try:
            ctx = pc.ClusterContext(uri=cluster.uri)
            for scale in args.scales:
                data = generate(scale, Path(args.cache))
                print(f"PDS-H SF-{scale}", flush=True)
                results["pdsh"][scale] = pdsh_side_by_side(ctx, data, args.repeat, args.queries)
            results["shuffle"] = shuffle_throughput(args.bin, cluster)
            results["round_trip"] = round_trips(ctx, args.trips)
        finally:
            cluster.stop()
    if args.simulated_workers:
        print(f"scheduler with {args.simulated_workers} simulated workers", flush=True)
        out_load = subprocess.run([args.bin, "bench-scheduler", "--workers", str(args.simulated_workers), "--seconds", "20"],
                                  capture_output=True, text=True, check=True)
        results["scheduler_load"] = json.loads(out_load.stdout.strip().splitlines()[-1])
    (out / "results.json").write_text(json.dumps(results, indent=2))
    text = report(results)
    (out / "report.md").write_text(text + "\n")
    try:
        if results["pdsh"]:
            plot(results, out / "pdsh.png")
    except ImportError:
        print("(matplotlib is not installed: no plot)")
    print(text)
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
