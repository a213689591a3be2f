"""What users run instead of a cluster, on the same Parquet files and the same cores: DuckDB (one
process) and Apache Spark in local mode, each on the 22 TPC-H queries as standard SQL text with
the validation parameters (`bench/tpch-sql/qN.sql`).

Each runner returns, per query, the best time of `repeat` runs and the row count (checked by
bench/run.py against the row counts of the PDS-H builders). Spark's start-up (JVM, session,
views) is timed on its own and not counted in the query times.
"""

import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TABLES = ["region", "nation", "supplier", "customer", "part", "partsupp", "orders", "lineitem"]


def sql(n: int) -> str:
    return (HERE / "tpch-sql" / f"q{n}.sql").read_text()


def table_glob(data: Path, name: str) -> str:
    """The table's one file, or its directory of parts (tpchgen-cli --parts)."""
    single = data / f"{name}.parquet"
    return str(single) if single.exists() else str(data / name / "*.parquet")


def best_of(repeat: int, run):
    best, rows = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        rows = run()
        best = min(best, time.perf_counter() - start)
    return best, rows


def duckdb_tpch(data: Path, queries: list[int], repeat: int, threads: int) -> dict:
    import duckdb

    con = duckdb.connect(config={"threads": threads})
    for name in TABLES:
        # Views, so every query reads the Parquet files as the other systems do.
        con.execute(f"create view {name} as select * from read_parquet('{table_glob(data, name)}')")
    rows = []
    for n in queries:
        text = sql(n)
        seconds, count = best_of(repeat, lambda: len(con.execute(text).fetchall()))
        rows.append({"query": n, "seconds": seconds, "rows": count})
        print(f"  q{n:<2} duckdb {seconds:8.3f} s  rows {count}", flush=True)
    con.close()
    return {"version": duckdb.__version__, "threads": threads, "queries": rows}


def spark_tpch(data: Path, queries: list[int], repeat: int, cores: int, memory: str) -> dict:
    import pyspark
    from pyspark.sql import SparkSession

    start = time.perf_counter()
    spark = (
        SparkSession.builder.master(f"local[{cores}]")
        .appName("polars-node-bench")
        .config("spark.driver.memory", memory)
        .config("spark.sql.adaptive.enabled", "true")
        .config("spark.sql.shuffle.partitions", str(max(2, 4 * cores)))
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    for name in TABLES:
        spark.read.parquet(table_glob(data, name)).createOrReplaceTempView(name)
    startup = time.perf_counter() - start
    rows = []
    try:
        for n in queries:
            text = sql(n)
            seconds, count = best_of(repeat, lambda: len(spark.sql(text).collect()))
            rows.append({"query": n, "seconds": seconds, "rows": count})
            print(f"  q{n:<2} spark  {seconds:8.3f} s  rows {count}", flush=True)
    finally:
        spark.stop()
    return {"version": pyspark.__version__, "cores": cores, "startup_s": startup, "queries": rows}
