"""Driver of test_ray.py, run with the Python that has `polars-cloud-ray` and `ray[default]`:
starts a cluster of `polars-node` through Polars' own Ray launcher with autoscaling on (one
worker, at most three), runs a query that needs three workers, waits for the extra workers to be
released, stops the cluster, and prints what it saw as JSON.

Usage: python ray_launcher.py SPEC_JSON (binary, ray address, ports, data and work dirs)."""

import json
import sys
import time

import polars as pl
import ray
from polars_cloud_ray import (
    PolarsEnterpriseLicenseConfig,
    PolarsObservatoryConfig,
    PolarsRayClusterConfig,
    PolarsScalingConfig,
    PolarsSchedulerConfig,
    PolarsWorkerConfig,
    RayClusterContext,
)
from polars_cloud_ray.actors.utils import list_actor_names
from polars_cloud_ray.config import LocalStorageConfig

spec = json.loads(sys.argv[1])
work = spec["work"]
config = PolarsRayClusterConfig(
    binary_path=spec["binary"],
    single_host_cluster=True,
    # Ray starts actors slowly on a loaded 2-core machine.
    worker_startup_timeout=180,
    actor_response_timeout=60,
    cluster_id=spec["cluster_id"],
    num_workers=1,
    min_workers=1,
    max_workers=3,
    # The binary accepts the launcher's license section and needs no license.
    license=PolarsEnterpriseLicenseConfig(license_path=f"{work}/license.json"),
    scheduler=PolarsSchedulerConfig(
        client_port=spec["client_port"],
        worker_registration_port=spec["worker_port"],
        observatory=PolarsObservatoryConfig(
            otlp_port=spec["otlp_port"], rest_port=spec["rest_port"], database_path=f"{work}/observatory.db"
        ),
        scaling=PolarsScalingConfig(enabled=True, port=spec["scaler_port"]),
        anonymous_result=LocalStorageConfig(path=f"{work}/results"),
    ),
    worker=PolarsWorkerConfig(
        task_port=spec["task_port"],
        shuffle_port=spec["shuffle_port"],
        heartbeat_period_secs=1,
        shuffle_data=LocalStorageConfig(path=f"{work}/shuffle"),
        temporary_data_dir=f"{work}/tmp",
    ),
)
# Keys the launcher does not render, for this test's cluster: its query table, and a short
# idle time before extra workers are released.
env = {
    "PC_CUBLET__scheduler__database_path": f"{work}/queries.db",
    # The test's tables are small: split them as large ones would be.
    "PC_CUBLET__scheduler__min_split_bytes": "0",
    "PC_CUBLET__scaling__idle_timeout": "5s",
}
ray.init(address=spec["ray_address"], namespace=config.cluster_id, runtime_env={"env_vars": env})
out: dict = {}
try:
    with RayClusterContext(config) as ctx:
        out["workers_at_start"] = sorted(list_actor_names(config.cluster_id, "worker"))
        q = pl.scan_parquet(f"{spec['data']}/*.parquet").group_by("k").agg(pl.col("v").sum(), pl.len()).sort("k")
        result = q.remote(ctx).distributed(min_workers=3).execute()
        out["rows_equal"] = result.lazy().collect().equals(q.collect())
        out["workers_used"] = max(s.num_workers_used for s in result.stage_statistics())
        out["workers_after_query"] = sorted(list_actor_names(config.cluster_id, "worker"))
        deadline = time.time() + 90
        while len(list_actor_names(config.cluster_id, "worker")) > 1 and time.time() < deadline:
            time.sleep(1)
        out["workers_after_idle"] = sorted(list_actor_names(config.cluster_id, "worker"))
        out["idle_wait_s"] = round(90 - (deadline - time.time()), 1)
        # The cluster still answers on the worker it kept.
        out["after_release_equal"] = q.remote(ctx).execute().lazy().collect().equals(q.collect())
    out["stopped"] = True
finally:
    print(json.dumps(out), flush=True)
    ray.shutdown()
