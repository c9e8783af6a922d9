"""Generation across many GPUs and nodes on Ray Data, writing the same run a single process writes.

`cluster` reaches Ray (bounded waits, one-line errors); `generate` is the driver: keys, resume
filter, shard plan, the actor pool and the exactly-once check; `worker` is the actor, which
runs the single-process rendering loop of `pipeline` one shard at a time. Ray is imported
only when one of these runs, so the package imports without it.
"""

from magicseg_engine.distributed.cluster import connect, require_ray, shutdown
from magicseg_engine.distributed.generate import (
    RayOptions,
    RayProgress,
    RayRunError,
    RaySummary,
    generate_on_ray,
    plan_shards,
    size_pool,
)

__all__ = ["RayOptions", "RayProgress", "RayRunError", "RaySummary", "connect", "generate_on_ray",
           "plan_shards", "require_ray", "shutdown", "size_pool"]
