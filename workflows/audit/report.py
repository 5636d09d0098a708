"""The audit's report: one self-contained HTML page per dataset (thumbnails embedded), with each
duplicate group side by side (the image to keep marked), the leaks across splits, the label
issues with the label wf suggests, and the outliers."""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from PIL import Image

from storage.filesystem import Location
from storage.names import escape_name, unescape_name
from tasks.cross_validation import describe_split_agreement
from tasks.images import ImageRejected, load_image
from workflows.audit.settings import GROUP_ISSUES, ISSUE_TITLES, ISSUES
from workflows.datasets import list_tree

SHOWN = 120  # groups or images per section; the CSV holds all of them


def file_sizes(dataset_root: str) -> dict[str, int]:
    """Each image's file size by its (escaped) path in the store: a listing, no reading."""
    try:
        tree = list_tree(dataset_root)
    except Exception:  # the dataset may be gone: the keep policy falls back to paths
        return {}
    return {escape_name("/".join(e.parts)): e.size for e in tree.files}


def thumbnail(location: Location, path: str) -> str:
    try:
        pixels = load_image(location.filesystem, location.path(unescape_name(path)), (112, 112))
    except (ImageRejected, OSError):
        return '<div class="thumb missing">?</div>'
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=80)
    return f'<img src="data:image/jpeg;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _card(location: Location, issue: dict[str, Any], note: str = "") -> str:
    keep = " keep" if issue.get("keep") else ""
    caption = (f"{html.escape(issue['split'])} · {html.escape(issue['label'])}"
               f"{' · keep' if keep else ''}{note}")  # fmt: skip
    return (f'<figure class="card{keep}">{thumbnail(location, issue["path"])}'
            f'<figcaption title="{html.escape(issue["path"])}">{caption}<br>'
            f"<small>{html.escape(issue['path'][-40:])}</small></figcaption></figure>")  # fmt: skip


STYLE = """body{font:14px/1.4 system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em}
.group{border:1px solid #ddd;border-radius:8px;padding:.5em;margin:.6em 0;display:flex;gap:.6em;
flex-wrap:wrap;align-items:flex-start} .group h4{width:100%;margin:0 0 .3em}
figure{margin:0;width:120px}
figure img,.missing{width:112px;height:112px;border:3px solid transparent;border-radius:4px}
figure.keep img{border-color:#2e8b57} figcaption{font-size:12px;color:#333;word-break:break-all}
small{color:#888} table{border-collapse:collapse}
td,th{padding:.3em .8em;border-bottom:1px solid #ddd}"""


def render_report(dataset: str, root: str, images: Any, issues: list[dict], summary: dict) -> str:
    location = Location.at(root)
    counts = "".join(f"<tr><td>{k}</td><td>{summary['counts'].get(k, 0)}</td></tr>"
                     for k in ISSUES)  # fmt: skip
    sections = []
    for kind in GROUP_ISSUES:
        title = ISSUE_TITLES[kind]
        by_group: dict[int, list[dict]] = {}
        for issue in issues:
            if issue["issue"] == kind:
                by_group.setdefault(issue["group"], []).append(issue)
        blocks = [
            f'<div class="group"><h4>group {g}</h4>{"".join(_card(location, i) for i in m)}</div>'
            for g, m in list(by_group.items())[:SHOWN]
        ]
        if blocks:
            count = f"{len(by_group)} group{'s' if len(by_group) != 1 else ''}"
            sections.append(f"<h2>{title} ({count})</h2>" + "".join(blocks))
    for kind in ISSUES[len(GROUP_ISSUES) :]:
        title = ISSUE_TITLES[kind]
        chosen = [i for i in issues if i["issue"] == kind]
        chosen.sort(key=lambda i: -i["score"])
        cards = [
            _card(location, i, f" → {html.escape(i['suggested_label'])}" if i["suggested_label"]
                  else f" · {i['score']:.2f}")
            for i in chosen[:SHOWN]
        ]  # fmt: skip
        if cards:
            sections.append(
                f"<h2>{title} ({len(chosen)})</h2><div class=group>{''.join(cards)}</div>"
            )
    name = html.escape(dataset)
    thresholds = describe_thresholds(summary["thresholds"])
    splits = ""
    if (summary.get("splits") or {}).get("differs"):
        found = html.escape(describe_split_agreement(summary["splits"]))
        splits = (f"<p><b>The validation folder is unlike the training folder</b>: {found}. A "
                  "number measured on one misleads about the other: check that the validation "
                  "images stand for the images the model will see (another source, time or "
                  "labeller?).</p>")  # fmt: skip
    return (f"<!doctype html><html lang=en><meta charset=utf-8><title>wf audit: {name}</title>"
            f"<style>{STYLE}</style><h1>wf audit: {name}</h1>"
            f"<p>{summary['images']} images; {html.escape(thresholds)}. "
            "A green frame marks the image to keep of each group; the CSV holds every flagged "
            f"image.</p>{splits}<table><tr><th>issue</th><th>images</th></tr>{counts}</table>"
            f"{''.join(sections)}</html>")  # fmt: skip


def describe_thresholds(t: dict) -> str:
    """The thresholds of an audit, as a sentence."""
    if t.get("exact_only"):
        near = "exact duplicates only"
    else:
        parts = []
        if t.get("similarity") is not None:
            parts.append(f"cosine at least {t['similarity']}")
        if t.get("relative") is not None:
            parts.append(f"distance at most {t['relative']} x the typical one "
                         f"({t['relative_distance']})")  # fmt: skip
        near = "near duplicates: " + (" and ".join(parts) or "off")
    return f"{near}; outliers: score at least {t['outlier_score']}; {t['neighbours']} neighbours"
