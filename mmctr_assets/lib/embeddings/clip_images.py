"""CLIP's image input, prepared without the image processor: cover decoding (PIL draft mode for
JPEGs, a thread pool, or the device's JPEG decoder), the processor's resize/crop/normalise as
numbers (:class:`ImageSpec`), and the cores this process may use. Split from clip.py, which
encodes; the names are re-exported there."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from mmctr_assets.lib import cores


def available_cpus() -> int:
    """Cores this process may run on (its affinity mask capped by a cgroup quota: lib/cores.py)."""
    return cores.available_cpus()


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


def is_jpeg(data: bytes) -> bool:
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
