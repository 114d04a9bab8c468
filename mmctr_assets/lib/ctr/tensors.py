"""Model inputs as whole-dataset tensors: one columnar pass from a train/valid/test frame, checked
against the data format's invariants (lib/data/microlens.py) and the model's table sizes."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from mmctr_assets.lib.data.microlens import (
    MAX_LEVEL,
    bad_label_rows,
    describe_bad_labels,
    label_problem,
    not_left_padded,
)


def check_labels(label: np.ndarray, table: str = "frame") -> None:
    """Raise ``ValueError`` unless every label is 0 or 1."""
    rows = bad_label_rows(label)
    if len(rows):
        raise ValueError(describe_bad_labels(table, np.asarray(label), rows))


@dataclass
class CTRTensors:
    """Model inputs as whole-dataset tensors; batches are row slices of these."""

    item_id: torch.Tensor  # [N] int64
    item_seq: torch.Tensor  # [N, max_len] int32, left-padded with 0
    likes_level: torch.Tensor  # [N] int64
    views_level: torch.Tensor  # [N] int64
    label: torch.Tensor | None = None  # [N] float32, None for the test set
    user_id: torch.Tensor | None = None  # [N] int64 raw user ids (the model hashes them), None if absent
    # [N, 4] float32 raw click statistics of training rows, out of fold (lib/ctr/statistics.py; set by
    # trainer.train); None elsewhere: the model computes valid/test rows' from its training statistics
    statistics: torch.Tensor | None = None

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

    def model_inputs(self) -> tuple[torch.Tensor | None, ...]:
        """The model's forward arguments: ``(item_id, item_seq, likes_level, views_level, user_id,
        statistics)``."""
        return self.item_id, self.item_seq, self.likes_level, self.views_level, self.user_id, self.statistics

    @property
    def history_width(self) -> int:
        """History positions held per row (the data's width, or the max_len it was cut to)."""
        return self.item_seq.shape[1]


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
    right_padded = np.flatnonzero(not_left_padded(out))
    if right_padded.size:
        raise ValueError(f"item_seq must be LEFT-padded with 0 (most recent item last), but "
                         f"{right_padded.size:,} rows are not (e.g. row {right_padded[0]}); "
                         "re-pad them on the left")
    return out


def to_tensors(frame: pl.DataFrame, max_len: int, *, n_items: int | None = None,
               level_vocab_size: int = MAX_LEVEL + 1) -> CTRTensors:
    """Convert a train/valid/test frame to :class:`CTRTensors` in one columnar pass.

    Histories keep their last ``max_len`` items. ``label`` is optional (test); ``user_id`` is read
    when the frame has it (the user embedding needs it). With ``n_items``
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
        problem = label_problem("frame", s)  # nulls too, each example beside its own row
        if problem:
            raise ValueError(problem)
        y = s.cast(pl.Float32).to_numpy()
        label = torch.from_numpy(y.copy())
    tensors = CTRTensors(
        item_id=torch.from_numpy(_int_column(frame, "item_id")),
        item_seq=torch.from_numpy(_history_matrix(frame.get_column("item_seq"), max_len)),
        likes_level=torch.from_numpy(_int_column(frame, "likes_level")),
        views_level=torch.from_numpy(_int_column(frame, "views_level")),
        label=label,
        user_id=torch.from_numpy(_int_column(frame, "user_id")) if "user_id" in frame.columns else None,
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


def history_width(frame: pl.DataFrame) -> int:
    """Longest ``item_seq`` list of ``frame``: the history positions the data holds (100 on
    MicroLens_1M_x1), so the most a model's ``max_len`` can read."""
    s = frame.get_column("item_seq")
    if isinstance(s.dtype, pl.Array):
        return int(s.dtype.size)
    return int(s.list.len().max() or 0)
