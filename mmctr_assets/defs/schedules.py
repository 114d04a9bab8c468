"""The weekly retraining schedule (cron and time zone from settings: MMCTR_RETRAIN_CRON/TZ)."""

from __future__ import annotations

import dagster as dg

from .. import settings
from .jobs import TRIGGER_TAG, retrain_job


def build_retrain_schedule(cron: str, timezone: str) -> dg.ScheduleDefinition:
    try:
        return dg.ScheduleDefinition(
            name="weekly_retrain",
            job=retrain_job,
            cron_schedule=cron,
            execution_timezone=timezone,
            tags={TRIGGER_TAG: "schedule"},
            description=f"Retrains item2vec through submission_zip on the latest raw data ({cron}, {timezone}).",
            default_status=dg.DefaultScheduleStatus.STOPPED,
        )
    except dg.DagsterInvalidDefinitionError as exc:
        raise ValueError(
            f"Retraining schedule: {exc} Set MMCTR_RETRAIN_CRON to a 5-field cron expression (default "
            f"{settings.DEFAULT_RETRAIN_CRON!r}) and MMCTR_RETRAIN_TZ to an IANA time zone such as 'Europe/Berlin' "
            f"(default {settings.DEFAULT_RETRAIN_TZ!r})."
        ) from exc



defs = dg.Definitions(schedules=[build_retrain_schedule(settings.retrain_cron(), settings.retrain_timezone())])
