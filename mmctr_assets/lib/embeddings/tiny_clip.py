"""Build a randomly initialised CLIP (model, tokenizer, image processor) that loads offline.

Real CLIP weights cannot be downloaded here, yet the encoder path must be exercised for real:
``CLIPModel.from_pretrained(dir)`` / ``CLIPProcessor.from_pretrained(dir)`` load what this writes.
The small variant keeps tests fast; ``full_size=True`` has ViT-B/32's exact compute (benchmarks).
Its embeddings carry no meaning: callers check :data:`RANDOM_WEIGHTS_MARKER` and say so.

:func:`fit_on_demo_data` trains the small one with CLIP's own contrastive loss on a demo dataset's
cover/title pairs (a capped sample of items, covers decoded per batch: about a minute on 2 cores at
any data size, with a progress bar), so demos and quality benchmarks get content embeddings that,
like real CLIP's on real covers, carry the items' topics. Such a model is marked
:data:`DEMO_FITTED_MARKER`: it means something on that demo data only.

CLI: ``python -m mmctr_assets.lib.embeddings.tiny_clip OUT_DIR [--full-size] [--seed N] [--fit-on DATA_DIR]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

from mmctr_assets.lib.data.microlens import IMAGES_DIR, table_path
from mmctr_assets.lib.embeddings.clip import DEMO_FITTED_MARKER, RANDOM_WEIGHTS_MARKER, load_image
from mmctr_assets.lib.io import atomic_path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# Training text for the BPE merges: everyday English and hashtag-style titles, so common words
# become single tokens like in real CLIP; anything else still tokenises through byte fallback.
_BPE_TEXT = """
the a an and or of to in on at for with from by is are was were be been it this that these those
you your my our his her their we they he she i me us them what how why when where who which not no
yes all any some more most new best good great first last one two three day days night time year
life love family friend friends home house city world people man woman boy girl baby kid kids
cat cats dog dogs pet pets animal food cooking recipe eat eating delicious cake coffee tea dinner
travel trip beach sea mountain nature sunset car cars music song songs dance dancing video videos
funny cute happy sad beautiful amazing cool wow lol omg challenge tutorial tips diy makeup fashion
style beauty hair game games gaming sport sports football basketball fitness workout health art
drawing painting photo photography movie film show story vlog daily routine school study work
#funny #cute #food #travel #music #dance #fyp #foryou #viral #trending #love #pets #cat #dog
#comedy #beauty #fashion #gaming #sports #diy #art #vlog #life #family #baby #nature #tutorial
tag_1 tag_2 tag_3 tag_4 tag_5 tag_6 tag_7 tag_8 tag_9 tag_10 tag_11 tag_12 tag_13 tag_20 tag_42
"""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable-char table (byte-level BPE's alphabet, in CLIP's vocab order)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_tokenizer(vocab_size: int = 2000):
    """A real ``CLIPTokenizer`` with CLIP's vocab layout: 256 bytes, 256 ``byte</w>``, merges, specials.

    Every byte is in the vocab, so any text (emoji, hashtags, CJK) tokenises without unknowns.
    """
    from tokenizers import Tokenizer, models, trainers
    from transformers import CLIPTokenizer

    template = CLIPTokenizer()  # CLIP's normaliser and pre-tokeniser, empty vocab
    trainer_tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token=EOS))
    trainer_tok.normalizer = template.backend_tokenizer.normalizer
    trainer_tok.pre_tokenizer = template.backend_tokenizer.pre_tokenizer
    alphabet = list(_bytes_to_unicode().values())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    trainer_tok.train_from_iterator([_BPE_TEXT] * 4, trainer)
    merges = [tuple(m) for m in json.loads(trainer_tok.to_str())["model"]["merges"]]

    vocab: dict[str, int] = {}
    for token in alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + [BOS, EOS]:
        vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges)


def _config(tokenizer, full_size: bool):
    from transformers import CLIPConfig

    ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if full_size:  # ViT-B/32 shapes; the token ids must match this tokenizer for EOS pooling
        return CLIPConfig(text_config=ids)
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        **ids,
    )
    vision = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=512)


def build_tiny_clip(out_dir: str | os.PathLike, *, seed: int = 0, full_size: bool = False) -> Path:
    """Write a random-weight CLIP model + processor to ``out_dir`` (atomically) and return it.

    Embeddings are 512-d like ViT-B/32's. The directory holds :data:`RANDOM_WEIGHTS_MARKER`.
    """
    import torch
    from transformers import CLIPModel, CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = build_tokenizer()
    config = _config(tokenizer, full_size)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    side = config.vision_config.image_size
    # The PIL backend needs no torchvision; it saves as "CLIPImageProcessor" and loads either way.
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)

    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / RANDOM_WEIGHTS_MARKER).write_text(
            json.dumps({"random_weights": True, "seed": seed, "full_size": full_size}) + "\n"
            + "Randomly initialised CLIP built by mmctr_assets.lib.embeddings.tiny_clip: its embeddings carry"
            " no semantic meaning. Use real weights (MMCTR_CLIP_MODEL) for real results.\n"
        )
    return out_dir


FIT_MIN_STEPS = 300  # default epochs: at least 3 and enough for this many optimizer steps
# Default sample of items a fit sees. Time is set by the step count (FIT_MIN_STEPS steps of batch
# 256; timings: docs/results.md), not the item count, as long as 3 epochs of the sample fit in those steps;
# this many distinct items keep it there (full size, 91,717 items: 5 epochs of 64 batches).
FIT_MAX_ITEMS = 16_384


def default_epochs(n_items: int, batch_size: int = 256) -> int:
    """At least 3 epochs and enough of them for :data:`FIT_MIN_STEPS` optimizer steps."""
    return max(3, math.ceil(FIT_MIN_STEPS / max(1, math.ceil(n_items / batch_size))))


def _decode_batch(paths: list[str], texts: list[str], pool, draft: int) -> tuple[list, list[str]]:
    """Decode one batch of covers (threads: PIL releases the GIL while decoding); keep the pairs
    whose cover decodes. Only this batch's images are alive at a time."""
    loaded = list(pool.map(lambda p: load_image(p, draft), paths))
    keep = [i for i, (_, status) in enumerate(loaded) if status == "ok"]
    return [loaded[i][0] for i in keep], [texts[i] for i in keep]


def fit_on_demo_data(model_dir: str | os.PathLike, data_dir: str | os.PathLike, *, epochs: int | None = None,
                     batch_size: int = 256, lr: float = 1e-3, seed: int = 0,
                     max_items: int | None = FIT_MAX_ITEMS, progress: bool = True,
                     decode_threads: int = 2) -> dict:
    """Train the CLIP in ``model_dir`` in place (atomically) on ``data_dir``'s cover/title pairs.

    Text is what the encoder will embed (title + ``tag_<id>`` words); items without a decodable
    cover are skipped. At most ``max_items`` items (a seeded sample; None: all) take part, and
    covers are decoded batch by batch, so memory and time do not grow with the dataset (full size
    once held every cover at once; docs/results.md). ``epochs=None`` picks enough for
    :data:`FIT_MIN_STEPS` steps. A tqdm bar shows the steps. Returns what was done (items, pairs,
    epochs, final loss), also in the marker.
    """
    from concurrent.futures import ThreadPoolExecutor

    import polars as pl
    import torch
    from tqdm.auto import tqdm
    from transformers import CLIPModel, CLIPProcessor

    from mmctr_assets.lib.embeddings.clip import _input_side, item_texts

    model_dir, data_dir = Path(model_dir), Path(data_dir)
    feature_path = table_path(data_dir, "item_feature")
    if not feature_path.is_file():
        raise FileNotFoundError(f"fitting CLIP needs {feature_path} (titles and tags); "
                                "generate demo data with `mmctr-demo-data --out DIR`")
    if max_items is not None and max_items < 2:
        raise ValueError(f"max_items must be >= 2 (a contrastive batch needs negatives), got {max_items}")
    items = pl.read_parquet(feature_path, columns=["item_id", "item_title", "item_tags"]).rename(
        {"item_title": "title", "item_tags": "tags"})
    n_available = items.height
    image_dir = data_dir / IMAGES_DIR
    # cheap existence test (no decoding) so a dataset without covers fails before any training
    items = items.filter(pl.Series([(image_dir / f"{i}.jpg").is_file() for i in items["item_id"].to_list()],
                                   dtype=pl.Boolean))
    if max_items is not None and items.height > max_items:
        items = items.sample(max_items, seed=seed).sort("item_id")
    if items.height < 2:
        raise ValueError(f"{image_dir} has {items.height} cover files for the items in "
                         "item_feature.parquet; fitting needs at least 2 cover/title pairs")
    paths = [str(image_dir / f"{i}.jpg") for i in items["item_id"].to_list()]
    texts = item_texts(items).to_list()
    model = CLIPModel.from_pretrained(model_dir)
    processor = CLIPProcessor.from_pretrained(model_dir)
    draft = _input_side(processor.image_processor)
    max_tokens = model.config.text_config.max_position_embeddings
    batches = math.ceil(len(paths) / batch_size)
    if epochs is None:
        epochs = default_epochs(len(paths), batch_size)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    loss, pairs, steps = float("nan"), 0, 0
    bar = tqdm(total=epochs * batches, desc=f"fitting tiny CLIP on {len(paths):,} items", unit="step",
               disable=not progress, mininterval=2.0)
    with ThreadPoolExecutor(max_workers=max(1, decode_threads)) as pool, bar:
        for epoch in range(epochs):
            order = torch.randperm(len(paths), generator=generator).tolist()
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                images, batch_texts = _decode_batch([paths[r] for r in rows], [texts[r] for r in rows], pool, draft)
                bar.update(1)
                if epoch == 0:
                    pairs += len(images)
                if len(images) < 2:  # a contrastive batch needs negatives
                    continue
                pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
                del images
                tokens = processor.tokenizer(batch_texts, padding=True, truncation=True, max_length=max_tokens,
                                             return_tensors="pt")
                out = model(**tokens, pixel_values=pixels, return_loss=True)
                optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                optimizer.step()
                loss = out.loss.detach().item()
                steps += 1
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
    if pairs < 2:
        raise ValueError(f"{image_dir}: only {pairs} of the sampled covers decode; fitting needs at least "
                         "2 cover/title pairs")
    info = {"demo_fitted": True, "data_dir": str(data_dir), "items_available": n_available,
            "items_sampled": len(paths), "max_items": max_items, "pairs": pairs, "epochs": epochs,
            "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "final_loss": round(loss, 4)}
    with atomic_path(model_dir) as tmp:
        tmp.mkdir()
        model.eval().save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / DEMO_FITTED_MARKER).write_text(
            json.dumps(info) + "\nTiny CLIP fitted on the demo data above with CLIP's contrastive loss: its "
            "embeddings mean something for that data only. Use real weights (MMCTR_CLIP_MODEL) for real results.\n")
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mmctr_assets.lib.embeddings.tiny_clip",
        description="Build a randomly initialised CLIP (offline stand-in for openai/clip-vit-base-patch32).",
    )
    parser.add_argument("out_dir", type=Path, help="directory to write (replaced if it exists)")
    parser.add_argument("--full-size", action="store_true", help="ViT-B/32 shapes (slow, ~600 MB)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fit-on", type=Path, metavar="DATA_DIR",
                        help="then train it on this demo dataset's cover/title pairs (small model only)")
    parser.add_argument("--fit-epochs", type=int, default=None,
                        help=f"default: at least 3 and enough for {FIT_MIN_STEPS} optimizer steps")
    parser.add_argument("--fit-max-items", type=int, default=FIT_MAX_ITEMS,
                        help=f"fit on a seeded sample of at most this many items (default {FIT_MAX_ITEMS:,}; "
                        "0: all items). Time follows the step count, so the default fits full-size data "
                        "in about a minute on 2 cores")
    args = parser.parse_args(argv)
    if args.fit_on and args.full_size:
        parser.error("--fit-on trains the small model; drop --full-size")
    path = build_tiny_clip(args.out_dir, seed=args.seed, full_size=args.full_size)
    if args.fit_on:
        info = fit_on_demo_data(path, args.fit_on, epochs=args.fit_epochs, seed=args.seed,
                                max_items=args.fit_max_items or None)
        print(f"wrote a tiny CLIP fitted on {info['pairs']} cover/title pairs ({info['items_sampled']:,} of "
              f"{info['items_available']:,} items, {info['steps']} steps) of {args.fit_on} "
              f"(final loss {info['final_loss']}) to {path}; use it with MMCTR_CLIP_MODEL={path}")
        return 0
    print(f"wrote random-weight CLIP to {path}; use it with MMCTR_CLIP_MODEL={path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
