"""Run report (server_app/report.py): panels, "not applicable" notes, comparison page, CLI, headless render.

The fake run folders mimic what the ServerApp writes (metrics.json, pace.json, similarity.npy).
The ``slow`` test renders a report in headless Chromium (Debian: ``apt-get install chromium``)
and checks the screenshot is a real page; it is skipped when Chromium is not installed.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from server_app.report import PANELS, load_run, main, write_report
from server_app.report_compare import COMPARISON_PANELS, write_comparison

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _config(strategy: str, name: str, rounds: int) -> dict:
    return {
        "strategy": strategy,
        "model": "resnet10",
        "width": 0.25,
        "dataset": "synthetic",
        "partition": "iid",
        "num-rounds": rounds,
        "device-profile": "high-contention" if strategy == "smartfreeze" else "none",
        "selector": "rlcd",
        "pace-metric": "perturbation",
        "pace-tau": 0.05,
        "pace-consecutive": 3,
        "run-name": name,
    }


def make_run(
    root: Path,
    name: str,
    strategy: str = "smartfreeze",
    rounds: int = 8,
    *,
    with_ids: bool = True,
    with_summary: bool = True,
) -> Path:
    """A fake run folder: ``smartfreeze`` with 2 stages, pace history and similarity; ``fedavg`` without."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    progressive = strategy == "smartfreeze"
    half = rounds // 2
    rows: list[dict] = [
        {"round": 0, **({"stage": 1} if progressive else {}), "server-accuracy": 0.1, "server-loss": 2.3}
    ]
    sim_time = 0.0
    for rnd in range(1, rounds + 1):
        stage = 1 if rnd <= half else 2
        ids = [0, 2, 4] if rnd % 2 else [1, 3, 5]
        sim_time += 4.0
        row = {
            "round": rnd,
            **({"stage": stage} if progressive else {}),
            "server-accuracy": 0.1 + 0.08 * rnd,
            "server-loss": 2.3 - 0.2 * rnd,
            "client-accuracy": 0.1 + 0.07 * rnd,
            "client-loss": 2.2 - 0.2 * rnd,
            "train-loss": 2.1 - 0.2 * rnd,
            "participants": 3.0,
            "failures": 0.0,
            "eligible": 4.0 if stage == 1 else 6.0,
            "bytes-down": 1.2e6 * stage,
            "bytes-up": 1.1e6 * stage,
            "modelled-memory-mb": 20.5 if stage == 1 else 12.2,
            "max-peak-mb": 21.0 if stage == 1 else 12.0,
            "max-rss-peak-mb": 1010.0,
            "sim-round-seconds": 4.0,
            "sim-time": sim_time,
            "round-seconds": 1.5,
            "wall-seconds": 1.5 * rnd,
        }
        if with_ids:
            row["participant-ids"] = ids
        if progressive:
            row.update(
                {
                    "pace-metric": 0.5 / rnd,
                    "pace-smoothed": 0.55 / rnd,
                    "pace-slope": -0.2 / rnd,
                    "pace-streak": 0,
                    "froze-block": 1 if rnd == half else None,
                    "freeze-reason": "converged" if rnd == half else None,
                }
            )
        rows.append(row)
    summary: dict = {}
    if with_summary:
        summary = {
            "strategy": strategy,
            "rounds": rounds,
            "final-accuracy": rows[-1]["server-accuracy"],
            "best-accuracy": rows[-1]["server-accuracy"],
            "participation-rate": 1.0,
            "num-nodes": 6,
            "node-memory-mb": {str(i): (-1.0 if not progressive else 10.0 + 4.0 * i) for i in range(6)},
            "bytes-down": sum(r.get("bytes-down", 0) for r in rows),
            "bytes-up": sum(r.get("bytes-up", 0) for r in rows),
            "wall-seconds": 1.5 * rounds,
        }
        if progressive:
            summary.update(
                {
                    "communities": [[0, 2, 4], [1, 3, 5]],
                    "community-splits": [],
                    "monitor-bytes": 5_000_000,
                    "stages": [
                        {"stage": 1, "start-round": 1, "end-round": half, "reason": "converged"},
                        {"stage": 2, "start-round": half + 1, "end-round": rounds, "reason": "end"},
                    ],
                }
            )
    doc = {"config": _config(strategy, name, rounds), "summary": summary, "rounds": rows}
    (run_dir / "metrics.json").write_text(json.dumps(doc))
    (run_dir / "config.json").write_text(json.dumps(doc["config"]))
    if progressive:
        history = [
            {
                "block": 0 if rnd <= half else 1,
                "round": rnd,
                "metric": 0.5 / rnd if rnd > 1 else None,
                "smoothed": 0.55 / rnd if rnd > 1 else None,
                "slope": -0.2 / rnd if rnd > 2 else None,
                "under": rnd > 2 and 0.2 / rnd < 0.05,
                "streak": 0,
                "freeze": rnd == half,
            }
            for rnd in range(1, rounds + 1)
        ]
        (run_dir / "pace.json").write_text(json.dumps({"stages": {}, "pace": history}))
        rng = np.random.default_rng(0)
        sim = np.clip(rng.uniform(-0.3, 0.3, (6, 6)), -1, 1)
        sim = (sim + sim.T) / 2
        for group in ([0, 2, 4], [1, 3, 5]):
            sim[np.ix_(group, group)] = 0.8
        np.fill_diagonal(sim, 1.0)
        np.save(run_dir / "similarity.npy", sim)
    return run_dir


def _images(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def test_report_has_every_panel_with_images(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, "sf")
    path = write_report(run_dir)
    assert path == run_dir / "report.html"
    html = path.read_text()
    for heading in PANELS:
        assert f"<h2>{heading}</h2>" in html
    images = _images(html)
    assert len(images) >= 6  # panels 1-6 each draw a figure; panel 7 is a table
    assert all(img.startswith(PNG_MAGIC) and len(img) > 5000 for img in images)
    assert 'class="panel-error"' not in html
    assert "not applicable" not in html.lower()
    assert "stage 2" in html and "converged" in html  # stage schedule / freeze decisions
    assert "C1" in html and "[0, 2, 4]" in html  # communities
    assert "pace-tau" in html  # config table
    assert 'src="http' not in html and "<script" not in html  # self-contained, static


def test_fedavg_panels_say_not_applicable(tmp_path: Path) -> None:
    html = write_report(make_run(tmp_path, "fa", strategy="fedavg")).read_text()
    for heading in PANELS:
        assert f"<h2>{heading}</h2>" in html
    assert 'class="panel-error"' not in html
    notes = re.findall(r'<p class="na">([^<]*)</p>', html)
    assert any("pace controller" in n for n in notes)
    assert any("cluster" in n for n in notes)
    assert all(n.startswith("Not applicable for this strategy (fedavg)") for n in notes)
    assert len(_images(html)) >= 4  # accuracy, memory, participation, bytes still drawn


def test_incomplete_run_without_ids_renders(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, "old", with_ids=False, with_summary=False)
    html = write_report(run_dir).read_text()
    assert 'class="panel-error"' not in html
    assert "run incomplete" in html
    assert "no participant-ids" in html


def test_load_run_reads_the_folder(tmp_path: Path) -> None:
    run = load_run(make_run(tmp_path, "sf"))
    assert run.strategy == "smartfreeze" and run.name == "sf"
    assert run.similarity is not None and run.similarity.shape == (6, 6)
    assert run.pace is not None and len(run.trained) == 8
    with pytest.raises(FileNotFoundError, match="no metrics.json"):
        load_run(tmp_path / "nothing")


def test_comparison_of_two_runs(tmp_path: Path) -> None:
    a = make_run(tmp_path / "x", "run")
    b = make_run(tmp_path / "y", "run", strategy="fedavg")
    out = write_comparison([a, b], tmp_path / "cmp" / "comparison.html")
    html = out.read_text()
    for heading in COMPARISON_PANELS:
        assert f"<h2>{heading}</h2>" in html
    assert len(_images(html)) >= 4
    assert 'class="panel-error"' not in html
    assert "x/run" in html and "y/run" in html  # same folder names get distinct labels
    assert "smartfreeze" in html and "fedavg" in html


def test_comparison_groups_runs_that_differ_only_in_their_seed(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for label, strategy, shift in (("sf", "smartfreeze", 0.05), ("small", "allsmall", 0.0)):
        for seed in (0, 1, 2):
            run_dir = make_run(runs / label, f"seed-{seed}", strategy=strategy)
            doc = json.loads((run_dir / "metrics.json").read_text())
            doc["config"]["seed"] = seed
            for row in doc["rounds"]:
                row["server-accuracy"] += shift + 0.01 * seed * (1 if strategy == "smartfreeze" else 2)
            (run_dir / "metrics.json").write_text(json.dumps(doc))
    assert main([str(runs), "--out", str(tmp_path / "seeds.html")]) == 0  # folders found recursively
    html = (tmp_path / "seeds.html").read_text()
    assert "<h2>Seeds</h2>" in html and "6 runs" in html
    # sf: last-5 mean of 0.1 + 0.08 r (r = 4..8) + 0.05 + 0.01 s -> 63.0 / 64.0 / 65.0
    assert "63.0, 64.0, 65.0" in html and "64.0 ± 1.0" in html
    assert "sf minus small (best other memory-constrained group)" in html and "+4.0 ± 1.0 points" in html
    single = write_comparison([runs / "sf" / "seed-0", runs / "small" / "seed-0"], tmp_path / "one.html")
    assert "No two runs differ only in their seed" in single.read_text()


def test_cli_one_run_several_runs_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = make_run(tmp_path / "runs", "a")
    b = make_run(tmp_path / "runs", "b", strategy="fedavg")
    assert main([str(a)]) == 0
    assert (a / "report.html").is_file()
    out = tmp_path / "c.html"
    assert main([str(a), str(b), "--out", str(out)]) == 0
    assert "<h2>Summary</h2>" in out.read_text()
    folder_out = tmp_path / "d.html"
    assert main([str(tmp_path / "runs"), "--out", str(folder_out)]) == 0  # a folder of runs stands for them all
    assert "2 runs" in folder_out.read_text()
    assert main([str(tmp_path / "missing")]) == 2
    assert "not a run folder" in capsys.readouterr().err


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium)")
    from matplotlib.image import imread

    report = write_report(make_run(tmp_path, "sf"))
    shot = tmp_path / "shot.png"
    with tempfile.TemporaryDirectory() as profile:
        cmd = [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            f"--screenshot={shot}",
            "--window-size=1280,4000",
            report.resolve().as_uri(),
        ]
        subprocess.run(cmd, check=True, capture_output=True, timeout=180)
    assert shot.is_file() and shot.read_bytes().startswith(PNG_MAGIC)
    pixels = imread(shot)
    assert pixels.shape[:2] == (4000, 1280)
    rgb = pixels[..., :3]
    content_rows = np.flatnonzero((rgb < 0.95).any(axis=(1, 2)))
    assert content_rows.size > 0 and content_rows[-1] > 2000  # the figures fill most of the page
    assert len(np.unique((rgb.reshape(-1, 3) * 255).astype(np.uint8), axis=0)) > 200  # real plots, not a blank page
