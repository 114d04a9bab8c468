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


def available_cpus() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class ImageSpec:
    """The CLIP image processor's steps as numbers, so a batch is prepared without it: PIL resize and
    crop per image on uint8 (the processor's own resize), then one tensor op rescales and normalises
    the whole batch (on the model's device). Same pixels as the processor within float rounding."""

    shortest_edge: int | None  # resize so the short side is this, aspect kept (CLIP)
    size_hw: tuple[int, int] | None  # or resize to exactly this
    crop_hw: tuple[int, int] | None
    resample: int  # PIL resampling filter (CLIP: bicubic)
    scale: float | None  # None: no rescale
    mean: tuple[float, ...] | None  # None: no normalise
    std: tuple[float, ...] | None

    @classmethod
    def from_processor(cls, ip) -> ImageSpec | None:
        """None when the processor does something this does not reproduce (then it is used as is)."""
        size = {k: v for k, v in dict(ip.size or {}).items() if v} if getattr(ip, "do_resize", True) else {}
        crop = {k: v for k, v in dict(ip.crop_size or {}).items() if v} if getattr(ip, "do_center_crop", False) else {}
        if set(size) - {"shortest_edge", "height", "width"} or (crop and set(crop) != {"height", "width"}):
            return None
        short = size.get("shortest_edge")
        size_hw = (int(size["height"]), int(size["width"])) if {"height", "width"} <= set(size) and not short else None
        crop_hw = (int(crop["height"]), int(crop["width"])) if crop else None
        if crop_hw is None and size_hw is None:
            return None  # output size varies per image: cannot stack a batch
        if getattr(ip, "do_pad", False):
            return None
        normalise = getattr(ip, "do_normalize", True)
        return cls(
            shortest_edge=int(short) if short else None,
            size_hw=size_hw,
            crop_hw=crop_hw,
            resample=int(ip.resample if ip.resample is not None else 2),
            scale=float(ip.rescale_factor) if getattr(ip, "do_rescale", True) else None,
            mean=tuple(float(v) for v in ip.image_mean) if normalise else None,
            std=tuple(float(v) for v in ip.image_std) if normalise else None,
        )

    @property
    def out_hw(self) -> tuple[int, int]:
        return self.crop_hw or self.size_hw

    @property
    def draft_side(self) -> int:
        """Smallest side a JPEG may be decoded at (DCT scaling) without losing input resolution."""
        sides = [self.shortest_edge or 0, *(self.size_hw or ()), *(self.crop_hw or ())]
        return int(max(sides))

    def resized_hw(self, height: int, width: int) -> tuple[int, int]:
        """The processor's resize target (transformers' get_resize_output_image_size, not square)."""
        if self.shortest_edge is None:
            return self.size_hw or (height, width)
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)

    def crop_box(self, height: int, width: int) -> tuple[int, int, int, int] | None:
        if self.crop_hw is None:
            return None
        ch, cw = self.crop_hw
        top, left = (height - ch) // 2, (width - cw) // 2
        return left, top, left + cw, top + ch

    def prepare_pil(self, image):
        """Resize + centre-crop one RGB PIL image -> uint8 [H, W, 3]."""
        h, w = self.resized_hw(image.height, image.width)
        if (h, w) != (image.height, image.width):
            image = image.resize((w, h), resample=self.resample)
        box = self.crop_box(h, w)
        if box is not None and box != (0, 0, w, h):
            image = image.crop(box)
        return np.asarray(image)

    def prepare_tensor(self, image: torch.Tensor) -> torch.Tensor:
        """Resize + centre-crop one uint8 [3, H, W] tensor on any device (antialiased bicubic, as
        close to PIL's as torch gets) -> uint8 [3, h, w]. For images decoded on the GPU."""
        h, w = self.resized_hw(int(image.shape[1]), int(image.shape[2]))
        if (h, w) != tuple(image.shape[1:]):
            mode = "bicubic" if self.resample == 3 else "bilinear"
            image = torch.nn.functional.interpolate(image[None].float(), size=(h, w), mode=mode,
                                                    antialias=True, align_corners=False)[0]
            image = image.round_().clamp_(0, 255).to(torch.uint8)
        box = self.crop_box(h, w)
        if box is not None:
            left, top, right, bottom = box
            image = image[:, top:bottom, left:right]
        return image

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] (PIL path) or [B, 3, H, W] (device decode) -> float32 [B, 3, H, W]."""
        x = pixels.permute(0, 3, 1, 2).float() if pixels.shape[-1] == 3 else pixels.float()
        if self.scale is not None:
            x = x * self.scale
        if self.mean is not None:
            mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
            x = (x - mean) / std
        return x.contiguous()


def load_image(path: str | None, draft: int):
    """-> (RGB image or None, "ok" | "missing" | "corrupt"); ``draft`` > 0 lets JPEGs decode smaller."""
    from PIL import Image

    if not path or not os.path.isfile(path):
        return None, "missing"
    try:
        with Image.open(path) as im:
            # JPEG: decode at a DCT-domain 1/2-1/8 scale that stays >= the model input; far less work,
            # near-identical pixels after the resize. No-op for other formats.
            if draft:
                im.draft("RGB", (draft, draft))
            return im.convert("RGB"), "ok"
    except Exception:  # noqa: BLE001 - any decode failure means "corrupt": fall back to text
        return None, "corrupt"


def _is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


class ImagePipeline:
    """Threads that decode and preprocess batches while the model runs the previous one.

    Threads, not processes: PIL decodes and resizes, and the fast tokenizer encodes, with the GIL
    released, so threads use every core without worker start-up (seconds per process) or copying
    pixels between processes. Create one per run and pass it to every :func:`encode_items` call:
    the threads then persist across the shards of the run.
    """

    def __init__(self, workers: int | None = None):
        from concurrent.futures import ThreadPoolExecutor

        self.workers = available_cpus() if workers is None else max(0, int(workers))
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="clip-prep") if self.workers else None

    def map(self, fn: Callable, args: list):
        """``fn(a)`` for each ``a`` in order, ``workers + 1`` ahead of the consumer (bounded memory)."""
        if self._pool is None:
            yield from map(fn, args)
            return
        import collections

        ahead, pending, it = self.workers + 1, collections.deque(), iter(args)
        for a in it:
            pending.append(self._pool.submit(fn, a))
            if len(pending) >= ahead:
                break
        try:
            while pending:
                result = pending.popleft().result()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(self._pool.submit(fn, nxt))
                yield result
        finally:
            for f in pending:
                f.cancel()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> ImagePipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


DECODE_ON = ("cpu", "device")


def device_jpeg_decoder():
    """torchvision's JPEG decoder (nvJPEG on CUDA), or None when torchvision is not installed."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except Exception:  # noqa: BLE001 - torchvision is optional
        return None
    return lambda datas, device: decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)


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
                    if _is_jpeg(data):
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
