import json
import math

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPProcessor

from mmctr_assets.lib.embeddings import clip, tiny_clip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tiny_clip.build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny", seed=3)


def test_round_trips_through_from_pretrained(clip_dir):
    model = CLIPModel.from_pretrained(clip_dir, local_files_only=True)
    processor = CLIPProcessor.from_pretrained(clip_dir, local_files_only=True)
    assert model.config.projection_dim == 512
    assert processor.image_processor.crop_size == {"height": 32, "width": 32}

    # the saved weights are the ones a fresh build with the same seed makes
    torch.manual_seed(3)
    fresh = CLIPModel(model.config)
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name


def test_marker_says_random_weights(clip_dir):
    assert clip.is_random_weights(clip_dir)
    info = json.loads((clip_dir / clip.RANDOM_WEIGHTS_MARKER).read_text().splitlines()[0])
    assert info == {"random_weights": True, "seed": 3, "full_size": False}


def test_tokenizer_handles_arbitrary_text(clip_dir):
    tok = CLIPProcessor.from_pretrained(clip_dir).tokenizer
    texts = ["My cat's first #beach trip!! #cute #fyp tag_17", "Ünïcödé 🎉 中文 标题 $%^&*", "", "word " * 300]
    enc = tok(texts, padding=True, truncation=True, max_length=77)
    for ids, mask in zip(enc["input_ids"], enc["attention_mask"]):
        real = [i for i, m in zip(ids, mask) if m]
        assert real[0] == tok.bos_token_id and real[-1] == tok.eos_token_id
        # the unknown token is <|endoftext|>: it must occur only as the final EOS
        assert real.count(tok.eos_token_id) == 1
        assert len(ids) <= 77
    # common words are single tokens, like in real CLIP
    assert tok.tokenize("funny cat video") == ["funny</w>", "cat</w>", "video</w>"]
    # the model pools on EOS: its id in the config must be the tokenizer's
    config = CLIPModel.from_pretrained(clip_dir).config.text_config
    assert config.eos_token_id == tok.eos_token_id != 2
    assert config.vocab_size >= len(tok)


def test_text_and_image_features_are_512d(clip_dir):
    from PIL import Image

    model = CLIPModel.from_pretrained(clip_dir).eval()
    processor = CLIPProcessor.from_pretrained(clip_dir)
    image = Image.new("RGB", (50, 40), (200, 30, 10))
    inputs = processor(text=["a red picture"], images=[image], return_tensors="pt", padding=True)
    with torch.inference_mode():
        img = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        txt = model.get_text_features(input_ids=inputs["input_ids"],
                                      attention_mask=inputs["attention_mask"]).pooler_output
    assert img.shape == txt.shape == (1, 512)
    assert torch.isfinite(img).all() and torch.isfinite(txt).all()


def test_full_size_config_has_vit_b32_shapes():
    config = tiny_clip._config(tiny_clip.build_tokenizer(), full_size=True)
    ref = CLIPConfig()
    for part in ("vision_config", "text_config"):
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            assert getattr(getattr(config, part), key) == getattr(getattr(ref, part), key)
    assert (config.vision_config.image_size, config.vision_config.patch_size) == (224, 32)
    assert config.projection_dim == 512


def test_cli_replaces_directory_atomically(tmp_path, capsys):
    out = tmp_path / "enc"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert tiny_clip.main([str(out), "--seed", "1"]) == 0
    assert not (out / "stale.txt").exists()
    assert (out / "config.json").is_file() and (out / clip.RANDOM_WEIGHTS_MARKER).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["enc"]  # no temp dirs left behind
    assert "MMCTR_CLIP_MODEL=" in capsys.readouterr().out


def _topic_pair_auc(model_dir, data_dir):
    """How well cosine similarity of mean(image, text) embeddings tells same-topic item pairs."""
    import numpy as np
    import polars as pl

    from mmctr_assets.lib.embeddings.clip import item_texts, load_image
    from mmctr_assets.lib.metrics import auc

    model, processor = CLIPModel.from_pretrained(model_dir).eval(), CLIPProcessor.from_pretrained(model_dir)
    items = pl.read_parquet(data_dir / "item_feature.parquet").rename({"item_title": "title", "item_tags": "tags"})
    items = items.join(pl.read_parquet(data_dir / "ground_truth" / "items.parquet"), on="item_id")
    loaded = [load_image(str(data_dir / "item_images" / f"{i}.jpg"), 0) for i in items["item_id"]]
    keep = [status == "ok" for _, status in loaded]
    items = items.filter(pl.Series(keep)).head(200)
    images = [image for image, status in loaded if status == "ok"][:200]
    with torch.no_grad():
        img = model.get_image_features(**processor.image_processor(images=images, return_tensors="pt")).pooler_output
        tok = processor.tokenizer(item_texts(items).to_list(), padding=True, truncation=True, max_length=77,
                                  return_tensors="pt")
        txt = model.get_text_features(**tok).pooler_output
    emb = torch.nn.functional.normalize(torch.nn.functional.normalize(img, dim=-1)
                                        + torch.nn.functional.normalize(txt, dim=-1), dim=-1).numpy()
    topic = items["topic"].to_numpy()
    a, b = np.triu_indices(len(emb), k=1)
    return auc((topic[a] == topic[b]).astype(float), (emb[a] * emb[b]).sum(1))


def test_fit_on_demo_data_makes_content_embeddings_carry_topics(tiny_data, tmp_path, capsys):
    out = tmp_path / "fitted"
    assert tiny_clip.main([str(out), "--seed", "0", "--fit-on", str(tiny_data), "--fit-epochs", "8"]) == 0
    assert "fitted on" in capsys.readouterr().out
    assert not clip.is_random_weights(out) and (out / clip.DEMO_FITTED_MARKER).is_file()
    info = json.loads((out / clip.DEMO_FITTED_MARKER).read_text().splitlines()[0])
    assert info["demo_fitted"] and info["pairs"] > 250 and info["epochs"] == 8
    random_dir = tiny_clip.build_tiny_clip(tmp_path / "random", seed=0)
    before, after = _topic_pair_auc(random_dir, tiny_data), _topic_pair_auc(out, tiny_data)
    assert after > before + 0.1 and after > 0.85, (before, after)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left


def test_fit_on_demo_data_errors(clip_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="item_feature.parquet"):
        tiny_clip.fit_on_demo_data(clip_dir, tmp_path)
    with pytest.raises(SystemExit):
        tiny_clip.main([str(tmp_path / "x"), "--full-size", "--fit-on", str(tmp_path)])
    assert clip.is_random_weights(clip_dir)  # a failed fit leaves the model as it was


def test_fit_streams_covers_and_caps_the_items(tiny_data, tmp_path, monkeypatch, capsys):
    """Issue 9, part 8: decoded covers alive at once stay within one batch (memory does not grow
    with the item count), the sample cap holds, and a progress bar shows the steps."""
    import weakref

    live, peak, decoded = [0], [0], []
    real_load = tiny_clip.load_image

    def counting_load(path, draft):
        image, status = real_load(path, draft)
        if image is not None:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
            weakref.finalize(image, lambda: live.__setitem__(0, live[0] - 1))
            decoded.append(path)
        return image, status

    monkeypatch.setattr(tiny_clip, "load_image", counting_load)
    model_dir = tiny_clip.build_tiny_clip(tmp_path / "clip", seed=0)
    info = tiny_clip.fit_on_demo_data(model_dir, tiny_data, epochs=2, batch_size=16, max_items=64)
    assert info["items_available"] == 300 and info["items_sampled"] == 64 and info["max_items"] == 64
    assert 50 <= info["pairs"] <= 64 and info["steps"] == 2 * 4
    assert len(set(decoded)) <= 64 and len(decoded) <= 2 * 64  # only the sample, once per epoch
    assert 0 < peak[0] <= 16, peak[0]  # one batch of decoded covers at a time
    assert "fitting tiny CLIP on 64 items" in capsys.readouterr().err
    # full size (91,717 items) under the default cap: about FIT_MIN_STEPS steps, as on small data
    n = min(91_717, tiny_clip.FIT_MAX_ITEMS)
    steps = tiny_clip.default_epochs(n) * math.ceil(n / 256)
    assert tiny_clip.FIT_MIN_STEPS <= steps <= 1.1 * tiny_clip.FIT_MIN_STEPS
