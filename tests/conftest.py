"""Shared test settings: tests import the tiny model table from this folder; one intra-op thread, since tiny
models gain nothing from more and a shared 2-core machine loses a lot to oversubscription."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="module")
def _module_history(tmp_path_factory):
    """Module-scoped fixtures (a run shared by a module's tests) record into a store of their module's own."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRUNEPILOT_HISTORY", str(tmp_path_factory.mktemp("module-history") / "history.sqlite"))
        yield


@pytest.fixture(autouse=True)
def _private_history(tmp_path_factory, monkeypatch):
    """Every test gets its own cross-run history store: a run recorded by one test must not warm-start another's
    (nor the user's real store be written by the suite)."""
    monkeypatch.setenv("PRUNEPILOT_HISTORY", str(tmp_path_factory.mktemp("history") / "history.sqlite"))
