"""What Ray reserves for each actor of a role: CPUs, GPUs, memory and custom resources.

The trainer (per rank), rollout, reward, reference and environment sections inherit these
fields; the pipeline passes them to Ray as each actor's options (and the trainer ranks'
placement group as its bundles), so an actor lands only on a node that has them free. A role
given GPUs runs its model on CUDA (`workers.policy.device_for`). `AsyncFlowConfig.roles` and
`resources_needed` count the actors and sum what they reserve.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import Field, field_validator

from asyncflow.config._base import Section

RESERVED = {"CPU", "GPU", "memory", "object_store_memory"}  # Ray's own: set by the fields


class RoleResources(Section):
    """What Ray reserves for each actor of a role (a section that runs actors inherits it)."""

    num_cpus: float = Field(1.0, gt=0, le=1024, description="Ray CPUs reserved per actor.")
    num_gpus: float = Field(
        0.0, ge=0, le=64, description="Ray GPUs reserved per actor (a fraction shares one GPU). Above 0 the "
        "role's model runs on the GPU Ray assigns (CUDA); the torch build must have CUDA.",
    )  # fmt: skip
    memory_gb: float = Field(
        0.0, ge=0, le=1 << 20, description="Memory Ray reserves per actor, in GiB (0: none): Ray places the "
        "actor only where that much is unreserved.",
    )  # fmt: skip
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources per actor, e.g. {H100: 1} for nodes started "
        "with `ray start --resources '{\"H100\": 8}'` (a KubeRay worker group's rayStartParams).",
    )  # fmt: skip

    @field_validator("num_gpus")
    @classmethod
    def _whole_above_one(cls, num_gpus: float) -> float:
        if num_gpus > 1 and num_gpus % 1:
            raise ValueError(
                f"num_gpus = {num_gpus:g}: Ray gives an actor a fraction of one GPU or whole GPUs; "
                f"use at most 1, or {int(num_gpus)} or {int(num_gpus) + 1}"
            )
        return num_gpus

    @field_validator("resources")
    @classmethod
    def _custom_only(cls, resources: dict[str, float]) -> dict[str, float]:
        for name, amount in resources.items():
            if name in RESERVED:
                field = {"CPU": "num_cpus", "GPU": "num_gpus"}.get(name, "memory_gb")
                raise ValueError(f"resources names Ray's own {name!r}; set {field} instead")
            if not amount > 0:
                raise ValueError(f"resources[{name!r}] = {amount}; a custom resource is a positive amount")
        return resources

    def ray_options(self) -> dict:
        """The options `ray.remote(...).options(**)` takes for one actor of this role."""
        options: dict = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            options["num_gpus"] = self.num_gpus
        if self.memory_gb:
            options["memory"] = int(self.memory_gb * 2**30)
        if self.resources:
            options["resources"] = dict(self.resources)
        return options

    def bundle(self) -> dict[str, float]:
        """The same, as one placement-group bundle."""
        options = self.ray_options()
        return {
            "CPU": options["num_cpus"],
            **({"GPU": options["num_gpus"]} if "num_gpus" in options else {}),
            **({"memory": options["memory"]} if "memory" in options else {}),
            **options.get("resources", {}),
        }

    def asks(self) -> str:
        """What one actor asks for, as a message says it: "2 CPUs, 1 GPU, 16 GiB, H100: 1"."""
        return said(self.bundle())


def asked_by(roles: dict[str, tuple[RoleResources, int]], resource: str) -> str:
    """The roles that ask for `resource` (Ray's name: CPU, GPU, memory, a custom one), as a
    message says them: "trainer 1 x (1 CPU, 1 GPU); rollout 2 x (0.5 CPUs, 0.5 GPUs)"."""
    return "; ".join(f"{role} {n} x ({s.asks()})" for role, (s, n) in roles.items() if resource in s.bundle())


def summed(bundles: Iterable[dict[str, float]]) -> dict[str, float]:
    """Bundles added up, resource by resource (what actors sharing one bundle need together)."""
    total: dict[str, float] = {}
    for bundle in bundles:
        for name, amount in bundle.items():
            total[name] = total.get(name, 0.0) + amount
    return total


def said(bundle: dict[str, float]) -> str:
    """A bundle (Ray's resource names) as a message says it: "1.5 CPUs, 1 GPU, 16 GiB, H100: 1"."""

    def one(name: str, amount: float) -> str:
        if name in ("CPU", "GPU"):
            return f"{amount:g} {name}{'s' * (amount != 1)}"
        return f"{amount / 2**30:g} GiB" if name == "memory" else f"{name}: {amount:g}"

    return ", ".join(one(name, amount) for name, amount in bundle.items())
