"""Comparison page: several run folders side by side, and runs that differ only in their seed as mean ± std.

Written by ``./run.sh report DIR DIR ...`` (:func:`server_app.report.main`). Runs whose configs are
equal but for ``seed`` (and where they live: ``run-name``, ``output-dir``) form a *seed group*:
the page's "Seeds" panel shows each group's figures as mean ± sample std with the per-seed
values (:mod:`common.results`), the paired difference between SmartFreeze and the best other
memory-constrained group over the seeds both ran, and the groups' mean accuracy curves with a
±1 std band. The other panels show every run on its own.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from html import escape
from pathlib import Path

import numpy as np

from common.results import HEADLINE, SMOOTH, aggregate, difference_line, headline, mean_curve, summarise
from common.seedstats import Spread
from server_app.report_parts import (
    MB,
    REPORT_NAME,
    RunData,
    _atomic_write_text,
    _fig,
    _freeze_events,
    _img,
    _note,
    _num,
    _page,
    _round_axis,
    _safe,
    _series,
    _table,
    client_ids,
    has_participant_ids,
    load_run,
)

COMPARISON_PANELS: tuple[str, ...] = (
    "Summary",
    "Seeds",
    "Accuracy",
    "Memory",
    "Participation",
    "Bytes",
)
"""Headings of the comparison page's panels, in page order."""


def _labels(runs: Sequence[RunData]) -> list[str]:
    """Short unique labels: folder names, prefixed by their parents where names repeat."""
    labels = [r.run_dir.name for r in runs]
    depth = 1
    while len(set(labels)) < len(labels) and depth < 6:
        depth += 1
        labels = ["/".join(r.run_dir.resolve().parts[-depth:]) for r in runs]
    return labels


def _run_color(i: int) -> tuple[float, float, float, float]:
    from matplotlib import colormaps

    return colormaps["tab10"](i % 10)


def _run_max(run: RunData, key: str) -> float | None:
    """Largest finite value of ``key`` over the run's training rounds, or None."""
    values = _series(run.trained, key)[1]
    return max(values) if values else None


def _comparison_accuracy(runs: Sequence[RunData], labels: Sequence[str]) -> str:
    fig, axes = _fig(11, 4.2, ncols=2)
    ax_r, ax_t = axes[0]
    no_time = []
    for i, (run, label) in enumerate(zip(runs, labels, strict=True)):
        x, y = _series(run.rounds, "server-accuracy", 100.0)
        ax_r.plot(x, y, marker=".", color=_run_color(i), label=label)
        for rnd, _, _ in _freeze_events(run):
            ax_r.axvline(rnd + 0.5, color=_run_color(i), ls=":", lw=0.8)
        times = {int(r["round"]): _num(r.get("sim-time")) for r in run.trained}
        if not any(times.values()):
            no_time.append(label)
            continue
        tx, ty = [], []
        for rnd, acc in zip(x, y, strict=True):
            t = 0.0 if rnd == 0 else times.get(rnd)
            if t is not None:
                tx.append(t)
                ty.append(acc)
        ax_t.plot(tx, ty, marker=".", color=_run_color(i), label=label)
    _round_axis(ax_r)
    ax_t.set_xlabel("simulated time (s, slowest selected client per round)")
    for ax in (ax_r, ax_t):
        ax.set_ylabel("server accuracy (%)")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    if no_time and len(no_time) == len(runs):
        ax_t.text(0.5, 0.5, "no simulated time (device speeds unknown)", ha="center", transform=ax_t.transAxes)
    body = _img(fig, "accuracy per round and per simulated time")
    if no_time:
        body += _note(f"No simulated time recorded (device-profile='none'?): {', '.join(no_time)}.")
    return body + _note("Dotted vertical lines: a run froze a block (stage boundary).")


def _comparison_memory(runs: Sequence[RunData], labels: Sequence[str]) -> str:
    fig, axes = _fig(11, 4.0, ncols=2)
    ax_b, ax_s = axes[0]
    x = np.arange(len(runs))
    modelled = [_run_max(r, "modelled-memory-mb") for r in runs]
    peaks = [_run_max(r, "max-peak-mb") for r in runs]
    colors = [_run_color(i) for i in range(len(runs))]
    ax_b.bar(x - 0.2, [v or 0.0 for v in modelled], 0.4, label="max modelled", color=colors)
    ax_b.bar(x + 0.2, [v or 0.0 for v in peaks], 0.4, label="max measured peak", color="#555", alpha=0.75)
    for i, (m, pk) in enumerate(zip(modelled, peaks, strict=True)):
        if m is None and pk is None:
            ax_b.text(i, 0, "not recorded", ha="center", va="bottom", fontsize=8, color="#777", rotation=90)
    ax_b.set_xticks(x, labels, fontsize=8, rotation=20 if len(runs) > 3 else 0)
    ax_b.set_ylabel("MB")
    ax_b.set_title("largest client training memory", fontsize=10)
    ax_b.legend(fontsize=8)
    ax_b.grid(alpha=0.3, axis="y")
    for i, run in enumerate(runs):
        x_r, y_r = _series(run.trained, "modelled-memory-mb")
        ax_s.step(x_r, y_r, where="mid", color=_run_color(i), label=labels[i])
    _round_axis(ax_s)
    ax_s.set_ylabel("modelled MB")
    ax_s.set_title("modelled client memory per round", fontsize=10)
    ax_s.grid(alpha=0.3)
    if ax_s.lines:
        ax_s.legend(fontsize=8)
    return _img(fig, "memory per run")


def _comparison_participation(runs: Sequence[RunData], labels: Sequence[str]) -> str:
    fig, axes = _fig(11, 4.0, ncols=2)
    ax_p, ax_c = axes[0]
    per_client: list[tuple[int, list[int], dict[int, int]]] = []
    for i, run in enumerate(runs):
        x, y = _series(run.trained, "participants")
        ax_p.plot(x, y, marker=".", color=_run_color(i), label=labels[i])
        if has_participant_ids(run):
            ids = client_ids(run)
            counts = {pid: 0 for pid in ids}
            for r in run.trained:
                for pid in r.get("participant-ids") or []:
                    counts[int(pid)] += 1
            per_client.append((i, ids, counts))
    width = 0.8 / max(1, len(per_client))
    for k, (i, ids, counts) in enumerate(per_client):
        offset = (k - (len(per_client) - 1) / 2) * width
        ax_c.bar(np.array(ids) + offset, [counts[p] for p in ids], width, color=_run_color(i), label=labels[i])
    _round_axis(ax_p)
    ax_p.set_ylabel("clients that trained")
    ax_p.set_title("participants per round", fontsize=10)
    ax_c.set_xlabel("client (partition id)")
    ax_c.set_ylabel("rounds trained")
    ax_c.set_title("rounds trained per client", fontsize=10)
    if not per_client:
        ax_c.text(0.5, 0.5, "no participant ids recorded", ha="center", transform=ax_c.transAxes)
    for ax in (ax_p, ax_c):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return _img(fig, "participation per run")


def _comparison_bytes(runs: Sequence[RunData], labels: Sequence[str]) -> str:
    fig, axes = _fig(11, 3.8)
    ax = axes[0][0]
    for i, run in enumerate(runs):
        xs = [int(r["round"]) for r in run.trained]
        per = [(_num(r.get("bytes-down")) or 0.0) + (_num(r.get("bytes-up")) or 0.0) for r in run.trained]
        ax.plot(xs, np.cumsum(per) / MB, color=_run_color(i), label=labels[i])
    _round_axis(ax)
    ax.set_ylabel("cumulative MB (down + up)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    return _img(fig, "cumulative bytes per run")


def _comparison_summary(runs: Sequence[RunData], labels: Sequence[str]) -> str:
    rows = []
    for run, label in zip(runs, labels, strict=True):
        s = run.summary
        sim = [_num(r.get("sim-time")) for r in run.trained]
        rows.append(
            [
                label,
                run.strategy,
                f"{run.config.get('model', '?')} w{run.config.get('width', '?')}",
                len(run.trained),
                None if _num(s.get("final-accuracy")) is None else round(100 * float(s["final-accuracy"]), 2),
                None if _num(s.get("best-accuracy")) is None else round(100 * float(s["best-accuracy"]), 2),
                None if _num(s.get("participation-rate")) is None else round(100 * float(s["participation-rate"]), 1),
                _run_max(run, "modelled-memory-mb"),
                _run_max(run, "max-peak-mb"),
                round(sum((_num(r.get("bytes-down")) or 0.0) for r in run.trained) / MB, 1),
                round(sum((_num(r.get("bytes-up")) or 0.0) for r in run.trained) / MB, 1),
                next((v for v in reversed(sim) if v is not None), None),
                _num(s.get("wall-seconds")),
            ]
        )
    header = [
        "run",
        "strategy",
        "model",
        "rounds",
        "final acc %",
        "best acc %",
        "participation %",
        "max modelled MB",
        "max peak MB",
        "down MB",
        "up MB",
        "sim time s",
        "wall s",
    ]
    return _table(header, rows)


LOCATION_KEYS = ("seed", "run-name", "output-dir")
"""Config keys that do not make two runs different experiments (the seed, and where the run lives)."""


def seed_groups(runs: Sequence[RunData], labels: Sequence[str]) -> dict[str, list[int]]:
    """Indices of ``runs`` grouped by their config without :data:`LOCATION_KEYS`, keyed by a group label.

    The label is the runs' common parent folder when they live in ``seed-<s>`` folders (the
    ``bench compare`` layout), else the strategy, made unique with ``#k``.
    """
    by_key: dict[str, list[int]] = {}
    for i, run in enumerate(runs):
        key = json.dumps({k: v for k, v in run.config.items() if k not in LOCATION_KEYS}, sort_keys=True)
        by_key.setdefault(key, []).append(i)
    out: dict[str, list[int]] = {}
    for members in by_key.values():
        parents = {runs[i].run_dir.parent.name for i in members}
        in_seed_dirs = all(runs[i].run_dir.name.startswith("seed-") for i in members)
        base = parents.pop() if in_seed_dirs and len(parents) == 1 else runs[members[0]].strategy
        label, k = base, 1
        while label in out:
            k += 1
            label = f"{base}#{k}"
        out[label] = members
    return out


def _spread_cell(value: Spread | None, scale: float = 1.0, digits: int = 1) -> str:
    if value is None:
        return "—"
    mean = f"{scale * value.mean:,.{digits}f}"
    return mean if value.std is None else f"{mean} ± {scale * value.std:,.{digits}f}"


def _comparison_seeds(runs: Sequence[RunData], labels: Sequence[str]) -> str:
    groups = {k: v for k, v in seed_groups(runs, labels).items() if len(v) > 1}
    if not groups:
        return _note(
            "No two runs differ only in their seed: nothing to average (bench compare --seeds N makes such runs)."
        )
    per_seed = {
        label: [
            summarise(
                label,
                int(runs[i].config.get("seed", 0)),
                {"config": runs[i].config, "summary": runs[i].summary, "rounds": runs[i].rounds},
                None,
            )
            for i in members
        ]
        for label, members in groups.items()
    }
    rows = [aggregate(label, per_seed[label]) for label in groups]
    table = _table(
        [
            "group",
            "seeds",
            f"last-{SMOOTH} mean %",
            "final acc %",
            "best acc %",
            "participation %",
            "peak client MB",
            "MB moved",
            "sim time s",
            f"per-seed last-{SMOOTH} %",
        ],
        [
            [
                r["entry"],
                ", ".join(map(str, r["seeds"])),
                _spread_cell(r[HEADLINE], 100),
                _spread_cell(r["final-accuracy"], 100),
                _spread_cell(r["best-accuracy"], 100),
                _spread_cell(r["participation-rate"], 100, 0),
                _spread_cell(r["peak-client-memory-mb"]),
                _spread_cell(r["bytes-moved"], 1 / 2**20, 0),
                _spread_cell(r["sim-time-s"], 1.0, 0),
                ", ".join(f"{100 * v:.1f}" for v in (r[HEADLINE].values if r[HEADLINE] else ())),
            ]
            for r in rows
        ],
    )
    head = headline(rows, per_seed)
    for key, what in ((HEADLINE, f"last-{SMOOTH} mean"), ("final-accuracy", "final round")):
        if key in head:
            table += _note(
                escape(f"{head['a']} minus {head['b']} (best other memory-constrained group), paired by seed, ")
                + escape(difference_line(what, head[key]))
            )
    fig, axes = _fig(11, 4.0)
    ax = axes[0][0]
    for k, (label, members) in enumerate(groups.items()):
        docs = [{"rounds": runs[i].rounds} for i in members]
        rounds, _, mean, std = mean_curve(docs)
        (line,) = ax.plot(rounds, mean, label=f"{label} (n = {len(members)})", color=_run_color(k))
        ax.fill_between(rounds, np.subtract(mean, std), np.add(mean, std), color=line.get_color(), alpha=0.18, lw=0)
    _round_axis(ax)
    ax.set_ylabel("server accuracy (%), mean ± std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return table + _img(fig, "mean accuracy per seed group with a one-std band")


def render_comparison(runs: Sequence[RunData]) -> str:
    """The HTML of a page comparing ``runs``."""
    labels = _labels(runs)
    builders: list[Callable[[], str]] = [
        lambda: _comparison_summary(runs, labels),
        lambda: _comparison_seeds(runs, labels),
        lambda: _comparison_accuracy(runs, labels),
        lambda: _comparison_memory(runs, labels),
        lambda: _comparison_participation(runs, labels),
        lambda: _comparison_bytes(runs, labels),
    ]
    sections = [(title, _safe(build, title)) for title, build in zip(COMPARISON_PANELS, builders, strict=True)]
    links = ", ".join(
        f'<a href="{escape((r.run_dir / REPORT_NAME).resolve().as_uri())}">{escape(label)}</a>'
        if (r.run_dir / REPORT_NAME).is_file()
        else escape(label)
        for r, label in zip(runs, labels, strict=True)
    )
    meta = f"{len(runs)} runs: {links} · generated {time.strftime('%Y-%m-%d %H:%M:%S')}"
    return _page(f"Comparison of {len(runs)} runs", meta, sections)


def write_comparison(run_dirs: list[Path], out: Path) -> Path:
    """Write a page comparing the runs in ``run_dirs`` to ``out``; returns ``out``."""
    if not run_dirs:
        raise ValueError("write_comparison needs at least one run folder")
    runs = [load_run(Path(d)) for d in run_dirs]
    out = Path(out)
    _atomic_write_text(out, render_comparison(runs))
    return out
