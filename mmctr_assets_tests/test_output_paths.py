"""Launch configs cannot reach outside the outputs (lib/output_paths.py): every config value that
becomes part of a path, tried as users launch it (Dagster's config processing, `dg.materialize` with
a run config) with an absolute path, `..` and a symlink that points outside; and the one delete
guard. A victim folder outside the outputs must survive every attempt."""

import dagster as dg
import pytest
from dagster._serdes import serialize_value

from mmctr_assets.defs import ctr
from mmctr_assets.defs import tuning as tuning_defs
from mmctr_assets.lib import output_paths
from mmctr_assets.lib.ctr import tuning


@pytest.fixture
def victim(tmp_path):
    folder = tmp_path / "victim"
    folder.mkdir()
    (folder / "precious.txt").write_text("keep me")
    return folder


def _survives(victim) -> bool:
    return sorted(p.name for p in victim.iterdir()) == ["precious.txt"]


def _tune(resources, instance, **config):
    return dg.materialize([tuning_defs.ctr_tuning], resources=resources, instance=instance, raise_on_error=False,
                          run_config={"ops": {"ctr_tuning": {"config": config}}})


def _failure(result) -> str:
    assert not result.success
    return next(e for e in result.all_events if e.is_step_failure).event_specific_data.error.to_string()


# ----------------------------------------------------------------------------- the helpers
def test_plain_names_pass_and_everything_else_is_refused():
    for ok in ("ctr_tuning", "study.v2", "A-1_b"):
        assert output_paths.check_name(ok, "f") == ok
    for bad in ("/tmp/victim", "..", "../x", "a/b", "a\\b", ".hidden", "", "a..b", "x" * 101, "a b"):
        with pytest.raises(ValueError, match="not a plain name"):
            output_paths.check_name(bad, "f")


def test_remove_tree_deletes_inside_and_refuses_outside_the_root_itself_and_symlinks_out(tmp_path, victim):
    root = tmp_path / "outputs"
    (root / "ctr_tuning" / "checkpoints" / "s").mkdir(parents=True)
    output_paths.remove_tree(root, root / "ctr_tuning" / "checkpoints" / "s")
    assert not (root / "ctr_tuning" / "checkpoints" / "s").exists()
    (root / "link").symlink_to(victim)
    for target in (victim, root / ".." / "victim", root, root / "link", root / "link" / "precious.txt"):
        with pytest.raises(output_paths.OutsideOutputs, match="not inside the output folder"):
            output_paths.remove_tree(root, target)
    assert _survives(victim)


# ----------------------------------------------------------------------- ctr_tuning study_name
@pytest.mark.parametrize("name", ["{victim}", "../../../victim", "..", "checkpoints/../../../victim"])
def test_study_name_outside_is_refused_at_launch(name, victim, tmp_path, tiny_data, make_resources):
    """The issue's reproduction (study_name: /tmp/victim) and its relatives: refused with the rule,
    before the study, the data or any file is touched."""
    out = tmp_path / "outputs"
    with dg.instance_for_test() as instance:
        message = _failure(_tune(make_resources(tiny_data, out), instance, study_name=name.format(victim=victim)))
    assert "study_name" in message and "not a plain name" in message
    assert _survives(victim) and not out.exists()


@pytest.mark.parametrize("link", ["ctr_tuning/checkpoints/ctr_tuning", "ctr_tuning/checkpoints", "ctr_tuning"])
def test_study_folder_symlinked_outside_is_refused(link, victim, tmp_path, tiny_data, make_resources):
    out = tmp_path / "outputs"
    (out / link).parent.mkdir(parents=True, exist_ok=True)
    (out / link).symlink_to(victim)
    with dg.instance_for_test() as instance:
        message = _failure(_tune(make_resources(tiny_data, out), instance, study_name="ctr_tuning"))
    assert "not inside the output folder" in message and _survives(victim)


# -------------------------------------------------------------------------- ctr_tuning storage
@pytest.mark.parametrize("where", ["absolute", "dotdot", "symlink", "sqlite-uri"])
def test_sqlite_storage_outside_is_refused(where, victim, tmp_path, tiny_data, make_resources):
    out = tmp_path / "outputs"
    out.mkdir()
    (out / "link").symlink_to(victim)
    url = {"absolute": f"sqlite:///{victim}/optuna.db", "dotdot": f"sqlite:///{out}/../victim/optuna.db",
           "symlink": f"sqlite:///{out}/link/optuna.db",
           "sqlite-uri": f"sqlite:///file:{out}/x.db?mode=rwc&uri=true"}[where]
    with dg.instance_for_test() as instance:
        message = _failure(_tune(make_resources(tiny_data, out), instance, storage=url))
    assert "ctr_tuning config storage" in message and "refused" in message and _survives(victim)


def test_sqlite_storage_in_the_outputs_is_accepted(tmp_path):
    out = tmp_path / "outputs"
    url = f"sqlite:///{out}/studies/optuna.db"
    assert output_paths.check_sqlite_url(url, [out], "storage") == url
    assert output_paths.check_sqlite_url("postgresql://u:p@db/optuna", [out], "storage").startswith("postgresql")


# ---------------------------------------------------------------- files a config names to read
@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_search_space_outside_is_only_read(how, victim, tmp_path, tiny_data, make_resources):
    """search_space may name a file anywhere: it is read (and refused when not a search space),
    never written or deleted."""
    space = victim / "space.yaml"
    space.write_text("params:\n  lr: {low: 0.001, high: 0.01, log: true}\n")
    out = tmp_path / "outputs"
    out.mkdir()
    (out / "link").symlink_to(victim)
    path = {"absolute": space, "dotdot": out / ".." / "victim" / "space.yaml", "symlink": out / "link" / "space.yaml"}
    before = (space.read_bytes(), space.stat().st_mtime_ns)
    with dg.instance_for_test() as instance:
        message = _failure(_tune(make_resources(tiny_data, out), instance, search_space=str(path[how])))
    assert "raw_train" in message  # it got past the search space, to the missing training data
    assert (space.read_bytes(), space.stat().st_mtime_ns) == before
    assert sorted(p.name for p in victim.iterdir()) == ["precious.txt", "space.yaml"]
    bad = victim / "precious.txt"  # not a search space: named in the error, left alone
    with pytest.raises(tuning.SearchSpaceError, match="precious.txt"):
        tuning.load_search_space(out / "link" / "precious.txt")
    assert bad.read_text() == "keep me"


# ------------------------------------------------------------------- the asset configs' enums
@pytest.mark.parametrize("value", ["../../victim", "/tmp/victim"])
def test_embedding_source_names_only_its_tables(value, tmp_path, tiny_data, make_resources):
    """dcn_din_model's embedding_source becomes its checkpoint folder's name: Dagster refuses any
    value but the four tables at launch."""
    with pytest.raises(dg.DagsterInvalidConfigError, match="embedding_source"):
        dg.materialize([ctr.dcn_din_model], resources=make_resources(tiny_data, tmp_path / "outputs"),
                       run_config={"ops": {"dcn_din_model": {"config": {"embedding_source": value}}}})


def test_checkpoint_folder_symlinked_outside_is_refused_before_training(victim, tmp_path):
    """train_tracked's guard, which dcn_din_model's checkpoints-<source> goes through."""
    out = tmp_path / "outputs"
    (out / "dcn_din_model").mkdir(parents=True)
    (out / "dcn_din_model" / "checkpoints-fused").symlink_to(victim)
    with pytest.raises(output_paths.OutsideOutputs):
        output_paths.inside(out, out / "dcn_din_model" / "checkpoints-fused", "checkpoint folder")
    assert _survives(victim)


# ----------------------------------------------------------- resources: where things are written
@pytest.mark.parametrize("asset, resource, field, value", [
    (ctr.submission_zip, "storage", "output_dir", "{victim}"),  # (data_dir: the one in the resource)
    (ctr.dcn_din_model, "mlflow", "tracking_uri", "sqlite:///{victim}/mlflow.db"),
])
def test_a_run_config_cannot_move_the_outputs_or_the_tracking_store(asset, resource, field, value, victim, tmp_path,
                                                                     tiny_data, make_resources):
    """Resource fields are launch config too: the output folder and the tracking store are the
    deployment's (environment variables), so a run config that changes them is refused."""
    given = {field: value.format(victim=victim)} | ({"data_dir": str(tiny_data)} if resource == "storage" else {})
    with dg.instance_for_test() as instance:
        result = dg.materialize([asset], resources=make_resources(tiny_data, tmp_path / "outputs"), instance=instance,
                                raise_on_error=False, run_config={"resources": {resource: {"config": given}}})
        assert not result.success
        text = " ".join(serialize_value(e) for e in instance.all_logs(result.run_id))
    assert f"resources.{resource}.config.{field}" in text and "deployment" in text
    assert _survives(victim)
