"""Dagster's Postgres storage for the production instance (deploy/dagster.prod.yaml), with a
connection check that names the DAGSTER_PG_* variable to fix.

dagster-postgres connects as soon as an instance loads, in every process that loads one
(`dagster dev`, dagster-webserver, dagster-daemon, each run and step worker). When the server is
unreachable or refuses the credentials it prints some 200 lines of SQLAlchemy retry frames that end
in "too many retries for DB connection". `PostgresStorage` connects once first, with a short
timeout, and turns a failure into one message that says what is wrong and which variable to set;
after that it is exactly `dagster_postgres.DagsterPostgresStorage` (same tables, same config).

This module imports only dagster, dagster-postgres, psycopg2 (the `prod` extra) and the small
lib/redaction.py, so the webserver and daemon images load it without the asset code.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import click
from dagster_postgres import DagsterPostgresStorage

from mmctr_assets.lib.redaction import redact

# The variables deploy/dagster.prod.yaml reads each postgres_db field from (test_deploy_configs
# checks that they agree).
PG_ENV = {
    "hostname": "DAGSTER_PG_HOST",
    "db_name": "DAGSTER_PG_DB",
    "username": "DAGSTER_PG_USERNAME",
    "password": "DAGSTER_PG_PASSWORD",
}
CONNECT_TIMEOUT_S = 5
# A server that is still starting (a pod beside the database) gets a few seconds, as
# dagster-postgres gives it; refused credentials or a missing database fail at once.
RETRY_WAITS_S = (0.5, 1.0, 2.0)


class PostgresStorageUnavailable(click.ClickException):
    """The instance's Postgres storage cannot be used. A click exception so that every Dagster
    command (`dagster dev`, `dagster asset materialize`, dagster-webserver, dagster-daemon, run
    workers) prints the message and exits 1 instead of printing a traceback."""


def _connect_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    if config.get("postgres_url"):
        url = str(config["postgres_url"])
        scheme, sep, rest = url.partition("://")
        return {"dsn": f"{scheme.split('+')[0]}{sep}{rest}"}  # libpq does not know postgresql+psycopg2://
    db = config["postgres_db"]
    return {
        "host": db.get("hostname") or None,
        "port": db.get("port") or 5432,
        "dbname": db.get("db_name") or None,
        "user": db.get("username"),
        "password": db.get("password") or None,
        **(db.get("params") or {}),
    }


def _where(config: Mapping[str, Any]) -> str:
    if config.get("postgres_url"):
        return "the server in postgres_url"
    db = config["postgres_db"]
    return f"{db.get('hostname')}:{db.get('port') or 5432}"


def _diagnose(exc: Exception, config: Mapping[str, Any]) -> tuple[str, bool]:
    """(message, worth retrying) for a failed connection, naming the variable to fix."""
    detail = redact(" ".join(str(exc).split()))
    text = detail.lower()
    where = _where(config)
    if config.get("postgres_url"):
        fix = "Fix postgres_url in $DAGSTER_HOME/dagster.yaml (or the variable it is read from)."
        return f"Dagster cannot connect to its Postgres storage ({detail}). {fix}", True
    db = config["postgres_db"]
    if "password authentication failed" in text or ("role" in text and "does not exist" in text):
        return (
            f"Postgres at {where} refused user {db.get('username')!r} ({detail}). Set "
            f"{PG_ENV['username']} and {PG_ENV['password']} to the credentials of a role that may "
            "use the Dagster database (on Kubernetes the password comes from the Secret named in "
            "postgres_password_secret).",
            False,
        )
    if "database" in text and "does not exist" in text:
        return (
            f"Postgres at {where} has no database {db.get('db_name')!r}. Set {PG_ENV['db_name']} to "
            f"the Dagster database, or create it (`createdb -h {db.get('hostname')} -U "
            f"{db.get('username')} {db.get('db_name')}`); Dagster creates its tables itself.",
            False,
        )
    if "no password supplied" in text:
        return f"Postgres at {where} asks for a password ({detail}). Set {PG_ENV['password']}.", False
    return (
        f"Dagster cannot reach its Postgres storage at {where} ({detail}). Set {PG_ENV['hostname']} to "
        f"the Postgres server's host name (now {db.get('hostname')!r}), check the port in "
        "$DAGSTER_HOME/dagster.yaml, and that the server is running and accepts TCP connections.",
        True,
    )


def check_connection(config: Mapping[str, Any], retry_waits_s: tuple[float, ...] = RETRY_WAITS_S) -> None:
    """Connect once to the storage `config` (the resolved `postgres` storage config) or raise
    PostgresStorageUnavailable with a message that names the DAGSTER_PG_* variable to fix."""
    import psycopg2

    if config.get("auth_provider"):
        return  # a token provider (cloud IAM) supplies the password: leave it to dagster-postgres
    kwargs = _connect_kwargs(config)
    for attempt in range(len(retry_waits_s) + 1):
        try:
            psycopg2.connect(connect_timeout=CONNECT_TIMEOUT_S, **kwargs).close()
            return
        except psycopg2.OperationalError as exc:
            message, retry = _diagnose(exc, config)
            if not retry or attempt == len(retry_waits_s):
                raise PostgresStorageUnavailable(message) from None
            time.sleep(retry_waits_s[attempt])


class PostgresStorage(DagsterPostgresStorage):
    """`storage: custom: {module: mmctr_assets.instance.postgres_storage, class: PostgresStorage, config:
    <the postgres storage config>}`: dagster-postgres's storage, after `check_connection`."""

    @classmethod
    def from_config_value(cls, inst_data, config_value):  # type: ignore[override]
        check_connection(config_value)
        return super().from_config_value(inst_data, config_value)
