"""Prefect tasks, one module per external system."""
