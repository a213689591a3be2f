"""Benchmark harness: prints figures measured side by side in one run (never a pass/fail test).

    bench/run.sh [--scales 1 10] [--repeat 3]

1. PDS-H (22 queries) at each scale: single-process Polars 2.0.0 (`collect()`) and a 2-worker
   loopback cluster of the release binary (`remote(ctx).execute()`, distributed, the client's
   default), alternating per query; the best of `--repeat` runs of each, per query and total.
2. Shuffle throughput: one worker fetches a 1 GiB shuffle file from another worker's shuffle
   service, against raw TCP over loopback, both measured by `polars-node bench-shuffle`.
3. Round trip of a trivial `execute()`: p50 / p99 over `--trips` runs. Then the time of small
   distributed queries (`--breakdown-queries`) broken down from their spans, on a cluster that
   sends them to an observatory (bench/breakdown.py).
4. Scale-out (`--scale-out`, SF-10): each worker stands for a machine of one core (taskset to
   its own core, POLARS_MAX_THREADS=1) against single-process Polars on one core with one
   thread (a process per query, bench/single.py); peak memory of each worker (bench/memory.py)
   and of the single process; then the query with the largest single-process peak on workers
   whose `memory_limit` is 0.6 of that peak.
5. Peers (`--peers`): DuckDB and Spark local[cores] on the same files and cores, the 22 TPC-H
   queries as SQL (bench/peers.py), row counts checked against the PDS-H results.
6. The scheduler at scale: `polars-node bench-scheduler` registers `--simulated-workers`
   (10,000) workers that heartbeat every second; the scheduler process's CPU and RSS. Then
   the time to plan and dispatch a stage of one task per worker on `--dispatch-workers`
   (1,000) simulated workers (bench/dispatch.py).

Writes results.json, report.md and the plots (pdsh.png, scale-out-sf*.png, peers.png) under
bench/results/<time>/ and prints the report.
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
import breakdown  # noqa: E402
import dispatch  # noqa: E402
import peers  # noqa: E402
from memory import PeakSampler  # noqa: E402
from ports import free_port  # noqa: E402


class Cluster:
    """A scheduler and `workers` workers of the release binary on loopback. `threads` sets each
    worker engine's POLARS_MAX_THREADS (worker.env_vars); `pin` runs worker i on core i only
    (taskset: a worker stands for a machine of one core); `memory_limit` is each worker's
    `memory_limit` (bytes, enforced by the node's own cgroup)."""

    def __init__(self, binary: str, root: Path, workers: int, threads: int | None = None, pin: bool = False,
                 memory_limit: int | None = None, monitored: bool = False, min_split_bytes: int | None = None):
        self.binary, self.root, self.procs = binary, root, []
        root.mkdir(parents=True, exist_ok=True)
        self.client, self.worker_port = free_port(), free_port()
        self.shuffle, self.worker_pids = {}, {}
        # With `monitored`, the scheduler's node also runs an observatory and every node sends
        # it its spans (for the time breakdown).
        otlp, rest = free_port(), free_port()
        self.rest = f"http://127.0.0.1:{rest}"
        observatory = f"""[observatory]
enabled = true
service.bind_addr = "127.0.0.1:{otlp}"
rest_api.service.bind_addr = "127.0.0.1:{rest}"
database_path = "{root / 'observatory.db'}"
[monitoring]
enabled = true
""" if monitored else ""
        monitoring = f"""[monitoring]
enabled = true
""" if monitored else ""
        leader = f'observatory_service.public_addr = "127.0.0.1:{otlp}"' if monitored else ""
        self.start("scheduler", f"""instance_id = "scheduler"
{observatory}
[scheduler]
enabled = true
client_service.bind_addr = "127.0.0.1:{self.client}"
worker_service.bind_addr = "127.0.0.1:{self.worker_port}"
anonymous_result_location.local.path = "{root / 'results'}"
database_path = "{root / 'scheduler' / 'queries.db'}"
{f"min_split_bytes = {min_split_bytes}" if min_split_bytes is not None else ""}
""")
        for i in range(1, workers + 1):
            name, shuffle_port = f"worker-{i}", free_port()
            self.shuffle[name] = (f"127.0.0.1:{shuffle_port}", root / name)
            proc = self.start(name, f"""instance_id = "{name}"
{f"memory_limit = {memory_limit}" if memory_limit else ""}
[worker]
enabled = true
task_service.bind_addr = "127.0.0.1:{free_port()}"
shuffle_service.bind_addr = "127.0.0.1:{shuffle_port}"
shuffle_location.local.path = "{root / name}"
{f'env_vars = {{ POLARS_MAX_THREADS = "{threads}" }}' if threads else ""}
{monitoring}
[static_leader]
scheduler_service.public_addr = "127.0.0.1:{self.worker_port}"
{leader}
""", cores=str((i - 1) % os.cpu_count()) if pin else None)
            self.worker_pids[name] = proc.pid
        deadline = time.time() + 60
        while self.live() < workers:
            if time.time() > deadline:
                raise SystemExit(f"workers did not register; logs in {root}")
            time.sleep(0.2)
        self.uri = f"http://127.0.0.1:{self.client}"

    def start(self, name, config, cores: str | None = None):
        path = self.root / f"{name}.toml"
        path.write_text(config)
        log = open(self.root / f"{name}.log", "w")
        pin = ["taskset", "-c", cores] if cores else []
        proc = subprocess.Popen(pin + [self.binary, "service", "--config-path", str(path)], stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

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


def pdsh_side_by_side(ctx, data: Path, repeat: int, queries: list[int]):
    t = pdsh.tables(data)
    rows = []
    for n in queries:
        build = pdsh.QUERIES[n]
        q = build(t)
        local = cluster = float("inf")
        stages = height = 0
        for _ in range(repeat):  # alternate, so both sides see the same machine state
            start = time.perf_counter()
            height = q.collect().height
            local = min(local, time.perf_counter() - start)
            start = time.perf_counter()
            result = q.remote(ctx).execute()
            cluster = min(cluster, time.perf_counter() - start)
            stages = result.total_stages
            result.delete()
        rows.append({"query": n, "local_s": local, "cluster_s": cluster, "ratio": cluster / local, "stages": stages,
                     "rows": height})
        print(f"  q{n:<2} local {local:8.3f} s  cluster {cluster:8.3f} s  ratio {cluster / local:5.2f}  stages {stages}", flush=True)
    return rows


def time_breakdown(binary: str, root: Path, data: Path, queries: list[int], workers: int) -> list[dict]:
    """Where the time of distributed queries goes (bench/breakdown.py), on a cluster that sends
    its spans to an observatory (not the cluster measured above, whose nodes send nothing);
    the best of three runs of each query by total time."""
    cluster = Cluster(binary, root, workers, monitored=True)
    rows = []
    try:
        ctx = pc.ClusterContext(uri=cluster.uri)
        t = pdsh.tables(data)
        for n in queries:
            runs = []
            for _ in range(3):
                # Split although small (the scheduler runs them whole by default): this measures
                # what a stage costs.
                remote = pdsh.QUERIES[n](t).remote(ctx).distributed(single_worker_ops="forbid")
                running = remote.execute(blocking=False)
                running.await_result().delete()
                runs.append(breakdown.breakdown(breakdown.detail(cluster.rest, str(running._query_id))))
            best = min(runs, key=lambda r: r["total_ms"])
            rows.append({"query": n, **best})
            print(f"  q{n:<2} {best['total_ms']:7.1f} ms: planning {best['planning_ms']:.1f}, engine {best['engine_ms']:.1f}, "
                  f"data movement {best['data_movement_ms']:.1f}, task calls {best['task_calls_ms']:.1f}, scheduler "
                  f"{best['scheduler_between_stages_ms']:.1f} over {best['stages']} stages ({best['tasks']} tasks): "
                  f"{best['per_stage_boundary_ms']:.1f} ms per stage beyond engine and data movement", flush=True)
    finally:
        cluster.stop()
    return rows


def single_process(data: Path, query: int, repeat: int, core: str) -> dict:
    """Single-process Polars in a process of its own on one core with one engine thread, its
    peak memory sampled as a worker's is."""
    proc = subprocess.Popen(["taskset", "-c", core, sys.executable, str(HERE / "single.py"), str(data), str(query), str(repeat)],
                            env={**os.environ, "POLARS_MAX_THREADS": "1"}, stdout=subprocess.PIPE, text=True)
    sampler = PeakSampler({"single": proc.pid})
    out, _ = proc.communicate()
    sampler.stop()
    if proc.returncode:
        raise SystemExit(f"single-process q{query} failed (exit {proc.returncode})")
    return {**json.loads(out.strip().splitlines()[-1]), "peak_rss_bytes": sampler.peaks["single"]}


def on_cluster(ctx, sampler: PeakSampler, q, repeat: int) -> dict:
    """The best time of `repeat` runs and each worker's peak memory (the largest over the runs)."""
    best, peaks = float("inf"), {}
    for _ in range(repeat):
        sampler.reset()
        start = time.perf_counter()
        result = q.remote(ctx).execute()
        best = min(best, time.perf_counter() - start)
        for name, peak in sampler.peak_bytes().items():
            peaks[name] = max(peaks.get(name, 0), peak)
        result.delete()
    return {"seconds": best, "worker_peak_rss_bytes": peaks}


def scale_out(binary: str, root: Path, data: Path, repeat: int, queries: list[int], workers: int,
              min_split_bytes: int | None = None) -> list[dict]:
    """Each worker stands for a machine of one core: pinned to its own core with one engine
    thread, against single-process Polars pinned to one core with one thread, alternating.
    `min_split_bytes`: the scheduler's (its default unless given)."""
    cluster = Cluster(binary, root, workers, threads=1, pin=True, min_split_bytes=min_split_bytes)
    sampler = PeakSampler(cluster.worker_pids)
    cores = {name: sorted(os.sched_getaffinity(pid)) for name, pid in cluster.worker_pids.items()}
    rows = []
    try:
        ctx = pc.ClusterContext(uri=cluster.uri)
        t = pdsh.tables(data)
        for n in queries:
            single = single_process(data, n, repeat, core="0")
            remote = on_cluster(ctx, sampler, pdsh.QUERIES[n](t), repeat)
            peak = max(remote["worker_peak_rss_bytes"].values())
            rows.append({"query": n, "single_s": single["seconds"], "cluster_s": remote["seconds"],
                         "ratio": remote["seconds"] / single["seconds"], "single_peak_rss_bytes": single["peak_rss_bytes"],
                         "worker_peak_rss_bytes": remote["worker_peak_rss_bytes"],
                         "memory_ratio": peak / single["peak_rss_bytes"], "worker_cores": cores})
            print(f"  q{n:<2} single 1 core {single['seconds']:8.3f} s  {workers} x 1 core {remote['seconds']:8.3f} s  "
                  f"ratio {rows[-1]['ratio']:5.2f}  peak memory single {single['peak_rss_bytes'] >> 20} MiB, "
                  f"largest worker {peak >> 20} MiB ({rows[-1]['memory_ratio']:.2f}x)", flush=True)
    finally:
        sampler.stop()
        cluster.stop()
    return rows


def memory_limited(binary: str, root: Path, data: Path, scale_out_rows: list[dict], workers: int) -> dict:
    """The query with the largest single-process peak, on one-core workers whose memory_limit is
    below that peak (0.6 of it): does it complete, and in what time and memory?"""
    biggest = max(scale_out_rows, key=lambda r: r["single_peak_rss_bytes"])
    limit = int(biggest["single_peak_rss_bytes"] * 0.6)
    out = {"query": biggest["query"], "single_peak_rss_bytes": biggest["single_peak_rss_bytes"], "memory_limit": limit}
    cluster = Cluster(binary, root, workers, threads=1, pin=True, memory_limit=limit)
    sampler = PeakSampler(cluster.worker_pids)
    try:
        ctx = pc.ClusterContext(uri=cluster.uri)
        out.update(on_cluster(ctx, sampler, pdsh.QUERIES[biggest["query"]](pdsh.tables(data)), 1))
        out["completed"] = True
    except Exception as e:  # the figure is whether it completes; the error says why not
        out.update(completed=False, error=str(e)[:500])
    finally:
        sampler.stop()
        cluster.stop()
    print(f"  q{out['query']} with memory_limit {limit >> 20} MiB per worker (single-process peak "
          f"{out['single_peak_rss_bytes'] >> 20} MiB): {'completed' if out['completed'] else 'FAILED: ' + out['error']}", flush=True)
    return out


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


def plot(results, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def bars(ax, labels, series, ylabel, title):
        width = 0.8 / len(series)
        for k, (name, values) in enumerate(series.items()):
            ax.bar([i + (k - (len(series) - 1) / 2) * width for i in range(len(labels))], values, width=width, label=name)
        ax.set_xticks(list(range(len(labels))), labels)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend()

    if results["pdsh"]:
        scales = list(results["pdsh"])
        fig, axes = plt.subplots(len(scales), 1, figsize=(12, 3.6 * len(scales)), squeeze=False)
        for ax, scale in zip(axes[:, 0], scales):
            rows = results["pdsh"][scale]
            bars(ax, [f"q{r['query']}" for r in rows], {"single-process Polars 2.0.0": [r["local_s"] for r in rows],
                 f"polars-node, {results['workers']} workers": [r["cluster_s"] for r in rows]},
                 "seconds (best of runs)", f"PDS-H SF-{scale}, all cores on both sides")
        fig.tight_layout()
        fig.savefig(out / "pdsh.png", dpi=110)
    if results.get("scale_out"):
        for scale, rows in results["scale_out"].items():
            labels = [f"q{r['query']}" for r in rows]
            fig, axes = plt.subplots(2, 1, figsize=(12, 7.2))
            bars(axes[0], labels, {"single process, 1 core, 1 thread": [r["single_s"] for r in rows],
                 f"{results['workers']} workers, 1 core and 1 thread each": [r["cluster_s"] for r in rows]},
                 "seconds (best of runs)", f"Scale-out, PDS-H SF-{scale}")
            names = sorted(rows[0]["worker_peak_rss_bytes"])
            series = {"single process": [r["single_peak_rss_bytes"] / 2**20 for r in rows]}
            series.update({n: [r["worker_peak_rss_bytes"].get(n, 0) / 2**20 for r in rows] for n in names})
            bars(axes[1], labels, series, "peak anonymous memory (MiB)", f"Memory per worker, PDS-H SF-{scale}")
            fig.tight_layout()
            fig.savefig(out / f"scale-out-sf{scale}.png", dpi=110)
    if results.get("peers"):
        scales = list(results["peers"])
        fig, axes = plt.subplots(len(scales), 1, figsize=(12, 3.6 * len(scales)), squeeze=False)
        for ax, scale in zip(axes[:, 0], scales):
            p = results["peers"][scale]
            rows = results["pdsh"][scale]
            series = {"polars-node": [r["cluster_s"] for r in rows]}
            for system in ("duckdb", "spark"):
                if p.get(system):
                    series[system] = [q["seconds"] for q in p[system]["queries"]]
            bars(ax, [f"q{r['query']}" for r in rows], series, "seconds (best of runs)", f"TPC-H SF-{scale}, same cores")
            ax.set_yscale("log")
        fig.tight_layout()
        fig.savefig(out / "peers.png", dpi=110)


def mib(n: int) -> str:
    return f"{n / 2**20:.0f}"


def report(results) -> str:
    lines = [f"Machine: {results['machine']}", ""]
    for scale, rows in results["pdsh"].items():
        local = sum(r["local_s"] for r in rows)
        cluster = sum(r["cluster_s"] for r in rows)
        target = {"1": " (target <= 1.1x)", "10": " (target <= 1.05x)"}.get(scale, "")
        lines += [f"PDS-H SF-{scale}, {results['workers']} workers vs one process, all cores on both sides: total single-process "
                  f"{local:.2f} s, cluster {cluster:.2f} s, ratio {cluster / local:.2f}{target}", "",
                  "| query | single-process (s) | cluster (s) | ratio | stages |", "|---|---|---|---|---|"]
        lines += [f"| q{r['query']} | {r['local_s']:.3f} | {r['cluster_s']:.3f} | {r['ratio']:.2f} | {r['stages']} |" for r in rows]
        lines.append("")
    for scale, rows in results.get("scale_out", {}).items():
        single = sum(r["single_s"] for r in rows)
        cluster = sum(r["cluster_s"] for r in rows)
        largest = sorted(rows, key=lambda r: r["single_peak_rss_bytes"], reverse=True)[:5]
        memory = max(r["memory_ratio"] for r in largest)
        lines += [f"Scale-out, PDS-H SF-{scale}: {results['workers']} workers of one core and one engine thread each against one "
                  f"process of one core and one thread: total {cluster:.2f} s vs {single:.2f} s, ratio {cluster / single:.2f} "
                  f"(target <= 0.55x, ideal {1 / results['workers']:.2f}); on the five largest queries by single-process peak "
                  f"(q{', q'.join(str(r['query']) for r in largest)}) the largest worker peaks at up to {memory:.2f}x the "
                  f"single process (target <= 0.6x)", "",
                  "| query | single, 1 core (s) | cluster (s) | ratio | single peak (MiB) | worker peaks (MiB) | largest / single |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| q{r['query']} | {r['single_s']:.3f} | {r['cluster_s']:.3f} | {r['ratio']:.2f} | {mib(r['single_peak_rss_bytes'])} | "
                  f"{' / '.join(mib(v) for _, v in sorted(r['worker_peak_rss_bytes'].items()))} | {r['memory_ratio']:.2f} |" for r in rows]
        lines.append("")
    if (m := results.get("memory_limited")):
        outcome = (f"completed in {m['seconds']:.2f} s, worker peaks "
                   f"{' / '.join(mib(v) for _, v in sorted(m['worker_peak_rss_bytes'].items()))} MiB" if m["completed"]
                   else f"did not complete: {m['error']}")
        lines += [f"q{m['query']} (single-process peak {mib(m['single_peak_rss_bytes'])} MiB) on workers with memory_limit = "
                  f"{mib(m['memory_limit'])} MiB each: {outcome}", ""]
    for scale, p in results.get("peers", {}).items():
        rows = results["pdsh"][scale]
        cluster = sum(r["cluster_s"] for r in rows)
        lines.append(f"Against what users run instead, TPC-H SF-{scale}, same files and cores (polars-node: the cluster above):")
        header, sep = "| query | polars-node (s) |", "|---|---|"
        columns = []
        for system, target in (("duckdb", "target: polars-node within 1.5x"), ("spark", "target: polars-node >= 5x faster")):
            if not p.get(system):
                continue
            total = sum(q["seconds"] for q in p[system]["queries"])
            mismatches = [q["query"] for q, r in zip(p[system]["queries"], rows) if q["rows"] != r["rows"]]
            extra = f", start-up {p[system]['startup_s']:.1f} s not counted" if "startup_s" in p[system] else ""
            lines.append(f"- {system} {p[system]['version']}: total {total:.2f} s; polars-node {cluster:.2f} s is "
                         f"{total / cluster:.2f}x faster ({target}){extra}; row counts "
                         + ("equal to the PDS-H results on every query" if not mismatches else f"DIFFER on q{mismatches}"))
            header, sep = header + f" {system} (s) |", sep + "---|"
            columns.append(p[system]["queries"])
        lines += ["", header, sep]
        lines += [f"| q{r['query']} | {r['cluster_s']:.3f} |" + "".join(f" {c[i]['seconds']:.3f} |" for c in columns)
                  for i, r in enumerate(rows)]
        lines.append("")
    if (b := results.get("breakdown")):
        lines += [f"Where the time of distributed queries goes, PDS-H SF-{b['scale']}, from their spans (bench/breakdown.py; best of 3 "
                  "by total; the engine includes the hand-over to the execution process; target: <= 3 ms per stage beyond "
                  "engine and data movement):", "",
                  "| query | total (ms) | stages | tasks | planning | engine | data movement | task calls | scheduler | per stage |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| q{r['query']} | {r['total_ms']:.1f} | {r['stages']} | {r['tasks']} | {r['planning_ms']:.1f} | {r['engine_ms']:.1f} | "
                  f"{r['data_movement_ms']:.1f} | {r['task_calls_ms']:.1f} | {r['scheduler_between_stages_ms']:.1f} | "
                  f"{r['per_stage_boundary_ms']:.1f} |" for r in b["queries"]]
        lines.append("")
    if (s := results.get("shuffle")):
        lines.append(f"Shuffle fetch {s['shuffle_MBps']:.0f} MB/s vs raw loopback TCP {s['tcp_MBps']:.0f} MB/s: {100 * s['ratio']:.0f}%")
    if (r := results.get("round_trip")):
        lines.append(f"Trivial execute() round trip over {r['trips']} runs: p50 {r['p50_ms']:.1f} ms (target <= 3), "
                     f"p99 {r['p99_ms']:.1f} ms (target <= 10)")
    if (m := results.get("scheduler_load")):
        lines.append(
            f"Scheduler with {m['workers']} simulated workers heartbeating every second ({m['alive_at_end']} alive at the end, "
            f"{m['heartbeats_per_s']:.0f} heartbeats/s, {m['registered_again_while_measured']} registered again while measured): "
            f"CPU {100 * m['scheduler_cpu_of_one_core']:.1f}% of one core (target < 10%), RSS {m['scheduler_rss_mib']:.0f} MiB "
            f"(target < 200 MB), registering them took {m['registration_s']:.1f} s"
        )
    if (d := results.get("dispatch")):
        for name, what in [("cold", "the first query, connecting to the workers"), ("warm", "the next one, on those connections")]:
            t = d[name]
            lines.append(f"Planning and dispatching a stage of {t['tasks']} tasks on {t['workers_reached']} of {d['workers']} simulated "
                         f"workers, {what}: {t['plan_and_dispatch_ms']:.0f} ms from execute() to the last task's arrival "
                         f"(target < 100 ms): submission and planning until the first task {t['until_first_task_ms']:.0f} ms, "
                         f"then {t['dispatch_spread_ms']:.0f} ms until the last")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.environ.get("POLARS_NODE_BIN", str(Path.home() / ".cache/polars-node/target-release/release/polars-node")))
    ap.add_argument("--scales", nargs="*", default=["1", "10"], help="PDS-H scale factors (none: skip PDS-H)")
    ap.add_argument("--scale-out", nargs="*", default=["10"], help="scales of the one-core-per-worker mode (none: skip)")
    ap.add_argument("--peers", nargs="*", default=["duckdb", "spark"], help="systems run on the --scales data (none: skip)")
    ap.add_argument("--spark-memory", default="12g", help="Spark driver memory (local mode: the one JVM)")
    ap.add_argument("--breakdown-queries", nargs="*", type=int, default=[2, 11, 16, 22],
                    help="queries whose time is broken down from their spans, at the first of --scales (none: skip)")
    ap.add_argument("--queries", nargs="*", type=int, default=list(pdsh.QUERIES), help="PDS-H query numbers (default: all 22)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--trips", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--worker-threads", type=int, help="POLARS_MAX_THREADS of each worker's engine (worker.env_vars)")
    ap.add_argument("--cache", default=str(Path.home() / ".cache/polars-node/bench"))
    ap.add_argument("--simulated-workers", type=int, default=10_000, help="membership load on one scheduler (0: skip)")
    ap.add_argument("--dispatch-workers", type=int, default=1_000, help="simulated workers of the dispatch timing (0: skip)")
    args = ap.parse_args()
    out = HERE / "results" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    mem = int(next(l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal"))) // 1024 // 1024
    cores = os.cpu_count()
    results = {"machine": f"{cores} cores ({cpu}), {mem} GiB RAM, {platform.platform()}", "pdsh": {},
               "worker_threads": args.worker_threads, "workers": args.workers}
    with tempfile.TemporaryDirectory(prefix="polars-node-bench-") as tmp:
        cluster = Cluster(args.bin, Path(tmp) / "overhead", args.workers, args.worker_threads)
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
        if args.breakdown_queries and args.scales:
            print(f"time breakdown, PDS-H SF-{args.scales[0]}", flush=True)
            results["breakdown"] = {"scale": args.scales[0], "queries": time_breakdown(
                args.bin, Path(tmp) / "breakdown", generate(args.scales[0], Path(args.cache)), args.breakdown_queries, args.workers)}
        for scale in args.scale_out:
            print(f"scale-out PDS-H SF-{scale}: {args.workers} workers of one core each", flush=True)
            data = generate(scale, Path(args.cache))
            rows = scale_out(args.bin, Path(tmp) / f"scale-out-sf{scale}", data, args.repeat, args.queries, args.workers)
            results.setdefault("scale_out", {})[scale] = rows
            if scale == args.scale_out[-1]:
                results["memory_limited"] = memory_limited(args.bin, Path(tmp) / "memory-limited", data, rows, args.workers)
    for scale in args.scales if args.peers else []:
        data = generate(scale, Path(args.cache))
        p = results.setdefault("peers", {}).setdefault(scale, {})
        if "duckdb" in args.peers:
            print(f"DuckDB, TPC-H SF-{scale}", flush=True)
            p["duckdb"] = peers.duckdb_tpch(data, args.queries, args.repeat, cores)
        if "spark" in args.peers:
            print(f"Spark local[{cores}], TPC-H SF-{scale}", flush=True)
            p["spark"] = peers.spark_tpch(data, args.queries, args.repeat, cores, args.spark_memory)
    # Before the heartbeat load: tearing down its 10,000 connections keeps the kernel busy
    # for a while after it ends.
    if args.dispatch_workers:
        print(f"planning and dispatching a stage on {args.dispatch_workers} simulated workers", flush=True)
        results["dispatch"] = dispatch.time_dispatch(args.bin, Path(args.cache), args.dispatch_workers)
    if args.simulated_workers:
        print(f"scheduler with {args.simulated_workers} simulated workers", flush=True)
        out_load = subprocess.run([args.bin, "bench-scheduler", "--workers", str(args.simulated_workers), "--seconds", "20"],
                                  capture_output=True, text=True, check=True)
        results["scheduler_load"] = json.loads(out_load.stdout.strip().splitlines()[-1])
    (out / "results.json").write_text(json.dumps(results, indent=2))
    text = report(results)
    (out / "report.md").write_text(text + "\n")
    try:
        plot(results, out)
    except ImportError:
        print("(matplotlib is not installed: no plot)")
    print(text)
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
