"""The local instance frees a dead run's pool slot itself, the moment another step waits for it.

Without the daemon (`dagster asset materialize`, a cron job), nothing watches runs: a run killed
with SIGKILL keeps its "gpu" slot and the next GPU step waits forever, saying only DEBUG "Step
blocked by limit for pool gpu". With this instance class (deploy/dagster.yaml `instance_class`) the
event log storage looks at the runs that hold the pool whenever a claim is blocked (at most every
CHECK_EVERY_S per pool): a holder whose run worker is gone on this machine (run_health) is marked
FAILURE, its leftover step processes are stopped and its slots freed, and the waiting run logs at
WARNING which run held the slot and why it was freed. A holder that is alive is left alone: that
wait is the pool doing its job.

Only the default storage changes (sqlite under $DAGSTER_HOME, the same files as Dagster's own);
an instance file that names its own `storage` (Postgres in production) keeps it, and the pid check
is skipped where run_health.check_local_instance says pids cannot be checked from here.
"""

import logging
import time

import dagster as dg
import yaml
from dagster._core.events import DagsterEvent, DagsterEventType, EngineEventData
from dagster._core.instance.ref import InstanceRef
from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage
from dagster._core.storage.runs import SqliteRunStorage
from dagster._core.storage.schedules import SqliteScheduleStorage
from dagster._core.storage.sqlite_storage import (
    DagsterSqliteStorage,
    _event_logs_directory,
    _runs_directory,
    _schedule_directory,
)
from dagster._serdes import ConfigurableClassData
from dagster._utils import mkdir_p

from mmctr_assets.instance import run_health

CHECK_EVERY_S = 10.0


def _console_log() -> logging.Logger:
    """This module's logger, printing as Dagster's console lines do (time, level): with no handler
    configured, Python would print the bare message on the CLI."""
    from dagster._utils.log import default_date_format_string, default_format_string

    logger = logging.getLogger(__name__)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(default_format_string(), default_date_format_string()))
        logger.addHandler(handler)
        logger.propagate = False  # printed once, here
    return logger


log = _console_log()


class LocalInstance(dg.DagsterInstance):
    """Dagster's instance with LocalSqliteStorage as its default storage (module docstring)."""

    @classmethod
    def config_schema(cls) -> dict:
        return {}

    @staticmethod
    def config_defaults(base_dir: str) -> dict:
        defaults = dict(InstanceRef.config_defaults(base_dir))
        defaults["storage"] = ConfigurableClassData(
            __name__, LocalSqliteStorage.__name__, yaml.dump({"base_dir": base_dir}, default_flow_style=False)
        )
        return defaults


class LocalSqliteStorage(DagsterSqliteStorage):
    """Dagster's sqlite storage, same files, with SlotFreeingEventLogStorage for the event log."""

    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None):
        self.base_dir = base_dir
        self._run_storage = SqliteRunStorage.from_local(_runs_directory(base_dir))
        self._event_log_storage = SlotFreeingEventLogStorage(_event_logs_directory(base_dir))
        self._schedule_storage = SqliteScheduleStorage.from_local(_schedule_directory(base_dir))
        self._inst_data = inst_data
        super(DagsterSqliteStorage, self).__init__()

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData, config_value: dict) -> "LocalSqliteStorage":
        mkdir_p(config_value["base_dir"])
        return cls(config_value["base_dir"], inst_data=inst_data)


class SlotFreeingEventLogStorage(SqliteEventLogStorage):
    """A blocked claim first frees the slots of the pool's dead holders, then tries once more."""

    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None):
        super().__init__(base_dir, inst_data)
        self._last_check: dict[str, float] = {}

    def claim_concurrency_slot(self, concurrency_key: str, run_id: str, step_key: str, priority: int | None = None):
        status = super().claim_concurrency_slot(concurrency_key, run_id, step_key, priority)
        now = time.monotonic()
        if status.is_claimed or now - self._last_check.get(concurrency_key, -CHECK_EVERY_S) < CHECK_EVERY_S:
            return status
        self._last_check[concurrency_key] = now
        if run_health.check_local_instance(self._instance) is not None:
            return status
        freed = self._free_dead_holders(concurrency_key, run_id)
        for line in freed:
            message = (f"pool {concurrency_key!r}: the slot this step waited for was held by a dead run; "
                       f"{line}. The step goes on (docs/operations.md 'One GPU, one step').")
            log.warning(message)
            event = DagsterEvent(DagsterEventType.ENGINE_EVENT.value, job_name=self._job_name(run_id),
                                 message=message, event_specific_data=EngineEventData({}), step_key=step_key)
            self._instance.report_dagster_event(event, run_id=run_id, log_level=logging.WARNING)
        if freed:
            status = super().claim_concurrency_slot(concurrency_key, run_id, step_key, priority)
        return status

    def _free_dead_holders(self, concurrency_key: str, waiting_run_id: str) -> list[str]:
        holders = {s.run_id for s in self.get_concurrency_info(concurrency_key).claimed_slots}
        holders.discard(waiting_run_id)
        by = f"found dead by run {waiting_run_id}, which waited for its {concurrency_key!r} slot"
        return [line for run_id in sorted(holders)
                if (line := run_health.free_run_if_dead(self._instance, run_id, by))]

    def _job_name(self, run_id: str) -> str:
        run = self._instance.get_run_by_id(run_id)
        return run.job_name if run else "unknown"
