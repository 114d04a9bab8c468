"""CLIP item encoder: one 512-d content vector per item from its cover image and its text.

The input path is built to cost no more than the bare model (benchmarks/bench_clip.py): JPEGs
decode at reduced size (PIL draft: DCT scaling, never below the model input), each image is resized
and cropped by PIL on uint8 exactly as the processor would, and the batch is rescaled/normalised in
one tensor op on the model's device. Titles go through the fast (Rust) tokenizer. Threads of one
:class:`ImagePipeline` do all of that for the next batches while the model runs the current one,
and live as long as the run (every shard). On CUDA, ``decode_on="device"`` decodes JPEGs with
torchvision's nvJPEG decoder instead (benchmarks/gpu_check.py measures whether that is faster).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from mmctr_assets.lib.embeddings.clip_images import (  # noqa: F401 - re-exported: callers import them from here
    DECODE_ON,
    ImagePipeline,
    ImageSpec,
    available_cpus,
    device_jpeg_decoder,
    is_jpeg,
    load_image,
)
from mmctr_assets.lib.precision import autocast, check_precision

DEFAULT_MODEL = "openai/clip-vit-base-patch32"
COMBINES = ("mean", "image", "text")
REQUIRED_COLUMNS = ("item_id", "title", "tags", "image_path")
# Files a model folder may carry to say its weights are not real CLIP (written by tiny_clip).
RANDOM_WEIGHTS_MARKER = "MMCTR_RANDOM_WEIGHTS"
DEMO_FITTED_MARKER = "MMCTR_DEMO_FITTED"

_FIX_HINT = (
    "To fix: point MMCTR_CLIP_MODEL at a local copy of the weights (made on a machine with "
    "internet by `hf download openai/clip-vit-base-patch32 --local-dir DIR`; older huggingface_hub: "
    "`huggingface-cli download ...`), or "
    "build the random-weight demo encoder with `mmctr-tiny-clip DIR` and set "
    "MMCTR_CLIP_MODEL=DIR (its embeddings carry no meaning; fine for demos and tests)."
)


class ClipLoadError(RuntimeError):
    """The CLIP model could not be loaded; the message says what was tried and how to fix it."""


@dataclass(frozen=True)
class ClipBundle:
    model: torch.nn.Module  # transformers.CLIPModel, eval mode, on ``device``
    processor: object  # transformers.CLIPProcessor
    device: torch.device
    precision: str
    random_weights: bool
    model_ref: str

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def max_text_tokens(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)


@dataclass(frozen=True)
class ClipResult:
    item_ids: np.ndarray  # int64 [n], the input order
    embeddings: np.ndarray  # float32 [n, dim]; unit norm, except item 0 (padding) which is zero
    text_only_ids: np.ndarray  # int64: items embedded without an image (missing/corrupt, or combine="text")
    seconds: float
    missing_image_ids: np.ndarray | None = None  # int64: no path or no file
    corrupt_image_ids: np.ndarray | None = None  # int64: the file exists but does not decode


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else "").rstrip(".")[:300]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def load_clip(
    model_ref: str = DEFAULT_MODEL,
    device: torch.device = torch.device("cpu"),
    precision: str = "fp32",
) -> ClipBundle:
    """Load a CLIP model + processor from a local directory or a hub id (cache first, no hanging).

    A hub id is looked up in the local Hugging Face cache first; the network is tried only when
    that fails and ``HF_HUB_OFFLINE`` is not set.
    """
    from transformers import CLIPModel, CLIPProcessor

    device = torch.device(device)
    check_precision(precision, device)
    local = Path(model_ref).expanduser()
    looks_local = local.is_absolute() or model_ref.startswith((".", "~")) or local.exists()
    tried: list[str] = []

    def attempt(ref: str, local_only: bool):
        model = CLIPModel.from_pretrained(ref, local_files_only=local_only)
        processor = CLIPProcessor.from_pretrained(ref, local_files_only=local_only)
        return model, processor

    loaded = None
    if looks_local:
        if not local.is_dir():
            raise ClipLoadError(
                f"CLIP model {model_ref!r} looks like a local path but {local} "
                f"{'is not a directory' if local.exists() else 'does not exist'}. {_FIX_HINT}"
            )
        try:
            loaded = attempt(str(local), True)
        except Exception as exc:  # noqa: BLE001 - reported with what was tried
            raise ClipLoadError(
                f"Could not load CLIP from local directory {local} (it exists; contents: "
                f"{sorted(p.name for p in local.iterdir())[:12]}): {type(exc).__name__}: {_first_line(exc)}. "
                f"It must hold config.json, model weights and the processor files written by "
                f"save_pretrained. {_FIX_HINT}"
            ) from exc
    else:
        modes = [True] if _offline() else [True, False]
        for local_only in modes:
            try:
                loaded = attempt(model_ref, local_only)
                break
            except Exception as exc:  # noqa: BLE001
                where = "local Hugging Face cache" if local_only else "Hugging Face Hub (network)"
                tried.append(f"{where}: {type(exc).__name__}: {_first_line(exc)}")
        if loaded is None:
            skipped = " (network not tried: HF_HUB_OFFLINE is set)" if _offline() else ""
            raise ClipLoadError(
                f"Could not load CLIP model {model_ref!r}; no local directory of that name "
                f"exists, so it was treated as a hub id. Tried{skipped}: " + "; ".join(tried)
                + f". {_FIX_HINT}"
            )

    model, processor = loaded
    model = model.to(device).eval()
    random_weights = looks_local and is_random_weights(local)
    return ClipBundle(model, processor, device, precision, random_weights, model_ref)


def is_random_weights(model_dir: str | os.PathLike) -> bool:
    return (Path(model_dir) / RANDOM_WEIGHTS_MARKER).is_file()


def item_texts(items: pl.DataFrame) -> pl.Series:
    """Title followed by the item's tags as ``tag_<id>`` words; padding tag 0 never appears."""
    tags = (
        pl.col("tags")
        .list.eval(pl.concat_str(pl.lit("tag_"), pl.element().filter(pl.element() != 0).cast(pl.String)))
        .list.join(" ")
        .fill_null("")
    )
    text = pl.concat_str(pl.col("title").fill_null(""), tags, separator=" ").str.strip_chars()
    return items.select(text.alias("text")).to_series()


def _check_items(items: pl.DataFrame) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in items.columns]
    if missing:
        raise ValueError(
            f"encode_items needs columns {list(REQUIRED_COLUMNS)}; missing {missing} (got "
            f"{items.columns}). Build it from item_feature (item_title -> title, item_tags -> tags) "
            "and the image manifest (image_path; null when there is no image)."
        )
    ids = items["item_id"]
    if ids.null_count() or ids.min() is not None and ids.min() < 0:
        raise ValueError("item_id must be non-null and >= 0 (0 is the padding item).")
    if ids.n_unique() != len(ids):
        dup = ids.filter(ids.is_duplicated()).unique().head(5).to_list()
        raise ValueError(f"item_id must be unique; duplicated ids include {dup}. Deduplicate first.")


class _Batcher:
    """Runs in the pipeline threads: one batch of rows -> pixels (uint8) and tokens."""

    def __init__(self, bundle: ClipBundle, texts: list[str], paths: list[str | None], combine: str,
                 spec: ImageSpec | None, decode_on: str):
        self.tokenizer, self.image_processor = bundle.processor.tokenizer, bundle.processor.image_processor
        self.max_tokens, self.texts, self.paths, self.combine = bundle.max_text_tokens, texts, paths, combine
        self.spec, self.decode_on = spec, decode_on
        self.pin = bundle.device.type == "cuda"
        self.draft = spec.draft_side if spec is not None else _input_side(self.image_processor)

    def _cpu_image(self, path):
        image, status = load_image(path, self.draft)
        if image is not None and self.spec is not None:
            image = self.spec.prepare_pil(image)
        return image, status

    def tokens(self, rows: np.ndarray):
        """Padded token tensors of these rows' texts (the fast, Rust tokenizer), None for no rows."""
        if not len(rows):
            return None
        return self.tokenizer([self.texts[i] for i in rows.tolist()], padding=True, truncation=True,
                              max_length=self.max_tokens, return_tensors="pt")

    def __call__(self, rows: np.ndarray) -> dict:
        n = len(rows)
        status = np.full(n, "skipped", dtype=object)
        images, raw = [None] * n, [None] * n
        if self.combine != "text":
            for j, i in enumerate(rows.tolist()):
                path = self.paths[i]
                if self.decode_on == "device" and path and path.lower().endswith((".jpg", ".jpeg")):
                    try:
                        with open(path, "rb") as f:
                            data = f.read()
                    except OSError:
                        data = b""
                    if is_jpeg(data):
                        raw[j], status[j] = (torch.frombuffer(bytearray(data), dtype=torch.uint8), path), "ok"
                        continue
                images[j], status[j] = self._cpu_image(path)
        has_image = status == "ok"
        cpu_rows = [j for j in range(n) if images[j] is not None]
        if not cpu_rows:
            pixels = None
        elif self.spec is not None:
            pixels = torch.from_numpy(np.stack([images[j] for j in cpu_rows]))
        else:
            pixels = self.image_processor(images=[images[j] for j in cpu_rows], return_tensors="pt")["pixel_values"]
        if pixels is not None and self.pin:
            pixels = pixels.pin_memory()
        need_text = ~has_image if self.combine == "image" else np.ones(n, bool)
        tokens = self.tokens(rows[need_text])
        return {"rows": rows, "status": status, "has_image": has_image, "need_text": need_text,
                "cpu_rows": np.array(cpu_rows, dtype=np.int64), "pixels": pixels,
                        "raw": [(j, *r) for j, r in enumerate(raw) if r is not None], "tokens": tokens}


def _input_side(image_processor) -> int:
    """Largest side the processor resizes/crops to: JPEGs need not decode bigger than that."""
    sides = [v for d in (image_processor.size, image_processor.crop_size) if d for v in dict(d).values() if v]
    return int(max(sides)) if sides else 0


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def _image_batch(batch: dict, spec: ImageSpec | None, device: torch.device, decoder, draft: int
                 ) -> tuple[torch.Tensor | None, np.ndarray]:
    """Model-ready pixels for the batch's decodable images and their row positions in the batch.
    JPEG bytes (decode_on="device") are decoded on the device; a file the device decoder refuses
    goes to PIL instead, and is reported corrupt (status, has_image) when PIL fails too."""
    parts, order = [], []
    if batch["pixels"] is not None:
        pixels = batch["pixels"].to(device, non_blocking=True)
        parts.append(spec.normalise(pixels) if spec is not None and pixels.dtype == torch.uint8 else pixels)
        order.extend(batch["cpu_rows"].tolist())
    if batch["raw"]:
        rows, datas, paths = zip(*batch["raw"])
        try:
            decoded = list(decoder(list(datas), device))
        except Exception:  # noqa: BLE001 - one bad file fails the batched call: go one by one
            decoded = []
            for d in datas:
                try:
                    decoded.append(decoder([d], device)[0])
                except Exception:  # noqa: BLE001
                    decoded.append(None)
        good = []
        for j, image, path in zip(rows, decoded, paths):
            if image is None:
                pil, status = load_image(path, draft)
                if pil is None:
                    batch["status"][j], batch["has_image"][j] = status, False
                    continue
                image = torch.from_numpy(np.array(spec.prepare_pil(pil))).permute(2, 0, 1).to(device)
            else:
                image = spec.prepare_tensor(image)
            good.append((j, image))
        if good:
            parts.append(spec.normalise(torch.stack([g[1] for g in good])))
            order.extend(g[0] for g in good)
    if not parts:
        return None, np.zeros(0, dtype=np.int64)
    return torch.cat(parts), np.array(order, dtype=np.int64)


def encode_items(
    items: pl.DataFrame,
    bundle: ClipBundle,
    *,
    batch_size: int = 64,
    num_workers: int | None = None,
    combine: str = "mean",
    progress: Callable[[int, int], None] | None = None,
    pipeline: ImagePipeline | None = None,
    decode_on: str = "cpu",
) -> ClipResult:
    """Embed items with CLIP: L2-normalised image and text features, combined, unit norm.

    ``combine="mean"`` averages the normalised image and text vectors and renormalises, so items
    with and without an image live on the same unit sphere. Items whose image is missing or
    corrupt use their text alone (listed in ``text_only_ids``). Item 0 (padding) gets zeros.
    Cheap to call repeatedly with one bundle (the model is loaded once by :func:`load_clip`) and
    one ``pipeline`` (its threads are started once); without one, ``num_workers`` threads (None:
    one per available core; 0: decode in this thread) live for this call.
    ``decode_on="device"`` decodes JPEGs with torchvision on the model's device (nvJPEG on CUDA).
    """
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}.")
    if decode_on not in DECODE_ON:
        raise ValueError(f"decode_on must be one of {DECODE_ON}, got {decode_on!r}.")
    _check_items(items)
    spec = ImageSpec.from_processor(bundle.processor.image_processor)
    decoder = None
    if decode_on == "device":
        decoder = device_jpeg_decoder()
        if decoder is None or spec is None:
            raise ValueError("decode_on='device' needs torchvision (its decode_jpeg) and a CLIP image processor "
                             "with a fixed output size; install torchvision matching torch, or use decode_on='cpu'.")
    started = time.perf_counter()
    ids = items["item_id"].cast(pl.Int64).to_numpy()
    real = np.flatnonzero(ids != 0)
    texts = item_texts(items).gather(real).to_list()
    paths = items["image_path"].cast(pl.String).gather(real).to_list()
    batcher = _Batcher(bundle, texts, paths, combine, spec, decode_on)
    chunks = [np.arange(lo, min(lo + batch_size, len(real))) for lo in range(0, len(real), batch_size)]

    out = np.zeros((len(ids), bundle.dim), dtype=np.float32)
    status = np.full(len(real), "skipped", dtype=object)
    model, device = bundle.model, bundle.device
    done = 0
    own = pipeline is None
    pipe = ImagePipeline(num_workers) if own else pipeline
    try:
        with torch.inference_mode(), autocast(device, bundle.precision):
            for batch in pipe.map(batcher, chunks):
                rows = batch["rows"]
                vec = torch.zeros(len(rows), bundle.dim, device=device)
                pixels, order = _image_batch(batch, spec, device, decoder, batcher.draft)
                if pixels is not None:
                    img = _unit(model.get_image_features(pixel_values=pixels).pooler_output)
                    vec[torch.from_numpy(order).to(device)] = img
                status[rows] = batch["status"]
                need_text = ~batch["has_image"] if combine == "image" else np.ones(len(rows), bool)
                late = need_text & ~batch["need_text"]  # images the device decoder found corrupt
                for sel, tokens in ((batch["need_text"], batch["tokens"]), (late, batcher.tokens(rows[late]))):
                    if tokens is None:
                        continue
                    tokens = {k: v.to(device, non_blocking=True) for k, v in tokens.items()}
                    txt = _unit(model.get_text_features(**tokens).pooler_output)
                    sel = torch.from_numpy(sel).to(device)
                    if combine == "mean":  # text-only rows: vec is zero there, so this is txt
                        vec[sel] = _unit(vec[sel] + txt)
                    else:
                        vec[sel] = txt
                out[real[rows]] = vec.float().cpu().numpy()
                done += len(rows)
                if progress is not None:
                    progress(done, len(real))
    finally:
        if own:
            pipe.close()

    real_ids = ids[real]
    return ClipResult(
        item_ids=ids,
        embeddings=out,
        text_only_ids=real_ids[status != "ok"],
        seconds=time.perf_counter() - started,
        missing_image_ids=real_ids[status == "missing"],
        corrupt_image_ids=real_ids[status == "corrupt"],
    )


def to_frame(result: ClipResult) -> pl.DataFrame:
    """The clip_embeddings parquet layout: item_id, clip_emb Array(Float32, dim), text_only."""
    return pl.DataFrame(
        {
            "item_id": pl.Series(result.item_ids, dtype=pl.Int64),
            "clip_emb": pl.Series(result.embeddings.astype(np.float32, copy=False)),
            "text_only": np.isin(result.item_ids, result.text_only_ids),
        }
    )


def from_frame(frame: pl.DataFrame) -> ClipResult:
    """Inverse of :func:`to_frame` (``seconds`` is not stored: NaN; missing/corrupt split unknown)."""
    emb = frame["clip_emb"]
    if isinstance(emb.dtype, pl.List):
        width = emb.list.len().unique()
        if len(width) != 1:
            raise ValueError(f"clip_emb rows have different lengths {sorted(width.to_list())[:5]}.")
        emb = emb.cast(pl.Array(pl.Float32, int(width[0])))
    ids = frame["item_id"].cast(pl.Int64).to_numpy()
    return ClipResult(
        item_ids=ids,
        embeddings=emb.to_numpy().astype(np.float32, copy=False),
        text_only_ids=ids[frame["text_only"].to_numpy()],
        seconds=float("nan"),
    )
def item_content_frame(item_info: pl.DataFrame, item_feature: pl.DataFrame, images: pl.DataFrame) -> pl.DataFrame:
    """What the content encoder sees per real item: title, tags and cover path.

    Tags come from item_feature's full list when the item has one, else from item_info's five;
    items absent from item_feature get a null title (their text is their tags).
    """
    feature = item_feature.select(
        "item_id", pl.col("item_title").alias("title"), pl.col("item_tags").alias("feature_tags")
    )
    return (
        item_info.filter(pl.col("item_id") > 0)
        .select("item_id", "item_tags")
        .join(feature, on="item_id", how="left")
        .join(images.select("item_id", "image_path"), on="item_id", how="left")
        .select(
            "item_id",
            "title",
            pl.coalesce("feature_tags", "item_tags").alias("tags"),
            "image_path",
        )
    )
