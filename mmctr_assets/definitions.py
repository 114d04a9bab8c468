"""The code location: every stage's definitions merged with the shared resources."""

import dagster as dg

from .defs import operations, raw, task1, task2
from .resources import default_resources

defs = dg.Definitions.merge(
    raw.defs,
    task1.defs,
    task2.defs,
    operations.defs,
    dg.Definitions(resources=default_resources()),
)
