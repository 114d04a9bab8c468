"""Transformer + DCN-V2 (the challenge winners' family): tokens ``[item, target, item * target]``
projected to ``transformer_dim`` plus a recency embedding, a Transformer over the real history
items only (rows run in length buckets, so padding costs next to nothing), last-k + max pooling;
head: DCN-V2 || deep MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmctr_assets.lib.ctr.layers import TransformerHistory, length_buckets, recency_positions
from mmctr_assets.lib.ctr.model import CTRModel, position_table


class TransformerDcnV2(CTRModel):
    family = "transformer_dcnv2"
    OPTIONS = {
        "position": ("token", ("none", "token")),
        "use_item_frequency": (True, (True, False)),
        "cross_layers": (3, None),
        "cross_version": ("v2", ("v1", "v2")),
        # low rank: full rank would triple the step on its ~470-wide features (docs/models.md)
        "cross_rank": (32, None),
    }
    READS = ("transformer_dim", "transformer_layers", "transformer_heads", "transformer_ff_dim",
             "last_k")
    uses_cross = True

    def _build_history(self, config, item_dim: int) -> int:
        self.token = nn.Linear(3 * item_dim, config.transformer_dim)
        if config.position == "token":
            self.position_embedding = position_table(config.max_len, config.transformer_dim)
        self.sequence = TransformerHistory(
            config.transformer_dim, num_layers=config.transformer_layers,
            num_heads=config.transformer_heads, ff_dim=config.transformer_ff_dim,
            dropout=config.attention_dropout, last_k=config.last_k)
        return self.sequence.output_dim

    def _history(self, target: torch.Tensor, item_seq: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Run the encoder per length bucket (real items only, ~2x at worst); empty rows stay 0."""
        out = target.new_zeros(target.shape[0], self.sequence.output_dim)
        lengths = (item_seq != 0).sum(dim=1)
        # token = W [h, t, h*t] + b, split so the target's part is computed once per row
        w_h, w_t, w_ht = self.token.weight.split(self.item_dim, dim=1)
        per_row = F.linear(target, w_t, self.token.bias)
        for rows, width in length_buckets(lengths, item_seq.shape[1]):
            seq = item_seq.index_select(0, rows)[:, -width:]
            history = self.item_vectors(seq)
            t = target.index_select(0, rows).unsqueeze(1)
            tokens = (F.linear(history, w_h) + F.linear(history * t, w_ht)
                      + per_row.index_select(0, rows).unsqueeze(1))
            if self.config.position == "token":
                tokens = tokens + self.position_embedding(recency_positions(seq))
            out = out.index_copy(0, rows, self.sequence(tokens, seq == 0))
        return out, None
