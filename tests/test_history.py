"""History store: round trip, match tiers, budget ordering, idempotence, corrupt files, the null store, summaries."""

import json
import math
import os
from pathlib import Path

import pytest

from prunepilot.errors import PrunepilotError
from prunepilot.history import (Fingerprint, HistoryStore, NullHistory, PriorRun, default_history_path,
                                prior_summary)

GROUPS = {"layer1": 16, "layer2": 32, "layer3": 64}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    # never touch the real user cache
    monkeypatch.setenv("PRUNEPILOT_CACHE", str(tmp_path / "cache"))


def prior(run_id: str, fp: Fingerprint, budget: dict[str, float], score: float, **kw) -> PriorRun:
    base = dict(run_id=run_id, created=kw.pop("created", 1.0), fingerprint=fp, budget=budget,
                plan_shape={"layer1": 0.2, "layer2": 0.4}, outcome={"accuracy": 0.9}, score=score,
                attempts=6, rounds_to_best=3, strategist="sensitivity", prunepilot_version="0.1.0")
    return PriorRun(**(base | kw))


def test_default_path(tmp_path, monkeypatch):
    assert default_history_path() == Path(os.environ["PRUNEPILOT_HISTORY"])  # conftest: one store per test
    monkeypatch.setenv("PRUNEPILOT_HISTORY", str(tmp_path / "mine.sqlite"))
    assert HistoryStore().path == tmp_path / "mine.sqlite"
    monkeypatch.delenv("PRUNEPILOT_HISTORY")
    assert default_history_path() == tmp_path / "cache" / "history.sqlite"
    monkeypatch.delenv("PRUNEPILOT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_history_path() == tmp_path / "xdg" / "prunepilot" / "history.sqlite"
    assert HistoryStore().path == default_history_path()


def test_fingerprint_hash_is_order_independent():
    a = Fingerprint.of("prune", "ResNet", GROUPS, 4.1e7)
    b = Fingerprint.of("prune", "ResNet", dict(reversed(list(GROUPS.items()))), 4.1e7)
    assert a == b and a.groups == 3 and len(a.structure) == 64
    assert Fingerprint.of("prune", "ResNet", GROUPS | {"layer3": 65}, 4.1e7).structure != a.structure
    with pytest.raises(Exception):
        Fingerprint(kind="prune", family="x", structure="s", groups=1, size=1.0, extra=1)


def test_round_trip(tmp_path):
    store = HistoryStore(tmp_path / "deep" / "h.sqlite")  # parent dirs are created
    fp = Fingerprint.of("prune", "ResNet", GROUPS, 4.1e7)
    p = prior("r1", fp, {"macs": 0.5}, 0.88, outcome={"accuracy": 0.89, "nan": math.nan})
    store.record(p)
    [got] = HistoryStore(tmp_path / "deep" / "h.sqlite").matching(fp)
    assert got.model_dump(exclude={"outcome"}) == p.model_dump(exclude={"outcome"})
    assert got.outcome["accuracy"] == 0.89 and math.isnan(got.outcome["nan"])
    assert store.matching(Fingerprint.of("sparsify", "ResNet", GROUPS, 4.1e7)) == []


def test_exact_structure_preferred_over_family(tmp_path):
    store = HistoryStore(tmp_path / "h.sqlite")
    fp = Fingerprint.of("prune", "ResNet", GROUPS, 4.1e7)
    near = Fingerprint.of("prune", "ResNet", GROUPS | {"layer4": 128}, 4.5e7)
    far = Fingerprint.of("prune", "ResNet", GROUPS | {"layer4": 128, "layer5": 256}, 9e7)
    store.record(prior("far", far, {"macs": 0.5}, 0.99))
    store.record(prior("near", near, {"macs": 0.5}, 0.80))
    store.record(prior("other", Fingerprint.of("prune", "VGG", {"a": 1}, 4.1e7), {"macs": 0.5}, 0.99))
    # no exact match yet: same family, nearest groups/size first; other families never
    assert [p.run_id for p in store.matching(fp)] == ["near", "far"]
    store.record(prior("exact", fp, {"macs": 0.5}, 0.10))
    assert [p.run_id for p in store.matching(fp)] == ["exact"]
    assert store.best_shape_for(fp, {"macs": 0.5}).run_id == "exact"


def test_nearest_budget_then_score(tmp_path):
    store = HistoryStore(tmp_path / "h.sqlite")
    fp = Fingerprint.of("sparsify", "llama", GROUPS, 1.3e8)
    store.record(prior("b30", fp, {"sparsity": 0.3}, 0.95))
    store.record(prior("b70", fp, {"sparsity": 0.7}, 0.40))
    store.record(prior("b50lo", fp, {"sparsity": 0.5}, 0.60))
    store.record(prior("b50hi", fp, {"sparsity": 0.5}, 0.70))
    store.record(prior("b50nan", fp, {"sparsity": 0.5}, math.nan))
    store.record(prior("macs", fp, {"macs": 0.5}, 0.99))  # another metric: far from any sparsity goal
    ids = [p.run_id for p in store.nearest(fp, {"sparsity": 0.5}, limit=6)]
    assert ids[:3] == ["b50hi", "b50lo", "b50nan"]
    assert set(ids[3:5]) == {"b30", "b70"} and ids[5] == "macs"
    # 0.7 and 0.3 tie on distance from 0.5 (despite float error), so the higher score wins
    assert [p.run_id for p in store.nearest(fp, {"sparsity": 0.5}, limit=5)][3] == "b30"
    assert len(store.nearest(fp, {"sparsity": 0.5}, limit=2)) == 2
    assert store.best_shape_for(fp, {"sparsity": 0.65}).run_id == "b70"
    assert store.best_shape_for(Fingerprint.of("prune", "x", {}, 1.0), {"macs": 0.5}) is None


def test_record_is_idempotent(tmp_path):
    store = HistoryStore(tmp_path / "h.sqlite")
    fp = Fingerprint.of("prune", "ResNet", GROUPS, 4.1e7)
    store.record(prior("r1", fp, {"macs": 0.5}, 0.5))
    store.record(prior("r1", fp, {"macs": 0.5}, 0.5))
    store.record(prior("r1", fp, {"macs": 0.5}, 0.7))  # a resumed run rewrites its entry
    [got] = store.matching(fp)
    assert got.score == 0.7


def test_corrupt_file_never_crashes_reads(tmp_path):
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"\x00garbage, not a database" * 200)
    fp = Fingerprint.of("prune", "ResNet", GROUPS, 4.1e7)
    store = HistoryStore(bad)  # constructing does not raise either
    assert store.matching(fp) == []
    assert store.nearest(fp, {"macs": 0.5}) == []
    assert store.best_shape_for(fp, {"macs": 0.5}) is None
    with pytest.raises(PrunepilotError) as err:
        store.record(prior("r1", fp, {"macs": 0.5}, 0.5))
    assert err.value.fix and str(bad) in str(err.value.value)
    fresh = HistoryStore(tmp_path / "elsewhere" / "h.sqlite")
    fresh.record(prior("r1", fp, {"macs": 0.5}, 0.5))
    assert [p.run_id for p in fresh.matching(fp)] == ["r1"]


def test_unreadable_row_is_skipped(tmp_path):
    import sqlite3

    store = HistoryStore(tmp_path / "h.sqlite")
    fp = Fingerprint.of("prune", "ResNet", GROUPS, 4.1e7)
    store.record(prior("good", fp, {"macs": 0.5}, 0.5))
    with sqlite3.connect(store.path) as c:
        c.execute("INSERT INTO priors VALUES (?,?,?,?,?,?,?,?)",
                  ("bad", 2.0, "prune", "ResNet", fp.structure, 3, 4.1e7, "{not json"))
    assert [p.run_id for p in store.matching(fp)] == ["good"]


def test_null_history(tmp_path):
    h = NullHistory()
    fp = Fingerprint.of("prune", "ResNet", GROUPS, 4.1e7)
    assert h.record(prior("r1", fp, {"macs": 0.5}, 0.5)) is None
    assert h.matching(fp) == [] and h.nearest(fp, {"macs": 0.5}) == []
    assert h.best_shape_for(fp, {"macs": 0.5}) is None
    assert not Path(tmp_path / "cache").exists()


def test_prior_summary_is_json_and_truncates():
    fp = Fingerprint.of("sparsify", "llama", GROUPS, 1.3e8)
    shape = {f"layers.{i}": i / 20 for i in range(12)}
    p = prior("r1", fp, {"sparsity": 0.5}, math.inf, plan_shape=shape,
              outcome={"probe_kl": 0.5, "perplexity": 20.123456})
    [s] = prior_summary([p])
    text = json.dumps([s], allow_nan=False)  # strict JSON: no NaN/Infinity
    assert set(s) == {"budget", "outcome", "score", "rounds_to_best", "plan_shape", "plan_shape_omitted"}
    assert list(s["plan_shape"]) == [f"layers.{i}" for i in range(11, 3, -1)]
    assert s["plan_shape_omitted"] == 4 and s["score"] is None and s["outcome"]["perplexity"] == 20.1235
    assert "r1" not in text and fp.structure not in text
    assert prior_summary([]) == []


@pytest.mark.parametrize("argv,says", [
    (["prune", "torchvision:resnet18", "--target-macs", "50%", "--data", "fashion-mnist", "--history", "h.sqlite",
      "--no-history"], "contradict"),
    (["prune", "torchvision:resnet18", "--target-macs", "50%", "--history", "h.sqlite"], "needs --data"),
    (["sparsify", "hf:/nonexistent/model", "--history", "h.sqlite", "--no-history"], "contradict"),
    (["sparsify", "hf:/nonexistent/model", "--agent", "owl", "--history", "h.sqlite"], "has no loop"),
    (["sparsify", "hf:/nonexistent/model", "--sparsity", "2:4", "--history", "h.sqlite"], "has no loop"),
])
def test_history_options_that_would_be_ignored_are_refused(argv, says, tmp_path):
    """No silently ignored option: --history where no loop reads it, or beside --no-history, is an error."""
    from typer.testing import CliRunner

    from prunepilot.cli import app

    r = CliRunner().invoke(app, [*argv, "--out", str(tmp_path / "run")])
    assert isinstance(r.exception, PrunepilotError) and says in str(r.exception), r.output
    assert not (tmp_path / "run").exists()
