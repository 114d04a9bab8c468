import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmctr_assets.lib.ctr.model import CTRModel, bce_loss
from mmctr_assets.lib.ctr.model_config import FAMILIES, ModelConfig
from mmctr_assets.lib.ctr.optim import add_row_penalty, coalesce_sparse_grads

N_ITEMS, D, B, L = 50, 16, 8, 10
# a DCN-DIN over the item table alone (no trainable tables): the library's default model is the
# Transformer + DCN-V2 with id, tag and user tables, which the tests that need them ask for
PLAIN = dict(family="dcn_din", use_id_embedding=False, use_tag_embedding=False, use_user_embedding=False,
             embedding_regularizer=0.0)
SMALL = dict(embedding_dim=D, attention_units=(16, 8), deep_units=(32, 16), **PLAIN)


def _cfg(**options) -> ModelConfig:
    """SMALL with ``options`` over it."""
    return ModelConfig(**(SMALL | options))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _embeddings(seed=0):
    emb = np.random.default_rng(seed).normal(size=(N_ITEMS + 1, D)).astype(np.float32)
    emb[0] = 0
    return emb


def _tags(seed=0):
    tags = np.random.default_rng(seed).integers(0, 12, size=(N_ITEMS + 1, 5))
    tags[0] = 0
    return tags


def _counts(seed=0):
    counts = np.random.default_rng(seed).integers(0, 500, size=N_ITEMS + 1)
    counts[0] = 0
    return counts


def _model(config=None, emb=None, tags=None):
    return CTRModel(config or _cfg(), _embeddings() if emb is None else emb, tags,
                  item_frequency=_counts())


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, L + 1, (B,), generator=g)
    lengths[1] = 0  # one all-padding history
    seq = torch.randint(1, N_ITEMS + 1, (B, L), generator=g)
    seq[torch.arange(L)[None, :] < (L - lengths)[:, None]] = 0
    return (torch.randint(1, N_ITEMS + 1, (B,), generator=g), seq,
            torch.randint(1, 11, (B,), generator=g), torch.randint(1, 11, (B,), generator=g))


def _grad(p):
    """A parameter's gradient as a dense tensor (the trainable tables' gradients are sparse)."""
    return None if p.grad is None else p.grad.to_dense()


def _warmed(model):
    """Train-mode passes give Dice running statistics; then eval mode for exact comparisons."""
    model.train()
    with torch.no_grad():
        for s in range(3):
            model(*_batch(s))
    return model.eval()


def test_forward_returns_one_finite_logit_per_row():
    model = _model()
    logits = model(*_batch())
    assert logits.shape == (B,) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_padding_content_and_layout_do_not_change_the_output():
    model = _warmed(_model())
    item_id, seq, likes, views = _batch()
    base = model(item_id, seq, likes, views)
    with torch.no_grad():  # whatever sits in the padding row is never read
        model.item_embedding.weight[0] = 1e3
    assert torch.equal(model(item_id, seq, likes, views), base)
    wider = torch.cat([torch.zeros(B, 5, dtype=seq.dtype), seq], dim=1)
    torch.testing.assert_close(model(item_id, wider, likes, views), base)


def test_all_padding_history_equals_zero_interest():
    model = _warmed(_model())
    item_id, seq, likes, views = _batch()
    empty = torch.zeros_like(seq)
    out = model(item_id, empty, likes, views)
    assert torch.isfinite(out).all()
    target = model.item_vectors(item_id)
    assert torch.equal(model.interest(target, empty), torch.zeros_like(target))


@pytest.mark.parametrize("impl", ["packed", "padded"])
def test_attention_implementations_agree(impl):
    split = _warmed(_model())
    other = _model(_cfg(attention_impl=impl))
    other.load_state_dict(split.state_dict())
    other.eval()
    torch.testing.assert_close(other(*_batch(7)), split(*_batch(7)), atol=1e-5, rtol=1e-5)


def test_frozen_item_embeddings_get_no_gradient_and_everything_else_does():
    model = _model(_cfg(use_id_embedding=True, use_tag_embedding=True),
                   tags=_tags())
    bce_loss(model(*_batch()), torch.tensor([0.0, 1.0] * (B // 2))).backward()
    assert not model.item_embedding.weight.requires_grad and model.item_embedding.weight.grad is None
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(_grad(p)).all(), name
    assert _grad(model.id_embedding.weight).abs().sum() > 0
    assert _grad(model.tag_embedding.weight)[0].abs().sum() == 0  # tag padding row


def test_finetuned_item_embeddings_learn_except_the_padding_row():
    model = _model(_cfg(finetune_item_embeddings=True))
    model(*_batch()).sum().backward()
    grad = _grad(model.item_embedding.weight)
    assert grad is not None and grad[1:].abs().sum() > 0
    assert torch.equal(grad[0], torch.zeros(D))


def test_item_vectors_concatenate_id_and_mean_pooled_tags():
    tags = _tags()
    tags[3] = [0, 0, 4, 9, 0]
    model = _model(_cfg(use_id_embedding=True, id_embedding_dim=4,
                               use_tag_embedding=True, tag_embedding_dim=6), tags=tags)
    vec = model.item_vectors(torch.tensor([3, 0]))
    assert vec.shape == (2, D + 4 + 6) and model.item_dim == D + 4 + 6
    torch.testing.assert_close(vec[0, :D], torch.from_numpy(_embeddings()[3]))
    tag_emb = model.tag_embedding.weight
    torch.testing.assert_close(vec[0, D + 4:], (tag_emb[4] + tag_emb[9]) / 2)
    assert torch.equal(vec[1], torch.zeros(D + 10))  # padding item


def test_to_dict_from_dict_rebuilds_the_same_model():
    config = _cfg(use_id_embedding=True, use_tag_embedding=True, cross_version="v2")
    model = _warmed(_model(config, tags=_tags()))
    spec = json.loads(json.dumps(model.to_dict()))  # must survive JSON (MLflow params, metadata)
    rebuilt = CTRModel.from_dict(spec, ModelConfig.from_dict(spec["config"]))
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    assert rebuilt.config == config
    assert torch.equal(rebuilt(*_batch(3)), model(*_batch(3)))
    assert ModelConfig.from_dict(config.to_dict()) == config


def test_bad_configs_and_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        ModelConfig(attention_impl="dense")
    with pytest.raises(ValueError, match="dropout must be in"):
        ModelConfig(dropout=1.5)
    with pytest.raises(ValueError, match="Unknown ModelConfig fields \\['hidden'\\]"):
        ModelConfig.from_dict({"hidden": 3})
    with pytest.raises(ValueError, match=r"shape \[n_items \+ 1, 128\].*got \(51, 16\)"):
        _model(ModelConfig(**PLAIN))
    bad = _embeddings()
    bad[7, 2] = np.nan
    with pytest.raises(ValueError, match="NaN/inf in 1 rows \\(e.g. item 7\\)"):
        _model(emb=bad)
    with pytest.raises(ValueError, match="use_tag_embedding=True needs item_tags"):
        _model(_cfg(use_tag_embedding=True))
    with pytest.raises(ValueError, match="use_item_frequency=True needs item_frequency"):
        CTRModel(_cfg(), _embeddings())
    with pytest.raises(ValueError, match="item_frequency must be 51 finite counts"):
        CTRModel(_cfg(), _embeddings(), item_frequency=np.ones(50))
    with pytest.raises(ValueError, match="history_match_features needs attention_output_activation='sigmoid'"):
        ModelConfig(family="dcn_din", attention_output_activation="linear")
    with pytest.raises(ValueError,
                       match=r"attention_output_activation for family 'dcn_din' must be one of "
                             r"\['linear', 'sigmoid'\]"):
        ModelConfig(family="dcn_din", attention_output_activation="softmax")


def test_history_match_features_are_the_share_and_log_count_of_matching_items():
    model = _warmed(_model())
    item_id, seq, likes, views = _batch()
    target = model.item_vectors(item_id)
    rows, cols = (seq != 0).nonzero(as_tuple=True)
    # recompute the per-item weights by hand: sigmoid(attention MLP), only over real items
    att, t, h = model.attention, target[rows], model.item_vectors(seq[rows, cols])
    z = att.first(torch.cat([t, h, t - h, t * h], dim=-1)) + model.position_key(seq.shape[1] - 1 - cols)
    weights = torch.sigmoid(att.rest(att.first_activation(z))).squeeze(-1)
    assert ((weights > 0) & (weights < 1)).all()
    expected = torch.zeros(B).index_add_(0, rows, weights)
    _, matches = model._history(target, seq)
    torch.testing.assert_close(matches, expected, atol=1e-5, rtol=1e-5)
    assert matches[1] == 0  # the all-padding row: no matches, finite features
    captured = {}
    model.deep.register_forward_hook(lambda m, inp, out: captured.update(x=inp[0]))
    model(item_id, seq, likes, views)
    n_real = (seq != 0).sum(1).clamp(min=1)
    base = 2 * D + 2 * model.config.level_embedding_dim
    x = captured["x"]
    torch.testing.assert_close(x[:, base], expected / n_real, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x[:, base + 1], torch.log1p(expected), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x[:, base + 2], model.item_log_frequency[item_id])


def test_item_frequency_is_a_standardised_log_count_saved_with_the_model():
    model = _model()
    f = model.item_log_frequency
    assert f[0] == 0 and abs(float(f[1:].mean())) < 1e-5 and abs(float(f[1:].std(unbiased=False)) - 1) < 1e-4
    counts = _counts()
    assert (np.argsort(f[1:].numpy(), kind="stable") == np.argsort(np.log1p(counts[1:]), kind="stable")).all()
    rebuilt = CTRModel.from_dict(model.to_dict(), model.config)
    assert torch.equal(rebuilt.item_log_frequency, torch.zeros(N_ITEMS + 1))
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt.item_log_frequency, f)
    # a more popular target (all else equal) gets a different logit: the feature is used
    item_id, seq, likes, views = _batch()
    before = model.eval()(item_id, seq, likes, views)
    with torch.no_grad():
        model.item_log_frequency[item_id] += 3.0
    assert not torch.allclose(model(item_id, seq, likes, views), before)


def test_plain_din_config_still_builds_without_the_extra_inputs():
    config = _cfg(attention_output_activation="linear", history_match_features=False,
                         use_item_frequency=False)
    model = CTRModel(config, _embeddings())
    assert not hasattr(model, "item_log_frequency")
    assert model(*_batch()).shape == (B,)



# ------------------------------------------------------------------ families and options

TINY_TRANSFORMER = dict(transformer_dim=8, transformer_heads=2, transformer_ff_dim=16, last_k=4)


def _family(family, **options):
    small = {k: v for k, v in SMALL.items() if k not in ("attention_units", "family")}
    extra = TINY_TRANSFORMER if family == "transformer_dcnv2" else {"attention_units": SMALL["attention_units"]}
    config = ModelConfig(**(small | {"family": family, "max_len": L} | extra | options))
    return CTRModel(config, _embeddings(), _tags() if config.use_tag_embedding else None,
                    item_frequency=_counts())


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_gives_finite_logits_and_gradients_and_round_trips(family):
    model = _family(family, use_user_embedding=True, user_buckets=5, use_id_embedding=True,
                    embedding_regularizer=1e-3)
    item_id, seq, likes, views = _batch()
    users = torch.arange(B) * 1000
    logits = model(item_id, seq, likes, views, users)
    assert logits.shape == (B,) and torch.isfinite(logits).all()
    penalty = model.embedding_penalty(item_id, seq, likes, views, users)  # the dense tables': none here
    (bce_loss(logits, torch.tensor([0.0, 1.0] * (B // 2))) + penalty).backward()
    coalesce_sparse_grads(model.parameters())
    assert add_row_penalty(model.row_regularised_tables(), 1e-3) > 0  # the id and user tables' rows
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(_grad(p)).all(), name
    rebuilt = CTRModel.from_dict(spec := json.loads(json.dumps(model.to_dict())), ModelConfig.from_dict(spec["config"]))
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(rebuilt.eval()(item_id, seq, likes, views, users),
                               model.eval()(item_id, seq, likes, views, users))


def _reversed_history(seq):
    """Each row's real items in reverse order, still left-padded."""
    out = seq.clone()
    for r in range(seq.shape[0]):
        real = seq[r][seq[r] != 0]
        if real.numel():
            out[r, -real.numel():] = real.flip(0)
    return out


@pytest.mark.parametrize("family,options,order_aware", [
    ("dcn_din", {}, True), ("dcn_din", {"position": "key_value"}, True),
    ("transformer_dcnv2", {}, True), ("dcn_din", {"position": "none"}, False), ("din", {}, False)])
def test_reversing_the_history_changes_only_order_aware_predictions(family, options, order_aware):
    model = _warmed(_family(family, **options))
    item_id, seq, likes, views = _batch()
    rev = _reversed_history(seq)
    multi = (seq != 0).sum(1) > 1
    with torch.no_grad():
        base, flipped = model(item_id, seq, likes, views), model(item_id, rev, likes, views)
    if order_aware:
        assert (base[multi] - flipped[multi]).abs().min() > 0
    else:
        torch.testing.assert_close(flipped, base, atol=1e-5, rtol=1e-5)


def test_transformer_ignores_padding_and_empty_histories_stay_finite():
    model = _warmed(_family("transformer_dcnv2"))
    item_id, seq, likes, views = _batch()
    with torch.no_grad():
        base = model(item_id, seq, likes, views)
        model.item_embedding.weight[0] = 1e3  # the padding row is never attended to
        torch.testing.assert_close(model(item_id, seq, likes, views), base)
        empty = model(item_id, torch.zeros_like(seq), likes, views)  # no history: finite, no NaN
    assert torch.isfinite(empty).all()
    assert torch.equal(model.interest(model.item_vectors(item_id), torch.zeros_like(seq)),
                       torch.zeros(B, model.sequence.output_dim))


def test_transformer_sees_a_changed_real_item():
    model = _warmed(_family("transformer_dcnv2"))
    item_id, seq, likes, views = _batch()
    row = int(((seq != 0).sum(1) >= 3).nonzero()[0])
    changed = seq.clone()
    first_real = int((seq[row] != 0).nonzero()[0])
    changed[row, first_real] = seq[row, first_real] % N_ITEMS + 1  # the row's OLDEST item
    with torch.no_grad():
        a, b = model(item_id, seq, likes, views), model(item_id, changed, likes, views)
    assert a[row] != b[row]
    others = torch.arange(B) != row
    torch.testing.assert_close(a[others], b[others])


def test_user_embedding_hashes_unseen_users_and_needs_user_id():
    model = _family("dcn_din", use_user_embedding=True, user_buckets=3).eval()
    batch = _batch()
    unseen = torch.tensor([10**9 + i for i in range(B)])
    assert torch.isfinite(model(*batch, unseen)).all()
    with torch.no_grad():
        model.user_embedding.embedding.weight.normal_()
    assert not torch.equal(model(*batch, unseen), model(*batch, unseen + 1))  # the user matters
    with pytest.raises(ValueError, match="needs user_id"):
        model(*batch)


def test_embedding_penalty_covers_every_trainable_table_but_not_padding_or_frozen_rows():
    model = _family("din", use_id_embedding=True, use_tag_embedding=True, use_user_embedding=True,
                    use_item_bias=True, use_user_bias=True, user_buckets=7, embedding_regularizer=0.5,
                    sparse_embedding_updates=False)
    with torch.no_grad():  # a padding row that is not zero must still not be penalised
        model.id_embedding.weight[0] = 3.0
        model.tag_embedding.weight[0] = 3.0
        model.item_bias.weight[0] = 3.0
        model.item_bias.weight[1:] = 0.25
        model.user_bias.embedding.weight.fill_(0.5)
    # FuxiCTR's lambda / 2 * ||W||^2 over whole tables, biases included
    expected = 0.5 / 2 * (model.id_embedding.weight[1:].pow(2).sum() + model.tag_embedding.weight[1:].pow(2).sum()
                          + model.user_embedding.embedding.weight.pow(2).sum()
                          + N_ITEMS * 0.25 ** 2 + 7 * 0.5 ** 2)
    batch = torch.tensor([1]), torch.tensor([[0, 2]]), None, None, torch.tensor([5])  # rows the batch touches
    torch.testing.assert_close(model.embedding_penalty(*batch), expected)
    # every row is paid for every step, whether or not the batch uses it (rare ids included)
    model.embedding_penalty(*batch).backward()
    assert (model.id_embedding.weight.grad[1:] != 0).all(dim=1).all()
    assert (model.id_embedding.weight.grad[0] == 0).all()
    assert model.item_embedding.weight.grad is None  # the frozen pretrained table is not regularised


def test_with_sparse_updates_the_step_pays_lambda_half_the_squared_norm_of_the_rows_the_batch_looks_up():
    """The default: the catalog-sized tables' regulariser on the rows the forward looks up, added to
    their sparse gradients (the optimiser catches the others up: test_ctr_optim.py); the tag table,
    as large as the tag vocabulary, whole, in the loss. Checked against autograd on the explicit
    penalty: the same value, the same gradients."""
    model = _family("din", use_id_embedding=True, use_tag_embedding=True, use_user_embedding=True,
                    use_item_bias=True, use_user_bias=True, user_buckets=7, embedding_regularizer=0.5)
    assert model.config.sparse_embedding_updates
    with torch.no_grad():  # a padding row that is not zero must still not be penalised
        model.id_embedding.weight[0] = 3.0
        model.tag_embedding.weight[0] = 3.0
        model.item_bias.weight[0] = 3.0
        model.item_bias.weight[1:] = 0.25
        model.user_bias.embedding.weight.fill_(0.5)
    item_id = torch.tensor([3, 5, 3])
    seq = torch.tensor([[0, 0, 7, 5], [0, 0, 0, 0], [0, 9, 9, 3]])
    users = torch.tensor([11, 11, 4000])
    labels, levels = torch.tensor([1.0, 0.0, 1.0]), torch.tensor([1, 2, 3])
    items = torch.tensor([3, 5, 7, 9])  # each looked-up item once, padding left out
    buckets = model.user_embedding.bucket(users).unique()
    w = {name: p for name, p in model.named_parameters()}

    def explicit():  # autograd over the rows the forward looks up (the item bias: the targets')
        return 0.5 / 2 * (F.embedding(items, w["id_embedding.weight"]).pow(2).sum()
                          + w["tag_embedding.weight"][1:].pow(2).sum()
                          + F.embedding(buckets, w["user_embedding.embedding.weight"]).pow(2).sum()
                          + F.embedding(item_id.unique(), w["item_bias.weight"]).pow(2).sum()
                          + F.embedding(buckets, w["user_bias.embedding.weight"]).pow(2).sum())

    torch.manual_seed(0)  # the same dropout masks in both passes
    loss = bce_loss(model(item_id, seq, levels, levels, users), labels)
    (loss + explicit()).backward()
    expected = {name: _grad(p).clone() for name, p in w.items() if p.grad is not None}
    expected_value = explicit().detach()
    model.zero_grad(set_to_none=True)
    penalty = model.embedding_penalty(item_id, seq, None, None, users)
    torch.testing.assert_close(penalty, 0.5 / 2 * w["tag_embedding.weight"][1:].pow(2).sum())
    torch.manual_seed(0)
    (bce_loss(model(item_id, seq, levels, levels, users), labels) + penalty).backward()
    coalesce_sparse_grads(model.parameters())
    value = penalty + add_row_penalty(model.row_regularised_tables(), 0.5)
    torch.testing.assert_close(value, expected_value)
    for name, grad in expected.items():
        torch.testing.assert_close(_grad(w[name]), grad, msg=lambda m: f"{name}: {m}")
    grad = model.id_embedding.weight.grad
    assert set(grad.indices()[0].tolist()) - {0} == set(items.tolist())  # no other row named
    assert model.item_embedding.weight.grad is None  # the frozen pretrained table is not regularised


@pytest.mark.parametrize("options,message", [
    ({"family": "deepfm"}, r"family must be one of \('dcn_din', 'transformer_dcnv2', 'din'\), got 'deepfm'"),
    ({"family": "din", "position": "key"}, r"position for family 'din' must be one of \['none'\]"),
    ({"family": "din", "cross_layers": 2}, r"cross_layers is not an option of family 'din'"),
    ({"family": "din", "history_match_features": True},
     r"history_match_features for family 'din' must be one of \[False\]"),
    ({"family": "transformer_dcnv2", "position": "key"}, r"must be one of \['none', 'token'\]"),
    ({"family": "transformer_dcnv2", "attention_output_activation": "sigmoid"},
     r"attention_output_activation is not an option of family 'transformer_dcnv2'"),
    ({"family": "transformer_dcnv2", "attention_units": (8,)}, r"attention_units is not an option of family"),
    ({"family": "dcn_din", "last_k": 6}, r"last_k is not an option of family 'dcn_din'"),
    ({"user_buckets": 0}, r"user_buckets must be >= 1, got 0"),
    # the library default's regulariser on a model without tables: the message says what to set
    ({"use_id_embedding": False, "use_tag_embedding": False, "use_user_embedding": False},
     r"embedding_regularizer > 0 needs a trainable embedding.*sets embedding_regularizer: 0"),
    ({"family": "dcn_din", "cross_rank": 8}, r"cross_rank must be 0 \(full rank\) or > 0 with cross_version='v2'"),
    ({"family": "din", "cross_rank": 0}, r"cross_rank is not an option of family 'din'"),
    ({"family": "transformer_dcnv2", "transformer_dim": 10, "transformer_heads": 3}, r"divisible"),
])
def test_family_option_errors_name_the_field_and_the_allowed_values(options, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**options)


def test_family_defaults_are_filled_in_and_survive_a_round_trip():
    din = ModelConfig(family="din")
    assert (din.position, din.attention_output_activation, din.history_match_features,
            din.use_item_frequency, din.cross_layers) == ("none", "linear", False, False, None)
    dcn = ModelConfig(family="dcn_din")
    assert (dcn.position, dcn.cross_version, dcn.cross_layers, dcn.history_match_features,
            dcn.cross_rank) == ("key", "v1", 3, True, 0)
    tr = ModelConfig(family="transformer_dcnv2")
    assert (tr.position, tr.cross_version, tr.history_match_features, tr.cross_rank) == ("token", "v2", None, 16)
    assert din.cross_rank is None  # no cross net
    for config in (din, dcn, tr):
        assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    # a model saved by an earlier version stored cross_rank as a plain 0 on every family
    old_din = din.to_dict() | {"cross_rank": 0}
    assert ModelConfig.from_dict(old_din) == din


def test_every_preset_is_a_valid_config_of_its_family_and_unknown_names_are_refused():
    from mmctr_assets.lib.ctr.presets import PRESETS, preset
    from mmctr_assets.lib.ctr.trainer import TrainConfig

    assert set(FAMILIES) | {"momo", "qin_recipe"} <= set(PRESETS)
    for name in PRESETS:
        p = preset(name)
        config = ModelConfig(**({"max_len": 100} | p["model"]))
        if name in FAMILIES:
            assert config.family == name
        TrainConfig(**p["train"])
        p["model"]["family"] = "changed"  # a copy: the registry stays as it was
        assert PRESETS[name]["model"].get("family") != "changed"
    with pytest.raises(ValueError, match=r"unknown preset 'dcn'; presets: \['dcn_din', "):
        preset("dcn")


def test_trainable_ids_start_near_zero_with_a_zero_padding_row():
    model = _family("dcn_din", use_id_embedding=True, use_tag_embedding=True, use_item_bias=True)
    for table in (model.id_embedding.weight, model.tag_embedding.weight, model.item_bias.weight):
        assert torch.equal(table[0], torch.zeros_like(table[0]))
    for table in (model.id_embedding.weight, model.tag_embedding.weight):
        # N(0, 1e-4) (FuxiCTR): the sample std of 350+ draws is within 15% of it (4 standard errors; seeded)
        assert abs(float(table[1:].detach().std()) - 1e-4) < 1.5e-5
    assert model.id_embedding.weight.shape == (N_ITEMS + 1, 32)  # dim 32 when on (the default's)
    assert model.tag_embedding.weight.shape[1] == 32


def test_item_and_user_biases_move_only_their_own_rows_logits():
    model = _family("dcn_din", use_item_bias=True, use_user_bias=True, user_buckets=11).eval()
    item_id, seq, likes, views = _batch()
    users = torch.arange(B) * 7919
    with torch.no_grad():
        base = model(item_id, seq, likes, views, users)
        model.item_bias.weight[int(item_id[0])] += 2.0
        moved = model(item_id, seq, likes, views, users)
        hit = item_id == item_id[0]
        torch.testing.assert_close(moved[hit], base[hit] + 2.0)
        torch.testing.assert_close(moved[~hit], base[~hit])
        bucket = model.user_bias.bucket(users[:1])
        model.user_bias.embedding.weight[bucket] -= 1.0
        again = model(item_id, seq, likes, views, users)
    same_bucket = model.user_bias.bucket(users) == bucket
    torch.testing.assert_close(again[same_bucket], moved[same_bucket] - 1.0)
    torch.testing.assert_close(again[~same_bucket], moved[~same_bucket])
    with pytest.raises(ValueError, match="needs user_id"):
        model(item_id, seq, likes, views)


def test_momo_preset_builds_momos_layers_and_its_padding_mask_is_right():
    from mmctr_assets.lib.ctr.presets import preset

    width = 2 * L  # momo keeps the last 16 outputs: histories at least that wide
    values = preset("momo")["model"] | {"embedding_dim": D, "max_len": width}
    model = CTRModel(ModelConfig(**values), _embeddings(), _tags(), item_frequency=_counts())
    assert len(model.sequence.encoder.layers) == 2 and model.sequence.last_k == 16
    assert model.head.output_dim == 32 and model.deep.output_dim == 256
    model.eval()
    item_id, seq, likes, views = _batch()
    seq = torch.cat([torch.zeros(B, width - L, dtype=seq.dtype), seq], dim=1)  # more left padding
    with torch.no_grad():
        base = model(item_id, seq, likes, views)
        # padding never counts: another padding embedding changes nothing (an inverted
        # key_padding_mask, as in momo's public code, would attend to exactly these positions)
        model.item_embedding.weight[0] = 5.0
        model.id_embedding.weight[0] = 5.0
        torch.testing.assert_close(model(item_id, seq, likes, views), base)
        row = int(((seq != 0).sum(1) >= 2).nonzero()[0])
        changed = seq.clone()
        last = seq.shape[1] - 1
        changed[row, last] = seq[row, last] % N_ITEMS + 1  # the most recent real item
        after = model(item_id, changed, likes, views)
    assert after[row] != base[row]


def test_the_library_defaults_are_the_default_model_and_a_preset_file_means_what_it_says():
    """default.yaml restates nothing (ModelConfig/TrainConfig defaults are the default model); another
    preset's missing field is the library default, never the default preset's tuned value."""
    from mmctr_assets.lib.ctr.presets import preset
    from mmctr_assets.lib.ctr.trainer import TrainConfig

    assert preset("default") == {"model": {}, "train": {}}
    default = ModelConfig(max_len=20)
    assert (default.family, default.use_id_embedding, default.use_tag_embedding, default.use_user_embedding,
            default.cross_rank) == ("transformer_dcnv2", True, True, True, 16)
    assert default.embedding_regularizer > 0 and (TrainConfig().lr, TrainConfig().lr_factor) == (2e-3, 0.1)
    # another family: its own family options (din reads no cross net), the shared defaults kept
    din = ModelConfig(family="din", max_len=20)
    assert din.cross_rank is None and din.use_id_embedding
    dcn_din = ModelConfig(**(preset("dcn_din")["model"] | {"max_len": 20}))
    assert (dcn_din.use_id_embedding, dcn_din.use_tag_embedding, dcn_din.cross_rank) == (False, False, 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_is_its_own_module_over_the_shared_parts(family):
    """CTRModel(config) builds the family's own class, from lib/ctr/<family>.py; the options a
    family does not declare are refused for it, and its own get its defaults."""
    from mmctr_assets.lib.ctr.model_config import FAMILY_MODELS

    base = PLAIN | {"embedding_dim": D, "family": family}
    model = _model(ModelConfig(**base))
    assert type(model) is FAMILY_MODELS[family] and type(model).__module__ == f"mmctr_assets.lib.ctr.{family}"
    assert isinstance(model, CTRModel) and model.config.position == type(model).OPTIONS["position"][0]
    others = {n for m in FAMILY_MODELS.values() for n in m.READS} - set(type(model).READS)
    for name in sorted(others):
        changed = {"attention_units": (8,), "attention_impl": "padded", "cross_rank": 4}.get(name, 2)
        with pytest.raises(ValueError, match=f"{name} is not an option of family '{family}'"):
            ModelConfig(**base, **{name: changed})


def test_factorised_tokens_are_the_per_position_formula_and_old_models_load_as_elementwise():
    """The factorised token projects each distinct item once and gathers it; it must equal the
    formula computed per history position. A transformer config saved before the option (no
    ``token_interaction`` key) rebuilds as ``elementwise`` and loads its weights unchanged."""
    model = _warmed(_family("transformer_dcnv2", use_id_embedding=True, use_tag_embedding=True))
    item_id, seq, likes, views = _batch()
    rows, cols = (seq != 0).nonzero(as_tuple=True)
    ids = seq[rows, cols]
    with torch.no_grad():
        target, items = model.batch_item_vectors(item_id, seq)
        h, t, d = model.item_vectors(ids), model.item_vectors(item_id)[rows], model.config.transformer_dim
        a, p = (h @ model.token_history.weight.t()).split(d, dim=1)
        b, q = (t @ model.token_target.weight.t() + model.token_target.bias).split(d, dim=1)
        assert torch.equal(items.history_rows, items.rows_of(ids))  # unique's inverse: the same rows as a search
        torch.testing.assert_close(model._tokens(target, items.history_rows, rows, items), a + b + p * q)

    old = _family("transformer_dcnv2", token_interaction="elementwise")
    spec = json.loads(json.dumps(old.to_dict()))
    del spec["config"]["token_interaction"]
    config = ModelConfig.from_dict(spec["config"])
    assert config.token_interaction == "elementwise"
    rebuilt = CTRModel.from_dict(spec, config)
    rebuilt.load_state_dict(old.state_dict())  # strict: the old weights are exactly the parameters
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(item_id, seq, likes, views), old.eval()(item_id, seq, likes, views))
    with pytest.raises(ValueError, match="token_interaction must be one of"):
        ModelConfig(token_interaction="concat")


# ---- issue 30: item-level likes/views levels at every history position ----------------------------

def _levels(seed=0):
    levels = np.random.default_rng(seed).integers(0, 11, size=(N_ITEMS + 1, 2))
    levels[0] = 0
    return levels


@pytest.mark.parametrize("family", FAMILIES)
def test_item_levels_join_every_item_vector_and_travel_with_the_model_file(family, tmp_path):
    from mmctr_assets.lib.ctr.artifacts import load_model, save_model

    plain = _family(family)
    model = CTRModel(dataclasses.replace(plain.config, use_item_levels=True), _embeddings(), None,
                     item_frequency=_counts(), item_levels=_levels())
    assert model.item_dim == plain.item_dim + 2 * model.config.level_embedding_dim
    ids = torch.tensor([0, 3, 7])
    vectors = model.item_vectors(ids)
    assert torch.equal(vectors[0], torch.zeros_like(vectors[0]))  # the padding item stays zero
    lv = torch.as_tensor(_levels())[ids[1:]]
    expected = torch.cat([model.likes_embedding(lv[:, 0]), model.views_embedding(lv[:, 1])], dim=-1)
    assert torch.equal(vectors[1:, plain.item_dim:], expected)  # the shared level tables, item by item
    # a history item's own levels reach the prediction (not only the target's row levels)
    model.eval()
    item_id, seq, likes, views = _batch()
    before = model(item_id, seq, likes, views)
    row = int((seq != 0).sum(1).argmax())
    hist_item = int(seq[row][seq[row] != 0][-1])
    with torch.no_grad():
        model.item_levels[hist_item] = (model.item_levels[hist_item] + 5) % 11
    after = model(item_id, seq, likes, views)
    assert not torch.equal(before[row], after[row])
    # saved and loaded: the levels buffer comes back, so the loaded model predicts the same
    loaded = load_model(save_model(model, tmp_path / "model.pt"))
    assert torch.equal(loaded.item_levels, model.item_levels)
    assert torch.equal(loaded(item_id, seq, likes, views), after)  # same path, same shapes: bit-equal
    assert not hasattr(plain, "item_levels") and plain(item_id, seq, likes, views).shape == (B,)


@pytest.mark.parametrize("levels,message", [
    (None, "use_item_levels=True needs item_levels"),
    (np.zeros((N_ITEMS, 2), np.int64), r"item_levels must have shape \[51, 2\]"),
    (np.full((N_ITEMS + 1, 2), 11), r"item_levels: 102 values outside the level tables' 0..10, e.g. item 0's likes"),
    (np.full((N_ITEMS + 1, 2), -1), "values outside the level tables' 0..10"),
])
def test_bad_item_levels_are_refused_naming_the_item_and_the_fix(levels, message):
    with pytest.raises(ValueError, match=message):
        CTRModel(_cfg(use_item_levels=True), _embeddings(), item_frequency=_counts(), item_levels=levels)
