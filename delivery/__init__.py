"""Prefect-orchestrated GitOps delivery: build, push, bump, commit, sync, verify, roll back."""

__version__ = "0.1.0"
