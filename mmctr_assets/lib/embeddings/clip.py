"""CLIP item encoder: one 512-d content vector per item from its cover image and its text.

Image decoding and preprocessing run in DataLoader workers while the model runs the previous
batch, so on a warm pipeline the encoder costs about what the bare forward passes cost.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

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


class _ItemDataset(torch.utils.data.Dataset):
    """Item i -> (position, text, decoded RGB image or None, status)."""

    def __init__(self, texts: list[str], paths: list[str | None], load_images: bool, draft: int):
        self.texts, self.paths, self.load_images, self.draft = texts, paths, load_images, draft

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int):
        image, status = None, "skipped"
        if self.load_images:
            image, status = load_image(self.paths[i], self.draft)
        return i, self.texts[i], image, status


def _input_side(image_processor) -> int:
    """Largest side the processor resizes/crops to: JPEGs need not decode bigger than that."""
    sides = [v for d in (image_processor.size, image_processor.crop_size) if d for v in dict(d).values()]
    return int(max(sides)) if sides else 0


def load_image(path: str | None, draft: int):
    """-> (RGB image or None, "ok" | "missing" | "corrupt"); ``draft`` > 0 lets JPEGs decode smaller."""
    from PIL import Image

    if not path or not os.path.isfile(path):
        return None, "missing"
    try:
        with Image.open(path) as im:
            # JPEG: decode at a DCT-domain 1/2-1/8 scale that stays >= the model input; far less work,
                # near-identical pixels after the processor resize. No-op for other formats.
            if draft:
                im.draft("RGB", (draft, draft))
            return im.convert("RGB"), "ok"
    except Exception:  # noqa: BLE001 - any decode failure means "corrupt": fall back to text
        return None, "corrupt"


class _Collate:
    """Runs in the workers: batches pixels for decodable images, tokens for rows that need text."""

    def __init__(self, processor, max_tokens: int, combine: str):
        self.image_processor = processor.image_processor
        self.tokenizer = processor.tokenizer
        self.max_tokens, self.combine = max_tokens, combine

    def __call__(self, batch):
        pos = np.array([b[0] for b in batch], dtype=np.int64)
        status = np.array([b[3] for b in batch])
        has_image = status == "ok"
        images = [b[2] for b in batch if b[3] == "ok"]
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"] if images else None
        need_text = ~has_image if self.combine == "image" else np.ones(len(batch), bool)
        texts = [b[1] for b, need in zip(batch, need_text) if need]
        tokens = (
            self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
            if texts
            else None
        )
        return {"pos": pos, "status": status, "has_image": has_image, "need_text": need_text,
                "pixel_values": pixels, "tokens": tokens}


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def encode_items(
    items: pl.DataFrame,
    bundle: ClipBundle,
    *,
    batch_size: int = 64,
    num_workers: int = 2,
    combine: str = "mean",
    progress: Callable[[int, int], None] | None = None,
) -> ClipResult:
    """Embed items with CLIP: L2-normalised image and text features, combined, unit norm.

    ``combine="mean"`` averages the normalised image and text vectors and renormalises, so items
    with and without an image live on the same unit sphere. Items whose image is missing or
    corrupt use their text alone (listed in ``text_only_ids``). Item 0 (padding) gets zeros.
    Cheap to call repeatedly with one bundle (the model is loaded once by :func:`load_clip`).
    """
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}.")
    _check_items(items)
    started = time.perf_counter()
    ids = items["item_id"].cast(pl.Int64).to_numpy()
    real = np.flatnonzero(ids != 0)
    texts = item_texts(items).gather(real).to_list()
    paths = items["image_path"].cast(pl.String).gather(real).to_list()
    draft = _input_side(bundle.processor.image_processor)

    dataset = _ItemDataset(texts, paths, load_images=combine != "text", draft=draft)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_Collate(bundle.processor, bundle.max_text_tokens, combine),
        pin_memory=bundle.device.type == "cuda",
    )
    out = np.zeros((len(ids), bundle.dim), dtype=np.float32)
    status = np.full(len(real), "skipped", dtype=object)
    model, device = bundle.model, bundle.device
    done = 0
    with torch.inference_mode(), autocast(device, bundle.precision):
        for batch in loader:
            pos = batch["pos"]
            status[pos] = batch["status"]
            vec = torch.zeros(len(pos), bundle.dim, device=device)
            if batch["pixel_values"] is not None:
                pixels = batch["pixel_values"].to(device, non_blocking=True)
                img = _unit(model.get_image_features(pixel_values=pixels).pooler_output)
                vec[torch.from_numpy(batch["has_image"]).to(device)] = img
            if batch["tokens"] is not None:
                tokens = {k: v.to(device, non_blocking=True) for k, v in batch["tokens"].items()}
                txt = _unit(model.get_text_features(**tokens).pooler_output)
                rows = torch.from_numpy(batch["need_text"]).to(device)
                if combine == "mean":  # text-only rows: vec is zero there, so this is txt
                    vec[rows] = _unit(vec[rows] + txt)
                else:
                    vec[rows] = txt
            out[real[pos]] = vec.float().cpu().numpy()
            done += len(pos)
            if progress is not None:
                progress(done, len(real))

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
