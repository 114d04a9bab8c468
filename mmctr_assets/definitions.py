"""The code location: every stage's definitions merged with the shared resources."""

import dagster as dg

from .defs import ctr, embeddings, jobs, raw, schedules, scorer, sensors, tuning
from .resources import default_resources

defs = dg.Definitions.merge(
    raw.defs,
    embeddings.defs,
    scorer.defs,
    ctr.defs,
    tuning.defs,
    jobs.defs,
    schedules.defs,
    sensors.defs,
    dg.Definitions(resources=default_resources()),
)
