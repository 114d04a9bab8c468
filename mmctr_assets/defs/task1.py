"""Task 1: CLIP content embeddings (sharded), item2vec, and their fusion into item_info_updated.

CLIP is partitioned by item shard (`item_id % shards`) so one shard can be recomputed alone; a
range of shards runs as one run that loads the model once (single-run backfill policy).
"""

import polars as pl

import dagster as dg

from .. import settings
from ..lib import dataset
from ..lib.atomic import write_parquet_atomic
from ..resources import ComputeResource, ProjectStorage
from .common import ProgressLog

GROUP = "task1_embeddings"
GPU_TAGS = {"dagster-k8s/config": {"container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}}}}

clip_shards = dg.StaticPartitionsDefinition([str(i) for i in range(settings.clip_shards())])


def clip_shard_path(storage: ProjectStorage, key: str):
    return storage.out("clip_embeddings", f"shard-{key}.parquet")


def read_clip_embeddings(storage: ProjectStorage) -> pl.DataFrame:
    """Every shard of clip_embeddings, or an error naming the shards still to materialise."""
    keys = clip_shards.get_partition_keys()
    missing = [k for k in keys if not clip_shard_path(storage, k).exists()]
    if missing:
        raise FileNotFoundError(
            f"clip_embeddings shards {missing} are not materialised in {storage.output_dir}. Run "
            f"`dagster asset materialize -m mmctr_assets --select clip_embeddings --partition-range "
            f"{keys[0]}...{keys[-1]}` (or `--partition K` for one shard)."
        )
    return pl.concat([pl.read_parquet(clip_shard_path(storage, k)) for k in keys]).sort("item_id")


class ClipConfig(dg.Config):
    model: str = settings.clip_model()
    """Hub id or local directory for CLIPModel.from_pretrained (env MMCTR_CLIP_MODEL)."""
    combine: str = "mean"
    """mean (of normalised image and text vectors) | image | text."""
    text_only_warn_share: float = 0.05
    """Warn (asset check) when more than this share of items has no usable image."""


@dg.asset(
    group_name=GROUP,
    kinds={"pytorch", "parquet"},
    owners=["team:recsys"],
    partitions_def=clip_shards,
    backfill_policy=dg.BackfillPolicy.single_run(),
    pool="gpu",
    op_tags=GPU_TAGS,
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
    from ..lib import clip_encoder

    items = dataset.item_content_frame(
        pl.read_parquet(storage.require(storage.raw("item_info"), "raw_item_info")),
        pl.read_parquet(storage.require(storage.raw("item_feature"), "raw_item_feature")),
        pl.read_parquet(storage.require(storage.out("raw", "item_images.parquet"), "raw_item_images")),
    )
    n_shards = len(clip_shards.get_partition_keys())
    bundle = clip_encoder.load_clip(config.model, compute.torch_device(), compute.precision)
    if bundle.random_weights:
        context.log.warning(
            f"CLIP at {config.model} has RANDOM WEIGHTS (the offline demo encoder): its embeddings "
            "carry no semantic content. Set MMCTR_CLIP_MODEL to real ViT-B/32 weights for real use."
        )
    encoded, text_only, seconds = 0, [], 0.0
    for key in context.partition_keys:
        shard = items.filter(pl.col("item_id") % n_shards == int(key))
        result = clip_encoder.encode_items(
            shard,
            bundle,
            batch_size=compute.batch_size,
            num_workers=compute.num_workers,
            combine=config.combine,
            progress=ProgressLog(context.log, f"clip shard {key}"),
        )
        write_parquet_atomic(clip_encoder.to_frame(result), clip_shard_path(storage, key))
        encoded += len(result.item_ids)
        text_only.extend(result.text_only_ids.tolist())
        seconds += result.seconds
        context.log.info(f"shard {key}: {len(result.item_ids)} items in {result.seconds:.1f}s")
    share = len(text_only) / max(encoded, 1)
    return dg.MaterializeResult(
        metadata={
            "shards": list(context.partition_keys),
            "items": encoded,
            "text_only_items": len(text_only),
            "text_only_ids_sample": text_only[:20],
            "items_per_s": round(encoded / max(seconds, 1e-9), 1),
            "model": config.model,
            "random_weights": bundle.random_weights,
            "device": str(bundle.device),
            "precision": compute.precision,
        },
        check_results=[
            dg.AssetCheckResult(
                check_name="text_only_share",
                passed=share <= config.text_only_warn_share,
                severity=dg.AssetCheckSeverity.WARN,
                description=f"{share:.2%} of items were embedded from text only (no usable cover).",
                metadata={"share": share, "threshold": config.text_only_warn_share},
            )
        ],
    )


defs = dg.Definitions(assets=[clip_embeddings])
