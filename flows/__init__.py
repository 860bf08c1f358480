"""Prefect orchestration of the stages (the stages never import this package)."""
