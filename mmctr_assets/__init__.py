"""mmctr: multimodal CTR prediction on MicroLens-format data as Dagster assets.

`code_location` is what `dagster dev` (workspace.yaml) and
`dagster asset materialize -m mmctr_assets` load. It is built lazily, when Dagster asks for it,
so the plain library (`mmctr_assets.lib`, e.g. the demo-data CLI) does not load every asset
module and their heavy imports.
"""

import dagster as dg

from . import warning_filters

warning_filters.install()  # before anything defines assets: see warning_filters.py


@dg.definitions
def code_location() -> dg.Definitions:  # not named `defs`: that is the mmctr_assets.defs package
    from .definitions import defs

    return defs
