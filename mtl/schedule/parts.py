"""Building a stage's parts from their config nodes: balancer and engine, policy, transfer terms.

Each part is either an object already (library use: ``Stage(policy=LinearProbe())``) or a
``_target_`` node from the config, built here with ``hydra.utils.instantiate``. Errors name the
config key. The runner calls these once per stage when the run starts (so a typo in the last stage
is caught before the first one trains) and again when the stage runs.
"""

from __future__ import annotations

from typing import Any, Mapping

from hydra.errors import InstantiationException
from hydra.utils import instantiate

from mtl.balancing.aggregators.base import GradientAggregator
from mtl.balancing.gramian import GramianEngine
from mtl.balancing.jacobian import JacobianEngine
from mtl.balancing.weightings.base import LossWeighting
from mtl.transfer.policies import FineTunePolicy
from mtl.transfer.terms import TransferTerm

__all__ = ["build", "build_balancer", "build_policy", "build_regularizers"]


def build(spec: Any, where: str, expected: type | tuple[type, ...], **kwargs: Any) -> Any:
    """The object ``spec`` describes: itself, or ``instantiate(spec, **kwargs)`` for a node.

    Raises:
        ValueError: the node has no ``_target_`` or its target cannot be built (message names
            ``where``).
        TypeError: the object is not an ``expected``.
    """
    if spec is None:
        return None
    kinds = expected if isinstance(expected, tuple) else (expected,)
    names = " or ".join(k.__name__ for k in kinds)
    if isinstance(spec, Mapping):
        if "_target_" not in spec:
            raise ValueError(
                f"{where} needs a _target_ naming the class to build (a {names}), got keys {sorted(spec)}."
            )
        try:
            obj = instantiate(dict(spec), **kwargs, _convert_="all")
        except InstantiationException as err:
            raise ValueError(f"{where}: {err}") from None
    else:
        obj = spec
    if not isinstance(obj, expected):
        raise TypeError(f"{where} must build a {names}, got {type(obj).__name__}.")
    return obj


def build_balancer(
    spec: Any, num_tasks: int, where: str
) -> tuple[LossWeighting | GradientAggregator | None, JacobianEngine | GramianEngine]:
    """``(balancer, engine)`` from a ``{method: node, engine: node}`` balancer config (None: none)."""
    if spec is None:
        return None, JacobianEngine()
    if not isinstance(spec, Mapping) or "method" not in spec:
        raise ValueError(
            f"{where} must be a balancer config with a 'method' node (see conf/balancer/), e.g. "
            f"+balancer@{where}=pcgrad; got {spec!r}."
        )
    balancer = build(spec["method"], f"{where}.method", (LossWeighting, GradientAggregator), num_tasks=num_tasks)
    engine_spec = spec.get("engine")
    if isinstance(engine_spec, Mapping) and "_target_" not in engine_spec:
        engine_spec = {"_target_": "mtl.balancing.JacobianEngine", **engine_spec}
    engine = build(engine_spec, f"{where}.engine", (JacobianEngine, GramianEngine)) if engine_spec is not None else JacobianEngine()
    return balancer, engine


def build_policy(spec: Any, where: str) -> FineTunePolicy | None:
    """The fine-tuning policy of a stage (None: everything trains)."""
    return build(spec, where, FineTunePolicy)


def build_regularizers(specs: Mapping[str, Any] | None, where: str) -> dict[str, TransferTerm]:
    """``{name: TransferTerm}`` from ``{name: node}`` (a None entry is off)."""
    return {
        str(name): build(spec, f"{where}.{name}", TransferTerm)
        for name, spec in (specs or {}).items()
        if spec is not None
    }
