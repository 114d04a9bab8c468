"""raw_*: validated, dtype-normalised snapshots of the source tables, plus the cover-image manifest.

Each raw asset reads its source columnarly, reports structure problems as errors and content
invariants as blocking asset checks (so bad data stops the graph before the models), and only when
they pass writes a snapshot under `<output_dir>/raw/` that downstream assets read instead of the
source: a failed check leaves the previous snapshot in place (defs/publish.py).
"""

import dagster as dg
import polars as pl
from pydantic import Field

from .. import settings
from ..lib.data import checks, images, microlens
from ..lib.io import file_fingerprint, write_parquet_atomic
from ..resources import ProjectStorage
from . import publish
from .common import OWNERS, SINGLE_RUN

GROUP = "raw"
IMAGE_FAILURE_WARN_SHARE = 0.05
# above this share of unusable covers the manifest is refused unless text-only is asked for
MAX_UNUSABLE_COVER_SHARE = 0.5

_DESCRIPTIONS = {
    "train": "Training interactions: user history (left-padded item_seq), target item, likes/views levels, "
             "click label.",
    "valid": "Validation interactions; the model is selected on this table's AUC.",
    "test": "Test interactions keyed by ID, without labels; the submission predicts these rows.",
    "item_info": "One row per item 0..N (row 0 = padding): tags and the organisers' 128-d embedding.",
    "item_feature": "Item titles and full tag lists, and when the file has them the per-item likes/views "
                    "levels and the organisers' txt_emb_BERT (768-d) and img_emb_CLIPRN50 (1024-d) vectors "
                    "(optional in the download; empty when absent).",
    "item_emb": "The organisers' item embeddings item_emb_d128_v1/_v2/_v3/_e4, one row per item "
                "(item_emb.parquet; optional: metadata present=false and an empty snapshot when absent). "
                "embedding_source item_emb:<column> reads them.",
}


def _schema_metadata(frame: pl.DataFrame) -> dg.TableSchema:
    return dg.TableSchema(columns=[dg.TableColumn(name, str(dtype)) for name, dtype in frame.schema.items()])


def _preview(frame: pl.DataFrame, rows: int = 5) -> dg.MetadataValue:
    with pl.Config(tbl_formatting="MARKDOWN", tbl_hide_dataframe_shape=True, fmt_table_cell_list_len=6,
                   fmt_str_lengths=60):
        return dg.MetadataValue.md(str(frame.head(rows)))


def _table_metadata(table: str, frame: pl.DataFrame, fingerprint: str) -> dict:
    meta = {
        "dagster/row_count": len(frame),
        "dagster/column_schema": _schema_metadata(frame),
        "data_fingerprint": fingerprint,
        "preview": _preview(frame),
    }
    if "label" in frame.columns:
        meta["positive_rate"] = float(frame.get_column("label").mean() or 0.0)
    if "item_seq" in frame.columns:
        meta["history_length"] = dg.MetadataValue.json(checks.history_length_summary(frame))
        meta["users"] = frame.get_column("user_id").n_unique()
    return meta


_CHECK_DESCRIPTIONS = {
    "has_rows": "Blocking: the table has at least one row.",
    "item_emb_d128_finite": "Warning, not blocking: the organisers' item_emb_d128 holds no NaN/inf. Only "
    "embedding_source: organisers reads it (and refuses non-finite values itself); the default fused "
    "table replaces it, so it must not stop the graph.",
    "precomputed_vectors_well_formed": "Warning, not blocking: txt_emb_BERT is 768 long and "
    "img_emb_CLIPRN50 1024 long on every item, all finite (when the file has them). Only clip_embeddings "
    "with source: precomputed reads them, and refuses broken ones itself.",
    "item_ids_match_item_info": "Blocking: item_emb.parquet has one row for every item of item_info.",
    "vectors_well_formed": "Blocking: every item_emb_d128_* vector is 128 long and finite.",
    "levels_in_range": "Blocking: likes_level/views_level are integers 0..MMCTR_MAX_LEVEL, no nulls (in train, "
                       "valid and test a null passes when item_feature has per-item levels: the model's inputs "
                       "fill it with the target item's level).",
}


def _column_warnings(data_dir: str, table: str) -> list[str]:
    """Columns the format does not use are left out of the snapshot; say so instead of silently."""
    extra = microlens.ignored_columns(data_dir, table)
    out = []
    if table == "test" and "label" in extra:
        out.append(f"{microlens.table_path(data_dir, table)} has a 'label' column: test labels are "
                   "hidden in the challenge, so it is ignored (not trained on, not scored). If these "
                   "rows are labelled validation data, put them in valid.parquet.")
        extra = [c for c in extra if c != "label"]
    if extra:
        out.append(f"{table}: columns {extra} are not part of the MicroLens format and are left out "
                   "of the snapshot.")
    return out


def _items_have_levels(storage: ProjectStorage) -> bool:
    """item_feature.parquet carries per-item likes/views levels (they fill a row's null levels)."""
    src = storage.source("item_feature")
    return src.exists() and {"likes_level", "views_level"} <= set(pl.read_parquet_schema(src))


def build_raw_table_asset(table: str) -> dg.AssetsDefinition:
    key = f"raw_{table}"
    needs_item_info = table != "item_info"

    @dg.asset(
        name=key,
        group_name=GROUP,
        kinds={"parquet", "polars"},
        owners=OWNERS,
        backfill_policy=SINGLE_RUN,
        description=_DESCRIPTIONS[table],
        deps=["raw_item_info"] if needs_item_info else [],
        check_specs=[dg.AssetCheckSpec(n, asset=key, blocking=n not in checks.WARNING_CHECKS,
                                       description=_CHECK_DESCRIPTIONS.get(n))
                     for n in checks.CHECK_NAMES[table]],
    )
    def _raw(context: dg.AssetExecutionContext, storage: ProjectStorage):
        spec = microlens.TABLES[table]
        src = storage.source(table)
        dest = storage.raw(table)
        if spec.optional and not src.exists():
            context.log.warning(f"{src} not found: {table} is optional, writing an empty snapshot.")
            write_parquet_atomic(microlens.empty_table(table), dest)
            yield dg.MaterializeResult(
                metadata={"present": False, "dagster/row_count": 0, "source": str(src)},
                check_results=[dg.AssetCheckResult(check_name=n, passed=True, description="table absent")
                               for n in checks.CHECK_NAMES[table]],
                data_version=dg.DataVersion("absent"),
            )
            return
        frame = microlens.read_table(storage.data_dir, table)
        n_items = storage.n_items() if needs_item_info else None
        outcomes = checks.content_checks(table, frame, n_items, settings.max_level(),
                                         items_have_levels=needs_item_info and _items_have_levels(storage))
        for o in outcomes:
            (context.log.info if o.passed else context.log.error)(f"{o.name}: {o.description}")
        results = [
            dg.AssetCheckResult(
                check_name=o.name, passed=o.passed, description=o.description, metadata=o.details,
                severity=dg.AssetCheckSeverity.WARN if o.name in checks.WARNING_CHECKS else dg.AssetCheckSeverity.ERROR,
            )
            for o in outcomes
        ]
        # validate first, publish after: bad data never replaces the last good snapshot
        if publish.failed_blocking(results):
            yield from publish.refuse(context, key, [dest], results)
        warnings = _column_warnings(storage.data_dir, table)
        for w in warnings:
            context.log.warning(w)
        write_parquet_atomic(frame, dest)
        fingerprint = file_fingerprint(src)
        yield dg.MaterializeResult(
            metadata=_table_metadata(table, frame, fingerprint)
            | {"source": dg.MetadataValue.path(str(src))}
            | ({"warnings": dg.MetadataValue.json(warnings)} if warnings else {}),
            check_results=results,
            data_version=dg.DataVersion(fingerprint),
        )

    return _raw


class RawItemImagesConfig(dg.Config):
    max_unusable_share: float = Field(
        default=MAX_UNUSABLE_COVER_SHARE, ge=0.0, le=1.0,
        description="Refuse the manifest (blocking check covers_present) when more than this share of "
        "covers is missing or corrupt: a deleted or unmounted item_images/ would otherwise turn every "
        "CLIP shard and the Task 1 table into text-only embeddings.")
    allow_text_only: bool = Field(
        default=False, description="Accept any share of missing covers: those items get text-only "
        "CLIP embeddings (e.g. a dataset without covers).")


@dg.asset(
    name="raw_item_images",
    group_name=GROUP,
    kinds={"parquet", "pillow"},
    owners=OWNERS,
    backfill_policy=SINGLE_RUN,
    description="Manifest of cover images: path, whether the file exists and whether it decodes.",
    deps=["raw_item_info"],
    check_specs=[dg.AssetCheckSpec("images_mostly_usable", asset="raw_item_images", blocking=False),
                 dg.AssetCheckSpec("covers_present", asset="raw_item_images", blocking=True)],
)
def raw_item_images(context: dg.AssetExecutionContext, config: RawItemImagesConfig, storage: ProjectStorage):
    ids = pl.int_range(1, storage.n_items() + 1, eager=True, dtype=pl.Int64).to_numpy()
    manifest = images.image_manifest(storage.data_dir, ids)
    missing = manifest.filter(~pl.col("exists")).get_column("item_id")
    corrupt = manifest.filter(pl.col("exists") & ~pl.col("decodable")).get_column("item_id")
    bad_share = (len(missing) + len(corrupt)) / max(len(manifest), 1)
    summary = (f"{len(missing)} of {len(manifest)} covers missing and {len(corrupt)} corrupt ({bad_share:.1%}) "
               f"in {storage.images_dir()}")
    (context.log.warning if bad_share > IMAGE_FAILURE_WARN_SHARE else context.log.info)(
        f"{summary}; those items fall back to text-only CLIP embeddings")
    blocked = bad_share > config.max_unusable_share and not config.allow_text_only
    results = [
        dg.AssetCheckResult(
            check_name="images_mostly_usable",
            passed=bad_share <= IMAGE_FAILURE_WARN_SHARE,
            severity=dg.AssetCheckSeverity.WARN,
            description=f"{bad_share:.2%} of covers are missing or corrupt (warn above "
            f"{IMAGE_FAILURE_WARN_SHARE:.0%}); those items fall back to text-only CLIP embeddings.",
            metadata={"bad_share": bad_share},
        ),
        dg.AssetCheckResult(
            check_name="covers_present",
            passed=not blocked,
            description=(f"{summary}: more than max_unusable_share={config.max_unusable_share:.0%}. Is "
                         f"{storage.images_dir()} the right folder (MMCTR_DATA_DIR/item_images/<item_id>.jpg)? "
                         "Restore the covers, or opt in to text-only content embeddings with raw_item_images "
                         "config allow_text_only: true." if blocked else
                         f"{summary}: within max_unusable_share={config.max_unusable_share:.0%}"
                         + (" (allow_text_only)." if config.allow_text_only else ".")),
            metadata={"bad_share": bad_share},
        ),
    ]
    if blocked:
        context.log.error(results[1].description)
        yield from publish.refuse(context, "raw_item_images", [storage.image_manifest()], results)
    write_parquet_atomic(manifest, storage.image_manifest())
    # content fingerprint of the manifest: images added, removed or broken change it
    version = str(manifest.select(pl.col("exists"), pl.col("decodable")).hash_rows().sum())
    yield dg.MaterializeResult(
        metadata={
            "dagster/row_count": len(manifest),
            "missing_images": len(missing),
            "corrupt_images": len(corrupt),
            "missing_ids_sample": missing.head(20).to_list(),
            "corrupt_ids_sample": corrupt.head(20).to_list(),
            "images_dir": dg.MetadataValue.path(str(storage.images_dir())),
        },
        check_results=results,
        data_version=dg.DataVersion(version),
    )


RAW_TABLES = ("item_info", "train", "valid", "test", "item_feature", "item_emb")
raw_assets = [build_raw_table_asset(t) for t in RAW_TABLES] + [raw_item_images]

defs = dg.Definitions(assets=raw_assets)
