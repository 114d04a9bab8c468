"""Task 1 embeddings: CLIP content embeddings (sharded), item2vec, and their fusion into
item_info_updated (the Task 1 deliverable).

CLIP is partitioned by item shard (`item_id % shards`) so one shard can be recomputed alone; a
range of shards runs as one run that loads the model once (single-run backfill policy).
"""

import tempfile
import time
import typing

import dagster as dg
import numpy as np
import polars as pl

from .. import settings
from ..lib.data.microlens import ORGANISER_ITEM_EMB_COLUMNS
from ..lib.io import write_parquet_atomic
from ..resources import ComputeResource, MlflowResource, ProjectStorage
from .common import (
    ON_GPU,
    OWNERS,
    REFRESH_AFTER_UPSTREAM,
    SINGLE_RUN,
    ProgressLog,
    clip_shards,
    cpu_cores,
    launched_config,
    png_metadata,
    run_tags,
    torch_threads,
)
from .freshness import FreshnessConfig, require_fresh_upstream

GROUP = "task1_embeddings"
# the item tables a model can read (dcn_din_model's and task1_score's embedding_source); item_emb:<column>
# is a column of the real download's item_emb.parquet (raw_item_emb)
ITEM_EMB_PREFIX = "item_emb:"
EMBEDDING_SOURCES = ("fused", "content", "item2vec", "organisers",
                     *(ITEM_EMB_PREFIX + c for c in ORGANISER_ITEM_EMB_COLUMNS))


class ClipConfig(FreshnessConfig):
    source: typing.Literal["encoder", "precomputed"] = "encoder"
    """encoder: CLIP over covers and titles (below). precomputed: no encoder: the organisers'
    txt_emb_BERT + img_emb_CLIPRN50 from item_feature.parquet, projected to 512-d by PCA over all
    items (lib/embeddings/precomputed.py): content vectors without an encoder or a GPU."""
    model: str = settings.clip_model()
    """Hub id or local directory for CLIPModel.from_pretrained (env MMCTR_CLIP_MODEL)."""
    combine: str = "mean"
    """mean (of normalised image and text vectors) | image | text."""
    text_only_warn_share: float = 0.05
    """Warn (asset check) when more than this share of items has no usable image."""
    decode_on: str = "cpu"
    """cpu (PIL, reduced-size JPEG decode in threads) | device (torchvision nvJPEG on the CUDA device;
    benchmarks/gpu_check.py measures which is faster there)."""


def leaves_core_for_item2vec(context: dg.AssetExecutionContext) -> int:
    """1 when this run also materialises item2vec_embeddings in its reproducible mode (one worker,
    beside CLIP), else 0: in fast mode item2vec takes every free core itself, so the two steps run
    one after the other, each on all the cores, whichever claims them first."""
    keys = context.run.asset_selection or context.job_def.asset_layer.selected_asset_keys
    if dg.AssetKey("item2vec_embeddings") not in keys:
        return 0
    default = Item2VecConfig.model_fields["workers"].default
    return int(launched_config(context, "item2vec_embeddings").get("workers", default) == 1)


@dg.asset(
    group_name=GROUP,
    kinds={"pytorch", "parquet"},
    owners=OWNERS,
    partitions_def=clip_shards,
    backfill_policy=SINGLE_RUN,
    **ON_GPU,
    deps=["raw_item_info", "raw_item_feature", "raw_item_images"],
    check_specs=[dg.AssetCheckSpec("text_only_share", asset="clip_embeddings")],
)
def clip_embeddings(
    context: dg.AssetExecutionContext, config: ClipConfig, storage: ProjectStorage, compute: ComputeResource
) -> dg.MaterializeResult:
    """512-d CLIP image+text embedding per item, one parquet file per shard (item_id % shards).

    Items with a missing or corrupt cover fall back to text only; the padding item is never
    encoded. Each finished shard is written atomically, so a failure leaves other shards intact.
    """
    from ..lib.embeddings import clip as clip_encoder
    from ..lib.embeddings.clip_shards import encode_shards

    require_fresh_upstream(context, config)
    if config.source == "precomputed":
        return _project_precomputed(context, storage)
    items = clip_encoder.item_content_frame(
        storage.read_raw("item_info"), storage.read_raw("item_feature", columns=["item_id", "item_title", "item_tags"]),
        storage.read_image_manifest())
    bundle = clip_encoder.load_clip(config.model, compute.torch_device(), compute.precision)
    if bundle.random_weights:
        context.log.warning(
            f"CLIP at {config.model} has RANDOM WEIGHTS (the offline demo encoder): its embeddings "
            "carry no semantic content. Set MMCTR_CLIP_MODEL to real ViT-B/32 weights for real use."
        )
    # the free CPU cores, less one when this run also trains item2vec with one worker: it is the
    # critical path of a whole-graph run and would otherwise wait for this step (docs/deployment.md, Full
    # size); torch threads and decode threads; one set of decode threads for every shard of the run
    want = compute.cpu_threads or max(1, clip_encoder.available_cpus() - leaves_core_for_item2vec(context))
    with cpu_cores(context.log, storage.cpu_lock_dir(), want, what="clip_embeddings") as cores, \
            torch_threads(cores), clip_encoder.ImagePipeline(compute.decode_workers(cores)) as pipeline:
        done = encode_shards(
            items, context.partition_keys, len(clip_shards.get_partition_keys()), bundle, pipeline,
            write=lambda key, frame: write_parquet_atomic(frame, storage.clip_shard(key)), log=context.log,
            progress=lambda key: ProgressLog(context.log, f"clip shard {key}"),
            batch_size=compute.batch_size, combine=config.combine, decode_on=config.decode_on)
    if done.text_only_share > config.text_only_warn_share:  # a failed WARN check alone shows only at DEBUG
        context.log.warning(f"{len(done.text_only_ids)} of {done.items} items ({done.text_only_share:.1%}) were "
                            f"embedded from text only (no usable cover under {storage.images_dir()}); check "
                            "raw_item_images' metadata")
    return dg.MaterializeResult(metadata=_clip_metadata(done, config, bundle, compute, cores, pipeline),
                                check_results=[_text_only_check(done, config)])


def _project_precomputed(context: dg.AssetExecutionContext, storage: ProjectStorage) -> dg.MaterializeResult:
    """clip_embeddings from the organisers' vectors: every item projected at once (the same PCA for
    every shard), this run's shards written; no cover is read, so no item is text-only."""
    from ..lib.embeddings import clip as clip_encoder
    from ..lib.embeddings import precomputed

    started = time.perf_counter()
    feature = storage.read_raw("item_feature")
    ids, emb, explained = precomputed.project_precomputed(feature, storage.n_items(), settings.seed())
    n_shards = len(clip_shards.get_partition_keys())
    items = 0
    for key in context.partition_keys:
        keep = ids % n_shards == int(key)
        write_parquet_atomic(clip_encoder.to_frame(clip_encoder.ClipResult(ids[keep], emb[keep], ids[:0], 0.0)),
                             storage.clip_shard(key))
        items += int(keep.sum())
    seconds = time.perf_counter() - started
    context.log.info(f"{items} items from txt_emb_BERT + img_emb_CLIPRN50 (PCA to {emb.shape[1]}-d, "
                     f"{explained:.1%} of the variance) in {seconds:.1f}s")
    return dg.MaterializeResult(
        metadata={"source": "precomputed", "shards": list(context.partition_keys), "items": items,
                  "pca_explained_variance": round(explained, 4), "seconds": round(seconds, 2)},
        check_results=[dg.AssetCheckResult(
            check_name="text_only_share", passed=True, severity=dg.AssetCheckSeverity.WARN,
            description="source: precomputed reads no covers: no text-only items.", metadata={"share": 0.0})])


def _clip_metadata(done, config: ClipConfig, bundle, compute: ComputeResource, cores: int, pipeline) -> dict:
    return {
        "shards": done.shards,
        "items": done.items,
        "text_only_items": len(done.text_only_ids),
        "text_only_ids_sample": done.text_only_ids[:20],
        "items_per_s": round(done.items_per_s, 1),
        "model": config.model,
        "random_weights": bundle.random_weights,
        "device": str(bundle.device),
        "precision": compute.precision,
        "cpu_cores": cores,
        "decode_threads": pipeline.workers,
        "decode_on": config.decode_on,
    }


def _text_only_check(done, config: ClipConfig) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name="text_only_share",
        passed=done.text_only_share <= config.text_only_warn_share,
        severity=dg.AssetCheckSeverity.WARN,
        description=f"{done.text_only_share:.2%} of items were embedded from text only (no usable cover).",
        metadata={"share": done.text_only_share, "threshold": config.text_only_warn_share},
    )


class Item2VecConfig(FreshnessConfig):
    dim: int = 128
    window: int = 5
    min_count: int = 1
    epochs: int = 5
    negative: int = 5
    workers: int = 1
    """gensim threads. 1 (default), the reproducible mode: bit-identical vectors for the same data
    and seed, so two runs of the whole graph give the same fused table and AUC. 0, the fast mode:
    one thread per core the step may take (every free core; defs/common.py cpu_cores); n > 1: n
    cores, waiting for them. Several threads train faster (docs/results.md) but update shared weights
    without locks (Hogwild): vectors, and so the AUC, differ slightly run to run, not in quality
    (docs/assets.md, item2vec)."""
    seed: int = settings.seed()
    include_clicked_target: bool = True
    """Append the target to its history when clicked: the strongest co-occurrence signal."""
    one_line_per_user: bool = True
    """One corpus line per user timeline (the rows' histories are its prefixes), not one per row,
    which repeats a user's early clicks once per later row (docs/assets.md, item2vec corpus)."""


@dg.asset(
    group_name=GROUP,
    kinds={"gensim", "parquet"},
    owners=OWNERS,
    backfill_policy=SINGLE_RUN,
    deps=["raw_train"],
)
def item2vec_embeddings(
    context: dg.AssetExecutionContext, config: Item2VecConfig, storage: ProjectStorage
) -> dg.MaterializeResult:
    """128-d skip-gram (Word2Vec, window 5) item vectors learnt from training histories.

    Padding 0 is never a token. Items that never occur in a history get no vector; the fusion
    step then uses their content embedding alone.
    """
    from ..lib.embeddings import item2vec

    require_fresh_upstream(context, config)
    if config.workers < 0:
        raise ValueError(f"item2vec_embeddings config workers must be 1 (reproducible), 0 (every core the step "
                         f"may take) or a number of cores, got {config.workers}")
    train = storage.require(storage.raw("train"), "raw_train")
    n_items = storage.n_items()
    out_dir = storage.item2vec().parent
    out_dir.mkdir(parents=True, exist_ok=True)
    # a core per gensim worker, shared with clip_embeddings when it runs beside this step
    with cpu_cores(context.log, storage.cpu_lock_dir(), config.workers or None, need=config.workers or 1,
                   what="item2vec") as workers, tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        if workers > 1:
            context.log.warning(f"item2vec with {workers} gensim workers: faster, but NOT reproducible (vectors "
                                "and downstream AUC differ slightly run to run); workers: 1 is bit-identical")
        corpus = item2vec.build_corpus(train, f"{tmp}/corpus.txt", config.include_clicked_target,
                                       one_line_per_user=config.one_line_per_user)
        context.log.info(f"corpus: {corpus.n_sentences} sentences, {corpus.n_tokens} tokens "
                         f"({corpus.n_rows_merged} of {corpus.n_rows} rows in user timelines) in {corpus.seconds:.1f}s")
        result = item2vec.train_item2vec(
            corpus.path,
            dim=config.dim,
            window=config.window,
            min_count=config.min_count,
            epochs=config.epochs,
            negative=config.negative,
            workers=workers,
            seed=config.seed,
        )
    write_parquet_atomic(item2vec.to_frame(result), storage.item2vec())
    without = n_items - len(result.item_ids)
    context.log.info(f"{len(result.item_ids)} items have a vector, {without} do not; "
                     f"trained in {result.seconds_train:.1f}s")
    return dg.MaterializeResult(
        metadata={
            "items_with_vector": len(result.item_ids),
            "items_without_vector": without,
            "sentences": corpus.n_sentences,
            "tokens": corpus.n_tokens,
            "targets_appended": corpus.n_targets_appended,
            "rows_in_user_timelines": corpus.n_rows_merged,
            "seconds_corpus": round(corpus.seconds, 2),
            "seconds_train": round(result.seconds_train, 2),
            "params": dg.MetadataValue.json(result.params),
            "workers": workers,
            "deterministic": workers == 1,
        }
    )


def fuse_stored_embeddings(storage: ProjectStorage, alpha: float, seed: int):
    """PCA(CLIP) mixed with item2vec from the stored shards and vectors (alpha 1: content only,
    0: item2vec only, an item without an item2vec vector keeping its content vector)."""
    from ..lib.embeddings import fusion

    clip, i2v = storage.read_clip_embeddings(), storage.read_item2vec()
    return fusion.fuse_embeddings(
        storage.n_items(),
        clip.get_column("item_id").to_numpy(),
        clip.get_column("clip_emb").to_numpy(),
        i2v.get_column("item_id").to_numpy(),
        i2v.get_column("i2v_emb").to_numpy(),
        alpha=alpha,
        seed=seed,
    )


def item_embedding_table(storage: ProjectStorage, source: str, seed: int) -> np.ndarray:
    """The frozen [n_items + 1, 128] item table a model reads, by source (for ablations).

    fused: Task 1's deliverable; organisers: item_info's own item_emb_d128; item_emb:<column>: that
    column of item_emb.parquet; content / item2vec: the fusion with alpha 1 / 0 (an item without an
    item2vec vector keeps its content vector).
    """
    if source not in EMBEDDING_SOURCES:
        raise ValueError(f"embedding_source must be one of {EMBEDDING_SOURCES}, got {source!r}")
    if source.startswith(ITEM_EMB_PREFIX):
        from ..lib.embeddings.precomputed import organiser_item_table

        item_emb = storage.read_raw("item_emb")  # raw_item_emb never materialised: says to run it
        if item_emb.height == 0:
            raise FileNotFoundError(
                f"embedding_source {source} reads item_emb.parquet, but raw_item_emb found no file at "
                f"{storage.source('item_emb')} (it is optional in the download). Put the real download's "
                "item_emb.parquet there and materialise raw_item_emb, or choose another embedding_source "
                "(e.g. fused).")
        return organiser_item_table(item_emb, source.removeprefix(ITEM_EMB_PREFIX), storage.n_items())
    if source in ("fused", "organisers"):
        path = (
            storage.require(storage.item_info_updated(), "fused_item_embeddings")
            if source == "fused"
            else storage.require(storage.raw("item_info"), "raw_item_info")
        )
        emb = pl.read_parquet(path, columns=["item_emb_d128"]).get_column("item_emb_d128")
        return emb.list.to_array(emb.list.len().max()).to_numpy().astype(np.float32)
    return fuse_stored_embeddings(storage, 1.0 if source == "content" else 0.0, seed).embeddings


class FusionConfig(FreshnessConfig):
    alpha: float = 0.5
    """Weight of the content (CLIP) part; 1 - alpha goes to item2vec."""
    seed: int = settings.seed()


@dg.asset(
    group_name=GROUP,
    kinds={"scikitlearn", "parquet"},
    owners=OWNERS,
    backfill_policy=SINGLE_RUN,
    deps=[clip_embeddings, item2vec_embeddings, "raw_item_info"],
    automation_condition=REFRESH_AFTER_UPSTREAM,
    check_specs=[dg.AssetCheckSpec("item_info_updated_valid", asset="fused_item_embeddings", blocking=True)],
)
def fused_item_embeddings(
    context: dg.AssetExecutionContext, config: FusionConfig, storage: ProjectStorage, mlflow: MlflowResource
):
    """The Task 1 deliverable: PCA(CLIP) 512->128 mixed with item2vec, L2-normalised, one row per
    item, written back into item_info's schema as item_info_updated.parquet. The new file is
    checked under a temporary name and replaces the old one only when the check passes."""
    from ..lib.embeddings import fusion
    from ..lib.io import atomic_path
    from ..lib.plots import plot_embedding_projection
    from . import publish

    require_fresh_upstream(context, config)
    mlflow.check_reachable(must_exist=storage.model().exists())  # never recreate the store model.pt came from
    info_path = storage.require(storage.raw("item_info"), "raw_item_info")
    info = pl.read_parquet(info_path, columns=["item_id", "item_tags"])
    n_items = info.height - 1
    result = fuse_stored_embeddings(storage, config.alpha, config.seed)
    out = storage.item_info_updated()
    with atomic_path(out) as staged:  # renamed over `out` only if the block finishes
        fusion.write_item_info_updated(info_path, result.embeddings, staged)
        problems = fusion.validate_item_embeddings(pl.read_parquet(staged), n_items=n_items, column="item_emb_d128")
        check = dg.AssetCheckResult(
            check_name="item_info_updated_valid",
            passed=not problems,
            description="128 dims, unit norm on real items, no NaN/inf, every item id exactly once, "
            "row index == item_id: " + ("all hold." if not problems else " ".join(problems)),
            metadata={"problems": dg.MetadataValue.json(problems)},
        )
        if problems:
            yield from publish.refuse(context, "fused_item_embeddings", [out], [check])

    tag = info.get_column("item_tags").list.last().fill_null(0).to_numpy()
    png = plot_embedding_projection(result.embeddings, np.where(tag > 0, tag, -1),
                                    "fused item embeddings (colour: last tag)")
    with mlflow.start_run("fused_item_embeddings", tags=run_tags(context) | {"stage": "task1"}) as run:
        mlflow.log_params({"alpha": config.alpha, "seed": config.seed, "pca_components": result.pca_components})
        mlflow.log_metrics({"pca_explained_variance": result.explained_variance_total}
                           | {f"items_{k}": v for k, v in result.counts.items()})
        mlflow.log_png(png, "embedding_projection.png")
    yield dg.MaterializeResult(
        metadata={
            "item_info_updated": dg.MetadataValue.path(str(out)),
            "items": n_items,
            "counts": dg.MetadataValue.json(result.counts),
            "pca_explained_variance": round(result.explained_variance_total, 4),
            "pca_components": result.pca_components,
            "alpha": config.alpha,
            "projection": png_metadata(png, "2-D projection of the fused embeddings"),
            "mlflow_run": mlflow.run_url(run),
        },
        check_results=[check],
    )


defs = dg.Definitions(assets=[clip_embeddings, item2vec_embeddings, fused_item_embeddings])
