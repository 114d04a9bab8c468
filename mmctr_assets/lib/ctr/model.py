"""The CTR model's shared parts; each family is its own module (dcn_din.py, transformer_dcnv2.py,
din.py) and says which history summary it builds and which options it reads.

Every family represents items the same way: the frozen pretrained vector (the Task 1 deliverable),
optionally concatenated with a trainable item-id embedding and a mean-pooled tag embedding. Every
family has the same head: ``[target item, history summary, likes/views level embeddings, optional
scalars and user embedding]`` -> cross net || deep MLP (the deep MLP alone where a family has no
cross net) -> optional MLP -> linear, plus optional item and user biases on the logit.

The optional scalars: the history-match features (the mean and log-sum of sigmoid attention
weights: which share, and how many, of the user's items match the target; a pooled vector only
implies them), the target's log frequency in the training data (popularity) and the item's and
user's click statistics (lib/ctr/statistics.py, out of fold on training rows). The first two pay off when
the item table separates topics; with a noisy table the DIN paper's linear weights without them do
better (figures: docs/results.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmctr_assets.lib.ctr.layers import MLP, CrossNet, HashedEmbedding, bag_mean, cat_padded
from mmctr_assets.lib.ctr.statistics import FEATURES as STATISTICS_FEATURES
from mmctr_assets.lib.ctr.statistics import TrainingStatistics


class CTRModel(nn.Module):
    """One CTR model: ``CTRModel(config, ...)`` builds ``config.family``'s subclass.

    A family subclass sets ``family``, ``OPTIONS`` (options whose default and allowed values are
    its own: ``{name: (default, allowed values or None)}``; ModelConfig fills them in and refuses
    them on other families), ``READS`` (plain-default options only some families read),
    ``uses_cross`` (a cross net beside the deep MLP), and builds its history summary in
    ``_build_history`` / ``_history``.

    ``forward`` returns logits (use ``torch.sigmoid`` for probabilities). ``item_embeddings`` is the
    ``[n_items + 1, embedding_dim]`` matrix with row 0 the padding item; ``item_tags`` the
    ``[n_items + 1, n_tag_slots]`` tag-id matrix (0 = no tag), needed with ``use_tag_embedding``;
    ``n_tags`` (tag vocabulary size) defaults to ``item_tags.max() + 1``. ``item_frequency``
    ``[n_items + 1]`` counts each item's occurrences in the training data (needed with
    ``use_item_frequency``; :func:`mmctr_assets.lib.ctr.tensors.item_frequency` computes it); the
    model keeps it as a buffer, so a saved model predicts with its training data's counts.
    ``statistics`` (needed with ``use_statistics_features``; ``TrainingStatistics.fit`` on the
    training rows builds it) holds the training rows' click statistics, likewise saved with the model.
    ``item_levels`` ``[n_items + 1, 2]`` (each item's likes and views level, row 0 padding; needed
    with ``use_item_levels``) is a buffer too: every item vector, target and history, gains the
    embeddings of its item's levels.
    """

    family: ClassVar[str] = ""
    OPTIONS: ClassVar[dict[str, tuple[Any, tuple | None]]] = {}
    READS: ClassVar[tuple[str, ...]] = ()
    uses_cross: ClassVar[bool] = True
    _families: ClassVar[dict[str, type[CTRModel]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        CTRModel._families[cls.family] = cls

    def __new__(cls, config=None, *args, **kwargs):  # config: a model_config.ModelConfig
        if cls is CTRModel and config is not None:
            if config.family not in CTRModel._families:
                raise ValueError(f"unknown model family {config.family!r}; known: {sorted(CTRModel._families)}")
            cls = CTRModel._families[config.family]
        return super().__new__(cls)

    def __init__(self, config, item_embeddings: np.ndarray | torch.Tensor,
                 item_tags: np.ndarray | torch.Tensor | None = None, *, n_tags: int | None = None,
                 item_frequency: np.ndarray | torch.Tensor | None = None,
                 statistics: TrainingStatistics | None = None,
                 item_levels: np.ndarray | torch.Tensor | None = None):
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
            emb, freeze=not config.finetune_item_embeddings, padding_idx=0, sparse=config.sparse_embedding_updates)
        item_dim = config.embedding_dim
        if config.use_id_embedding:
            self.id_embedding = trainable_table(self.n_items + 1, config.id_embedding_dim,
                                                sparse=config.sparse_embedding_updates)
            item_dim += config.id_embedding_dim
        self.n_tags = 0
        if config.use_tag_embedding:
            if item_tags is None:
                raise ValueError("use_tag_embedding=True needs item_tags (item_info.item_tags as a "
                                 "[n_items + 1, k] int matrix); pass it or set use_tag_embedding=False")
            tags = torch.as_tensor(np.array(item_tags, dtype=np.int64))  # a copy: polars hands out read-only arrays
            if tags.ndim != 2 or tags.shape[0] != self.n_items + 1:
                raise ValueError(f"item_tags must have shape [{self.n_items + 1}, k] to match "
                                 f"item_embeddings, got {tuple(tags.shape)}")
            if (tags < 0).any():
                raise ValueError("item_tags has negative tag ids; tags must be >= 1 with 0 as padding")
            self.register_buffer("item_tags", tags)
            self.n_tags = int(tags.max()) + 1 if n_tags is None else n_tags
            if self.n_tags <= int(tags.max()):
                raise ValueError(f"n_tags={n_tags} is too small for tag id {int(tags.max())}")
            # always dense: the tag vocabulary does not grow with the catalog, and one dense update
            # is cheaper than summing the sparse gradient of every (item, tag) lookup
            self.tag_embedding = trainable_table(self.n_tags, config.tag_embedding_dim, sparse=False)
            item_dim += config.tag_embedding_dim
        if config.use_item_levels:  # the row-level tables below embed them (the same bucketed quantity)
            self.register_buffer("item_levels", _item_level_table(item_levels, self.n_items, config.level_vocab_size))
            item_dim += 2 * config.level_embedding_dim
        self.item_dim = item_dim
        self.likes_embedding = nn.Embedding(config.level_vocab_size, config.level_embedding_dim)
        self.views_embedding = nn.Embedding(config.level_vocab_size, config.level_embedding_dim)
        feature_dim = item_dim + 2 * config.level_embedding_dim
        if config.use_user_embedding:
            self.user_embedding = HashedEmbedding(config.user_buckets, config.user_embedding_dim,
                                                  sparse=config.sparse_embedding_updates)
            feature_dim += config.user_embedding_dim
        feature_dim += self._build_history(config, item_dim)
        if config.history_match_features:  # share and log-count of matching history items
            feature_dim += 2
        if config.use_item_frequency:
            self.register_buffer("item_log_frequency", _standardised_log_counts(item_frequency, self.n_items))
            feature_dim += 1
        if config.use_statistics_features:
            if statistics is None:
                raise ValueError("use_statistics_features=True needs statistics (the training rows' click "
                                 "statistics, ctr.statistics.TrainingStatistics.fit builds them); pass them "
                                 "or set use_statistics_features=False")
            if statistics.item_counts.shape[0] != self.n_items + 1:
                raise ValueError(f"statistics cover {statistics.item_counts.shape[0] - 1} items, the item "
                                 f"table {self.n_items}: fit them with n_items={self.n_items}")
            self.statistics = statistics
            feature_dim += len(STATISTICS_FEATURES)
        if self.uses_cross:
            self.cross = CrossNet(feature_dim, config.cross_layers, version=config.cross_version,
                                  rank=config.cross_rank)
        self.deep = MLP(feature_dim, config.deep_units, activation="dice", dropout=config.dropout,
                        batch_norm=config.batch_norm)
        head_dim = self.deep.output_dim + (feature_dim if self.uses_cross else 0)
        if config.head_units:
            self.head = MLP(head_dim, config.head_units, activation="relu", dropout=config.dropout,
                            batch_norm=config.batch_norm)
            head_dim = self.head.output_dim
        self.output = nn.Linear(head_dim, 1)
        if config.use_item_bias:
            self.item_bias = trainable_table(self.n_items + 1, 1, sparse=config.sparse_embedding_updates)
        if config.use_user_bias:
            self.user_bias = HashedEmbedding(config.user_buckets, 1, sparse=config.sparse_embedding_updates)

    def item_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """Representation of items ``ids [...]`` -> ``[..., item_dim]``; id 0 maps to zeros."""
        parts = self.item_vector_parts(ids)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def item_vector_parts(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """The parts of :meth:`item_vectors`, in its column order: the item table's vector, then the
        id, pooled tag and level embeddings the config switches on."""
        parts = [self.item_embedding(ids)]
        if self.config.use_id_embedding:
            parts.append(self.id_embedding(ids))
        if self.config.use_tag_embedding:  # the mean over the item's tags, padding (0) left out
            tags = self.item_tags[ids.reshape(-1)]
            pooled = bag_mean(tags, self.tag_embedding.weight)
            parts.append(pooled.view(*ids.shape, pooled.shape[-1]))
        if self.config.use_item_levels:  # the padding item's levels (0, a real bucket) must not show
            levels, real = self.item_levels[ids], (ids != 0).unsqueeze(-1)
            parts.append(torch.cat([self.likes_embedding(levels[..., 0]), self.views_embedding(levels[..., 1])],
                                   dim=-1) * real)
        return parts

    def batch_item_vectors(self, item_id: torch.Tensor,
                           item_seq: torch.Tensor) -> tuple[torch.Tensor, BatchItems]:
        """(target vectors ``[B, item_dim]``, a lookup ``ids [...] -> [..., item_dim]`` for this
        batch's history ids): each distinct item of the batch (and the padding item) is represented
        once and then gathered, so tables and tag pooling are paid per distinct item, not per
        history position, and each table row gets one gradient row. Same vectors as
        :meth:`item_vectors`."""
        looked_up = torch.cat([item_id.new_zeros(1), item_id.long(), item_seq[item_seq != 0].long()])
        ids, rows = torch.unique(looked_up, return_inverse=True)
        items = BatchItems(ids, self.item_vector_parts(ids), history_rows=rows[1 + len(item_id):])
        return items.gather(rows[1:1 + len(item_id)]), items

    def interest(self, target: torch.Tensor, item_seq: torch.Tensor) -> torch.Tensor:
        """History summary ``[B, *]``: the pooled interest (attention families) or the pooled
        Transformer outputs."""
        return self._history(target, item_seq)[0]

    def _build_history(self, config, item_dim: int) -> int:
        """Create the family's history modules; return the width of its history summary."""
        raise NotImplementedError

    def _history(self, target: torch.Tensor, item_seq: torch.Tensor, vectors: Callable[[torch.Tensor], torch.Tensor]
                 | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (history summary ``[B, *]``, sum of sigmoid attention weights ``[B]`` or None).
        ``vectors`` maps history ids to item vectors (default :meth:`item_vectors`)."""
        raise NotImplementedError

    def forward(self, item_id: torch.Tensor, item_seq: torch.Tensor, likes_level: torch.Tensor,
                views_level: torch.Tensor, user_id: torch.Tensor | None = None,
                statistics: torch.Tensor | None = None) -> torch.Tensor:
        """-> logits ``[B]``. ``user_id`` is needed with ``use_user_embedding`` (any int64; hashed).

        ``statistics`` ``[B, 4]``: the rows' raw statistics features (training rows: out of fold,
        CTRTensors.statistics); None computes them from the training statistics the model holds
        (valid, test, serving), which a training step must not do: its own labels are in them."""
        target, vectors = self.batch_item_vectors(item_id, item_seq)
        summary, matches = self._history(target, item_seq, vectors)
        parts = [target, summary, self.likes_embedding(likes_level), self.views_embedding(views_level)]
        if self.config.reads_user_id() and user_id is None:
            raise ValueError("use_user_embedding / use_user_bias / use_statistics_features: the model needs user_id "
                             "(the user_id column of the frame)")
        if self.config.use_user_embedding:
            parts.append(self.user_embedding(user_id))
        if self.config.history_match_features:
            n_real = (item_seq != 0).sum(dim=1).clamp(min=1).to(matches.dtype)
            parts.append(torch.stack([matches / n_real, torch.log1p(matches)], dim=-1))
        if self.config.use_item_frequency:
            parts.append(self.item_log_frequency[item_id].unsqueeze(-1).to(target.dtype))
        if self.config.use_statistics_features:
            if statistics is None and self.training:
                raise ValueError("use_statistics_features: a training batch needs its rows' out-of-fold "
                                 "statistics (CTRTensors.statistics, set by trainer.train); the model's own "
                                 "hold every training label")
            raw = self.statistics(item_id, user_id) if statistics is None else statistics
            parts.append(self.statistics.standardise(raw.float()).to(target.dtype))
        features = cat_padded(parts)
        if self.uses_cross and not self.config.head_units:
            logit = self._cross_deep_output(features)
        else:
            hidden = torch.cat([self.cross(features), self.deep(features)], dim=-1) if self.uses_cross \
                else self.deep(features)
            if self.config.head_units:
                hidden = self.head(hidden)
            logit = self.output(hidden).squeeze(-1)
        if self.config.use_item_bias:
            logit = logit + self.item_bias(item_id).squeeze(-1).to(logit.dtype)
        if self.config.use_user_bias:
            logit = logit + self.user_bias(user_id).squeeze(-1).to(logit.dtype)
        return logit

    def _cross_deep_output(self, features: torch.Tensor) -> torch.Tensor:
        """``output([cross(features), deep(features)])`` with the output weight split instead of
        the two joined: no copy of the cross net's wide output, and its zero-padded columns meet
        zero weights."""
        cross, width = self.cross(features, keep_padding=True), self.cross.input_dim
        weight = self.output.weight
        logit = F.linear(cross, F.pad(weight[:, :width], (0, cross.shape[-1] - width)))
        return (logit + F.linear(self.deep(features), weight[:, width:], self.output.bias)).squeeze(-1)

    def embedding_penalty(self, item_id: torch.Tensor | None = None, item_seq: torch.Tensor | None = None,
                          likes_level=None, views_level=None, user_id: torch.Tensor | None = None,
                          statistics=None) -> torch.Tensor:
        """``embedding_regularizer / 2`` x the squared L2 norm of the trainable embedding tables
        (item ids, tags, user buckets, item and user biases; padding rows excluded), to add to the
        batch's loss. Takes ``forward``'s arguments (unused: kept so callers need not know the mode).

        Without ``sparse_embedding_updates``: FuxiCTR's ``lambda / 2 * ||W||^2`` over WHOLE tables
        every step, a cost that grows with the catalog. With it (the default) only the tag table is
        here (dense and as large as the tag vocabulary, not the catalog: always whole); the
        catalog-sized tables' share is paid on the rows the batch looks up, by the training step
        (:meth:`row_regularised_tables`, ``optim.add_row_penalty``), and the optimiser catches every
        other row up when a batch next touches it (``RowAdamW``'s catch-up shrink, lib/ctr/optim.py):
        between its visits Adam pulls a row toward zero under the whole-table penalty, so rare ids
        stay regularised as strongly as the dense step keeps them.
        """
        cfg = self.config
        tables = [self.tag_embedding] if cfg.use_tag_embedding else []
        if not cfg.sparse_embedding_updates:
            tables += self._catalog_tables()
        total = sum((_squared_norm(table) for table in tables), start=self.likes_embedding.weight.new_zeros(()))
        return cfg.embedding_regularizer / 2 * total

    def row_regularised_tables(self) -> list[nn.Embedding]:
        """The catalog-sized tables whose regulariser the training step pays on the rows each batch
        looks up (``optim.add_row_penalty``: ``lambda * w`` added to those rows' sparse gradient, the
        gradient of ``lambda / 2 * ||rows||^2``, without a second lookup and a second sparse
        gradient). Empty without ``sparse_embedding_updates`` (:meth:`embedding_penalty` then covers
        whole tables) or without a regulariser."""
        cfg = self.config
        return self._catalog_tables() if cfg.sparse_embedding_updates and cfg.embedding_regularizer > 0 else []

    def _catalog_tables(self) -> list[nn.Embedding]:
        """The regularised tables as large as the catalog or the user buckets (all but the tag table)."""
        cfg = self.config
        tables = [self.item_embedding] if cfg.finetune_item_embeddings else []
        tables += [self.id_embedding] if cfg.use_id_embedding else []
        tables += [self.item_bias] if cfg.use_item_bias else []
        tables += [self.user_embedding.embedding] if cfg.use_user_embedding else []
        tables += [self.user_bias.embedding] if cfg.use_user_bias else []
        return tables

    def to_dict(self) -> dict[str, Any]:
        """Architecture (config + table shapes): with a state_dict, enough to rebuild the model."""
        return {"config": self.config.to_dict(), "n_items": self.n_items,
                "n_tags": self.n_tags,
                "n_tag_slots": int(self.item_tags.shape[1]) if self.config.use_tag_embedding else 0,
                "n_statistics_users": self.statistics.n_users if self.config.use_statistics_features else 0}

    @classmethod
    def from_dict(cls, d: dict[str, Any], config) -> CTRModel:
        """Empty model (zero tables) with the architecture ``d`` (``to_dict``) and ``config``
        (``ModelConfig.from_dict(d["config"])``); load a state_dict into it."""
        tags = np.zeros((d["n_items"] + 1, d["n_tag_slots"]), np.int64) if config.use_tag_embedding else None
        counts = np.zeros(d["n_items"] + 1, np.int64) if config.use_item_frequency else None
        statistics = (TrainingStatistics(d["n_items"], d.get("n_statistics_users", 0),
                                         config.statistics_prior_strength)
                      if config.use_statistics_features else None)
        levels = np.zeros((d["n_items"] + 1, 2), np.int64) if config.use_item_levels else None
        return CTRModel(config, np.zeros((d["n_items"] + 1, config.embedding_dim), np.float32), tags,
                        n_tags=d["n_tags"] or None, item_frequency=counts, statistics=statistics,
                        item_levels=levels)


class BatchItems:
    """The vectors of a batch's distinct items (for the sorted ``ids``), kept as the parts of
    :meth:`CTRModel.item_vector_parts`; calling it with ids ``[...]`` gathers their vectors
    ``[..., item_dim]``. A family may instead transform them once per distinct item (:meth:`linear`)
    and gather the result with :meth:`rows_of`. ``history_rows``: the row of each real history item
    of the batch, in row-major order (``item_seq[item_seq != 0]``), known from the ``unique`` that
    found the ids, so the packed history needs no search."""

    def __init__(self, ids: torch.Tensor, parts: list[torch.Tensor], history_rows: torch.Tensor):
        self.ids, self.parts, self.history_rows = ids, parts, history_rows

    def rows_of(self, x: torch.Tensor) -> torch.Tensor:
        """Row of the distinct items holding each id of ``x``, flattened."""
        return torch.searchsorted(self.ids, x.long()).reshape(-1)

    def linear(self, weight: torch.Tensor) -> torch.Tensor:
        """``F.linear(vectors, weight)`` for the distinct items' vectors, part by part: a frozen part
        (the item table's content vectors) then gets no input gradient, which the product over the
        joined vectors would compute and throw away."""
        out, start = None, 0
        for part in self.parts:
            term = F.linear(part, weight[:, start:start + part.shape[-1]])
            out, start = term if out is None else out + term, start + part.shape[-1]
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        vectors = self.gather(self.rows_of(x))
        return vectors.view(*x.shape, vectors.shape[-1])

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Vectors ``[N, item_dim]`` of the distinct items at ``rows [N]`` (index_select: its
        backward is a plain index_add)."""
        parts = [part.index_select(0, rows) for part in self.parts]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def trainable_table(rows: int, dim: int, *, sparse: bool = True) -> nn.Embedding:
    """Trainable id/tag table, row 0 padding. Starts near zero (std 1e-4, FuxiCTR's default), so
    the L2 embedding regulariser and the content vectors dominate until the data says otherwise.
    ``sparse``: gradients name only the rows a batch looks up (lib/ctr/optim.py)."""
    table = nn.Embedding(rows, dim, padding_idx=0, sparse=sparse)
    nn.init.normal_(table.weight, std=1e-4)
    with torch.no_grad():
        table.weight[0] = 0
    return table


def _squared_norm(table: nn.Embedding) -> torch.Tensor:
    """Squared L2 norm of ``table``, its padding row excluded."""
    norm = table.weight.pow(2).sum()
    return norm if table.padding_idx is None else norm - table.weight[table.padding_idx].pow(2).sum()


def position_table(max_len: int, dim: int) -> nn.Embedding:
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


def _item_level_table(levels: np.ndarray | torch.Tensor | None, n_items: int, vocab: int) -> torch.Tensor:
    """``[n_items + 1, 2]`` int64 (likes, views) levels, checked against the level tables' range."""
    if levels is None:
        raise ValueError("use_item_levels=True needs item_levels (each item's likes_level and views_level as a "
                         "[n_items + 1, 2] int matrix, lib/ctr/inputs.item_levels builds it from item_feature); "
                         "pass it or set use_item_levels=False")
    table = torch.as_tensor(np.array(levels, dtype=np.int64))  # a copy: the model owns its buffer
    if table.shape != (n_items + 1, 2):
        raise ValueError(f"item_levels must have shape [{n_items + 1}, 2] (one row per row of item_embeddings: "
                         f"likes, views), got {tuple(table.shape)}")
    bad = (table < 0) | (table >= vocab)
    if bad.any():
        item, col = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"item_levels: {int(bad.sum())} values outside the level tables' 0..{vocab - 1}, e.g. item "
                         f"{item}'s {('likes', 'views')[col]} level {int(table[item, col])}; bucket the levels into "
                         "that range or raise ModelConfig.level_vocab_size")
    return table


def bce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy on logits, computed in float32 whatever the autocast dtype."""
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
