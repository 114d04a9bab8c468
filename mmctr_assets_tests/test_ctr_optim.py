"""Row-wise table updates (lib/ctr/optim.py) and the default model's fast paths: a step pays for the
rows and positions a batch really has, and computes what the plain formulation computes."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmctr_assets.lib.ctr.layers import length_buckets, recency_positions
from mmctr_assets.lib.ctr.model import CTRModel
from mmctr_assets.lib.ctr.model_config import ModelConfig
from mmctr_assets.lib.ctr.optim import RowAdamW, add_row_penalty, clip_grad_norm_, coalesce_sparse_grads
from mmctr_assets.lib.ctr.tensors import CTRTensors
from mmctr_assets.lib.ctr.trainer import TrainConfig, make_optimizer, training_step

N_ITEMS, D, B, L = 40, 8, 12, 10


def test_dense_parameters_step_exactly_as_torch_adamw():
    torch.manual_seed(0)
    a, b = torch.randn(5, 3, requires_grad=True), torch.randn(5, 3, requires_grad=True)
    with torch.no_grad():
        b.copy_(a)
    ours, theirs = RowAdamW([a], lr=0.01, weight_decay=0.1), torch.optim.AdamW([b], lr=0.01, weight_decay=0.1)
    for step in range(3):
        grad = torch.randn(5, 3, generator=torch.Generator().manual_seed(step))
        a.grad, b.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
    assert torch.equal(a, b)  # same function, same path: bit-identical


def test_a_sparse_gradient_updates_only_its_rows_as_adamw_would():
    table = torch.nn.Embedding(10, 4, sparse=True)
    dense = torch.nn.Embedding(10, 4)
    dense.load_state_dict(table.state_dict())
    before = table.weight.detach().clone()
    ours = RowAdamW(table.parameters(), lr=0.05, weight_decay=0.01)
    theirs = torch.optim.AdamW(dense.parameters(), lr=0.05, weight_decay=0.01)
    ids = torch.tensor([2, 5, 2, 7])  # a duplicate: its two gradient rows are summed
    (table(ids) * torch.arange(16.0).view(4, 4)).sum().backward()
    (dense(ids) * torch.arange(16.0).view(4, 4)).sum().backward()
    ours.step()
    theirs.step()
    touched = [2, 5, 7]
    untouched = [i for i in range(10) if i not in touched]
    assert torch.equal(table.weight[untouched], before[untouched])  # bit-identical, weight decay included
    # a touched row's first step is AdamW's (tolerance: float rounding of a different op order)
    torch.testing.assert_close(table.weight[touched], dense.weight[touched], rtol=1e-6, atol=1e-7)


def test_clipping_sees_each_rows_summed_gradient():
    table = torch.nn.Embedding(6, 2, sparse=True)
    lin = torch.nn.Linear(2, 1)
    out = lin(table(torch.tensor([1, 1, 3]))).sum() * 100
    out.backward()
    params = [table.weight, *lin.parameters()]
    coalesce_sparse_grads(params)
    dense_grads = [p.grad.to_dense() for p in params]
    expected = torch.cat([g.flatten() for g in dense_grads]).norm()
    total = clip_grad_norm_(params, 1.0)
    torch.testing.assert_close(total, expected)
    clipped = torch.cat([p.grad.to_dense().flatten() for p in params]).norm()
    torch.testing.assert_close(clipped, torch.tensor(1.0), rtol=1e-5, atol=0)


def test_the_row_penalty_adds_lambda_w_to_the_named_rows_but_not_to_padding():
    table = torch.nn.Embedding(5, 2, padding_idx=0, sparse=True)
    with torch.no_grad():
        table.weight.copy_(torch.arange(10.0).view(5, 2))  # a padding row that is not zero
    table(torch.tensor([0, 2, 2, 4])).sum().backward()
    coalesce_sparse_grads([table.weight])
    value = add_row_penalty([table], 0.5)
    assert table.weight.grad.indices()[0].tolist() == [2, 4]  # the padding row is not named
    grad = table.weight.grad.to_dense()
    data = torch.tensor([[0.0, 0], [0, 0], [2, 2], [0, 0], [1, 1]])  # padding_idx: no data gradient
    torch.testing.assert_close(grad, data + 0.5 * torch.tensor([[0.0, 0], [0, 0], [4, 5], [0, 0], [8, 9]]))
    torch.testing.assert_close(value, torch.tensor(0.5 / 2 * (16 + 25 + 64 + 81)))
    assert add_row_penalty([torch.nn.Embedding(3, 2, sparse=True)], 0.5) == 0  # no gradient: nothing


def _default_like(embedding_regularizer=0.1, **options):
    config = ModelConfig(family="transformer_dcnv2", embedding_dim=D, max_len=L, use_id_embedding=True,
                         sparse_embedding_updates=True,
                         id_embedding_dim=4, use_tag_embedding=True, tag_embedding_dim=4, use_user_embedding=True,
                         user_buckets=16, embedding_regularizer=embedding_regularizer, transformer_dim=8,
                         transformer_ff_dim=16, last_k=3, deep_units=(16,), cross_rank=4, dropout=0.0, **options)
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(N_ITEMS + 1, D)).astype(np.float32)
    emb[0] = 0
    tags = rng.integers(0, 9, size=(N_ITEMS + 1, 3))
    tags[0] = 0
    torch.manual_seed(0)
    return CTRModel(config, emb, tags, item_frequency=rng.integers(0, 50, N_ITEMS + 1))


def _batch(seed=0, n=B):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, L + 1, (n,), generator=g)
    seq = torch.randint(1, N_ITEMS + 1, (n, L), generator=g, dtype=torch.int32)
    seq[torch.arange(L)[None, :] < (L - lengths)[:, None]] = 0
    return CTRTensors(item_id=torch.randint(1, N_ITEMS + 1, (n,), generator=g), item_seq=seq,
                      likes_level=torch.randint(1, 11, (n,), generator=g),
                      views_level=torch.randint(1, 11, (n,), generator=g),
                      label=torch.randint(0, 2, (n,), generator=g).float(), user_id=torch.arange(n) * 7)


def test_batch_item_vectors_are_item_vectors():
    model = _default_like()
    b = _batch()
    target, lookup = model.batch_item_vectors(b.item_id, b.item_seq)
    assert torch.equal(target, model.item_vectors(b.item_id))
    assert torch.equal(lookup(b.item_seq), model.item_vectors(b.item_seq.long()))


def _padded_history(model, target, item_seq):
    """The plain formulation: every position of each bucket (padding included) embedded and projected."""
    out = target.new_zeros(target.shape[0], model.sequence.output_dim)
    d = model.config.transformer_dim
    for rows, width in length_buckets((item_seq != 0).sum(dim=1), item_seq.shape[1]):
        seq = item_seq[rows][:, -width:]
        h, t = model.item_vectors(seq.long()), target[rows].unsqueeze(1)
        if model.config.token_interaction == "factorised":  # A h + B t + b + (P h) * (Q t)
            (a, p), (b, q) = F.linear(h, model.token_history.weight).split(d, -1), model.token_target(t).split(d, -1)
            tokens = a + b + p * q
        else:
            w_h, w_t, w_ht = model.token.weight.split(model.item_dim, dim=1)
            tokens = F.linear(h, w_h) + F.linear(h * t, w_ht) + F.linear(t, w_t, model.token.bias)
        tokens = tokens + model.position_embedding(recency_positions(seq))
        out[rows] = model.sequence(tokens, seq == 0)
    return out


@pytest.mark.parametrize("token_interaction", ["factorised", "elementwise"])
def test_tokens_of_real_items_only_give_the_padded_formulations_outputs(token_interaction):
    model = _default_like(token_interaction=token_interaction).eval()
    b = _batch(1, n=64)
    target = model.item_vectors(b.item_id)
    packed, _ = model._history(target, b.item_seq)
    # padding tokens differ (zero here, projected padding there) but are never keys and their outputs
    # are dropped: equal up to float rounding of differently shaped matrix products
    torch.testing.assert_close(packed, _padded_history(model, target, b.item_seq), rtol=1e-5, atol=1e-6)


def test_a_training_step_changes_only_the_table_rows_its_batch_touches():
    model = _default_like()
    cfg = TrainConfig(lr=0.01)
    optimizer = make_optimizer(model, cfg)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    b = _batch(2, n=4)
    before = model.id_embedding.weight.detach().clone()
    user_before = model.user_embedding.embedding.weight.detach().clone()
    training_step(model.train(), optimizer, torch.amp.GradScaler("cpu", enabled=False), b, cfg,
                  torch.device("cpu"), params)
    touched = torch.cat([b.item_id, b.item_seq[b.item_seq != 0].long()]).unique()
    untouched = torch.ones(N_ITEMS + 1, dtype=torch.bool)
    untouched[touched] = False
    assert torch.equal(model.id_embedding.weight[untouched], before[untouched])
    assert (model.id_embedding.weight[touched] != before[touched]).all(dim=1).all()
    buckets = model.user_embedding.bucket(b.user_id).unique()
    others = torch.ones(16, dtype=torch.bool)
    others[buckets] = False
    assert torch.equal(model.user_embedding.embedding.weight[others], user_before[others])


@pytest.mark.parametrize("lam", [0.5])
def test_the_regulariser_pulls_every_touched_row_toward_zero(lam):
    """With no data signal, rows a batch keeps touching shrink; a row it never touches keeps its value."""
    table = torch.nn.Embedding(5, 3, sparse=True)
    torch.nn.init.normal_(table.weight)
    start = table.weight.detach().clone()
    optimizer = RowAdamW(table.parameters(), lr=0.05, weight_decay=0.0)
    rows = torch.tensor([1, 2])
    for _ in range(50):
        optimizer.zero_grad()
        (lam / 2 * F.embedding(rows, table.weight, sparse=True).pow(2).sum()).backward()
        optimizer.step()
    assert (table.weight[rows].abs() < 0.25 * start[rows].abs() + 0.05).all()
    assert torch.equal(table.weight[[0, 3, 4]], start[[0, 3, 4]])


def _l2_step(optimizer, table, rows, lam=0.5):
    optimizer.zero_grad()
    (lam / 2 * F.embedding(torch.tensor(rows), table.weight, sparse=True).pow(2).sum()).backward()
    optimizer.step()


def test_catch_up_shrinks_a_row_by_the_learning_rates_of_the_steps_it_missed():
    table = torch.nn.Embedding(5, 3, sparse=True)
    with torch.no_grad():
        table.weight.copy_(torch.tensor([[0.0, 0, 0], [0.5, -0.5, 0.05], [0.4, -0.02, 0.3],
                                         [0.25, -0.01, 0.0], [-0.3, 0.2, 0.015]]))
    optimizer = RowAdamW(table.parameters(), lr=0.01, weight_decay=0.0, catch_up_shrink=True)
    _l2_step(optimizer, table, [1, 2])
    after_first = table.weight.detach().clone()
    _l2_step(optimizer, table, [1])
    optimizer.param_groups[0]["lr"] = 0.02  # an LR cut (here a rise) counts at the rate of each step
    _l2_step(optimizer, table, [1])
    # between their visits the rows a batch skips are not touched at all
    assert torch.equal(table.weight[[2, 3, 4]], torch.cat([after_first[2:3], after_first[3:]]))
    optimizer.flush()
    # row 2 missed steps 2 and 3 (lr 0.01 + 0.02), rows 3 and 4 all three (0.01 + 0.01 + 0.02):
    # soft-thresholded by those sums, a coordinate smaller than its sum ending at zero
    for row, missed in ((2, 0.03), (3, 0.04), (4, 0.04)):
        expected = after_first[row].sign() * (after_first[row].abs() - missed).clamp(min=0)
        torch.testing.assert_close(table.weight[row], expected, rtol=0, atol=1e-6)  # float32 lr sums
    assert table.weight[3, 1] == 0 and table.weight[4, 2] == 0
    assert torch.equal(table.weight[0], torch.zeros(3))  # padding-like zero rows stay zero
    settled = table.weight.detach().clone()
    optimizer.flush()
    assert torch.equal(table.weight, settled)  # nothing left pending


def test_catch_up_gives_an_untouched_row_the_dense_adam_l2_pull():
    """A row no batch uses gets only the whole-table penalty's gradient ``lambda * w`` under dense
    Adam; the catch-up shrink gives it the same pull in closed form."""
    start = torch.tensor([[0.0, 0, 0], [0.5, -0.3, 0.05]])
    dense = torch.nn.Parameter(start.clone())
    adam = torch.optim.Adam([dense], lr=0.01)  # L2 in the loss, as the trainer adds it
    table = torch.nn.Embedding(2, 3, sparse=True)
    with torch.no_grad():
        table.weight.copy_(start)
    lazy = RowAdamW(table.parameters(), lr=0.01, weight_decay=0.0, catch_up_shrink=True)
    _l2_step(lazy, table, [0])  # a step that touches another row starts the table's clock
    for _ in range(20):
        adam.zero_grad()
        (0.004 / 2 * dense.pow(2).sum()).backward()
        adam.step()
    for _ in range(19):
        _l2_step(lazy, table, [0])
    lazy.flush()
    # 20 steps of lr 0.01: 0.5 -> 0.3, -0.3 -> -0.1 and 0.05 to zero. Dense Adam's step is lr x
    # sign(grad) only while the gradient holds steady: as the row shrinks so does lambda * w, and
    # v, remembering the larger ones, slows it (0.5 -> 0.306, -0.3 -> -0.112); near zero it
    # oscillates within lr instead of stopping. Equal within 1.5 steps' lr over the 20 steps.
    torch.testing.assert_close(table.weight[1], torch.tensor([0.3, -0.1, 0.0]), rtol=0, atol=1e-6)
    torch.testing.assert_close(table.weight[1], dense[1].detach(), rtol=0, atol=0.015)


@pytest.mark.parametrize("lam", [0.1, 0.0])
def test_the_trainer_catches_up_exactly_the_regularised_sparse_tables(lam):
    model = _default_like(embedding_regularizer=lam)
    optimizer = make_optimizer(model, TrainConfig())
    catch_up = [id(p) for g in optimizer.param_groups if g.get("catch_up_shrink") for p in g["params"]]
    tables = [model.id_embedding.weight, model.user_embedding.embedding.weight]  # the tag table is dense
    assert sorted(catch_up) == (sorted(id(t) for t in tables) if lam else [])
    assert model.id_embedding.sparse and model.user_embedding.embedding.sparse and not model.tag_embedding.sparse
