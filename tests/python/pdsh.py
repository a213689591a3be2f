"""The 22 PDS-H queries (TPC-H, written with the Polars API), over Parquet files.

`QUERIES[n](t)` builds query n from `t`, a function that returns the LazyFrame of a table
by name. The same builders run locally and on the cluster, so results can be compared.
"""

from datetime import date

import polars as pl


def q1(t):
    return (
        t("lineitem")
        .filter(pl.col("l_shipdate") <= date(1998, 9, 2))
        .group_by("l_returnflag", "l_linestatus")
        .agg(
            pl.sum("l_quantity").alias("sum_qty"),
            pl.sum("l_extendedprice").alias("sum_base_price"),
            (pl.col("l_extendedprice") * (1 - pl.col("l_discount"))).sum().alias("sum_disc_price"),
            (pl.col("l_extendedprice") * (1 - pl.col("l_discount")) * (1 + pl.col("l_tax"))).sum().alias("sum_charge"),
            pl.mean("l_quantity").alias("avg_qty"),
            pl.mean("l_extendedprice").alias("avg_price"),
            pl.mean("l_discount").alias("avg_disc"),
            pl.len().alias("count_order"),
        )
        .sort("l_returnflag", "l_linestatus")
    )


def q2(t):
    europe = (
        t("part")
        .join(t("partsupp"), left_on="p_partkey", right_on="ps_partkey")
        .join(t("supplier"), left_on="ps_suppkey", right_on="s_suppkey")
        .join(t("nation"), left_on="s_nationkey", right_on="n_nationkey")
        .join(t("region"), left_on="n_regionkey", right_on="r_regionkey")
        .filter(pl.col("p_size") == 15, pl.col("p_type").str.ends_with("BRASS"), pl.col("r_name") == "EUROPE")
    )
    cheapest = europe.group_by("p_partkey").agg(pl.min("ps_supplycost").alias("min_cost"))
    return (
        europe.join(cheapest, on="p_partkey")
        .filter(pl.col("ps_supplycost") == pl.col("min_cost"))
        .select("s_acctbal", "s_name", "n_name", "p_partkey", "p_mfgr", "s_address", "s_phone", "s_comment")
        .sort(["s_acctbal", "n_name", "s_name", "p_partkey"], descending=[True, False, False, False])
        .head(100)
    )


def q3(t):
    return (
        t("customer")
        .filter(pl.col("c_mktsegment") == "BUILDING")
        .join(t("orders"), left_on="c_custkey", right_on="o_custkey")
        .join(t("lineitem"), left_on="o_orderkey", right_on="l_orderkey")
        .filter(pl.col("o_orderdate") < date(1995, 3, 15), pl.col("l_shipdate") > date(1995, 3, 15))
        .with_columns((pl.col("l_extendedprice") * (1 - pl.col("l_discount"))).alias("revenue"))
        .group_by("o_orderkey", "o_orderdate", "o_shippriority")
        .agg(pl.sum("revenue"))
        .select(pl.col("o_orderkey").alias("l_orderkey"), "revenue", "o_orderdate", "o_shippriority")
        .sort(["revenue", "o_orderdate", "l_orderkey"], descending=[True, False, False])
        .head(10)
    )


def q4(t):
    late = t("lineitem").filter(pl.col("l_commitdate") < pl.col("l_receiptdate")).select("l_orderkey").unique()
    return (
        t("orders")
        .filter(pl.col("o_orderdate").is_between(date(1993, 7, 1), date(1993, 10, 1), closed="left"))
        .join(late, left_on="o_orderkey", right_on="l_orderkey", how="semi")
        .group_by("o_orderpriority")
        .agg(pl.len().alias("order_count"))
        .sort("o_orderpriority")
    )


def q5(t):
    return (
        t("region")
        .join(t("nation"), left_on="r_regionkey", right_on="n_regionkey")
        .join(t("customer"), left_on="n_nationkey", right_on="c_nationkey")
        .join(t("orders"), left_on="c_custkey", right_on="o_custkey")
        .join(t("lineitem"), left_on="o_orderkey", right_on="l_orderkey")
        .join(t("supplier"), left_on=["l_suppkey", "n_nationkey"], right_on=["s_suppkey", "s_nationkey"])
        .filter(pl.col("r_name") == "ASIA", pl.col("o_orderdate").is_between(date(1994, 1, 1), date(1995, 1, 1), closed="left"))
        .with_columns((pl.col("l_extendedprice") * (1 - pl.col("l_discount"))).alias("revenue"))
        .group_by("n_name")
        .agg(pl.sum("revenue"))
        .sort(["revenue", "n_name"], descending=[True, False])
    )


def q6(t):
    return (
        t("lineitem")
        .filter(
            pl.col("l_shipdate").is_between(date(1994, 1, 1), date(1995, 1, 1), closed="left"),
            pl.col("l_discount").is_between(0.05, 0.07),
            pl.col("l_quantity") < 24,
        )
        .select((pl.col("l_extendedprice") * pl.col("l_discount")).sum().alias("revenue"))
    )


def q7(t):
    nation = t("nation")
    pairs = (
        t("supplier")
        .join(nation.select(pl.col("n_nationkey"), pl.col("n_name").alias("supp_nation")), left_on="s_nationkey", right_on="n_nationkey")
        .join(t("lineitem"), left_on="s_suppkey", right_on="l_suppkey")
        .join(t("orders"), left_on="l_orderkey", right_on="o_orderkey")
        .join(t("customer"), left_on="o_custkey", right_on="c_custkey")
        .join(nation.select(pl.col("n_nationkey"), pl.col("n_name").alias("cust_nation")), left_on="c_nationkey", right_on="n_nationkey")
    )
    return (
        pairs.filter(
            ((pl.col("supp_nation") == "FRANCE") & (pl.col("cust_nation") == "GERMANY"))
            | ((pl.col("supp_nation") == "GERMANY") & (pl.col("cust_nation") == "FRANCE")),
            pl.col("l_shipdate").is_between(date(1995, 1, 1), date(1996, 12, 31)),
        )
        .with_columns(
            pl.col("l_shipdate").dt.year().alias("l_year"),
            (pl.col("l_extendedprice") * (1 - pl.col("l_discount"))).alias("volume"),
        )
        .group_by("supp_nation", "cust_nation", "l_year")
        .agg(pl.sum("volume").alias("revenue"))
        .sort("supp_nation", "cust_nation", "l_year")
    )


def q8(t):
    nation = t("nation")
    return (
        t("part")
        .filter(pl.col("p_type") == "ECONOMY ANODIZED STEEL")
        .join(t("lineitem"), left_on="p_partkey", right_on="l_partkey")
        .join(t("supplier"), left_on="l_suppkey", right_on="s_suppkey")
        .join(t("orders"), left_on="l_orderkey", right_on="o_orderkey")
        .join(t("customer"), left_on="o_custkey", right_on="c_custkey")
        .join(nation.select("n_nationkey", "n_regionkey"), left_on="c_nationkey", right_on="n_nationkey")
        .join(t("region"), left_on="n_regionkey", right_on="r_regionkey")
        .join(nation.select(pl.col("n_nationkey"), pl.col("n_name").alias("supp_nation")), left_on="s_nationkey", right_on="n_nationkey")
        .filter(pl.col("r_name") == "AMERICA", pl.col("o_orderdate").is_between(date(1995, 1, 1), date(1996, 12, 31)))
        .with_columns(
            pl.col("o_orderdate").dt.year().alias("o_year"),
            (pl.col("l_extendedprice") * (1 - pl.col("l_discount"))).cast(pl.Float64).alias("volume"),
        )
        .with_columns(pl.when(pl.col("supp_nation") == "BRAZIL").then(pl.col("volume")).otherwise(0.0).alias("brazil_volume"))
        .group_by("o_year")
        .agg((pl.sum("brazil_volume") / pl.sum("volume")).round(2).alias("mkt_share"))
        .sort("o_year")
    )


def q9(t):
    return (
        t("part")
        .filter(pl.col("p_name").str.contains("green"))
        .join(t("partsupp"), left_on="p_partkey", right_on="ps_partkey")
        .join(t("supplier"), left_on="ps_suppkey", right_on="s_suppkey")
        .join(t("lineitem"), left_on=["p_partkey", "ps_suppkey"], right_on=["l_partkey", "l_suppkey"])
        .join(t("orders"), left_on="l_orderkey", right_on="o_orderkey")
        .join(t("nation"), left_on="s_nationkey", right_on="n_nationkey")
        .with_columns(
            pl.col("n_name").alias("nation"),
            pl.col("o_orderdate").dt.year().alias("o_year"),
            (pl.col("l_extendedprice") * (1 - pl.col("l_discount")) - pl.col("ps_supplycost") * pl.col("l_quantity")).alias("amount"),
        )
        .group_by("nation", "o_year")
        .agg(pl.sum("amount").alias("sum_profit"))
        .sort(["nation", "o_year"], descending=[False, True])
    )


def q10(t):
    return (
        t("customer")
        .join(t("orders"), left_on="c_custkey", right_on="o_custkey")
        .join(t("lineitem"), left_on="o_orderkey", right_on="l_orderkey")
        .join(t("nation"), left_on="c_nationkey", right_on="n_nationkey")
        .filter(pl.col("o_orderdate").is_between(date(1993, 10, 1), date(1994, 1, 1), closed="left"), pl.col("l_returnflag") == "R")
        .group_by("c_custkey", "c_name", "c_acctbal", "c_phone", "n_name", "c_address", "c_comment")
        .agg((pl.col("l_extendedprice") * (1 - pl.col("l_discount"))).sum().alias("revenue"))
        .select("c_custkey", "c_name", "revenue", "c_acctbal", "n_name", "c_address", "c_phone", "c_comment")
        .sort(["revenue", "c_custkey"], descending=[True, False])
        .head(20)
    )


def q11(t):
    german = (
        t("partsupp")
        .join(t("supplier"), left_on="ps_suppkey", right_on="s_suppkey")
        .join(t("nation"), left_on="s_nationkey", right_on="n_nationkey")
        .filter(pl.col("n_name") == "GERMANY")
        .with_columns((pl.col("ps_supplycost") * pl.col("ps_availqty")).alias("value"))
    )
    threshold = german.select((pl.sum("value") * 0.0001).alias("threshold"))
    return (
        german.group_by("ps_partkey")
        .agg(pl.sum("value"))
        .join(threshold, how="cross")
        .filter(pl.col("value") > pl.col("threshold"))
        .select("ps_partkey", "value")
        .sort(["value", "ps_partkey"], descending=[True, False])
    )


def q12(t):
    return (
        t("orders")
        .join(t("lineitem"), left_on="o_orderkey", right_on="l_orderkey")
        .filter(
            pl.col("l_shipmode").is_in(["MAIL", "SHIP"]),
            pl.col("l_commitdate") < pl.col("l_receiptdate"),
            pl.col("l_shipdate") < pl.col("l_commitdate"),
            pl.col("l_receiptdate").is_between(date(1994, 1, 1), date(1995, 1, 1), closed="left"),
        )
        .with_columns(
            pl.col("o_orderpriority").is_in(["1-URGENT", "2-HIGH"]).cast(pl.Int64).alias("high"),
            (~pl.col("o_orderpriority").is_in(["1-URGENT", "2-HIGH"])).cast(pl.Int64).alias("low"),
        )
        .group_by("l_shipmode")
        .agg(pl.sum("high").alias("high_line_count"), pl.sum("low").alias("low_line_count"))
        .sort("l_shipmode")
    )


def q13(t):
    orders = t("orders").filter(~pl.col("o_comment").str.contains("special.*requests"))
    return (
        t("customer")
        .join(orders, left_on="c_custkey", right_on="o_custkey", how="left")
        .group_by("c_custkey")
        .agg(pl.col("o_orderkey").count().alias("c_count"))
        .group_by("c_count")
        .agg(pl.len().alias("custdist"))
        .sort(["custdist", "c_count"], descending=[True, True])
    )


def q14(t):
    return (
        t("lineitem")
        .join(t("part"), left_on="l_partkey", right_on="p_partkey")
        .filter(pl.col("l_shipdate").is_between(date(1995, 9, 1), date(1995, 10, 1), closed="left"))
        .with_columns((pl.col("l_extendedprice") * (1 - pl.col("l_discount"))).cast(pl.Float64).alias("volume"))
        .select(
            (100.0 * pl.when(pl.col("p_type").str.starts_with("PROMO")).then(pl.col("volume")).otherwise(0.0).sum() / pl.sum("volume"))
            .round(2)
            .alias("promo_revenue")
        )
    )


def q15(t):
    revenue = (
        t("lineitem")
        .filter(pl.col("l_shipdate").is_between(date(1996, 1, 1), date(1996, 4, 1), closed="left"))
        .group_by("l_suppkey")
        .agg((pl.col("l_extendedprice") * (1 - pl.col("l_discount"))).sum().alias("total_revenue"))
        .select(pl.col("l_suppkey").alias("supplier_no"), "total_revenue")
    )
    return (
        t("supplier")
        .join(revenue, left_on="s_suppkey", right_on="supplier_no")
        .filter(pl.col("total_revenue") == pl.col("total_revenue").max())
        .select("s_suppkey", "s_name", "s_address", "s_phone", "total_revenue")
        .sort("s_suppkey")
    )


def q16(t):
    complainers = t("supplier").filter(pl.col("s_comment").str.contains(".*Customer.*Complaints.*")).select(pl.col("s_suppkey"))
    return (
        t("part")
        .join(t("partsupp"), left_on="p_partkey", right_on="ps_partkey")
        .filter(
            pl.col("p_brand") != "Brand#45",
            ~pl.col("p_type").str.starts_with("MEDIUM POLISHED"),
            pl.col("p_size").is_in([49, 14, 23, 45, 19, 3, 36, 9]),
        )
        .join(complainers, left_on="ps_suppkey", right_on="s_suppkey", how="anti")
        .group_by("p_brand", "p_type", "p_size")
        .agg(pl.col("ps_suppkey").n_unique().alias("supplier_cnt"))
        .sort(["supplier_cnt", "p_brand", "p_type", "p_size"], descending=[True, False, False, False])
    )


def q17(t):
    parts = t("part").filter(pl.col("p_brand") == "Brand#23", pl.col("p_container") == "MED BOX")
    items = parts.join(t("lineitem"), left_on="p_partkey", right_on="l_partkey")
    avg = items.group_by("p_partkey").agg((0.2 * pl.col("l_quantity").cast(pl.Float64).mean()).alias("avg_quantity"))
    return (
        items.join(avg, on="p_partkey")
        .filter(pl.col("l_quantity").cast(pl.Float64) < pl.col("avg_quantity"))
        .select((pl.col("l_extendedprice").cast(pl.Float64).sum() / 7.0).round(2).alias("avg_yearly"))
    )


def q18(t):
    big = t("lineitem").group_by("l_orderkey").agg(pl.sum("l_quantity").alias("sum_quantity")).filter(pl.col("sum_quantity") > 300)
    return (
        t("orders")
        .join(big, left_on="o_orderkey", right_on="l_orderkey", how="semi")
        .join(t("lineitem"), left_on="o_orderkey", right_on="l_orderkey")
        .join(t("customer"), left_on="o_custkey", right_on="c_custkey")
        .group_by("c_name", "o_custkey", "o_orderkey", "o_orderdate", "o_totalprice")
        .agg(pl.sum("l_quantity").alias("col6"))
        .select(
            "c_name", pl.col("o_custkey").alias("c_custkey"), "o_orderkey", pl.col("o_orderdate").alias("o_orderdat"), "o_totalprice", "col6"
        )
        .sort(["o_totalprice", "o_orderdat", "o_orderkey"], descending=[True, False, False])
        .head(100)
    )


def q19(t):
    return (
        t("part")
        .join(t("lineitem"), left_on="p_partkey", right_on="l_partkey")
        .filter(pl.col("l_shipmode").is_in(["AIR", "AIR REG"]), pl.col("l_shipinstruct") == "DELIVER IN PERSON")
        .filter(
            (
                (pl.col("p_brand") == "Brand#12")
                & pl.col("p_container").is_in(["SM CASE", "SM BOX", "SM PACK", "SM PKG"])
                & pl.col("l_quantity").is_between(1, 11)
                & pl.col("p_size").is_between(1, 5)
            )
            | (
                (pl.col("p_brand") == "Brand#23")
                & pl.col("p_container").is_in(["MED BAG", "MED BOX", "MED PKG", "MED PACK"])
                & pl.col("l_quantity").is_between(10, 20)
                & pl.col("p_size").is_between(1, 10)
            )
            | (
                (pl.col("p_brand") == "Brand#34")
                & pl.col("p_container").is_in(["LG CASE", "LG BOX", "LG PACK", "LG PKG"])
                & pl.col("l_quantity").is_between(20, 30)
                & pl.col("p_size").is_between(1, 15)
            )
        )
        .select((pl.col("l_extendedprice") * (1 - pl.col("l_discount"))).sum().alias("revenue"))
    )


def q20(t):
    shipped = (
        t("lineitem")
        .filter(pl.col("l_shipdate").is_between(date(1994, 1, 1), date(1995, 1, 1), closed="left"))
        .group_by("l_partkey", "l_suppkey")
        .agg((0.5 * pl.col("l_quantity").cast(pl.Float64).sum()).alias("sum_quantity"))
    )
    forest = t("part").filter(pl.col("p_name").str.starts_with("forest")).select("p_partkey")
    candidates = (
        t("partsupp")
        .join(forest, left_on="ps_partkey", right_on="p_partkey", how="semi")
        .join(shipped, left_on=["ps_partkey", "ps_suppkey"], right_on=["l_partkey", "l_suppkey"])
        .filter(pl.col("ps_availqty").cast(pl.Float64) > pl.col("sum_quantity"))
        .select(pl.col("ps_suppkey"))
    )
    return (
        t("supplier")
        .join(t("nation"), left_on="s_nationkey", right_on="n_nationkey")
        .filter(pl.col("n_name") == "CANADA")
        .join(candidates, left_on="s_suppkey", right_on="ps_suppkey", how="semi")
        .select("s_name", "s_address")
        .sort("s_name")
    )


def q21(t):
    lineitem = t("lineitem")
    multi_supplier = lineitem.group_by("l_orderkey").agg(pl.col("l_suppkey").n_unique().alias("n_supp")).filter(pl.col("n_supp") > 1)
    late = lineitem.filter(pl.col("l_receiptdate") > pl.col("l_commitdate"))
    late_suppliers = late.group_by("l_orderkey").agg(pl.col("l_suppkey").n_unique().alias("n_late")).filter(pl.col("n_late") == 1)
    return (
        late.join(multi_supplier, on="l_orderkey", how="semi")
        .join(late_suppliers, on="l_orderkey", how="semi")
        .join(t("orders").filter(pl.col("o_orderstatus") == "F"), left_on="l_orderkey", right_on="o_orderkey")
        .join(t("supplier"), left_on="l_suppkey", right_on="s_suppkey")
        .join(t("nation").filter(pl.col("n_name") == "SAUDI ARABIA"), left_on="s_nationkey", right_on="n_nationkey")
        .group_by("s_name")
        .agg(pl.len().alias("numwait"))
        .sort(["numwait", "s_name"], descending=[True, False])
        .head(100)
    )


def q22(t):
    customers = (
        t("customer")
        .with_columns(pl.col("c_phone").str.slice(0, 2).alias("cntrycode"))
        .filter(pl.col("cntrycode").is_in(["13", "31", "23", "29", "30", "18", "17"]))
    )
    average = customers.filter(pl.col("c_acctbal") > 0).select(pl.col("c_acctbal").cast(pl.Float64).mean().alias("avg_acctbal"))
    return (
        customers.join(t("orders"), left_on="c_custkey", right_on="o_custkey", how="anti")
        .join(average, how="cross")
        .filter(pl.col("c_acctbal").cast(pl.Float64) > pl.col("avg_acctbal"))
        .group_by("cntrycode")
        .agg(pl.len().alias("numcust"), pl.sum("c_acctbal").alias("totacctbal"))
        .sort("cntrycode")
    )


QUERIES = {i: globals()[f"q{i}"] for i in range(1, 23)}

TABLES = ["customer", "lineitem", "nation", "orders", "part", "partsupp", "region", "supplier"]


def tables(directory):
    """A table lookup over `<directory>/<table>.parquet` (or a directory of parts)."""
    from pathlib import Path

    def scan(name):
        path = Path(directory) / f"{name}.parquet"
        if not path.exists():
            path = Path(directory) / name / "*.parquet"
        return pl.scan_parquet(str(path))

    return scan
