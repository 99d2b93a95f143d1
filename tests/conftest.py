"""Fixtures shared by more than one test module."""

import pytest
from test_federated import make_data, tiny_config


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A two-client federation's configuration on tiny synthetic data: (cfg, cases, run_dir)."""
    monkeypatch.setenv("FEDSEG_CACHE", str(tmp_path / "cache"))
    cases = make_data(tmp_path / "data")
    return tiny_config(tmp_path / "data"), cases, tmp_path / "run"
