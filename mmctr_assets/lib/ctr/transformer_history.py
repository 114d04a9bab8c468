"""The Transformer history encoder of ``transformer_dcnv2``: PyTorch's encoder layer over each row's
real history items, run packed (position-wise parts once over the real items, attention per length
bucket, :func:`layers.length_buckets`), pooled as last-k + max."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmctr_assets.lib.ctr.layers import length_buckets


class TransformerHistory(nn.Module):
    """Transformer encoder over each row's REAL history items, pooled per row as
    ``[outputs of the last k positions, flattened; max-pool over the real items]`` (momo, WWW 2025).

    :meth:`forward_packed` (what the model runs) takes the tokens of the real items only and runs
    every position-wise part (layer norms, projections, feed-forward) once over them; only the
    attention sees a grid, one per length bucket (:func:`length_buckets`), where padding is a masked
    key and a dropped query. :meth:`forward` is the plain formulation over a padded grid through
    PyTorch's own encoder, kept as the reference the packed path is tested against: the same
    parameters, the same function.
    """

    def __init__(self, d_model: int, *, num_layers: int = 1, num_heads: int = 2, ff_dim: int = 128,
                 dropout: float = 0.0, last_k: int = 8):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads}")
        layer = nn.TransformerEncoderLayer(d_model, num_heads, ff_dim, dropout=dropout, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.d_model, self.last_k, self.dropout = d_model, last_k, dropout
        self.output_dim = (last_k + 1) * d_model

    def forward(self, tokens: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """Padded tokens ``[B, L, d_model]`` and ``padding [B, L]`` with **True = padding**
        (``key_padding_mask``'s meaning) -> ``[B, (last_k + 1) * d_model]``. Padding is ignored as a
        key and its outputs are zeroed before pooling. Rows without any real item must not be passed
        (a softmax over no keys is undefined)."""
        out = self.encoder(tokens, src_key_padding_mask=padding)
        out = out.masked_fill(padding.unsqueeze(-1), 0.0)
        b, length, d = out.shape
        last = out[:, -self.last_k:]
        if length < self.last_k:  # a short bucket: the missing older positions are padding
            last = torch.cat([out.new_zeros(b, self.last_k - length, d), last], dim=1)
        pooled = out.masked_fill(padding.unsqueeze(-1), float("-inf")).amax(dim=1)
        return torch.cat([last.reshape(b, -1), pooled], dim=-1)

    def forward_packed(self, tokens: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """``tokens [M, d_model]`` of the real history items, in the row-major order of ``real``
        ``[B, L]`` (True = a real item; histories left-padded) -> ``[B, (last_k + 1) * d_model]``,
        what :meth:`forward` gives over the length buckets; a row without history gives zeros."""
        layout = _PackedLayout(real, self.last_k)
        if layout.empty:
            return tokens.new_zeros(real.shape[0], self.output_dim)
        x = tokens
        for layer in self.encoder.layers:  # nn.TransformerEncoderLayer(norm_first=True)'s function
            x = x + self._dropout(self._attention(layer.self_attn, layer.norm1(x), layout))
            hidden = self._dropout(layer.activation(layer.linear1(layer.norm2(x))))
            x = x + self._dropout(layer.linear2(hidden))
        b = real.shape[0]
        last = x.index_select(0, layout.last).masked_fill(layout.last_padding, 0.0).view(b, -1)
        pooled = torch.segment_reduce(x, "max", lengths=layout.lengths, unsafe=True)
        pooled = torch.where(layout.lengths.unsqueeze(1) > 0, pooled, 0.0)  # an empty row's max is -inf
        return torch.cat([last, pooled], dim=-1)

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.dropout, self.training) if self.dropout > 0 else x

    def _attention(self, attention: nn.MultiheadAttention, x: torch.Tensor, layout: _PackedLayout) -> torch.Tensor:
        """``nn.MultiheadAttention`` (self-attention, key padding masked) over packed ``x [M, d]``:
        the projections run once over the real items, the attention bucket by bucket."""
        d, heads = x.shape[1], attention.num_heads
        # gathered before the projection: a third of the width to move, for the padding's share more rows
        grid = F.linear(_Regather.apply(x, layout.grid, layout.packed), attention.in_proj_weight,
                        attention.in_proj_bias)
        outputs = []
        for (rows, width), keys, part in zip(layout.shapes, layout.keys, grid.split(layout.sizes)):
            q, k, v = part.view(rows, width, 3, heads, d // heads).permute(2, 0, 3, 1, 4).unbind(0)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keys,
                                                 dropout_p=self.dropout if self.training else 0.0)
            outputs.append(out.transpose(1, 2).reshape(rows * width, d))
        packed = _Regather.apply(torch.cat(outputs), layout.packed, layout.grid, layout.grid_padding)
        return F.linear(packed, attention.out_proj.weight, attention.out_proj.bias)


class _Regather(torch.autograd.Function):
    """``x.index_select(0, index)`` between the packed rows and the buckets' grid, whose backward
    is a gather too (by ``inverse``, the other direction), not index_select's scatter-add.

    Packed -> grid (``index`` = ``layout.grid``, ``inverse`` = ``layout.packed``): exact because
    the grid's other reads of a row (padding positions read item 0) get zero gradient, as masked
    keys and dropped queries. Grid -> packed (``index`` = ``layout.packed``, ``inverse`` =
    ``layout.grid``): ``padding`` (the grid's padding positions) is zeroed in the gradient, as
    index_select's backward would leave it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor,
                padding: torch.Tensor | None = None) -> torch.Tensor:
        ctx.inverse, ctx.padding = inverse, padding
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        out = grad.index_select(0, ctx.inverse)
        return (out if ctx.padding is None else out.masked_fill_(ctx.padding, 0.0)), None, None, None


class _PackedLayout:
    """Index plan of :meth:`TransformerHistory.forward_packed` for one batch ``real [B, L]``:
    ``grid`` (the packed item each bucket-grid position reads; padding reads item 0, a masked key
    whose output is dropped; ``grid_padding`` marks those), ``packed`` (the grid position of each
    packed item), each bucket's ``shapes``/``sizes``/``keys`` (attention mask, True = a real key),
    and the last-k gather (``last``, ``last_padding``)."""

    def __init__(self, real: torch.Tensor, last_k: int):
        self.lengths = real.sum(dim=1)
        n = int(self.lengths.sum())
        self.empty = n == 0
        if self.empty:
            return
        slot = torch.zeros(real.shape, dtype=torch.long, device=real.device)  # 0 = padding, i + 1 = item i
        slot[real] = torch.arange(1, n + 1, device=real.device)  # boolean indexing is row-major
        self.shapes, self.sizes, self.keys, grids = [], [], [], []
        for rows, width in length_buckets(self.lengths, real.shape[1]):
            slots = slot.index_select(0, rows)[:, -width:]
            self.shapes.append(tuple(slots.shape))
            self.sizes.append(slots.numel())
            self.keys.append((slots != 0).view(slots.shape[0], 1, 1, width))
            grids.append(slots.reshape(-1))
        grid = torch.cat(grids)
        self.grid, self.grid_padding = (grid - 1).clamp(min=0), (grid == 0).unsqueeze(1)
        at = (grid != 0).nonzero(as_tuple=True)[0]
        self.packed = torch.empty(n, dtype=torch.long, device=real.device)
        self.packed[grid[at] - 1] = at
        last = F.pad(slot, (max(0, last_k - real.shape[1]), 0))[:, -last_k:]  # a short history: padding
        self.last = (last - 1).clamp(min=0).reshape(-1)
        self.last_padding = (last == 0).reshape(-1, 1)
