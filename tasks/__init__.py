"""Thin Prefect tasks over detoxflow.models (imported as detoxflow.tasks)."""
