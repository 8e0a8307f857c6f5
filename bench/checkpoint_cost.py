"""Checkpoint size and write/load time of a SmartFreeze server state (pace window full on the largest block)."""

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from common.config import parse_run_config
from server_app import checkpoint as ck
from server_app.outputs import RunRecorder
from server_app.smartfreeze import SmartFreezeStrategy
from server_app.strategy import NodeInfo

for model, width in (("resnet10", 0.25), ("resnet18", 1.0)):
    d = Path(tempfile.mkdtemp())
    cfg = parse_run_config(
        {
            "strategy": "smartfreeze",
            "model": model,
            "width": width,
            "num-rounds": 100,
            "synthetic-train-size": 200,
            "synthetic-test-size": 50,
        }
    )
    s = SmartFreezeStrategy(cfg, RunRecorder(cfg, d), 10)
    for pid in range(100):
        s.nodes[pid] = NodeInfo(pid, pid, 500, 100.0, 1e9, list(range(1, 100, 3)))
        s.selector.update_client(pid, importance=1.0 + pid, completion_time=2.0)
    last = s.model.num_blocks - 1
    s.pace.reset(last)
    params = np.concatenate([s.arrays[k].ravel() for k in s._block_param_keys(last)])
    for r in range(cfg.pace_window + 1):
        s.pace.observe(r, params + r * 1e-3)
    for r in range(1, 101):
        s.recorder.rounds.append({"round": r, "server-accuracy": 0.5, "participant-ids": list(range(10))})
    t = time.perf_counter()
    arrays, state = s.checkpoint_state()
    t_state = time.perf_counter() - t
    t = time.perf_counter()
    path = ck.save_checkpoint(d, 100, s.name, cfg.to_flat(), state, arrays)
    t_save = time.perf_counter() - t
    t = time.perf_counter()
    c = ck.load_checkpoint(d)
    s.restore_state(c.decoded_state())
    t_load = time.perf_counter() - t
    model_mib = sum(v.nbytes for v in s.arrays.values()) / 2**20
    print(
        f"{model} w{width}: model {model_mib:.1f} MiB, pace block {params.size} values, "
        f"checkpoint {path.stat().st_size / 2**20:.1f} MiB; state {t_state * 1e3:.0f} ms, "
        f"write+fsync {t_save * 1e3:.0f} ms, load+restore {t_load * 1e3:.0f} ms"
    )
    shutil.rmtree(d)
