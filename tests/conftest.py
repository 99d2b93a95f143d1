"""Fixtures shared by more than one test module."""

import pytest
from helpers import federation_config, make_data


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A two-client federation's configuration on tiny synthetic data: (cfg, cases, run_dir)."""
    monkeypatch.setenv("FEDSEG_CACHE", str(tmp_path / "cache"))
    cases = make_data(tmp_path / "data")
    return federation_config(tmp_path / "data"), cases, tmp_path / "run"
