"""lib/ctr/inputs.py: the one assembly of Task 2's model inputs (frames, item table, tags, per-item
levels, fingerprints, tensors) that dcn_din_model, task1_score and ctr_tuning read."""

import inspect
import re
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest
import torch

from mmctr_assets.defs.raw import raw_assets
from mmctr_assets.lib.ctr import inputs, tensors
from mmctr_assets.lib.ctr.model_config import ModelConfig
from mmctr_assets.lib.io import array_fingerprint, file_fingerprint, text_fingerprint


def _item_feature(n=4, likes=(3, 1, 10, 0), views=(2, 2, 5, 7)) -> pl.DataFrame:
    return pl.DataFrame({"item_id": list(range(1, n + 1)), "likes_level": list(likes), "views_level": list(views)})


def test_item_levels_are_one_row_per_item_with_a_zero_padding_row():
    table = inputs.item_levels(_item_feature().reverse(), 4, 10)  # row order does not matter
    assert table.dtype == np.int64 and table.tolist() == [[0, 0], [3, 2], [1, 2], [10, 5], [0, 7]]


@pytest.mark.parametrize("frame,message", [
    (_item_feature().head(3), r"1 of item_info's 4 items have no row \(e.g. item 4\)"),
    (_item_feature(likes=(3, 1, 11, 0)), r"1 likes_level values null or outside 0..10 \(e.g. item 3: 11\)"),
    (_item_feature(views=(2, None, 5, 7)), r"1 views_level values null or outside 0..10 \(e.g. item 2: None\)"),
    (pl.concat([_item_feature(), _item_feature().head(1)]), "1 duplicated item ids"),
    (_item_feature().with_columns(pl.col("item_id") + 1), r"item ids outside item_info's 1..4 \(e.g. 5\)"),
    (_item_feature().drop("views_level"), r"no per-item levels \(no columns \['views_level'\]\)"),
    (_item_feature().head(0), "no rows: item_feature.parquet absent"),
])
def test_bad_item_levels_are_refused_saying_what_is_wrong(frame, message):
    with pytest.raises(ValueError, match=message):
        inputs.item_levels(frame, 4, 10)


def test_null_row_levels_are_filled_from_the_target_items_levels():
    levels = inputs.item_levels(_item_feature(), 4, 10)
    frame = pl.DataFrame({"item_id": [1, 3, 4, 2], "likes_level": [9, None, None, 4],
                          "views_level": [None, 1, 8, None]})
    filled = inputs.fill_row_levels(frame, levels, "raw_train")
    # a row's own level stays; a null one becomes its target item's
    assert filled.get_column("likes_level").to_list() == [9, 10, 0, 4]
    assert filled.get_column("views_level").to_list() == [2, 1, 8, 2]
    complete = filled
    assert inputs.fill_row_levels(complete, None, "raw_train") is complete  # nothing null: nothing read
    with pytest.raises(ValueError, match=r"raw_valid: null levels \{'likes_level': 2, 'views_level': 2\} and no "
                                         "per-item levels"):
        inputs.fill_row_levels(frame, None, "raw_valid")


@pytest.fixture(scope="module")
def raw_outputs(tiny_data, tmp_path_factory, make_resources):
    out = tmp_path_factory.mktemp("inputs") / "outputs"
    resources = make_resources(tiny_data, out)
    with dg.instance_for_test() as instance:
        assert dg.materialize(raw_assets, resources=resources, instance=instance).success
    return resources["storage"]


def test_read_inputs_gives_the_frames_tensors_and_fingerprints_the_assets_read_before(raw_outputs):
    from mmctr_assets.defs.training import read_model_inputs

    storage = raw_outputs
    got = read_model_inputs(storage, "organisers", seed=0)
    raw = {t: pl.read_parquet(storage.raw(t)) for t in ("train", "valid")}
    for t in raw:
        assert got.frames[t].equals(raw[t])
    info = pl.read_parquet(storage.raw("item_info")).sort("item_id")
    emb = info.get_column("item_emb_d128").list.to_array(128).to_numpy().astype(np.float32)
    assert np.array_equal(got.item_table, emb) and got.n_items == info.height - 1
    assert np.array_equal(got.item_tags, info.get_column("item_tags").list.to_array(5).to_numpy())
    feature = pl.read_parquet(storage.raw("item_feature")).sort("item_id")
    assert np.array_equal(got.item_levels[1:], feature.select("likes_level", "views_level").to_numpy())
    # the fingerprints of the code this replaced (training_run.fingerprints): unchanged for the same data
    fp, old = got.fingerprints, [file_fingerprint(storage.raw("train")), file_fingerprint(storage.raw("valid")),
                                 array_fingerprint(emb)]
    assert fp.run == text_fingerprint(*old, "organisers") and fp.data == text_fingerprint(*old[:2])
    assert fp.item_info == file_fingerprint(storage.raw("item_info")) and fp.table == old[2]
    assert fp.sample(123) == text_fingerprint(*old, "organisers", "train_rows=123")  # ctr_tuning's formula
    default = ModelConfig(max_len=got.history_width)
    assert got.fingerprints_for(default) == fp and got.model_tables(default)["item_levels"] is None
    # the model that reads the levels has them in its fingerprint (a resume never mixes the two)
    with_levels = ModelConfig(max_len=got.history_width, use_item_levels=True)
    assert got.fingerprints_for(with_levels).run != fp.run
    assert got.model_tables(with_levels)["item_levels"] is got.item_levels
    train_t, valid_t = got.tensors(default.max_len, default.level_vocab_size)
    want = tensors.to_tensors(raw["valid"], default.max_len, n_items=got.n_items)
    assert all(torch.equal(a, b) for a, b in zip(valid_t.arrays(), want.arrays()))
    assert len(train_t) == raw["train"].height
    sampled = read_model_inputs(storage, "organisers", seed=0, train_rows=100)
    assert sampled.frames["train"].height == 100 and sampled.fingerprints == fp


def test_a_model_with_item_levels_on_data_without_them_says_how_to_fix(raw_outputs, tmp_path):
    got = inputs.read_inputs(_NoItemFeature(raw_outputs, tmp_path), "organisers", lambda s: np.zeros((0, 0)),
                             max_level=10)
    assert got.item_levels is None
    with pytest.raises(ValueError, match="use_item_levels needs per-item levels: raw_item_feature has not been "
                                         "materialised. Set model.use_item_levels: false, or supply "
                                         "item_feature.parquet"):
        got.model_tables(ModelConfig(max_len=16, use_item_levels=True))


class _NoItemFeature:
    """The raw snapshots without raw_item_feature."""

    def __init__(self, storage, tmp_path: Path):
        self.storage, self.tmp_path = storage, tmp_path

    def raw(self, table: str) -> Path:
        return self.tmp_path / "absent.parquet" if table == "item_feature" else self.storage.raw(table)

    def read_raw(self, table: str, columns=None) -> pl.DataFrame:
        return self.storage.read_raw(table, columns)


def test_every_task2_training_asset_reads_its_inputs_through_the_one_assembly():
    """dcn_din_model, task1_score and ctr_tuning call read_model_inputs (lib/ctr/inputs.read_inputs);
    no asset module reads raw_train/raw_valid or item tags itself, so a new input is added once."""
    from mmctr_assets.defs import ctr, scorer, training, tuning

    for fn in (ctr.dcn_din_model.op.compute_fn.decorated_fn, scorer.task1_score.op.compute_fn.decorated_fn,
               tuning._load_data):
        assert "read_model_inputs(" in inspect.getsource(fn), fn.__name__
    assert "read_inputs(" in inspect.getsource(training.read_model_inputs)
    for module in (ctr, scorer, training, tuning):
        source = inspect.getsource(module)
        assert not re.search(r"read_raw\(\s*\"(train|valid|item_feature)\"", source), module.__name__
        assert "item_tags" not in source.replace("item_tags=", ""), module.__name__


class _NullTestRows(_NoItemFeature):
    """The raw snapshots with null levels in test rows 0 and 3."""

    def raw(self, table: str) -> Path:
        return self.storage.raw(table)

    def read_raw(self, table: str, columns=None) -> pl.DataFrame:
        frame = self.storage.read_raw(table, columns)
        if table != "test":
            return frame
        null = pl.int_range(pl.len()).is_in([0, 3])
        return frame.with_columns(pl.when(null).then(None).otherwise(pl.col(c)).alias(c) for c in inputs.LEVELS)


def test_predictions_fill_null_test_levels_from_the_served_models_own_item_levels(raw_outputs, tmp_path):
    from mmctr_assets.lib.ctr.model import CTRModel

    store = _NullTestRows(raw_outputs, tmp_path)
    n_items = store.storage.n_items()
    stored = inputs.stored_item_levels(store, n_items, 10)
    own = stored.copy()
    own[1:, 0] = (own[1:, 0] + 1) % 11  # the model trained with other levels than the file has now
    config = ModelConfig(max_len=16, use_item_levels=True)
    tags = pl.read_parquet(raw_outputs.raw("item_info")).get_column("item_tags").list.to_array(5).to_numpy()
    plain, levelled = (CTRModel(c, np.zeros((n_items + 1, 128), np.float32), tags, item_levels=lv,
                                item_frequency=np.ones(n_items + 1)) for c, lv in
                       ((ModelConfig(max_len=16), None), (config, own)))
    test = store.storage.read_raw("test")
    target = test.get_column("item_id").to_numpy()[[0, 3]]
    for model, levels in ((plain, stored), (levelled, own)):
        got = inputs.read_test(store, model, 10)
        assert got.get_column("likes_level").to_numpy()[[0, 3]].tolist() == levels[target, 0].tolist()
        assert got.get_column("views_level").to_numpy()[[0, 3]].tolist() == levels[target, 1].tolist()
        assert got.drop("likes_level", "views_level").equals(test.drop("likes_level", "views_level"))
    with pytest.raises(ValueError, match="raw_test has null likes/views levels and no per-item levels to fill them "
                                         "from: raw_item_feature has not been materialised"):
        inputs.read_test(_NoFeatureNullTest(raw_outputs, tmp_path), plain, 10)


class _NoFeatureNullTest(_NullTestRows):
    def raw(self, table: str) -> Path:
        return self.tmp_path / "absent.parquet" if table == "item_feature" else self.storage.raw(table)
