"""GPU check: does mmctr use an accelerator well? One command, JSON lines, <= 8 minutes on one GPU.

    .venv/bin/python benchmarks/gpu_check.py                 # on a CUDA machine (CUDA build of torch)
    .venv/bin/python benchmarks/gpu_check.py --device cpu    # reduced mode, minutes on a CPU (CI runs it)

Lines (``check`` names each):
1. ``device``: GPU name/memory, torch and CUDA versions, torchvision (needed for on-device JPEG decode).
2. ``clip``: ViT-B/32-shape CLIP (random weights, real compute), bare image forward on ready tensors
   vs ``encode_items`` over real JPEG files (combine="image"), per precision (fp32/bf16/fp16 on
   CUDA; fp32/bf16 on the CPU) and, where torchvision is installed, per decode place (cpu: PIL in
   threads; device: nvJPEG): items/s and ratio. Reduced mode uses the stand-in tiny CLIP.
3. ``dcn_din_train`` / ``dcn_din_predict``: DCN-DIN at batch 4096 (fp32/bf16): the real training
   loop vs bare forward+backward+AdamW steps on the same batches already on the device, and
   ``predict()`` vs the bare forward.
4. ``graph``: the whole asset graph on demo data (medium; reduced mode: tiny) with the compute
   resource on the device: wall time per step.

Timing on CUDA synchronises the device before reading the clock. Every section runs even when an
earlier one fails; a failed section prints ``{"check": ..., "error": ...}`` and the exit code is 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

# sizes: full run on a GPU; reduced run (--device cpu) small enough for a CI test
FULL = {"clip_model": "full", "clip_items": 2048, "clip_hw": (360, 640), "clip_batch": 256, "clip_rounds": 2,
        "ctr_rows": 400_000, "ctr_batch": 4096, "graph_size": "medium", "graph_epochs": 3}
REDUCED = {"clip_model": "tiny", "clip_items": 64, "clip_hw": (96, 96), "clip_batch": 32, "clip_rounds": 1,
           "ctr_rows": 8192, "ctr_batch": 4096, "graph_size": "tiny", "graph_epochs": 1}


def emit(**line) -> None:
    print(json.dumps(line), flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(device)


def clock(device: torch.device, fn) -> float:
    """Seconds of ``fn()``, the device's queued work included."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def check_device(device: torch.device) -> None:
    line = {"check": "device", "device": str(device), "torch": torch.__version__, "cuda_build": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "python": platform.python_version(),
            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        line |= {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                 "capability": f"{props.major}.{props.minor}", "cudnn": torch.backends.cudnn.version(),
                 "bf16_supported": torch.cuda.is_bf16_supported()}
    try:
        import torchvision

        line["torchvision"] = torchvision.__version__
    except Exception:  # noqa: BLE001 - optional
        line["torchvision"] = None
    emit(**line)


def precisions(device: torch.device) -> list[str]:
    return ["fp32", "bf16", "fp16"] if device.type == "cuda" else ["fp32", "bf16"]


# ------------------------------------------------------------------------------------------- CLIP

def check_clip(device: torch.device, size: dict, work: Path) -> None:
    from bench_clip import make_items

    from mmctr_assets.lib.embeddings import clip as ce
    from mmctr_assets.lib.embeddings.tiny_clip import build_tiny_clip
    from mmctr_assets.lib.precision import autocast

    full_size = size["clip_model"] == "full"
    model_dir = build_tiny_clip(work / "clip", seed=0, full_size=full_size)
    (work / "img").mkdir()
    height, width = size["clip_hw"]
    items = make_items(work / "img", size["clip_items"], height, width, seed=0)
    n, bs = items.height, size["clip_batch"]
    decode_places = ["cpu"] + (["device"] if ce.device_jpeg_decoder() is not None else [])
    base = ce.load_clip(str(model_dir), device, "fp32")
    spec = ce.ImageSpec.from_processor(base.processor.image_processor)
    # ready tensors: what the encoder feeds the model, prepared beforehand and already on the device
    prepared = []
    for lo in range(0, n, bs):
        rows = items.slice(lo, bs)
        images = [spec.prepare_pil(ce.load_image(p, spec.draft_side)[0]) for p in rows["image_path"].to_list()]
        prepared.append(spec.normalise(torch.from_numpy(np.stack(images))).to(device))
    with ce.ImagePipeline() as pipe:
        for precision in precisions(device):
            bundle = ce.ClipBundle(base.model, base.processor, device, precision, True, str(model_dir))

            def bare():
                with torch.inference_mode(), autocast(device, precision):
                    for pixels in prepared:
                        base.model.get_image_features(pixel_values=pixels)

            def encode(place):
                res = ce.encode_items(items, bundle, batch_size=bs, combine="image", pipeline=pipe, decode_on=place)
                assert len(res.text_only_ids) == 0, "every check image must decode"

            bare()  # warm-up (kernels, autotuning, allocator)
            encode("cpu")
            runs = {"bare": bare} | {p: (lambda p=p: encode(p)) for p in decode_places}
            best = {k: min(clock(device, fn) for _ in range(size["clip_rounds"])) for k, fn in runs.items()}
            for place in decode_places:
                emit(check="clip", model="ViT-B/32 shapes" if full_size else "stand-in tiny CLIP",
                     device=str(device), precision=precision, items=n, batch_size=bs, image_hw=[height, width],
                     decode_on=place, bare_forward_items_per_s=round(n / best["bare"], 1),
                     encode_items_per_s=round(n / best[place], 1), ratio=round(best["bare"] / best[place], 3),
                     prep_threads=pipe.workers)


# ---------------------------------------------------------------------------------------- DCN-DIN

def check_dcn_din(device: torch.device, size: dict, work: Path) -> None:
    from bench_training import synthetic

    from mmctr_assets.lib.ctr.inference import predict
    from mmctr_assets.lib.ctr.model import CTRModel, bce_loss
    from mmctr_assets.lib.ctr.model_config import ModelConfig
    from mmctr_assets.lib.ctr.tensors import CTRTensors, item_frequency, to_tensors
    from mmctr_assets.lib.ctr.trainer import TrainConfig, train
    from mmctr_assets.lib.precision import autocast

    frames, emb, _, _ = synthetic(size["ctr_rows"])
    n_items = emb.shape[0] - 1
    # DCN-DIN over the item table alone, as this check has always timed (the library's defaults are
    # the default model, with id, tag and user tables)
    config = ModelConfig(family="dcn_din", use_id_embedding=False, use_tag_embedding=False, use_user_embedding=False,
                         embedding_regularizer=0.0)
    tensors = {k: to_tensors(f, config.max_len, n_items=n_items) for k, f in frames.items()}
    train_t, valid_t = tensors["train"], tensors["valid"]
    counts = item_frequency(train_t, n_items)
    bs = size["ctr_batch"]
    for precision in ("fp32", "bf16"):
        cfg = TrainConfig(batch_size=bs, epochs=1, precision=precision, deterministic=device.type != "cuda")
        perm = torch.randperm(len(train_t), generator=torch.Generator().manual_seed(cfg.seed))
        batches = [train_t.take(perm[i:i + bs]).to(device) for i in range(0, len(train_t), bs)]

        def bare_steps():
            torch.manual_seed(cfg.seed)
            model = CTRModel(config, emb, item_frequency=counts).to(device).train()
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
            for b in batches:
                with autocast(device, precision):
                    logits = model(b.item_id, b.item_seq, b.likes_level, b.views_level)
                loss = bce_loss(logits.float(), b.label)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip_norm)
                opt.step()

        bare_steps()  # warm-up
        bare_s = clock(device, bare_steps)
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            result = train(config, cfg, train_t, valid_t, emb, device=device, checkpoint_dir=tmp)
        loop = result.history[0].samples_per_s
        emit(check="dcn_din_train", device=str(device), precision=precision, batch_size=bs, rows=len(train_t),
             bare_step_samples_per_s=round(len(train_t) / bare_s), train_loop_samples_per_s=round(loop),
             ratio=round(loop * bare_s / len(train_t), 3), valid_auc=round(result.best_valid_auc, 4))

        model = result.model.to(device)
        infer = CTRTensors(*(torch.cat([a, b]) for a, b in zip(valid_t.arrays()[:4], tensors["test"].arrays()[:4])))
        ready = [infer.slice(i, i + bs).to(device) for i in range(0, len(infer), bs)]

        def bare_infer():
            with torch.inference_mode(), autocast(device, precision):
                for b in ready:
                    torch.sigmoid(model(*b.arrays()).float())

        bare_infer()
        bare_s = min(clock(device, bare_infer) for _ in range(2))
        pred_s = min(clock(device, lambda: predict(model, infer, batch_size=bs, device=device, precision=precision))
                     for _ in range(2))
        emit(check="dcn_din_predict", device=str(device), precision=precision, batch_size=bs, rows=len(infer),
             bare_forward_rows_per_s=round(len(infer) / bare_s), predict_rows_per_s=round(len(infer) / pred_s),
             ratio=round(bare_s / pred_s, 3))


# ------------------------------------------------------------------------------------------ graph

def check_graph(device: torch.device, size: dict, work: Path) -> None:
    from bench_pipeline import materialise, resources, train_config

    from mmctr_assets.defs import ctr as task2
    from mmctr_assets.defs import embeddings as task1
    from mmctr_assets.defs.common import clip_shards
    from mmctr_assets.defs.raw import raw_assets
    from mmctr_assets.lib.data import demo as demo_data
    from mmctr_assets.lib.embeddings.tiny_clip import build_tiny_clip
    from mmctr_assets.resources import ComputeResource

    data = work / f"demo-{size['graph_size']}"
    t0 = time.perf_counter()
    demo_data.generate(data, size["graph_size"], seed=0, overwrite=True, progress=False)
    generate_s = time.perf_counter() - t0
    clip_dir = build_tiny_clip(work / "graph-clip", seed=0)
    res = resources(data, work / "graph")
    res["compute"] = ComputeResource(device=str(device), num_workers=-1)
    keys = clip_shards.get_partition_keys()
    small = size["graph_size"] in ("tiny", "small")
    steps = [
        ("raw", raw_assets, {}, {}),
        ("clip_embeddings", [task1.clip_embeddings], {"ops": {"clip_embeddings": {"config": {"model": str(clip_dir)}}}},
         {"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]}),
        ("item2vec_embeddings", [task1.item2vec_embeddings], {}, {}),
        ("fused_item_embeddings", [task1.fused_item_embeddings], {}, {}),
        ("dcn_din_model", [task2.dcn_din_model],
         train_config("fused", {"epochs": size["graph_epochs"]} | ({"batch_size": 512} if small else {})), {}),
        ("predictions", [task2.predictions], {}, {}),
        ("submission_zip", [task2.submission_zip], {}, {}),
    ]
    walls = {}
    for name, assets, run_config, tags in steps:
        _, walls[name] = materialise(assets, res, run_config=run_config, tags=tags)
    emit(check="graph", device=str(device), data=size["graph_size"], epochs=size["graph_epochs"],
         generate_s=round(generate_s, 1), wall_s={k: round(v, 1) for k, v in walls.items()},
         total_s=round(sum(walls.values()), 1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu (cpu: reduced sizes)")
    ap.add_argument("--checks", default="device,clip,dcn_din,graph", help="comma-separated subset")
    ap.add_argument("--work-dir", type=Path, help="scratch folder (default: a temp dir, deleted)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        emit(check="device", device=str(device), torch=torch.__version__, cuda_build=torch.version.cuda,
             error="CUDA is not available: install a CUDA build of torch (README.md, Install for a GPU) "
                   "or run with --device cpu for the reduced mode.")
        return 1
    size = REDUCED if device.type == "cpu" else FULL
    checks = {"device": lambda w: check_device(device), "clip": lambda w: check_clip(device, size, w),
              "dcn_din": lambda w: check_dcn_din(device, size, w), "graph": lambda w: check_graph(device, size, w)}
    failed = False
    with tempfile.TemporaryDirectory(dir=args.work_dir, prefix="mmctr-gpu-check-") as tmp:
        for name in args.checks.split(","):
            work = Path(tmp) / name
            work.mkdir()
            t0 = time.perf_counter()
            try:
                checks[name](work)
            except Exception as exc:  # noqa: BLE001 - report and go on with the other checks
                failed = True
                emit(check=name, device=str(device), error=f"{type(exc).__name__}: {exc}",
                     traceback=traceback.format_exc()[-2000:])
            print(f"[gpu_check] {name}: {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
