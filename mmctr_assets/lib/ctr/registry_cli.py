"""`mmctr-model`: the operator's view of the CTR model registry (docs/registry.md).

    mmctr-model list                 champion, challenger and the version model.pt holds; then every
                                     version: AUC, aliases, run, the item table it was trained on
    mmctr-model promote VERSION      make VERSION the champion
    mmctr-model rollback [VERSION]   champion back to the one that served before (or to VERSION)

A promotion or rollback to a version trained on other item tables than the current raw_item_info
snapshot is refused with the reason. Afterwards re-materialise predictions and submission_zip
(`dg launch --assets predictions,submission_zip`): they serve the new champion.
"""

from __future__ import annotations

import argparse
import getpass
import os
import socket
import sys
from pathlib import Path

from mmctr_assets import settings
from mmctr_assets.lib.ctr.registry import (
    CHALLENGER,
    CHAMPION,
    MODEL_FILE,
    TAG_AUC,
    TAG_ITEMS,
    TAG_PROMOTED,
    TAG_ROLLED_BACK,
    TAG_SHA,
    PromotionRefused,
    Registry,
    RegistryUnavailable,
    check_reachable,
    sha256,
)
from mmctr_assets.lib.io import file_fingerprint
from mmctr_assets.lib.redaction import redact


def _current_item_fingerprint(output_dir: Path) -> str | None:
    """raw_item_info's fingerprint in this deployment's output folder (None before the first run)."""
    path = output_dir / "raw" / "item_info.parquet"
    return file_fingerprint(path) if path.exists() else None


def _state(v, aliases: dict[str, str]) -> str:
    if aliases.get(CHAMPION) == str(v.version):
        return "serving"
    if TAG_ROLLED_BACK in v.tags:
        return "rolled back"
    return "served before" if TAG_PROMOTED in v.tags else ""


def _table(registry: Registry, output_dir: Path) -> str:
    """Who serves (the aliases, read from the registered model) and what the output folder's
    model.pt is (by its sha256), then one row per version."""
    versions, aliases = registry.versions(), registry.aliases()
    model_file = output_dir / "dcn_din_model" / MODEL_FILE
    if model_file.exists():
        digest = sha256(model_file)
        held = [str(v.version) for v in versions if v.tags.get(TAG_SHA) == digest]
        local = f"version {held[-1]}" if held else "no registered version (its sha256 matches none)"
    else:
        local = "absent"
    head = [f"{CHAMPION}: " + (f"version {aliases[CHAMPION]}" if CHAMPION in aliases else
                               "none (`mmctr-model promote VERSION` chooses one)" if versions else "none"),
            f"{CHALLENGER}: " + (f"version {aliases[CHALLENGER]}" if CHALLENGER in aliases else "none"),
            f"{model_file}: {local}", ""]
    by_version: dict[str, list[str]] = {}
    for alias, version in sorted(aliases.items()):
        by_version.setdefault(version, []).append(alias)
    rows = [("version", "aliases", "valid_auc", "item_info", "run_id", "state")]
    for v in versions:
        rows.append((str(v.version), ",".join(by_version.get(str(v.version), [])), v.tags.get(TAG_AUC, "?")[:8],
                     v.tags.get(TAG_ITEMS, "?")[:12], v.run_id or "", _state(v, aliases)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(head + ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmctr-model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", default=settings.mlflow_tracking_uri(),
                        help="MLflow tracking/registry URI (default: MLFLOW_TRACKING_URI or the local sqlite store)")
    parser.add_argument("--model", default="mmctr-ctr", help="registered model name (MlflowResource.registered_model)")
    parser.add_argument("--output-dir", type=Path, default=settings.output_dir(),
                        help="the deployment's output folder, whose raw_item_info a promotion must match")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every registered version")
    promote = sub.add_parser("promote", help="make VERSION the champion")
    promote.add_argument("version")
    rollback = sub.add_parser("rollback", help="champion back to the previous champion (or VERSION)")
    rollback.add_argument("version", nargs="?")
    args = parser.parse_args(argv)
    owner = f"{getpass.getuser()}@{socket.gethostname()}:{os.getpid()}"
    try:
        check_reachable(args.tracking_uri, must_exist=True)  # an operator's look never creates a store
        registry = Registry(args.tracking_uri, args.model)
        items = _current_item_fingerprint(args.output_dir)
        if args.command == "list":
            print(_table(registry, args.output_dir))
        elif args.command == "promote":
            before = registry.promote(args.version, items, owner)
            print(f"{args.model} version {args.version} is now {CHAMPION} (was: {before or 'none'})")
        else:
            before, after = registry.rollback(items, owner, to=args.version)
            print(f"{args.model}: {CHAMPION} rolled back from version {before} to {after}")
    except (PromotionRefused, RegistryUnavailable) as e:
        print(f"mmctr-model: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # MLflow's own errors quote the server URL, credentials included
        if redact(str(e)) == str(e):
            raise
        print(f"mmctr-model: {type(e).__name__}: {redact(str(e))}", file=sys.stderr)
        return 1
    if args.command != "list":
        print("Now re-materialise predictions and submission_zip: dg launch --assets predictions,submission_zip")
    return 0


if __name__ == "__main__":
    sys.exit(main())
