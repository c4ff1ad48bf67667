"""Prefect flows: orchestration only; the work is done by the plain functions in `tasks/`."""
