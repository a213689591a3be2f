"""Every expression the official client can serialize runs on the cluster with local Polars'
result. The list is generated from py-polars 2.0.0 itself: every public method of `pl.Expr` and
of its namespaces (`str`, `list`, `arr`, `dt`, `struct`, `bin`, `cat`, `name`), called with the
first of a few argument sets that local Polars accepts on a frame of matching columns. A
feature missing from the engine's build fails here by name ("unknown variant ...")."""

import warnings
from datetime import datetime

import polars as pl
import pytest
from polars.testing import assert_frame_equal

FRAME = pl.DataFrame(
    {
        "x": [3, 1, 2, None, 5],
        "f": [1.5, -2.0, None, 0.25, 3.0],
        "s": ["Hello world", "ab", None, "éclair", "x,y"],
        "l": [[1, 2], [3], None, [], [2, 2, 4]],
        "a": pl.Series([[1, 2], [3, 4], None, [5, 6], [0, 1]], dtype=pl.Array(pl.Int64, 2)),
        "d": [datetime(2024, 1, 1, 12), datetime(2023, 5, 6), None, datetime(2020, 2, 29, 1, 2, 3), datetime(2024, 12, 31)],
        "st": [{"p": 1, "q": "a"}, {"p": 2, "q": "b"}, None, {"p": 4, "q": None}, {"p": 5, "q": "e"}],
        "b": [b"ab", b"\x00", None, b"", b"xyz"],
        "c": pl.Series(["u", "v", None, "u", "w"], dtype=pl.Categorical),
    }
)
NAMESPACES = {None: ["x", "f"], "str": ["s"], "list": ["l"], "arr": ["a"], "dt": ["d"], "struct": ["st"], "bin": ["b"], "cat": ["c"], "name": ["x"]}
ARGUMENTS = [(), (2,), ("l",), (pl.col("x"),), (1, 2), ("1h",), ("%Y",), (pl.Int64,), ("a", "b")]
# Python functions (not expressions), and methods that return no expression.
SKIPPED = {"map_elements", "map_batches", "pipe", "inspect", "deserialize", "from_json", "meta", "plugin", "register_plugin"}
# Random by design: a cluster and a local run draw other rows.
RANDOM = {"sample", "shuffle"}
# Defined up to row order (top_k_by/bottom_k_by here sort by a literal: every row ties).
UNORDERED = {"unique", "mode", "value_counts", "unique_counts", "agg_groups", "top_k_by", "bottom_k_by"}
# A Categorical's codes are given out per process, in the order it meets the categories: only
# which rows share a code is defined.
PROCESS_CODES = {"cat.physical", "cat.to_physical"}
# (method, argument-free label) -> message of the error the cluster gives, where Polars or the
# client is the limit: py-polars implements these name functions with a Python callback (see
# README, Python functions), and Parquet (stored results) has no struct without fields.
LIMITS = {
    "name.strip_prefix": "Python",
    "name.strip_suffix": "Python",
    "str.extract_groups": "struct type with no child field to Parquet",
    "struct.eval": "struct type with no child field to Parquet",
}


def expressions():
    warnings.filterwarnings("ignore")
    found = {}
    for namespace, columns in NAMESPACES.items():
        for column in columns:
            target = getattr(pl.col(column), namespace) if namespace else pl.col(column)
            for name in dir(target):
                method = getattr(target, name, None)
                if name.startswith("_") or name in SKIPPED or name in RANDOM or not callable(method):
                    continue
                for args in ARGUMENTS:
                    try:
                        expr = method(*args)
                        if not isinstance(expr, pl.Expr):
                            break
                        if namespace != "name":
                            expr = expr.alias("out")
                        expected = FRAME.lazy().select(expr).collect()
                    except Exception:
                        continue
                    label = f"{namespace or 'expr'}.{name}"
                    found[f"{label}{args!r}:{column}"] = (label, expr, expected)
                    break
    return found


EXPRESSIONS = expressions()


def test_the_generated_list_covers_every_namespace():
    labels = {key.split(".")[0] for key in EXPRESSIONS}
    assert labels == {"expr", "str", "list", "arr", "dt", "struct", "bin", "cat", "name"}, labels
    assert len(EXPRESSIONS) > 400, len(EXPRESSIONS)


@pytest.mark.parametrize("key", list(EXPRESSIONS))
def test_expression_runs_as_locally(key, ctx):
    label, expr, expected = EXPRESSIONS[key]
    run = lambda: FRAME.lazy().select(expr).remote(ctx).single_node().execute().lazy().collect()  # noqa: E731
    if label in LIMITS:
        with pytest.raises(Exception, match=LIMITS[label]):
            run()
        return
    got = run()
    if label in PROCESS_CODES:
        assert got.schema == expected.schema
        codes, want = got.to_series().to_list(), expected.to_series().to_list()
        assert [[a == b for b in codes] for a in codes] == [[a == b for b in want] for a in want], (codes, want)
        assert [c is None for c in codes] == [c is None for c in want]
    elif label.split(".")[-1] in UNORDERED:
        assert got.schema == expected.schema
        assert sorted(map(repr, got.to_series().to_list())) == sorted(map(repr, expected.to_series().to_list()))
    else:
        assert_frame_equal(got, expected)
