"""CLIP over item shards (``item_id % n_shards``): encode each shard with one loaded model and one
image pipeline, and hand each finished shard to ``write`` at once, so a failure later in the run
leaves the shards already written intact."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import polars as pl

from mmctr_assets.lib.embeddings.clip import ClipBundle, encode_items, to_frame
from mmctr_assets.lib.embeddings.clip_images import ImagePipeline


@dataclass
class ShardsEncoded:
    """What a run of shards did, for the asset's metadata and its text-only check."""

    shards: list[str] = field(default_factory=list)
    items: int = 0
    text_only_ids: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def text_only_share(self) -> float:
        return len(self.text_only_ids) / max(self.items, 1)

    @property
    def items_per_s(self) -> float:
        return self.items / max(self.seconds, 1e-9)


def encode_shards(items: pl.DataFrame, shard_keys: Iterable[str], n_shards: int, bundle: ClipBundle,
                  pipeline: ImagePipeline, write: Callable[[str, pl.DataFrame], None], log,
                  progress: Callable[[str], Callable[[int, int], None]] | None = None,
                  **encode_options) -> ShardsEncoded:
    """Encode and ``write(key, frame)`` each shard in turn (``encode_options``: batch_size, combine,
    decode_on); ``log.info`` one line per shard; ``progress(key)`` gives a shard's progress callback."""
    done = ShardsEncoded()
    for key in shard_keys:
        shard = items.filter(pl.col("item_id") % n_shards == int(key))
        result = encode_items(shard, bundle, pipeline=pipeline, progress=progress(key) if progress else None,
                              **encode_options)
        write(key, to_frame(result))
        done.shards.append(key)
        done.items += len(result.item_ids)
        done.text_only_ids.extend(result.text_only_ids.tolist())
        done.seconds += result.seconds
        log.info(f"shard {key}: {len(result.item_ids)} items in {result.seconds:.1f}s "
                 f"({len(result.item_ids) / max(result.seconds, 1e-9):.0f}/s)")
    return done
