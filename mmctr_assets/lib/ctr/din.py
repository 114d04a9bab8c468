"""DIN, the organisers' baseline: DCN-DIN's target attention with the DIN paper's linear weights,
the history as a set (no recency), no extra scalars, and no cross net (the deep MLP alone)."""

from __future__ import annotations

from mmctr_assets.lib.ctr.dcn_din import DcnDin


class Din(DcnDin):
    family = "din"
    OPTIONS = {
        "position": ("none", ("none",)),
        "attention_output_activation": ("linear", ("linear",)),
        "history_match_features": (False, (False,)),
        "use_item_frequency": (False, (False,)),
    }
    READS = ("attention_units", "attention_impl")
    uses_cross = False
