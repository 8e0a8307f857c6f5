"""Run report: a self-contained ``report.html`` per run folder, and a page comparing several runs.

The report reads only the files of a run folder (``metrics.json``, and when present ``config.json``,
``pace.json``, ``similarity.npy``), draws its figures with matplotlib (no pyplot state, no Flower)
and embeds them as base64 PNG data URIs, so the page is one static file that opens anywhere.

Panels of a run report:

1. accuracy and loss per round, stages shaded and their boundaries marked;
2. per-stage modelled and measured peak client memory against the distribution of node budgets;
3. participation per client and per stage (and per round);
4. the pace controller's curve (metric, smoothed, relative slope vs tau) with the freeze decisions;
5. the client similarity matrix ordered by the detected communities;
6. bytes moved per round (down / up);
7. the resolved run config.

A panel without data (FedAvg has no pace controller, no communities) shows a short note instead.

CLI: ``python -m server_app.report <run-dir> [<run-dir> ...] [--out PATH]``; one folder writes its
``report.html``, several write a comparison page (default ``outputs/comparison-report.html``,
:mod:`server_app.report_compare`). A folder that holds run folders (e.g.
``outputs/compare/<name>/runs``, or one entry's ``runs/<label>`` with its ``seed-<s>`` folders)
stands for all of them, recursively.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from html import escape
from pathlib import Path

import numpy as np
from matplotlib.colors import to_rgba
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from server_app.report_parts import (
    MB,
    REPORT_NAME,
    RunData,
    StageSpan,
    _atomic_write_text,
    _fig,
    _freeze_events,
    _img,
    _mark_stages,
    _na,
    _note,
    _num,
    _page,
    _round_axis,
    _safe,
    _series,
    _table,
    client_ids,
    has_participant_ids,
    has_stages,
    load_run,
    node_budgets,
    stage_color,
    stage_reason,
    stage_spans,
)

log = logging.getLogger("progfl")

PANELS: tuple[str, ...] = (
    "1. Accuracy and loss",
    "2. Client memory vs budgets",
    "3. Participation",
    "4. Pace controller",
    "5. Client similarity and communities",
    "6. Bytes per round",
    "7. Resolved config",
)
"""Headings of the run report's panels, in page order."""


# ---------------------------------------------------------------------------------------------- run panels
def panel_accuracy(run: RunData, spans: list[StageSpan]) -> str:
    """Panel 1: accuracy and loss per round with stage boundaries."""
    if not run.rounds:
        return _note("No round recorded yet.")
    fig, axes = _fig(11, 3.5, ncols=2)
    ax_acc, ax_loss = axes[0]
    for key, label, style in (
        ("server-accuracy", "server (test set)", dict(marker="o", ms=3)),
        ("client-accuracy", "clients (local val)", dict(marker=".", ls="--")),
        ("knn-accuracy", "k-NN (test set; SSL, server-accuracy = linear probe)", dict(marker="s", ms=3, ls=":")),
    ):
        x, y = _series(run.rounds, key, 100.0)
        if x:
            ax_acc.plot(x, y, label=label, **style)
    for key, label, style in (
        ("server-loss", "server (test set)", dict(marker="o", ms=3)),
        ("client-loss", "clients (local val)", dict(marker=".", ls="--")),
        ("train-loss", "training (clients)", dict(marker=".", ls="-.")),
    ):
        x, y = _series(run.rounds, key)
        if x:
            ax_loss.plot(x, y, label=label, **style)
    for ax, ylabel in ((ax_acc, "accuracy (%)"), (ax_loss, "loss")):
        _mark_stages(ax, spans)
        _round_axis(ax)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    body = _img(fig, "accuracy and loss per round")
    final, best = _num(run.summary.get("final-accuracy")), _num(run.summary.get("best-accuracy"))
    facts = []
    if final is not None:
        facts.append(f"final accuracy (full model) {100 * final:.2f}%")
    if best is not None:
        facts.append(f"best per-round server accuracy {100 * best:.2f}%")
    if has_stages(spans):
        facts.append("shaded bands: stages (S1, S2, ...); dotted lines: stage boundaries")
    if facts:
        body += _note("; ".join(facts) + ".")
    return body


def panel_memory(run: RunData, spans: list[StageSpan]) -> str:
    """Panel 2: per-stage modelled and measured peak memory against the budget distribution."""
    if not any(s.max_of("modelled-memory-mb") is not None for s in spans):
        return _na(run.strategy, "no modelled client memory recorded in the rounds")
    budgets = node_budgets(run)
    finite = [b for b in (budgets or {}).values() if math.isfinite(b)]
    unlimited = len(budgets or {}) - len(finite)
    peak_all = max((v for v in (s.max_of("max-peak-mb") for s in spans) if v is not None), default=None)

    fig, axes = _fig(11, 3.6, ncols=2, gridspec_kw={"width_ratios": [1.35, 1]})
    ax_hist, ax_bar = axes[0]
    if finite:
        bins = int(min(30, max(10, len(finite) // 2)))
        ax_hist.hist(finite, bins=bins, color="#9bb7d4", edgecolor="white", label=f"node budgets ({len(finite)})")
        ax_hist.plot(finite, [0] * len(finite), "|", color="#1f3b5c", ms=14, mew=1.5, label="one node", clip_on=False)
        ax_hist.yaxis.get_major_locator().set_params(integer=True)
        ax_hist.set_ylabel("nodes")
    else:
        why = "not recorded for this run" if budgets is None else f"all {len(budgets)} budgets unlimited"
        ax_hist.text(0.5, 0.55, f"node budgets: {why}", ha="center", va="center", transform=ax_hist.transAxes)
        ax_hist.set_yticks([])
    for span in spans:
        modelled = span.max_of("modelled-memory-mb")
        if modelled is not None:
            ax_hist.axvline(modelled, color=stage_color(span.stage), lw=2, label=f"{span.label}: modelled")
    if peak_all is not None:
        ax_hist.axvline(peak_all, color="black", ls="--", lw=1.5, label="max measured peak")
    ax_hist.set_xlabel("memory (MB)")
    title = "budget distribution vs stage memory"
    if unlimited and finite:
        title += f" ({unlimited} unlimited not shown)"
    ax_hist.set_title(title, fontsize=10)
    ax_hist.legend(fontsize=7, loc="upper right")
    ax_hist.grid(alpha=0.3)

    x = np.arange(len(spans))
    modelled_v = [s.max_of("modelled-memory-mb") or 0.0 for s in spans]
    peak_v = [s.max_of("max-peak-mb") or 0.0 for s in spans]
    ax_bar.bar(x - 0.2, modelled_v, 0.4, label="modelled (Eq. 4)", color=[stage_color(s.stage) for s in spans])
    ax_bar.bar(x + 0.2, peak_v, 0.4, label="measured peak (max over clients)", color="#555", alpha=0.75)
    for i in range(len(spans)):
        if budgets:
            fit = sum(1 for b in budgets.values() if b >= modelled_v[i])
            ax_bar.text(i, max(modelled_v[i], peak_v[i]) * 1.02, f"{fit}/{len(budgets)} fit", ha="center", fontsize=8)
    ax_bar.set_xticks(x, [s.label for s in spans], fontsize=8)
    ax_bar.set_ylabel("MB")
    ax_bar.set_title("per-stage training memory", fontsize=10)
    ax_bar.set_ylim(0, max(modelled_v + peak_v + [1.0]) * 1.25)
    ax_bar.legend(fontsize=7, loc="upper right")
    ax_bar.grid(alpha=0.3, axis="y")
    body = _img(fig, "client memory per stage against node budgets")
    rows = []
    for i, span in enumerate(spans):
        fit = sum(1 for b in budgets.values() if b >= modelled_v[i]) if budgets else None
        rows.append(
            [
                span.label,
                f"{span.first}-{span.last}",
                stage_reason(run, span),
                span.max_of("modelled-memory-mb"),
                span.max_of("max-peak-mb"),
                span.max_of("max-rss-peak-mb"),
                "-" if fit is None else f"{fit}/{len(budgets or {})}",
            ]
        )
    body += _table(
        [
            "stage",
            "rounds",
            "ended because",
            "modelled MB",
            "measured peak MB",
            "process RSS peak MB",
            "budgets that fit",
        ],
        rows,
    )
    body += _note(
        "Modelled: the strategy's training-memory model for the stage at the batch size. Measured peak: the largest "
        "tracked training peak any client reported. RSS: the client process's resident memory (includes the "
        "interpreter and libraries), shown for reference."
    )
    return body


def panel_participation(run: RunData, spans: list[StageSpan]) -> str:
    """Panel 3: rounds trained per client and stage, and which clients trained in which round."""
    if not run.trained:
        return _note("No training round recorded yet.")
    if not has_participant_ids(run):
        fig, axes = _fig(11, 3.4)
        ax = axes[0][0]
        for key, label in (("eligible", "eligible"), ("participants", "trained"), ("failures", "failed")):
            x, y = _series(run.trained, key)
            if x:
                ax.plot(x, y, marker="o", ms=3, label=label)
        _mark_stages(ax, spans)
        _round_axis(ax)
        ax.set_ylabel("clients")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        return _img(fig, "participants per round") + _note(
            "This run did not record which clients trained (no participant-ids); counts per round only."
        )
    ids = client_ids(run)
    index = {pid: i for i, pid in enumerate(ids)}
    counts = np.zeros((len(ids), len(spans)), dtype=int)
    rounds = [int(r["round"]) for r in run.trained]
    raster = np.zeros((len(ids), len(rounds)))
    for j, span in enumerate(spans):
        for row in span.rows:
            for pid in row.get("participant-ids") or []:
                counts[index[int(pid)], j] += 1
    for k, row in enumerate(run.trained):
        for pid in row.get("participant-ids") or []:
            raster[index[int(pid)], k] = 1.0
    height = float(min(14.0, max(3.2, 0.22 * len(ids) + 1.4)))
    fig, axes = _fig(11, height, ncols=2, gridspec_kw={"width_ratios": [max(1, len(spans)) + 2.5, 7]})
    ax_heat, ax_raster = axes[0]
    im = ax_heat.imshow(counts, aspect="auto", cmap="Blues", vmin=0, vmax=max(1, counts.max()))
    ax_heat.set_xticks(range(len(spans)), [s.label for s in spans], fontsize=8, rotation=30 if len(spans) > 3 else 0)
    step = max(1, len(ids) // 30)
    ax_heat.set_yticks(range(0, len(ids), step), [str(p) for p in ids[::step]], fontsize=7)
    ax_heat.set_ylabel("client (partition id)")
    ax_heat.set_title("rounds trained per client and stage", fontsize=10)
    if len(ids) * len(spans) <= 400:
        for i in range(len(ids)):
            for j in range(len(spans)):
                dark = counts[i, j] > 0.6 * counts.max()
                ax_heat.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7, color="w" if dark else "k")
    fig.colorbar(im, ax=ax_heat, shrink=0.8, label="rounds", ticks=MaxNLocator(integer=True))
    colors = np.ones((len(ids), len(rounds), 4))
    budgets = node_budgets(run) or {}
    for k, row in enumerate(run.trained):
        color = to_rgba(stage_color(None if row.get("stage") is None else int(row["stage"])))
        colors[raster[:, k] > 0, k] = color
    ax_raster.imshow(
        colors, aspect="auto", interpolation="nearest", extent=(0.5, len(rounds) + 0.5, len(ids) - 0.5, -0.5)
    )
    for i in range(len(ids) + 1):
        ax_raster.axhline(i - 0.5, color="#eee", lw=0.5)
    for span in spans[1:]:
        ax_raster.axvline(span.first - 0.5, color="grey", ls=":", lw=1.2)
    ax_raster.set_yticks(range(0, len(ids), step), [str(p) for p in ids[::step]], fontsize=7)
    _round_axis(ax_raster)
    ax_raster.set_title("who trained in which round (colour = stage)", fontsize=10)
    if budgets:
        labels = [("inf" if not math.isfinite(budgets.get(p, math.inf)) else f"{budgets[p]:.0f}") for p in ids[::step]]
        twin = ax_raster.twinx()
        twin.set_ylim(ax_raster.get_ylim())
        twin.set_yticks(range(0, len(ids), step), labels, fontsize=7)
        twin.set_ylabel("budget (MB)", fontsize=8)
    body = _img(fig, "participation per client, stage and round")
    never = [pid for pid in ids if counts[index[pid]].sum() == 0]
    rate = _num(run.summary.get("participation-rate"))
    facts = [f"{len(ids)} clients"]
    if rate is not None:
        facts.append(f"participation rate {100 * rate:.0f}% (trained at least once)")
    facts.append(f"never trained: {never}" if never else "every client trained at least once")
    return body + _note("; ".join(facts) + ".")


def panel_pace(run: RunData, spans: list[StageSpan]) -> str:
    """Panel 4: pace-controller metric, smoothed curve and relative slope vs tau, with freeze decisions."""
    if run.pace is None:
        return _na(run.strategy, "it has no pace controller (no pace.json)")
    history = [h for h in run.pace.get("pace") or [] if isinstance(h, dict)]
    observed = [h for h in history if _num(h.get("metric")) is not None]
    events = _freeze_events(run)
    tau = _num(run.config.get("pace-tau"))
    if not observed:
        text = (
            "The pace controller made no observation with a full window: every stage ended (see the reasons "
            "below) before it had collected enough rounds."
        )
        table = _table(["round", "block frozen", "reason"], [list(e) for e in events]) if events else ""
        return _note(text) + table
    fig, axes = _fig(11, 4.6, nrows=2, sharex=True)
    ax_m, ax_s = axes[0][0], axes[1][0]
    for ax in (ax_m, ax_s):
        _mark_stages(ax, spans, label=ax is ax_m)
    if run.trained:
        ax_s.set_xlim(0.5, int(run.trained[-1]["round"]) + 0.5)
    profl = run.strategy == "profl"  # ProFL's pace tracks steps (shrinking, then growing) by effective movement
    unit = "step" if profl else "block"
    metric_name = "effective-movement" if profl else run.config.get("pace-metric", "metric")
    blocks = sorted({int(h["block"]) for h in history})
    positive = [v for v in (_num(h.get("metric")) for h in observed) if v is not None and v > 0]
    for block in blocks:
        hs = [h for h in history if int(h["block"]) == block]
        color = stage_color(block + 1)
        mx = [int(h["round"]) for h in hs if _num(h.get("metric")) is not None]
        my = [float(h["metric"]) for h in hs if _num(h.get("metric")) is not None]
        sx = [int(h["round"]) for h in hs if _num(h.get("smoothed")) is not None]
        sy = [float(h["smoothed"]) for h in hs if _num(h.get("smoothed")) is not None]
        if not mx:
            continue
        ax_m.plot(mx, my, ".", color=color, alpha=0.6, label=f"{unit} {block + 1} metric")
        ax_m.plot(sx, sy, "-", color=color, lw=2, label=f"{unit} {block + 1} smoothed")
        fx = [int(h["round"]) for h in hs if h.get("freeze") and _num(h.get("smoothed")) is not None]
        fy = [float(h["smoothed"]) for h in hs if h.get("freeze") and _num(h.get("smoothed")) is not None]
        ax_m.plot(fx, fy, "*", color="red", ms=13, mec="black", label="_freeze")
        gx = [int(h["round"]) for h in hs if _num(h.get("slope")) is not None]
        gy = [float(h["slope"]) for h in hs if _num(h.get("slope")) is not None]
        ax_s.plot(gx, gy, "-o", color=color, ms=3)
        ux = [int(h["round"]) for h in hs if h.get("under") and _num(h.get("slope")) is not None]
        uy = [float(h["slope"]) for h in hs if h.get("under") and _num(h.get("slope")) is not None]
        ax_s.plot(ux, uy, "o", mfc="none", mec="black", ms=7)
    if len(positive) == len(observed) and max(positive) / min(positive) > 20:
        ax_m.set_yscale("log")
    slopes = [abs(float(h["slope"])) for h in history if _num(h.get("slope")) is not None]
    if tau is not None:
        ax_s.axhspan(-tau, tau, color="green", alpha=0.1, label=f"|slope| < tau = {tau:g}")
        ax_s.axhline(tau, color="green", lw=1)
        ax_s.axhline(-tau, color="green", lw=1)
    limit = max([3 * (tau or 0.01)] + [min(s, 1.0) for s in slopes]) * 1.1
    ax_s.set_ylim(-limit, limit)
    for k, (rnd, block, reason) in enumerate(events):
        for ax in (ax_m, ax_s):
            ax.axvline(rnd + 0.5, color="red" if reason == "converged" else "#c80", lw=1.2, ls="--")
        ax_m.text(
            rnd + 0.5,
            0.98 - 0.2 * (k % 2),
            f" B{block} frozen\n ({reason})",
            transform=ax_m.get_xaxis_transform(),
            fontsize=7,
            va="top",
            color="red" if reason == "converged" else "#a60",
        )
    ax_m.set_ylabel(f"{unit} metric ({metric_name})")
    ax_m.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax_m.grid(alpha=0.3)
    ax_s.set_ylabel("relative slope / round")
    _round_axis(ax_s)
    ax_s.grid(alpha=0.3)
    if tau is not None:
        ax_s.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    body = _img(fig, "pace controller curve")
    body += _note(
        "Top: the block metric after every round (dots) and its moving average (line), one colour per block; "
        "a red star marks the round the controller signalled convergence. "
        "Bottom: relative slope of the smoothed curve; circled points are under tau (they count towards the "
        f"streak of {run.config.get('pace-consecutive', 'C')} rounds). Dashed lines: block frozen "
        "(red: converged; orange: round budget or max-stage-rounds)."
    )
    if events:
        body += _table(["round", "block frozen", "reason"], [list(e) for e in events])
    return body


def panel_similarity(run: RunData) -> str:
    """Panel 5: client similarity matrix ordered by community, with community boxes."""
    communities = [[int(p) for p in c] for c in run.summary.get("communities") or [] if isinstance(c, list)]
    if run.similarity is None:
        if run.strategy != "smartfreeze":
            return _na(run.strategy, "it does not cluster clients (no similarity.npy)")
        if run.config.get("selector", "rlcd") != "rlcd":
            return _na(run.strategy, f"selector={run.config.get('selector')!r} detects no communities")
        body = _note("This run did not save its client similarity matrix (no similarity.npy).")
        if communities:
            rows = [[f"C{k + 1}", len(c), c] for k, c in enumerate(communities)]
            body += _table(["community", "size", "clients (partition ids)"], rows)
        return body
    sim = np.asarray(run.similarity, dtype=float)
    n = sim.shape[0]
    members = sorted(p for c in communities for p in c)
    ids = members if len(members) == n and len(set(members)) == n else list(range(n))
    pos = {pid: i for i, pid in enumerate(ids)}
    order_ids = [p for c in communities for p in c if p in pos] if ids is members else []
    order_ids += [p for p in ids if p not in order_ids]
    order = [pos[p] for p in order_ids]
    mat = sim[np.ix_(order, order)]
    size = float(min(8.0, max(4.0, 0.28 * n + 1.8)))
    fig, axes = _fig(size + 1.5, size)
    ax = axes[0][0]
    im = ax.imshow(mat, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    step = max(1, n // 40)
    ax.set_xticks(range(0, n, step), [str(p) for p in order_ids[::step]], fontsize=7, rotation=90)
    ax.set_yticks(range(0, n, step), [str(p) for p in order_ids[::step]], fontsize=7)
    ax.set_xlabel("client (partition id), ordered by community")
    ax.set_ylabel("client (partition id)")
    if n <= 16:
        for i in range(n):
            for j in range(n):
                color = "white" if abs(mat[i, j]) > 0.6 else "black"
                ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=6, color=color)
    offset = 0
    if ids is members:
        for k, community in enumerate(communities):
            color = stage_color(k + 1)
            ax.add_patch(
                Rectangle((offset - 0.5, offset - 0.5), len(community), len(community), fill=False, ec=color, lw=2.5)
            )
            ax.text(
                offset + len(community) / 2 - 0.5,
                -0.6,
                f"C{k + 1}",
                color=color,
                fontsize=9,
                fontweight="bold",
                ha="center",
                va="bottom",
            )
            offset += len(community)
    fig.colorbar(im, ax=ax, shrink=0.8, label="cosine similarity of output-layer gradients")
    side = ""
    if communities:
        side += _table(
            ["community", "size", "clients (partition ids)"],
            [[f"C{k + 1}", len(c), c] for k, c in enumerate(communities)],
        )
        if ids is not members:
            side += _note("The communities do not cover the matrix's rows; rows are shown by index.")
    splits = run.summary.get("community-splits")
    if splits:
        side += _note(f"Communities split by RL-CD's sharpening step: {len(splits)}.")
    side += _note(
        f"{n} clients ordered by community; boxes mark the communities RL-CD detected from the cosine similarity "
        "of the clients' output-layer gradients (first monitor query)."
    )
    return f'<div class="row">{_img(fig, "client similarity matrix with communities")}<div>{side}</div></div>'


def panel_bytes(run: RunData, spans: list[StageSpan]) -> str:
    """Panel 6: bytes down and up per round, with the cumulative total."""
    xd, down = _series(run.trained, "bytes-down", 1 / MB)
    xu, up = _series(run.trained, "bytes-up", 1 / MB)
    if not xd and not xu:
        return _na(run.strategy, "no byte counts recorded")
    fig, axes = _fig(11, 3.2)
    ax = axes[0][0]
    ax.bar(np.array(xd) - 0.2, down, 0.4, label="down (server -> clients)", color="#4c72b0")
    ax.bar(np.array(xu) + 0.2, up, 0.4, label="up (clients -> server)", color="#dd8452")
    _mark_stages(ax, spans)
    _round_axis(ax)
    ax.set_ylabel("MB per round")
    ax.grid(alpha=0.3, axis="y")
    twin = ax.twinx()
    total = {}
    for x, v in zip(xd, down, strict=True):
        total[x] = total.get(x, 0.0) + v
    for x, v in zip(xu, up, strict=True):
        total[x] = total.get(x, 0.0) + v
    xs = sorted(total)
    twin.plot(xs, np.cumsum([total[x] for x in xs]), color="black", lw=1.5, label="cumulative (down + up)")
    twin.set_ylabel("cumulative MB")
    handles = ax.get_legend_handles_labels()
    extra = twin.get_legend_handles_labels()
    ax.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=8, loc="upper left")
    body = _img(fig, "bytes per round")
    facts = [f"total down {sum(down):.1f} MB, up {sum(up):.1f} MB (MB = 10^6 bytes)"]
    monitor = _num(run.summary.get("monitor-bytes"))
    if monitor:
        facts.append(f"monitor queries (not in the bars) {monitor / MB:.1f} MB")
    return body + _note("; ".join(facts) + ".")


def panel_config(run: RunData) -> str:
    """Panel 7: the resolved run config as a table."""
    if not run.config:
        return _note("No config recorded.")
    return '<div class="cols">' + _table(["key", "value"], [[k, v] for k, v in run.config.items()]) + "</div>"


def _summary_line(run: RunData) -> str:
    c, s = run.config, run.summary
    data = Path(str(c.get("data-path"))).name if c.get("dataset") == "npz" else c.get("dataset", "?")
    parts = [
        f"strategy <b>{escape(run.strategy)}</b>",
        f"model {escape(str(c.get('model', '?')))} w{escape(str(c.get('width', '?')))}",
        f"data {escape(str(data))} ({escape(str(c.get('partition', '?')))})",
        f"devices {escape(str(c.get('device-profile', '?')))}",
        f"{len(run.trained)} of {escape(str(c.get('num-rounds', '?')))} rounds",
    ]
    if _num(s.get("final-accuracy")) is not None:
        parts.append(f"final accuracy {100 * float(s['final-accuracy']):.2f}%")
    if _num(s.get("wall-seconds")) is not None:
        parts.append(f"{float(s['wall-seconds']):.0f} s wall")
    if not s:
        parts.append("<b>run incomplete</b> (no summary)")
    parts.append(f"folder {escape(str(run.run_dir))}")
    parts.append(f"generated {time.strftime('%Y-%m-%d %H:%M:%S')}")
    return " · ".join(parts)


def render_report(run: RunData) -> str:
    """The HTML of one run's report."""
    spans = stage_spans(run)
    builders: list[Callable[[], str]] = [
        lambda: panel_accuracy(run, spans),
        lambda: panel_memory(run, spans),
        lambda: panel_participation(run, spans),
        lambda: panel_pace(run, spans),
        lambda: panel_similarity(run),
        lambda: panel_bytes(run, spans),
        lambda: panel_config(run),
    ]
    sections = [(title, _safe(build, title)) for title, build in zip(PANELS, builders, strict=True)]
    return _page(f"Run report: {run.name}", _summary_line(run), sections)


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write ``report.html`` (or ``out``) for the run folder ``run_dir``; returns its path."""
    run = load_run(Path(run_dir))
    path = Path(out) if out is not None else run.run_dir / REPORT_NAME
    _atomic_write_text(path, render_report(run))
    return path


# ---------------------------------------------------------------------------------------------- CLI
def expand_run_dirs(paths: Sequence[Path]) -> list[Path]:
    """Run folders named by ``paths``: a folder without metrics.json stands for every folder below it that has one."""
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if (p / "metrics.json").is_file():
            out.append(p)
            continue
        subs = sorted(m.parent for m in p.rglob("metrics.json")) if p.is_dir() else []
        if not subs:
            raise FileNotFoundError(f"{p} is not a run folder (no metrics.json) and holds none")
        out += subs
    return out


def default_comparison_path() -> Path:
    """``<outputs>/comparison-report.html`` ($PROGFL_OUTPUT_DIR, else ./outputs)."""
    return Path(os.environ.get("PROGFL_OUTPUT_DIR") or "outputs") / "comparison-report.html"


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m server_app.report",
        description="Write report.html for one run folder, or a comparison page for several.",
    )
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run folder(s) (outputs/<run-name>)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output file (one run: default <run-dir>/report.html; several: outputs/comparison-report.html)",
    )
    args = parser.parse_args(argv)
    try:
        dirs = expand_run_dirs(args.run_dirs)
        if len(dirs) == 1:
            path = write_report(dirs[0], args.out)
        else:
            from server_app.report_compare import write_comparison

            path = write_comparison(dirs, args.out or default_comparison_path())
    except (FileNotFoundError, ValueError, json.JSONDecodeError) as exc:
        print(f"report: error: {exc}", file=sys.stderr)
        return 2
    print(path.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
