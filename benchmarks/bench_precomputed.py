"""The content vectors without an encoder (issue 30): lib/embeddings/precomputed.py at a given size.

Synthetic txt_emb_BERT (768-d) and img_emb_CLIPRN50 (1024-d) for ``--items`` items (default the
real data's 91,717), projected to 512-d as clip_embeddings ``source: precomputed`` does: one JSON
line with the wall time of the projection and the process's peak RSS. The encoder it replaces is
measured by bench_clip.py (ViT-B/32 shapes on this CPU) for the comparison.

    .venv/bin/python benchmarks/bench_precomputed.py [--items 91717]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=91_717)
    args = ap.parse_args()

    from mmctr_assets.lib.embeddings.precomputed import project_precomputed

    rng = np.random.default_rng(0)
    n = args.items
    feature = pl.DataFrame({
        "item_id": np.arange(1, n + 1),
        "txt_emb_BERT": rng.standard_normal((n, 768), dtype=np.float32),
        "img_emb_CLIPRN50": rng.standard_normal((n, 1024), dtype=np.float32),
    }).with_columns(pl.col("txt_emb_BERT", "img_emb_CLIPRN50").cast(pl.List(pl.Float32)))
    t0 = time.perf_counter()
    _, emb, explained = project_precomputed(feature, n, seed=0)
    seconds = time.perf_counter() - t0
    emit(bench="precomputed_projection", items=n, dim=emb.shape[1], seconds=round(seconds, 2),
         items_per_s=round(n / seconds), explained_variance=round(explained, 4),
         peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


if __name__ == "__main__":
    main()
