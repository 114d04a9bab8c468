"""Is the default model's training step as cheap as it should be, at the real catalog size and at
any size? And is training/inference as fast as the bare model, per model family?

1. ``step`` (always; one line per ``--items`` count): the default model (dcn_din_model's default
   config: Transformer + DCN-V2 over trainable item-id, tag and user tables), and the same with
   whole-table steps (``default_dense``: ``sparse_embedding_updates: false``), beside the
   ``dcn_din`` preset, the default before its tables narrowed (``wide_default``: 64-d id and tag
   tables, 3 cross layers) and the former default (``former_default``: the config the default was
   before issue 31, ``elementwise`` Transformer tokens, last 8, cross rank 32): bare training steps
   (lib/ctr/trainer.py ``training_step``: forward, loss + regulariser, backward, clip, optimiser
   step) on the same batches, alternated for ``--repeats`` rounds, best of each;
   ``<model>_ratio`` = its samples/s over dcn_din's (goal >= 0.6 at 91,717 items), ``_cpu_ratio``
   the same from process CPU time per step (with ``--threads 1`` the figure a loaded machine
   distorts least). Data: the
   synthetic set below with ``--items`` items (default the real 91,717), batch 4096, histories of
   width 100 with the real length statistics (min 3, median 6, mean ~8), ``--threads`` 2.
   With several ``--items`` counts (``--items 10000,1000000``) rounds interleave all counts, and a
   ``catalog_scaling`` line per model gives its step time at the largest count over the smallest
   (goal <= 1.5).
2. ``sharing`` (``--processes 2``): the default's steps in one process alone, then in N processes
   started together, each taking its threads from the machine-wide core lease
   (lib/cores.py, as ``train()`` does); summed samples/s of the N over the one alone (goal >= 0.8).
   ``--threads-per-process 1`` caps each process's lease (``compute.cpu_threads``).
3. With ``--train-loop``, the older per-family lines (each family's preset, lib/ctr/presets.py;
   ``--families`` may name ``default`` too), on demo_data ``medium`` (or ``--synthetic``):

   a. ``train_loop``: samples/s of ``train()`` for one epoch (seeded batch slicing, eval and
      checkpoint included) vs the bare steps on the same batches already in memory. Goals: ratio
      >= 0.8 and >= 10,000 samples/s.
   b. ``attention`` (dcn_din): training-step samples/s with the padded reference attention, packed
      attention, and packed attention with the split first layer (the default).
   c. ``predict``: rows/s of ``predict()`` vs the bare forward on ready tensors.

Comparisons alternate their sides and report the best of each, so load from other processes on a
shared box hurts both sides alike: the ratios are what count, not the absolute rates.

    .venv/bin/python benchmarks/bench_training.py [--items 91717[,1000000]] [--threads 2] [--repeats 3]
        [--steps 20] [--processes 2 [--threads-per-process 1] [--no-lease] [--model default]]
        [--train-loop [--synthetic [--history-median 60]] [--rows 200000] [--families ...]
         [--max-len 100] [--train-rows N] [--batch-sizes 1024,4096] [--skip-attention] [--skip-predict]]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmctr_assets.lib.ctr.inference import predict  # noqa: E402
from mmctr_assets.lib.ctr.model import CTRModel, bce_loss  # noqa: E402
from mmctr_assets.lib.ctr.model_config import FAMILIES, ModelConfig  # noqa: E402
from mmctr_assets.lib.ctr.presets import preset  # noqa: E402
from mmctr_assets.lib.ctr.tensors import CTRTensors, item_frequency, to_tensors  # noqa: E402
from mmctr_assets.lib.ctr.trainer import TrainConfig, train  # noqa: E402

try:
    from mmctr_assets.lib.ctr.trainer import make_optimizer, training_step
except ImportError:  # run against a checkout before row-wise table updates, for the baseline
    make_optimizer = training_step = None

BATCH = 4096
REAL_ITEMS = 91_717
MAX_LEN = 100


def emit(**result) -> None:
    result.update(load_avg_1m=round(os.getloadavg()[0], 2), threads=torch.get_num_threads(),
                  torch=torch.__version__, cpu=platform.processor() or platform.machine())
    print(json.dumps(result), flush=True)


def demo_medium(cache: Path) -> tuple[dict[str, pl.DataFrame], np.ndarray, np.ndarray, str]:
    from mmctr_assets.lib.data import demo as demo_data

    root = cache / "demo_medium_seed0"
    if not (root / "MicroLens_1M_x1" / "item_info.parquet").exists():
        demo_data.generate(root, size="medium", seed=0, overwrite=True, progress=False)
    data = root / "MicroLens_1M_x1"
    frames = {name: pl.read_parquet(data / f"{name}.parquet") for name in ("train", "valid", "test")}
    info = pl.read_parquet(data / "item_info.parquet").sort("item_id")
    emb = info.get_column("item_emb_d128").list.to_array(128).to_numpy().astype(np.float32)
    tags = info.get_column("item_tags")
    tags = tags.list.to_array(int(tags.list.len().max())).to_numpy().astype(np.int64)
    return frames, emb, tags, "demo_data medium"


def synthetic(rows: int, n_items: int = 10_000, seed: int = 0, history_median: float = 6.0):
    """Left-padded width-100 histories; lengths lognormal, clipped to [3, 100] (median
    ``history_median``; the default 6 gives mean ~8, like MicroLens); 5 tags per item."""
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n_items + 1, 128)).astype(np.float32)
    emb[0] = 0
    tags = rng.integers(1, 200, (n_items + 1, 5))
    tags[0] = 0

    def frame(n, labels=True):
        lengths = np.clip(np.floor(rng.lognormal(np.log(history_median), 0.75, n)), 3, 100).astype(int)
        seq = rng.integers(1, n_items + 1, (n, 100))
        seq[np.arange(100)[None, :] < 100 - lengths[:, None]] = 0
        f = pl.DataFrame({"user_id": rng.integers(1, rows // 3, n), "item_seq": seq,
                          "item_id": rng.integers(1, n_items + 1, n),
                          "likes_level": rng.integers(1, 11, n), "views_level": rng.integers(1, 11, n)})
        return f.with_columns(label=pl.Series(rng.integers(0, 2, n).astype(float))) if labels else f

    frames = {"train": frame(rows), "valid": frame(10_000), "test": frame(20_000, False)}
    return frames, emb, tags, f"synthetic, history median {history_median:g}"


def batches_like_train(tensors: CTRTensors, cfg: TrainConfig) -> list[CTRTensors]:
    """The exact batches train() will draw in its first epoch, materialised in advance."""
    perm = torch.randperm(len(tensors), generator=torch.Generator().manual_seed(cfg.seed))
    size = cfg.batch_size
    return [tensors.take(perm[i:i + size]) for i in range(0, len(tensors), size)]


def bare_train_rate(model_config: ModelConfig, emb: np.ndarray, counts: np.ndarray,
                    batches: list[CTRTensors], cfg: TrainConfig, tags: np.ndarray | None = None,
                    cpu: list[float] | None = None) -> float:
    """samples/s of train()'s own step function over ``batches`` (model built outside the clock);
    appends the process CPU seconds per step to ``cpu`` (less hurt by other processes' load)."""
    torch.manual_seed(cfg.seed)
    tags = tags if model_config.use_tag_embedding else None
    model = CTRModel(model_config, emb, tags, item_frequency=counts).train()
    n = sum(len(b) for b in batches)
    if training_step is None:  # a checkout before lib/ctr/optim.py (the baseline): its plain step
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        c0, t0 = time.process_time(), time.perf_counter()
        for b in batches:
            loss = bce_loss(model(*b.model_inputs()), b.label)
            if model_config.embedding_regularizer > 0:
                loss = loss + model.embedding_penalty()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip_norm)
            opt.step()
    else:
        optimizer = make_optimizer(model, cfg)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        device = torch.device("cpu")
        c0, t0 = time.process_time(), time.perf_counter()
        for b in batches:
            training_step(model, optimizer, scaler, b, cfg, device, params)
    seconds = time.perf_counter() - t0
    if cpu is not None:
        cpu.append((time.process_time() - c0) / len(batches))
    return n / seconds


def model_configs() -> dict[str, ModelConfig]:
    """The default (dcn_din_model's config when a run config says nothing), the default with the
    whole-table step (``sparse_embedding_updates: false``), the default before its tables narrowed
    (``wide_default``: 64-d item-id and tag tables, 3 cross layers), the former default
    (``former_default``: the default's config before issue 31: the Transformer tokens of models
    saved before ``token_interaction``, last 8, cross rank 32, and the wide tables), each when the
    library has the option, and the dcn_din preset."""
    configs = {name: ModelConfig(**(preset(name)["model"] | {"max_len": MAX_LEN})) for name in ("default", "dcn_din")}
    if "sparse_embedding_updates" in ModelConfig.__dataclass_fields__:
        configs["default_dense"] = dataclasses.replace(configs["default"], sparse_embedding_updates=False)
    wide = dataclasses.replace(configs["default"], id_embedding_dim=64, tag_embedding_dim=64, cross_layers=3)
    if wide != configs["default"]:
        configs["wide_default"] = wide
    if "token_interaction" in ModelConfig.__dataclass_fields__:
        configs["former_default"] = dataclasses.replace(wide, token_interaction="elementwise", last_k=8, cross_rank=32)
    return configs


def step_data(n_items: int, steps: int, seed: int = 0):
    """``steps`` training batches of the synthetic set with ``n_items`` items, plus what models need."""
    frames, emb, tags, source = synthetic(steps * BATCH, n_items=n_items, seed=seed)
    train_t = to_tensors(frames["train"], MAX_LEN, n_items=n_items)
    cfg = TrainConfig(batch_size=BATCH, epochs=1)
    return batches_like_train(train_t, cfg), emb, tags, item_frequency(train_t, n_items), source


def step_comparison(args, items: list[int]) -> None:
    """1. default vs dcn_din bare steps per catalog size, every size and both models alternated."""
    configs = model_configs()
    cfg = TrainConfig(batch_size=BATCH, epochs=1)
    data = {n: step_data(n, args.steps) for n in items}
    for n, (batches, emb, tags, counts, _) in data.items():
        for config in configs.values():  # warm-up: lazy init, allocator
            bare_train_rate(config, emb, counts, batches[:2], cfg, tags)
    rates: dict[tuple[int, str], list[float]] = {}
    cpu: dict[tuple[int, str], list[float]] = {}
    for _ in range(args.repeats):
        for n, (batches, emb, tags, counts, _) in data.items():
            for name, config in configs.items():
                rates.setdefault((n, name), []).append(
                    bare_train_rate(config, emb, counts, batches, cfg, tags, cpu.setdefault((n, name), [])))
    best = {k: max(v) for k, v in rates.items()}
    best_cpu = {k: min(v) for k, v in cpu.items()}
    for n, (batches, emb, tags, counts, source) in data.items():
        dcn_din = best[n, "dcn_din"]
        per_model = {}
        for name in configs:
            if name != "dcn_din":
                per_model |= {f"{name}_samples_per_s": round(best[n, name]),
                              f"{name}_cpu_ms_per_step": round(1000 * best_cpu[n, name], 1),
                              f"{name}_ratio": round(best[n, name] / dcn_din, 3),
                              f"{name}_cpu_ratio": round(best_cpu[n, "dcn_din"] / best_cpu[n, name], 3)}
        emit(bench="step", n_items=n, source=source, batch_size=BATCH, max_len=MAX_LEN, steps=len(batches),
             repeats=args.repeats, dcn_din_samples_per_s=round(dcn_din),
             dcn_din_cpu_ms_per_step=round(1000 * best_cpu[n, "dcn_din"], 1), **per_model, goal_ratio=0.6,
             library="row-wise updates" if training_step else "before row-wise updates (AdamW over whole tables)")
    if len(items) > 1:
        lo, hi = min(items), max(items)
        for name in (k for k in configs if k != "dcn_din"):
            growth = best[lo, name] / best[hi, name]
            emit(bench="catalog_scaling", model=name, n_items=[lo, hi],
                 step_ms=[round(1000 * BATCH / best[n, name], 1) for n in (lo, hi)],
                 cpu_ms_per_step=[round(1000 * best_cpu[n, name], 1) for n in (lo, hi)],
                 step_cost_growth=round(growth, 3), cpu_growth=round(best_cpu[hi, name] / best_cpu[lo, name], 3),
                 goal=1.5, meets_goal=growth <= 1.5)


def child(args) -> None:
    """One process of the sharing figure: lease cores as train() does, run the default's steps."""
    from mmctr_assets.lib.cores import core_lease

    batches, emb, tags, counts, _ = step_data(args.items_list[0], args.steps)
    cfg = TrainConfig(batch_size=BATCH, epochs=1)
    config = model_configs()[args.model]
    bare_train_rate(config, emb, counts, batches[:1], cfg, tags)  # warm-up outside the lease
    asked = time.time()
    lease = (contextlib.nullcontext(args.threads_per_process or torch.get_num_threads()) if args.no_lease
             else core_lease(want=args.threads_per_process))
    with lease as cores:
        torch.set_num_threads(cores)
        start = time.time()
        rate = bare_train_rate(config, emb, counts, batches, cfg, tags)
        end = time.time()
    print(json.dumps({"samples": sum(len(b) for b in batches), "samples_per_s": rate, "threads": cores,
                      "waited_s": start - asked, "start": start, "end": end}), flush=True)


def _run_children(args, n: int) -> list[dict]:
    command = [sys.executable, __file__, "--child", "--items", str(args.items_list[0]), "--steps", str(args.steps),
               "--model", args.model]
    if args.threads_per_process:
        command += ["--threads-per-process", str(args.threads_per_process)]
    if args.no_lease:
        command += ["--no-lease"]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(n)]
    out = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"child process failed ({p.returncode})")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def sharing(args) -> None:
    """2. one process alone, then ``--processes`` at once (best of ``--repeats`` each, alternated)."""
    alone, together, last = [], [], None
    for _ in range(args.repeats):
        (one,) = _run_children(args, 1)
        alone.append(one["samples_per_s"])
        last = _run_children(args, args.processes)
        wall = max(r["end"] for r in last) - min(r["start"] for r in last)
        together.append(sum(r["samples"] for r in last) / wall)
    ratio = max(together) / max(alone)
    emit(bench="sharing", model=args.model, n_items=args.items_list[0], processes=args.processes, steps=args.steps,
         threads_per_process=args.threads_per_process or ("torch default" if args.no_lease else "lease"),
         lease=not args.no_lease, repeats=args.repeats,
         alone_samples_per_s=round(max(alone)), summed_samples_per_s=round(max(together)),
         last_round=[{k: round(r[k], 2) for k in ("samples_per_s", "threads", "waited_s")} for r in last],
         ratio=round(ratio, 3), goal_ratio=0.8, meets_goal=ratio >= 0.8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", default=str(REAL_ITEMS),
                    help="catalog size(s) of the step comparison, comma-separated (default the real 91,717)")
    ap.add_argument("--steps", type=int, default=20, help="training steps per model and round (batch 4096)")
    ap.add_argument("--processes", type=int, default=0, help="> 1: the sharing figure with this many processes")
    ap.add_argument("--threads-per-process", type=int, default=None,
                    help="--processes: most cores each process leases (default: all free ones)")
    ap.add_argument("--no-lease", action="store_true",
                    help="--processes: each takes its threads without the lease (how it was before issue 31)")
    ap.add_argument("--model", default="default", help="--processes: default, default_dense or dcn_din")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-step", action="store_true", help="skip the step lines (e.g. only --processes)")
    ap.add_argument("--train-loop", action="store_true",
                    help="also the per-family train_loop / attention / predict lines")
    ap.add_argument("--synthetic", action="store_true", help="--train-loop: skip demo_data; synthesise in memory")
    ap.add_argument("--rows", type=int, default=200_000, help="train rows for --synthetic")
    ap.add_argument("--cache", type=Path, default=Path(".mmctr/bench"), help="where demo data is kept")
    ap.add_argument("--attention-batches", type=int, default=12,
                    help="training steps per attention variant (the padded one is slow)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2: the project's machines)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating rounds; best of each is reported")
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma-separated model families")
    ap.add_argument("--max-len", type=int, default=100, help="history cap (the data's width: 100)")
    ap.add_argument("--train-rows", type=int, default=None, help="use only the first N train rows")
    ap.add_argument("--history-median", type=float, default=6.0, help="--synthetic: median history length")
    ap.add_argument("--batch-sizes", default=str(BATCH),
                    help="comma-separated training batch sizes for the train_loop lines (default 4096)")
    ap.add_argument("--skip-attention", action="store_true", help="skip the attention comparison")
    ap.add_argument("--skip-predict", action="store_true", help="skip the inference comparison")
    args = ap.parse_args()
    args.items_list = [int(n) for n in args.items.split(",")]
    if args.child:
        return child(args)
    torch.set_num_threads(args.threads)
    if not args.no_step:
        step_comparison(args, args.items_list)
    if args.processes > 1:
        sharing(args)
    if args.train_loop:
        per_family(args)


def per_family(args) -> None:
    """3. the per-family train_loop, attention and predict lines."""
    global MAX_LEN
    MAX_LEN = args.max_len

    try:
        frames, emb, tags, source = (synthetic(args.rows, args.items_list[0], history_median=args.history_median)
                                     if args.synthetic
                                     else demo_medium(args.cache))
    except ImportError:
        frames, emb, tags, source = synthetic(args.rows, args.items_list[0], history_median=args.history_median)
    n_items = emb.shape[0] - 1
    t0 = time.perf_counter()
    if args.train_rows:
        frames["train"] = frames["train"].head(args.train_rows)
    tensors = {k: to_tensors(f, MAX_LEN, n_items=n_items) for k, f in frames.items()}
    conv_s = time.perf_counter() - t0
    real = (tensors["train"].item_seq != 0).sum(1).float()
    emit(bench="data", source=source, rows={k: len(t) for k, t in tensors.items()},
         to_tensors_rows_per_s=round(sum(len(f) for f in frames.values()) / conv_s),
         history_len_median=float(real.median()), history_len_mean=round(float(real.mean()), 2),
         padding_share=round(1 - float(real.mean()) / MAX_LEN, 3))

    train_t, valid_t = tensors["train"], tensors["valid"]
    counts = item_frequency(train_t, n_items)  # what train() computes before its first step
    # 1. per batch size and family: the real train() loop vs bare steps on pre-built batches (same
    #    batches, same order), alternated and best-of-N, so load from other processes hits both sides alike.
    #    Attention and inference below use the first batch size.
    first = None  # only the first size's batches are kept, for the sections below
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        cfg = TrainConfig(batch_size=batch_size, epochs=1, num_threads=args.threads)
        batches = batches_like_train(train_t, cfg)
        results = train_loop(args, cfg, batches, emb, counts, tags, train_t, valid_t)
        if first is None:
            first = (cfg, batches, results)
    cfg, batches, results = first

    if not args.skip_attention:
        attention(args, emb, counts, batches, cfg)
    if not args.skip_predict:
        inference(args, results, tensors, cfg)


def train_loop(args, cfg, batches, emb, counts, tags, train_t, valid_t) -> dict:
    """One ``train_loop`` line per family at ``cfg.batch_size``; returns each family's TrainResult."""
    results = {}
    for family in args.families.split(","):
        model_config = ModelConfig(**(preset(family)["model"] | {"max_len": MAX_LEN}))
        bare_train_rate(model_config, emb, counts, batches[:2], cfg, tags)  # warm-up: lazy init, allocator
        bare, loop, end_to_end = [], [], []
        item_tags = tags if model_config.use_tag_embedding else None
        for _ in range(args.repeats):
            bare.append(bare_train_rate(model_config, emb, counts, batches, cfg, tags))
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                result = train(model_config, cfg, train_t, valid_t, emb, item_tags=item_tags, checkpoint_dir=tmp)
                end_to_end.append(len(train_t) / (time.perf_counter() - t0))
            loop.append(result.history[0].samples_per_s)
        bare, loop, end_to_end = max(bare), max(loop), max(end_to_end)
        results[family] = result
        emit(bench="train_loop", family=family, model=model_config.to_dict(), batch_size=cfg.batch_size,
             max_len=MAX_LEN, train_rows=len(train_t), repeats=args.repeats, bare_step_samples_per_s=round(bare),
             train_epoch_samples_per_s=round(loop), train_call_samples_per_s=round(end_to_end),
             ratio=round(loop / bare, 3), ratio_whole_call=round(end_to_end / bare, 3), goal_ratio=0.8,
             goal_samples_per_s=10_000, meets_goal=loop / bare >= 0.8 and loop >= 10_000,
             valid_auc_after_1_epoch=round(result.best_valid_auc, 4))
    return results


def attention(args, emb, counts, batches, cfg) -> None:
    """2. attention implementations (dcn_din preset), identical batches and initial weights, alternated."""
    model_config = ModelConfig(**(preset("dcn_din")["model"] | {"max_len": MAX_LEN}))
    few = batches[:args.attention_batches]
    rates: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for impl in ("padded", "packed", "packed_split"):
            rates.setdefault(impl, []).append(
                bare_train_rate(dataclasses.replace(model_config, attention_impl=impl), emb, counts, few, cfg))
    best = {k: max(v) for k, v in rates.items()}
    emit(bench="attention", batch_size=cfg.batch_size, max_len=MAX_LEN, steps=len(few), repeats=args.repeats,
         **{f"{k}_samples_per_s": round(v) for k, v in best.items()},
         packed_speedup=round(best["packed"] / best["padded"], 2),
         packed_split_speedup=round(best["packed_split"] / best["padded"], 2),
         goal_samples_per_s=10_000, meets_goal=best["packed_split"] >= 10_000)



def inference(args, results, tensors, cfg) -> None:
    """3. inference (first family): predict() vs bare forward on ready tensors, alternated."""
    model = next(iter(results.values())).model
    infer = CTRTensors(*(torch.cat([a, b]) if a is not None and b is not None else None
                         for a, b in zip(tensors["valid"]._fields(), tensors["test"]._fields())))
    eval_bs = cfg.eval_batch_size
    ready = [infer.slice(i, i + eval_bs) for i in range(0, len(infer), eval_bs)]
    bare_inf, pred = [], []
    with torch.inference_mode():
        model(*ready[0].model_inputs())  # warm-up
    for _ in range(3 * args.repeats):
        with torch.inference_mode():
            t0 = time.perf_counter()
            for b in ready:
                torch.sigmoid(model(*b.model_inputs()))
            bare_inf.append(len(infer) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        predict(model, infer, batch_size=eval_bs)
        pred.append(len(infer) / (time.perf_counter() - t0))
    emit(bench="predict", batch_size=eval_bs, rows=len(infer), repeats=3 * args.repeats,
         bare_forward_rows_per_s=round(max(bare_inf)), predict_rows_per_s=round(max(pred)),
         ratio=round(max(pred) / max(bare_inf), 3))


if __name__ == "__main__":
    main()
