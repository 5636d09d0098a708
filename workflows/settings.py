"""What every command's settings share: :func:`setting` (a field with its CLI help), the help
the CLI shows for it, the cluster to run on, and the environment of the CLI and every Ray worker.

Each command's settings are one frozen dataclass in its package's ``settings.py``
(:mod:`workflows.extract.settings`, :mod:`workflows.train.settings`, ...), built once from CLI
options (or a TOML file) and passed down. Each field's default and help live on the field; the
CLI passes only what the user gave and takes every help text from here. No other module reads
the environment or global configuration.
"""

from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, field, fields
from typing import Any


def setting(default: Any = MISSING, help: str = "", **kwargs: Any) -> Any:
    """A dataclass field that carries its CLI help."""
    if "default_factory" in kwargs:
        return field(metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


def option_help(cls: type, name: str, shown_default: str | None = None) -> str:
    """The help of setting ``name`` of ``cls`` with its default, for typer."""
    (spec,) = [f for f in fields(cls) if f.name == name]
    text = spec.metadata.get("help", "")
    if "(default:" in text:  # a default that is not a value says what it means itself
        return text
    default = shown_default
    if default is None:
        value = spec.default if spec.default is not MISSING else spec.default_factory()  # type: ignore[misc]
        if value is False:  # a flag: off unless given
            return text
        default = ",".join(value) if isinstance(value, tuple) else str(value)
    return f"{text} (default: {default})"


def default_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "wf")


# TensorFlow turns its oneDNN CPU kernels on by default only on some Intel CPUs; on this
# project's AMD machines they make the fine-tune's train step about 1.2x faster
# (benchmarks/finetune_speed.py). Ray Train's controller collects each worker's reports when it
# polls them, every 2 s by default, and a worker's next report waits for that: with sub-second
# epochs every epoch took 2 s. Set for the CLI's process and every Ray worker; a value the user
# set wins.
TENSORFLOW_ENV = {"TF_ENABLE_ONEDNN_OPTS": "1"}
RAY_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


def _user_values_win(defaults: dict[str, str]) -> dict[str, str]:
    return {name: os.environ.get(name, value) for name, value in defaults.items()}


def tensorflow_env() -> dict[str, str]:
    """:data:`TENSORFLOW_ENV`, a value the user set winning."""
    return _user_values_win(TENSORFLOW_ENV)


def worker_env() -> dict[str, str]:
    """Every Ray worker's environment variables, a value the user set winning."""
    return _user_values_win({**TENSORFLOW_ENV, **RAY_TRAIN_ENV})


@dataclass(frozen=True)
class ClusterSettings:
    """``address=None`` starts a local Ray cluster with ``num_cpus`` (all cores when None)."""

    address: str | None = setting(None, "Ray cluster to use, or RAY_ADDRESS (default: a local one)")
    num_cpus: int | None = setting(None, "CPUs of the local Ray cluster (default: all)")
    verbose: bool = False  # Ray's and TensorFlow's own start-up lines
