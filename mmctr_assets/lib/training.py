"""Train, evaluate and serve DCN-DIN: columnar tensors once, seeded batch slicing, resumable epochs.

Resume contract: after every epoch ``checkpoint_dir/last.pt`` holds everything the loop needs
(weights, optimizer, scheduler, early-stopping state, history, all RNG states). A later call with
the same configs and data continues after that epoch and ends bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from mmctr_assets.lib.atomic import atomic_path
from mmctr_assets.lib.ctr_model import DCNDIN, ModelConfig, bce_loss
from mmctr_assets.lib.metrics import auc, logloss

# /2: sigmoid attention, history-match features and the item-frequency buffer
MODEL_FORMAT = "mmctr.dcn_din.model/2"
CHECKPOINT_FORMAT = "mmctr.dcn_din.checkpoint/2"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# TrainConfig fields that may change between a run and its resume (extend a finished run).
_RESUMABLE_CHANGES = {"epochs"}


# --------------------------------------------------------------------------------------- data

@dataclass
class CTRTensors:
    """Model inputs as whole-dataset tensors; batches are row slices of these."""

    item_id: torch.Tensor  # [N] int64
    item_seq: torch.Tensor  # [N, max_len] int32, left-padded with 0
    likes_level: torch.Tensor  # [N] int64
    views_level: torch.Tensor  # [N] int64
    label: torch.Tensor | None = None  # [N] float32, None for the test set

    def __len__(self) -> int:
        return self.item_id.shape[0]

    def _fields(self) -> list[torch.Tensor | None]:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]  # astuple would deep-copy

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> CTRTensors:
        return CTRTensors(*(None if t is None else fn(t) for t in self._fields()))

    def take(self, index: torch.Tensor) -> CTRTensors:
        return self._map(lambda t: t.index_select(0, index))

    def slice(self, start: int, stop: int) -> CTRTensors:
        return self._map(lambda t: t[start:stop])

    def to(self, device: torch.device | str) -> CTRTensors:
        return self._map(lambda t: t.to(device, non_blocking=True))

    def truncate(self, max_len: int) -> CTRTensors:
        """Keep each history's last ``max_len`` positions (the most recent items)."""
        if self.item_seq.shape[1] <= max_len:
            return self
        return dataclasses.replace(self, item_seq=self.item_seq[:, -max_len:].contiguous())

    def validate(self, n_items: int, level_vocab_size: int) -> None:
        """Raise ``ValueError`` naming the column when an id or level does not fit the model's tables."""
        fix_items = ("The item embeddings must cover every item of train/valid/test: rebuild them "
                     "from the item_info that belongs to this data, or drop those rows.")
        _check_range("item_id", self.item_id, 1, n_items,
                     f"item-embedding table (target ids 1..{n_items})", fix_items)
        _check_range("item_seq", self.item_seq, 0, n_items,
                     f"item-embedding table (history ids 0..{n_items}, 0 = padding)", fix_items)
        for name in ("likes_level", "views_level"):
            _check_range(name, getattr(self, name), 0, level_vocab_size - 1,
                         f"level table (0..{level_vocab_size - 1})",
                         "Bucket the levels into that range or raise ModelConfig.level_vocab_size.")

    def arrays(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for t in self._fields() if t is not None)


def _check_range(column: str, values: torch.Tensor, lo: int, hi: int, table: str, fix: str) -> None:
    if values.numel() == 0:
        return
    low, high = torch.aminmax(values)
    if low >= lo and high <= hi:  # one pass in the common case; count only when reporting
        return
    bad = (values < lo) | (values > hi)
    n_bad = int(bad.sum())
    if n_bad:
        raise ValueError(f"{column}: {n_bad:,} of {values.numel():,} values fall outside the {table}, "
                         f"e.g. {int(values[bad][0])}. {fix}")


def _check_labels(y: np.ndarray) -> None:
    bad = ~np.isfinite(y)
    if bad.any():
        raise ValueError(f"column 'label' has {int(bad.sum()):,} NaN/inf values (e.g. row "
                         f"{int(np.argmax(bad))}); labels must be 0 or 1")
    bad = (y != 0) & (y != 1)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"column 'label' must be 0 or 1, but {int(bad.sum()):,} rows are not "
                         f"(e.g. {y[i]} at row {i}); binarise the labels first")


def _hash_arrays(*arrays: Any) -> str:
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        a = np.ascontiguousarray(a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.view(np.uint8).reshape(-1))
    return h.hexdigest()


def _int_column(frame: pl.DataFrame, name: str) -> np.ndarray:
    s = frame.get_column(name)
    if not s.dtype.is_integer():
        raise ValueError(f"column {name!r} must be integer, got {s.dtype}; cast it before training")
    if s.null_count():
        raise ValueError(f"column {name!r} has {s.null_count():,} nulls; fill or drop those rows")
    return s.cast(pl.Int64).to_numpy().copy()


def _right_align(arr, max_len: int, out: np.ndarray) -> None:
    """Write the last ``max_len`` entries of each list in arrow ``arr`` right-aligned into ``out``."""
    flat = arr.flatten()
    if flat.null_count:
        raise ValueError(f"column 'item_seq' has {flat.null_count:,} null entries inside its lists; "
                         "pad with 0, not null")
    values = flat.to_numpy(zero_copy_only=False)
    if values.size and (values.min() < 0 or values.max() > np.iinfo(np.int32).max):
        raise ValueError(f"item_seq holds ids outside 0..{np.iinfo(np.int32).max} "
                         f"(e.g. {values[(values < 0) | (values > np.iinfo(np.int32).max)][0]}); "
                         "item ids must be non-negative row indices of item_info")
    offsets = arr.offsets.to_numpy().astype(np.int64)
    lengths = np.diff(offsets)
    n = lengths.size
    if n and (lengths == lengths[0]).all():  # the usual fixed-width case: a reshape, no scatter
        width = int(lengths[0])
        keep = min(width, max_len)
        if keep:
            out[:, max_len - keep:] = values.reshape(n, width)[:, width - keep:]
    else:
        keep = np.minimum(lengths, max_len)
        k = np.arange(keep.sum()) - np.repeat(np.cumsum(keep) - keep, keep)
        rows = np.repeat(np.arange(n), keep)
        src = np.repeat(offsets[1:] - offsets[0] - keep, keep) + k
        out[rows, np.repeat(max_len - keep, keep) + k] = values[src]


def _history_matrix(s: pl.Series, max_len: int) -> np.ndarray:
    """Right-align each history's last ``max_len`` entries into ``[N, max_len]`` int32, 0-padded."""
    if isinstance(s.dtype, pl.Array):
        s = s.cast(pl.List(s.dtype.inner))
    if not isinstance(s.dtype, pl.List) or not s.dtype.inner.is_integer():
        raise ValueError(f"column 'item_seq' must be a list of integers, got {s.dtype}")
    if s.null_count():
        raise ValueError(f"column 'item_seq' is null in {s.null_count():,} rows; use a list of zeros "
                         "(all padding) for an empty history")
    out = np.zeros((len(s), max_len), dtype=np.int32)
    start = 0
    for chunk in s.to_frame().to_arrow().column(0).chunks:  # per parquet row group, no rechunk copy
        _right_align(chunk, max_len, out[start:start + len(chunk)])
        start += len(chunk)
    ends_in_padding = np.flatnonzero(out[:, -1] == 0)
    right_padded = ends_in_padding[out[ends_in_padding].any(axis=1)]
    if right_padded.size:
        raise ValueError(f"item_seq must be LEFT-padded with 0 (most recent item last), but "
                         f"{right_padded.size:,} rows end in padding (e.g. row {right_padded[0]}); "
                         "re-pad them on the left")
    return out


def to_tensors(frame: pl.DataFrame, max_len: int, *, n_items: int | None = None,
               level_vocab_size: int = 11) -> CTRTensors:
    """Convert a train/valid/test frame to :class:`CTRTensors` in one columnar pass.

    Histories keep their last ``max_len`` items. ``label`` is optional (test). With ``n_items``
    (rows of the item-embedding table minus padding) ids and levels are range-checked here too.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    needed = ["item_id", "item_seq", "likes_level", "views_level"]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise ValueError(f"frame lacks columns {missing} (has {frame.columns}); expected the "
                         "MicroLens train/valid/test schema")
    label = None
    if "label" in frame.columns:
        s = frame.get_column("label")
        if s.null_count():
            raise ValueError(f"column 'label' has {s.null_count():,} nulls; drop or fix those rows")
        y = s.cast(pl.Float32).to_numpy()
        _check_labels(y)
        label = torch.from_numpy(y.copy())
    tensors = CTRTensors(
        item_id=torch.from_numpy(_int_column(frame, "item_id")),
        item_seq=torch.from_numpy(_history_matrix(frame.get_column("item_seq"), max_len)),
        likes_level=torch.from_numpy(_int_column(frame, "likes_level")),
        views_level=torch.from_numpy(_int_column(frame, "views_level")),
        label=label,
    )
    if n_items is not None:
        tensors.validate(n_items, level_vocab_size)
    return tensors


def item_frequency(tensors: CTRTensors, n_items: int) -> np.ndarray:
    """How often each item id ``0..n_items`` occurs as a target or in a history (padding counts 0).

    Labels play no part, so the count is a popularity signal that is safe to compute on training
    rows and reuse unchanged at prediction time.
    """
    seq = tensors.item_seq
    counts = torch.bincount(tensors.item_id, minlength=n_items + 1)
    counts += torch.bincount(seq[seq != 0].long(), minlength=n_items + 1)
    return counts.cpu().numpy().astype(np.int64)


# ----------------------------------------------------------------------------------- configs

@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings.

    ``lr_patience`` counts non-improving epochs before the LR is cut (Keras/FuxiCTR meaning: 1 =
    cut right after the first bad epoch), so with ``early_stopping_patience=2`` a cut LR gets one
    epoch to help before training stops.
    """

    lr: float = 1e-3
    weight_decay: float = 1e-5
    batch_size: int = 4096
    epochs: int = 10
    grad_clip_norm: float | None = 10.0
    lr_factor: float = 0.1
    lr_patience: int = 1
    early_stopping_patience: int = 2
    seed: int = 0
    max_len: int = 64
    precision: str = "fp32"
    eval_batch_size: int = 4096  # larger inference batches are slower on CPU (memory-bound)
    num_threads: int | None = None  # None: torch's default (one per physical core)
    deterministic: bool = True

    def __post_init__(self):
        problems = []
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        for name in ("batch_size", "epochs", "max_len", "eval_batch_size", "lr_patience",
                     "early_stopping_patience"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if not 0 < self.lr_factor < 1:
            problems.append(f"lr_factor must be in (0, 1), got {self.lr_factor}")
        if problems:
            raise ValueError("Invalid TrainConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class EpochLog:
    epoch: int  # 1-based
    train_loss: float
    valid_auc: float
    valid_logloss: float
    lr: float  # learning rate used during this epoch
    seconds: float  # train + evaluation wall time
    samples_per_s: float  # training throughput
    improved: bool


@dataclass
class TrainResult:
    best_valid_auc: float
    best_epoch: int
    history: list[EpochLog]
    best_state_dict: dict[str, torch.Tensor]
    model_config: ModelConfig
    train_config: TrainConfig
    valid_predictions: np.ndarray  # probabilities of the best model, valid row order
    resumed_from_epoch: int | None  # last completed epoch found in last.pt, None if started fresh
    stopped_early: bool
    resume_note: str  # why the run resumed or started fresh
    model: DCNDIN = field(repr=False)  # best weights, eval mode
    best_model_path: Path | None = None  # checkpoint_dir/best.pt, readable with load_model


# ------------------------------------------------------------------------------ model files

def save_model(model: DCNDIN, path: str | Path) -> Path:
    """Atomically write weights plus architecture (config and table shapes) to ``path``."""
    return _save_artifact(model.to_dict(), model.state_dict(), path)


def _save_artifact(architecture: dict, state_dict: dict[str, torch.Tensor], path: str | Path) -> Path:
    artifact = {"format": MODEL_FORMAT, "architecture": architecture,
                "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()}}
    with atomic_path(path) as tmp:
        torch.save(artifact, tmp)
    return Path(path)


def load_model(path: str | Path, *, map_location: str | torch.device = "cpu") -> DCNDIN:
    """Rebuild a :func:`save_model` artifact as a :class:`DCNDIN` in eval mode."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no model file at {path}; train the model first (train() writes "
                                "checkpoint_dir/best.pt, or call save_model)")
    try:
        artifact = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable torch file ({type(e).__name__}: {e})") from e
    found = artifact.get("format") if isinstance(artifact, dict) else None
    if isinstance(found, str) and found.startswith("mmctr.dcn_din.model/") and found != MODEL_FORMAT:
        raise ValueError(f"{path} was written by another mmctr version (format {found!r}, this one "
                         f"reads {MODEL_FORMAT!r}); retrain it: materialise dcn_din_model again")
    if found != MODEL_FORMAT:
        raise ValueError(f"{path} is not a DCN-DIN model written by save_model "
                         f"(expected format {MODEL_FORMAT!r})")
    model = DCNDIN.from_dict(artifact["architecture"])
    model.load_state_dict(artifact["state_dict"])
    return model.to(map_location).eval()


# -------------------------------------------------------------------------------- inference

def _check_precision(precision: str, device: torch.device) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"precision='fp16' needs a CUDA device (float16 autocast with a GradScaler); "
                         f"device is {device}. Use 'bf16' or 'fp32' on {device.type}.")


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=PRECISIONS[precision], enabled=precision != "fp32")


def _predict(model: DCNDIN, tensors: CTRTensors, batch_size: int, device: torch.device,
             precision: str) -> np.ndarray:
    was_training = model.training
    model.eval()
    out = np.empty(len(tensors), dtype=np.float32)
    try:
        with torch.inference_mode(), _autocast(device, precision):
            for start in range(0, len(tensors), batch_size):
                b = tensors.slice(start, start + batch_size).to(device)
                logits = model(b.item_id, b.item_seq, b.likes_level, b.views_level)
                out[start:start + batch_size] = torch.sigmoid(logits.float()).cpu().numpy()
    finally:
        model.train(was_training)
    return out


def predict(model: DCNDIN, tensors: CTRTensors, *, batch_size: int = 4096,
            device: str | torch.device = "cpu", precision: str = "fp32") -> np.ndarray:
    """Click probabilities ``float32 [N]`` in row order (model moved to ``device``)."""
    device = torch.device(device)
    _check_precision(precision, device)
    tensors.validate(model.n_items, model.config.level_vocab_size)
    return _predict(model.to(device), tensors, batch_size, device, precision)


# --------------------------------------------------------------------------------- training

@contextlib.contextmanager
def _torch_settings(deterministic: bool, num_threads: int | None) -> Iterator[None]:
    """Apply determinism / thread settings for the duration of training, then restore them."""
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_threads = torch.get_num_threads()
    try:
        if deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        if num_threads:
            torch.set_num_threads(num_threads)
        yield
    finally:
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
        torch.set_num_threads(prev_threads)


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": random.getstate(), "generator": generator.get_state()}


def _set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    generator.set_state(state["generator"])


def _run_key(model_config: ModelConfig, train_config: TrainConfig, data_fingerprint: str) -> dict:
    train = {k: v for k, v in train_config.to_dict().items() if k not in _RESUMABLE_CHANGES}
    return {"model_config": model_config.to_dict(), "train_config": train, "data": data_fingerprint}


def _resume_mismatch(saved: dict, current: dict) -> str | None:
    if saved["data"] != current["data"]:
        return "it was made on different data (data fingerprint differs)"
    for part in ("model_config", "train_config"):
        changed = sorted(k for k in set(saved[part]) | set(current[part])
                         if saved[part].get(k) != current[part].get(k))
        if changed:
            return f"its {part} differs in {changed}"
    return None


def _batch_bounds(n: int, batch_size: int) -> list[int]:
    bounds = list(range(0, n, batch_size)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]  # never train on a 1-row batch: batch statistics of one row are undefined
    return bounds


@dataclass
class _Run:
    """Everything an epoch changes, hence everything ``last.pt`` holds."""

    model: DCNDIN
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau
    scaler: torch.amp.GradScaler
    generator: torch.Generator
    history: list[EpochLog] = field(default_factory=list)
    best_auc: float = -math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped_early: bool = False
    best_state: dict[str, torch.Tensor] | None = None

    _LOOP = ("best_auc", "best_epoch", "bad_epochs", "stopped_early", "best_state")

    def checkpoint(self, run_key: dict) -> dict[str, Any]:
        return {"format": CHECKPOINT_FORMAT, "run_key": run_key,
                "history": [dataclasses.asdict(h) for h in self.history],
                **{k: getattr(self, k) for k in self._LOOP},
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": _rng_state(self.generator)}

    def restore(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"], self.generator)
        self.history = [EpochLog(**h) for h in ckpt["history"]]
        for k in self._LOOP:
            setattr(self, k, ckpt[k])


def _try_resume(run: _Run, last_path: Path, run_key: dict) -> tuple[int | None, str]:
    """Restore ``run`` from ``last_path`` when it belongs to this run; say what happened."""
    if not last_path.exists():
        return None, f"started fresh: no checkpoint at {last_path}"
    try:
        ckpt = torch.load(last_path, map_location="cpu", weights_only=True)
        why = (_resume_mismatch(ckpt["run_key"], run_key) if ckpt.get("format") == CHECKPOINT_FORMAT
               else f"its format is not {CHECKPOINT_FORMAT}")
    except Exception as e:  # a foreign or damaged file is never fatal, just not resumable
        why = f"it could not be read ({type(e).__name__}: {e})"
    if why:
        return None, f"started fresh: checkpoint {last_path} not used because {why}"
    run.restore(ckpt)
    return len(run.history), f"resumed after epoch {len(run.history)} from {last_path}"


def _train_epoch(run: _Run, data: CTRTensors, cfg: TrainConfig, device: torch.device, epoch: int,
                 progress: Callable[[int, int, int], None] | None) -> float:
    """One pass over ``data`` in a seeded random order; returns the mean training loss."""
    model, optimizer, scaler = run.model, run.optimizer, run.scaler
    params = [p for group in optimizer.param_groups for p in group["params"]]
    bounds = _batch_bounds(len(data), cfg.batch_size)
    perm = torch.randperm(len(data), generator=run.generator).to(device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # no per-step host sync
    model.train()
    for step in range(len(bounds) - 1):
        b = data.take(perm[bounds[step]:bounds[step + 1]]).to(device)
        with _autocast(device, cfg.precision):
            logits = model(b.item_id, b.item_seq, b.likes_level, b.views_level)
        loss = bce_loss(logits, b.label)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.grad_clip_norm:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip_norm)
        scaler.step(optimizer)
        scaler.update()
        loss_sum += loss.detach() * len(b)
        if progress is not None:
            progress(epoch, step + 1, len(bounds) - 1)
    train_loss = float(loss_sum) / len(data)
    if not math.isfinite(train_loss):
        raise FloatingPointError(
            f"training diverged in epoch {epoch}: mean train loss is {train_loss}. Lower TrainConfig.lr "
            f"(now {optimizer.param_groups[0]['lr']}), keep grad_clip_norm, or use precision='fp32'")
    return train_loss


def _check_train_inputs(train_tensors: CTRTensors, valid_tensors: CTRTensors, n_items: int,
                        level_vocab_size: int) -> None:
    for name, t in (("train_tensors", train_tensors), ("valid_tensors", valid_tensors)):
        if t.label is None:
            raise ValueError(f"{name} has no labels; train() needs labelled train and valid data")
        if len(t) == 0:
            raise ValueError(f"{name} is empty")
        try:
            _check_labels(t.label.cpu().numpy())
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        t.validate(n_items, level_vocab_size)
    if valid_tensors.label.min() == valid_tensors.label.max():
        raise ValueError(f"valid_tensors labels are all {float(valid_tensors.label[0]):g}: valid AUC "
                         "(early stopping, LR schedule) needs both clicks and non-clicks")


def train(model_config: ModelConfig, train_config: TrainConfig, train_tensors: CTRTensors,
          valid_tensors: CTRTensors, item_embeddings: np.ndarray, *,
          item_tags: np.ndarray | None = None, device: str | torch.device = "cpu",
          checkpoint_dir: str | Path, data_fingerprint: str | None = None,
          on_epoch_end: Callable[[EpochLog], None] | None = None,
          progress: Callable[[int, int, int], None] | None = None) -> TrainResult:
    """Train DCN-DIN with AdamW, LR-on-plateau and early stopping on valid AUC; resume if possible.

    ``data_fingerprint`` identifies the data for resuming (default: a hash of the tensors,
    embeddings and tags). ``on_epoch_end(log)`` runs after ``last.pt`` is written, so an exception
    there (or a kill) loses nothing. ``progress(epoch, step, n_steps)`` is called after each batch.
    """
    cfg = train_config
    device = torch.device(device)
    _check_precision(cfg.precision, device)
    item_embeddings = np.asarray(item_embeddings, dtype=np.float32)
    _check_train_inputs(train_tensors, valid_tensors, item_embeddings.shape[0] - 1,
                        model_config.level_vocab_size)
    train_data = train_tensors.truncate(cfg.max_len)
    valid_data = valid_tensors.truncate(cfg.max_len)
    if data_fingerprint is None:
        extra = () if item_tags is None else (np.asarray(item_tags),)
        data_fingerprint = _hash_arrays(*train_data.arrays(), *valid_data.arrays(),
                                        item_embeddings, *extra)
    run_key = _run_key(model_config, cfg, data_fingerprint)
    last_path, best_path = Path(checkpoint_dir) / "last.pt", Path(checkpoint_dir) / "best.pt"
    if device.type == "cuda":  # batches are then gathered on the GPU, no host round-trips
        train_data, valid_data = train_data.to(device), valid_data.to(device)
    valid_labels = valid_data.label.cpu().numpy()

    with _torch_settings(cfg.deterministic, cfg.num_threads):
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        counts = (item_frequency(train_data, item_embeddings.shape[0] - 1)
                  if model_config.use_item_frequency else None)
        model = DCNDIN(model_config, item_embeddings, item_tags, item_frequency=counts).to(device)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                      lr=cfg.lr, weight_decay=cfg.weight_decay)
        run = _Run(model=model, optimizer=optimizer,
                   scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau(
                       optimizer, mode="max", factor=cfg.lr_factor, patience=cfg.lr_patience - 1,
                       threshold=0.0),  # torch's patience p cuts after p + 1 bad epochs
                   scaler=torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16"),
                   generator=torch.Generator().manual_seed(cfg.seed))
        resumed_from, note = _try_resume(run, last_path, run_key)

        for epoch in range(len(run.history) + 1, cfg.epochs + 1):
            if run.stopped_early:
                break
            t0 = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            train_loss = _train_epoch(run, train_data, cfg, device, epoch, progress)
            train_seconds = time.perf_counter() - t0
            probs = _predict(model, valid_data, cfg.eval_batch_size, device, cfg.precision)
            valid_auc = auc(valid_labels, probs)
            improved = valid_auc > run.best_auc
            if improved:
                run.best_auc, run.best_epoch, run.bad_epochs = valid_auc, epoch, 0
                run.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                _save_artifact(model.to_dict(), run.best_state, best_path)
            else:
                run.bad_epochs += 1
                run.stopped_early = run.bad_epochs >= cfg.early_stopping_patience
            run.scheduler.step(valid_auc)
            log = EpochLog(epoch=epoch, train_loss=train_loss, valid_auc=valid_auc,
                           valid_logloss=logloss(valid_labels, probs), lr=lr,
                           seconds=time.perf_counter() - t0,
                           samples_per_s=len(train_data) / train_seconds, improved=improved)
            run.history.append(log)
            with atomic_path(last_path) as tmp:
                torch.save(run.checkpoint(run_key), tmp)
            if on_epoch_end is not None:
                on_epoch_end(log)

        model.load_state_dict(run.best_state)
        if not best_path.exists():  # e.g. deleted after the run finished; last.pt still has it
            _save_artifact(model.to_dict(), run.best_state, best_path)
        valid_predictions = _predict(model.eval(), valid_data, cfg.eval_batch_size, device,
                                     cfg.precision)

    return TrainResult(
        best_valid_auc=run.best_auc, best_epoch=run.best_epoch, history=run.history,
        best_state_dict=run.best_state, model_config=model_config, train_config=cfg,
        valid_predictions=valid_predictions, resumed_from_epoch=resumed_from,
        stopped_early=run.stopped_early, resume_note=note, model=model,
        best_model_path=best_path)
