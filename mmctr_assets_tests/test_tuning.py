"""ctr_tuning: search-space validation, the Optuna study (crashing trials, resume after kill -9),
MLflow parent/child runs, and dcn_din_model trained from the study's best config."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dagster as dg
import mlflow
import numpy as np
import optuna
import pytest
import yaml

from mmctr_assets import settings
from mmctr_assets.defs import ctr as task2
from mmctr_assets.defs import tuning as tuning_defs
from mmctr_assets.lib.ctr import presets, tensors, trainer, tuning
from mmctr_assets.lib.ctr.model_config import ModelConfig
from mmctr_assets.lib.data import microlens

SHIPPED = settings.PACKAGE_DIR / "deploy" / "tuning"
# tiny data (2,000 training rows): small batches, one or two epochs per trial, no id/tag tables
# (the user table is the trainable one the regulariser depends on)
TINY_SPACE = {
    "fixed": {"epochs": 2, "batch_size": 256, "early_stopping_patience": 1, "use_id_embedding": False,
              "use_tag_embedding": False},
    "params": {
        "use_user_embedding": {"choices": [True, False]},
        "embedding_regularizer": {"low": 1e-4, "high": 1e-2, "log": True, "when": {"use_user_embedding": True}},
        "lr": {"low": 1e-3, "high": 5e-3, "log": True},
        "dropout": {"low": 0.0, "high": 0.2},
    },
}


def write_space(tmp_path: Path, space: dict, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(space, sort_keys=False))  # "when" refers to earlier params
    return path


# ---------------------------------------------------------------------------------------------
# search-space validation


@pytest.mark.parametrize("name", ["search_space.yaml", "search_space_demo.yaml"])
def test_shipped_search_spaces_are_valid(name):
    space = tuning.load_search_space(SHIPPED / name)
    assert space.params and {p.section for p in space.params} == {"model", "train"}


@pytest.mark.parametrize("name", ["search_space.yaml", "search_space_demo.yaml"])
def test_every_config_a_shipped_space_samples_is_one_the_model_accepts(name):
    # a refused combination would cost a trial of the budget; random draws cover the `when` branches
    space = tuning.load_search_space(SHIPPED / name)
    base = presets.preset("default")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    families, trainable = set(), set()
    for _ in range(300):
        trial = study.ask()
        model, train = tuning.sample_config(trial, space, base["model"] | {"max_len": 100}, base["train"])
        config = ModelConfig(**model, embedding_dim=128)
        trainer.TrainConfig(**train)
        families.add(config.family)
        trainable.add(config.trainable_embeddings())
        study.tell(trial, 0.5)
    assert families == set(next(p.choices for p in space.params if p.name == "family"))
    if name == "search_space.yaml":  # it can switch every table off: that draw once failed its trial
        assert trainable == {True, False}


def test_unknown_parameter_names_it_the_allowed_keys_and_the_file(tmp_path):
    path = write_space(tmp_path, {"params": {"learning_rate": {"low": 1e-4, "high": 1e-2}}})
    with pytest.raises(tuning.SearchSpaceError) as e:
        tuning.load_search_space(path)
    assert "'learning_rate'" in str(e.value) and str(path) in str(e.value)
    assert "'lr'" in str(e.value) and "'use_id_embedding'" in str(e.value)  # what is allowed


@pytest.mark.parametrize("space, match", [
    ({"parms": {}}, r"unknown top-level key\(s\) \['parms'\]"),
    ({"params": {"lr": {"low": 1e-4, "high": 1e-2, "scale": "log"}}}, r"unknown key\(s\) in params.lr \['scale'\]"),
    ({"fixed": {"epochs": 3, "dropuot": 0.1}, "params": {"lr": {"choices": [1e-3]}}}, r"under fixed \['dropuot'\]"),
    ({"params": {"lr": {"low": 1e-2, "high": 1e-4}}}, r"params.lr: low \(0.01\) must be below high"),
    ({"params": {"lr": {"low": 0, "high": 1e-2, "log": True}}}, r"params.lr: a log-scale range needs low > 0"),
    ({"params": {"batch_size": {"choices": []}}}, r"params.batch_size.choices must be a non-empty list"),
    ({"params": {"lr": {"low": 1e-4}}}, r"params.lr needs choices"),
    ({"params": {"id_embedding_dim": {"choices": [32], "when": {"use_id_embedding": True}}}},
     r"when refers to 'use_id_embedding'"),
    ({"params": {"lr": {"choices": [1e-3]}}, "fixed": {"lr": 1e-3}}, r"'lr' is both under fixed and under params"),
])
def test_bad_search_space_field_is_named(tmp_path, space, match):
    path = write_space(tmp_path, space)
    with pytest.raises(tuning.SearchSpaceError, match=match) as e:
        tuning.load_search_space(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("text", ["", "params: {}\n", "fixed: {epochs: 2}\n"])
def test_empty_search_space_is_refused(tmp_path, text):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(tuning.SearchSpaceError, match="the search space is empty") as e:
        tuning.load_search_space(path)
    assert str(path) in str(e.value)


def test_yaml_numbers_without_a_dot_are_numbers(tmp_path):
    # YAML 1.1 reads `1e-4` as a string; a person writes it that way
    path = tmp_path / "space.yaml"
    path.write_text("params:\n  lr: {low: 1e-4, high: 1e-2, log: true}\n")
    (lr,) = tuning.load_search_space(path).params
    assert (lr.low, lr.high, lr.is_int) == (1e-4, 1e-2, False)


def test_n_trials_below_one_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    with pytest.raises(ValueError, match="n_trials must be >= 1, got 0"):
        tuning.open_study(url, "s", seed=0, n_trials=0)
    study = tuning.open_study(url, "s", seed=0, n_trials=1)
    with pytest.raises(ValueError, match="n_trials must be >= 1, got -1"):
        tuning.run_study(study, tuning.parse_search_space(TINY_SPACE), lambda *a: 0.5, n_trials=-1)


@pytest.mark.parametrize("url", ["sqlite:///{tmp}/no/such/folder/optuna.db", "nosuchdb://user:secret@host/db",
                                 "sqlite:///{tmp}"])  # the last one is a folder, not a database file
def test_unreachable_storage_names_the_url(tmp_path, url):
    url = url.format(tmp=tmp_path)
    with pytest.raises(tuning.StudyStorageError, match="is unreachable") as e:
        tuning.open_study(url, "s", seed=0, n_trials=1)
    assert "secret" not in str(e.value)  # the password is never printed
    assert url.replace("secret", "***").split("/")[-1] in str(e.value)


def test_tuned_without_a_study_says_to_run_ctr_tuning(tmp_path):
    with pytest.raises(FileNotFoundError, match="materialise ctr_tuning first") as e:
        tuning.tuned_sections(tuning.tuned_file(tmp_path), {}, {})
    assert str(tuning.tuned_file(tmp_path)) in str(e.value)


# ---------------------------------------------------------------------------------------------
# the study, on the library level: real training on the tiny data


@pytest.fixture(scope="module")
def tiny_tensors(tiny_data):
    info = microlens.read_table(tiny_data, "item_info")
    emb = np.asarray(info.get_column("item_emb_d128").to_list(), dtype=np.float32)
    frames = {t: microlens.read_table(tiny_data, t) for t in ("train", "valid")}
    width = tensors.history_width(frames["train"])
    data = {t: tensors.to_tensors(f, width, n_items=len(emb) - 1) for t, f in frames.items()}
    tags = info.get_column("item_tags").list.to_array(5).to_numpy()
    return data, emb, width, tags


@pytest.fixture
def tiny_runner(tiny_tensors, tmp_path):
    data, emb, _, tags = tiny_tensors

    def run(trial, model_config, train_config):
        result = trainer.train(model_config, train_config, data["train"], data["valid"], emb,
                               item_tags=tags if model_config.use_tag_embedding else None,
                               checkpoint_dir=tmp_path / f"trial-{trial.number}",
                               on_epoch_end=lambda e: tuning.report_epoch(trial, e.epoch, e.valid_auc))
        return result.best_valid_auc

    return run


def test_crashing_trial_is_recorded_failed_and_the_study_goes_on(tmp_path, tiny_tensors, tiny_runner):
    width = tiny_tensors[2]
    space = tuning.parse_search_space(TINY_SPACE)
    study = tuning.open_study(f"sqlite:///{tmp_path / 'optuna.db'}", "crash", seed=3, n_trials=3)
    # a regulariser with no trainable table is an invalid ModelConfig: this trial raises
    study.enqueue_trial({"use_user_embedding": False, "embedding_regularizer": 1e-3, "lr": 2e-3, "dropout": 0.1},
                        skip_if_exists=False)
    study.enqueue_trial({"use_user_embedding": True, "embedding_regularizer": 1e-3, "lr": 2e-3, "dropout": 0.1})
    # `when` makes embedding_regularizer inactive for use_user_embedding false: force it by fixing it
    crash_space = tuning.parse_search_space({**TINY_SPACE,
                                             "fixed": {**TINY_SPACE["fixed"], "embedding_regularizer": 1e-3},
                                             "params": {k: v for k, v in TINY_SPACE["params"].items()
                                                        if k != "embedding_regularizer"}})
    assert tuning.run_study(study, crash_space, tiny_runner, n_trials=1, base_model={"max_len": width}) == 1
    assert tuning.run_study(study, space, tiny_runner, n_trials=3, base_model={"max_len": width}) == 2
    rows = tuning.trial_rows(study)
    assert [r["state"] for r in rows] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert "ValueError" in rows[0]["error"] and "needs a trainable embedding" in rows[0]["error"]
    assert rows[1]["auc"] > 0.5 and "FAIL (ValueError" in tuning.trials_markdown(rows)
    best, model, train = tuning.best_sections(study)
    assert best.number in (1, 2) and train["epochs"] == 2 and model["max_len"] == width
    # the budget is reached: a re-run does nothing
    assert tuning.run_study(study, space, tiny_runner, n_trials=3, base_model={"max_len": width}) == 0


def test_no_completed_trial_writes_no_best_config(tmp_path):
    study = tuning.open_study(f"sqlite:///{tmp_path / 'optuna.db'}", "broken", seed=0, n_trials=2)

    def crash(trial, model_config, train_config):
        raise RuntimeError("CUDA out of memory")

    assert tuning.run_study(study, tuning.parse_search_space(TINY_SPACE), crash, n_trials=2) == 2
    good = tuning.tuned_file(tmp_path)
    good.parent.mkdir(parents=True)
    good.write_text("last good")
    with pytest.raises(RuntimeError, match="no completed trial.*CUDA out of memory"):
        tuning.write_best_config(good, study, "sqlite:///x.db")
    assert good.read_text() == "last good"  # a failed study never replaces the last good config


def test_the_default_config_is_the_first_trial_and_hyperband_stops_trials_outside_the_best_third(tmp_path):
    # per-trial valid AUC curves (epochs 1, 2); the runner reports them as trainer.train would
    curves = [[0.70, 0.75], [0.72, 0.78], [0.64, 0.90], [0.75, 0.80], [0.71, 0.72]]
    study = tuning.open_study(f"sqlite:///{tmp_path / 'optuna.db'}", "prune", seed=0, n_trials=5, max_epochs=2)
    configs = []

    def replay(trial, model_config, train_config):
        configs.append((model_config, train_config))
        for epoch, auc in enumerate(curves[trial.number], start=1):
            tuning.report_epoch(trial, epoch, auc)
        return max(curves[trial.number])

    space = tuning.parse_search_space(TINY_SPACE)
    tuning.run_study(study, space, replay, n_trials=5, base_model={"max_len": 20})
    rows = tuning.trial_rows(study)
    # trial 0 is the default config (library defaults under `fixed`), whatever the sampler would pick
    assert rows[0]["default"] and not any(r["default"] for r in rows[1:])
    assert rows[0]["params"] == tuning.default_params(space, {"max_len": 20})
    assert "(default)" in tuning.trials_markdown(rows)
    model, train = configs[0]
    assert (model.family, model.use_user_embedding, model.embedding_regularizer, train.lr) == (
        "transformer_dcnv2", True, ModelConfig.embedding_regularizer, trainer.TrainConfig.lr)
    # one bracket (2 epochs, reduction factor 3): at the epoch-1 rung a trial goes on while it is the
    # best so far of fewer than three, then while in the best third. The first always goes on;
    # 0.72 beats 0.70; 0.64 is pruned however well it would have ended; 0.75 is the best; 0.71
    # is not in the best third of five
    assert [(r["state"], r["epochs"]) for r in rows] == [("COMPLETE", 2), ("COMPLETE", 2), ("PRUNED", 1),
                                                          ("COMPLETE", 2), ("PRUNED", 1)]


def test_a_search_space_without_the_default_config_is_refused():
    space = tuning.parse_search_space({**TINY_SPACE, "params": {"batch_size": {"choices": [256, 512]}},
                                       "fixed": {"epochs": 2}}, "narrow.yaml")
    with pytest.raises(tuning.SearchSpaceError, match=r"narrow.yaml: params.batch_size \(one of \[256, 512\]\) "
                                                      r"does not hold the default's batch_size=4096"):
        tuning.run_study(optuna.create_study(direction="maximize"), space, lambda *a: 0.5, n_trials=1)


@pytest.mark.parametrize("name", ["search_space.yaml", "search_space_demo.yaml"])
def test_shipped_spaces_hold_the_default_config(name):
    space = tuning.load_search_space(SHIPPED / name)
    first = tuning.default_params(space, {"max_len": 100})
    assert first["family"] == "transformer_dcnv2" and first["batch_size"] == 4096
    assert first["use_id_embedding"] and first["use_user_embedding"]


def test_the_budget_stops_a_running_trial_and_starts_no_other(tmp_path):
    study = tuning.open_study(f"sqlite:///{tmp_path / 'optuna.db'}", "budget", seed=0, n_trials=5)
    budget = tuning.Budget(0.01)  # 0.6 s
    steps = []

    def endless(trial, model_config, train_config):  # a training that would outlast any budget
        while True:
            steps.append(trial.number)
            budget.check(trial, epoch=1)
            time.sleep(0.01)

    assert tuning.run_study(study, tuning.parse_search_space(TINY_SPACE), endless, n_trials=5, budget=budget) == 1
    (row,) = tuning.trial_rows(study)
    assert row["state"] == "PRUNED" and row["stopped_at_budget"] and set(steps) == {0}
    assert budget.left_s() == 0  # and a resumed run with the spent budget starts nothing
    assert tuning.run_study(study, tuning.parse_search_space(TINY_SPACE), endless, n_trials=5, budget=budget) == 0
    with pytest.raises(RuntimeError, match="stopped at the study's wall-time budget: raise budget_minutes"):
        tuning.best_sections(study)
    with pytest.raises(ValueError, match="budget must be > 0 minutes"):
        tuning.Budget(0)


def test_a_trial_the_budget_stops_after_an_epoch_completes_with_its_auc_so_far(tmp_path):
    """The budget ends inside the default (first) trial after its first epoch: the study still returns
    it, scored at the fidelity it reached, instead of nothing."""
    study = tuning.open_study(f"sqlite:///{tmp_path / 'optuna.db'}", "cut", seed=0, n_trials=3)
    budget = tuning.Budget(0.01)

    def one_epoch_then_endless(trial, model_config, train_config):
        tuning.report_epoch(trial, 1, 0.61)
        while True:
            budget.check(trial, epoch=2)
            time.sleep(0.01)

    space = tuning.parse_search_space(TINY_SPACE)
    assert tuning.run_study(study, space, one_epoch_then_endless, n_trials=3, budget=budget) == 1
    (row,) = tuning.trial_rows(study)
    assert (row["state"], row["auc"], row["default"], row["stopped_at_budget"]) == ("COMPLETE", 0.61, True, True)
    assert "COMPLETE (budget) (default)" in tuning.trials_markdown([row])
    best, model, _ = tuning.best_sections(study)
    assert best.number == 0 and ModelConfig(**model, max_len=20).family == "transformer_dcnv2"


KILLED_WORKER = textwrap.dedent("""
    import sys, time
    import sqlalchemy
    from mmctr_assets.lib.ctr import tuning
    storage = tuning.open_storage(sys.argv[1], heartbeat_interval=1, grace_period=1)
    study = tuning.open_study(storage, "resume", seed=0, n_trials=2)
    space = tuning.parse_search_space({"params": {"lr": {"low": 1e-3, "high": 5e-3, "log": True}}})

    def hang(trial, model_config, train_config):
        # Optuna's heartbeat thread records the trial's first beat shortly after it starts: a worker
        # killed before that beat leaves a trial that can never turn stale, so say TRAINING after it
        with storage.engine.connect() as connection:
            while not connection.execute(sqlalchemy.text("select count(*) from trial_heartbeats")).scalar():
                time.sleep(0.05)
        print("TRAINING", flush=True)
        time.sleep(600)

    tuning.run_study(study, space, hang, n_trials=2)
""")


def test_study_resumes_after_its_worker_is_killed(tmp_path, tiny_tensors, tiny_runner):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    env = os.environ | {"PYTHONPATH": str(settings.PACKAGE_DIR.parent)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WORKER, url], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "TRAINING"  # a trial is RUNNING, with a heartbeat
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    storage = tuning.open_storage(url, heartbeat_interval=1, grace_period=1)
    (left,) = optuna.load_study(study_name="resume", storage=storage).get_trials()
    assert left.state == optuna.trial.TrialState.RUNNING
    study = tuning.open_study(storage, "resume", seed=0, n_trials=2)
    # the trial turns stale once its last heartbeat is older than the grace period (1 s; sqlite
    # stores whole seconds). Wait for that state instead of sleeping a fixed time: on a loaded
    # machine the heartbeat thread and the clock can lag by more than any fixed margin.
    deadline = time.monotonic() + 60
    while study.get_trials()[0].state == optuna.trial.TrialState.RUNNING:
        assert time.monotonic() < deadline, "the killed trial never turned stale"
        time.sleep(0.5)
        optuna.storages.fail_stale_trials(study)
    space = tuning.parse_search_space({"fixed": TINY_SPACE["fixed"],
                                       "params": {"lr": {"low": 1e-3, "high": 5e-3, "log": True}}})
    assert tuning.run_study(study, space, tiny_runner, n_trials=2, base_model={"max_len": tiny_tensors[2]}) == 2
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    # the killed trial's parameters ran again (RetryHeartbeatStaleTrialCallback)
    assert trials[1].system_attrs["failed_trial"] == 0 and trials[1].params == trials[0].params
    assert tuning.counted_trials(study) == 2


# ---------------------------------------------------------------------------------------------
# the asset: MLflow parent/child runs, metadata, and dcn_din_model trained from the best config


@pytest.fixture(scope="module")
def tuned_outputs(task1_outputs, tiny_data, tmp_path_factory, make_resources):
    root = tmp_path_factory.mktemp("tuning")
    (root / "home").mkdir()
    out = Path(shutil.copytree(task1_outputs[0], root / "outputs"))
    space = write_space(root, TINY_SPACE)
    config = {"n_trials": 3, "search_space": str(space), "study_name": "tiny", "seed": 5}
    with dg.instance_for_test(temp_dir=str(root / "home")) as instance:
        result = dg.materialize([tuning_defs.ctr_tuning], resources=make_resources(tiny_data, out), instance=instance,
                                run_config={"ops": {"ctr_tuning": {"config": config}}})
        assert result.success
    return out, result, root


def test_study_logs_parent_and_child_runs_and_writes_the_best_config(tuned_outputs):
    out, result, root = tuned_outputs
    meta = result.asset_materializations_for_node("ctr_tuning")[0].metadata
    # trial 0 (the default config) completes; Hyperband may stop trials 1 and 2 after an epoch
    assert meta["trials_complete"].value + meta["trials_pruned"].value == 3 and meta["trials_run_now"].value == 3
    assert "| 0 | COMPLETE (default) |" in meta["trials"].value
    assert meta["storage"].value == f"sqlite:///{(root / 'home').resolve() / 'optuna.db'}"  # the instance's own
    assert meta["trials"].value.startswith("| trial | state | valid AUC |")
    assert meta["trial_aucs"].value.startswith("![")
    best_file = Path(meta["best_config_path"].value)
    config = yaml.safe_load(best_file.read_text())["ops"]["dcn_din_model"]["config"]
    assert best_file == tuning.tuned_file(out) and config["train"]["seed"] == 5 and "precision" not in config["train"]

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out.parent / 'mlflow.db'}")
    parent = client.get_run(meta["mlflow_run_id"].value)
    assert parent.data.metrics["best_valid_auc"] == pytest.approx(meta["best_valid_auc"].value)
    assert parent.data.params["best.trial"] == str(meta["best_trial"].value)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.data.tags["optuna.trial"] for c in children) == ["0", "1", "2"]
    pruned = [c for c in children if c.data.tags.get("optuna.state") == "PRUNED"]
    assert len(pruned) == meta["trials_pruned"].value and all(c.data.tags["optuna.trial"] != "0" for c in pruned)
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "valid_auc")]
        if child in pruned:  # ended by the pruner after the epoch-1 rung, and KILLED
            assert steps == [1] and child.info.status == "KILLED"
        else:
            assert steps == [1, 2] and child.info.status == "FINISHED"
    best_child = next(c for c in children if c.data.tags["optuna.trial"] == str(meta["best_trial"].value))
    assert best_child.data.metrics["best_valid_auc"] == pytest.approx(meta["best_valid_auc"].value)


def test_rerun_resumes_the_study_and_adds_only_missing_trials(tuned_outputs, tiny_data, make_resources, tmp_path):
    out, _, root = tuned_outputs
    out = Path(shutil.copytree(out, tmp_path / "outputs"))
    db = out / "optuna.db"  # a sqlite storage lies in the outputs or the instance's home (test_output_paths)
    shutil.copy(root / "home" / "optuna.db", db)
    config = {"n_trials": 4, "search_space": str(root / "space.yaml"), "study_name": "tiny", "seed": 5,
              "storage": f"sqlite:///{db}"}
    with dg.instance_for_test() as instance:
        result = dg.materialize([tuning_defs.ctr_tuning], resources=make_resources(tiny_data, out), instance=instance,
                                run_config={"ops": {"ctr_tuning": {"config": config}}})
    meta = result.asset_materializations_for_node("ctr_tuning")[0].metadata
    assert meta["trials_run_now"].value == 1
    assert meta["trials_complete"].value + meta["trials_pruned"].value == 4


@pytest.mark.float_repro
def test_dcn_din_model_trains_the_best_config(tuned_outputs, tiny_data, make_resources, tmp_path):
    out, result, _ = tuned_outputs
    out = Path(shutil.copytree(out, tmp_path / "outputs"))
    meta = result.asset_materializations_for_node("ctr_tuning")[0].metadata
    with dg.instance_for_test() as instance:
        trained = dg.materialize([task2.dcn_din_model], resources=make_resources(tiny_data, out), instance=instance,
                                 run_config={"ops": {"dcn_din_model": {"config": {"tuned": True}}}})
    model_meta = trained.asset_materializations_for_node("dcn_din_model")[0].metadata
    # same config, data, seed and threads as the best trial: the same training, the same AUC
    assert model_meta["best_valid_auc"].value == pytest.approx(meta["best_valid_auc"].value, abs=1e-9)
    saved = yaml.safe_load(tuning.tuned_file(out).read_text())["ops"]["dcn_din_model"]["config"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out.parent / 'mlflow.db'}")
    params = client.get_run(model_meta["mlflow_run_id"].value).data.params
    assert params["train.lr"] == str(saved["train"]["lr"]) and params["train.epochs"] == "2"


def _best_config_file(out: Path, model: dict, train: dict) -> Path:
    """A best_run_config.yaml as ctr_tuning writes it, from a study whose best trial is ``model``/``train``."""
    study = optuna.create_study(direction="maximize")
    study.add_trial(optuna.trial.create_trial(
        value=0.9, params={"lr": train["lr"]}, distributions={"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2)},
        user_attrs={"model": model, "train": train}))
    return tuning.write_best_config(tuning.tuned_file(out), study, "sqlite:///study.db")


@pytest.mark.parametrize("launched, family", [({"tuned": True}, "dcn_din"),
                                              ({"tuned": True, "model": {"family": "din"}}, "din")])
def test_tuned_trains_the_studys_family_when_launched_through_dagster_config(
        task1_outputs, tiny_data, make_resources, tmp_path, launched, family):
    """Dagster's config processing marks `family` set although the launch config never names it; the
    study's best family must win over the default all the same, and a family the user types wins."""
    out = Path(shutil.copytree(task1_outputs[0], tmp_path / "outputs"))
    best_model = {"family": "dcn_din", "use_id_embedding": False, "use_tag_embedding": False, "position": "none",
                  "deep_units": [16], "dropout": 0.05}
    best_train = {"lr": 0.002, "batch_size": 512, "epochs": 1, "lr_factor": 0.1, "seed": 3}
    _best_config_file(out, best_model, best_train)
    if family == "din":  # din has no recency position to take from the study
        best_model.pop("position")
        _best_config_file(out, best_model, best_train)
    with dg.instance_for_test() as instance:
        result = dg.materialize([task2.dcn_din_model], resources=make_resources(tiny_data, out), instance=instance,
                                run_config={"ops": {"dcn_din_model": {"config": launched}}})
    assert result.success
    run_id = result.asset_materializations_for_node("dcn_din_model")[0].metadata["mlflow_run_id"].value
    params = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out.parent / 'mlflow.db'}").get_run(run_id).data.params
    assert params["model.family"] == family
    expected = best_model | ({"family": family} if family == "din" else {})
    resolved = ModelConfig(**(expected | {"max_len": int(params["model.max_len"])})).to_dict()
    # every model field is the study's (library defaults for what it left out), every train field too
    assert {k: params[f"model.{k}"] for k in resolved} == {k: str(v) for k, v in resolved.items()}
    assert {k: params[f"train.{k}"] for k in best_train} == {k: str(v) for k, v in best_train.items()}


def test_a_study_whose_budget_runs_out_waiting_for_cores_fails_saying_so_and_keeps_the_best_config(
        task1_outputs, tiny_data, make_resources, tmp_path, monkeypatch):
    """Other steps hold every CPU core for longer than the study's budget: the step stops waiting at
    the budget (not when the cores come free), says why, runs no trial and keeps the last best config."""
    import fcntl
    import threading

    from mmctr_assets.lib import cores

    monkeypatch.setenv(cores.LOCK_DIR_ENV, str(tmp_path / "locks"))
    (tmp_path / "locks").mkdir()
    other_steps = [open(tmp_path / "locks" / f"cpu-{i}.lock", "a+") for i in range(cores.available_cpus())]
    for f in other_steps:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    out = Path(shutil.copytree(task1_outputs[0], tmp_path / "outputs"))
    best = tuning.tuned_file(out)
    best.parent.mkdir(parents=True, exist_ok=True)
    best.write_text("last good")
    config = {"n_trials": 2, "search_space": str(write_space(tmp_path, TINY_SPACE)), "study_name": "waiting",
              "budget_minutes": 0.01, "storage": f"sqlite:///{out / 'optuna.db'}"}
    results = []

    def materialize():
        with dg.instance_for_test() as instance:
            results.append(dg.materialize([tuning_defs.ctr_tuning], resources=make_resources(tiny_data, out),
                                          instance=instance, raise_on_error=False,
                                          run_config={"ops": {"ctr_tuning": {"config": config}}}))

    step = threading.Thread(target=materialize, daemon=True)
    step.start()
    step.join(120)  # the budget is 0.6 s; without the budget in the wait it would wait for the cores forever
    for f in other_steps:
        f.close()
    step.join(120)
    assert results and not results[0].success
    failure = next(e for e in results[0].all_events if e.event_type_value == "STEP_FAILURE")
    assert "budget of 0.01 minutes ran out while it waited for CPU cores" in str(failure.event_specific_data.error)
    assert best.read_text() == "last good"
    assert optuna.load_study(study_name="waiting", storage=config["storage"]).trials == []


def test_a_trial_the_budget_stops_inside_the_asset_ends_pruned_and_the_last_best_config_stays(
        task1_outputs, tiny_data, make_resources, tmp_path, monkeypatch):
    """The asset's trial runner checks the budget during training: with a budget already spent once
    trials run (a stand-in that still lets them start, as when the deadline falls inside a trial),
    every trial stops at its first step, ends PRUNED (its MLflow child run KILLED), and the step fails
    saying to raise the budget, keeping the previous best config."""

    class SpentDuringTrials(tuning.Budget):
        def left_s(self):
            return None  # trials start ...

        def check(self, trial, epoch):
            self.deadline = time.monotonic() - 1  # ... and the deadline has passed by the first step
            super().check(trial, epoch)

    monkeypatch.setattr(tuning_defs.tuning, "Budget", SpentDuringTrials)
    out = Path(shutil.copytree(task1_outputs[0], tmp_path / "outputs"))
    best = tuning.tuned_file(out)
    best.parent.mkdir(parents=True, exist_ok=True)
    best.write_text("last good")
    config = {"n_trials": 2, "search_space": str(write_space(tmp_path, TINY_SPACE)), "study_name": "spent",
              "budget_minutes": 5, "storage": f"sqlite:///{out / 'optuna.db'}"}  # a sqlite storage lies in the outputs
    with dg.instance_for_test() as instance:
        result = dg.materialize([tuning_defs.ctr_tuning], resources=make_resources(tiny_data, out), instance=instance,
                                run_config={"ops": {"ctr_tuning": {"config": config}}}, raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "stopped at the study's wall-time budget: raise budget_minutes" in str(failure.event_specific_data.error)
    assert best.read_text() == "last good"
    study = optuna.load_study(study_name="spent", storage=config["storage"])
    assert [(t.state.name, t.user_attrs.get("stopped_at_budget")) for t in study.trials] == [("PRUNED", 1)] * 2
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out.parent / 'mlflow.db'}")
    children = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  filter_string="tags.`optuna.state` = 'STOPPED_AT_BUDGET'")
    assert len(children) == 2 and all(c.info.status == "KILLED" for c in children)
