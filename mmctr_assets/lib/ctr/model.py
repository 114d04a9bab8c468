"""DCN-DIN: DIN target attention over the click history feeding a DCN (cross net || deep net).

Items are represented by a frozen pretrained embedding matrix (the Task 1 deliverable), optionally
concatenated with a trainable item-id embedding and a mean-pooled tag embedding.

Beside DIN's pooled vector: sigmoid-bounded attention weights and two kinds of scalar input, the
history-match features (the weights' mean and log-sum: which share, and how many, of the user's
items match the target; a pooled vector only implies them) and the target's log frequency in the
training data (popularity). They pay off when the item table separates topics; with a noisy table
the DIN paper's linear weights without them do better (figures: benchmarks/README.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmctr_assets.lib.ctr.layers import MLP, CrossNet, TargetAttention, pack_history
from mmctr_assets.lib.data.microlens import MAX_LEVEL

ATTENTION_IMPLS = ("packed_split", "packed", "padded")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters. Everything here (plus table shapes) rebuilds the model."""

    embedding_dim: int = 128  # width of the pretrained item-embedding matrix
    max_len: int = 64  # history positions the model reads: the most recent max_len items
    finetune_item_embeddings: bool = False
    use_id_embedding: bool = False
    id_embedding_dim: int = 32
    use_tag_embedding: bool = False
    tag_embedding_dim: int = 32
    level_vocab_size: int = MAX_LEVEL + 1  # likes_level / views_level take values 0..level_vocab_size-1
    level_embedding_dim: int = 16
    attention_units: tuple[int, ...] = (64, 32)
    attention_dropout: float = 0.0
    attention_impl: str = "packed_split"  # "packed" / "padded" exist for tests and benchmarks
    attention_output_activation: str = "sigmoid"  # "linear": the DIN paper's unbounded weights
    history_match_features: bool = True  # mean and log-sum of the (sigmoid) attention weights
    use_item_frequency: bool = True  # the target's standardised log count in the training data
    cross_layers: int = 3
    cross_version: str = "v1"
    deep_units: tuple[int, ...] = (128, 64)
    dropout: float = 0.1
    batch_norm: bool = False

    def __post_init__(self):
        # Lists arrive from JSON/Dagster config; store tuples so the config stays hashable.
        object.__setattr__(self, "attention_units", tuple(int(u) for u in self.attention_units))
        object.__setattr__(self, "deep_units", tuple(int(u) for u in self.deep_units))
        problems = []
        if self.attention_impl not in ATTENTION_IMPLS:
            problems.append(f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        if self.attention_output_activation not in ("linear", "sigmoid"):
            problems.append("attention_output_activation must be 'linear' or 'sigmoid', "
                            f"got {self.attention_output_activation!r}")
        elif self.history_match_features and self.attention_output_activation != "sigmoid":
            problems.append("history_match_features needs attention_output_activation='sigmoid' "
                            "(weights in (0, 1) are soft matches that can be counted)")
        if self.cross_version not in ("v1", "v2"):
            problems.append(f"cross_version must be 'v1' or 'v2', got {self.cross_version!r}")
        for name in ("embedding_dim", "max_len", "id_embedding_dim", "tag_embedding_dim",
                     "level_vocab_size", "level_embedding_dim"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cross_layers < 0:
            problems.append(f"cross_layers must be >= 0, got {self.cross_layers}")
        if not self.attention_units or min(self.attention_units) < 1:
            problems.append(f"attention_units must be positive sizes, got {list(self.attention_units)}")
        if not self.deep_units or min(self.deep_units) < 1:
            problems.append(f"deep_units must be positive sizes, got {list(self.deep_units)}")
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if problems:
            raise ValueError("Invalid ModelConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["attention_units"] = list(self.attention_units)
        d["deep_units"] = list(self.deep_units)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"Unknown ModelConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**d)


class DCNDIN(nn.Module):
    """``[target item, DIN interest, likes/views level emb] -> CrossNet || deep MLP -> linear -> logit``.

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
            self.id_embedding = nn.Embedding(self.n_items + 1, config.id_embedding_dim, padding_idx=0)
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
            self.tag_embedding = nn.Embedding(self.n_tags, config.tag_embedding_dim, padding_idx=0)
            item_dim += config.tag_embedding_dim
        self.item_dim = item_dim
        self.likes_embedding = nn.Embedding(config.level_vocab_size, config.level_embedding_dim)
        self.views_embedding = nn.Embedding(config.level_vocab_size, config.level_embedding_dim)
        self.attention = TargetAttention(item_dim, config.attention_units, activation="dice",
                                         dropout=config.attention_dropout,
                                         split_first_layer=config.attention_impl == "packed_split",
                                         output_activation=config.attention_output_activation)
        feature_dim = 2 * item_dim + 2 * config.level_embedding_dim
        if config.history_match_features:  # share and log-count of matching history items
            feature_dim += 2
        if config.use_item_frequency:
            self.register_buffer("item_log_frequency", _standardised_log_counts(item_frequency, self.n_items))
            feature_dim += 1
        self.cross = CrossNet(feature_dim, config.cross_layers, version=config.cross_version)
        self.deep = MLP(feature_dim, config.deep_units, activation="dice", dropout=config.dropout,
                        batch_norm=config.batch_norm)
        self.output = nn.Linear(feature_dim + self.deep.output_dim, 1)

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
        """Pooled interest ``[B, item_dim]``."""
        return self._attend(target, item_seq)[0]

    def _attend(self, target: torch.Tensor, item_seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (pooled interest ``[B, item_dim]``, sum of attention weights ``[B]``)."""
        if self.config.attention_impl == "padded":
            return self.attention.forward_padded(target, self.item_vectors(item_seq), item_seq != 0,
                                                 return_score_sum=True)
        ids, rows = pack_history(item_seq)
        return self.attention(target, self.item_vectors(ids), rows, return_score_sum=True)

    def forward(self, item_id: torch.Tensor, item_seq: torch.Tensor, likes_level: torch.Tensor,
                views_level: torch.Tensor) -> torch.Tensor:
        """-> logits ``[B]``."""
        target = self.item_vectors(item_id)
        interest, matches = self._attend(target, item_seq)
        parts = [target, interest, self.likes_embedding(likes_level), self.views_embedding(views_level)]
        if self.config.history_match_features:
            n_real = (item_seq != 0).sum(dim=1).clamp(min=1).to(matches.dtype)
            parts.append(torch.stack([matches / n_real, torch.log1p(matches)], dim=-1))
        if self.config.use_item_frequency:
            parts.append(self.item_log_frequency[item_id].unsqueeze(-1).to(target.dtype))
        features = torch.cat(parts, dim=-1)
        return self.output(torch.cat([self.cross(features), self.deep(features)], dim=-1)).squeeze(-1)

    def to_dict(self) -> dict[str, Any]:
        """Architecture (config + table shapes): with a state_dict, enough to rebuild the model."""
        return {"config": self.config.to_dict(), "n_items": self.n_items,
                "n_tags": self.n_tags,
                "n_tag_slots": int(self.item_tags.shape[1]) if self.config.use_tag_embedding else 0}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DCNDIN:
        """Empty model (zero tables) with the architecture of ``d``; load a state_dict into it."""
        config = ModelConfig.from_dict(d["config"])
        tags = np.zeros((d["n_items"] + 1, d["n_tag_slots"]), np.int64) if config.use_tag_embedding else None
        counts = np.zeros(d["n_items"] + 1, np.int64) if config.use_item_frequency else None
        return cls(config, np.zeros((d["n_items"] + 1, config.embedding_dim), np.float32), tags,
                   n_tags=d["n_tags"] or None, item_frequency=counts)


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
