"""What the click statistics (``use_statistics_features``, lib/ctr/statistics.py) cost at the real
data's sizes: fitting them on the training rows (all-row totals plus the out-of-fold values, what
``trainer.train`` does once before the first epoch) and computing valid/test rows' values from the
fitted buffers (what every prediction batch does), beside the model file's extra bytes.

Synthetic ids with the real download's shape (91,717 items, about 1M users, 3.6M training rows,
379,142 test rows; skewed item popularity); the timing does not depend on the labels.

    .venv/bin/python benchmarks/bench_statistics.py [--rows 3600000] [--items 91717] [--users 1000000]
        [--test-rows 379142] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import emit, peak_mb  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=3_600_000)
    ap.add_argument("--items", type=int, default=91_717)
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--test-rows", type=int, default=379_142)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    import torch

    from mmctr_assets.lib.ctr.statistics import TrainingStatistics

    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    item = np.minimum(rng.zipf(1.3, args.rows), args.items)  # a long tail, as click logs have
    user = rng.integers(0, args.users, args.rows) * 7919  # sparse, unsorted raw ids
    label = (rng.random(args.rows) < 0.25).astype(np.float64)
    t0 = time.perf_counter()
    stats, oof = TrainingStatistics.fit(item, user, label, args.items, folds=5, seed=0)
    fit_s = time.perf_counter() - t0
    test_item = torch.as_tensor(np.minimum(rng.zipf(1.3, args.test_rows), args.items))
    test_user = torch.as_tensor(rng.integers(0, args.users, args.test_rows) * 7919)
    t0 = time.perf_counter()
    with torch.no_grad():
        for start in range(0, args.test_rows, 4096):  # as inference.predict batches
            stats(test_item[start:start + 4096], test_user[start:start + 4096])
    lookup_s = time.perf_counter() - t0
    extra = sum(b.numel() * b.element_size() for b in stats.buffers())
    emit(bench="statistics", rows=args.rows, items=args.items, users=stats.n_users, test_rows=args.test_rows,
         fit_s=round(fit_s, 2), lookup_rows_per_s=round(args.test_rows / lookup_s),
         model_file_extra_mb=round(extra / 2**20, 1), oof_shape=list(oof.shape),
         torch_threads=torch.get_num_threads(), peak_rss_mb=round(peak_mb()))


if __name__ == "__main__":
    main()
