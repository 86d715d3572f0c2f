"""Prefect flows that compose the stages, and the `lejepa-pipeline` command line."""
