"""``wf audit``'s settings: which store and datasets, the thresholds of each check, and what
fails the command."""

from __future__ import annotations

from dataclasses import dataclass, field

from storage.errors import SettingsError
from tasks.backbones import DEFAULT_BACKBONE
from workflows.settings import ClusterSettings, setting

# Near duplicates (the audit's, and the ones `wf suggest` never proposes twice): cosine at least
# NEAR_SIMILARITY, and distance at most NEAR_RELATIVE x the typical distance to a 10th neighbour.
NEAR_SIMILARITY, NEAR_RELATIVE = 0.85, 0.35

# The kinds of issue the audit reports, in the order tables and the report show them, with the
# report's title of each, the worst first. Groups of images: the first four; single images: the
# last two.
ISSUE_TITLES = {
    "leakage": "Leaks across splits",
    "conflicting_labels": "Duplicate groups with different labels",
    "exact_duplicate": "Exact duplicates",
    "near_duplicate": "Near duplicates",
    "label_issue": "Label issues, most doubtful first",
    "outlier": "Outliers",
}
ISSUES = tuple(ISSUE_TITLES)
GROUP_ISSUES = ISSUES[:4]


@dataclass(frozen=True)
class AuditSettings:
    store: str = setting("store", "Feature store root written by `wf extract`")
    output: str = setting("audit", "Where issues.csv, summary.json and report.html go")
    datasets: tuple[str, ...] | None = setting(
        None, "Comma-separated datasets (default: all in the store)"
    )
    backbone: str = setting(DEFAULT_BACKBONE, "Whose stored embeddings to audit")
    neighbours: int = setting(10, "Neighbours per image (near duplicates, outliers, label votes)")
    similarity: float | None = setting(
        NEAR_SIMILARITY, "Near duplicates: cosine at least this (0: off)"
    )
    relative: float | None = setting(
        NEAR_RELATIVE, "... and distance at most this x the typical (10th-neighbour) one (0: off)"
    )
    exact_only: bool = setting(False, "Only byte-identical duplicates")
    outlier_score: float = setting(
        1.6,
        "Outliers: score at least this (1: typical; times the median distance to "
        "neighbours and class centre)",
    )
    folds: int = setting(5, "Cross-validation folds for the label issues")
    fail_on: tuple[str, ...] = setting(
        (), "Comma-separated issues that make the command exit 1 (for CI) (default: none)"
    )
    resplit: bool = setting(False, "Write a group-aware split proposal")
    seed: int = 0
    cluster: ClusterSettings = field(default_factory=ClusterSettings)

    def __post_init__(self) -> None:
        for name in ("similarity", "relative"):  # 0 turns a test off
            if getattr(self, name) == 0:
                object.__setattr__(self, name, None)
        unknown = set(self.fail_on) - set(ISSUES)
        if unknown:
            raise SettingsError(f"--fail-on takes {', '.join(ISSUES)}; not {', '.join(unknown)}")
        if self.similarity is not None and not 0 < self.similarity <= 1:
            raise SettingsError("--similarity must be in (0, 1]")
        if self.neighbours < 2 or self.folds < 2:
            raise SettingsError("--neighbours and --folds must be at least 2")
