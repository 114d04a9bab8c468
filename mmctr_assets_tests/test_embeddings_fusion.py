import io

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmctr_assets.lib.embeddings.fusion import fuse_embeddings, validate_item_embeddings, write_item_info_updated
from mmctr_assets.lib.plots import plot_embedding_projection

N = 300


@pytest.fixture(scope="module")
def parts():
    """CLIP for every item (rank-8 structure + noise), item2vec for items 1..249 only."""
    rng = np.random.default_rng(0)
    clip_ids = np.arange(1, N + 1)
    clip = (rng.normal(size=(N, 8)) @ rng.normal(size=(8, 512)) + 0.05 * rng.normal(size=(N, 512))).astype(np.float32)
    i2v_ids = np.arange(1, 250)
    i2v = rng.normal(size=(len(i2v_ids), 128)).astype(np.float32)
    return clip_ids, clip, i2v_ids, i2v


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_unit_norm_row_zero_and_counts(parts):
    res = fuse_embeddings(N, *parts, alpha=0.5)
    assert res.embeddings.shape == (N + 1, 128) and res.embeddings.dtype == np.float32
    assert not res.embeddings[0].any()
    np.testing.assert_allclose(np.linalg.norm(res.embeddings[1:], axis=1), 1.0, atol=1e-5)
    assert res.counts == {"both": 249, "content_only": 51, "collab_only": 0, "none": 0}
    assert res.pca_components == 128 and res.explained_variance_ratio.shape == (128,)
    assert 0.95 < res.explained_variance_total <= 1.0 + 1e-6  # rank-8 signal
    assert res.explained_variance_ratio[:8].sum() > 0.95
    assert validate_item_embeddings(res.embeddings, n_items=N) == []


def test_alpha_one_is_content_only_and_alpha_zero_collab_only(parts):
    clip_ids, clip, i2v_ids, i2v = parts
    content = fuse_embeddings(N, clip_ids, clip, i2v_ids[:0], i2v[:0], alpha=0.5).embeddings
    a1 = fuse_embeddings(N, *parts, alpha=1.0).embeddings
    np.testing.assert_allclose(a1, content, atol=1e-6)
    a0 = fuse_embeddings(N, *parts, alpha=0.0).embeddings
    np.testing.assert_allclose(a0[i2v_ids], unit(i2v), atol=1e-6)
    np.testing.assert_allclose(a0[250:], content[250:], atol=1e-6)  # no collab vector: content
    mix = fuse_embeddings(N, *parts, alpha=0.3).embeddings
    np.testing.assert_allclose(mix[i2v_ids], unit(0.3 * content[i2v_ids] + 0.7 * unit(i2v)), atol=1e-5)


def test_missing_collab_uses_content_renormalised(parts):
    res = fuse_embeddings(N, *parts, alpha=0.5).embeddings
    content = fuse_embeddings(N, *parts, alpha=1.0).embeddings
    np.testing.assert_allclose(res[250:], content[250:], atol=1e-6)


def test_missing_content_uses_collab(parts):
    clip_ids, clip, i2v_ids, i2v = parts
    res = fuse_embeddings(N, clip_ids[10:], clip[10:], i2v_ids, i2v)
    assert res.counts["collab_only"] == 10
    np.testing.assert_allclose(res.embeddings[1:11], unit(i2v[:10]), atol=1e-6)


def test_pca_ignores_padding_and_zero_rows(parts):
    clip_ids, clip, i2v_ids, i2v = parts
    keep = clip_ids != 4
    base = fuse_embeddings(N, clip_ids[keep], clip[keep], i2v_ids, i2v)
    # a garbage padding row and an explicit zero row for item 4 are the same as leaving them out
    ids = np.concatenate([[0], clip_ids])
    emb = np.vstack([np.full((1, 512), 1e3, np.float32), clip])
    emb[4] = 0.0  # item 4 (row 0 is padding): no content
    res = fuse_embeddings(N, ids, emb, i2v_ids, i2v)
    assert res.counts == base.counts and res.counts["collab_only"] == 1
    np.testing.assert_allclose(res.embeddings, base.embeddings, atol=1e-5)
    np.testing.assert_allclose(res.explained_variance_ratio, base.explained_variance_ratio, rtol=1e-5)
    np.testing.assert_allclose(res.embeddings[4], unit(i2v[3]), atol=1e-6)
    assert not res.embeddings[0].any()


def test_items_with_neither_part(parts):
    clip_ids, clip, i2v_ids, i2v = parts
    with pytest.raises(ValueError, match=r"2 items have neither .* \[299, 300\].*clip_embeddings shard"):
        fuse_embeddings(N, clip_ids[:-2], clip[:-2], i2v_ids, i2v)
    res = fuse_embeddings(N, clip_ids[:-2], clip[:-2], i2v_ids, i2v, on_missing="zero")
    assert res.counts["none"] == 2 and not res.embeddings[-2:].any()
    assert any("not unit norm" in p and "[299, 300]" in p for p in validate_item_embeddings(res.embeddings))


def test_few_items_pad_pca_to_dim():
    rng = np.random.default_rng(1)
    res = fuse_embeddings(20, np.arange(1, 21), rng.normal(size=(20, 512)),
                          np.arange(1, 21), rng.normal(size=(20, 128)))
    assert res.pca_components == 20 and res.embeddings.shape == (21, 128)
    np.testing.assert_allclose(np.linalg.norm(res.embeddings[1:], axis=1), 1.0, atol=1e-5)


def test_input_errors(parts):
    clip_ids, clip, i2v_ids, i2v = parts
    with pytest.raises(ValueError, match=r"outside 0..300"):
        fuse_embeddings(N, clip_ids + 1, clip, i2v_ids, i2v)
    with pytest.raises(ValueError, match="repeated"):
        fuse_embeddings(N, np.r_[clip_ids[:-1], 1], clip, i2v_ids, i2v)
    with pytest.raises(ValueError, match="alpha"):
        fuse_embeddings(N, *parts, alpha=1.5)
    with pytest.raises(ValueError, match="64-d but the fused embedding is 128-d"):
        fuse_embeddings(N, clip_ids, clip, i2v_ids, i2v[:, :64])
    bad = clip.copy()
    bad[3, 0] = np.nan
    with pytest.raises(ValueError, match=r"NaN/inf.*\[4\]"):
        fuse_embeddings(N, clip_ids, bad, i2v_ids, i2v)


@pytest.mark.parametrize(
    "emb_type",
    [pa.list_(pa.float32()), pa.large_list(pa.float32()), pa.list_(pa.float64()),
     pa.list_(pa.field("item", pa.float32(), nullable=False)), pa.list_(pa.float32(), 128)],
    ids=["list_f32", "large_list_f32", "list_f64", "list_f32_notnull", "fixed_f32"],
)
def test_item_info_updated_keeps_schema(parts, tmp_path, emb_type):
    n = 30
    src = pa.table(
        {
            "item_id": pa.array(np.arange(n + 1), pa.int64()),
            "item_tags": pa.array([[0, 0, 0, 1, 2]] * (n + 1), pa.list_(pa.int64())),
            "item_emb_d128": pa.array(np.ones((n + 1, 128)).tolist(), emb_type),
        }
    ).replace_schema_metadata({b"origin": b"organisers"})
    pq.write_table(src, tmp_path / "item_info.parquet")
    rng = np.random.default_rng(2)
    emb = unit(rng.normal(size=(n + 1, 128))).astype(np.float32)
    emb[0] = 0
    out = write_item_info_updated(tmp_path / "item_info.parquet", emb, tmp_path / "out" / "item_info_updated.parquet")
    assert pq.read_schema(out).equals(pq.read_schema(tmp_path / "item_info.parquet"), check_metadata=True)
    got = pq.read_table(out)
    np.testing.assert_allclose(np.array(got["item_emb_d128"].to_pylist()), emb, atol=1e-7)
    assert got["item_tags"].equals(src["item_tags"])
    assert validate_item_embeddings(pl.read_parquet(out), n_items=n, column="item_emb_d128") == []
    assert [p.name for p in out.parent.iterdir()] == ["item_info_updated.parquet"]


def test_item_info_updated_refuses_bad_embeddings(tmp_path):
    info = pl.DataFrame({"item_id": [0, 1, 2], "item_emb_d128": [[0.0] * 128] * 3})
    info.write_parquet(tmp_path / "info.parquet")
    with pytest.raises(ValueError, match=r"shape \(3, 64\).*\(3, 128\)"):
        write_item_info_updated(tmp_path / "info.parquet", np.zeros((3, 64)), tmp_path / "o.parquet")
    with pytest.raises(ValueError, match="row 0"):
        write_item_info_updated(tmp_path / "info.parquet", np.ones((3, 128)), tmp_path / "o.parquet")
    info.reverse().write_parquet(tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="row index"):
        write_item_info_updated(tmp_path / "bad.parquet", np.zeros((3, 128)), tmp_path / "o.parquet")
    assert not (tmp_path / "o.parquet").exists()


def test_validate_finds_each_problem():
    rng = np.random.default_rng(3)
    good = unit(rng.normal(size=(6, 128))).astype(np.float32)
    good[0] = 0
    frame = pl.DataFrame({"item_id": np.arange(6), "emb": good})
    assert validate_item_embeddings(frame) == []

    def problems(f, **kw):
        return " | ".join(validate_item_embeddings(f, **kw))

    assert "64-d, expected 128" in problems(good[:, :64])
    assert "not unit norm" in problems(good * 2)
    nan = good.copy()
    nan[2, 5] = np.inf
    assert "NaN/inf, e.g. items [2]" in problems(nan)
    pad = good.copy()
    pad[0, 0] = 1
    assert "item 0 (padding)" in problems(pad)
    assert "row index != item_id" in problems(frame.reverse())
    assert "repeated: [3]" in problems(pl.concat([frame, frame[3]]))
    assert "have no row, e.g. [6, 7]" in problems(frame, n_items=7)
    assert "7 rows but item_info has 6" in problems(np.vstack([good, good[1:2]]), n_items=5)
    ragged = pl.DataFrame({"item_id": [0, 1], "e": [[0.0] * 128, [1.0] * 127]})
    assert "different lengths" in problems(ragged)


def test_projection_plot_is_png():
    rng = np.random.default_rng(4)
    topic = rng.integers(0, 14, 600)
    emb = rng.normal(size=(14, 128))[topic] + 0.2 * rng.normal(size=(600, 128))
    emb[0] = 0
    png = plot_embedding_projection(emb, topic, "fused", max_points=400)
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size == (700, 550)
    with pytest.raises(ValueError, match="one label per row"):
        plot_embedding_projection(emb, topic[:5], "x")
    with pytest.raises(ValueError, match="at least 2 non-zero"):
        plot_embedding_projection(np.zeros((5, 4)), np.arange(5), "x")
