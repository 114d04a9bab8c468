"""The deployment files that ship inside the package (pyproject's package data): run configs, model
presets, tuning search spaces, the Dagster instance files, the MLflow server script and the
Kubernetes manifest.

The code finds them through ``importlib.resources``, so an installed wheel (what an image runs:
docs/deployment.md) reads the same files as a checkout. ``mmctr-deploy-file NAME`` prints where one
lies, for the commands that need it outside Python, e.g.
``cp "$(mmctr-deploy-file dagster.prod.yaml)" "$DAGSTER_HOME/dagster.yaml"``.
"""

from __future__ import annotations

import sys
from importlib.resources import files
from pathlib import Path


def path(*parts: str) -> Path:
    """The shipped file (or folder) ``deploy/<parts>``, e.g. ``path("presets", "momo.yaml")``."""
    return Path(str(files(__name__).joinpath(*parts)))


def listing() -> list[str]:
    """Every shipped file, relative to deploy/ (what ``mmctr-deploy-file`` with no argument prints)."""
    root = path()
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and p.suffix in (".yaml", ".sh"))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print("usage: mmctr-deploy-file NAME  (prints the path of a shipped deployment file); files:\n  "
              + "\n  ".join(listing()), file=sys.stderr)
        return 2
    if args[0] not in listing():
        print(f"mmctr-deploy-file: no shipped file {args[0]!r}; files: {', '.join(listing())}", file=sys.stderr)
        return 1
    print(path(*args[0].split("/")))
    return 0
