"""The installed package is the product: what an image runs (docs/deployment.md, "Install"),
`pip install -c constraints.txt ".[prod]"`, NOT editable, then the code location loads from
site-packages, `dg check defs` passes in a project folder that holds no source, and the graph runs
from raw files to the submission zip with the shipped instance file.

The environment is a fresh venv whose only extra path is a folder of links to the test venv's
installed packages, without this checkout's editable finder: the dependencies are reused (no
download), mmctr itself is built from a copy of the source and installed as a wheel.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import polars as pl
import pytest
from conftest import SHARDS

REPO = Path(__file__).parents[1]
# what `pip install .` needs of a checkout (the sdist's content)
SOURCE = ["pyproject.toml", "setup.py", "README.md", "constraints.txt", "mmctr_assets"]
# the deployment project `dg` reads: the code location is the installed module; the root module is
# an empty folder (dg wants one in the project), so no mmctr source is there
DG_PROJECT = """\
[project]
name = "mmctr-deployment"
version = "0"
dependencies = ["mmctr[prod]"]

[tool.dg]
directory_type = "project"

[tool.dg.project]
root_module = "mmctr_deployment"
code_location_target_module = "mmctr_assets"
code_location_name = "mmctr"
"""


def _installed_dependencies(root: Path) -> Path:
    """Links to every package of this venv but the editable install of the checkout."""
    deps = root / "deps"
    deps.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith(("__editable__", "mmctr-", "mmctr_assets")) and entry.suffix != ".pth":
            (deps / entry.name).symlink_to(entry)
    return deps


def _run(args: list, cwd: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


@pytest.mark.slow
def test_the_installed_wheel_loads_checks_and_runs_the_graph(tiny_data, tiny_clip_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCE:
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
        copy(REPO / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                         if (REPO / name).is_dir() else {}))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "mmctr-dependencies.pth").write_text(f"{_installed_dependencies(tmp_path)}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}

    # the documented image install, offline: every dependency is already there; the wheel is built
    # with the setuptools already installed (no isolated build environment to download)
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-index", "--no-build-isolation",
          "-c", "constraints.txt", ".[prod]"], src, env)

    # loaded from site-packages, with the checkout nowhere on the path
    work = tmp_path / "work"
    work.mkdir()
    probe = _run([python, "-c", "import json, sys, mmctr_assets.definitions, mmctr_assets as m; from mmctr_assets "
                  "import deploy; print(m.__file__); print(deploy.path('presets', 'default.yaml')); "
                  "print(json.dumps(sys.path))"], work, env).stdout.splitlines()
    assert Path(probe[0]).is_relative_to(site), probe
    assert Path(probe[1]).is_file() and Path(probe[1]).is_relative_to(site), probe
    assert not any(Path(p or work).resolve().is_relative_to(REPO.resolve()) for p in json.loads(probe[2])), probe[2]
    server_script = Path(_run([venv / "bin" / "mmctr-deploy-file", "mlflow-server.sh"], work, env).stdout.strip())
    assert server_script.is_relative_to(site) and os.access(server_script, os.X_OK)

    # `dg check defs` in a deployment project without source (dg itself from the installed packages)
    project = tmp_path / "project"
    (project / "mmctr_deployment").mkdir(parents=True)
    (project / "pyproject.toml").write_text(DG_PROJECT)
    home = tmp_path / "dagster_home"
    home.mkdir()
    shipped_instance = _run([venv / "bin" / "mmctr-deploy-file", "dagster.yaml"], work, env).stdout.strip()
    shutil.copy(shipped_instance, home / "dagster.yaml")
    out = tmp_path / "outputs"
    env |= {"DAGSTER_HOME": str(home), "MMCTR_DATA_DIR": str(tiny_data), "MMCTR_OUTPUT_DIR": str(out),
            "MMCTR_CLIP_MODEL": str(tiny_clip_dir), "MMCTR_STATE_DIR": str(tmp_path / "state")}
    checked = _run([python, "-c", "import sys; from dagster_dg_cli.cli import main; sys.argv[0] = 'dg'; main()",
                    "check", "defs", "--no-check-yaml"], project, env)
    assert "All definitions loaded successfully" in checked.stdout + checked.stderr

    # raw files -> submission zip through the installed code location and the shipped instance file
    _run([python, "-m", "dagster", "asset", "materialize", "-m", "mmctr_assets",
          "--select", "not key:ctr_tuning and not key:task1_score",
          "--partition-range", f"{SHARDS[0]}...{SHARDS[-1]}",
          "--config-json", '{"ops": {"dcn_din_model": {"config": {"train": {"batch_size": 256, "epochs": 1}}}}}'],
         work, env)
    with zipfile.ZipFile(out / "submission.zip") as zf, zf.open("prediction.csv") as f:
        submission = pl.read_csv(f)
    assert submission.columns == ["ID", "Task2"]
    assert submission.height == pl.read_parquet(tiny_data / "MicroLens_1M_x1" / "test.parquet").height
    assert (out / "item_info_updated.parquet").exists() and (out / "dcn_din_model" / "model.pt").exists()
