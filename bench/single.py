"""One PDS-H query in single-process Polars, in a process of its own so that its peak memory
(sampled by bench/memory.py) is the query's: bench/run.py starts it pinned to one core with
POLARS_MAX_THREADS=1 (scale-out mode).

    python bench/single.py DATA_DIR QUERY REPEAT

Prints one JSON line: the best time of REPEAT runs and the row count.
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "python"))
import pdsh  # noqa: E402


def main():
    data, query, repeat = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    q = pdsh.QUERIES[query](pdsh.tables(data))
    best, rows = float("inf"), 0
    for _ in range(repeat):
        start = time.perf_counter()
        rows = q.collect().height
        best = min(best, time.perf_counter() - start)
    print(json.dumps({"seconds": best, "rows": rows}))


if __name__ == "__main__":
    main()
