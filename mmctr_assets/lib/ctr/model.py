"""CTR model families (``ModelConfig.family``): DCN-DIN with recency-aware DIN attention (default),
a Transformer + DCN-V2, and the organisers' DIN baseline, all from lib/ctr/layers.py.

DCN-DIN: DIN target attention over the click history feeding a DCN (cross net || deep net).

Items are represented by a frozen pretrained embedding matrix (the Task 1 deliverable), optionally
concatenated with a trainable item-id embedding and a mean-pooled tag embedding.

Beside DIN's pooled vector: sigmoid-bounded attention weights and two kinds of scalar input, the
history-match features (the weights' mean and log-sum: which share, and how many, of the user's
items match the target; a pooled vector only implies them) and the target's log frequency in the
training data (popularity). They pay off when the item table separates topics; with a noisy table
the DIN paper's linear weights without them do better (figures: docs/results.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmctr_assets.lib.ctr.layers import (
    MLP,
    CrossNet,
    HashedEmbedding,
    TargetAttention,
    TransformerHistory,
    embedding_l2,
    length_buckets,
    pack_history_with_recency,
    recency_positions,
)
from mmctr_assets.lib.data.microlens import MAX_LEVEL

ATTENTION_IMPLS = ("packed_split", "packed", "padded")
FAMILIES = ("dcn_din", "transformer_dcnv2", "din")
# Options whose default (and allowed values) depend on the family: they default to None and
# __post_init__ fills in the family's default. A family without an entry does not read the option.
# Each entry: (family default, allowed values or None for "any valid value").
_FAMILY_OPTIONS: dict[str, dict[str, tuple[Any, tuple | None]]] = {
    "dcn_din": {
        "position": ("key", ("none", "key", "key_value")),
        "attention_output_activation": ("sigmoid", ("linear", "sigmoid")),
        "history_match_features": (True, (True, False)),
        "use_item_frequency": (True, (True, False)),
        "cross_layers": (3, None),
        "cross_version": ("v1", ("v1", "v2")),
    },
    "transformer_dcnv2": {
        "position": ("token", ("none", "token")),
        "use_item_frequency": (True, (True, False)),
        "cross_layers": (3, None),
        "cross_version": ("v2", ("v1", "v2")),
    },
    # The organisers' DIN baseline: the DIN paper's linear attention weights, no extra scalars,
    # no cross network, history as a set.
    "din": {
        "position": ("none", ("none",)),
        "attention_output_activation": ("linear", ("linear",)),
        "history_match_features": (False, (False,)),
        "use_item_frequency": (False, (False,)),
    },
}
# Options with a plain default that only some families read: elsewhere they must keep it.
_FAMILY_ONLY = {
    "attention_units": ("dcn_din", "din"), "attention_impl": ("dcn_din", "din"),
    "cross_rank": ("dcn_din", "transformer_dcnv2"),
    "transformer_dim": ("transformer_dcnv2",), "transformer_layers": ("transformer_dcnv2",),
    "transformer_heads": ("transformer_dcnv2",), "transformer_ff_dim": ("transformer_dcnv2",),
    "last_k": ("transformer_dcnv2",),
}
# options only some families read (the rest share the item representation and the head)
FAMILY_SPECIFIC_OPTIONS = frozenset({n for options in _FAMILY_OPTIONS.values() for n in options} | set(_FAMILY_ONLY))


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters. Everything here (plus table shapes) rebuilds the model.

    ``family`` picks the model (all share the item representation, the level embeddings and the
    options below): ``dcn_din`` (DIN target attention with a recency embedding -> cross net ||
    deep net), ``transformer_dcnv2`` (a Transformer over the real history items, each joined with
    the target; last-k + max pooling -> DCN-V2 || deep net), ``din`` (the organisers' DIN
    baseline). Options set to None take the family's default; an option the family does not read
    must stay unset (a ValueError says which).
    """

    family: str = "dcn_din"
    embedding_dim: int = 128  # width of the pretrained item-embedding matrix
    max_len: int = 64  # history positions the model reads: the most recent max_len items
    finetune_item_embeddings: bool = False
    use_id_embedding: bool = False
    id_embedding_dim: int = 64  # momo's and FuxiCTR's MicroLens width
    use_tag_embedding: bool = False
    tag_embedding_dim: int = 64
    use_user_embedding: bool = False  # user_id hashed into user_buckets rows (unseen users too)
    user_buckets: int = 100_000
    user_embedding_dim: int = 16
    # a learned scalar per item / per user bucket added to the logit: how often an item is clicked
    # whatever the history (an appeal no content shows), how often a user clicks at all
    use_item_bias: bool = False
    use_user_bias: bool = False
    # FuxiCTR's embedding_regularizer: lambda / 2 * ||W||^2 over every trainable embedding table
    embedding_regularizer: float = 0.0
    level_vocab_size: int = MAX_LEVEL + 1  # likes_level / views_level take values 0..level_vocab_size-1
    level_embedding_dim: int = 16
    # "key": a learned embedding of each history item's distance from the most recent click
    # enters the attention key; "key_value": also added to the pooled items; "token" (transformer):
    # added to each token; "none": history as a set.
    position: str | None = None
    attention_units: tuple[int, ...] = (64, 32)
    attention_dropout: float = 0.0
    attention_impl: str = "packed_split"  # "packed" / "padded" exist for tests and benchmarks
    attention_output_activation: str | None = None  # "linear": the DIN paper's unbounded weights
    history_match_features: bool | None = None  # mean and log-sum of the (sigmoid) attention weights
    use_item_frequency: bool | None = None  # the target's standardised log count in the training data
    transformer_dim: int = 32  # tokens [item, target, item*target] are projected to this width
    transformer_layers: int = 1
    transformer_heads: int = 1
    transformer_ff_dim: int = 64
    last_k: int = 8  # transformer outputs of the k most recent positions kept as features
    cross_layers: int | None = None
    cross_version: str | None = None
    cross_rank: int = 0  # 0: full-rank DCN-V2 matrices; r > 0: low-rank U V^T (cross_version v2)
    deep_units: tuple[int, ...] = (128, 64)
    # an MLP over [cross net, deep net] before the output layer (momo's [64, 32]); () = linear output
    head_units: tuple[int, ...] = ()
    dropout: float = 0.1
    batch_norm: bool = False

    def __post_init__(self):
        # Lists arrive from JSON/Dagster config; store tuples so the config stays hashable.
        object.__setattr__(self, "attention_units", tuple(int(u) for u in self.attention_units))
        object.__setattr__(self, "deep_units", tuple(int(u) for u in self.deep_units))
        object.__setattr__(self, "head_units", tuple(int(u) for u in self.head_units))
        if self.family not in FAMILIES:
            raise ValueError(f"Invalid ModelConfig: family must be one of {FAMILIES}, got {self.family!r}")
        problems = self._resolve_family_options()
        if self.attention_impl not in ATTENTION_IMPLS:
            problems.append(f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        if self.history_match_features and self.attention_output_activation not in (None, "sigmoid"):
            problems.append("history_match_features needs attention_output_activation='sigmoid' "
                            "(weights in (0, 1) are soft matches that can be counted)")
        for name in ("embedding_dim", "max_len", "id_embedding_dim", "tag_embedding_dim", "user_buckets",
                     "user_embedding_dim", "level_vocab_size", "level_embedding_dim", "transformer_dim",
                     "transformer_layers", "transformer_heads", "transformer_ff_dim", "last_k"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.transformer_heads >= 1 and self.transformer_dim % self.transformer_heads:
            problems.append(f"transformer_dim ({self.transformer_dim}) must be divisible by "
                            f"transformer_heads ({self.transformer_heads})")
        if self.last_k > self.max_len:
            problems.append(f"last_k ({self.last_k}) must be <= max_len ({self.max_len})")
        if self.cross_layers is not None and self.cross_layers < 0:
            problems.append(f"cross_layers must be >= 0, got {self.cross_layers}")
        if self.cross_rank < 0 or (self.cross_rank and self.cross_version != "v2"):
            problems.append(f"cross_rank must be 0 (full rank) or > 0 with cross_version='v2', got "
                            f"{self.cross_rank} with cross_version={self.cross_version!r}")
        if not self.attention_units or min(self.attention_units) < 1:
            problems.append(f"attention_units must be positive sizes, got {list(self.attention_units)}")
        if not self.deep_units or min(self.deep_units) < 1:
            problems.append(f"deep_units must be positive sizes, got {list(self.deep_units)}")
        if self.head_units and min(self.head_units) < 1:
            problems.append(f"head_units must be positive sizes (or empty), got {list(self.head_units)}")
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.embedding_regularizer < 0:
            problems.append(f"embedding_regularizer must be >= 0, got {self.embedding_regularizer}")
        elif self.embedding_regularizer > 0 and not self.trainable_embeddings():
            problems.append("embedding_regularizer > 0 needs a trainable embedding (use_id_embedding, "
                            "use_tag_embedding, use_user_embedding, use_item_bias, use_user_bias or "
                            "finetune_item_embeddings)")
        if problems:
            raise ValueError("Invalid ModelConfig: " + "; ".join(problems))

    def _resolve_family_options(self) -> list[str]:
        """Fill in the family's defaults; list options the family does not read or allow."""
        problems, own = [], _FAMILY_OPTIONS[self.family]
        for name in sorted({n for options in _FAMILY_OPTIONS.values() for n in options}):
            value = getattr(self, name)
            if name not in own:
                if value is not None:
                    users = [f for f, options in _FAMILY_OPTIONS.items() if name in options]
                    problems.append(f"{name} is not an option of family {self.family!r} (only of {users}); "
                                    "remove it")
                continue
            default, allowed = own[name]
            if value is None:
                object.__setattr__(self, name, default)
            elif allowed is not None and value not in allowed:
                problems.append(f"{name} for family {self.family!r} must be one of {list(allowed)}, got {value!r}")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, families in _FAMILY_ONLY.items():
            if self.family not in families and getattr(self, name) != defaults[name]:
                problems.append(f"{name} is not an option of family {self.family!r} (only of {list(families)}); "
                                "remove it")
        return problems

    def trainable_embeddings(self) -> bool:
        return (self.use_id_embedding or self.use_tag_embedding or self.use_user_embedding
                or self.use_item_bias or self.use_user_bias or self.finetune_item_embeddings)

    def reads_user_id(self) -> bool:
        return self.use_user_embedding or self.use_user_bias

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["attention_units"] = list(self.attention_units)
        d["deep_units"] = list(self.deep_units)
        d["head_units"] = list(self.head_units)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"Unknown ModelConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**d)


class CTRModel(nn.Module):
    """One CTR model of ``config.family``, built from lib/ctr/layers.py.

    Every family: items are ``[frozen pretrained vector, trainable id embedding, mean tag
    embedding]`` (the last two optional); features ``[target item, history summary, likes/views
    level embeddings, optional scalars and user embedding]`` go to the head. Families differ in the
    history summary and the head:

    - ``dcn_din``: DIN target attention over the packed real items, a learned recency embedding
      entering each key (``position``); head: cross net || deep MLP -> linear.
    - ``transformer_dcnv2``: tokens ``[item, target, item*target]`` projected to
      ``transformer_dim`` plus a recency embedding, a Transformer over real items only (rows run
      in length buckets, so padding costs ~nothing), last-k + max pooling; head: DCN-V2 || MLP.
    - ``din``: DIN attention with linear weights, history as a set; head: the deep MLP alone.

    ``forward`` returns logits (use ``torch.sigmoid`` for probabilities). ``item_embeddings`` is the
    ``[n_items + 1, embedding_dim]`` matrix with row 0 the padding item; ``item_tags`` the
    ``[n_items + 1, n_tag_slots]`` tag-id matrix (0 = no tag), needed with ``use_tag_embedding``;
    ``n_tags`` (tag vocabulary size) defaults to ``item_tags.max() + 1``. ``item_frequency``
    ``[n_items + 1]`` counts each item's occurrences in the training data (needed with
    ``use_item_frequency``; :func:`mmctr_assets.lib.ctr.tensors.item_frequency` computes it); the
    model keeps it as a buffer, so a saved model predicts with its training data's counts.
    """

    def __init__(self, config: ModelConfig, item_embeddings: np.ndarray | torch.Tensor,
                 item_tags: np.ndarray | torch.Tensor | None = None, *, n_tags: int | None = None,
                 item_frequency: np.ndarray | torch.Tensor | None = None):
        super().__init__()
        emb = torch.as_tensor(np.asarray(item_embeddings, dtype=np.float32))
        if emb.ndim != 2 or emb.shape[1] != config.embedding_dim:
            raise ValueError(
                f"item_embeddings must have shape [n_items + 1, {config.embedding_dim}] "
                f"(ModelConfig.embedding_dim), got {tuple(emb.shape)}")
        if not torch.isfinite(emb).all():
            bad = (~torch.isfinite(emb)).any(dim=1).nonzero().flatten()
            raise ValueError(f"item_embeddings has NaN/inf in {len(bad)} rows (e.g. item {int(bad[0])}); "
                             "recompute the item embeddings")
        self.config = config
        self.n_items = emb.shape[0] - 1
        self.item_embedding = nn.Embedding.from_pretrained(
            emb, freeze=not config.finetune_item_embeddings, padding_idx=0)
        item_dim = config.embedding_dim
        if config.use_id_embedding:
            self.id_embedding = _trainable_table(self.n_items + 1, config.id_embedding_dim)
            item_dim += config.id_embedding_dim
        self.n_tags = 0
        if config.use_tag_embedding:
            if item_tags is None:
                raise ValueError("use_tag_embedding=True needs item_tags (item_info.item_tags as a "
                                 "[n_items + 1, k] int matrix); pass it or set use_tag_embedding=False")
            tags = torch.as_tensor(np.asarray(item_tags, dtype=np.int64))
            if tags.ndim != 2 or tags.shape[0] != self.n_items + 1:
                raise ValueError(f"item_tags must have shape [{self.n_items + 1}, k] to match "
                                 f"item_embeddings, got {tuple(tags.shape)}")
            if (tags < 0).any():
                raise ValueError("item_tags has negative tag ids; tags must be >= 1 with 0 as padding")
            self.register_buffer("item_tags", tags)
            self.n_tags = int(tags.max()) + 1 if n_tags is None else n_tags
            if self.n_tags <= int(tags.max()):
                raise ValueError(f"n_tags={n_tags} is too small for tag id {int(tags.max())}")
            self.tag_embedding = _trainable_table(self.n_tags, config.tag_embedding_dim)
            item_dim += config.tag_embedding_dim
        self.item_dim = item_dim
        self.likes_embedding = nn.Embedding(config.level_vocab_size, config.level_embedding_dim)
        self.views_embedding = nn.Embedding(config.level_vocab_size, config.level_embedding_dim)
        feature_dim = item_dim + 2 * config.level_embedding_dim
        if config.use_user_embedding:
            self.user_embedding = HashedEmbedding(config.user_buckets, config.user_embedding_dim)
            feature_dim += config.user_embedding_dim
        if config.family == "transformer_dcnv2":
            self.token = nn.Linear(3 * item_dim, config.transformer_dim)
            if config.position == "token":
                self.position_embedding = _position_table(config.max_len, config.transformer_dim)
            self.sequence = TransformerHistory(
                config.transformer_dim, num_layers=config.transformer_layers,
                num_heads=config.transformer_heads, ff_dim=config.transformer_ff_dim,
                dropout=config.attention_dropout, last_k=config.last_k)
            feature_dim += self.sequence.output_dim
        else:
            self.attention = TargetAttention(item_dim, config.attention_units, activation="dice",
                                             dropout=config.attention_dropout,
                                             split_first_layer=config.attention_impl == "packed_split",
                                             output_activation=config.attention_output_activation)
            if config.position in ("key", "key_value"):
                self.position_key = _position_table(config.max_len, self.attention.key_bias_dim)
            if config.position == "key_value":
                self.position_value = _position_table(config.max_len, item_dim)
            feature_dim += item_dim
        if config.history_match_features:  # share and log-count of matching history items
            feature_dim += 2
        if config.use_item_frequency:
            self.register_buffer("item_log_frequency", _standardised_log_counts(item_frequency, self.n_items))
            feature_dim += 1
        if config.family != "din":  # the DIN paper's head is the MLP alone
            self.cross = CrossNet(feature_dim, config.cross_layers, version=config.cross_version,
                                  rank=config.cross_rank)
        self.deep = MLP(feature_dim, config.deep_units, activation="dice", dropout=config.dropout,
                        batch_norm=config.batch_norm)
        head_dim = self.deep.output_dim + (0 if config.family == "din" else feature_dim)
        if config.head_units:
            self.head = MLP(head_dim, config.head_units, activation="relu", dropout=config.dropout,
                            batch_norm=config.batch_norm)
            head_dim = self.head.output_dim
        self.output = nn.Linear(head_dim, 1)
        if config.use_item_bias:
            self.item_bias = _trainable_table(self.n_items + 1, 1)
        if config.use_user_bias:
            self.user_bias = HashedEmbedding(config.user_buckets, 1)

    def item_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """Representation of items ``ids [...]`` -> ``[..., item_dim]``; id 0 maps to zeros."""
        parts = [self.item_embedding(ids)]
        if self.config.use_id_embedding:
            parts.append(self.id_embedding(ids))
        if self.config.use_tag_embedding:
            tags = self.item_tags[ids]
            count = (tags != 0).sum(-1, keepdim=True).clamp(min=1)
            parts.append(self.tag_embedding(tags).sum(-2) / count)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def interest(self, target: torch.Tensor, item_seq: torch.Tensor) -> torch.Tensor:
        """History summary ``[B, *]``: the pooled interest (attention families) or the pooled
        Transformer outputs."""
        return self._history(target, item_seq)[0]

    def _history(self, target: torch.Tensor, item_seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.config.family == "transformer_dcnv2":
            return self._transformer(target, item_seq), None
        return self._attend(target, item_seq)

    def _attend(self, target: torch.Tensor, item_seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (pooled interest ``[B, item_dim]``, sum of attention weights ``[B]``)."""
        position = self.config.position
        if self.config.attention_impl == "padded":
            recency = recency_positions(item_seq)
            history = self.item_vectors(item_seq)
            key = self.position_key(recency) if position != "none" else None
            values = history + self.position_value(recency) if position == "key_value" else None
            return self.attention.forward_padded(target, history, item_seq != 0, return_score_sum=True,
                                                 key_bias=key, values=values)
        ids, rows, recency = pack_history_with_recency(item_seq)
        history = self.item_vectors(ids)
        key = self.position_key(recency) if position != "none" else None
        values = history + self.position_value(recency) if position == "key_value" else None
        return self.attention(target, history, rows, return_score_sum=True, key_bias=key, values=values)

    def _transformer(self, target: torch.Tensor, item_seq: torch.Tensor) -> torch.Tensor:
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
        return out

    def forward(self, item_id: torch.Tensor, item_seq: torch.Tensor, likes_level: torch.Tensor,
                views_level: torch.Tensor, user_id: torch.Tensor | None = None) -> torch.Tensor:
        """-> logits ``[B]``. ``user_id`` is needed with ``use_user_embedding`` (any int64; hashed)."""
        target = self.item_vectors(item_id)
        summary, matches = self._history(target, item_seq)
        parts = [target, summary, self.likes_embedding(likes_level), self.views_embedding(views_level)]
        if self.config.reads_user_id() and user_id is None:
            raise ValueError("use_user_embedding / use_user_bias: the model needs user_id (the user_id column of the frame)")
        if self.config.use_user_embedding:
            parts.append(self.user_embedding(user_id))
        if self.config.history_match_features:
            n_real = (item_seq != 0).sum(dim=1).clamp(min=1).to(matches.dtype)
            parts.append(torch.stack([matches / n_real, torch.log1p(matches)], dim=-1))
        if self.config.use_item_frequency:
            parts.append(self.item_log_frequency[item_id].unsqueeze(-1).to(target.dtype))
        features = torch.cat(parts, dim=-1)
        if self.config.family == "din":
            hidden = self.deep(features)
        else:
            hidden = torch.cat([self.cross(features), self.deep(features)], dim=-1)
        if self.config.head_units:
            hidden = self.head(hidden)
        logit = self.output(hidden).squeeze(-1)
        if self.config.use_item_bias:
            logit = logit + self.item_bias(item_id).squeeze(-1).to(logit.dtype)
        if self.config.use_user_bias:
            logit = logit + self.user_bias(user_id).squeeze(-1).to(logit.dtype)
        return logit

    def embedding_penalty(self) -> torch.Tensor:
        """``embedding_regularizer / 2`` x the squared L2 norm of every trainable embedding table
        (item ids, tags, user buckets, item and user biases; padding rows excluded), to add to each
        step's loss: FuxiCTR's ``lambda / 2 * ||W||^2`` over whole tables."""
        cfg = self.config
        tables = [(self.item_embedding.weight, 0)] if cfg.finetune_item_embeddings else []
        tables += [(self.id_embedding.weight, 0)] if cfg.use_id_embedding else []
        tables += [(self.tag_embedding.weight, 0)] if cfg.use_tag_embedding else []
        tables += [(self.user_embedding.embedding.weight, None)] if cfg.use_user_embedding else []
        tables += [(self.item_bias.weight, 0)] if cfg.use_item_bias else []
        tables += [(self.user_bias.embedding.weight, None)] if cfg.use_user_bias else []
        total = sum((embedding_l2(table, padding_row=pad) for table, pad in tables),
                    start=self.likes_embedding.weight.new_zeros(()))
        return cfg.embedding_regularizer / 2 * total

    def to_dict(self) -> dict[str, Any]:
        """Architecture (config + table shapes): with a state_dict, enough to rebuild the model."""
        return {"config": self.config.to_dict(), "n_items": self.n_items,
                "n_tags": self.n_tags,
                "n_tag_slots": int(self.item_tags.shape[1]) if self.config.use_tag_embedding else 0}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CTRModel:
        """Empty model (zero tables) with the architecture of ``d``; load a state_dict into it."""
        config = ModelConfig.from_dict(d["config"])
        tags = np.zeros((d["n_items"] + 1, d["n_tag_slots"]), np.int64) if config.use_tag_embedding else None
        counts = np.zeros(d["n_items"] + 1, np.int64) if config.use_item_frequency else None
        return cls(config, np.zeros((d["n_items"] + 1, config.embedding_dim), np.float32), tags,
                   n_tags=d["n_tags"] or None, item_frequency=counts)


DCNDIN = CTRModel  # the seed's name, kept for callers


def _trainable_table(rows: int, dim: int) -> nn.Embedding:
    """Trainable id/tag table, row 0 padding. Starts near zero (std 1e-4, FuxiCTR's default), so
    the L2 embedding regulariser and the content vectors dominate until the data says otherwise."""
    table = nn.Embedding(rows, dim, padding_idx=0)
    nn.init.normal_(table.weight, std=1e-4)
    with torch.no_grad():
        table.weight[0] = 0
    return table


def _position_table(max_len: int, dim: int) -> nn.Embedding:
    """Learned embedding per recency (0 = most recent .. max_len - 1), small random start so that
    order matters from the first step without dominating the content signal."""
    table = nn.Embedding(max_len, dim)
    nn.init.normal_(table.weight, std=0.05)
    return table


def _standardised_log_counts(counts: np.ndarray | torch.Tensor | None, n_items: int) -> torch.Tensor:
    """``log1p(count)`` standardised over the real items; the padding row stays 0."""
    if counts is None:
        raise ValueError("use_item_frequency=True needs item_frequency (each item's count in the "
                         "training data, ctr.tensors.item_frequency(train_tensors) computes it); pass it "
                         "or set use_item_frequency=False")
    counts = np.asarray(counts, dtype=np.float64)
    if counts.shape != (n_items + 1,) or (counts < 0).any() or not np.isfinite(counts).all():
        raise ValueError(f"item_frequency must be {n_items + 1} finite counts >= 0 (one per row of "
                         f"item_embeddings), got shape {counts.shape}")
    logs = np.log1p(counts)
    std = logs[1:].std()
    out = (logs - logs[1:].mean()) / (std if std > 0 else 1.0)
    out[0] = 0.0
    return torch.from_numpy(out.astype(np.float32))


def bce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy on logits, computed in float32 whatever the autocast dtype."""
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
