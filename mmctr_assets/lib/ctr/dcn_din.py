"""DCN-DIN: DIN target attention over the click history feeding a DCN (cross net || deep net).

The attention runs over the packed real history items (padding costs nothing); a learned embedding
of each item's distance from the most recent click enters the attention key (``position``), and
its sigmoid-bounded weights also give the history-match scalars (model.py).
"""

from __future__ import annotations

import torch

from mmctr_assets.lib.ctr.layers import TargetAttention, pack_history_with_recency, recency_positions
from mmctr_assets.lib.ctr.model import CTRModel, position_table


class DcnDin(CTRModel):
    family = "dcn_din"
    OPTIONS = {
        "position": ("key", ("none", "key", "key_value")),
        "attention_output_activation": ("sigmoid", ("linear", "sigmoid")),
        "history_match_features": (True, (True, False)),
        "use_item_frequency": (True, (True, False)),
        "cross_layers": (3, None),
        "cross_version": ("v1", ("v1", "v2")),
        "cross_rank": (0, None),
    }
    READS = ("attention_units", "attention_impl")
    uses_cross = True

    def _build_history(self, config, item_dim: int) -> int:
        self.attention = TargetAttention(item_dim, config.attention_units, activation="dice",
                                         dropout=config.attention_dropout,
                                         split_first_layer=config.attention_impl == "packed_split",
                                         output_activation=config.attention_output_activation)
        if config.position in ("key", "key_value"):
            self.position_key = position_table(config.max_len, self.attention.key_bias_dim)
        if config.position == "key_value":
            self.position_value = position_table(config.max_len, item_dim)
        return item_dim

    def _history(self, target: torch.Tensor, item_seq: torch.Tensor,
                 vectors=None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (pooled interest ``[B, item_dim]``, sum of attention weights ``[B]``)."""
        vectors = vectors or self.item_vectors
        position = self.config.position
        if self.config.attention_impl == "padded":
            recency = recency_positions(item_seq)
            history = vectors(item_seq)
            key = self.position_key(recency) if position != "none" else None
            values = history + self.position_value(recency) if position == "key_value" else None
            return self.attention.forward_padded(target, history, item_seq != 0, return_score_sum=True,
                                                 key_bias=key, values=values)
        ids, rows, recency = pack_history_with_recency(item_seq)
        history = vectors(ids)
        key = self.position_key(recency) if position != "none" else None
        values = history + self.position_value(recency) if position == "key_value" else None
        return self.attention(target, history, rows, return_score_sum=True, key_bias=key, values=values)
