"""The CTR model's configuration, ``ModelConfig``: validated on construction against the options
each family's module declares, so a bad run config fails before any training, naming the field."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from mmctr_assets.lib.ctr.dcn_din import DcnDin
from mmctr_assets.lib.ctr.din import Din
from mmctr_assets.lib.ctr.model import CTRModel
from mmctr_assets.lib.ctr.statistics import DEFAULT_FOLDS, DEFAULT_PRIOR_STRENGTH
from mmctr_assets.lib.ctr.transformer_dcnv2 import TransformerDcnV2
from mmctr_assets.lib.data.microlens import MAX_LEVEL

ATTENTION_IMPLS = ("packed_split", "packed", "padded")
TOKEN_INTERACTIONS = ("factorised", "elementwise")
# Each family's module says which options it reads (CTRModel: OPTIONS with its own defaults and
# allowed values, READS with plain defaults); ModelConfig fills in and checks them.
FAMILY_MODELS: dict[str, type[CTRModel]] = {m.family: m for m in (DcnDin, TransformerDcnV2, Din)}
FAMILIES = tuple(FAMILY_MODELS)
_DEFAULTED = sorted({n for m in FAMILY_MODELS.values() for n in m.OPTIONS})  # None until the family fills it
_READ_BY = {n: [f for f, m in FAMILY_MODELS.items() if n in m.READS] for m in FAMILY_MODELS.values() for n in m.READS}
# options only some families read (the rest share the item representation and the head)
FAMILY_SPECIFIC_OPTIONS = frozenset(_DEFAULTED) | frozenset(_READ_BY)
# Switches that give the model a trainable table for embedding_regularizer to act on
TRAINABLE_TABLE_SWITCHES = ("use_id_embedding", "use_tag_embedding", "use_user_embedding", "use_item_bias",
                            "use_user_bias", "finetune_item_embeddings")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters. Everything here (plus table shapes) rebuilds the model.

    The defaults are the default model (deploy/presets/default.yaml restates nothing): a
    Transformer + low-rank DCN-V2 over regularised trainable item-id, tag and hashed user
    embeddings, the config that won across demo worlds (docs/results.md). Every other preset file
    spells out where it differs from them, so a field a file leaves out means these values.

    ``family`` picks the model (all share the item representation, the level embeddings and the
    options below): ``dcn_din`` (DIN target attention with a recency embedding -> cross net ||
    deep net), ``transformer_dcnv2`` (a Transformer over the real history items, each joined with
    the target; last-k + max pooling -> DCN-V2 || deep net), ``din`` (the organisers' DIN
    baseline). Options set to None take the family's default; an option the family does not read
    must stay unset (a ValueError says which).
    """

    family: str = "transformer_dcnv2"
    embedding_dim: int = 128  # width of the pretrained item-embedding matrix
    max_len: int = 64  # history positions the model reads: the most recent max_len items
    finetune_item_embeddings: bool = False
    use_id_embedding: bool = True
    # half momo's and FuxiCTR's MicroLens width (64): with two cross layers, level with it on the
    # demo worlds, and each width is paid per distinct item of every batch and again in the head
    # (docs/results.md)
    id_embedding_dim: int = 32
    use_tag_embedding: bool = True
    tag_embedding_dim: int = 32
    use_user_embedding: bool = True  # user_id hashed into user_buckets rows (unseen users too)
    user_buckets: int = 100_000
    user_embedding_dim: int = 16
    # a learned scalar per item / per user bucket added to the logit: how often an item is clicked
    # whatever the history (an appeal no content shows), how often a user clicks at all
    use_item_bias: bool = False
    use_user_bias: bool = False
    # FuxiCTR's embedding_regularizer: lambda / 2 * ||W||^2 over every trainable embedding table;
    # a model without trainable tables must set it to 0 (nothing for it to act on)
    embedding_regularizer: float = 0.002
    # True: a step updates and regularises only the table rows its batch touches (sparse gradients,
    # lazy AdamW catching each row up on the regulariser's pull it missed), so its cost does not
    # grow with the catalog; False: whole tables every step (docs/models.md)
    sparse_embedding_updates: bool = True
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
    # "factorised": token = A h + B t + b + (P h) * (Q t), h projected once per distinct item of
    # the batch (cost independent of the item vectors' width per position); "elementwise":
    # W [h, t, h * t] + b, the form of models saved before the option (docs/models.md)
    token_interaction: str = "factorised"
    transformer_layers: int = 1
    transformer_heads: int = 1
    transformer_ff_dim: int = 64
    last_k: int = 4  # transformer outputs of the k most recent positions kept as features
    cross_layers: int | None = None
    cross_version: str | None = None
    cross_rank: int | None = None  # 0: full-rank DCN-V2 matrices; r > 0: low-rank U V^T (cross_version v2)
    deep_units: tuple[int, ...] = (128, 64)
    # an MLP over [cross net, deep net] before the output layer (momo's [64, 32]); () = linear output
    head_units: tuple[int, ...] = ()
    dropout: float = 0.15
    batch_norm: bool = False
    # the target item's and the user's smoothed click rates and log counts from the training rows,
    # out-of-fold on training rows (lib/ctr/statistics.py); needs user_id
    use_statistics_features: bool = False
    statistics_prior_strength: float = DEFAULT_PRIOR_STRENGTH  # pseudo-rows at the mean click rate
    statistics_folds: int = DEFAULT_FOLDS  # folds of the training rows' out-of-fold statistics
    # each item's own likes/views level (item_feature's, per item) embedded into its vector, for the
    # target and every history position (the row's levels stay as they are): docs/models.md
    use_item_levels: bool = False

    def __post_init__(self):
        # Lists arrive from JSON/Dagster config; store tuples so the config stays hashable.
        object.__setattr__(self, "attention_units", tuple(int(u) for u in self.attention_units))
        object.__setattr__(self, "deep_units", tuple(int(u) for u in self.deep_units))
        object.__setattr__(self, "head_units", tuple(int(u) for u in self.head_units))
        if self.family not in FAMILIES:
            raise ValueError(f"Invalid ModelConfig: family must be one of {FAMILIES}, got {self.family!r}")
        problems = self._resolve_family_options()
        if self.token_interaction not in TOKEN_INTERACTIONS:
            problems.append(f"token_interaction must be one of {TOKEN_INTERACTIONS}, got {self.token_interaction!r}")
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
        if self.cross_rank is not None and (self.cross_rank < 0 or (self.cross_rank and self.cross_version != "v2")):
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
                            "finetune_item_embeddings); a model without any sets embedding_regularizer: 0 "
                            f"(the default, {ModelConfig.embedding_regularizer}, is the default model's)")
        if not self.statistics_prior_strength > 0:
            problems.append(f"statistics_prior_strength must be > 0, got {self.statistics_prior_strength}")
        if self.statistics_folds < 2:
            problems.append(f"statistics_folds must be >= 2, got {self.statistics_folds}")
        if problems:
            raise ValueError("Invalid ModelConfig: " + "; ".join(problems))

    def _resolve_family_options(self) -> list[str]:
        """Fill in the family's defaults; list options the family does not read or allow."""
        problems, own = [], FAMILY_MODELS[self.family].OPTIONS
        for name in _DEFAULTED:
            value = getattr(self, name)
            if name not in own:
                if value is not None:
                    users = [f for f, m in FAMILY_MODELS.items() if name in m.OPTIONS]
                    problems.append(f"{name} is not an option of family {self.family!r} (only of {users}); "
                                    "remove it")
                continue
            default, allowed = own[name]
            if value is None:
                object.__setattr__(self, name, default)
            elif allowed is not None and value not in allowed:
                problems.append(f"{name} for family {self.family!r} must be one of {list(allowed)}, got {value!r}")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, families in _READ_BY.items():
            if self.family not in families and getattr(self, name) != defaults[name]:
                problems.append(f"{name} is not an option of family {self.family!r} (only of {families}); "
                                "remove it")
        return problems

    def trainable_embeddings(self) -> bool:
        return any(getattr(self, switch) for switch in TRAINABLE_TABLE_SWITCHES)

    def reads_user_id(self) -> bool:
        return self.use_user_embedding or self.use_user_bias or self.use_statistics_features

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["attention_units"] = list(self.attention_units)
        d["deep_units"] = list(self.deep_units)
        d["head_units"] = list(self.head_units)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """A saved config (``to_dict``, stored whole with every model). Options its family does not
        own are dropped: a validated config held only don't-care values there, and an older version
        stored some as plain numbers (``cross_rank: 0`` on ``din``) where they are unset now. A
        ``transformer_dcnv2`` config saved before ``token_interaction`` existed had the elementwise tokens."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"Unknown ModelConfig fields {unknown}; known fields: {sorted(known)}")
        family = FAMILY_MODELS.get(d.get("family", cls.family))
        own = family.OPTIONS if family is not None else _DEFAULTED
        if d.get("family") == TransformerDcnV2.family and "token_interaction" not in d:
            d = d | {"token_interaction": "elementwise"}  # saved before the option: its only form then
        return cls(**{k: v for k, v in d.items() if k not in _DEFAULTED or k in own})
