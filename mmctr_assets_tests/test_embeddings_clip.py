import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from mmctr_assets.lib.embeddings import clip as ce
from mmctr_assets.lib.embeddings.tiny_clip import build_tiny_clip

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    path = build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny", seed=0)
    return ce.load_clip(str(path), CPU, "fp32")


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    """Item 0 (padding), 6 good covers (JPEG + PNG), one missing, one corrupt, one truncated."""
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(1, 7):
        ext = "png" if i == 6 else "jpg"
        Image.fromarray(rng.integers(0, 255, (90 + 10 * i, 70, 3), dtype=np.uint8)).save(d / f"{i}.{ext}")
    (d / "8.jpg").write_bytes(b"this is not an image")
    full = (d / "1.jpg").read_bytes()
    (d / "9.jpg").write_bytes(full[: len(full) // 2])
    paths = [str(d / "0.jpg")] + [str(d / f"{i}.jpg") for i in range(1, 6)] + [str(d / "6.png")]
    paths += [str(d / "7.jpg"), str(d / "8.jpg"), str(d / "9.jpg")]
    return pl.DataFrame(
        {
            "item_id": list(range(10)),
            "title": [None, "funny cat video", None, "sunset at the beach #travel", "x", "cooking", "dance",
                      "same text", "same text", "a " * 400],
            "tags": [[0, 0, 0], [0, 3, 4], [5], [], None, [0], [1, 2, 3, 4, 5, 6], [9], [9], [0, 0, 1]],
            "image_path": paths,
        }
    )


def test_shapes_padding_and_text_only_fallback(bundle, items):
    res = ce.encode_items(items, bundle, batch_size=4, num_workers=0)
    assert res.item_ids.dtype == np.int64 and res.item_ids.tolist() == list(range(10))
    assert res.embeddings.dtype == np.float32 and res.embeddings.shape == (10, 512)
    assert not res.embeddings[0].any()  # padding item: zero vector
    np.testing.assert_allclose(np.linalg.norm(res.embeddings[1:], axis=1), 1.0, atol=1e-5)
    assert res.text_only_ids.tolist() == [7, 8, 9]
    assert res.missing_image_ids.tolist() == [7]
    assert res.corrupt_image_ids.tolist() == [8, 9]
    # 7 and 8 share their text and both lack a usable image: same embedding
    np.testing.assert_allclose(res.embeddings[7], res.embeddings[8], atol=1e-6)
    assert res.seconds > 0


def test_texts_never_contain_padding_tags(items):
    texts = ce.item_texts(items).to_list()
    assert texts[0] == ""
    assert texts[1] == "funny cat video tag_3 tag_4"
    assert texts[2] == "tag_5"
    assert texts[4] == "x" and texts[5] == "cooking"
    assert all("tag_0" not in t for t in texts)


def test_mean_is_normalised_sum_of_image_and_text(bundle, items):
    img = ce.encode_items(items, bundle, num_workers=0, combine="image").embeddings
    txt = ce.encode_items(items, bundle, num_workers=0, combine="text").embeddings
    mean = ce.encode_items(items, bundle, num_workers=0, combine="mean").embeddings
    expected = img[1:7] + txt[1:7]
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(mean[1:7], expected, atol=1e-5)
    # without a usable image every mode is text only
    np.testing.assert_allclose(img[7:], txt[7:], atol=1e-6)
    assert not np.allclose(img[1:7], txt[1:7], atol=1e-3)


def test_combine_text_reports_every_item_text_only(bundle, items):
    res = ce.encode_items(items, bundle, num_workers=0, combine="text")
    assert res.text_only_ids.tolist() == list(range(1, 10))


def test_workers_and_batch_size_do_not_change_embeddings(bundle, items):
    a = ce.encode_items(items, bundle, batch_size=3, num_workers=0).embeddings
    b = ce.encode_items(items, bundle, batch_size=3, num_workers=2).embeddings
    c = ce.encode_items(items, bundle, batch_size=64, num_workers=2).embeddings
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(a, c, atol=1e-5)


def test_progress_reports_every_batch(bundle, items):
    calls = []
    ce.encode_items(items, bundle, batch_size=4, num_workers=0, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(4, 9), (8, 9), (9, 9)]


def test_empty_and_padding_only_frames(bundle, items):
    res = ce.encode_items(items.head(1), bundle, num_workers=0)
    assert res.embeddings.shape == (1, 512) and not res.embeddings.any()
    assert len(ce.encode_items(items.head(0), bundle, num_workers=0).item_ids) == 0


def test_bad_items_raise_clear_errors(bundle, items):
    with pytest.raises(ValueError, match=r"missing \['image_path'\]"):
        ce.encode_items(items.drop("image_path"), bundle)
    with pytest.raises(ValueError, match=r"duplicated ids include \[3\]"):
        ce.encode_items(pl.concat([items, items.filter(pl.col("item_id") == 3)]), bundle)
    with pytest.raises(ValueError, match="combine"):
        ce.encode_items(items, bundle, combine="concat")


def test_frame_round_trip(bundle, items, tmp_path):
    res = ce.encode_items(items, bundle, num_workers=0)
    frame = ce.to_frame(res)
    assert frame.schema == pl.Schema(
        {"item_id": pl.Int64, "clip_emb": pl.Array(pl.Float32, 512), "text_only": pl.Boolean}
    )
    frame.write_parquet(tmp_path / "shard.parquet")
    back = ce.from_frame(pl.read_parquet(tmp_path / "shard.parquet"))
    np.testing.assert_array_equal(back.embeddings, res.embeddings)
    np.testing.assert_array_equal(back.item_ids, res.item_ids)
    np.testing.assert_array_equal(back.text_only_ids, res.text_only_ids)
    as_list = frame.with_columns(pl.col("clip_emb").arr.to_list())
    np.testing.assert_array_equal(ce.from_frame(as_list).embeddings, res.embeddings)


def test_bundle_facts(bundle):
    assert bundle.random_weights and bundle.dim == 512 and bundle.max_text_tokens == 77
    assert not bundle.model.training


def test_bf16_autocast_close_to_fp32(bundle, items):
    bf16 = ce.ClipBundle(bundle.model, bundle.processor, CPU, "bf16", True, bundle.model_ref)
    a = ce.encode_items(items, bundle, num_workers=0).embeddings[1:]
    b = ce.encode_items(items, bf16, num_workers=0).embeddings[1:]
    assert (np.sum(a * b, axis=1) > 0.99).all()


def test_precision_errors(bundle):
    with pytest.raises(ValueError, match="'fp16' needs a CUDA device"):
        ce.load_clip("/nonexistent", CPU, "fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        ce.autocast(CPU, "int8")


def test_missing_local_dir_raises_helpful_error(tmp_path):
    missing = tmp_path / "no_such_clip"
    with pytest.raises(ce.ClipLoadError) as err:
        ce.load_clip(str(missing), CPU, "fp32")
    msg = str(err.value)
    assert str(missing) in msg and "does not exist" in msg
    assert "MMCTR_CLIP_MODEL" in msg and "mmctr-tiny-clip DIR" in msg


def test_incomplete_local_dir_raises_helpful_error(tmp_path):
    (tmp_path / "notes.txt").write_text("no model here")
    with pytest.raises(ce.ClipLoadError, match=r"it exists; contents: \['notes.txt'\].*MMCTR_CLIP_MODEL"):
        ce.load_clip(str(tmp_path), CPU, "fp32")


def test_hub_id_offline_fails_fast_with_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(ce.ClipLoadError) as err:
        ce.load_clip("openai/clip-vit-base-patch32", CPU, "fp32")
    msg = str(err.value)
    assert "'openai/clip-vit-base-patch32'" in msg and "hub id" in msg
    assert "local Hugging Face cache" in msg and "HF_HUB_OFFLINE is set" in msg
    assert "hf download openai/clip-vit-base-patch32 --local-dir" in msg


# ----------------------------------------------------------------------------- the fast image path

def _processor_pixels(bundle, images):
    return bundle.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]


def test_fast_image_path_matches_the_processor(bundle):
    """Per-image PIL resize/crop + one batched normalise == CLIPImageProcessor, on the same image."""
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in
              [(96, 96), (90, 70), (70, 130), (33, 32), (300, 200)]]
    spec = ce.ImageSpec.from_processor(bundle.processor.image_processor)
    assert spec is not None and spec.out_hw == (32, 32)
    fast = spec.normalise(torch.from_numpy(np.stack([spec.prepare_pil(im) for im in images])))
    np.testing.assert_allclose(fast.numpy(), _processor_pixels(bundle, images).numpy(), atol=1e-5)


def test_tensor_resize_for_device_decoding_is_close_to_the_processor(bundle):
    """The on-device resize (antialiased bicubic in torch) stays within a few grey levels of PIL's."""
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[0:120, 0:90]
    smooth = np.stack([xx * 2, yy * 2, (xx + yy)], -1) % 256 + rng.integers(0, 8, (120, 90, 3))
    image = Image.fromarray(smooth.astype(np.uint8))
    spec = ce.ImageSpec.from_processor(bundle.processor.image_processor)
    chw = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    on_device = spec.normalise(spec.prepare_tensor(chw)[None])
    diff = (on_device - _processor_pixels(bundle, [image])).abs()
    assert diff.mean() < 0.03 and diff.max() < 0.3  # normalised units; 1 grey level ~ 0.015


def test_draft_decoding_keeps_embeddings(bundle, tmp_path):
    """JPEGs decoded at reduced size (DCT scaling) embed like full-size decodes through the processor."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:256, 0:192].astype(np.float32)
    paths = []
    for i in range(4):
        img = 127 + 100 * np.sin(xx[..., None] / rng.uniform(8, 30) + yy[..., None] / rng.uniform(8, 30) + i)
        img = np.clip(img + rng.normal(0, 5, img.shape), 0, 255).astype(np.uint8).repeat(3, -1)
        Image.fromarray(img).save(tmp_path / f"{i + 1}.jpg", quality=90)
        paths.append(str(tmp_path / f"{i + 1}.jpg"))
    items = pl.DataFrame({"item_id": [1, 2, 3, 4], "title": ["a"] * 4, "tags": [[1]] * 4, "image_path": paths})
    fast = ce.encode_items(items, bundle, num_workers=2, combine="image").embeddings
    with torch.inference_mode():
        pixels = _processor_pixels(bundle, [Image.open(p).convert("RGB") for p in paths])
        ref = torch.nn.functional.normalize(bundle.model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    assert (np.sum(fast * ref.numpy(), axis=1) > 0.995).all()


def test_one_pipeline_serves_many_calls(bundle, items):
    """The threads of one ImagePipeline persist across calls (the shards of a run) and give the same vectors."""
    alone = ce.encode_items(items, bundle, batch_size=4, num_workers=0).embeddings
    with ce.ImagePipeline(2) as pipe:
        threads = set()
        for _ in range(2):
            again = ce.encode_items(items, bundle, batch_size=4, pipeline=pipe).embeddings
            np.testing.assert_allclose(again, alone, atol=1e-6)
            threads.add(id(pipe._pool))
        assert len(threads) == 1


def _pil_decoder(datas, device):
    """Stand-in for torchvision's decode_jpeg (same contract: bytes tensors -> uint8 [3, H, W], raises on a bad
    file)."""
    import io

    out = []
    for d in datas:
        with Image.open(io.BytesIO(d.numpy().tobytes())) as im:
            out.append(torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).to(device))
    return out


def test_device_decode_path_matches_cpu_path(bundle, items, monkeypatch):
    """decode_on='device' (JPEG bytes decoded by the device decoder, resized as tensors): corrupt and
    truncated JPEGs and PNGs still fall back correctly, embeddings close to the CPU path."""
    monkeypatch.setattr(ce, "device_jpeg_decoder", lambda: _pil_decoder)
    for combine in ("image", "mean"):
        cpu = ce.encode_items(items, bundle, batch_size=4, num_workers=2, combine=combine)
        dev = ce.encode_items(items, bundle, batch_size=4, num_workers=2, combine=combine, decode_on="device")
        assert dev.text_only_ids.tolist() == cpu.text_only_ids.tolist() == [7, 8, 9]
        assert dev.corrupt_image_ids.tolist() == [8, 9]
        assert (np.sum(dev.embeddings[1:] * cpu.embeddings[1:], axis=1) > 0.99).all()
    monkeypatch.setattr(ce, "device_jpeg_decoder", lambda: None)
    with pytest.raises(ValueError, match="needs torchvision"):
        ce.encode_items(items, bundle, decode_on="device")
