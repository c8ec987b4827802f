"""Prefect flows that wire detoxflow.tasks (imported as detoxflow.flows)."""
