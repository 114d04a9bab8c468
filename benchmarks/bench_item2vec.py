"""Does item2vec's pipeline cost no more than gensim's own training? (goal: <= 1.3x)

On the full-size demo train split (3.6M histories, MicroLens length distribution), one process:

* ours: ``build_corpus`` (polars: parquet -> LineSentence file, one line per user timeline; the
  token count of one line per row is reported beside it) + ``train_item2vec`` (polars
  vocabulary + gensim skip-gram in corpus_file mode), timed end to end;
* baseline: gensim alone on the already prepared corpus with the same parameters:
  ``Word2Vec.build_vocab(corpus_file=...)`` (reported, not counted) and ``train()`` (the baseline).

One JSON line per result. Peak RSS per phase is sampled with psutil (the process's RSS, so a
phase's peak includes what is still held from before it: the baseline runs after ours).

    .venv/bin/python benchmarks/bench_item2vec.py [--data-dir DIR] [--epochs 5] [--workers 2]

``--compare`` instead trains once in each mode of ``item2vec_embeddings`` on one corpus, side by
side: reproducible (one worker, the asset's default) and fast (one worker per core this process may
use, the asset's ``workers: 0``), with their wall and CPU seconds and how alike the two embeddings
are (the share of each sampled item's 10 nearest neighbours the two agree on):

    .venv/bin/python benchmarks/bench_item2vec.py --compare [--seed-baseline]

``--determinism 1,2`` instead trains our pipeline twice per worker count on one corpus and reports
the training time and whether the two runs' vectors are bit-identical (the price of the
reproducible default, workers=1; README, item2vec):

    .venv/bin/python benchmarks/bench_item2vec.py --size medium --determinism 1,2

Without ``--data-dir`` the full-size demo data is generated into a temp folder (~100 s, about
0.5 GB) and deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
from gensim.models import Word2Vec  # imported up front: import time is not what is compared

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmctr_assets.lib.embeddings import item2vec  # noqa: E402

MB = 1 << 20


@contextmanager
def peak_rss():
    """Sample this process's RSS every 20 ms; yields a dict that gets 'peak_rss_mb'."""
    proc, out, stop = psutil.Process(), {}, threading.Event()
    peak = [proc.memory_info().rss]

    def sample():
        while not stop.wait(0.02):
            peak[0] = max(peak[0], proc.memory_info().rss)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        out["peak_rss_mb"] = round(max(peak[0], proc.memory_info().rss) / MB)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, help="folder holding MicroLens_1M_x1/train.parquet")
    parser.add_argument("--size", default="full", help="demo size to generate without --data-dir")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare", action="store_true",
                        help="one training per mode: reproducible (1 worker) vs fast (a worker per core)")
    parser.add_argument("--seed-baseline", action="store_true",
                        help="--compare: also a reproducible run with another seed (the neighbour-overlap noise floor)")
    parser.add_argument("--determinism", metavar="W1,W2,...",
                        help="train twice per worker count; report seconds and bit-identical vectors")
    args = parser.parse_args(argv)
    params = dict(dim=128, window=5, min_count=1, epochs=args.epochs, negative=5, workers=args.workers,
                  seed=args.seed)
    common = {"bench": "item2vec", "cpus": os.cpu_count(), "params": params}

    def emit(**kw):
        load = dict(zip(("load_avg_1m", "load_avg_5m"), (round(x, 2) for x in os.getloadavg()[:2])))
        print(json.dumps(common | kw | load), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data_dir = args.data_dir
        if data_dir is None:
            from mmctr_assets.lib.data import demo as demo_data

            data_dir = tmp / "data"
            t = time.perf_counter()
            demo_data.generate(data_dir, size=args.size, seed=args.seed, progress=False)
            emit(phase="generate_demo_data", size=args.size, seconds=round(time.perf_counter() - t, 1))
        train = data_dir / "MicroLens_1M_x1" / "train.parquet"
        if args.compare:
            return _compare(train, tmp, params, emit, args.seed_baseline)
        if args.determinism:
            return _determinism(train, tmp, params, [int(w) for w in args.determinism.split(",")], emit)
        rss0 = round(psutil.Process().memory_info().rss / MB)

        # ours, end to end
        with peak_rss() as mem:
            t = time.perf_counter()
            stats = item2vec.build_corpus(train, tmp / "corpus.txt")
            t_corpus = time.perf_counter() - t
        emit(phase="ours_build_corpus", seconds=round(t_corpus, 2), rows=stats.n_rows,
             sentences=stats.n_sentences, tokens=stats.n_tokens, items=stats.n_items,
             corpus_mb=round(stats.path.stat().st_size / MB, 1), rss_before_mb=rss0, **mem)
        # what one line per row (the notebook's corpus) would hand gensim instead: tokens drive its time
        t = time.perf_counter()
        per_row = item2vec.build_corpus(train, tmp / "per_row.txt", one_line_per_user=False)
        emit(phase="reference_corpus_one_line_per_row", seconds=round(time.perf_counter() - t, 2),
             sentences=per_row.n_sentences, tokens=per_row.n_tokens,
             tokens_ours_vs_per_row=round(stats.n_tokens / per_row.n_tokens, 3))
        (tmp / "per_row.txt").unlink()
        with peak_rss() as mem:
            t = time.perf_counter()
            ours = item2vec.train_item2vec(stats.path, **params)
            t_train = time.perf_counter() - t
        emit(phase="ours_train_item2vec", seconds=round(t_train, 2),
             seconds_vocab=round(ours.seconds_vocab, 2), seconds_gensim_train=round(ours.seconds_train, 2),
             items_with_vector=len(ours.item_ids), **mem)

        # baseline: gensim alone on the prepared corpus
        with peak_rss() as mem:
            model = Word2Vec(vector_size=params["dim"], window=params["window"], min_count=params["min_count"],
                             sg=1, negative=params["negative"], workers=params["workers"], seed=params["seed"],
                             epochs=params["epochs"])
            t = time.perf_counter()
            model.build_vocab(corpus_file=str(stats.path))
            t_vocab = time.perf_counter() - t
            t = time.perf_counter()
            model.train(corpus_file=str(stats.path), total_examples=model.corpus_count,
                        total_words=model.corpus_total_words, epochs=params["epochs"])
            t_base = time.perf_counter() - t
        emit(phase="baseline_gensim", seconds_train=round(t_base, 2), seconds_build_vocab_not_counted=round(t_vocab, 2),
             items_with_vector=len(model.wv), **mem)

        total = t_corpus + t_train
        emit(phase="comparison", ours_total_seconds=round(total, 2), baseline_train_seconds=round(t_base, 2),
             ratio=round(total / t_base, 3), goal=1.3, meets_goal=total / t_base <= 1.3,
             vocab_polars_vs_gensim_scan_s=[round(ours.seconds_vocab, 2), round(t_vocab, 2)],
             process_max_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    return 0


def _determinism(train: Path, tmp: Path, params: dict, workers: list[int], emit) -> int:
    """Per worker count: two trainings on the same corpus, their time, and whether they agree bit for bit."""
    import numpy as np

    stats = item2vec.build_corpus(train, tmp / "corpus.txt")
    emit(phase="corpus", sentences=stats.n_sentences, tokens=stats.n_tokens, items=stats.n_items)
    base = None
    for w in workers:
        runs, cpu = [], []
        for _ in range(2):
            before = resource.getrusage(resource.RUSAGE_SELF)
            runs.append(item2vec.train_item2vec(stats.path, **(params | {"workers": w})))
            after = resource.getrusage(resource.RUSAGE_SELF)
            cpu.append(round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1))
        same = all(np.array_equal(a, b) for a, b in zip((runs[0].item_ids, runs[0].vectors),
                                                         (runs[1].item_ids, runs[1].vectors)))
        seconds = [round(r.seconds_train, 2) for r in runs]
        base = base or min(seconds)
        # cpu_seconds (all threads): on an idle machine one worker's wall time is about its CPU time
        emit(phase="determinism", workers=w, seconds_train=seconds, cpu_seconds=cpu, bit_identical=same,
             time_vs_first_count=round(min(seconds) / base, 3),
             max_abs_diff=float(np.abs(runs[0].vectors - runs[1].vectors).max()))
    return 0


def _neighbours(vectors, rows, k: int = 10, chunk: int = 256):
    """Indices of each sampled row's k nearest neighbours (cosine), itself excluded."""
    import numpy as np

    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    out = []
    for a in range(0, len(rows), chunk):
        idx = rows[a:a + chunk]
        sim = unit[idx] @ unit.T
        sim[np.arange(len(idx)), idx] = -np.inf
        out.append(np.argpartition(-sim, k, axis=1)[:, :k])
    return np.concatenate(out)


def _compare(train: Path, tmp: Path, params: dict, emit, seed_baseline: bool, sample: int = 2000) -> int:
    """The asset's two modes on one corpus: reproducible (1 worker) then fast (a worker per core)."""
    import numpy as np

    from mmctr_assets.lib.embeddings.clip import available_cpus

    stats = item2vec.build_corpus(train, tmp / "corpus.txt")
    emit(phase="corpus", rows=stats.n_rows, sentences=stats.n_sentences, tokens=stats.n_tokens, items=stats.n_items,
         seconds=round(stats.seconds, 1))
    results = {}
    modes = [("reproducible", 1, params["seed"]), ("fast", available_cpus(), params["seed"])]
    if seed_baseline:  # the noise floor: how alike two reproducible runs with different seeds are
        modes.append(("reproducible_other_seed", 1, params["seed"] + 1))
    for mode, workers, seed in modes:
        before, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        results[mode] = item2vec.train_item2vec(stats.path, **(params | {"workers": workers, "seed": seed}))
        after = resource.getrusage(resource.RUSAGE_SELF)
        emit(phase="mode", mode=mode, workers=workers, seconds=round(time.perf_counter() - t, 1),
             seconds_gensim_train=round(results[mode].seconds_train, 1),
             cpu_seconds=round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1))
    a, b = results["reproducible"], results["fast"]
    assert np.array_equal(a.item_ids, b.item_ids)
    rows = np.random.default_rng(0).choice(len(a.item_ids), min(sample, len(a.item_ids)), replace=False)
    near = {mode: _neighbours(r.vectors, rows) for mode, r in results.items()}

    def overlap(x: str, y: str) -> float:
        return round(float(np.mean([len(set(p) & set(q)) / len(p) for p, q in zip(near[x], near[y])])), 3)

    emit(phase="comparison", speedup=round(a.seconds_train / b.seconds_train, 2),
         fast_vs_reproducible_top10_neighbour_overlap=overlap("fast", "reproducible"),
         **({"other_seed_vs_reproducible_top10_neighbour_overlap": overlap("reproducible_other_seed", "reproducible")}
            if seed_baseline else {}), sampled_items=len(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
