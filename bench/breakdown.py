"""Where a distributed query's time goes, from the spans the cluster sends its observatory
(`GET /api/v1/query/{id}`): the scheduler's `query`, `planning` and per-task `task` spans, and
the workers' `task.execute`, `shuffle.read` and `shuffle.write` spans of each task.

For each stage, its slowest task is its critical path: its execution on the worker, split into
data movement (shuffle reads and writes) and the rest (the engine, with the hand-over to the
execution process), plus the call around it (scheduler to worker and back). What remains of
the query's time (beyond planning and the stages' critical paths) is the scheduler's own work
between stages and around the query. A stage boundary's cost beyond its data movement is
everything but planning, the engine and data movement, divided by the number of stages.
"""

import json
import time
import urllib.request


def detail(rest: str, query_id: str, timeout: float = 30) -> dict:
    """The query's spans, once the scheduler's query span and every task's have arrived."""
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{rest}/api/v1/query/{query_id}", timeout=5) as r:
                d = json.load(r)
            names = [s["name"] for s in d["spans"]]
            if "query" in names and names.count("task") <= names.count("task.execute"):
                return d
        except OSError:
            pass
        if time.time() > deadline:
            raise TimeoutError(f"the spans of query {query_id} did not all arrive")
        time.sleep(0.2)


def ms(span) -> float:
    return (span["end_ns"] - span["start_ns"]) / 1e6


def breakdown(d: dict) -> dict:
    spans = d["spans"]

    def key(s):
        a = s["attributes"]
        return a.get("polars.stage"), a.get("polars.task")

    by_name = {}
    for s in spans:
        by_name.setdefault(s["name"], []).append(s)
    query = by_name["query"][0]
    planning = sum(ms(s) for s in by_name.get("planning", []))
    executes = {key(s): s for s in by_name.get("task.execute", [])}
    moved = {}
    for s in by_name.get("shuffle.read", []) + by_name.get("shuffle.write", []):
        moved[key(s)] = moved.get(key(s), 0.0) + ms(s)
    stages = {}
    for t in by_name.get("task", []):  # the scheduler's span of each task call
        if t["status_code"] == 2:
            continue
        k = key(t)
        e = executes.get(k)
        row = {"call_ms": ms(t), "execute_ms": ms(e) if e else 0.0, "data_ms": moved.get(k, 0.0)}
        stage = stages.setdefault(k[0], {"tasks": 0, "slowest": row})
        stage["tasks"] += 1
        if row["call_ms"] > stage["slowest"]["call_ms"]:
            stage["slowest"] = row
    total = ms(query)
    engine = sum(s["slowest"]["execute_ms"] - s["slowest"]["data_ms"] for s in stages.values())
    data = sum(s["slowest"]["data_ms"] for s in stages.values())
    calls = sum(s["slowest"]["call_ms"] - s["slowest"]["execute_ms"] for s in stages.values())
    scheduler = total - planning - sum(s["slowest"]["call_ms"] for s in stages.values())
    n = max(1, len(stages))
    return {
        "total_ms": total, "stages": len(stages), "tasks": sum(s["tasks"] for s in stages.values()),
        "planning_ms": planning, "engine_ms": engine, "data_movement_ms": data,
        "task_calls_ms": calls, "scheduler_between_stages_ms": scheduler,
        "per_stage_boundary_ms": (total - planning - engine - data) / n,
    }
