"""Nothing stale: an asset does not run on an upstream whose latest refresh failed.

A refused or failed materialisation leaves the upstream's previous file on disk (defs/publish.py),
so a run that selects only a downstream asset would read data older than what the user supplied
last, without a word. Every non-raw asset therefore calls :func:`require_fresh_upstream` first.
The rule, read from the Dagster instance's own records (sqlite or Postgres alike):

    an upstream asset (or one partition of it) is *stale* when its latest materialisation attempt
    ended in a failed or cancelled run after its last successful materialisation

whatever made it fail: a blocking check, an error before the checks ran (missing column, unreadable
file), a skipped step behind another failure, a killed run. An attempt in a run still in progress
(this run included, where Dagster only starts a step after its upstream steps succeeded) is not a
failure. Upstream means every ancestor the running job's asset graph knows, so a failed
``raw_train`` also stops ``submission_zip``; the walk stops at the edges in ``NOT_READ`` (inputs
an asset does not read as files). The refusal names the upstream, the failed run and the fix; an
operator may instead set ``allow_stale_upstream: true`` in the asset's config, which is logged at
WARNING with the same facts.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass

import dagster as dg
from pydantic import Field

# (asset, upstream) edges the rule does not follow, with why: predictions serves the registry's
# champion, which only a passed champion gate moves, so a failed or refused dcn_din_model leaves it
# serving unchanged (docs/registry.md); the model's own inputs are dcn_din_model's to guard.
NOT_READ = {("predictions", "dcn_din_model"): "predictions serves the registry's champion, not the latest training"}
_FAILED = (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)


class FreshnessConfig(dg.Config):
    """The escape hatch every non-raw asset's config carries."""

    allow_stale_upstream: bool = Field(
        default=False, description="Run even though the latest materialisation of an upstream asset failed "
        "(its older file is read); logged at WARNING. Default: refuse, naming the upstream and the fix.")


@dataclass(frozen=True)
class StaleUpstream:
    asset: str
    partition: str | None
    run_id: str
    status: str
    when: str  # the failed run's end (UTC)

    def describe(self) -> str:
        part = f" partition {self.partition}" if self.partition is not None else ""
        return f"{self.asset}{part} (run {self.run_id[:8]} {self.status.lower()} {self.when})"


def upstream_keys(asset_graph, key: dg.AssetKey) -> list[dg.AssetKey]:
    """Every ancestor of ``key`` the graph knows, not following the NOT_READ edges, the farthest
    first (the order to repair them in)."""
    depth: dict[dg.AssetKey, int] = {}
    level, frontier = 0, [key]
    while frontier:
        level += 1
        parents = []
        for child in frontier:
            if not asset_graph.has(child):
                continue
            for parent in asset_graph.get(child).parent_keys:
                # the longest path decides the depth: an input read directly and through another
                # asset is repaired before that other asset
                if (child.to_user_string(), parent.to_user_string()) not in NOT_READ and depth.get(parent, 0) < level:
                    depth[parent] = level
                    parents.append(parent)
        frontier = parents
    return sorted(depth, key=lambda k: (-depth[k], k.to_user_string()))


def _when(run_record) -> str:
    end = run_record.end_time or run_record.update_timestamp.timestamp()
    return _dt.datetime.fromtimestamp(end, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def stale_upstream(instance: dg.DagsterInstance, keys: list[dg.AssetKey], this_run: str) -> list[StaleUpstream]:
    """The upstream assets (partitions) among ``keys`` whose latest attempt failed after their last
    success. Unpartitioned: the asset's latest run (planned or materialised) is not the run of its
    last materialisation and ended FAILURE/CANCELED. Partitioned: the partitions whose latest
    planned materialisation has no materialisation after it, in a run that ended so."""
    storage = instance.event_log_storage
    attempts: dict[tuple[dg.AssetKey, str | None], str] = {}
    records = {r.asset_entry.asset_key: r.asset_entry for r in storage.get_asset_records(keys)}
    for key in keys:
        per_partition = storage.get_latest_asset_partition_materialization_attempts_without_materializations(key)
        if per_partition:
            attempts |= {(key, p): run_id for p, (run_id, _) in per_partition.items()}
            continue
        entry = records.get(key)
        if entry is None or entry.last_run_id is None:
            continue  # never attempted in this instance
        last = entry.last_materialization
        if last is None or entry.last_run_id != last.run_id:
            attempts[(key, None)] = entry.last_run_id
    run_ids = sorted({r for r in attempts.values() if r != this_run})
    found = instance.get_run_records(dg.RunsFilter(run_ids=run_ids)) if run_ids else []
    runs = {r.dagster_run.run_id: r for r in found}
    stale = []
    order = {k: i for i, k in enumerate(keys)}
    for (key, partition), run_id in sorted(attempts.items(), key=lambda a: (order[a[0][0]], a[0][1] or "")):
        record = runs.get(run_id)
        if record is None or record.dagster_run.status not in _FAILED:
            continue  # this run, one in progress, one that succeeded without it, or a deleted run
        stale.append(StaleUpstream(key.to_user_string(), partition, run_id, record.dagster_run.status.value,
                                   _when(record)))
    return stale


def _asset_graph(context: dg.AssetExecutionContext):
    """The code location's whole asset graph (a run of a few assets knows only them and their
    parents); the run's own where no code location is set (``dg.materialize`` in tests)."""
    from dagster_shared.check import CheckError

    try:
        return context.repository_def.asset_graph
    except CheckError:
        return context.job_def.asset_layer.asset_graph


def require_fresh_upstream(context: dg.AssetExecutionContext, config: FreshnessConfig | None) -> None:
    """Refuse to run (dg.Failure) while an upstream's latest materialisation attempt failed; with
    ``allow_stale_upstream: true`` log the same at WARNING and go on. Call first in an asset."""
    me = context.asset_key.to_user_string()
    keys = upstream_keys(_asset_graph(context), context.asset_key)
    stale = stale_upstream(context.instance, keys, context.run.run_id)
    if not stale:
        return
    names = list(dict.fromkeys(s.asset for s in stale))
    listed = "; ".join(s.describe() for s in stale)
    if config is not None and config.allow_stale_upstream:
        context.log.warning(f"{me} runs on STALE upstream data (allow_stale_upstream: true): the latest "
                            f"materialisation of {listed} failed, so their earlier files are read.")
        return
    description = (
        f"{me} did not run: the latest materialisation of {listed} failed after its last success, so the "
        f"file(s) on disk are older than the data last supplied and {me} would be built from them. "
        f"Fix: look at that run's error, repair the input, and materialise {', '.join(names)} again "
        f"(`dg launch --assets {','.join(names)}`, or `dg launch --assets '*{me}'` to refresh everything "
        f"up to {me}); or, to build from the older files on purpose, set `allow_stale_upstream: true` in "
        f"{me}'s config (ops: {me}: config: allow_stale_upstream: true; logged). Nothing was written.")
    context.log.error(description)
    raise dg.Failure(description=description, allow_retries=False,
                     metadata={"stale_upstream": [s.describe() for s in stale]})
