"""Wiring: a run's actors and who owns them.

`Pipeline` (pipeline.py) starts and owns one run's actors and its samples partition; each
worker lives in a host actor of its role (hosts.py) that builds it complete; `init_ray`
(runtime.py) joins or starts Ray. Workers are plain classes (workers/) and never reference
the workflow: it wires them, and the recipe (asyncflow.recipes) drives the pipeline.
"""

from asyncflow.workflow.hosts import NAMESPACE
from asyncflow.workflow.pipeline import Pipeline
from asyncflow.workflow.runtime import cpus_needed, init_ray

__all__ = ["NAMESPACE", "Pipeline", "cpus_needed", "init_ray"]
