"""Resources and settings: device selection errors and configuration from the environment."""


import pytest
import torch

from mmctr_assets import settings
from mmctr_assets.resources import ComputeResource, MlflowResource, ProjectStorage, default_resources


def test_auto_device_is_cpu_without_cuda():
    assert ComputeResource(device="auto").torch_device() == torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="asserts the no-GPU error")
def test_asking_for_cuda_without_one_is_an_error_not_a_fallback():
    with pytest.raises(RuntimeError, match="no usable CUDA device.*Set\\s+device to 'cpu' or 'auto'"):
        ComputeResource(device="cuda").torch_device()


@pytest.mark.parametrize(
    "device, precision, message",
    [("cpu", "fp16", "'fp16' needs a CUDA device"), ("cpu", "int8", "precision must be"),
     ("tpu", "fp32", "device must be")],
)
def test_bad_device_settings_are_explained(device, precision, message):
    with pytest.raises(ValueError, match=message):
        ComputeResource(device=device, precision=precision).torch_device()


def test_environment_configures_every_default(monkeypatch, tmp_path):
    monkeypatch.setenv("MMCTR_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MMCTR_OUTPUT_DIR", str(tmp_path / "out"))
    monkeypatch.setenv("MMCTR_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MMCTR_CLIP_MODEL", "/models/clip")
    resources = default_resources()
    assert resources["storage"].data_dir == str(tmp_path / "data")
    assert resources["storage"].output_dir == str(tmp_path / "out")
    assert resources["mlflow"].tracking_uri == f"sqlite:///{tmp_path / 'state' / 'mlflow.db'}"
    assert settings.clip_model() == "/models/clip"


def test_state_defaults_live_in_the_checkout(monkeypatch):
    for var in ("MMCTR_STATE_DIR", "MMCTR_DATA_DIR", "MMCTR_OUTPUT_DIR"):
        monkeypatch.delenv(var, raising=False)
    repo = settings.PACKAGE_DIR.parent
    assert settings.state_dir() == repo / ".mmctr"
    assert settings.data_dir() == repo / ".mmctr" / "demo_data"
    assert settings.output_dir().is_absolute()


def test_missing_upstream_file_names_the_command(tmp_path):
    storage = ProjectStorage(data_dir=str(tmp_path), output_dir=str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match=r"--select '\*raw_train'"):
        storage.require(storage.raw("train"), "raw_train")


def test_mlflow_run_url_points_at_the_run(tmp_path):
    resource = MlflowResource(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", experiment_name="t")
    with resource.start_run("r", tags={"k": "v"}) as run:
        url = resource.run_url(run)
    assert run.info.run_id in url and "mlflow ui --backend-store-uri" in url
