"""Train a CTR model: seeded batch slicing, AdamW (row-wise for sparse tables: optim.py), LR-on-plateau
and early stopping on valid AUC, threads from the machine-wide core lease (lib/cores.py),
and resumable epochs.

Resume contract: after every epoch ``checkpoint_dir/last.pt`` holds everything the loop needs
(weights, optimizer, scheduler, early-stopping state, history, all RNG states). A later call with
the same configs and data continues after that epoch and ends bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmctr_assets.lib.cores import core_lease, held_cores
from mmctr_assets.lib.ctr.artifacts import save_weights
from mmctr_assets.lib.ctr.inference import check_user_ids, predict_batches
from mmctr_assets.lib.ctr.model import CTRModel, bce_loss
from mmctr_assets.lib.ctr.model_config import ModelConfig
from mmctr_assets.lib.ctr.optim import RowAdamW, add_row_penalty, clip_grad_norm_, coalesce_sparse_grads
from mmctr_assets.lib.ctr.statistics import TrainingStatistics
from mmctr_assets.lib.ctr.tensors import CTRTensors, check_labels, item_frequency
from mmctr_assets.lib.io import array_fingerprint, atomic_path
from mmctr_assets.lib.metrics import auc, logloss
from mmctr_assets.lib.precision import autocast, check_precision

CHECKPOINT_FORMAT = "mmctr.dcn_din.checkpoint/7"  # /7: RowAdamW's catch-up shrink state (lr_total, lr_mark)
# TrainConfig fields that may change between a run and its resume (extend a finished run).
_RESUMABLE_CHANGES = {"epochs"}


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; the defaults are the default model's (deploy/presets/default.yaml).

    ``lr_patience`` counts non-improving epochs before the LR is cut (Keras/FuxiCTR meaning: 1 =
    cut right after the first bad epoch), so with ``early_stopping_patience=2`` a cut LR gets one
    epoch to help before training stops.
    """

    # QIN's (2nd place) rate, cut x0.1 on a plateau as FuxiCTR does; with ModelConfig's dropout and
    # embedding_regularizer it won on every demo world against 1e-3 halved (docs/results.md,
    # "A faster LR schedule for the default")
    lr: float = 2e-3
    weight_decay: float = 1e-5
    batch_size: int = 4096
    epochs: int = 20  # a cap: early stopping ends sooner
    grad_clip_norm: float | None = 10.0
    lr_factor: float = 0.1
    lr_patience: int = 1
    # on an LR cut, continue from the best epoch's weights instead of the last (worse) ones: a cut
    # then refines the best model rather than the one that had started to overfit
    restore_best_on_lr_cut: bool = False
    early_stopping_patience: int = 3
    seed: int = 0
    precision: str = "fp32"
    eval_batch_size: int = 4096  # larger inference batches are slower on CPU (memory-bound)
    num_threads: int | None = None  # None: the free cores of the machine-wide lease (lib/cores.py)
    deterministic: bool = True

    def __post_init__(self):
        problems = []
        try:
            check_precision(self.precision)
        except ValueError as e:
            problems.append(str(e))
        for name in ("batch_size", "epochs", "eval_batch_size", "lr_patience",
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
    model: CTRModel = field(repr=False)  # best weights, eval mode
    best_model_path: Path | None = None  # checkpoint_dir/best.pt, readable with load_model


@contextlib.contextmanager
def _torch_settings(deterministic: bool, num_threads: int | None,
                    poll: Callable[[], None] | None = None) -> Iterator[None]:
    """Apply determinism / thread settings for the duration of training, then restore them.

    Threads come from the machine-wide core lease (lib/cores.py): the cores the calling step
    already holds, else up to ``num_threads`` (None: all) free ones, waiting for them, so two
    trainings on one machine never run more threads than it has cores. ``poll()`` runs while it
    waits for them (a raise ends the wait)."""
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_threads = torch.get_num_threads()
    with contextlib.ExitStack() as stack:
        cores = held_cores() or stack.enter_context(core_lease(num_threads, need=num_threads or 1, poll=poll))
        try:
            if deterministic:
                torch.use_deterministic_algorithms(True, warn_only=True)
            torch.set_num_threads(num_threads or cores)
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

    model: CTRModel
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
    if progress is not None:
        progress(epoch, 0, len(bounds) - 1)
    for step in range(len(bounds) - 1):
        b = data.take(perm[bounds[step]:bounds[step + 1]]).to(device)
        loss = training_step(model, optimizer, scaler, b, cfg, device, params)
        loss_sum += loss.detach() * len(b)
        if progress is not None:
            progress(epoch, step + 1, len(bounds) - 1)
    train_loss = float(loss_sum) / len(data)
    if not math.isfinite(train_loss):
        raise FloatingPointError(
            f"training diverged in epoch {epoch}: mean train loss is {train_loss}. Lower TrainConfig.lr "
            f"(now {optimizer.param_groups[0]['lr']}), keep grad_clip_norm, or use precision='fp32'")
    return train_loss


def make_optimizer(model: CTRModel, cfg: TrainConfig) -> RowAdamW:
    """AdamW over the trainable parameters; the sparse tables' rows are updated only when a batch
    touches them, and then first caught up on the regulariser's pull they missed (lib/ctr/optim.py)."""
    params = [p for p in model.parameters() if p.requires_grad]
    tables = {id(m.weight): m.weight for m in model.modules()
              if isinstance(m, torch.nn.Embedding) and m.sparse and m.weight.requires_grad}
    groups = [{"params": [p for p in params if id(p) not in tables]}] if len(params) > len(tables) else []
    if tables:  # every sparse table is one the embedding regulariser covers
        groups.append({"params": list(tables.values()), "catch_up_shrink": model.config.embedding_regularizer > 0})
    return RowAdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def training_step(model: CTRModel, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                  batch: CTRTensors, cfg: TrainConfig, device: torch.device,
                  params: list[torch.Tensor]) -> torch.Tensor:
    """Forward, loss (+ the regulariser: the tag table's in the loss, the catalog-sized tables' on the
    rows the batch looks up, added to their gradients), backward, clip, step; returns the loss
    (the regulariser included). The benchmarks time this same function."""
    inputs = batch.model_inputs()
    with autocast(device, cfg.precision):
        logits = model(*inputs)
    loss = bce_loss(logits, batch.label)
    regularizer = model.config.embedding_regularizer
    if regularizer > 0:
        loss = loss + model.embedding_penalty(*inputs)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    coalesce_sparse_grads(params)
    scaler.unscale_(optimizer)  # the row penalty and the clip see true gradients
    loss = loss.detach() + add_row_penalty(model.row_regularised_tables(), regularizer)
    if cfg.grad_clip_norm:
        clip_grad_norm_(params, cfg.grad_clip_norm)
    scaler.step(optimizer)
    scaler.update()
    return loss


def _record_best(run: _Run, epoch: int, valid_auc: float, cfg: TrainConfig, best_path: Path) -> bool:
    """Early stopping's bookkeeping: keep (and write) the best weights, count epochs without gain."""
    if valid_auc > run.best_auc:
        run.best_auc, run.best_epoch, run.bad_epochs = valid_auc, epoch, 0
        run.best_state = {k: v.detach().cpu().clone() for k, v in run.model.state_dict().items()}
        save_weights(run.model.to_dict(), run.best_state, best_path)
        return True
    run.bad_epochs += 1
    run.stopped_early = run.bad_epochs >= cfg.early_stopping_patience
    return False


def _save_checkpoint(run: _Run, run_key: dict, last_path: Path) -> None:
    with atomic_path(last_path) as tmp:
        torch.save(run.checkpoint(run_key), tmp)


def _check_train_inputs(train_tensors: CTRTensors, valid_tensors: CTRTensors, n_items: int,
                        model_config: ModelConfig) -> None:
    level_vocab_size = model_config.level_vocab_size
    for name, t in (("train_tensors", train_tensors), ("valid_tensors", valid_tensors)):
        check_user_ids(model_config, t, name)
        if t.history_width < model_config.max_len:
            raise ValueError(f"ModelConfig.max_len={model_config.max_len} is longer than the histories of "
                             f"{name} ({t.history_width} positions); allowed: 1..{t.history_width}")
        if t.label is None:
            raise ValueError(f"{name} has no labels; train() needs labelled train and valid data")
        if len(t) == 0:
            raise ValueError(f"{name} is empty")
        check_labels(t.label.cpu().numpy(), name)
        t.validate(n_items, level_vocab_size)
    if valid_tensors.label.min() == valid_tensors.label.max():
        raise ValueError(f"valid_tensors labels are all {float(valid_tensors.label[0]):g}: valid AUC "
                         "(early stopping, LR schedule) needs both clicks and non-clicks")


def train(model_config: ModelConfig, train_config: TrainConfig, train_tensors: CTRTensors,
          valid_tensors: CTRTensors, item_embeddings: np.ndarray, *,
          item_tags: np.ndarray | None = None, device: str | torch.device = "cpu",
          checkpoint_dir: str | Path, data_fingerprint: str | None = None,
          on_epoch_end: Callable[[EpochLog], None] | None = None,
          progress: Callable[[int, int, int], None] | None = None,
          item_levels: np.ndarray | None = None) -> TrainResult:
    """Train the CTR model of ``model_config.family`` (default the Transformer + DCN-V2) with AdamW,
    LR-on-plateau and early stopping on valid AUC; resume if possible.

    ``data_fingerprint`` identifies the data for resuming (default: a hash of the tensors,
    embeddings and tags). ``on_epoch_end(log)`` runs after ``last.pt`` is written, so an exception
    there (or a kill) loses nothing. ``progress(epoch, step, n_steps)`` is called after each batch,
    and with ``step`` 0 before an epoch's first batch and while waiting for CPU cores, so a caller's
    deadline (a study's budget) also stops a run that has not trained yet.
    ``item_levels`` ``[n_items + 1, 2]``: each item's likes/views level (needed with use_item_levels).
    """
    cfg = train_config
    device = torch.device(device)
    check_precision(cfg.precision, device)
    item_embeddings = np.asarray(item_embeddings, dtype=np.float32)
    _check_train_inputs(train_tensors, valid_tensors, item_embeddings.shape[0] - 1, model_config)
    train_data = train_tensors.truncate(model_config.max_len)
    valid_data = valid_tensors.truncate(model_config.max_len)
    if data_fingerprint is None:
        extra = tuple(np.asarray(t) for t in (item_tags, item_levels) if t is not None)
        data_fingerprint = array_fingerprint(*train_data.arrays(), *valid_data.arrays(),
                                        item_embeddings, *extra)
    run_key = _run_key(model_config, cfg, data_fingerprint)
    statistics = None
    if model_config.use_statistics_features:  # training rows out of fold; valid rows from all training rows
        statistics, oof = TrainingStatistics.fit(
            train_data.item_id.cpu(), train_data.user_id.cpu(), train_data.label.cpu(), item_embeddings.shape[0] - 1,
            folds=model_config.statistics_folds, seed=cfg.seed, strength=model_config.statistics_prior_strength)
        train_data = dataclasses.replace(train_data, statistics=oof)
        valid_data = dataclasses.replace(valid_data, statistics=None)
    last_path, best_path = Path(checkpoint_dir) / "last.pt", Path(checkpoint_dir) / "best.pt"
    if device.type == "cuda":  # batches are then gathered on the GPU, no host round-trips
        train_data, valid_data = train_data.to(device), valid_data.to(device)
    valid_labels = valid_data.label.cpu().numpy()

    n_steps = len(_batch_bounds(len(train_data), cfg.batch_size)) - 1
    poll = None if progress is None else (lambda: progress(1, 0, n_steps))
    with _torch_settings(cfg.deterministic, cfg.num_threads, poll):
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        counts = (item_frequency(train_data, item_embeddings.shape[0] - 1)
                  if model_config.use_item_frequency else None)
        model = CTRModel(model_config, item_embeddings, item_tags, item_frequency=counts,
                         statistics=statistics, item_levels=item_levels).to(device)
        optimizer = make_optimizer(model, cfg)
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
            optimizer.flush()  # the sparse tables' pending regulariser pull, before they are read
            probs = predict_batches(model, valid_data, cfg.eval_batch_size, device, cfg.precision)
            valid_auc = auc(valid_labels, probs)
            improved = _record_best(run, epoch, valid_auc, cfg, best_path)
            run.scheduler.step(valid_auc)
            if (cfg.restore_best_on_lr_cut and not improved and not run.stopped_early
                    and optimizer.param_groups[0]["lr"] < lr):
                model.load_state_dict(run.best_state)  # before last.pt: a resume continues from here
            log = EpochLog(epoch=epoch, train_loss=train_loss, valid_auc=valid_auc,
                           valid_logloss=logloss(valid_labels, probs), lr=lr,
                           seconds=time.perf_counter() - t0,
                           samples_per_s=len(train_data) / train_seconds, improved=improved)
            run.history.append(log)
            _save_checkpoint(run, run_key, last_path)
            if on_epoch_end is not None:
                on_epoch_end(log)

        model.load_state_dict(run.best_state)
        if not best_path.exists():  # e.g. deleted after the run finished; last.pt still has it
            save_weights(model.to_dict(), run.best_state, best_path)
        valid_predictions = predict_batches(model.eval(), valid_data, cfg.eval_batch_size, device,
                                     cfg.precision)

    return TrainResult(
        best_valid_auc=run.best_auc, best_epoch=run.best_epoch, history=run.history,
        best_state_dict=run.best_state, model_config=model_config, train_config=cfg,
        valid_predictions=valid_predictions, resumed_from_epoch=resumed_from,
        stopped_early=run.stopped_early, resume_note=note, model=model,
        best_model_path=best_path)
