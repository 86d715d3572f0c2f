"""Prefect tasks: one per pipeline step, thin wrappers over `lejepa` (`stages.py`), their cache keys and
options (`options.py`), and what they show in the UI (`artifacts.py`)."""
