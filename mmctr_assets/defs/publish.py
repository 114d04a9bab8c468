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
           results: Sequence[dg.AssetCheckResult]) -> Iterator[dg.AssetCheckResult]:
    """Record every check result (the failed ones as failed), then fail the step without
    publishing: the files in ``kept`` stay exactly as they were."""
    yield from results
    failed = failed_blocking(results)
    files = ", ".join(str(p) for p in kept)
    existing = [p for p in kept if p.exists()]
    kept_note = (f"{files} left unchanged: {_previous(context, asset)}." if existing
                 else f"nothing was written to {files} (no earlier file).")
    lines = "\n".join(f"  - {r.check_name}: {r.description}" for r in failed)
    description = (
        f"{asset} was NOT materialised: {len(failed)} blocking check(s) failed on the new data:\n{lines}\n"
        f"{kept_note} Downstream assets stay blocked until the input is fixed and {asset} is "
        "materialised again."
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


def require_upstream_checks_passed(context: dg.AssetExecutionContext, tables: Sequence[str]) -> None:
    """Refuse to run on a raw snapshot whose newer input failed a blocking check.

    A refused raw table keeps its old snapshot on disk, and a run that selects only a downstream
    asset would read that old snapshot without a word. The latest evaluation of each blocking raw
    check is in the instance: if one failed, the data the user supplied last is not what this
    step would train on, so it stops and says which check and what to do."""
    from ..lib.data import checks

    keys = [dg.AssetCheckKey(dg.AssetKey(f"raw_{t}"), name) for t in tables
            for name in checks.CHECK_NAMES[t] if name not in checks.WARNING_CHECKS]
    records = context.instance.event_log_storage.get_latest_asset_check_execution_by_key(keys)
    failed = sorted((k, r) for k, r in records.items() if r.status.value == "FAILED")
    if failed:
        names = ", ".join(f"{k.asset_key.to_user_string()}:{k.name} (run {r.run_id[:8]})" for k, r in failed)
        assets = sorted({k.asset_key.to_user_string() for k, _ in failed})
        raise dg.Failure(
            description=f"{context.asset_key.to_user_string()} did not run: the latest input of {', '.join(assets)} "
            f"failed blocking check(s) {names}, so its snapshot on disk is older than the data you supplied. "
            f"Fix the source table, then materialise {', '.join(assets)} again "
            f"(dg launch --assets {','.join(assets)}) before this asset.")
