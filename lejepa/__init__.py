"""LeJEPA self-supervised pretraining: the library behind the pipeline (no Prefect in here)."""

__version__ = "0.1.0"
