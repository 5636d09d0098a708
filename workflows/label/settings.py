"""``wf suggest``'s settings: the store and run to score with, the budget, where the batch goes."""

from __future__ import annotations

from dataclasses import dataclass

from storage.errors import SettingsError
from tasks.backbones import DEFAULT_BACKBONE
from tasks.methods import get_method
from workflows.settings import setting


@dataclass(frozen=True)
class SuggestSettings:
    store: str = setting("store", "Feature store root written by `wf extract`")
    runs: str = setting("runs", "The runs folder written by `wf train-all` (a path or URI)")
    output: str = setting(
        "suggestions", "Write DIR/<dataset>/suggestions.csv, .parquet and report.html here"
    )
    datasets: tuple[str, ...] = setting(
        (), "Comma-separated datasets (default: every one with unlabelled images)"
    )
    budget: int = setting(100, "Images to suggest per dataset")
    method: str = setting(
        "bottleneck", "The trained method that scores them: bottleneck or prototype"
    )
    backbone: str = setting(DEFAULT_BACKBONE, "Whose stored embeddings to rank")

    def __post_init__(self) -> None:
        if self.budget < 1:
            raise SettingsError(f"--budget must be at least 1: {self.budget}")
        method = get_method(self.method)
        if not method.fits_on_rows or method.all_backbones:
            raise SettingsError(
                f"--method {self.method}: wf suggest scores stored rows of one backbone; "
                "use bottleneck or prototype"
            )
