"""Checkpoint and resume: one file per run folder, rewritten atomically after every completed round.

``<run-dir>/checkpoint.npz`` is a plain NumPy archive (read with ``allow_pickle=False``):

* ``state``: a uint8 array holding one UTF-8 JSON document: format version, the round it was
  taken after, the strategy name, the resolved run config, and the strategy's state
  (:meth:`server_app.strategy.FedAvgStrategy.checkpoint_state`: node table, stage machine, pace
  controller, selector, strategy counters, the metrics history so far);
* ``a0``, ``a1``, ...: every array of that state (the global model arrays, the pace
  controller's update buffer, ...); the JSON refers to them by name (``{"__ndarray__": "arrays/..."}``)
  and the ``arrays`` index of the JSON maps names to members.

One file means one ``os.replace`` (after an fsync of the temp file): a crash at any moment leaves
either the previous complete checkpoint or the new one, never a mix. Nothing is unpickled: JSON
plus raw arrays only.

:func:`encode` / :func:`decode` turn strategy attributes into JSON plus arrays and back. They
handle ``None``, bools, numbers (inf/nan included), strings, lists, tuples, sets, dicts (any
int/str keys), numpy arrays and scalars, and objects with ``state_dict()`` /
``from_state_dict()`` (stage machine, pace controller, selector): such an object is stored as
its state dict and rebuilt with ``type(current_attribute).from_state_dict``. A ``state_dict``
that accepts ``arrays=True`` (the pace controller) keeps its large arrays binary.

``python -m server_app.checkpoint overrides <run-dir>`` prints the ``--run-config`` that resumes
a run (``./run.sh resume`` uses it); ``nodes <run-dir>`` prints how many nodes it had.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.config import ConfigError, RunConfig, parse_run_config

CHECKPOINT_NAME = "checkpoint.npz"
FORMAT_VERSION = 1
STATE_MEMBER = "state"

RESUME_EXEMPT_KEYS: tuple[str, ...] = (
    "resume",
    "stop-after-round",
    "run-name",
    "output-dir",
    "verbose",
    "node-wait-seconds",
    "round-timeout",
)
"""Run-config keys a resumed run may change: they locate the run or are operational, never results."""

_ARRAY = "__ndarray__"
_OBJECT = "__object__"
_SET = "__set__"
_TUPLE = "__tuple__"
_ITEMS = "__items__"
_MARKERS = (_ARRAY, _OBJECT, _SET, _TUPLE, _ITEMS)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not belong to the run being resumed."""


class StopAfterRound(RuntimeError):
    """Raised by the ServerApp after the round named by ``stop-after-round`` (testing an interruption)."""


@dataclass(frozen=True)
class ObjectState:
    """A decoded ``state_dict`` waiting for its class (``type(attribute).from_state_dict``)."""

    state: dict[str, Any]

    def build(self, current: object, name: str) -> object:
        """Rebuild the object with the class of ``current`` (the attribute of a freshly built strategy)."""
        from_state = getattr(type(current), "from_state_dict", None)
        if from_state is None:
            raise CheckpointError(f"checkpoint holds a state dict for {name!r}, but {type(current).__name__} has none")
        return from_state(self.state)


def _state_dict(obj: Any) -> dict[str, Any]:
    method = obj.state_dict
    if "arrays" in inspect.signature(method).parameters:
        return method(arrays=True)
    return method()


def encode(value: Any, arrays: dict[str, np.ndarray], path: str) -> Any:
    """JSON-ready form of ``value``; its numpy arrays go to ``arrays`` under names starting with ``path``."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, np.generic):
        return encode(value.item(), arrays, path)
    if isinstance(value, int | float):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise TypeError(f"{path}: object arrays cannot be checkpointed")
        if path in arrays:
            raise ValueError(f"{path}: two arrays under the same checkpoint name")
        arrays[path] = value if value.flags.c_contiguous else value.copy(order="C")  # keeps 0-d arrays 0-d
        return {_ARRAY: path}
    if isinstance(value, list):
        return [encode(v, arrays, f"{path}/{i}") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {_TUPLE: [encode(v, arrays, f"{path}/{i}") for i, v in enumerate(value)]}
    if isinstance(value, set | frozenset):
        return {_SET: [encode(v, arrays, f"{path}/{i}") for i, v in enumerate(sorted(value))]}
    if isinstance(value, dict):
        if all(isinstance(k, str) and k not in _MARKERS for k in value):
            return {k: encode(v, arrays, f"{path}/{k}") for k, v in value.items()}
        items = []
        for i, (k, v) in enumerate(value.items()):
            if isinstance(k, bool) or not isinstance(k, int | str | np.integer):
                raise TypeError(f"{path}: dict key {k!r} cannot be checkpointed (int or str keys only)")
            items.append([encode(k, arrays, f"{path}/k{i}"), encode(v, arrays, f"{path}/{i}")])
        return {_ITEMS: items}
    if hasattr(value, "state_dict") and hasattr(type(value), "from_state_dict"):
        return {_OBJECT: encode(_state_dict(value), arrays, path)}
    raise TypeError(f"{path}: {type(value).__name__} cannot be checkpointed; give it state_dict/from_state_dict")


def decode(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    """Inverse of :func:`encode`; objects come back as :class:`ObjectState`."""
    if isinstance(value, list):
        return [decode(v, arrays) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        ((key, inner),) = value.items()
        if key == _ARRAY:
            if inner not in arrays:
                raise CheckpointError(f"checkpoint refers to array {inner!r}, which it does not hold")
            return arrays[inner]
        if key == _TUPLE:
            return tuple(decode(v, arrays) for v in inner)
        if key == _SET:
            return {decode(v, arrays) for v in inner}
        if key == _ITEMS:
            return {decode(k, arrays): decode(v, arrays) for k, v in inner}
        if key == _OBJECT:
            return ObjectState(decode(inner, arrays))
    return {k: decode(v, arrays) for k, v in value.items()}


@dataclass
class Checkpoint:
    """A loaded checkpoint: taken after ``round`` of a ``strategy`` run with ``config``."""

    round: int
    strategy: str
    config: dict[str, Any]
    state: dict[str, Any]
    arrays: dict[str, np.ndarray]
    path: Path

    def decoded_state(self) -> dict[str, Any]:
        """The strategy state with array references resolved (objects as :class:`ObjectState`)."""
        return decode(self.state, self.arrays)


def checkpoint_path(run_dir: Path) -> Path:
    """Where the checkpoint of the run in ``run_dir`` lives."""
    return Path(run_dir) / CHECKPOINT_NAME


def save_checkpoint(
    run_dir: Path, server_round: int, strategy: str, config: dict[str, Any], state: dict[str, Any], arrays: dict
) -> Path:
    """Write ``<run-dir>/checkpoint.npz`` atomically (temp file, fsync, rename); return its path.

    ``state`` must be JSON-ready (the output of :func:`encode`), ``arrays`` the arrays it refers to.
    """
    names = sorted(arrays)
    doc = {
        "format": FORMAT_VERSION,
        "round": int(server_round),
        "strategy": strategy,
        "config": config,
        "arrays": names,
        "state": state,
    }
    text = json.dumps(doc, allow_nan=True, separators=(",", ":")).encode()
    members = {f"a{i}": np.asarray(arrays[name]) for i, name in enumerate(names)}
    path = checkpoint_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:  # streamed to the temp file (no second copy in memory), flushed to disk, then renamed
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{STATE_MEMBER: np.frombuffer(text, dtype=np.uint8)}, **members)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _read_doc(npz: np.lib.npyio.NpzFile, path: Path) -> dict[str, Any]:
    if STATE_MEMBER not in npz.files:
        raise CheckpointError(f"checkpoint {path} has no {STATE_MEMBER!r} member; it is not a progfl checkpoint")
    raw = npz[STATE_MEMBER]
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise CheckpointError(f"checkpoint {path}: member {STATE_MEMBER!r} is {raw.dtype} {raw.shape}, not uint8 bytes")
    doc = json.loads(raw.tobytes().decode())
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_VERSION:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise CheckpointError(f"checkpoint {path} has format {got!r}; this version reads format {FORMAT_VERSION}")
    for key, kind in (("round", int), ("strategy", str), ("config", dict), ("arrays", list), ("state", dict)):
        if not isinstance(doc.get(key), kind):
            raise CheckpointError(f"checkpoint {path}: field {key!r} is missing or not a {kind.__name__}")
    return doc


def load_checkpoint(run_dir: Path, arrays: bool = True) -> Checkpoint:
    """Read and verify ``<run-dir>/checkpoint.npz`` (every member is read, so a damaged file fails here).

    ``arrays=False`` reads only the JSON document (``Checkpoint.arrays`` is then empty).
    Raises :class:`CheckpointError` naming the file and the problem.
    """
    path = checkpoint_path(run_dir)
    if not path.is_file():
        hint = "the run never completed a round" if Path(run_dir).is_dir() else "no such run folder"
        raise CheckpointError(f"no checkpoint to resume from: {path} does not exist ({hint})")
    try:
        with np.load(path, allow_pickle=False) as npz:
            doc = _read_doc(npz, path)
            names: list[str] = doc["arrays"]
            expected = {STATE_MEMBER, *(f"a{i}" for i in range(len(names)))}
            if set(npz.files) != expected:
                raise CheckpointError(
                    f"checkpoint {path}: members {sorted(set(npz.files) ^ expected)[:5]} do not match its index"
                )
            loaded = {name: np.array(npz[f"a{i}"]) for i, name in enumerate(names)} if arrays else {}
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path} is damaged or not a checkpoint: {exc}") from None
    return Checkpoint(doc["round"], doc["strategy"], doc["config"], doc["state"], loaded, path)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def config_mismatches(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys (not in :data:`RESUME_EXEMPT_KEYS`) whose value differs, each as ``key: saved -> current``.

    A key the checkpoint lacks (added to the config later) is compared with its default.
    """
    defaults = RunConfig().to_flat()
    problems = []
    for key in sorted(set(saved) | set(current)):
        if key in RESUME_EXEMPT_KEYS:
            continue
        if key not in current:
            problems.append(f"{key}: {saved[key]!r} in the checkpoint, unknown to this version")
            continue
        old = saved.get(key, defaults.get(key))
        if not _same(old, current[key]):
            problems.append(f"{key}: {old!r} in the checkpoint, {current[key]!r} now")
    return problems


def check_resume(checkpoint: Checkpoint, cfg: RunConfig) -> None:
    """Raise :class:`CheckpointError` unless ``cfg`` may continue ``checkpoint`` (same config and strategy)."""
    problems = config_mismatches(checkpoint.config, cfg.to_flat())
    if problems:
        raise CheckpointError(
            f"cannot resume {checkpoint.path.parent}: the run config differs from the checkpoint's "
            f"({'; '.join(problems)}); only {', '.join(RESUME_EXEMPT_KEYS)} may change"
        )
    if checkpoint.strategy != cfg.strategy:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} is of strategy {checkpoint.strategy!r}, the run is {cfg.strategy!r}"
        )
    if checkpoint.round > cfg.num_rounds:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} is after round {checkpoint.round}, beyond num-rounds={cfg.num_rounds}"
        )


def resume_overrides(run_dir: Path, extra: list[str]) -> dict[str, Any]:
    """The full ``--run-config`` overrides that resume the run in ``run_dir``.

    Every key comes from the checkpoint's config (so later changes of the pyproject defaults do not
    leak in), then ``resume=true``, the folder's name and parent as run-name and output-dir, and
    ``stop-after-round=0``; ``extra`` (``k=v`` strings) may change only :data:`RESUME_EXEMPT_KEYS`.
    """
    from common.preflight import parse_overrides

    run_dir = Path(run_dir).expanduser().resolve()
    checkpoint = load_checkpoint(run_dir, arrays=False)
    overrides = {
        **checkpoint.config,
        "resume": True,
        "run-name": run_dir.name,
        "output-dir": str(run_dir.parent),
        "stop-after-round": 0,
    }
    given = parse_overrides(extra)
    changed = [k for k, v in given.items() if k not in RESUME_EXEMPT_KEYS and not _same(v, overrides.get(k))]
    if changed:
        details = "; ".join(f"{k}={given[k]!r} (checkpoint: {overrides.get(k)!r})" for k in changed)
        raise ConfigError(f"resume cannot change {details}; only {', '.join(RESUME_EXEMPT_KEYS)} may change on resume")
    overrides.update(given)
    parse_run_config(overrides)
    return overrides


def main(argv: list[str] | None = None) -> int:
    """CLI for ``./run.sh resume``: ``overrides RUN_DIR [--run-config k=v ...]`` or ``nodes RUN_DIR``."""
    from common.preflight import toml_value

    parser = argparse.ArgumentParser(description="progfl checkpoint helper (used by ./run.sh resume)")
    parser.add_argument("what", choices=("overrides", "nodes"))
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--run-config", action="append", default=[], help="k=v changes of resume-exempt keys")
    args = parser.parse_args(argv)
    try:
        if args.what == "nodes":
            print(len(load_checkpoint(args.run_dir, arrays=False).state.get("nodes", {})))
            return 0
        overrides = resume_overrides(args.run_dir, args.run_config)
    except (CheckpointError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(" ".join(f"{k}={toml_value(v)}" for k, v in overrides.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
