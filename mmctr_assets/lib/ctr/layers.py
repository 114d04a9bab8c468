"""Small composable CTR layers (FuxiCTR style): one idea per module, configured by plain arguments.

Histories are handled *packed*: only real (non-padding) history items are embedded and scored.
A batch of left-padded histories ``seq [B, L]`` becomes ``values [M]`` plus ``rows [M]`` (the row
each item belongs to) via :func:`pack_history`; with real MicroLens length statistics (median 6
of 64 positions) this skips ~87% of the attention work.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def pack_history(seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(item_ids [M], rows [M])`` for the non-zero entries of ``seq [B, L]``, row-major.

    Row-major order keeps the result (and so every later scatter-add) deterministic.
    """
    ids, rows, _ = pack_history_with_recency(seq)
    return ids, rows


def pack_history_with_recency(seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`pack_history` plus each item's recency ``[M]``: its distance from the row's LAST
    position (0 = the most recent click). Histories are left-padded, so the last position is the
    newest item whatever the history length; the distance is the same for a short and a long
    history, which a position counted from the left would not be."""
    rows, cols = (seq != 0).nonzero(as_tuple=True)
    return seq[rows, cols], rows, (seq.shape[1] - 1) - cols


def recency_positions(seq: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` distance of each position from the last one (0 = most recent), left-padded ``seq``."""
    length = seq.shape[1]
    return torch.arange(length - 1, -1, -1, device=seq.device).expand(seq.shape[0], length)


def length_buckets(lengths: torch.Tensor, max_len: int) -> list[tuple[torch.Tensor, int]]:
    """Group rows by real history length into widths growing by half (4, 6, 8, 12, 16, 24, ...,
    ``max_len``).

    Returns ``[(row_index, width)]`` for every non-empty group; rows with no history are left out.
    A left-padded history of length ``n <= width`` keeps all its items in its last ``width``
    positions, so a sequence model run per group pays at most ~1.5x the real items instead of
    ``max_len`` per row (87% padding on MicroLens histories); power-of-two widths would pay up to 2x
    for one fewer group in two.
    """
    widths, w = [], 4
    while w < max_len:
        widths.append(w)
        w = w * 3 // 2 if w & (w - 1) == 0 else w * 4 // 3  # 4, 6, 8, 12, 16, 24, 32, ...
    widths.append(max_len)
    out, lo = [], 0
    for width in widths:
        index = ((lengths > lo) & (lengths <= width)).nonzero(as_tuple=True)[0]
        if index.numel():
            out.append((index, width))
        lo = width
    return out


def bag_mean(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.embedding_bag(ids, weight, mode="mean", padding_idx=0)``: the mean of each row's
    non-zero ids' rows of ``weight`` (zeros for a row of padding only), ``ids [N, k]`` -> ``[N, d]``.
    Both ways cheaper on CPU than that call: the forward runs embedding_bag's fast kernel, the
    backward is one ``index_add`` per id slot into the table's gradient."""
    return _BagMean.apply(ids, weight)


class _BagMean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        real = (ids != 0).to(weight.dtype)
        count = real.sum(dim=1, keepdim=True).clamp(min=1)
        ctx.save_for_backward(ids, count)
        ctx.rows = weight.shape[0]
        # weights 1/count on real ids, 0 on padding: the mean, on embedding_bag's fast kernel (which
        # its padding_idx argument turns off)
        return F.embedding_bag(ids, weight, mode="sum", per_sample_weights=real / count)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        ids, count = ctx.saved_tensors
        per_bag = grad / count
        table = grad.new_zeros(ctx.rows, grad.shape[1])
        for slot in ids.unbind(dim=1):  # one index_add per id slot: no [N, k, d] copy
            table.index_add_(0, slot, per_bag)
        table[0] = 0  # the padding row gets no gradient
        return None, table


def pad_width(x: torch.Tensor, multiple: int = 8) -> torch.Tensor:
    """``x [N, d]`` with zero columns appended up to a multiple of ``multiple``. CPU matrix
    kernels (oneDNN/MKL) run several times slower on an output width that is not one (e.g. 593),
    and both the forward and the backward of a layer over ``x`` produce such widths;
    :class:`CrossNet` and :class:`MLP` accept the padded input and give the same result."""
    return cat_padded([x], multiple)


def cat_padded(parts: Sequence[torch.Tensor], multiple: int = 8) -> torch.Tensor:
    """``pad_width(torch.cat(parts, dim=-1))`` in one copy: the zero columns join as one more part."""
    pad = -sum(part.shape[-1] for part in parts) % multiple
    if pad:
        parts = [*parts, parts[0].new_zeros(*parts[0].shape[:-1], pad)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


class Dice(nn.Module):
    """Data-adaptive activation from DIN: ``p(x) * x + (1 - p(x)) * alpha * x``, ``p = sigmoid(BN(x))``.

    The BatchNorm (no affine) keeps running statistics for inference. Accepts ``[N, C]`` (including
    packed history items) or ``[..., C]``; statistics are per feature over all leading positions.
    """

    def __init__(self, num_features: int, *, eps: float = 1e-8, momentum: float = 0.1):
        super().__init__()
        self.bn = nn.BatchNorm1d(num_features, affine=False, eps=eps, momentum=momentum)
        self.alpha = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.training and flat.shape[0] < 2:
            # Batch statistics of a single row are undefined: fall back to the running ones.
            normed = F.batch_norm(flat, self.bn.running_mean, self.bn.running_var,
                                  training=False, eps=self.bn.eps)
        else:
            normed = self.bn(flat)
        # p*x + (1-p)*alpha*x == x * (alpha + p*(1-alpha)): two full-size ops instead of four
        gate = torch.addcmul(self.alpha, torch.sigmoid(normed), 1.0 - self.alpha)
        return (flat * gate).reshape(x.shape)


class Dropout(nn.Module):
    """``nn.Dropout``'s function (zero each element with probability ``p`` in training, scale the
    rest by ``1 / (1 - p)``; identity in eval) with a cheaper mask: 16 random bits per element, four
    elements per 64-bit draw of torch's generator. ``nn.Dropout`` draws one number per element
    (``bernoulli_``), which on CPU costs more than the layer it follows. ``p`` is applied to 1/65536."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0 <= p <= 1:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.p == 1:
            return x * 0
        words = torch.randint(-2 ** 63, 2 ** 63 - 1, (-(-x.numel() // 4),), dtype=torch.int64, device=x.device)
        bits = words.view(torch.int16)[:x.numel()].view(x.shape)  # uniform over -32768..32767
        keep = bits >= round(self.p * 65536) - 32768
        return x * keep.to(x.dtype).mul_(1 / (1 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _activation(name: str, units: int) -> nn.Module:
    if name == "dice":
        return Dice(units)
    if name == "relu":
        return nn.ReLU()
    raise ValueError(f"activation must be 'dice' or 'relu', got {name!r}")


class MLP(nn.Module):
    """Stack of ``Linear -> [BatchNorm] -> activation -> [Dropout]`` blocks, optional linear output."""

    def __init__(self, input_dim: int, hidden_units: Sequence[int], *, activation: str = "relu",
                 dropout: float = 0.0, batch_norm: bool = False, output_dim: int | None = None):
        super().__init__()
        layers: list[nn.Module] = []
        dim = input_dim
        for units in hidden_units:
            layers.append(nn.Linear(dim, units))
            if batch_norm:
                layers.append(nn.BatchNorm1d(units))
            layers.append(_activation(activation, units))
            if dropout > 0:
                layers.append(Dropout(dropout))
            dim = units
        if output_dim is not None:
            layers.append(nn.Linear(dim, output_dim))
            dim = output_dim
        self.layers = nn.Sequential(*layers)
        self.output_dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [N, input_dim]``, or zero-padded wider (:func:`pad_width`): the first layer's weight
        is padded to match, so the result is the same."""
        first = self.layers[0]
        if x.shape[-1] != first.in_features:
            x = F.linear(x, F.pad(first.weight, (0, x.shape[-1] - first.in_features)), first.bias)
            return self.layers[1:](x)
        return self.layers(x)


class CrossNet(nn.Module):
    """DCN cross layers: ``x_{l+1} = x0 * f(x_l) + b + x_l``.

    ``version="v1"`` uses a rank-1 ``f(x) = x . w`` (DCN, Wang et al. 2017, ``d`` params per layer);
    ``"v2"`` a full matrix ``f(x) = W x`` (DCN-V2, 2021, ``d*d`` per layer), or with ``rank=r > 0``
    its low-rank form ``W = U V^T`` (``2*d*r`` per layer; DCN-V2's cost-saving variant).
    """

    def __init__(self, input_dim: int, num_layers: int, *, version: str = "v1", rank: int = 0):
        super().__init__()
        if version not in ("v1", "v2"):
            raise ValueError(f"CrossNet version must be 'v1' or 'v2', got {version!r}")
        if rank < 0 or (rank and version != "v2"):
            raise ValueError(f"CrossNet rank must be 0 (full) or > 0 with version 'v2', got {rank} ({version})")
        self.version = version
        out = 1 if version == "v1" else input_dim

        def weight() -> nn.Module:
            if rank:
                return nn.Sequential(nn.Linear(input_dim, rank, bias=False), nn.Linear(rank, input_dim, bias=False))
            return nn.Linear(input_dim, out, bias=False)

        self.input_dim, self.rank = input_dim, rank
        self.weights = nn.ModuleList(weight() for _ in range(num_layers))
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(input_dim)) for _ in range(num_layers))

    def forward(self, x0: torch.Tensor, *, keep_padding: bool = False) -> torch.Tensor:
        """``x0 [N, input_dim]``, or zero-padded wider (:func:`pad_width`): the weights are padded
        with zeros to match, the padding stays zero through every layer and is cut off the output
        (kept with ``keep_padding``), so the result is the same."""
        pad = x0.shape[-1] - self.input_dim
        x = x0
        for w, b in zip(self.weights, self.biases):
            if not pad:
                x = x0 * w(x) + b + x
                continue
            if self.rank:  # W = U V^T: V's input columns and U's output rows padded
                down, up = F.pad(w[0].weight, (0, pad)), F.pad(w[1].weight, (0, 0, 0, pad))
                wx = F.linear(F.linear(x, down), up)
            else:  # v1: [1, d] (input columns); v2: [d, d] (both)
                wx = F.linear(x, F.pad(w.weight, (0, pad, 0, pad if self.version == "v2" else 0)))
            x = x0 * wx + F.pad(b, (0, pad)) + x
        return x[:, :self.input_dim] if pad and not keep_padding else x


class TargetAttention(nn.Module):
    """DIN target attention: score each history item ``h`` against the target ``t`` with an MLP
    over ``[t, h, t - h, t * h]`` and return the score-weighted SUM of the history.

    No softmax, as in the DIN paper: weights are not normalised, so the pooled vector keeps how
    *much* of the history matches the target (intensity of interest), not only its direction.
    ``output_activation="sigmoid"`` (FuxiCTR's ``attention_output_activation``) bounds each weight
    to (0, 1), a soft "this item matches the target"; ``return_score_sum=True`` then also returns
    each row's sum of weights, the soft number of matching history items.
    Padding never gets a weight (it is never scored); an all-padding history pools to zeros.

    ``split_first_layer`` uses linearity of the first layer,
    ``W[t, h, t-h, t*h] = (W1+W3) t + (W2-W3) h + W4 (t*h)``, to compute the target part once per
    row instead of once per history item. Same parameters, same function, fewer FLOPs.
    """

    def __init__(self, embedding_dim: int, attention_units: Sequence[int] = (64, 32), *,
                 activation: str = "dice", dropout: float = 0.0, split_first_layer: bool = True,
                 output_activation: str = "linear"):
        super().__init__()
        if not attention_units:
            raise ValueError("attention_units needs at least one layer, e.g. [64, 32]")
        if output_activation not in ("linear", "sigmoid"):
            raise ValueError(f"output_activation must be 'linear' or 'sigmoid', got {output_activation!r}")
        self.output_activation = output_activation
        self.embedding_dim = embedding_dim
        self.split_first_layer = split_first_layer
        self.first = nn.Linear(4 * embedding_dim, attention_units[0])
        self.first_activation = _activation(activation, attention_units[0])
        self.first_dropout = Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rest = MLP(attention_units[0], attention_units[1:], activation=activation,
                        dropout=dropout, output_dim=1)

    def _first_layer(self, target: torch.Tensor, history: torch.Tensor,
                     rows: torch.Tensor) -> torch.Tensor:
        t = target.index_select(0, rows)
        if not self.split_first_layer:
            return self.first(torch.cat([t, history, t - history, t * history], dim=-1))
        w1, w2, w3, w4 = self.first.weight.split(self.embedding_dim, dim=1)
        per_target = F.linear(target, w1 + w3, self.first.bias)
        z = torch.addmm(per_target.index_select(0, rows), history, (w2 - w3).t())
        return torch.addmm(z, t * history, w4.t())

    @property
    def key_bias_dim(self) -> int:
        """Width of the optional per-item ``key_bias`` (the first hidden layer's)."""
        return self.first.out_features

    def _scores(self, z: torch.Tensor) -> torch.Tensor:
        scores = self.rest(self.first_dropout(self.first_activation(z)))
        return torch.sigmoid(scores) if self.output_activation == "sigmoid" else scores

    def forward(self, target: torch.Tensor, history: torch.Tensor, rows: torch.Tensor, *,
                return_score_sum: bool = False, key_bias: torch.Tensor | None = None,
                values: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``target [B, D]``, packed ``history [M, D]`` with ``rows [M]`` (its row in the batch)
        -> pooled interest ``[B, D]`` (and the per-row sum of weights ``[B]``).

        ``key_bias [M, key_bias_dim]`` is added to each item's first hidden layer: a learned
        embedding of the item's position enters the key this way (a linear layer over a
        concatenated position embedding is the same function). ``values [M, D]`` replaces the
        pooled vectors (default: ``history``), e.g. items plus their position embedding.
        """
        if history.shape[0] == 0:
            pooled, score_sum = torch.zeros_like(target), target.new_zeros(target.shape[0])
        else:
            z = self._first_layer(target, history, rows)
            scores = self._scores(z if key_bias is None else z + key_bias)
            history = history if values is None else values
            weighted = scores * history
            pooled = weighted.new_zeros(target.shape).index_add_(0, rows, weighted)
            score_sum = scores.new_zeros(target.shape[0]).index_add_(0, rows, scores.squeeze(-1))
        return (pooled, score_sum) if return_score_sum else pooled

    def forward_padded(self, target: torch.Tensor, history: torch.Tensor, mask: torch.Tensor, *,
                       return_score_sum: bool = False, key_bias: torch.Tensor | None = None,
                       values: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Reference implementation over the full padded history ``[B, L, D]`` with ``mask [B, L]``
        (True = real item); ``key_bias [B, L, key_bias_dim]``, ``values [B, L, D]`` as in :meth:`forward`.

        Kept to test the packed path and as the benchmark baseline. Equal to :meth:`forward` in
        eval mode; in training mode its Dice batch statistics also see the padding positions.
        """
        t = target.unsqueeze(1).expand_as(history)
        z = self.first(torch.cat([t, history, t - history, t * history], dim=-1))
        if key_bias is not None:
            z = z + key_bias
        history = history if values is None else values
        scores = self._scores(z).squeeze(-1) * mask.to(history.dtype)
        pooled = (scores.unsqueeze(-1) * history).sum(dim=1)
        return (pooled, scores.sum(dim=1)) if return_score_sum else pooled


class HashedEmbedding(nn.Module):
    """Embedding of an unbounded integer id (e.g. ``user_id``) hashed into ``n_buckets`` rows.

    Any id, including one never seen in training, maps to a bucket, so valid/test users need no
    vocabulary. The hash is a fixed multiplicative one (deterministic across runs and machines),
    so neighbouring ids do not share buckets systematically.
    """

    _MULTIPLIER = 0x9E3779B97F4A7C15 - (1 << 64)  # golden-ratio constant as a signed int64

    def __init__(self, n_buckets: int, dim: int, *, init_std: float = 1e-4, sparse: bool = False):
        super().__init__()
        if n_buckets < 1:
            raise ValueError(f"n_buckets must be >= 1, got {n_buckets}")
        self.n_buckets = n_buckets
        self.embedding = nn.Embedding(n_buckets, dim, sparse=sparse)
        nn.init.normal_(self.embedding.weight, std=init_std)

    def bucket(self, ids: torch.Tensor) -> torch.Tensor:
        mixed = ids.long() * self._MULTIPLIER  # wraps around in int64: deterministic
        return torch.remainder(mixed >> 16, self.n_buckets)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.bucket(ids))
