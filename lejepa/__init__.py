"""LeJEPA self-supervised pretraining: the library behind the pipeline (no Prefect in here)."""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # `lejepa.load_encoder` without importing torch and timm on every `import lejepa`.
    if name == "load_encoder":
        from lejepa.train.export import load_encoder

        return load_encoder
    raise AttributeError(f"module 'lejepa' has no attribute {name!r}")
