import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmctr_assets.lib.ctr.layers import (
    MLP,
    CrossNet,
    Dice,
    Dropout,
    HashedEmbedding,
    TargetAttention,
    bag_mean,
    length_buckets,
    pack_history,
    pack_history_with_recency,
    pad_width,
)
from mmctr_assets.lib.ctr.transformer_history import TransformerHistory

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



# ------------------------------------------------------------------ order, users, transformer

def test_recency_counts_from_the_most_recent_click():
    seq = torch.tensor([[0, 0, 7, 8, 9], [1, 2, 3, 4, 5], [0, 0, 0, 0, 0]])
    ids, rows, recency = pack_history_with_recency(seq)
    assert ids.tolist() == [7, 8, 9, 1, 2, 3, 4, 5] and rows.tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    assert recency.tolist() == [2, 1, 0, 4, 3, 2, 1, 0]  # the newest item is 0 in every row


def test_length_buckets_cover_every_nonempty_row_once_with_room_for_its_items():
    lengths = torch.tensor([0, 1, 4, 5, 9, 100, 33, 0, 64, 65])
    buckets = length_buckets(lengths, 100)
    seen = torch.cat([rows for rows, _ in buckets]).sort().values
    assert seen.tolist() == [1, 2, 3, 4, 5, 6, 8, 9]  # empty histories are left out
    for rows, width in buckets:
        assert (lengths[rows] <= width).all() and width <= 100
        assert (3 * lengths[rows] >= 2 * width).all() or width == 4  # at most 1.5x padding per bucket


def test_cross_net_low_rank_has_fewer_parameters_and_the_same_shape():
    full, low = CrossNet(40, 2, version="v2"), CrossNet(40, 2, version="v2", rank=4)
    x = torch.randn(5, 40)
    assert low(x).shape == full(x).shape == (5, 40)
    assert sum(p.numel() for p in low.parameters()) < sum(p.numel() for p in full.parameters())
    with pytest.raises(ValueError, match="rank"):
        CrossNet(40, 2, version="v1", rank=4)


def test_attention_key_bias_and_values_change_the_pooling():
    att = TargetAttention(D, (8, 4), activation="relu").eval()
    target, history, mask = _history()
    ids, rows = _packed(history, mask)
    plain = att(target, ids, rows)
    biased = att(target, ids, rows, key_bias=torch.randn(ids.shape[0], att.key_bias_dim))
    assert not torch.allclose(plain, biased)
    values = att(target, ids, rows, values=2 * ids)
    assert torch.allclose(values, 2 * plain, atol=1e-6)


def test_hashed_embedding_maps_any_user_id_to_a_bucket_deterministically():
    emb = HashedEmbedding(7, 3)
    ids = torch.tensor([1, 2, 3, 10**12, -5, 0])  # ids never seen anywhere still get a bucket
    b = emb.bucket(ids)
    assert ((b >= 0) & (b < 7)).all() and torch.equal(b, HashedEmbedding(7, 3).bucket(ids))
    assert emb(ids).shape == (6, 3)
    assert len(set(emb.bucket(torch.arange(1, 1000)).tolist())) == 7  # spreads over every bucket
    with pytest.raises(ValueError, match="n_buckets"):
        HashedEmbedding(0, 3)


def _encoder_inputs(batch=4, length=6, dim=8):
    tokens = torch.randn(batch, length, dim)
    lengths = torch.tensor([6, 3, 1, 4])
    padding = torch.arange(length)[None, :] < (length - lengths)[:, None]  # True = padding (left)
    return tokens, padding


def test_transformer_history_ignores_padding_and_sees_every_real_item():
    """Fails when the key padding mask is inverted (True taken as "attend"): then padding tokens
    would change the output and real items would not."""
    enc = TransformerHistory(8, num_layers=2, num_heads=2, ff_dim=16, last_k=3).eval()
    tokens, padding = _encoder_inputs()
    with torch.no_grad():
        base = enc(tokens, padding)
        assert base.shape == (4, 4 * 8) and torch.isfinite(base).all()
        noisy = tokens.clone()
        noisy[padding] = 100 * torch.randn(int(padding.sum()), 8)
        torch.testing.assert_close(enc(noisy, padding), base)
        for row in range(4):
            real = (~padding[row]).nonzero().flatten()
            changed = tokens.clone()
            changed[row, real[0]] += 1.0  # the OLDEST real item of the row
            out = enc(changed, padding)
            assert not torch.allclose(out[row], base[row]), row
            others = [r for r in range(4) if r != row]
            torch.testing.assert_close(out[others], base[others])
        # the same check would catch an inverted mask (rows with some padding; row 0 has none)
        rows = [1, 2, 3]
        assert not torch.allclose(enc(noisy[rows], ~padding[rows]), enc(tokens[rows], ~padding[rows]))


def test_transformer_history_pools_last_k_and_max_over_real_items_only():
    enc = TransformerHistory(8, num_heads=1, ff_dim=16, last_k=3).eval()
    tokens, padding = _encoder_inputs()
    with torch.no_grad():
        out = enc.encoder(tokens, src_key_padding_mask=padding)
        pooled = enc(tokens, padding)
    row = 2  # one real item: the last position; the two before it are padding -> zeros
    last = pooled[row, :24].reshape(3, 8)
    assert torch.equal(last[:2], torch.zeros(2, 8))
    torch.testing.assert_close(last[2], out[row, -1])
    torch.testing.assert_close(pooled[row, 24:], out[row, -1])  # max over one real item
    short = TransformerHistory(8, num_heads=1, ff_dim=16, last_k=8).eval()
    assert short(tokens, padding).shape == (4, 9 * 8)  # k longer than the bucket: zero-filled


def test_bag_mean_is_embedding_bags_mean_and_its_gradient():
    """bag_mean's backward is hand-written (one index_add per id slot): it must give
    F.embedding_bag's gradient, padding (0) left out of each mean and of the table's gradient.
    Tolerance: float sums in another order."""
    torch.manual_seed(0)
    ids = torch.randint(0, 7, (50, 4))
    ids[3] = 0  # a bag of padding only: zeros
    ids[5] = torch.tensor([2, 2, 0, 2])  # a repeated id counts each time
    weight = torch.randn(7, 5, requires_grad=True)
    ours = bag_mean(ids, weight)
    theirs = F.embedding_bag(ids, weight, mode="mean", padding_idx=0)
    torch.testing.assert_close(ours, theirs)
    assert torch.equal(ours[3], torch.zeros(5))
    upstream = torch.randn(50, 5)
    (grad_ours,) = torch.autograd.grad((ours * upstream).sum(), weight)
    (grad_theirs,) = torch.autograd.grad((theirs * upstream).sum(), weight)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-5, atol=1e-6)
    assert torch.equal(grad_ours[0], torch.zeros(5))


def test_dropout_drops_at_its_rate_scales_the_rest_and_passes_its_mask_to_the_gradient():
    torch.manual_seed(0)
    drop = Dropout(0.15)
    x = torch.ones(400, 250, requires_grad=True)
    out = drop(x)
    kept = out != 0
    # 100,000 draws: the dropped share's standard error is 0.0011; 0.005 is over 4 of them
    assert abs(1 - kept.float().mean().item() - 0.15) < 0.005
    torch.testing.assert_close(out[kept], torch.full((int(kept.sum()),), 1 / 0.85))
    out.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.85)
    assert not torch.equal(kept, drop(x) != 0)  # a new mask each call
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)
    assert not Dropout(1.0).train()(x).any()


@pytest.mark.parametrize("layers,heads,last_k", [(1, 1, 3), (2, 2, 3), (1, 2, 40)])
def test_packed_transformer_history_is_the_padded_encoder_over_length_buckets(layers, heads, last_k):
    """forward_packed (the model's path: position-wise parts over the real items only, attention
    per length bucket, max-pool by segments) against PyTorch's encoder over each bucket's padded
    grid, in training mode (batch-free layers: the same function), gradients included. Rows with
    no history give zeros; last_k longer than the history is zero-filled. Tolerance: the same
    products on differently shaped matrices round differently."""
    torch.manual_seed(0)
    enc = TransformerHistory(8, num_layers=layers, num_heads=heads, ff_dim=16, last_k=last_k).train()
    lengths = torch.tensor([0, 1, 3, 5, 9, 30, 2, 0, 17, 4])
    width = 32
    real = torch.arange(width)[None, :] >= (width - lengths)[:, None]
    tokens = torch.randn(int(lengths.sum()), 8, requires_grad=True)
    packed = enc.forward_packed(tokens, real)
    grid = tokens.new_zeros(len(lengths), width, 8).index_put((real,), tokens)  # row-major, as packed
    reference = torch.zeros_like(packed)
    for rows, w in length_buckets(lengths, width):
        reference = reference.index_copy(0, rows, enc(grid[rows][:, -w:], ~real[rows][:, -w:]))
    assert packed.shape == (10, (last_k + 1) * 8)
    assert torch.equal(packed[lengths == 0], torch.zeros(2, (last_k + 1) * 8))
    torch.testing.assert_close(packed, reference, rtol=1e-5, atol=1e-6)
    weights = torch.randn_like(packed)
    (grad_packed,) = torch.autograd.grad((packed * weights).sum(), tokens)
    (grad_reference,) = torch.autograd.grad((reference * weights).sum(), tokens)
    torch.testing.assert_close(grad_packed, grad_reference, rtol=1e-4, atol=1e-6)
    empty = enc.forward_packed(tokens[:0], torch.zeros(3, width, dtype=torch.bool))
    assert torch.equal(empty, torch.zeros(3, (last_k + 1) * 8))


@pytest.mark.parametrize("version,rank", [("v1", 0), ("v2", 0), ("v2", 4)])
def test_cross_net_and_mlp_give_the_same_result_on_zero_padded_features(version, rank):
    """pad_width appends zero columns (fast kernel widths); CrossNet and MLP pad their weights to
    match and must return what they return on the unpadded features."""
    torch.manual_seed(0)
    x = torch.randn(6, 13)
    padded = pad_width(x)
    assert padded.shape == (6, 16) and torch.equal(padded[:, :13], x) and not padded[:, 13:].any()
    cross = CrossNet(13, 2, version=version, rank=rank)
    for b in cross.biases:
        nn.init.normal_(b)  # zero biases would hide a padding that leaks into the output
    mlp = MLP(13, (8, 4), activation="relu").eval()
    # one summation order may differ between the padded and unpadded kernels: float tolerance
    torch.testing.assert_close(cross(padded), cross(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mlp(padded), mlp(x), atol=1e-5, rtol=1e-5)
    assert pad_width(torch.randn(2, 16)).shape == (2, 16)
