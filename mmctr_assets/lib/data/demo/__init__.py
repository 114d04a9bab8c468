"""Synthetic MicroLens-format dataset with planted, learnable structure.

The real MicroLens_1M_x1 data cannot be downloaded here, so this writes a stand-in in the exact
challenge format (DESIGN.md section 1) whose labels come from a known click model. The true click
probabilities go to ``ground_truth/`` so tests and demos can compare a model with the best
achievable AUC.

The planted story: items belong to topics that show in their tags, titles and cover images; each
user likes 1-3 topics and their history is drawn mostly from those topics; a click is likely when
the target's topic is one the user likes, and somewhat likelier for well-liked, much-viewed and
popular items. That is world v1 (``world="v1"``). World v2, the default, adds what real logs
carry: histories in sessions of one topic, a click that depends most on the last few history
items (a recency-weighted topic match), and a per-user click propensity (a logit offset per
user). World v3 adds what v2 still lacks: a per-item latent appeal that no content reveals (only
a model that learns item ids can recover it), a long-tailed exposure (a few items take a large
share of the rows) and long histories for the most active users. Everything is built
column-wise from flat numpy arrays (lists via offsets), so the full size (4M rows) fits in a
few GiB.

Modules: ``config`` (constants, sizes, schemas), ``items`` (items and their content), ``covers``
(cover images), ``rows`` (users, histories, click model), ``generator`` (``generate``, ``main``).
The models never import this package: it is the world they are measured on.
"""

from mmctr_assets.lib.data.demo.config import (  # noqa: F401  (the package's public names)
    SIZES,
    USER_BIAS_SD,
    V3_HEAVY_HISTORY_MEDIAN,
    V3_HEAVY_USER_SHARE,
    V3_ITEM_APPEAL_SD,
    WORLDS,
    DemoSize,
)
from mmctr_assets.lib.data.demo.generator import generate, main  # noqa: F401
from mmctr_assets.lib.data.demo.rows import _history_lengths  # noqa: F401

__all__ = ["SIZES", "WORLDS", "DemoSize", "generate", "main"]
