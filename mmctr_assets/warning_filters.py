"""Silence the framework's Beta/Preview warnings for the APIs this project uses on purpose.

Dagster 1.13 marks `backfill_policy` as beta, which we chose knowingly (a CLIP shard range runs as
one run, docs/assets.md "clip_embeddings shards"), and its own selection parser passes the beta
`include_sources` whenever a command says `--select '*'`. (`pool` is no longer beta in 1.13.)
Without this every command, `dagster dev` and every step subprocess print the same
lines again (counts: docs/results.md). Each filter names one API by its exact message, so any other
Beta/Preview warning (a new API someone starts using) and every other warning still show.

Installed when `mmctr_assets` is imported, which is the first thing every Dagster process that
loads the code location does (CLI, code server, each step subprocess).
"""

import re
import warnings

import dagster as dg

# (category, what Dagster's message names): the parameters and functions we use knowingly
CHOSEN = [
    (dg.BetaWarning, "Parameter `backfill_policy` of function `asset`"),
    (dg.BetaWarning, "Parameter `include_sources` of function `AssetSelection.all`"),
]


def install() -> None:
    for category, subject in CHOSEN:
        warnings.filterwarnings("ignore", message=re.escape(subject) + r" is currently in (beta|preview)",
                                category=category)
