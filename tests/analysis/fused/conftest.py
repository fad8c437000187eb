"""Fixtures shared by the fused model's tests."""
import pytest

from tests.analysis.planted import make_planted_store


@pytest.fixture()
def planted_run(tmp_path):
    """A planted store (path, per-query target image) whose probes each have one known source image."""
    path = tmp_path / "run"
    targets, _ = make_planted_store(path)
    return path, targets
