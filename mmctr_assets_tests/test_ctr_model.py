import json

import numpy as np
import pytest
import torch

from mmctr_assets.lib.ctr.model import DCNDIN, ModelConfig, bce_loss

N_ITEMS, D, B, L = 50, 16, 8, 10
SMALL = dict(embedding_dim=D, attention_units=(16, 8), deep_units=(32, 16))


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
    return DCNDIN(config or ModelConfig(**SMALL), _embeddings() if emb is None else emb, tags,
                  item_frequency=_counts())


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, L + 1, (B,), generator=g)
    lengths[1] = 0  # one all-padding history
    seq = torch.randint(1, N_ITEMS + 1, (B, L), generator=g)
    seq[torch.arange(L)[None, :] < (L - lengths)[:, None]] = 0
    return (torch.randint(1, N_ITEMS + 1, (B,), generator=g), seq,
            torch.randint(1, 11, (B,), generator=g), torch.randint(1, 11, (B,), generator=g))


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
    other = _model(ModelConfig(**SMALL, attention_impl=impl))
    other.load_state_dict(split.state_dict())
    other.eval()
    torch.testing.assert_close(other(*_batch(7)), split(*_batch(7)), atol=1e-5, rtol=1e-5)


def test_frozen_item_embeddings_get_no_gradient_and_everything_else_does():
    model = _model(ModelConfig(**SMALL, use_id_embedding=True, use_tag_embedding=True),
                   tags=_tags())
    bce_loss(model(*_batch()), torch.tensor([0.0, 1.0] * (B // 2))).backward()
    assert not model.item_embedding.weight.requires_grad and model.item_embedding.weight.grad is None
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.id_embedding.weight.grad.abs().sum() > 0
    assert model.tag_embedding.weight.grad[0].abs().sum() == 0  # tag padding row


def test_finetuned_item_embeddings_learn_except_the_padding_row():
    model = _model(ModelConfig(**SMALL, finetune_item_embeddings=True))
    model(*_batch()).sum().backward()
    grad = model.item_embedding.weight.grad
    assert grad is not None and grad[1:].abs().sum() > 0
    assert torch.equal(grad[0], torch.zeros(D))


def test_item_vectors_concatenate_id_and_mean_pooled_tags():
    tags = _tags()
    tags[3] = [0, 0, 4, 9, 0]
    model = _model(ModelConfig(**SMALL, use_id_embedding=True, id_embedding_dim=4,
                               use_tag_embedding=True, tag_embedding_dim=6), tags=tags)
    vec = model.item_vectors(torch.tensor([3, 0]))
    assert vec.shape == (2, D + 4 + 6) and model.item_dim == D + 4 + 6
    torch.testing.assert_close(vec[0, :D], torch.from_numpy(_embeddings()[3]))
    tag_emb = model.tag_embedding.weight
    torch.testing.assert_close(vec[0, D + 4:], (tag_emb[4] + tag_emb[9]) / 2)
    assert torch.equal(vec[1], torch.zeros(D + 10))  # padding item


def test_to_dict_from_dict_rebuilds_the_same_model():
    config = ModelConfig(**SMALL, use_id_embedding=True, use_tag_embedding=True, cross_version="v2")
    model = _warmed(_model(config, tags=_tags()))
    spec = json.loads(json.dumps(model.to_dict()))  # must survive JSON (MLflow params, metadata)
    rebuilt = DCNDIN.from_dict(spec)
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
        _model(ModelConfig())
    bad = _embeddings()
    bad[7, 2] = np.nan
    with pytest.raises(ValueError, match="NaN/inf in 1 rows \\(e.g. item 7\\)"):
        _model(emb=bad)
    with pytest.raises(ValueError, match="use_tag_embedding=True needs item_tags"):
        _model(ModelConfig(**SMALL, use_tag_embedding=True))
    with pytest.raises(ValueError, match="use_item_frequency=True needs item_frequency"):
        DCNDIN(ModelConfig(**SMALL), _embeddings())
    with pytest.raises(ValueError, match="item_frequency must be 51 finite counts"):
        DCNDIN(ModelConfig(**SMALL), _embeddings(), item_frequency=np.ones(50))
    with pytest.raises(ValueError, match="history_match_features needs attention_output_activation='sigmoid'"):
        ModelConfig(attention_output_activation="linear")
    with pytest.raises(ValueError, match="attention_output_activation must be 'linear' or 'sigmoid'"):
        ModelConfig(attention_output_activation="softmax")


def test_history_match_features_are_the_share_and_log_count_of_matching_items():
    model = _warmed(_model())
    item_id, seq, likes, views = _batch()
    target = model.item_vectors(item_id)
    rows, cols = (seq != 0).nonzero(as_tuple=True)
    # recompute the per-item weights by hand: sigmoid(attention MLP), only over real items
    att, t, h = model.attention, target[rows], model.item_vectors(seq[rows, cols])
    z = att.first(torch.cat([t, h, t - h, t * h], dim=-1))
    weights = torch.sigmoid(att.rest(att.first_activation(z))).squeeze(-1)
    assert ((weights > 0) & (weights < 1)).all()
    expected = torch.zeros(B).index_add_(0, rows, weights)
    _, matches = model._attend(target, seq)
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
    rebuilt = DCNDIN.from_dict(model.to_dict())
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
    config = ModelConfig(**SMALL, attention_output_activation="linear", history_match_features=False,
                         use_item_frequency=False)
    model = DCNDIN(config, _embeddings())
    assert not hasattr(model, "item_log_frequency")
    assert model(*_batch()).shape == (B,)
