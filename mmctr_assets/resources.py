"""Dagster resources: where data lives, which device computes, where runs are tracked.

Defaults come from `settings` (environment variables) when the code location loads; every field
can also be set per run in the launchpad or with `dagster asset materialize --config`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import dagster as dg
from pydantic import Field

from . import settings
from .lib import dataset


class ProjectStorage(dg.ConfigurableResource):
    """The input data folder and the output folder every asset writes into."""

    data_dir: str = Field(description="Folder holding MicroLens_1M_x1/, item_feature.parquet, item_images/.")
    output_dir: str = Field(description="Folder for every asset's files (raw snapshots, embeddings, model, zip).")

    def source(self, table: str) -> Path:
        return dataset.table_path(self.data_dir, table)

    def out(self, *parts: str) -> Path:
        return Path(self.output_dir).joinpath(*parts)

    def raw(self, table: str) -> Path:
        """The validated, dtype-normalised snapshot of a source table."""
        return self.out("raw", f"{table}.parquet")

    def require(self, path: Path, produced_by: str) -> Path:
        """Fail with the command that produces a missing upstream file."""
        if not path.exists():
            raise FileNotFoundError(
                f"{path} does not exist: asset {produced_by!r} has not been materialised in this "
                f"output folder ({self.output_dir}). Run it first, e.g. "
                f"`dagster asset materialize -m mmctr_assets --select '*{produced_by}'`."
            )
        return path


class ComputeResource(dg.ConfigurableResource):
    """The accelerator: device, precision and batch size for CLIP inference and training."""

    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N. auto picks CUDA when present.")
    precision: str = Field(default="fp32", description="fp32 | bf16 | fp16 (autocast; fp16 needs CUDA).")
    batch_size: int = Field(default=64, description="CLIP inference batch size.")
    num_workers: int = Field(default=2, description="Image decoding workers that run beside the model.")

    def torch_device(self):
        import torch

        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(self.device)
        except RuntimeError:
            device = None
        if device is None or device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError(
                    f"ComputeResource.device is {self.device!r} but this machine has no usable CUDA "
                    f"device (torch {torch.__version__}, CUDA build: {torch.version.cuda}). Set "
                    "device to 'cpu' or 'auto', or install a CUDA build of torch (README.md, Install)."
                )
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise RuntimeError(
                    f"ComputeResource.device is {self.device!r} but only {torch.cuda.device_count()} "
                    "CUDA devices are visible."
                )
        if self.precision == "fp16" and device.type != "cuda":
            raise ValueError("precision fp16 needs a CUDA device; use fp32 or bf16 on the CPU.")
        return device


class MlflowResource(dg.ConfigurableResource):
    """MLflow tracking: one run per training, tagged with the Dagster run and asset."""

    tracking_uri: str = Field(description="sqlite:///... by default; http://host:5000 for a tracking server.")
    experiment_name: str = Field(default="mmctr", description="MLflow experiment that holds the runs.")

    @contextlib.contextmanager
    def start_run(self, run_name: str, tags: dict[str, str] | None = None):
        import mlflow

        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_experiment(self.experiment_name)
        with mlflow.start_run(run_name=run_name, tags=tags or {}) as run:
            yield run

    def run_url(self, run) -> str:
        """Where a person finds the run: the server's page, or the experiment/run ids for `mlflow ui`."""
        base = self.tracking_uri.rstrip("/")
        path = f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
        if base.startswith("http"):
            return f"{base}/{path}"
        return f"mlflow ui --backend-store-uri {self.tracking_uri} -> {path}"


def default_resources() -> dict:
    return {
        "storage": ProjectStorage(data_dir=str(settings.data_dir()), output_dir=str(settings.output_dir())),
        "compute": ComputeResource(),
        "mlflow": MlflowResource(tracking_uri=settings.mlflow_tracking_uri()),
    }
