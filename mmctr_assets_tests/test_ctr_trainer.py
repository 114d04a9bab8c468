import dataclasses

import numpy as np
import polars as pl
import pytest
import torch

from mmctr_assets.lib.ctr.artifacts import load_model, save_model
from mmctr_assets.lib.ctr.inference import predict
from mmctr_assets.lib.ctr.model_config import ModelConfig
from mmctr_assets.lib.ctr.tensors import CTRTensors, to_tensors
from mmctr_assets.lib.ctr.trainer import EpochLog, TrainConfig, train
from mmctr_assets.lib.metrics import auc

N_ITEMS, N_TOPICS, DIM, WIDTH, MAX_LEN = 300, 4, 16, 30, 24
# This world has no popularity signal (uniform targets): the item-frequency input is noise here.
# a DCN-DIN over the item table alone (the library's default model adds id, tag and user tables)
PLAIN = dict(family="dcn_din", use_id_embedding=False, use_tag_embedding=False, use_user_embedding=False,
             embedding_regularizer=0.0)
MODEL = ModelConfig(embedding_dim=DIM, max_len=MAX_LEN, attention_units=(16, 8), deep_units=(32, 16),
                    use_item_frequency=False, **PLAIN)
# One thread: on a shared 2-core box two OpenMP threads can run 10x slower under contention.
FAST = TrainConfig(batch_size=256, epochs=2, lr=3e-3, eval_batch_size=1024,
                   num_threads=1, lr_factor=0.1, early_stopping_patience=2)


def _world(seed=0):
    """Items in topics; pretrained embeddings = topic centroid + noise (so they carry the signal)."""
    rng = np.random.default_rng(seed)
    topic = rng.integers(0, N_TOPICS, N_ITEMS + 1)
    centers = rng.normal(size=(N_TOPICS, DIM))
    emb = (centers[topic] + 0.5 * rng.normal(size=(N_ITEMS + 1, DIM))).astype(np.float32)
    emb[0] = 0
    return topic, emb


def _frame(n, seed, topic, labels=True):
    """Each user likes one topic and watched mostly it; clicks when the target is that topic."""
    rng = np.random.default_rng(seed)
    user_topic = rng.integers(0, N_TOPICS, n)
    by_topic = [np.flatnonzero(topic[1:] == t) + 1 for t in range(N_TOPICS)]
    seq = np.zeros((n, WIDTH), np.int64)
    for t in range(N_TOPICS):
        rows = np.flatnonzero(user_topic == t)
        seq[rows] = rng.choice(by_topic[t], size=(rows.size, WIDTH))
    lengths = np.clip(np.floor(rng.lognormal(1.6, 0.7, n)), 3, WIDTH).astype(int)
    seq[np.arange(WIDTH)[None, :] < WIDTH - lengths[:, None]] = 0
    target = rng.integers(1, N_ITEMS + 1, n)
    likes = rng.integers(1, 11, n)
    logit = 3.0 * (topic[target] == user_topic) - 1.5 + 0.2 * (likes - 5.5)
    frame = pl.DataFrame({"user_id": np.arange(n), "item_seq": seq.tolist(), "item_id": target,
                          "likes_level": likes, "views_level": rng.integers(1, 11, n)})
    if labels:
        frame = frame.with_columns(label=pl.Series((rng.random(n) < 1 / (1 + np.exp(-logit)))
                                                   .astype(np.float64)))
    return frame, 1 / (1 + np.exp(-logit))


@pytest.fixture(scope="module")
def data():
    topic, emb = _world()
    train_frame, _ = _frame(6000, 1, topic)
    valid_frame, valid_prob = _frame(2000, 2, topic)
    return {"emb": emb, "train": to_tensors(train_frame, MAX_LEN, n_items=N_ITEMS),
            "valid": to_tensors(valid_frame, MAX_LEN, n_items=N_ITEMS),
            "oracle_auc": auc(valid_frame["label"], valid_prob)}


def _train(data, tmp_path, name="run", model=MODEL, cfg=FAST, **kwargs):
    return train(model, cfg, data["train"], data["valid"], data["emb"],
                 checkpoint_dir=tmp_path / name, **kwargs)


# ------------------------------------------------------------------------------ to_tensors

def test_to_tensors_keeps_the_last_max_len_real_items():
    frame = pl.DataFrame({"item_seq": [[0, 0, 0, 1, 2, 3], [4, 5, 6, 7, 8, 9], [0] * 6],
                          "item_id": [1, 2, 3], "likes_level": [1, 2, 3], "views_level": [4, 5, 6],
                          "label": [0.0, 1.0, 0.0]})
    t = to_tensors(frame, 4)
    assert t.item_seq.tolist() == [[0, 1, 2, 3], [6, 7, 8, 9], [0, 0, 0, 0]]
    assert t.item_seq.dtype == torch.int32 and t.item_id.dtype == torch.int64
    assert t.label.tolist() == [0.0, 1.0, 0.0] and t.label.dtype == torch.float32
    assert to_tensors(frame, 8).item_seq[0].tolist() == [0, 0, 0, 0, 0, 1, 2, 3]  # left-pads


def test_to_tensors_handles_variable_length_histories_and_missing_labels():
    frame = pl.DataFrame({"item_seq": [[0, 1, 2, 3, 4], [7], [], [5, 6, 8]], "item_id": [1, 2, 3, 4],
                          "likes_level": [1] * 4, "views_level": [1] * 4})
    t = to_tensors(frame, 3)
    assert t.item_seq.tolist() == [[2, 3, 4], [0, 0, 7], [0, 0, 0], [5, 6, 8]]
    assert t.label is None and len(t) == 4


def test_to_tensors_matches_a_per_row_reference_on_random_data():
    topic, _ = _world()
    frame, _ = _frame(500, 3, topic)
    t = to_tensors(frame, 8)
    for row, seq in zip(t.item_seq.tolist(), frame["item_seq"].to_list()):
        real = [i for i in seq if i][-8:]
        assert row == [0] * (8 - len(real)) + real


@pytest.mark.parametrize("column, value, message", [
    ("item_id", [1, 400, 2], r"item_id: 1 of 3 values fall outside the item-embedding table "
                             r"\(target ids 1..300\), e.g. 400\. The item embeddings must cover"),
    ("item_id", [1, 0, 2], r"item_id: 1 of 3 values .* e.g. 0"),
    ("item_seq", [[0, 301], [0, 1], [999, 5]], r"item_seq: 2 of 12 values .*history ids 0..300.*e.g. 301"),
    ("likes_level", [1, 11, 3], r"likes_level: 1 of 3 .* level table \(0..10\), e.g. 11. Bucket"),
])
def test_to_tensors_rejects_ids_outside_the_tables(column, value, message):
    frame = pl.DataFrame({"item_seq": [[0, 1], [0, 2], [3, 4]], "item_id": [1, 2, 3],
                          "likes_level": [1, 2, 3], "views_level": [1, 2, 3]})
    frame = frame.with_columns(pl.Series(column, value))
    with pytest.raises(ValueError, match=message):
        to_tensors(frame, 4, n_items=N_ITEMS)


@pytest.mark.parametrize("labels, message", [
    ([0.0, float("nan"), 1.0], r"label: 1 values are not 0 or 1 \(row 1: nan\)"),
    ([0.0, float("inf"), 1.0], r"label: 1 values are not 0 or 1 \(row 1: inf\)"),
    ([0.0, 0.5, 2.0], r"label: 2 values are not 0 or 1 \(row 1: 0.5, row 2: 2.0\)"),
    ([0.0, None, 1.0], r"label: 1 values are not 0 or 1 \(row 1: null\)"),
])
def test_to_tensors_rejects_bad_labels(labels, message):
    frame = pl.DataFrame({"item_seq": [[1], [2], [3]], "item_id": [1, 2, 3], "likes_level": [1] * 3,
                          "views_level": [1] * 3, "label": labels})
    with pytest.raises(ValueError, match=message):
        to_tensors(frame, 4)


def test_to_tensors_rejects_malformed_frames():
    good = {"item_seq": [[0, 1], [0, 2]], "item_id": [1, 2], "likes_level": [1, 1], "views_level": [1, 1]}
    with pytest.raises(ValueError, match=r"lacks columns \['views_level'\]"):
        to_tensors(pl.DataFrame({k: v for k, v in good.items() if k != "views_level"}), 4)
    with pytest.raises(ValueError, match=r"must be LEFT-padded.*1 rows are not \(e.g. row 1\)"):
        to_tensors(pl.DataFrame({**good, "item_seq": [[0, 1], [2, 0]]}), 4)
    with pytest.raises(ValueError, match="'item_seq' has 1 null entries"):
        to_tensors(pl.DataFrame({**good, "item_seq": [[0, 1], [None, 2]]}), 4)
    with pytest.raises(ValueError, match="'item_id' must be integer, got Float64"):
        to_tensors(pl.DataFrame({**good, "item_id": [1.0, 2.0]}), 4)


# ---------------------------------------------------------------------------------- train

def test_model_learns_the_planted_signal(data, tmp_path):
    calls = []
    epochs = []
    # 5 epochs: the default sigmoid attention starts slower than the DIN paper's linear one
    result = _train(data, tmp_path, cfg=dataclasses.replace(FAST, epochs=5, early_stopping_patience=5),
                    on_epoch_end=epochs.append, progress=lambda *a: calls.append(a))
    assert result.best_valid_auc > 0.75, (result.best_valid_auc, data["oracle_auc"])
    assert result.best_valid_auc > data["oracle_auc"] - 0.06
    assert [e.epoch for e in epochs] == [1, 2, 3, 4, 5] and all(isinstance(e, EpochLog) for e in epochs)
    # 6000 rows / 256 -> 24 batches; step 0 marks each epoch's start
    assert calls == [(epoch, step, 24) for epoch in range(1, 6) for step in range(25)]
    assert result.resumed_from_epoch is None and "started fresh" in result.resume_note
    assert result.valid_predictions.dtype == np.float32 and result.valid_predictions.shape == (2000,)
    assert auc(data["valid"].label, result.valid_predictions) == pytest.approx(result.best_valid_auc)
    best = result.history[result.best_epoch - 1]
    assert best.valid_auc == result.best_valid_auc and best.improved
    assert all(h.samples_per_s > 0 and h.seconds > 0 and np.isfinite(h.train_loss) for h in result.history)


@pytest.mark.float_repro
def test_training_is_deterministic(data, tmp_path):
    a = _train(data, tmp_path, "a")
    b = _train(data, tmp_path, "b")
    assert a.best_valid_auc == b.best_valid_auc
    np.testing.assert_array_equal(a.valid_predictions, b.valid_predictions)
    for k in a.best_state_dict:
        assert torch.equal(a.best_state_dict[k], b.best_state_dict[k]), k
    c = _train(data, tmp_path, "c", cfg=dataclasses.replace(FAST, seed=1))
    assert c.best_valid_auc != a.best_valid_auc  # the seed matters


class Kill(Exception):
    pass


def _kill_after(epoch):
    def hook(log):
        if log.epoch == epoch:
            raise Kill
    return hook


@pytest.mark.float_repro
def test_interrupted_and_resumed_run_equals_uninterrupted(data, tmp_path):
    whole = _train(data, tmp_path, "whole")
    with pytest.raises(Kill):
        _train(data, tmp_path, "killed", on_epoch_end=_kill_after(1))
    assert (tmp_path / "killed" / "last.pt").exists()
    resumed = _train(data, tmp_path, "killed")
    assert resumed.resumed_from_epoch == 1 and "resumed after epoch 1" in resumed.resume_note
    assert resumed.best_valid_auc == whole.best_valid_auc
    assert resumed.best_epoch == whole.best_epoch
    for k in whole.best_state_dict:
        assert torch.equal(whole.best_state_dict[k], resumed.best_state_dict[k]), k
    np.testing.assert_array_equal(whole.valid_predictions, resumed.valid_predictions)
    strip = lambda h: [(e.epoch, e.train_loss, e.valid_auc, e.lr) for e in h]  # noqa: E731
    assert strip(resumed.history) == strip(whole.history)
    # A finished run resumes with nothing left to do; a longer run continues it.
    (tmp_path / "killed" / "best.pt").unlink()
    again = _train(data, tmp_path, "killed")
    assert again.resumed_from_epoch == 2 and len(again.history) == 2
    # like with like: the loop's evaluation batches and thread count (rounding depends on both)
    threads = torch.get_num_threads()
    torch.set_num_threads(FAST.num_threads)
    try:
        reloaded = predict(load_model(again.best_model_path), data["valid"], batch_size=FAST.eval_batch_size)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(reloaded, whole.valid_predictions)
    longer = _train(data, tmp_path, "killed", cfg=dataclasses.replace(FAST, epochs=3))
    assert longer.resumed_from_epoch == 2 and [e.epoch for e in longer.history] == [1, 2, 3]


# The new families and options through the same resume / determinism checks (fewer rows: fast).
FAMILY_RUNS = {
    "transformer_dcnv2": dict(family="transformer_dcnv2", transformer_dim=8, transformer_ff_dim=16, last_k=4,
                              cross_rank=4, use_user_embedding=True, user_buckets=50),
    "din": dict(family="din", use_id_embedding=True, id_embedding_dim=4, embedding_regularizer=1e-3),
}


@pytest.fixture(scope="module")
def small_data(data):
    return data | {"train": data["train"].slice(0, 1500), "valid": data["valid"].slice(0, 500)}


@pytest.mark.float_repro
@pytest.mark.parametrize("family", FAMILY_RUNS)
def test_new_families_are_deterministic_and_resume_exactly(small_data, tmp_path, family):
    model = ModelConfig(
        embedding_dim=DIM, max_len=MAX_LEN, deep_units=(16,), **(PLAIN | FAMILY_RUNS[family]))
    whole = _train(small_data, tmp_path, "whole", model=model)
    again = _train(small_data, tmp_path, "again", model=model)
    np.testing.assert_array_equal(whole.valid_predictions, again.valid_predictions)
    assert whole.best_valid_auc > 0.6  # learns the planted topic signal
    with pytest.raises(Kill):
        _train(small_data, tmp_path, "killed", model=model, on_epoch_end=_kill_after(1))
    resumed = _train(small_data, tmp_path, "killed", model=model)
    assert resumed.resumed_from_epoch == 1
    for k in whole.best_state_dict:
        assert torch.equal(whole.best_state_dict[k], resumed.best_state_dict[k]), k
    np.testing.assert_array_equal(whole.valid_predictions, resumed.valid_predictions)
    assert load_model(resumed.best_model_path).config == model


def test_user_embedding_needs_user_ids_and_max_len_must_fit_the_histories(data, tmp_path):
    users = ModelConfig(**(PLAIN | dict(embedding_dim=DIM, max_len=MAX_LEN, use_user_embedding=True,
                                        use_item_frequency=False)))
    no_users = dataclasses.replace(data["train"], user_id=None)
    with pytest.raises(ValueError, match="train_tensors has no user_id"):
        train(users, FAST, no_users, data["valid"], data["emb"], checkpoint_dir=tmp_path)
    longer = dataclasses.replace(MODEL, max_len=MAX_LEN + 1)
    with pytest.raises(ValueError, match=f"max_len={MAX_LEN + 1} is longer than the histories of train_tensors "
                                         f"\\({MAX_LEN} positions\\); allowed: 1..{MAX_LEN}"):
        _train(data, tmp_path, model=longer)


def test_changed_config_or_data_starts_fresh_and_says_why(data, tmp_path):
    _train(data, tmp_path, "run")
    lr = _train(data, tmp_path, "run", cfg=dataclasses.replace(FAST, lr=2e-3))
    assert lr.resumed_from_epoch is None
    assert "train_config differs in ['lr']" in lr.resume_note
    model = _train(data, tmp_path, "run", model=dataclasses.replace(MODEL, dropout=0.0),
                   cfg=dataclasses.replace(FAST, lr=2e-3))
    assert "model_config differs in ['dropout']" in model.resume_note
    other = _train(data, tmp_path, "run", model=dataclasses.replace(MODEL, dropout=0.0),
                   cfg=dataclasses.replace(FAST, lr=2e-3), data_fingerprint="another dataset")
    assert "different data" in other.resume_note
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "last.pt").write_bytes(b"not a checkpoint")
    junk = _train(data, tmp_path, "junk")
    assert junk.resumed_from_epoch is None and "could not be read" in junk.resume_note


def test_lr_is_cut_after_a_bad_epoch_and_training_stops_after_two(tmp_path):
    """Labels are pure noise, so valid AUC wanders; check the schedule's rules on whatever happens."""
    topic, emb = _world()
    rng = np.random.default_rng(5)
    frames = [_frame(n, s, topic)[0].with_columns(label=pl.Series(rng.integers(0, 2, n).astype(float)))
              for n, s in ((2000, 6), (1000, 7))]
    cfg = dataclasses.replace(FAST, epochs=30, lr=3e-3)
    result = train(MODEL, cfg, to_tensors(frames[0], MAX_LEN), to_tensors(frames[1], MAX_LEN), emb,
                   checkpoint_dir=tmp_path)
    h = result.history
    assert result.stopped_early and len(h) < 30
    assert not h[-1].improved and not h[-2].improved  # two bad epochs in a row end it
    for prev, cur in zip(h, h[1:]):
        assert cur.lr == pytest.approx(prev.lr if prev.improved else prev.lr * 0.1)
    assert result.best_valid_auc == max(e.valid_auc for e in h)


def test_precision_options(data, tmp_path):
    with pytest.raises(ValueError, match="precision 'fp16' needs a CUDA device.*Use 'bf16' or 'fp32'"):
        _train(data, tmp_path, cfg=dataclasses.replace(FAST, precision="fp16"))
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(precision="fp8")
    bf16 = _train(data, tmp_path, "bf16", cfg=dataclasses.replace(FAST, precision="bf16"))
    assert 0.6 < bf16.best_valid_auc <= 1 and np.isfinite(bf16.history[0].train_loss)


def test_train_rejects_unusable_inputs(data, tmp_path):
    unlabeled = dataclasses.replace(data["valid"], label=None)
    with pytest.raises(ValueError, match="valid_tensors has no labels"):
        train(MODEL, FAST, data["train"], unlabeled, data["emb"], checkpoint_dir=tmp_path)
    one_class = dataclasses.replace(data["valid"], label=torch.ones(len(data["valid"])))
    with pytest.raises(ValueError, match="valid_tensors labels are all 1"):
        train(MODEL, FAST, data["train"], one_class, data["emb"], checkpoint_dir=tmp_path)
    soft = dataclasses.replace(data["train"], label=torch.full((len(data["train"]),), 0.3))
    with pytest.raises(ValueError, match=r"train_tensors.label: 6,000 values are not 0 or 1 \(row 0: 0.3"):
        train(MODEL, FAST, soft, data["valid"], data["emb"], checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match=r"item_id: .*target ids 1\.\.99"):
        train(MODEL, FAST, data["train"], data["valid"], data["emb"][:100], checkpoint_dir=tmp_path)
    assert not list(tmp_path.iterdir())  # nothing written for rejected input


# ------------------------------------------------------------------------- predict / files

def test_predict_save_and_load_round_trip(data, tmp_path):
    result = _train(data, tmp_path, cfg=dataclasses.replace(FAST, epochs=1))
    probs = predict(result.model, data["valid"], batch_size=300)
    assert probs.dtype == np.float32 and probs.shape == (2000,)
    assert ((probs > 0) & (probs < 1)).all()
    np.testing.assert_allclose(probs, result.valid_predictions, rtol=1e-6)
    path = save_model(result.model, tmp_path / "model.pt")
    loaded = load_model(path)
    assert not loaded.training
    np.testing.assert_array_equal(predict(loaded, data["valid"]), predict(result.model, data["valid"]))
    np.testing.assert_array_equal(predict(load_model(result.best_model_path), data["valid"]),
                                  predict(result.model, data["valid"]))
    test = dataclasses.replace(data["valid"], label=None)  # test set: no labels needed
    assert predict(loaded, test).shape == (2000,)


def test_predict_and_load_model_errors(data, tmp_path):
    result = _train(data, tmp_path, cfg=dataclasses.replace(FAST, epochs=1))
    bad = CTRTensors(item_id=torch.tensor([1, 301]), item_seq=torch.zeros(2, 4, dtype=torch.int32),
                     likes_level=torch.ones(2, dtype=torch.long), views_level=torch.ones(2, dtype=torch.long))
    with pytest.raises(ValueError, match="item_id: 1 of 2 values .* e.g. 301"):
        predict(result.model, bad)
    with pytest.raises(FileNotFoundError, match="no model file at"):
        load_model(tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not an mmctr CTR model written by save_model"):
        load_model(tmp_path / "foreign.pt")
    old = torch.load(result.best_model_path, weights_only=True) | {"format": "mmctr.dcn_din.model/1"}
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="another mmctr version .* materialise dcn_din_model again"):
        load_model(tmp_path / "old.pt")


@pytest.mark.parametrize("restore", [True, False])
def test_an_lr_cut_continues_from_the_best_weights_when_asked(tmp_path, restore):
    """Noise labels, so valid AUC wanders and the LR gets cut; last.pt (what the next epoch starts
    from, written before on_epoch_end) holds the best weights after a cut only with the option."""
    topic, emb = _world()
    rng = np.random.default_rng(5)
    frames = [_frame(n, s, topic)[0].with_columns(label=pl.Series(rng.integers(0, 2, n).astype(float)))
              for n, s in ((2000, 6), (1000, 7))]
    cfg = dataclasses.replace(FAST, epochs=12, lr=3e-3, early_stopping_patience=4, restore_best_on_lr_cut=restore)
    starts_from_best = []

    def after_epoch(log):
        ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
        if not log.improved and not ckpt["stopped_early"] and ckpt["scheduler"]["_last_lr"][0] < log.lr:
            starts_from_best.append(all(torch.equal(ckpt["model"][k], v) for k, v in ckpt["best_state"].items()))

    train(MODEL, cfg, to_tensors(frames[0], MAX_LEN), to_tensors(frames[1], MAX_LEN), emb,
          checkpoint_dir=tmp_path, on_epoch_end=after_epoch)
    assert starts_from_best, "no LR cut happened: the test saw nothing"
    assert all(starts_from_best) if restore else not any(starts_from_best)


def test_a_spent_study_budget_stops_a_training_still_waiting_for_cores(data, tmp_path, monkeypatch):
    """A study's trial whose training waits for CPU cores (another process holds them all) stops at
    the study's budget without training, instead of starting late and overrunning it."""
    import fcntl
    import threading

    import optuna

    from mmctr_assets.lib import cores
    from mmctr_assets.lib.ctr import tuning

    monkeypatch.setenv(cores.LOCK_DIR_ENV, str(tmp_path / "locks"))
    (tmp_path / "locks").mkdir()
    other_process = [open(tmp_path / "locks" / f"cpu-{i}.lock", "a+") for i in range(cores.available_cpus())]
    for f in other_process:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    trial = optuna.create_study(direction="maximize").ask()
    budget, steps = tuning.Budget(0.005), []  # 0.3 s

    def progress(epoch, step, n_steps):
        steps.append(step)
        budget.check(trial, epoch)

    raised = []

    def training():
        try:
            _train(data, tmp_path, progress=progress)
        except tuning.BudgetSpent as e:
            raised.append(e)

    waiter = threading.Thread(target=training, daemon=True)
    waiter.start()
    waiter.join(60)  # generous: the budget is 0.3 s; without the poll it would wait for the cores forever
    for f in other_process:
        f.close()
    waiter.join(60)
    assert raised and "budget of 0.005 minutes is spent" in str(raised[0])
    assert steps and set(steps) == {0}  # polled while waiting; not one batch trained
    assert not (tmp_path / "run" / "last.pt").exists()
    # with cores free, a budget still open is checked before each epoch's first batch and after every batch
    steps.clear()
    budget = tuning.Budget(10)
    _train(data, tmp_path, name="free", progress=progress, cfg=dataclasses.replace(FAST, epochs=2))
    per_epoch = list(range(len(steps) // 2))
    assert steps == per_epoch + per_epoch and len(per_epoch) > 1
