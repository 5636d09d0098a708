"""TOML config files for ``wf extract --config``: top-level settings, ``[augment_policy]`` and
``[[datasets]]``; options given on the command line win over the file."""

from __future__ import annotations

import os
import tomllib
from dataclasses import fields
from typing import Any

from storage.errors import SettingsError
from storage.filesystem import is_uri
from tasks.augment import AugmentPolicy
from workflows.extract.settings import DatasetSource, ExtractSettings

_TOP_LEVEL_KEYS = {f.name for f in fields(ExtractSettings)} - {"datasets", "policy", "cluster"}


def load_config(path: str) -> dict[str, Any]:
    """Keyword arguments for :class:`ExtractSettings` from the file at ``path``; relative
    dataset paths are taken relative to the file."""
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
    except FileNotFoundError:
        raise SettingsError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise SettingsError(f"config file {path} is not valid TOML: {error}") from None
    base = os.path.dirname(os.path.abspath(path))
    unknown = set(raw) - _TOP_LEVEL_KEYS - {"datasets", "augment_policy"}
    if unknown:
        raise SettingsError(f"unknown keys in {path}: {', '.join(sorted(unknown))}")
    settings: dict[str, Any] = {key: raw[key] for key in _TOP_LEVEL_KEYS if key in raw}
    if "taps" in settings:
        settings["taps"] = tuple(settings["taps"])
    datasets = []
    for entry in raw.get("datasets", []):
        if "path" not in entry or set(entry) - {"path", "name", "validation_fraction"}:
            raise SettingsError(
                f"each [[datasets]] in {path} needs 'path', "
                "and may have 'name' and 'validation_fraction'"
            )
        where = entry["path"]
        if not is_uri(where):
            where = os.path.join(base, os.path.expanduser(where))
        datasets.append(DatasetSource(where, entry.get("name"), entry.get("validation_fraction")))
    settings["datasets"] = tuple(datasets)
    if "augment_policy" in raw:
        try:
            settings["policy"] = AugmentPolicy(**raw["augment_policy"])
        except (TypeError, ValueError) as error:
            raise SettingsError(f"[augment_policy] in {path}: {error}") from None
    return settings
