"""Is the CLIP encode path as fast as the bare model? (decode + preprocessing hidden behind it)

Full-size random-weight ViT-B/32 (``CLIPConfig()`` shapes, so the same compute as the real
model), CPU, one process. Baselines: ``get_image_features`` (and ``get_text_features``) on
tensors prepared in advance, same batch size. Candidates: ``encode_items`` over real JPEG files
on disk with combine="image" and "mean", for several DataLoader worker counts. Each result is
one JSON line; ``ratio_vs_bare_*`` is items/s relative to the matching bare forward (goal >=
0.85): best-of-rounds on both sides, and the median of per-round pairs. The modes run
interleaved so a busy (shared) machine slows them alike; ``cpu_ms_per_item`` counts the
DataLoader workers too, so it shows what decoding costs even when wall time hides it.

    .venv/bin/python benchmarks/bench_clip.py [--items 192] [--batch-size 64] [--image-size 720x1280]
        [--workers 0,2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmctr_assets.lib.embeddings import clip as ce  # noqa: E402
from mmctr_assets.lib.embeddings.tiny_clip import build_tiny_clip  # noqa: E402

WORDS = ("funny cat video sunset beach travel cooking recipe dance challenge music cover cute dog "
         "morning routine workout tips makeup tutorial gaming highlights street food city night").split()


def make_items(folder: Path, n: int, height: int, width: int, seed: int) -> pl.DataFrame:
    """JPEG covers with smooth gradients, shapes and noise (realistic decode cost), and titles."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(1, n + 1):
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        t = (xx / width * rng.uniform(0.2, 1) + yy / height * rng.uniform(0.2, 1))[..., None] / 2
        img = c0 * (1 - t) + c1 * t + rng.normal(0, 12, (height, width, 3))
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(20, min(height, width) / 3)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)
    titles = [" ".join(rng.choice(WORDS, rng.integers(4, 14))) + " #fyp #viral" for _ in range(n)]
    tags = [rng.integers(1, 5000, rng.integers(1, 8)).tolist() for _ in range(n)]
    return pl.DataFrame({"item_id": np.arange(1, n + 1), "title": titles, "tags": tags,
                         "image_path": [str(folder / f"{i}.jpg") for i in range(1, n + 1)]})


def bare_batches(bundle: ce.ClipBundle, items: pl.DataFrame, batch_size: int, text: bool) -> list:
    """Pixel (and token) tensors prepared beforehand: the model's input with no I/O left."""
    proc = bundle.processor
    texts = ce.item_texts(items).to_list()
    paths = items["image_path"].to_list()
    batches = []
    for lo in range(0, len(paths), batch_size):
        images = [Image.open(p).convert("RGB") for p in paths[lo:lo + batch_size]]
        pixels = proc.image_processor(images=images, return_tensors="pt")["pixel_values"]
        tokens = proc.tokenizer(texts[lo:lo + batch_size], padding=True, truncation=True,
                                max_length=bundle.max_text_tokens, return_tensors="pt") if text else None
        batches.append((pixels, tokens))
    return batches


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the DataLoader workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), cpu_seconds()
    fn()
    return time.perf_counter() - wall, cpu_seconds() - cpu


def bare_forward(bundle: ce.ClipBundle, batches: list) -> None:
    with torch.inference_mode():
        for pixels, tokens in batches:
            bundle.model.get_image_features(pixel_values=pixels)
            if tokens is not None:
                bundle.model.get_text_features(**tokens)


def encode(bundle, items, batch_size, combine, workers) -> None:
    res = ce.encode_items(items, bundle, batch_size=batch_size, num_workers=workers, combine=combine)
    assert len(res.text_only_ids) == 0, "every benchmark image must decode"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", default="720x1280", help="HxW of the JPEG covers")
    parser.add_argument("--workers", default="0,2", help="DataLoader worker counts to try")
    parser.add_argument("--combine", default="image,mean")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved repeats; ratios are paired per round (robust to a busy machine)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    height, width = map(int, args.image_size.lower().split("x"))
    workers = [int(w) for w in args.workers.split(",")]
    common = {"bench": "clip_encode", "items": args.items, "batch_size": args.batch_size,
              "image_hw": [height, width], "torch_threads": torch.get_num_threads(),
              "cpus": os.cpu_count(), "rounds": args.rounds,
              "model": "CLIPConfig() ViT-B/32 shapes, random weights", "device": "cpu", "precision": "fp32"}

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = build_tiny_clip(tmp / "clip", seed=args.seed, full_size=True)
        (tmp / "img").mkdir()
        items = make_items(tmp / "img", args.items, height, width, args.seed)
        bundle = ce.load_clip(str(model_dir), torch.device("cpu"), "fp32")
        for combine in args.combine.split(","):
            text = combine != "image"
            batches = bare_batches(bundle, items, args.batch_size, text)
            bare_forward(bundle, batches[:1])  # warm-up
            encode(bundle, items.head(args.batch_size), args.batch_size, combine, 0)
            runs: dict = {"bare": lambda: bare_forward(bundle, batches)}
            runs |= {w: (lambda w=w: encode(bundle, items, args.batch_size, combine, w)) for w in workers}
            wall: dict = {k: [] for k in runs}
            cpu: dict = {k: [] for k in runs}
            for _ in range(args.rounds):  # interleaved, so load drift hits every mode alike
                for key, fn in runs.items():
                    w, c = timed(fn)
                    wall[key].append(w)
                    cpu[key].append(c)
            n = args.items
            for key in runs:
                rate = [n / t for t in wall[key]]
                row = {"mode": f"bare_forward_{'image+text' if text else 'image'}" if key == "bare"
                       else f"encode_items_{combine}",
                       "items_per_s": round(max(rate), 2),
                       "rounds_items_per_s": [round(r, 2) for r in rate],
                       "cpu_ms_per_item": round(1e3 * min(cpu[key]) / n, 1)}
                if key != "bare":
                    paired = float(np.median([b / t for t, b in zip(wall[key], wall["bare"])]))
                    best = min(wall["bare"]) / min(wall[key])
                    row |= {"workers": key, "ratio_vs_bare_best": round(best, 3),
                            "ratio_vs_bare_paired_median": round(paired, 3),
                            "cpu_ratio_vs_bare": round(min(cpu["bare"]) / min(cpu[key]), 3),
                            "goal": 0.85, "meets_goal_best": best >= 0.85}
                print(json.dumps(common | row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
