"""The bundled sample models and their data.

They live in ``sample_models/`` at the top of the repository and install as package data of
``gmcurv.sample_models``.
"""

from __future__ import annotations

from pathlib import Path

from gmcurv import sample_models

SAMPLE_ROOT = Path(sample_models.__file__).resolve().parent
DEFAULT_SAMPLE = "digits_mlp"


def sample_model(name: str = DEFAULT_SAMPLE) -> Path:
    """Path of a bundled sample checkpoint."""
    return SAMPLE_ROOT / name / "model.safetensors"


def sample_data(name: str = DEFAULT_SAMPLE) -> Path:
    """Path of a bundled sample's data directory."""
    return SAMPLE_ROOT / name / "data"
