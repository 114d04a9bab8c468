"""mmctr: multimodal CTR prediction on MicroLens-format data as Dagster assets.

`defs` is the code location that `dagster dev` (workspace.yaml) and
`dagster asset materialize -m mmctr_assets` load.
"""

from .definitions import defs

__all__ = ["defs"]
