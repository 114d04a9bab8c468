import pytest
import torch
from torch import nn

from mmctr_assets.lib.ctr.layers import MLP, CrossNet, Dice, TargetAttention, pack_history

D = 8


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _history(batch=6, length=7, dim=D, empty_rows=(2,)):
    """Left-padded history embeddings with a mask; rows in ``empty_rows`` are all padding."""
    lengths = torch.randint(1, length + 1, (batch,))
    lengths[list(empty_rows)] = 0
    mask = torch.arange(length)[None, :] >= (length - lengths)[:, None]
    history = torch.randn(batch, length, dim) * mask[..., None]
    return torch.randn(batch, dim), history, mask


def _packed(history, mask):
    rows, cols = mask.nonzero(as_tuple=True)
    return history[rows, cols], rows


def test_pack_history_keeps_real_items_row_major():
    seq = torch.tensor([[0, 0, 5, 7], [0, 0, 0, 0], [1, 2, 3, 4]])
    ids, rows = pack_history(seq)
    assert ids.tolist() == [5, 7, 1, 2, 3, 4]
    assert rows.tolist() == [0, 0, 2, 2, 2, 2]


def test_dice_matches_formula_and_tracks_running_stats():
    dice = Dice(4)
    with torch.no_grad():
        dice.alpha.copy_(torch.tensor([0.0, 0.5, 1.0, -0.2]))
    x = torch.randn(32, 4) * 3 + 1
    out = dice(x)
    p = torch.sigmoid((x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-8))
    torch.testing.assert_close(out, p * x + (1 - p) * dice.alpha * x)
    assert not torch.allclose(dice.bn.running_mean, torch.zeros(4))  # stats were updated
    # alpha = 1 makes Dice the identity whatever p is
    assert torch.allclose(out[:, 2], x[:, 2])
    dice.eval()
    frozen = dice.bn.running_mean.clone()
    dice(x)
    assert torch.equal(dice.bn.running_mean, frozen)


def test_dice_handles_packed_3d_and_single_row_inputs():
    dice = Dice(5)
    assert dice(torch.randn(3, 4, 5)).shape == (3, 4, 5)
    assert dice(torch.randn(17, 5)).shape == (17, 5)
    one = dice(torch.randn(1, 5))  # training mode, one row: falls back to running stats
    assert torch.isfinite(one).all()


def test_mlp_shapes_and_options():
    mlp = MLP(10, [16, 8], activation="dice", dropout=0.2, batch_norm=True, output_dim=1)
    assert mlp(torch.randn(4, 10)).shape == (4, 1)
    assert mlp.output_dim == 1
    assert sum(isinstance(m, nn.BatchNorm1d) for m in mlp.layers) == 2
    assert MLP(10, [6]).output_dim == 6
    with pytest.raises(ValueError, match="activation must be 'dice' or 'relu'"):
        MLP(3, [2], activation="tanh")


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_crossnet_one_layer_formula(version):
    net = CrossNet(6, 1, version=version)
    with torch.no_grad():
        net.biases[0].normal_()
    x0 = torch.randn(5, 6)
    w = net.weights[0].weight
    expected = x0 * (x0 @ w.T) + net.biases[0] + x0
    torch.testing.assert_close(net(x0), expected)
    assert CrossNet(6, 3, version=version)(x0).shape == (5, 6)
    assert torch.equal(CrossNet(6, 0)(x0), x0)
    with pytest.raises(ValueError, match="'v1' or 'v2'"):
        CrossNet(6, 1, version="v3")


def _warm(att, target, history, mask):
    """Give Dice non-trivial running statistics (identical for every copy), then switch to eval."""
    att.train()
    with torch.no_grad():
        for _ in range(3):
            att(target, *_packed(history, mask))
    return att.eval()


@pytest.mark.parametrize("split", [True, False])
def test_packed_equals_padded_reference_outputs_and_gradients(split):
    target, history, mask = _history()
    att = TargetAttention(D, [16, 8], split_first_layer=split)
    _warm(att, target, history, mask)

    def run(packed):
        att.zero_grad()
        t = target.clone().requires_grad_()
        h = history.clone().requires_grad_()
        out = att(t, *_packed(h, mask)) if packed else att.forward_padded(t, h, mask)
        (out * torch.linspace(-1, 1, D)).sum().backward()
        grads = {n: p.grad.clone() for n, p in att.named_parameters() if p.grad is not None}
        return out.detach(), t.grad, h.grad, grads

    out_p, gt_p, gh_p, grads_p = run(True)
    out_r, gt_r, gh_r, grads_r = run(False)
    torch.testing.assert_close(out_p, out_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gt_p, gt_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gh_p, gh_r, atol=1e-5, rtol=1e-5)
    assert grads_p.keys() == grads_r.keys() and "first.weight" in grads_p
    for name in grads_p:
        torch.testing.assert_close(grads_p[name], grads_r[name], atol=1e-5, rtol=1e-5)


def test_split_first_layer_is_the_same_function_in_training_mode():
    target, history, mask = _history()
    split = TargetAttention(D, [16, 8], split_first_layer=True)
    plain = TargetAttention(D, [16, 8], split_first_layer=False)
    plain.load_state_dict(split.state_dict())
    packed = _packed(history, mask)
    torch.testing.assert_close(split(target, *packed), plain(target, *packed), atol=1e-5, rtol=1e-5)


def test_packed_equals_padded_in_training_mode_without_batch_statistics():
    target, history, mask = _history()
    att = TargetAttention(D, [16, 8], activation="relu").train()
    torch.testing.assert_close(att(target, *_packed(history, mask)),
                               att.forward_padded(target, history, mask), atol=1e-5, rtol=1e-5)


def test_padding_gets_exactly_zero_weight():
    target, history, mask = _history()
    att = _warm(TargetAttention(D, [16, 8]), target, history, mask)
    noisy = history + 1e3 * torch.randn_like(history) * (~mask)[..., None]
    assert torch.equal(att.forward_padded(target, history, mask), att.forward_padded(target, noisy, mask))


def test_all_padding_rows_pool_to_zero_without_nan():
    target, history, mask = _history(empty_rows=(0, 3))
    att = TargetAttention(D, [16, 8]).train()
    out = att(target, *_packed(history, mask))
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], torch.zeros(D)) and torch.equal(out[3], torch.zeros(D))
    assert out[1].abs().sum() > 0
    assert torch.equal(att.forward_padded(target, history, mask)[[0, 3]], torch.zeros(2, D))
    # a batch with no history at all
    empty = att(target, torch.zeros(0, D), torch.zeros(0, dtype=torch.long))
    assert torch.equal(empty, torch.zeros_like(target))


def test_attention_gradients_are_finite_and_reach_every_parameter():
    target, history, mask = _history()
    att = TargetAttention(D, [16, 8]).train()
    att(target, *_packed(history, mask)).sum().backward()
    for name, p in att.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert att.first.weight.grad.abs().sum() > 0


def test_attention_is_not_normalised():
    """No softmax: duplicating every history item doubles the pooled vector (DIN's sum pooling)."""
    target, history, mask = _history(batch=3, empty_rows=())
    att = TargetAttention(D, [8], activation="relu").eval()
    once = att.forward_padded(target, history, mask)
    twice = att.forward_padded(target, torch.cat([history, history], 1), torch.cat([mask, mask], 1))
    torch.testing.assert_close(twice, 2 * once)


def test_sigmoid_weights_score_sum_packed_equals_padded():
    target, history, mask = _history()
    att = _warm(TargetAttention(D, [16, 8], output_activation="sigmoid"), target, history, mask)
    pooled, matches = att(target, *_packed(history, mask), return_score_sum=True)
    pooled_r, matches_r = att.forward_padded(target, history, mask, return_score_sum=True)
    torch.testing.assert_close(pooled, pooled_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(matches, matches_r, atol=1e-5, rtol=1e-5)
    n_real = mask.sum(1).float()
    assert (matches > 0).logical_or(n_real == 0).all() and (matches < n_real).logical_or(n_real == 0).all()
    assert matches[2] == 0 and torch.equal(pooled[2], torch.zeros(D))  # all-padding row
    assert torch.equal(att(target, *_packed(history, mask)), pooled)  # default: the pooled vector only
    empty = att(target, history[:0, 0], torch.zeros(0, dtype=torch.long), return_score_sum=True)
    assert torch.equal(empty[0], torch.zeros_like(target)) and torch.equal(empty[1], torch.zeros(len(target)))
    with pytest.raises(ValueError, match="output_activation must be 'linear' or 'sigmoid'"):
        TargetAttention(D, [16, 8], output_activation="softmax")

