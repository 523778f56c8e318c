import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The tiny GLM-Image (MODEL_DIR, or built into .cache/ on first use)."""
    from testkit.tiny_model import write_tiny_model

    path = Path(os.environ.get("MODEL_DIR", REPO / ".cache" / "tiny-glm-image")).resolve()
    write_tiny_model(path)
    return path


@pytest.fixture(scope="session")
def pipe(model_dir):
    """The monolithic reference pipeline on the tiny model, loaded once."""
    from testkit.reference import load_pipeline

    return load_pipeline(model_dir)
