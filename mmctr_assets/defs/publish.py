"""Validate first, publish after: how an asset with blocking checks replaces its file.

An asset that returned a `MaterializeResult` with a failed blocking check would still be recorded
as materialised (new metadata, new data version) although its new file must not be used. So an
asset with blocking checks writes its candidate to a temporary name (or keeps it in memory),
checks it, and then either renames it over the old file and returns the materialisation, or
yields its check results (recorded as failed: the UI shows them and
`AutomationCondition.all_deps_blocking_checks_passed` keeps downstream waiting) and raises a
`dg.Failure` that says what failed and that the previous file was kept. No materialisation is
recorded then, so the asset's latest materialisation still describes the file on disk.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterator, Sequence
from pathlib import Path

import dagster as dg


def failed_blocking(results: Sequence[dg.AssetCheckResult]) -> list[dg.AssetCheckResult]:
    """The failed results with ERROR severity (this project's blocking checks; warnings use WARN)."""
    return [r for r in results if not r.passed and r.severity == dg.AssetCheckSeverity.ERROR]


def _previous(context: dg.AssetExecutionContext, asset: str) -> str:
    event = context.instance.get_latest_materialization_event(dg.AssetKey(asset))
    if event is None:
        return "no earlier materialisation of it is recorded in this instance"
    when = _dt.datetime.fromtimestamp(event.timestamp, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"they hold the last good materialisation (run {event.run_id[:8]}, {when})"


def refuse(context: dg.AssetExecutionContext, asset: str, kept: Sequence[Path],
           results: Sequence[dg.AssetCheckResult], next_step: str | None = None) -> Iterator[dg.AssetCheckResult]:
    """Record every check result (the failed ones as failed), then fail the step without
    publishing: the files in ``kept`` stay exactly as they were. ``next_step`` replaces the default
    last sentence (downstream blocked until the input is fixed) where that is not what happens."""
    yield from results
    failed = failed_blocking(results)
    files = ", ".join(str(p) for p in kept)
    existing = [p for p in kept if p.exists()]
    kept_note = (f"{files} left unchanged: {_previous(context, asset)}." if existing
                 else f"nothing was written to {files} (no earlier file).")
    lines = "\n".join(f"  - {r.check_name}: {r.description}" for r in failed)
    description = (
        f"{asset} was NOT materialised: {len(failed)} blocking check(s) failed:\n{lines}\n"
        f"{kept_note} "
        + (next_step or f"Downstream assets stay blocked until the input is fixed and {asset} is materialised "
           "again (defs/freshness.py).")
    )
    context.log.error(description)
    raise dg.Failure(
        description=description,
        metadata={
            "failed_checks": [r.check_name for r in failed],
            "kept": [str(p) for p in kept],
        },
        allow_retries=False,
    )
