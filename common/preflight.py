"""Check a run's config before Flower starts anything: ``python -m common.preflight``.

``run.sh`` calls this with the user's ``--run-config`` strings. It fuses them with the
pyproject defaults exactly as Flower does, then

* rejects keys that are not in the app config (Flower would silently drop them),
* validates the result with :class:`common.config.RunConfig` (bad value -> one clear message),
* makes path values (``data-path``, ``data-dir``, ``output-dir``) absolute, relative to the
  caller's working directory, because the ServerApp and the clients run elsewhere,

and, given the client count (``--num-partitions``) and ``--cpus-per-client``, checks the data
file, the partition plan, the width and the CPUs (:mod:`common.runcheck`). It prints the override
string to hand to ``flwr run --run-config``. Exit code 2 on bad input, with one message and no
traceback (``--debug`` shows it).
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import tomllib
import traceback
from pathlib import Path
from typing import Any

from flwr.common.config import flatten_dict

from common.config import ConfigError, parse_run_config

PATH_KEYS = ("data-path", "data-dir", "output-dir")


def app_defaults(project_dir: Path) -> dict[str, Any]:
    """The ``[tool.flwr.app.config]`` table of the project's pyproject.toml, flattened."""
    with open(project_dir / "pyproject.toml", "rb") as f:
        return flatten_dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])


PAIR = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")
"""One ``key=value`` pair of a ``--run-config`` string: the pattern Flower's own parser uses."""


def parse_overrides(run_config: list[str]) -> dict[str, Any]:
    """``--run-config`` strings -> one flat dict; a key given more than once takes its last value.

    Flower's ``parse_config_args`` reads each string as one TOML document, so a key repeated
    inside one string fails the whole config with a message that names no key; here every pair
    is parsed on its own (the same pair pattern, the same TOML value syntax), so a repeated key
    resolves left to right across and within strings, and a bad value is reported with its key
    (an unquoted string gets the hint to quote it).
    """
    merged: dict[str, Any] = {}
    for text in run_config:
        if text.strip().endswith(".toml"):
            raise ConfigError(f"--run-config {text!r}: TOML files are not supported here; pass key=value pairs")
        pairs = PAIR.findall(text)
        leftover = PAIR.sub("", text).strip()
        if leftover:
            raise ConfigError(f"cannot parse --run-config {text!r}: {leftover!r} is not a key=value pair")
        for key, raw in pairs:
            try:
                merged[key] = tomllib.loads(f"v = {raw}")["v"]
            except tomllib.TOMLDecodeError:
                hint = f" (a string must be quoted: {key}='{raw}')" if raw[:1] not in "'\"" else ""
                raise ConfigError(f"--run-config key {key!r}: cannot read value {raw!r}{hint}") from None
            if isinstance(merged[key], dict | list):
                raise ConfigError(f"--run-config key {key!r}: value {raw!r} must be a bool, int, float or string")
    return merged


def toml_value(value: Any) -> str:
    """A config value as Flower's ``--run-config`` parser reads it back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        if '"' in value:
            raise ConfigError(f"value {value!r} contains a double quote, which --run-config cannot carry")
        return f'"{value}"'
    return repr(value)


def preflight(
    project_dir: Path,
    run_config: list[str],
    cwd: Path,
    output_dir: Path | None,
    num_partitions: int | None = None,
    cpus_per_client: float | None = None,
) -> dict[str, Any]:
    """Fuse, check and normalise overrides; return the overrides to pass to Flower.

    With ``num_partitions`` (the simulated clients or local SuperNodes) the data file and the
    partition plan are checked too, and with ``cpus_per_client`` the CPUs (:mod:`common.runcheck`).
    """
    defaults = app_defaults(project_dir)
    overrides = parse_overrides(run_config)
    unknown = [k for k in overrides if k not in defaults]
    if unknown:
        hints = [
            f"{k!r}" + (f" (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, defaults, 1)) else "")
            for k in unknown
        ]
        raise ConfigError(f"unknown run-config key {', '.join(hints)}; valid keys: {', '.join(defaults)}")
    if output_dir is not None and not overrides.get("output-dir"):
        overrides["output-dir"] = str(output_dir)
    for key in PATH_KEYS:
        value = overrides.get(key)
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            overrides[key] = str((cwd / Path(value).expanduser()).resolve())
    cfg = parse_run_config({**defaults, **overrides})
    if cfg.run_name:  # a named folder: refuse one a live run owns, or earlier results unless asked
        from common.runfolder import check_run_folder, run_folder

        check_run_folder(run_folder(cfg.output_dir, cfg.run_name, cfg.strategy, cfg.model), cfg.resume, cfg.overwrite)
    if num_partitions is not None or cpus_per_client is not None:
        from common.runcheck import check_run

        check_run(cfg, num_partitions, cpus_per_client)
    return overrides


def main(argv: list[str] | None = None) -> int:
    """CLI: print the normalised overrides, or the error and exit code 2."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--output-dir", type=Path, default=None, help="default output-dir if not overridden")
    parser.add_argument("--run-config", action="append", default=[], help="key=value pairs, as for flwr run")
    parser.add_argument("--num-partitions", type=int, default=None, help="check data and partition plan for N clients")
    parser.add_argument("--cpus-per-client", type=float, default=None, help="check against this machine's CPUs")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
    args = parser.parse_args(argv)
    try:
        overrides = preflight(
            args.project, args.run_config, Path.cwd(), args.output_dir, args.num_partitions, args.cpus_per_client
        )
    except ValueError as exc:  # ConfigError, DataError: the message names the key or file
        if args.debug or any(PAIR.search(rc) and "verbose=true" in rc.split() for rc in args.run_config):
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(" ".join(f"{k}={toml_value(v)}" for k, v in overrides.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
