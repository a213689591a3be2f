"""Writes the plan seeds of tests/fuzz.rs: plans as polars-cloud 0.12.0 (polars 2.0.0) submits
them, in the shapes the client sends (a stored result, a Flight result, a user's sink, scans of
local and object-store files, joins, group-bys, in-memory frames of several dtypes). Run with
the client's Python: `python fuzz/corpus/make_plans.py` (the files are checked in)."""

from datetime import date, datetime
from pathlib import Path

import polars as pl

out = Path(__file__).parent / "plans"
frame = pl.LazyFrame(
    {
        "i": [1, 2, None],
        "s": ["a", "bb", None],
        "f": [1.5, None, 3.0],
        "d": [date(2024, 1, 1), None, date(2024, 3, 1)],
        "t": [datetime(2024, 1, 1, 12), None, datetime(2024, 1, 2)],
        "l": [[1, 2], [], None],
        "b": [True, False, None],
    }
)
scan = pl.scan_parquet("/data/lineitem/*.parquet")
plans = {
    "in-memory": frame.filter(pl.col("i") > 1).select("s", "f").sink_parquet("<in-memory>", lazy=True),
    "flight": frame.with_columns(pl.col("l").list.len()).sink_ipc("<flight>", lazy=True),
    "user-sink": frame.sink_parquet("/tmp/out.parquet", lazy=True),
    "s3-scan": pl.scan_parquet("s3://bucket/data/*.parquet").head(5).sink_parquet("<in-memory>", lazy=True),
    "group-by": scan.group_by("l_returnflag")
    .agg(pl.col("l_quantity").sum(), pl.len())
    .sort("l_returnflag")
    .sink_parquet("<in-memory>", lazy=True),
    "join": scan.join(pl.scan_parquet("/data/orders/*.parquet"), left_on="l_orderkey", right_on="o_orderkey")
    .select(pl.col("o_totalprice").mean())
    .sink_parquet("<in-memory>", lazy=True),
    "csv-sink": pl.scan_csv("/data/in.csv").sink_csv("/data/out.csv", lazy=True),
}
for name, plan in plans.items():
    (out / f"{name}.plan").write_bytes(plan.serialize())
