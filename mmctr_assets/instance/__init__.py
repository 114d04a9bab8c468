"""Dagster instance plumbing, referenced from the instance's dagster.yaml (deploy/): the local run
launcher that gives a dead run's pool slots back (run_health, also `mmctr-free-dead-runs`), the
local instance whose waiting steps free a dead run's slot themselves (local_instance) and the
production instance's Postgres storage with its connection check (postgres_storage)."""
