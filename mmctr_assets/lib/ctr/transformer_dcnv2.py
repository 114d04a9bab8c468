"""Transformer + DCN-V2 (the challenge winners' family): a token per history item from the item
and the target (``token_interaction``) at ``transformer_dim`` plus a recency embedding (computed
for the real history items only), a Transformer over the real history items (position-wise parts
packed, attention in length buckets, so padding costs next to nothing), last-k + max pooling;
head: DCN-V2 || deep MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmctr_assets.lib.ctr.model import BatchItems, CTRModel, position_table
from mmctr_assets.lib.ctr.transformer_history import TransformerHistory


class TransformerDcnV2(CTRModel):
    family = "transformer_dcnv2"
    OPTIONS = {
        "position": ("token", ("none", "token")),
        "use_item_frequency": (True, (True, False)),
        # two: with the 32-wide id and tag tables a third layer did not help on the demo worlds, and
        # each layer is a pass over the features (docs/results.md)
        "cross_layers": (2, None),
        "cross_version": ("v2", ("v1", "v2")),
        # low rank: full rank would triple the step on its ~400-wide features (docs/models.md)
        "cross_rank": (16, None),
    }
    READS = ("transformer_dim", "transformer_layers", "transformer_heads", "transformer_ff_dim",
             "last_k", "token_interaction")
    uses_cross = True

    def _build_history(self, config, item_dim: int) -> int:
        if config.token_interaction == "factorised":
            # [history part, history factor] per distinct item; [target part + bias, target factor] per row
            self.token_history = nn.Linear(item_dim, 2 * config.transformer_dim, bias=False)
            self.token_target = nn.Linear(item_dim, 2 * config.transformer_dim)
        else:
            self.token = nn.Linear(3 * item_dim, config.transformer_dim)
        if config.position == "token":
            self.position_embedding = position_table(config.max_len, config.transformer_dim)
        self.sequence = TransformerHistory(
            config.transformer_dim, num_layers=config.transformer_layers,
            num_heads=config.transformer_heads, ff_dim=config.transformer_ff_dim,
            dropout=config.attention_dropout, last_k=config.last_k)
        return self.sequence.output_dim

    def _history(self, target: torch.Tensor, item_seq: torch.Tensor, vectors=None) -> tuple[torch.Tensor, None]:
        """Tokens are computed once per REAL history item (packed) and the encoder runs over them
        (``TransformerHistory.forward_packed``); a row without history gives zeros."""
        if vectors is None:
            _, vectors = self.batch_item_vectors(item_seq.new_zeros(0), item_seq)
        real = item_seq != 0
        rows, cols = real.nonzero(as_tuple=True)
        tokens = self._tokens(target, vectors.history_rows, rows, vectors)
        if self.config.position == "token":
            tokens = tokens + self.position_embedding((item_seq.shape[1] - 1) - cols)
        return self.sequence.forward_packed(tokens, real), None

    def _tokens(self, target: torch.Tensor, item_rows: torch.Tensor, rows: torch.Tensor,
                items: BatchItems) -> torch.Tensor:
        """Token ``[M, transformer_dim]`` of each packed history item (``item_rows [M]``: its row
        among the batch's distinct items; ``rows [M]``: its row of the batch).

        ``factorised``: ``A h + B t + b + (P h) * (Q t)``: the item's parts are projected once per
        distinct item of the batch and the target's once per row, so each history position costs
        gathers and products at ``transformer_dim`` width, not at the item vectors' width.
        ``elementwise`` (models saved before the option): ``W [h, t, h * t] + b``, the
        target's part computed once per row."""
        d = self.config.transformer_dim
        if self.config.token_interaction == "factorised":
            history_part, history_factor = items.linear(self.token_history.weight).index_select(
                0, item_rows).split(d, dim=1)
            target_part, target_factor = self.token_target(target).index_select(0, rows).split(d, dim=1)
            return history_part + target_part + history_factor * target_factor
        history = items.gather(item_rows)
        w_h, w_t, w_ht = self.token.weight.split(self.item_dim, dim=1)
        return (F.linear(history, w_h) + F.linear(history * target.index_select(0, rows), w_ht)
                + F.linear(target, w_t, self.token.bias).index_select(0, rows))
