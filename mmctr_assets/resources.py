"""Dagster resources: where every asset's files live, which device computes, where runs are tracked.

Defaults come from `settings` (environment variables) when the code location loads; most fields
can also be set per run in the launchpad or with `dagster asset materialize --config`. Where
outputs and runs are written (``storage.output_dir``, ``mlflow.tracking_uri``) cannot: anyone who
can open the launchpad could otherwise point them at any folder or database the process may write.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import typing
import warnings
from pathlib import Path

import dagster as dg
import polars as pl
from pydantic import Field

from . import settings
from .lib.data.microlens import IMAGES_DIR, table_path
from .lib.precision import PRECISIONS, check_precision
from .lib.redaction import redact, redacted_errors


def refuse_launch_override(context: dg.InitResourceContext, fields: tuple[str, ...], variables: str) -> None:
    """Fail the step when the run's config changes one of ``fields`` of this resource from the value
    the code location was loaded with (the deployment's, from ``variables``); the same value passes."""
    run = context.run
    keys = [k for k, d in (context.all_resource_defs or {}).items() if d is context.resource_def]
    if run is None or not keys:
        return
    given = ((run.run_config.get("resources") or {}).get(keys[0]) or {}).get("config") or {}
    schema = context.resource_def.config_schema
    deployed = json.loads(schema.default_value_as_json_str) if schema.default_provided else {}
    changed = sorted(f for f in fields if f in given and given[f] != deployed.get(f))
    if changed:
        raise dg.Failure(description=redact(
            f"The run config sets resources.{keys[0]}.config.{', '.join(changed)}: where outputs and runs are "
            f"written is the deployment's setting ({variables}, read when the code location loads), not a "
            "launch config's. Remove it from the run config, or set the variable and reload the code location."),
            allow_retries=False)


class ProjectStorage(dg.ConfigurableResource):
    """The input data folder and the output folder: the one place that knows each asset's files.
    The data folder is only read; every write and delete stays inside the output folder
    (lib/output_paths.py), which only the deployment sets (MMCTR_OUTPUT_DIR)."""

    data_dir: str = Field(description="Folder holding MicroLens_1M_x1/, item_feature.parquet, item_images/ "
                          "(only read).")
    output_dir: str = Field(description="Folder for every asset's files (raw snapshots, embeddings, model, zip). "
                            "Set by the deployment (MMCTR_OUTPUT_DIR); a run config may not change it.")

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        refuse_launch_override(context, ("output_dir",), "MMCTR_OUTPUT_DIR")

    # ------------------------------------------------------------------------------ inputs
    def source(self, table: str) -> Path:
        return table_path(self.data_dir, table)

    def images_dir(self) -> Path:
        return Path(self.data_dir) / IMAGES_DIR

    # ----------------------------------------------------------------------------- outputs
    def out(self, *parts: str) -> Path:
        return Path(self.output_dir).joinpath(*parts)

    def raw(self, table: str) -> Path:
        """The validated, dtype-normalised snapshot of a source table (raw_<table>)."""
        return self.out("raw", f"{table}.parquet")

    def image_manifest(self) -> Path:
        return self.out("raw", "item_images.parquet")

    def clip_shard(self, key: str) -> Path:
        return self.out("clip_embeddings", f"shard-{key}.parquet")

    def cpu_lock_dir(self) -> Path:
        """Per-core lock files of CPU-heavy steps (defs/common.py cpu_cores): one folder per machine
        (lib/cores.py), since cores belong to the machine, not to a deployment or output folder."""
        from .lib.cores import lock_dir

        return lock_dir()

    def item2vec(self) -> Path:
        return self.out("item2vec_embeddings", "embeddings.parquet")

    def item_info_updated(self) -> Path:
        """The Task 1 deliverable (fused_item_embeddings)."""
        return self.out("item_info_updated.parquet")

    def model_dir(self) -> Path:
        return self.out("dcn_din_model")

    def model(self) -> Path:
        return self.model_dir() / "model.pt"

    def predictions(self) -> Path:
        return self.out("prediction.csv")

    def submission(self) -> Path:
        return self.out("submission.zip")

    # ----------------------------------------------------------------------------- readers
    def require(self, path: Path, produced_by: str) -> Path:
        """Fail with the command that produces a missing upstream file."""
        if not path.exists():
            raise FileNotFoundError(
                f"{path} does not exist: asset {produced_by!r} has not been materialised in this "
                f"output folder ({self.output_dir}). Run it first, e.g. "
                f"`dagster asset materialize -m mmctr_assets --select '*{produced_by}'`."
            )
        return path

    def read_raw(self, table: str, columns: list[str] | None = None) -> pl.DataFrame:
        return pl.read_parquet(self.require(self.raw(table), f"raw_{table}"), columns=columns)

    def n_items(self) -> int:
        """Real items in item_info (its rows minus the padding row)."""
        path = self.require(self.raw("item_info"), "raw_item_info")
        return pl.scan_parquet(path).select(pl.len()).collect().item() - 1

    def read_clip_embeddings(self) -> pl.DataFrame:
        """Every shard of clip_embeddings, or an error naming the shards still to materialise."""
        keys = [str(i) for i in range(settings.clip_shards())]
        missing = [k for k in keys if not self.clip_shard(k).exists()]
        if missing:
            raise FileNotFoundError(
                f"clip_embeddings shards {missing} are not materialised in {self.output_dir}. Run "
                f"`dagster asset materialize -m mmctr_assets --select clip_embeddings --partition-range "
                f"{keys[0]}...{keys[-1]}` (or `--partition K` for one shard)."
            )
        return pl.concat([pl.read_parquet(self.clip_shard(k)) for k in keys]).sort("item_id")

    def read_image_manifest(self) -> pl.DataFrame:
        """raw_item_images' manifest with cover paths resolved against this data folder (stored
        relative, so the manifest survives a move of the data folder)."""
        from .lib.data.images import resolve_image_paths

        manifest = pl.read_parquet(self.require(self.image_manifest(), "raw_item_images"))
        return resolve_image_paths(manifest, self.data_dir)

    def read_item2vec(self) -> pl.DataFrame:
        return pl.read_parquet(self.require(self.item2vec(), "item2vec_embeddings"))


class ComputeResource(dg.ConfigurableResource):
    """The accelerator: device, precision and batch size for CLIP inference and training."""

    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N. auto picks CUDA when present.")
    precision: str = Field(default="fp32", description=f"{' | '.join(PRECISIONS)} (autocast; fp16 needs CUDA).")
    batch_size: int = Field(default=64, description="CLIP inference batch size.")
    num_workers: int = Field(default=-1, description="CLIP decode/preprocess threads beside the model; "
                             "-1: one per CPU core the step claimed, 0: none (decode in the step's thread).")
    cpu_threads: int = Field(default=0, description="Most CPU cores (torch threads) one CPU-heavy step claims; "
                             "0: all free ones. Steps running at once share the cores (defs/common.py cpu_cores).")

    def decode_workers(self, cores: int) -> int:
        return cores if self.num_workers < 0 else self.num_workers

    def torch_device(self):
        import torch

        check_precision(self.precision)
        if self.device == "auto":
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            try:
                device = torch.device(self.device)
            except RuntimeError:
                device = None
            if device is None or device.type not in ("cpu", "cuda"):
                raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if device.type == "cuda" and self.device != "auto":
            if not torch.cuda.is_available():
                raise RuntimeError(
                    f"ComputeResource.device is {self.device!r} but this machine has no usable CUDA "
                    f"device (torch {torch.__version__}, CUDA build: {torch.version.cuda}). Set "
                    "device to 'cpu' or 'auto', or install a CUDA build of torch "
                    "(docs/deployment.md, Install for a GPU)."
                )
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise RuntimeError(
                    f"ComputeResource.device is {self.device!r} but only {torch.cuda.device_count()} "
                    "CUDA devices are visible."
                )
        check_precision(self.precision, device)
        return device


class MlflowResource(dg.ConfigurableResource):
    """MLflow tracking and the model registry: one run per training, tagged with the Dagster run and
    asset; every dcn_din_model run registers a version of ``registered_model`` (lib/ctr/registry.py).
    The one place the assets reach MLflow through."""

    tracking_uri: str = Field(description="sqlite:///... by default; http://host:5000 for a tracking server. Set "
                              "by the deployment (MLFLOW_TRACKING_URI); a run config may not change it.")
    experiment_name: str = Field(default="mmctr", description="MLflow experiment that holds the runs.")
    registered_model: str = Field(default="mmctr-ctr", description="Registered model whose alias "
                                  "'champion' serves predictions; every dcn_din_model run adds a version.")
    promotion_tolerance: float = Field(default=0.001, ge=0.0, description="A retrained version is refused "
                                       "only when it is worse than the champion (scored on the same validation "
                                       "rows) by more than this AUC, significantly at gate_alpha.")
    gate_alpha: float = Field(default=0.05, gt=0.0, le=0.5, description="Level of the champion gate's one-sided "
                              "DeLong test: a retrained version is refused when p < gate_alpha that it is worse "
                              "than the champion by more than promotion_tolerance. Smaller refuses only clearer "
                              "losses; 0.5 is the bare point comparison (valid AUC >= champion's - tolerance).")

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        refuse_launch_override(context, ("tracking_uri",), "MLFLOW_TRACKING_URI")

    # ------------------------------------------------------------------------------ tracking
    @contextlib.contextmanager
    def start_run(self, run_name: str, tags: dict[str, str] | None = None):
        import mlflow

        with redacted_errors():  # MLflow's own errors quote the server URL, credentials included
            mlflow.set_tracking_uri(self.tracking_uri)
            self._ensure_experiment()
            with mlflow.start_run(run_name=run_name, tags=tags or {}) as run:
                yield run

    @contextlib.contextmanager
    def start_child_run(self, run_name: str, tags: dict[str, str] | None = None, *,
                        interrupted_status: typing.Callable[[BaseException], str] | None = None):
        """A run nested under the active one (a tuning trial under its study's run). Ends FINISHED,
        or with ``interrupted_status(error)`` (default FAILED) when the block raises; the parent
        stays active either way."""
        import mlflow

        run = mlflow.start_run(run_name=run_name, nested=True, tags=tags or {})
        status = "FINISHED"
        try:
            yield run
        except BaseException as e:
            status = interrupted_status(e) if interrupted_status else "FAILED"
            raise
        finally:
            mlflow.end_run(status)

    def _ensure_experiment(self) -> None:
        """Select the experiment, creating it first. With a sqlite store its artifacts (the model
        versions' files among them) go beside the database: MLflow's default is ./mlruns under
        whatever folder the process started in, which scatters a deployment's models."""
        import mlflow
        from mlflow.exceptions import MlflowException

        if mlflow.get_experiment_by_name(self.experiment_name) is None:
            location = None
            if self.tracking_uri.startswith("sqlite:///"):
                db = Path(self.tracking_uri.removeprefix("sqlite:///"))
                location = (db.parent / "mlartifacts").resolve().as_uri()
            try:
                mlflow.create_experiment(self.experiment_name, artifact_location=location)
            except MlflowException as e:  # created meanwhile by a step beside this one
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
        mlflow.set_experiment(self.experiment_name)

    def log_params(self, params: dict) -> None:
        import mlflow

        mlflow.log_params(params)

    def log_metrics(self, metrics: dict[str, float]) -> None:
        import mlflow

        mlflow.log_metrics(metrics)

    def set_tag(self, key: str, value: str) -> None:
        import mlflow

        mlflow.set_tag(key, value)

    def log_epochs(self, history, already_logged: set[int]) -> None:
        """Per-epoch metrics at step = epoch, each epoch once (a resumed run replays the epochs it
        did not see: they were trained by the run that was interrupted)."""
        import mlflow

        for e in history:
            if e.epoch in already_logged:
                continue
            mlflow.log_metrics({"train_loss": e.train_loss, "valid_auc": e.valid_auc,
                                "valid_logloss": e.valid_logloss, "lr": e.lr,
                                "samples_per_s": e.samples_per_s}, step=e.epoch)
            already_logged.add(e.epoch)

    def log_files(self, paths: list[Path], artifact_path: str) -> None:
        import mlflow

        for path in paths:
            mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_png(self, png: bytes, name: str) -> None:
        """Attach a PNG to the active run, under plots/."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_bytes(png)
            self.log_files([path], "plots")

    def run_url(self, run) -> str:
        """Where a person finds the run (metadata the UI shows): the server's page, or the
        experiment/run ids for `mlflow ui`; never with the URI's credentials."""
        base = self.tracking_uri.rstrip("/")
        path = f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
        if base.startswith("http"):
            return redact(f"{base}/{path}")
        return redact(f"mlflow ui --backend-store-uri {self.tracking_uri} -> {path}")

    # ------------------------------------------------------------------------------ registry
    def registry(self):
        from .lib.ctr.registry import Registry

        return Registry(self.tracking_uri, self.registered_model)

    def check_reachable(self, must_exist: bool = False) -> None:
        """Raise RegistryUnavailable in seconds when the tracking store does not answer (or, with
        ``must_exist``, when its sqlite file is missing: a reader never creates an empty store)."""
        from .lib.ctr.registry import check_reachable

        check_reachable(self.tracking_uri, must_exist=must_exist)

    def register_model(self, run, model_file: Path, config_file: Path, tags: dict[str, str]) -> str:
        """Log ``model_file`` + ``config_file`` as a pyfunc model of the active run (lib/ctr/serving.py,
        explicit signature and requirements) and register it as a new version; -> the version."""
        import mlflow

        from .lib.ctr import serving
        from .lib.ctr.registry import quiet_transfers

        quiet_transfers()
        with warnings.catch_warnings():
            # the signature is given explicitly: MLflow's hints to derive one from type hints or an
            # input example do not apply
            warnings.filterwarnings("ignore", ".*Add type hints to the `predict` method", UserWarning)
            warnings.filterwarnings("ignore", ".*An input example was not provided", UserWarning)
            info = mlflow.pyfunc.log_model(
                name="model", python_model=serving.__file__,
                artifacts={"model": str(model_file), "config": str(config_file)}, signature=serving.signature(),
                # given, not inferred: inference loads the model in a subprocess; mmctr_assets itself
                # must be importable where the model is served (pip install this project)
                pip_requirements=[f"mlflow=={mlflow.__version__}", "torch", "polars", "numpy", "pandas"],
            )
        return self.registry().register(info.model_uri, run.info.run_id, model_file, tags,
                                         description=config_file.read_text(), model_id=info.model_id)


def default_resources() -> dict:
    # A tracking URI from the environment stays an EnvVar: the UI's resource page then shows the
    # variable's name, not a URI that may carry a password.
    uri = dg.EnvVar("MLFLOW_TRACKING_URI") if os.environ.get("MLFLOW_TRACKING_URI") else settings.mlflow_tracking_uri()
    return {
        "storage": ProjectStorage(data_dir=str(settings.data_dir()), output_dir=str(settings.output_dir())),
        "compute": ComputeResource(),
        "mlflow": MlflowResource(tracking_uri=uri),
    }
