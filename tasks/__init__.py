"""Prefect tasks: one per pipeline stage, thin wrappers over `lejepa`."""
