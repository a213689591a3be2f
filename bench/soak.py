"""Soak harness (prints figures; not a pass/fail test, though it exits 1 when a query failed or
differed): N concurrent clients submit a mix of small queries and PDS-H SF-0.1 queries to a
loopback cluster (a scheduler and three workers) for a fixed time, with the official client's
defaults (`remote(ctx).distributed().execute()`, n_retries=0), while a chaos loop SIGKILLs a
random worker every few seconds and starts it again. Every result is compared with local
Polars 2.0.0.

    POLARS_NODE_BIN=target/debug/polars-node python bench/soak.py [--clients 16] [--seconds 300]

Prints queries run, failed (must be 0), differing (must be 0), the kills, and the scheduler's
RSS and open descriptors at the start and at the end.
"""

import argparse
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import polars as pl
import polars_cloud as pc
from polars.testing import assert_frame_equal

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "python"))
import pdsh  # noqa: E402
from conftest import Cluster  # noqa: E402

WORKERS = {"soak-1": "127.0.0.61", "soak-2": "127.0.0.62", "soak-3": "127.0.0.63"}
PDSH = [1, 3, 5, 6, 10, 12, 18]


def small_queries() -> dict[str, pl.LazyFrame]:
    df = pl.DataFrame({"k": [i % 17 for i in range(50_000)], "v": [float(i) * 0.5 for i in range(50_000)]})
    lf = df.lazy()
    return {
        "small group_by": lf.group_by("k").agg(pl.col("v").sum(), pl.len()).sort("k"),
        "small filter": lf.filter(pl.col("v") > 1000).select(pl.col("v").mean(), pl.col("k").n_unique()),
        "small sort head": lf.sort("v", descending=True).head(20),
    }


def process_figures(pid: int) -> tuple[int, int]:
    """(RSS in KiB, open file descriptors) of a process."""
    rss = next(int(line.split()[1]) for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def generate(cache: Path) -> Path:
    d = cache / "tpch-sf0.1-soak"
    if (d / "done").exists():
        return d
    gen = str(Path(sys.executable).parent / "tpchgen-cli")
    d.mkdir(parents=True, exist_ok=True)
    others = "region,nation,supplier,customer,part,partsupp,orders"
    subprocess.run([gen, "parquet", "-s", "0.1", f"--tables={others}", f"--output-dir={d}"], check=True)
    subprocess.run([gen, "parquet", "-s", "0.1", "--tables=lineitem", "--parts=4", f"--output-dir={d}"], check=True)
    (d / "done").write_text("ok")
    return d


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--chaos-every", type=float, default=5.0, help="seconds between worker kills")
    parser.add_argument("--down-for", type=float, default=2.0, help="seconds a killed worker stays down")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    cache = Path(os.environ.get("POLARS_NODE_CACHE", Path.home() / ".cache" / "polars-node"))
    tables = pdsh.tables(generate(cache))
    queries = {f"PDS-H q{n}": pdsh.QUERIES[n](tables) for n in PDSH} | small_queries()
    expected = {name: lf.collect() for name, lf in queries.items()}
    print(f"{len(queries)} queries, expected results computed locally", flush=True)

    root = Path(tempfile.mkdtemp(prefix="polars-node-soak-"))
    cluster = Cluster(root)
    cluster.start_scheduler()
    for name, ip in WORKERS.items():
        cluster.start_worker(name, ip)
    cluster.wait_for_workers(list(WORKERS))
    scheduler = cluster.procs["scheduler"].pid
    lock = threading.Lock()
    counts = {"run": 0, "failed": 0, "differed": 0}
    per_query: dict[str, int] = {}
    problems: list[str] = []
    deadline = time.time() + args.seconds
    kills: list[str] = []

    def client(i: int) -> None:
        rng = random.Random(args.seed * 1000 + i)
        ctx = pc.ClusterContext(uri=cluster.uri)
        while time.time() < deadline:
            name = rng.choice(list(queries))
            try:
                result = queries[name].remote(ctx).distributed().execute()
                got = result.lazy().collect()
                result.delete()
            except Exception as e:  # noqa: BLE001 (every failure is counted and shown)
                with lock:
                    counts["run"] += 1
                    counts["failed"] += 1
                    problems.append(f"{name}: failed: {type(e).__name__}: {e}"[:600])
                continue
            differs = None
            try:
                assert_frame_equal(got, expected[name], check_exact=False, rel_tol=1e-9, abs_tol=1e-9)
            except AssertionError as e:
                differs = str(e)
            with lock:
                counts["run"] += 1
                per_query[name] = per_query.get(name, 0) + 1
                if differs:
                    counts["differed"] += 1
                    problems.append(f"{name}: differs: {differs}"[:600])

    def chaos() -> None:
        rng = random.Random(args.seed)
        while time.time() + args.chaos_every < deadline:
            time.sleep(args.chaos_every)
            victim = rng.choice(list(WORKERS))
            cluster.procs[victim].kill()
            cluster.procs[victim].wait()
            kills.append(victim)
            time.sleep(args.down_for)
            cluster.start(victim, (root / f"{victim}.toml").read_text())

    # A few queries first, so that the starting figures are those of a warm scheduler.
    warm = pc.ClusterContext(uri=cluster.uri)
    for lf in list(queries.values())[:3]:
        lf.remote(warm).distributed().execute().delete()
    start_rss, start_fds = process_figures(scheduler)
    started = time.time()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    threads.append(threading.Thread(target=chaos))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.time() - started
    time.sleep(2)  # the last queries' cleanup
    end_rss, end_fds = process_figures(scheduler)
    cluster.stop()

    print(f"\nsoak: {args.clients} clients, {elapsed:.0f} s, a worker SIGKILLed every {args.chaos_every:g} s and restarted after {args.down_for:g} s")
    print(f"queries run       {counts['run']}")
    print(f"queries failed    {counts['failed']}")
    print(f"results differing {counts['differed']}")
    print(f"workers killed    {len(kills)} ({', '.join(f'{w} x{kills.count(w)}' for w in WORKERS)})")
    print(f"scheduler RSS     {start_rss / 1024:.1f} MiB at the start, {end_rss / 1024:.1f} MiB at the end")
    print(f"scheduler fds     {start_fds} at the start, {end_fds} at the end")
    print("per query         " + ", ".join(f"{n} {c}" for n, c in sorted(per_query.items())))
    for p in problems[:20]:
        print("  " + p.replace("\n", " "))
    print(f"logs in {root}")
    return 1 if counts["failed"] or counts["differed"] else 0


if __name__ == "__main__":
    sys.exit(main())
