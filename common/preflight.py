"""Check a run's config before Flower starts anything: ``python -m common.preflight``.

``run.sh`` calls this with the user's ``--run-config`` strings. It fuses them with the
pyproject defaults exactly as Flower does, then

* rejects keys that are not in the app config (Flower would silently drop them),
* validates the result with :class:`common.config.RunConfig` (bad value -> one clear message),
* makes path values (``data-path``, ``data-dir``, ``output-dir``) absolute, relative to the
  caller's working directory, because the ServerApp and the clients run elsewhere,

and prints the override string to hand to ``flwr run --run-config``. Exit code 2 on bad input.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import tomllib
from pathlib import Path
from typing import Any

from flwr.common.config import flatten_dict, parse_config_args

from common.config import ConfigError, parse_run_config

PATH_KEYS = ("data-path", "data-dir", "output-dir")


def app_defaults(project_dir: Path) -> dict[str, Any]:
    """The ``[tool.flwr.app.config]`` table of the project's pyproject.toml, flattened."""
    with open(project_dir / "pyproject.toml", "rb") as f:
        return flatten_dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])


def toml_value(value: Any) -> str:
    """A config value as Flower's ``--run-config`` parser reads it back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        if '"' in value:
            raise ConfigError(f"value {value!r} contains a double quote, which --run-config cannot carry")
        return f'"{value}"'
    return repr(value)


def preflight(project_dir: Path, run_config: list[str], cwd: Path, output_dir: Path | None) -> dict[str, Any]:
    """Fuse, check and normalise overrides; return the overrides to pass to Flower."""
    defaults = app_defaults(project_dir)
    try:
        overrides = parse_config_args(run_config)
    except Exception as exc:  # click.ClickException or tomli errors: bad syntax
        raise ConfigError(f"cannot parse --run-config {run_config!r}: {exc}") from None
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
    parse_run_config({**defaults, **overrides})
    return overrides


def main(argv: list[str] | None = None) -> int:
    """CLI: print the normalised overrides, or the error and exit code 2."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--output-dir", type=Path, default=None, help="default output-dir if not overridden")
    parser.add_argument("--run-config", action="append", default=[], help="key=value pairs, as for flwr run")
    args = parser.parse_args(argv)
    try:
        overrides = preflight(args.project, args.run_config, Path.cwd(), args.output_dir)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(" ".join(f"{k}={toml_value(v)}" for k, v in overrides.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
