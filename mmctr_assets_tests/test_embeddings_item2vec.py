import os
import subprocess
import sys

import numpy as np
import polars as pl
import pytest

from mmctr_assets.lib.embeddings import item2vec as i2v

SMALL = pl.DataFrame(
    {
        "item_seq": [[0, 0, 3, 4], [0, 0, 3, 4], [0, 0, 0, 5], [0, 0, 0, 0], [6, 7, 8, 9], [0, 0, 0, 2]],
        "item_id": [7, 7, 1, 2, 10, 11],
        "label": [1.0, 0.0, 0.0, 1.0, 1.0, 1.0],
    }
)


def planted_clusters(n_clusters=4, per=10, rows=3000, width=10, seed=0) -> pl.DataFrame:
    """Histories drawn from one cluster each, left-padded with 0 to a fixed width; a user per row."""
    rng = np.random.default_rng(seed)
    cluster = rng.integers(0, n_clusters, rows)
    items = cluster[:, None] * per + rng.integers(0, per, (rows, width)) + 1
    lengths = rng.integers(2, width + 1, rows)
    seq = np.where(np.arange(width)[None, :] >= (width - lengths)[:, None], items, 0)
    return pl.DataFrame(
        {
            "user_id": np.arange(rows),
            "item_seq": seq.tolist(),
            "item_id": cluster * per + rng.integers(0, per, rows) + 1,
            "label": rng.integers(0, 2, rows).astype(np.float32),
        }
    )


def user_timelines(users=60, width=12, seed=0) -> pl.DataFrame:
    """A click log: each user's rows (shuffled among all rows) are prefixes of one timeline, and a
    few rows hold a history that is no prefix of it."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(users):
        timeline = rng.integers(1, 50, width)
        for n in sorted(rng.choice(np.arange(0, width + 1), rng.integers(1, 5), replace=False)):
            history = timeline[:n] if rng.random() > 0.1 else rng.integers(1, 50, n)
            rows.append((user, [0] * (width - n) + history.tolist(), int(rng.integers(1, 50)),
                         float(rng.random() < 0.5)))
    rows = [rows[i] for i in rng.permutation(len(rows))]
    return pl.DataFrame(rows, schema={"user_id": pl.Int64, "item_seq": pl.List(pl.Int64), "item_id": pl.Int64,
                                      "label": pl.Float64}, orient="row")


def test_row_lines_drop_padding_and_append_clicked_targets(tmp_path):
    stats = i2v.build_corpus(SMALL, tmp_path / "c.txt", one_line_per_user=False)  # needs no user_id
    # row 3: only the clicked target (one token) -> dropped; row 5: [2, 11]
    assert (tmp_path / "c.txt").read_text().splitlines() == ["3 4 7", "3 4", "6 7 8 9 10", "2 11"]
    assert (stats.n_rows, stats.n_sentences, stats.n_tokens, stats.n_items,
            stats.n_targets_appended) == (6, 4, 12, 9, 4)
    assert stats.n_rows_merged == 0
    assert [p.name for p in tmp_path.iterdir()] == ["c.txt"]  # atomic: no temp file left


def test_row_lines_without_targets_and_from_parquet(tmp_path):
    SMALL.write_parquet(tmp_path / "train.parquet")
    stats = i2v.build_corpus(tmp_path / "train.parquet", tmp_path / "c.txt", include_clicked_target=False,
                             one_line_per_user=False)
    assert (tmp_path / "c.txt").read_text().splitlines() == ["3 4", "3 4", "6 7 8 9"]
    assert stats.n_targets_appended == 0 and stats.n_tokens == 8


TIMELINES = pl.DataFrame(
    {
        "user_id": [1, 2, 1, 1, 2, 3],
        "item_seq": [[0, 0, 5, 6], [0, 0, 8, 9], [0, 5, 6, 7], [0, 0, 0, 5], [0, 0, 9, 8], [0, 0, 0, 0]],
        "item_id": [7, 1, 3, 6, 2, 4],
        "label": [1.0, 1.0, 1.0, 0.0, 1.0, 1.0],
    }
)


def test_user_lines_fold_prefix_rows_into_one_timeline(tmp_path):
    stats = i2v.build_corpus(TIMELINES, tmp_path / "c.txt")
    # user 1: the longest history 5 6 7; row 0's clicked 7 is already next in it, row 2's clicked 3
    # follows it. User 2: 9 8 is no prefix of 8 9 (the longest, first of equal length): own line.
    # User 3: only a clicked target, one token: dropped.
    assert (tmp_path / "c.txt").read_text().splitlines() == ["5 6 7 3", "8 9 1", "9 8 2"]
    assert (stats.n_rows, stats.n_sentences, stats.n_tokens, stats.n_items) == (6, 3, 10, 8)
    assert stats.n_rows_merged == 5 and stats.n_targets_appended == 4
    i2v.build_corpus(TIMELINES, tmp_path / "c.txt", include_clicked_target=False)
    assert (tmp_path / "c.txt").read_text().splitlines() == ["5 6 7", "8 9", "9 8"]


def test_user_line_places_a_click_where_its_history_ends(tmp_path):
    log = pl.DataFrame({"user_id": [4, 4], "item_seq": [[0, 0, 1, 2], [1, 2, 3, 5]], "item_id": [9, 8],
                        "label": [1.0, 0.0]})
    i2v.build_corpus(log, tmp_path / "c.txt")
    assert (tmp_path / "c.txt").read_text().splitlines() == ["1 2 9 3 5"]


def test_corpus_is_the_same_in_small_batches(tmp_path):
    frame = user_timelines()
    frame.write_parquet(tmp_path / "train.parquet", row_group_size=16)
    one = i2v.build_corpus(frame, tmp_path / "one.txt", batch_rows=1 << 16)
    many = i2v.build_corpus(tmp_path / "train.parquet", tmp_path / "many.txt", batch_rows=7)
    lazy = i2v.build_corpus(frame.lazy(), tmp_path / "lazy.txt", batch_rows=10)
    text = (tmp_path / "one.txt").read_text()
    assert text == (tmp_path / "many.txt").read_text() == (tmp_path / "lazy.txt").read_text()
    assert len(text.splitlines()) == one.n_sentences
    fields = lambda s: (s.n_rows, s.n_sentences, s.n_tokens, s.n_items, s.n_targets_appended, s.n_rows_merged)  # noqa: E731
    assert fields(one) == fields(many) == fields(lazy)
    rows = i2v.build_corpus(frame, tmp_path / "rows.txt", one_line_per_user=False)
    assert 0 < one.n_rows_merged < one.n_rows and one.n_tokens < rows.n_tokens
    assert one.n_sentences < rows.n_sentences and one.n_items == rows.n_items


def test_corpus_input_errors(tmp_path):
    with pytest.raises(ValueError, match=r"missing \['label'\]"):
        i2v.build_corpus(TIMELINES.drop("label"), tmp_path / "c.txt")
    with pytest.raises(ValueError, match=r"missing \['user_id'\].*one_line_per_user=False"):
        i2v.build_corpus(SMALL, tmp_path / "c.txt")
    with pytest.raises(FileNotFoundError, match="raw_train"):
        i2v.build_corpus(tmp_path / "nope.parquet", tmp_path / "c.txt")
    assert not (tmp_path / "c.txt").exists()


@pytest.fixture(scope="module")
def cluster_corpus(tmp_path_factory):
    return i2v.build_corpus(planted_clusters(), tmp_path_factory.mktemp("i2v") / "corpus.txt")


def test_learns_planted_co_occurrence(cluster_corpus):
    res = i2v.train_item2vec(cluster_corpus.path, epochs=5, workers=2, seed=0)
    assert res.item_ids.dtype == np.int64 and res.item_ids.tolist() == list(range(1, 41))
    assert res.vectors.dtype == np.float32 and res.vectors.shape == (40, 128)
    assert 0 not in res.item_ids
    v = res.vectors / np.linalg.norm(res.vectors, axis=1, keepdims=True)
    cluster = (res.item_ids - 1) // 10
    sim = v @ v.T
    same = (cluster[:, None] == cluster[None, :]) & ~np.eye(40, dtype=bool)
    diff = cluster[:, None] != cluster[None, :]
    assert sim[same].mean() > sim[diff].mean() + 0.3
    # every item's nearest neighbour is in its own cluster
    np.fill_diagonal(sim, -2)
    assert (cluster[sim.argmax(axis=1)] == cluster).all()
    assert res.n_tokens == cluster_corpus.n_tokens and res.n_sentences == cluster_corpus.n_sentences


def _neighbourhood(res):
    """(each item's nearest neighbour's cluster, same-cluster minus other-cluster mean cosine)."""
    v = res.vectors / np.linalg.norm(res.vectors, axis=1, keepdims=True)
    cluster = (res.item_ids - 1) // 10
    sim = v @ v.T
    same = (cluster[:, None] == cluster[None, :]) & ~np.eye(len(v), dtype=bool)
    margin = sim[same].mean() - sim[cluster[:, None] != cluster[None, :]].mean()
    np.fill_diagonal(sim, -2)
    return cluster[sim.argmax(axis=1)] == cluster, float(margin)


def test_fast_mode_learns_the_same_neighbourhoods_as_the_reproducible_mode(cluster_corpus):
    """The asset's fast mode (a gensim worker per core, Hogwild updates) is not bit-reproducible, so
    its vectors are compared by what they are for: the planted structure. Both modes must put every
    item's nearest neighbour in its own cluster, and separate the clusters by about as much: within
    0.1 of cosine, about what two one-worker runs with different seeds differ by here."""
    reproducible = i2v.train_item2vec(cluster_corpus.path, epochs=5, workers=1, seed=0)
    other_seed = i2v.train_item2vec(cluster_corpus.path, epochs=5, workers=1, seed=1)
    fast = i2v.train_item2vec(cluster_corpus.path, epochs=5, workers=4, seed=0)
    assert fast.params["workers"] == 4 and np.array_equal(fast.item_ids, reproducible.item_ids)
    (hit_r, margin_r), (hit_s, margin_s), (hit_f, margin_f) = map(_neighbourhood, (reproducible, other_seed, fast))
    assert hit_r.all() and hit_s.all() and hit_f.all()
    assert margin_r > 0.3 and abs(margin_f - margin_r) < 0.1 and abs(margin_s - margin_r) < 0.1


@pytest.mark.float_repro
def test_single_worker_is_bit_reproducible_across_processes(cluster_corpus):
    a = i2v.train_item2vec(cluster_corpus.path, epochs=2, workers=1, seed=7)
    b = i2v.train_item2vec(cluster_corpus.path, epochs=2, workers=1, seed=7)
    c = i2v.train_item2vec(cluster_corpus.path, epochs=2, workers=1, seed=8)
    np.testing.assert_array_equal(a.vectors, b.vectors)
    assert not np.array_equal(a.vectors, c.vectors)
    code = (
        "import sys, numpy as np; from mmctr_assets.lib.embeddings.item2vec import train_item2vec;"
        "r = train_item2vec(sys.argv[1], epochs=2, workers=1, seed=7); sys.stdout.buffer.write(r.vectors.tobytes())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code, str(cluster_corpus.path)], env=env,
                         capture_output=True, check=True).stdout
    np.testing.assert_array_equal(np.frombuffer(out, np.float32).reshape(a.vectors.shape), a.vectors)


def test_min_count_leaves_rare_items_without_vectors(tmp_path):
    (tmp_path / "c.txt").write_text("1 2 3\n1 2 3\n1 2 4\n")
    res = i2v.train_item2vec(tmp_path / "c.txt", min_count=2, epochs=1, workers=1)
    assert res.item_ids.tolist() == [1, 2, 3]
    assert res.n_below_min_count == 1


def test_padding_token_in_foreign_corpus_is_refused(tmp_path):
    (tmp_path / "c.txt").write_text("0 0 3 4\n5 6\n")
    with pytest.raises(ValueError, match="padding id 0"):
        i2v.train_item2vec(tmp_path / "c.txt", epochs=1)
    (tmp_path / "words.txt").write_text("3 cat 4\n")
    with pytest.raises(ValueError, match=r"not item ids, e.g. \['cat'\]"):
        i2v.train_item2vec(tmp_path / "words.txt", epochs=1)
    with pytest.raises(FileNotFoundError, match="build_corpus"):
        i2v.train_item2vec(tmp_path / "missing.txt")


def test_to_frame(cluster_corpus):
    res = i2v.train_item2vec(cluster_corpus.path, epochs=1, workers=1, dim=16)
    frame = i2v.to_frame(res)
    assert frame.schema == pl.Schema({"item_id": pl.Int64, "i2v_emb": pl.Array(pl.Float32, 16)})
    np.testing.assert_array_equal(frame["i2v_emb"].to_numpy(), res.vectors)
