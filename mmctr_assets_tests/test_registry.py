"""The model registry library (lib/ctr/registry.py) and `mmctr-model` on a real sqlite MLflow store:
the gate, racing promotions, the lock, rollback and its item-table refusal, verified downloads,
an unreachable registry, and the registered pyfunc serving the same probabilities as the project."""

import shutil
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import polars as pl
import pytest
from pg_server import free_port

from mmctr_assets.lib.ctr import registry as reg
from mmctr_assets.lib.ctr import registry_cli
from mmctr_assets.lib.ctr.artifacts import save_model
from mmctr_assets.lib.ctr.model import CTRModel
from mmctr_assets.lib.ctr.model_config import ModelConfig
from mmctr_assets.resources import MlflowResource

NAME = "mmctr-ctr"
N_ITEMS, DIM, WIDTH = 40, 8, 10


def _model_file(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(N_ITEMS + 1, DIM)).astype(np.float32)
    emb[0] = 0
    config = ModelConfig(embedding_dim=DIM, max_len=WIDTH, attention_units=(8,), deep_units=(8,),
                         use_item_frequency=False, family="dcn_din", use_id_embedding=False,
                         use_tag_embedding=False, use_user_embedding=False, embedding_regularizer=0.0)
    import torch

    torch.manual_seed(seed)
    return save_model(CTRModel(config, emb), path)


@pytest.fixture
def store(tmp_path):
    """A resource on a fresh sqlite store and a function registering one version per call."""
    resource = MlflowResource(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment_name="t")

    def add(auc: float, items: str = "items-A", seed: int = 0) -> str:
        folder = tmp_path / f"m{seed}-{time.monotonic_ns()}"
        folder.mkdir()
        model, config = _model_file(folder / "model.pt", seed), folder / "model_config.json"
        config.write_text("{}")
        with resource.start_run("r") as run:
            return resource.register_model(run, model, config, {reg.TAG_AUC: str(auc), reg.TAG_ITEMS: items})

    return resource, add


def _by_tag(registry):
    """Score a champion by the AUC tag it was registered with (what the asset computes on valid)."""
    return lambda mv: float(mv.tags[reg.TAG_AUC])


def test_first_version_is_promoted_a_worse_one_is_a_challenger_an_equal_one_within_tolerance_wins(store):
    resource, add = store
    registry = resource.registry()
    v1 = add(0.80)
    first = registry.gate(v1, 0.80, _by_tag(registry), tolerance=0.0, owner="a")
    assert first.promoted and first.champion_version is None
    v2 = add(0.70)
    worse = registry.gate(v2, 0.70, _by_tag(registry), tolerance=0.01, owner="a")
    assert not worse.promoted and worse.champion_auc == 0.80 and "0.700000 < champion v1's 0.800000" in worse.note
    assert str(registry.champion().version) == v1
    assert str(registry.client.get_model_version_by_alias(NAME, "challenger").version) == v2
    v3 = add(0.795)
    assert registry.gate(v3, 0.795, _by_tag(registry), tolerance=0.01, owner="a").promoted
    assert str(registry.champion().version) == v3
    assert [str(v.version) for v in registry.versions()] == [v1, v2, v3]  # nothing lost
    # the lock is released: a registered model only while a promotion runs
    assert [m.name for m in registry.client.search_registered_models()] == [NAME]


def test_gate_pairs_the_models_on_the_same_rows_planted_better_equal_and_worse(store):
    """Planted scorers on one validation set: a retrain that only reshuffles the noise (a few
    thousandths lower by chance, below champion - tolerance) is promoted by the paired test where the
    point rule refuses it; a clearly worse one is refused; a clearly better one is promoted. The
    figures land in the decision and the version's gate tag."""
    from mmctr_assets.lib.metrics import delong_test

    resource, add = store
    registry = resource.registry()
    rng = np.random.default_rng(7)
    n = 3000
    y = (rng.random(n) < 0.25).astype(float)
    signal = y + rng.normal(size=n)  # what every model of this world learns, with its own small noise
    scores = {}

    def gate(scored: np.ndarray, alpha: float = 0.05):
        version = add(0.0, seed=len(scores))
        scores[version] = scored
        decision = registry.gate(version, float("nan"), lambda mv: delong_test(y, scored, scores[str(mv.version)]),
                                 tolerance=0.001, owner="a", alpha=alpha)
        return version, decision

    v1, first = gate(signal + 0.3 * rng.normal(size=n))
    assert first.promoted and first.comparison is None and first.test_summary() == {}
    champion = scores[v1]
    # the same model retrained: only its noise differs; the first such retrain that lands a few
    # thousandths below the champion (AUC - tolerance), as one in three or so does by chance
    equal, cmp = next((s, c) for s in (signal + 0.3 * rng.normal(size=n) for _ in range(100))
                      if -0.006 < (c := delong_test(y, s, champion)).diff < -0.002)
    _, point = gate(equal, alpha=0.5)
    assert not point.promoted
    v3, paired = gate(equal)  # ... the paired test sees a difference within the noise
    assert paired.promoted and paired.comparison.diff == pytest.approx(cmp.diff)
    summary = paired.test_summary()
    assert summary["p_value_worse"] > 0.05
    assert summary["auc_diff_ci_low"] < summary["auc_diff"] < summary["auc_diff_ci_high"]
    assert summary["auc_diff_ci_high"] > -0.001 and summary["ci_level"] == pytest.approx(0.9)
    assert "not significantly worse: promoted" in paired.note
    assert str(registry.champion().version) == v3
    v4, worse = gate(0.5 * y + rng.normal(size=n))
    assert not worse.promoted and worse.test_summary()["p_value_worse"] < 1e-6
    assert worse.test_summary()["auc_diff_ci_high"] < -0.001 and "significantly worse: refused" in worse.note
    assert str(registry.champion().version) == v3
    assert registry.client.get_model_version(NAME, v4).tags["gate"] == worse.note
    v5, better = gate(2 * y + rng.normal(size=n))
    assert better.promoted and better.comparison.diff > 0.05 and better.test_summary()["p_value_worse"] > 1 - 1e-6
    assert str(registry.champion().version) == v5


def test_racing_promotions_leave_one_champion_and_every_version(store):
    """Eight gates at once against champion 0.5: each reads the champion under the lock, so the
    best of them ends as champion whatever the order, and no version is lost."""
    resource, add = store
    registry = resource.registry()
    registry.gate(add(0.5), 0.5, _by_tag(registry), 0.0, owner="seed")
    aucs = [0.61, 0.66, 0.52, 0.71, 0.58, 0.69, 0.55, 0.63]
    versions = [add(a, seed=i) for i, a in enumerate(aucs)]
    barrier, decisions, errors = threading.Barrier(len(aucs)), [], []

    def race(version, auc):
        try:
            barrier.wait()
            decisions.append(resource.registry().gate(version, auc, _by_tag(registry), 0.0, owner=f"t{version}"))
        except Exception as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=race, args=va) for va in zip(versions, aucs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert len(decisions) == len(aucs)
    champion = registry.champion()
    assert float(champion.tags[reg.TAG_AUC]) == max(aucs)
    holders = [v.version for v in registry.versions()
               if "champion" in registry.client.get_model_version(NAME, v.version).aliases]
    assert holders == [champion.version]
    assert len(registry.versions()) == 1 + len(aucs)
    # each promotion was compared with the champion of its moment: the AUCs promoted only rise
    promoted = sorted((d for d in decisions if d.promoted), key=lambda d: d.new_auc)
    assert all(d.champion_auc is None or d.new_auc >= d.champion_auc for d in promoted)


def test_a_stale_lock_is_taken_over_a_live_one_waits(store, monkeypatch):
    resource, add = store
    registry = resource.registry()
    lock = f"{NAME}.promotion-lock"
    registry.client.create_registered_model(lock, tags={"owner": "dead", "created": str(time.time() - 3600)})
    assert registry.gate(add(0.6), 0.6, _by_tag(registry), 0.0, owner="me").promoted
    registry.client.create_registered_model(lock, tags={"owner": "alive", "created": str(time.time())})
    with pytest.raises(TimeoutError, match="held by another promotion"):
        with registry.promotion_lock("me", wait_s=0.5):
            pass
    assert registry.client.get_registered_model(lock).tags["owner"] == "alive"  # not released by another


def test_rollback_goes_to_the_previous_champion_and_refuses_other_item_tables(store, tmp_path, capsys):
    resource, add = store
    registry = resource.registry()
    v1 = add(0.6, items="items-A")
    registry.gate(v1, 0.6, _by_tag(registry), 0.0, owner="a")
    v2 = add(0.7, items="items-A", seed=1)
    registry.gate(v2, 0.7, _by_tag(registry), 0.0, owner="a")
    assert registry.rollback("items-A", owner="op") == (v2, v1)
    assert str(registry.champion().version) == v1
    with pytest.raises(reg.PromotionRefused, match="first champion"):
        registry.rollback("items-A", owner="op")  # v2 was rolled back from: not a target
    v3 = add(0.9, items="items-B", seed=2)
    with pytest.raises(reg.PromotionRefused, match=r"trained on other item tables \(raw_item_info fingerprint items-B "
                                                   r"!= the current items-A\)"):
        registry.promote(v3, "items-A", owner="op")
    assert str(registry.champion().version) == v1
    # the operator's command: same rules, exit 2 with the reason
    out = tmp_path / "outputs"
    (out / "raw").mkdir(parents=True)
    args = ["--tracking-uri", resource.tracking_uri, "--output-dir", str(out)]
    assert registry_cli.main(args + ["promote", v2]) == 0  # no raw_item_info here: nothing to compare
    assert str(registry.champion().version) == v2
    assert registry_cli.main(args + ["list"]) == 0
    listing = capsys.readouterr().out
    assert f"champion: version {v2}" in listing
    row = next(line for line in listing.splitlines() if line.startswith(f"{v2} "))
    assert "champion" in row and "serving" in row and "rolled back" not in row
    assert registry_cli.main(args + ["rollback"]) == 0
    assert str(registry.champion().version) == v1


def test_cli_refuses_a_version_of_other_item_tables_with_the_reason(store, tmp_path, capsys):
    resource, add = store
    out = tmp_path / "outputs"
    (out / "raw").mkdir(parents=True)
    pl.DataFrame({"item_id": [0, 1]}).write_parquet(out / "raw" / "item_info.parquet")
    from mmctr_assets.lib.io import file_fingerprint

    current = file_fingerprint(out / "raw" / "item_info.parquet")
    registry = resource.registry()
    v1 = add(0.6, items=current)
    registry.gate(v1, 0.6, _by_tag(registry), 0.0, owner="a")
    v2 = add(0.7, items="older-items")
    args = ["--tracking-uri", resource.tracking_uri, "--output-dir", str(out)]
    assert registry_cli.main(args + ["promote", v2]) == 2
    err = capsys.readouterr().err
    assert f"promote to {NAME} version {v2} refused: it was trained on other item tables" in err
    assert registry_cli.main(args + ["promote", "99"]) == 2
    assert "has no version 99" in capsys.readouterr().err
    assert str(registry.champion().version) == v1


def test_model_file_is_verified_and_a_missing_one_says_how_to_fix(store, tmp_path):
    resource, add = store
    registry = resource.registry()
    v1 = add(0.6)
    registry.gate(v1, 0.6, _by_tag(registry), 0.0, owner="a")
    champion = registry.champion()
    local = tmp_path / "local.pt"
    local.write_bytes(b"not the champion")
    got = registry.model_file(champion, tmp_path / "cache", local_copy=local)
    assert got == tmp_path / "cache" / f"v{v1}" / "model.pt" and reg.sha256(got) == champion.tags[reg.TAG_SHA]
    shutil.rmtree(tmp_path / "cache")
    stored = registry.client.get_logged_model(champion.source.removeprefix("models:/")).artifact_location
    shutil.rmtree(Path(stored.removeprefix("file://")))
    with pytest.raises(reg.ChampionFilesMissing, match=r"no readable model.pt in the registry .*Fix: `mmctr-model "
                                                        r"rollback` .*or materialise dcn_din_model"):
        registry.model_file(champion, tmp_path / "cache", local_copy=local)


@pytest.mark.parametrize("uri", ["http://127.0.0.1:{port}", "sqlite:///{tmp}/a-file/mlflow.db"])
def test_unreachable_registry_fails_fast_with_the_fix(uri, tmp_path):
    (tmp_path / "a-file").write_text("a file where the database's folder should be")
    started = time.monotonic()
    with pytest.raises(reg.RegistryUnavailable, match="deploy/mlflow-server.sh.*nothing was trained or overwritten"):
        reg.check_reachable(uri.format(port=free_port(), tmp=tmp_path), timeout_s=5)
    assert time.monotonic() - started < 60  # not MLflow's minutes of retries


def test_registered_pyfunc_predicts_what_the_project_predicts(store):
    from mmctr_assets.lib.ctr.artifacts import load_model
    from mmctr_assets.lib.ctr.inference import predict
    from mmctr_assets.lib.ctr.tensors import to_tensors

    resource, add = store
    registry = resource.registry()
    version = add(0.6, seed=3)
    registry.gate(version, 0.6, _by_tag(registry), 0.0, owner="a")
    rng = np.random.default_rng(0)
    seq = rng.integers(1, N_ITEMS + 1, (5, WIDTH))
    seq[:, :2] = 0
    frame = pl.DataFrame({"user_id": np.arange(5), "item_seq": seq.tolist(), "item_id": rng.integers(1, N_ITEMS + 1, 5),
                          "likes_level": rng.integers(1, 11, 5), "views_level": rng.integers(1, 11, 5)})
    served = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    assert served.metadata.get_input_schema().input_names() == ["user_id", "item_id", "likes_level", "views_level",
                                                               "item_seq"]
    got = np.asarray(served.predict(frame.to_pandas()))
    model = load_model(registry.model_file(registry.champion(), Path(resource.tracking_uri[10:]).parent / "c"))
    want = predict(model, to_tensors(frame, WIDTH, n_items=N_ITEMS))
    np.testing.assert_array_equal(got, want)  # same code path, same batch: same floats


# ---- issue 29: the gate holds without a champion alias; `list` shows who serves, on both stores ------


@pytest.fixture(params=["sqlite", "postgres"])
def any_store(request, tmp_path, monkeypatch):
    """(resource, add) as ``store``, on a sqlite file and on a Postgres database (MLflow's SQL store)."""
    monkeypatch.chdir(tmp_path)  # a database store puts run artifacts under ./mlruns
    if request.param == "sqlite":
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        server = None
    else:
        from pg_server import postgres_server

        server = postgres_server()
        pg = server.__enter__()
        pg.create_database("mlflow")
        uri = pg.url("mlflow")
    resource = MlflowResource(tracking_uri=uri, experiment_name="t")

    def add(auc: float, seed: int = 0) -> str:
        folder = tmp_path / f"m{seed}-{time.monotonic_ns()}"
        folder.mkdir()
        model, config = _model_file(folder / "model.pt", seed), folder / "model_config.json"
        config.write_text("{}")
        with resource.start_run("r") as run:
            return resource.register_model(run, model, config, {reg.TAG_AUC: str(auc), reg.TAG_ITEMS: "items-A"})

    try:
        yield resource, add
    finally:
        if server is not None:
            server.__exit__(None, None, None)


def test_without_a_champion_alias_nothing_is_promoted_and_list_shows_who_serves(any_store, tmp_path, capsys):
    resource, add = any_store
    registry = resource.registry()
    v1 = add(0.9)
    assert registry.gate(v1, 0.9, _by_tag(registry), 0.0, owner="a").promoted
    out = tmp_path / "outputs"
    (out / "dcn_din_model").mkdir(parents=True)
    shutil.copy(registry.model_file(registry.champion(), tmp_path / "cache"), out / "dcn_din_model" / "model.pt")
    args = ["--tracking-uri", resource.tracking_uri, "--output-dir", str(out)]

    registry.client.delete_registered_model_alias(NAME, "champion")  # e.g. removed in the UI
    v2 = add(0.5, seed=1)  # a worse model must not slip through
    decision = registry.gate(v2, 0.5, _by_tag(registry), 0.0, owner="a")
    assert not decision.promoted and registry.champion() is None
    assert f"has versions {v1} but none holds the alias 'champion'" in decision.note
    assert f"`mmctr-model promote {v2}`" in decision.note and "mmctr-model promote VERSION" in decision.note
    assert registry.aliases() == {"challenger": v2}

    assert registry_cli.main(args + ["list"]) == 0
    listing = capsys.readouterr().out
    assert "champion: none (`mmctr-model promote VERSION` chooses one)" in listing
    assert f"challenger: version {v2}" in listing and f"model.pt: version {v1}" in listing
    assert "serving" not in listing  # nobody serves; v1 served before
    assert "served before" in next(line for line in listing.splitlines() if line.startswith(f"{v1} "))

    assert registry_cli.main(args + ["promote", v1]) == 0
    capsys.readouterr()
    assert registry_cli.main(args + ["list"]) == 0
    listing = capsys.readouterr().out
    assert f"champion: version {v1}" in listing and f"model.pt: version {v1}" in listing
    rows = {line.split()[0]: line for line in listing.splitlines()[4:]}
    assert "champion" in rows[v1] and "serving" in rows[v1]
    assert "challenger" in rows[v2] and "serving" not in rows[v2] and "served" not in rows[v2]


def test_a_missing_sqlite_store_is_refused_by_readers_and_never_created(tmp_path, capsys):
    db = tmp_path / "gone" / "mlflow.db"
    uri = f"sqlite:///{db}"
    for command in (["list"], ["promote", "1"], ["rollback"]):
        assert registry_cli.main(["--tracking-uri", uri, "--output-dir", str(tmp_path), *command]) == 2
        err = capsys.readouterr().err
        assert f"MLflow store {db} does not exist" in err and "it was not created" in err
    assert not db.exists() and not db.parent.exists()
    # a writer in a new deployment (no model.pt yet) may create it
    reg.check_reachable(uri, must_exist=False)
    assert db.exists()


def test_a_locked_sqlite_store_says_so_and_what_to_do(tmp_path):
    import sqlite3

    resource = MlflowResource(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment_name="t")
    resource.check_reachable()  # creates the store
    holder = sqlite3.connect(tmp_path / "mlflow.db")
    holder.execute("BEGIN EXCLUSIVE")  # another process mid-write
    try:
        with pytest.raises(reg.RegistryUnavailable, match=r"database is locked.*holds a write lock on this sqlite "
                                                          r"store.*let it finish or stop it"):
            resource.check_reachable(must_exist=True)
    finally:
        holder.rollback()
        holder.close()


# ---- issue 30: a model with click statistics serves them from its registered file ---------------------


def test_registered_pyfunc_with_statistics_features_scores_from_the_training_statistics(store, tmp_path):
    import torch

    from mmctr_assets.lib.ctr.artifacts import load_model
    from mmctr_assets.lib.ctr.inference import predict
    from mmctr_assets.lib.ctr.statistics import TrainingStatistics
    from mmctr_assets.lib.ctr.tensors import to_tensors

    resource, _ = store
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(N_ITEMS + 1, DIM)).astype(np.float32)
    emb[0] = 0
    config = ModelConfig(embedding_dim=DIM, max_len=WIDTH, attention_units=(8,), deep_units=(8,),
                         use_item_frequency=False, family="dcn_din", use_id_embedding=False,
                         use_tag_embedding=False, use_user_embedding=False, embedding_regularizer=0.0,
                         use_statistics_features=True)
    stats, _ = TrainingStatistics.fit(rng.integers(1, N_ITEMS + 1, 200), rng.integers(0, 5, 200),
                                      rng.integers(0, 2, 200), N_ITEMS)
    model = CTRModel(config, emb, statistics=stats)
    path = save_model(model, tmp_path / "stats" / "model.pt")
    (tmp_path / "stats" / "model_config.json").write_text("{}")
    with resource.start_run("r") as run:
        version = resource.register_model(run, path, tmp_path / "stats" / "model_config.json",
                                          {reg.TAG_AUC: "0.6", reg.TAG_ITEMS: "items-A"})
    registry = resource.registry()
    registry.gate(version, 0.6, _by_tag(registry), 0.0, owner="a")
    seq = rng.integers(1, N_ITEMS + 1, (6, WIDTH))
    seq[:, :2] = 0
    # users 0..4 were in the training rows, 77 never: each row's own statistics, the prior for 77
    frame = pl.DataFrame({"user_id": [0, 1, 2, 3, 4, 77], "item_seq": seq.tolist(),
                          "item_id": rng.integers(1, N_ITEMS + 1, 6), "likes_level": rng.integers(1, 11, 6),
                          "views_level": rng.integers(1, 11, 6)})
    got = np.asarray(mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(frame.to_pandas()))
    served = load_model(registry.model_file(registry.champion(), tmp_path / "c"))
    assert torch.equal(served.statistics.user_counts, stats.user_counts)
    np.testing.assert_array_equal(got, predict(served, to_tensors(frame, WIDTH, n_items=N_ITEMS)))
    np.testing.assert_array_equal(got, predict(model, to_tensors(frame, WIDTH, n_items=N_ITEMS)))
