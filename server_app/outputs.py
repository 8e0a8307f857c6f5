"""Run outputs: ``outputs/<run-name>/`` with metrics (JSON, CSV), config, checkpoint, plot.

Everything is rewritten atomically (temp file + rename) after every round, so a run that
stops early keeps every round it completed.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import RunConfig
from common.runfolder import OUTPUT_ENV, run_folder

__all__ = ["OUTPUT_ENV", "RunRecorder", "atomic_write_bytes", "resolve_run_dir"]


def resolve_run_dir(cfg: RunConfig, now: float | None = None) -> Path:
    """``<output-dir>/<run-name>`` (:func:`common.runfolder.run_folder`)."""
    return run_folder(cfg.output_dir, cfg.run_name, cfg.strategy, cfg.model, now)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (np.floating, np.integer)):
        return _clean(value.item())
    return value


class RunRecorder:
    """Collects per-round metrics and writes the run folder."""

    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.rounds: list[dict[str, Any]] = []
        self.summary: dict[str, Any] = {}
        self.started = time.time()
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(run_dir / "config.json", json.dumps(cfg.to_flat(), indent=2).encode())

    def add_round(self, row: dict[str, Any]) -> None:
        """Append one round's metrics and rewrite metrics.json / metrics.csv."""
        self.rounds.append({k: _clean(v) for k, v in row.items()})
        self.write_metrics()

    def set_summary(self, **values: Any) -> None:
        """Record run-level values (final accuracy, participation, ...) in metrics.json."""
        self.summary.update({k: _clean(v) for k, v in values.items()})
        self.write_metrics()

    def write_metrics(self) -> None:
        """Rewrite metrics.json and metrics.csv from what has been recorded."""
        doc = {"config": self.cfg.to_flat(), "summary": self.summary, "rounds": self.rounds}
        atomic_write_bytes(self.run_dir / "metrics.json", json.dumps(doc, indent=2).encode())
        columns: list[str] = []
        for row in self.rounds:
            columns += [k for k in row if k not in columns]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self.rounds)
        atomic_write_bytes(self.run_dir / "metrics.csv", buf.getvalue().encode())

    def save_model(self, arrays: dict[str, np.ndarray], name: str = "model.pt") -> Path:
        """Save a state dict of plain tensors (loadable with ``torch.load(weights_only=True)``)."""
        buf = io.BytesIO()
        torch.save({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}, buf)
        path = self.run_dir / name
        atomic_write_bytes(path, buf.getvalue())
        return path

    def plot_accuracy(self) -> Path | None:
        """accuracy.png: server (and client) accuracy per round."""
        rows = [r for r in self.rounds if r.get("server-accuracy") is not None]
        if not rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        ax.plot(
            [r["round"] for r in rows],
            [100 * r["server-accuracy"] for r in rows],
            marker="o",
            label="server (test set)",
        )
        crow = [r for r in self.rounds if r.get("client-accuracy") is not None]
        if crow:
            ax.plot(
                [r["round"] for r in crow],
                [100 * r["client-accuracy"] for r in crow],
                marker=".",
                ls="--",
                label="clients (local val)",
            )
        stages = [(r["round"], r["stage"]) for r in self.rounds if r.get("stage") is not None and r["round"] > 0]
        for (_, prev), (rnd, cur) in zip(stages, stages[1:], strict=False):
            if cur != prev:
                ax.axvline(rnd - 0.5, color="grey", ls=":", lw=1)
                ax.text(rnd - 0.4, ax.get_ylim()[0] + 1, f"stage {cur}", fontsize=7, color="grey")
        ax.set_xlabel("round")
        ax.set_ylabel("accuracy (%)")
        data = Path(self.cfg.data_path).name if self.cfg.dataset == "npz" else self.cfg.dataset
        ax.set_title(f"{self.cfg.strategy} · {self.cfg.model} w{self.cfg.width} · {data}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        path = self.run_dir / "accuracy.png"
        atomic_write_bytes(path, buf.getvalue())
        return path
