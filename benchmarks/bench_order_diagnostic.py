"""Diagnostic (issue 12): do order awareness and the Transformer family pay off when the item table
separates topics? The demo's `organisers` table barely does, so this builds an ORACLE table from
the generator's ground truth (each item's true topic centroid + unit noise, 128-d) and trains the
dcn_din preset with and without position, and the transformer_dcnv2 preset, on demo medium.
Not a deployable table: it only shows what the model families can use. One JSON line per run.

    .venv/bin/python benchmarks/bench_order_diagnostic.py EPOCHS   (data: .mmctr/bench/medium_v2)
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import json
import sys
import tempfile
import time

import numpy as np
import polars as pl

from mmctr_assets.lib.ctr.model_config import ModelConfig
from mmctr_assets.lib.ctr.presets import preset
from mmctr_assets.lib.ctr.tensors import to_tensors
from mmctr_assets.lib.ctr.trainer import TrainConfig, train

root = ".mmctr/bench/medium_v2"
items = pl.read_parquet(f"{root}/ground_truth/items.parquet").sort("item_id")
topic = np.concatenate([[0], items.get_column("topic").to_numpy()])
rng = np.random.default_rng(0)
centers = rng.normal(size=(topic.max() + 1, 128))
emb = (centers[topic] + 1.0 * rng.normal(size=(len(topic), 128))).astype(np.float32)
emb[0] = 0
tr, va = (to_tensors(pl.read_parquet(f"{root}/MicroLens_1M_x1/{t}.parquet"), 100, n_items=len(topic) - 1)
          for t in ("train", "valid"))
for name, changes in [("dcn_din position key", {}), ("dcn_din position none", {"position": "none"}),
                      ("transformer", None)]:
    model = (ModelConfig(**(preset("dcn_din")["model"] | {"max_len": 100} | (changes or {}))) if changes is not None
             else ModelConfig(**(preset("transformer_dcnv2")["model"] | {"max_len": 100})))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        r = train(model, TrainConfig(epochs=int(sys.argv[1]), num_threads=2, lr_factor=0.5, early_stopping_patience=3),
                  tr, va, emb, checkpoint_dir=d)
    print(json.dumps({"bench": "order_diagnostic", "table": "true topic centroid + noise (oracle, diagnostic only)",
                      "variant": name, "valid_auc": round(r.best_valid_auc, 4), "best_epoch": r.best_epoch,
                      "seconds": round(time.perf_counter() - t0, 1),
                      "samples_per_s": round(np.mean([h.samples_per_s for h in r.history]))}), flush=True)
