"""The method registry: every way wf trains a classifier, by name.

The blog's three methods run by default; ``fusion`` and ``prototype`` when asked
for. An unknown name is an
error.
"""

from __future__ import annotations

from storage.errors import SettingsError
from tasks.methods.base import JobContext, Method, Recipe, StoreSnapshot, TrainOptions
from tasks.methods.bottleneck import Bottleneck
from tasks.methods.finetune import Finetune
from tasks.methods.fusion import Fusion
from tasks.methods.prototype import Prototype
from tasks.methods.scratch import Scratch

METHODS: dict[str, Method] = {
    m.name: m for m in (Bottleneck(), Finetune(), Scratch(), Fusion(), Prototype())
}
DEFAULT_METHODS = ("bottleneck", "finetune", "scratch")  # the Keras blog's three

__all__ = [
    "DEFAULT_METHODS",
    "METHODS",
    "JobContext",
    "Method",
    "Recipe",
    "StoreSnapshot",
    "TrainOptions",
    "get_method",
    "in_dependency_order",
]


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise SettingsError(f"unknown method {name!r}; choose from {', '.join(METHODS)}") from None


def in_dependency_order(names: tuple[str, ...]) -> list[Method]:
    """The methods named, each after the one it depends on (when both are named)."""
    ordered: list[Method] = []
    pending = [get_method(name) for name in names]
    while pending:
        for method in pending:
            if (
                method.depends_on is None
                or method.depends_on not in names
                or any(done.name == method.depends_on for done in ordered)
            ):
                ordered.append(method)
                pending.remove(method)
                break
        else:  # pragma: no cover - the registry has no cycles
            raise SettingsError("methods depend on each other in a cycle")
    return ordered
