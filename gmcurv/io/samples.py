"""The bundled sample models and their data (shipped inside the package)."""

from __future__ import annotations

from pathlib import Path

SAMPLE_ROOT = Path(__file__).resolve().parents[1] / "sample_models"
DEFAULT_SAMPLE = "digits_mlp"


def sample_model(name: str = DEFAULT_SAMPLE) -> Path:
    """Path of a bundled sample checkpoint."""
    return SAMPLE_ROOT / name / "model.safetensors"


def sample_data(name: str = DEFAULT_SAMPLE) -> Path:
    """Path of a bundled sample's data directory."""
    return SAMPLE_ROOT / name / "data"
