"""lib/embeddings/precomputed.py: the organisers' vectors as a 512-d content table and as item tables."""

import numpy as np
import polars as pl
import pytest

from mmctr_assets.lib.embeddings.precomputed import CONTENT_DIM, organiser_item_table, project_precomputed


def _feature(n: int, seed: int = 0, order=None) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    ids = np.arange(1, n + 1) if order is None else np.asarray(order)
    return pl.DataFrame({"item_id": ids,
                         "txt_emb_BERT": list(rng.normal(size=(n, 768)).astype(np.float32)),
                         "img_emb_CLIPRN50": list(10 * rng.normal(size=(n, 1024)).astype(np.float32))},
                        schema_overrides={"txt_emb_BERT": pl.List(pl.Float32), "img_emb_CLIPRN50": pl.List(pl.Float32)})


def test_projection_keeps_the_512_d_unit_norm_contract_on_any_item_count():
    for n in (40, 700):  # fewer items than 512 components: the rest are zero
        ids, emb, explained = project_precomputed(_feature(n), n, seed=0)
        assert ids.tolist() == list(range(1, n + 1)) and emb.shape == (n, CONTENT_DIM) and emb.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
        assert 0 < explained <= 1.0 + 1e-9
    _, small, _ = project_precomputed(_feature(40), 40, seed=0)
    assert not small[:, 40:].any()


def test_projection_depends_on_the_items_not_on_the_row_order():
    """Shards of one partitioned run each fit the same projection: the file's row order must not matter."""
    n = 60
    _, a, _ = project_precomputed(_feature(n), n, seed=0)
    order = np.random.default_rng(1).permutation(n) + 1
    shuffled = _feature(n).sort(pl.Series(np.argsort(np.argsort(order))))
    _, b, _ = project_precomputed(shuffled, n, seed=0)
    # same rows, other order: the covariance sums in another order, so agreement is to rounding
    # (1e-4 on unit vectors of 512 components, each about 0.04)
    np.testing.assert_allclose(np.abs(a), np.abs(b), atol=1e-4)


def test_missing_or_broken_vectors_are_refused_with_the_items_and_the_fix():
    with pytest.raises(ValueError, match="needs item_feature.parquet with \\['img_emb_CLIPRN50'\\]"):
        project_precomputed(_feature(10).drop("img_emb_CLIPRN50"), 10, seed=0)
    with pytest.raises(ValueError, match=r"txt_emb_BERT: 2 items have no 768-long finite vector \(first item ids \[11"):
        project_precomputed(_feature(10), 12, seed=0)  # items 11, 12 are not in item_feature


def test_organiser_item_table_rows_are_item_ids_and_absent_file_is_explained():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(5, 128)).astype(np.float32)
    frame = pl.DataFrame({"item_id": [3, 1, 5, 2, 4], "item_emb_d128_v3": list(vectors)},
                         schema_overrides={"item_emb_d128_v3": pl.List(pl.Float32)})
    table = organiser_item_table(frame, "item_emb_d128_v3", 5)
    assert table.shape == (6, 128) and not table[0].any()
    np.testing.assert_array_equal(table[3], vectors[0])
    np.testing.assert_array_equal(table[2], vectors[3])
    with pytest.raises(ValueError, match="needs item_emb.parquet"):
        organiser_item_table(frame.head(0), "item_emb_d128_v3", 5)
    with pytest.raises(ValueError, match="no column 'item_emb_d128_v1'"):
        organiser_item_table(frame, "item_emb_d128_v1", 5)
