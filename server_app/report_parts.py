"""The run report's parts: reading a run folder, HTML helpers, drawing helpers (:mod:`server_app.report`).

Shared by the run report and the comparison page (:mod:`server_app.report_compare`); no Flower.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

log = logging.getLogger("progfl")

REPORT_NAME = "report.html"
DPI = 100
MB = 1e6  # bytes on the wire are shown in MB = 10^6 bytes; memory in MB = 2^20 bytes, as recorded

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px auto;
       max-width: 1180px; color: #222; line-height: 1.4; padding: 0 16px; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; border-bottom: 2px solid #ddd; padding-bottom: 4px; margin-top: 1.8em; }
.meta { color: #666; font-size: 0.9em; }
img { max-width: 100%; height: auto; display: block; margin: 8px 0; }
table { border-collapse: collapse; font-size: 0.85em; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.na { color: #777; font-style: italic; background: #f7f7f7; padding: 10px 14px; border-left: 4px solid #ccc; }
.panel-error { color: #a00; background: #fff3f3; padding: 10px 14px; border-left: 4px solid #c33; }
.note { color: #555; font-size: 0.9em; }
.cols { columns: 3; column-gap: 20px; }
.row { display: flex; gap: 24px; align-items: flex-start; }
.row > img { max-width: 62%; }
.cols table { width: 100%; }
"""


# ---------------------------------------------------------------------------------------------- data
@dataclass
class RunData:
    """Everything the report reads from one run folder."""

    run_dir: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    rounds: list[dict[str, Any]]
    pace: dict[str, Any] | None
    similarity: np.ndarray | None

    @property
    def name(self) -> str:
        """The run's name (its folder's name unless the config names it)."""
        return str(self.config.get("run-name") or self.run_dir.name)

    @property
    def strategy(self) -> str:
        """Strategy name from the summary or the config."""
        return str(self.summary.get("strategy") or self.config.get("strategy") or "unknown")

    @property
    def trained(self) -> list[dict[str, Any]]:
        """Rows of the training rounds (round >= 1)."""
        return [r for r in self.rounds if int(r.get("round", 0)) >= 1]


def load_run(run_dir: Path) -> RunData:
    """Read a run folder; raises FileNotFoundError if it has no metrics.json."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.json"
    if not metrics.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder: no metrics.json")
    doc = json.loads(metrics.read_text())
    config = doc.get("config") or {}
    if not config and (run_dir / "config.json").is_file():
        config = json.loads((run_dir / "config.json").read_text())
    pace = json.loads((run_dir / "pace.json").read_text()) if (run_dir / "pace.json").is_file() else None
    sim_path = run_dir / "similarity.npy"
    similarity = np.load(sim_path, allow_pickle=False) if sim_path.is_file() else None
    return RunData(run_dir, config, doc.get("summary") or {}, doc.get("rounds") or [], pace, similarity)


def _num(value: Any) -> float | None:
    """``value`` as a finite float, or None."""
    if value is None or isinstance(value, (bool, str, list, dict)):
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def _series(rows: Sequence[dict[str, Any]], key: str, scale: float = 1.0) -> tuple[list[int], list[float]]:
    """(rounds, values) of the rows where ``key`` holds a finite number."""
    xs, ys = [], []
    for r in rows:
        v = _num(r.get(key))
        if v is not None:
            xs.append(int(r["round"]))
            ys.append(v * scale)
    return xs, ys


@dataclass
class StageSpan:
    """Rounds trained in one stage (1-based stage; ``None`` for a strategy without stages)."""

    stage: int | None
    first: int
    last: int
    rows: list[dict[str, Any]]

    @property
    def label(self) -> str:
        """'stage k', or 'all rounds' without stages."""
        return "all rounds" if self.stage is None else f"stage {self.stage}"

    def max_of(self, key: str) -> float | None:
        """Largest finite value of ``key`` in the stage's rows."""
        values = [v for v in (_num(r.get(key)) for r in self.rows) if v is not None]
        return max(values) if values else None


def stage_spans(run: RunData) -> list[StageSpan]:
    """Consecutive rounds with the same stage; one span of every round for strategies without stages."""
    spans: list[StageSpan] = []
    for row in run.trained:
        stage = row.get("stage")
        stage = None if stage is None else int(stage)
        if spans and spans[-1].stage == stage:
            spans[-1].last = int(row["round"])
            spans[-1].rows.append(row)
        else:
            spans.append(StageSpan(stage, int(row["round"]), int(row["round"]), [row]))
    return spans


def has_stages(spans: Sequence[StageSpan]) -> bool:
    """True if the run is progressive (its rows carry a stage)."""
    return any(s.stage is not None for s in spans)


def node_budgets(run: RunData) -> dict[int, float] | None:
    """Partition id -> memory budget in MB (inf = unlimited), or None if the run did not record them."""
    raw = run.summary.get("node-memory-mb")
    if not isinstance(raw, dict):
        return None
    out = {}
    for pid, mb in raw.items():
        v = _num(mb)
        out[int(pid)] = math.inf if v is None or v < 0 else v
    return dict(sorted(out.items()))


def client_ids(run: RunData) -> list[int]:
    """Every known partition id: budgets' keys, ids that trained, and 0..num-nodes-1 without budgets."""
    ids: set[int] = set((node_budgets(run) or {}).keys())
    for r in run.trained:
        ids.update(int(p) for p in r.get("participant-ids") or [])
    if not node_budgets(run):
        ids.update(range(int(run.summary.get("num-nodes") or 0)))
    return sorted(ids)


def has_participant_ids(run: RunData) -> bool:
    """True if the rows record which clients trained (``participant-ids``)."""
    return any(isinstance(r.get("participant-ids"), list) for r in run.trained)


def stage_reason(run: RunData, span: StageSpan) -> str | None:
    """Why the stage ended: the summary's stage schedule, else the freeze reason of its last round."""
    if span.stage is None:
        return None
    for entry in run.summary.get("stages") or []:
        if isinstance(entry, dict) and entry.get("stage") == span.stage:
            return entry.get("reason")
    return span.rows[-1].get("freeze-reason")


def stage_color(stage: int | None) -> tuple[float, float, float, float]:
    """A stable colour per stage (tab10)."""
    from matplotlib import colormaps

    return colormaps["tab10"]((stage or 1) - 1)


# ---------------------------------------------------------------------------------------------- html helpers
def _fig(width: float = 11.0, height: float = 4.0, ncols: int = 1, nrows: int = 1, **kw: Any) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _img(fig: Figure, alt: str) -> str:
    """The figure as an <img> with a base64 PNG data URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def _na(strategy: str, why: str) -> str:
    return f'<p class="na">Not applicable for this strategy ({escape(strategy)}): {escape(why)}.</p>'


def _note(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>'


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "unlimited" if value > 0 else str(value)
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, (list, dict)):
        text = json.dumps(value)
        return text if len(text) <= 160 else text[:157] + "..."
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for v in row:
            cls = ' class="num"' if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
            cells.append(f"<td{cls}>{escape(_fmt(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _page(title: str, meta: str, sections: Sequence[tuple[str, str]]) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f'<p class="meta">{meta}</p>',
    ]
    for heading, body in sections:
        slug = "".join(c if c.isalnum() else "-" for c in heading.lower()).strip("-")
        parts.append(f'<section id="{slug}"><h2>{escape(heading)}</h2>{body}</section>')
    parts.append("</body></html>")
    return "\n".join(parts)


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _safe(build: Callable[[], str], heading: str) -> str:
    """Run a panel builder; an unexpected error becomes a visible note instead of failing the page."""
    try:
        return build()
    except Exception as exc:
        log.warning("report panel %r failed: %s", heading, exc, exc_info=True)
        return f'<p class="panel-error">Could not draw this panel: {escape(type(exc).__name__)}: {escape(str(exc))}</p>'


# ---------------------------------------------------------------------------------------------- drawing helpers
def _mark_stages(ax: Axes, spans: Sequence[StageSpan], label: bool = True) -> None:
    """Shade each stage's rounds, draw a dotted line at every boundary, name the stages on top."""
    if not has_stages(spans):
        return
    for i, span in enumerate(spans):
        ax.axvspan(span.first - 0.5, span.last + 0.5, color=stage_color(span.stage), alpha=0.07, lw=0)
        if i > 0:
            ax.axvline(span.first - 0.5, color="grey", ls=":", lw=1.2)
        if label:
            ax.text(
                (span.first + span.last) / 2,
                1.01,
                f"S{span.stage}",
                transform=ax.get_xaxis_transform(),
                ha="center",
                va="bottom",
                fontsize=8,
                color=stage_color(span.stage),
                fontweight="bold",
            )


def _round_axis(ax: Axes) -> None:
    """Label the x axis 'round' with integer ticks."""
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _freeze_events(run: RunData) -> list[tuple[int, int, str]]:
    """(round, 1-based block, reason) for every round that froze a block."""
    out = []
    for r in run.trained:
        if r.get("froze-block"):
            out.append((int(r["round"]), int(r["froze-block"]), str(r.get("freeze-reason") or "")))
    return out
