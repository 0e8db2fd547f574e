"""The per-device latency model: tables built from real op timings, cached, interpolated, consistent deltas.

No assertion here depends on how fast anything ran (shared machines): only on structure and consistency."""

from __future__ import annotations

import copy

import pytest
import torch

from prunepilot.allocation import Allocation
from prunepilot.engines.structured import apply_allocation
from prunepilot.latency import build_latency_model
from prunepilot.latency.alignment import choose_alignment
from prunepilot.latency.model import _bilinear, _grid, capture_ops
from prunepilot.structure import analyse

from tiny_models import DepthwiseCNN, ResidualCNN, tiny_vit


def _setup(factory, shape=(1, 3, 32, 32)):
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.randn(*shape)
    st, _ = analyse(model, x)
    return model, x, st


def _uniform(model, x, st, r):
    kept = {n: max(1, int(round(g.units * (1 - r)))) for n, g in st.groups.items()}
    return apply_allocation(copy.deepcopy(model), x, st, Allocation(kept, {})).eval()


def test_grid_is_aligned_and_ends_at_dense():
    g = _grid(256, 8)
    assert g[-1] == 256 and all(w % 8 == 0 for w in g) and g == sorted(set(g))
    assert _grid(12, 8) == sorted(set(_grid(12, 8))) and _grid(12, 8)[-1] == 12  # small dims: no alignment
    assert all(w % 4 == 0 for w in _grid(64, 1, multiple=4))


def test_bilinear_is_exact_on_grid_points_and_between_neighbours():
    gi, go = [8, 16], [8, 24]
    table = [[1.0, 3.0], [2.0, 6.0]]
    assert _bilinear(gi, go, table, 8, 8) == 1.0 and _bilinear(gi, go, table, 16, 24) == 6.0
    mid = _bilinear(gi, go, table, 12, 16)
    assert 1.0 < mid < 6.0 and mid == pytest.approx((1 + 3 + 2 + 6) / 4)
    assert _bilinear(gi, go, table, 100, 100) == 6.0  # clamped outside the measured range


@pytest.mark.parametrize("factory", [DepthwiseCNN, tiny_vit], ids=["depthwise", "vit"])
def test_latency_model_tables_cache_and_deltas(tmp_path, factory):
    model, x, st = _setup(factory)
    lm = build_latency_model(model, x, st, runs=1, whole_runs=2, cache_dir=tmp_path,
                             prune_uniform=lambda r, mult: _uniform(model, x, st, r))
    ops = capture_ops(model, x, st)
    assert len(lm.ops) == len(ops) > 0 and lm.measured_points > 0 and lm.cached_points >= 0
    assert all(o.table and len(o.table) == len(o.in_grid) and len(o.table[0]) == len(o.out_grid) for o in lm.ops)
    assert all(v > 0 for o in lm.ops for row in o.table for v in row)
    dense = lm.predict({})
    assert dense == pytest.approx(lm.ops_dense_ms + lm.rest_a + lm.rest_b)
    # pruning any group never makes the op sum larger, and group_delta agrees with two full predictions
    frac = {g: 0.6 for g in st.groups}
    for g in list(st.groups)[:4]:
        delta = lm.group_delta(frac, g, 0.3)
        moved = dict(frac, **{g: 0.3})
        assert delta == pytest.approx(lm.predict(moved) - lm.predict(frac), abs=1e-9)
    # tables are monotone in width after repair (a noisy spike never makes fewer channels look slower)
    for o in lm.ops:
        for row in o.table:
            assert all(a <= b + 1e-12 for a, b in zip(row, row[1:]))
        for col in zip(*o.table):
            assert all(a <= b + 1e-12 for a, b in zip(col, col[1:]))
    # a second build on the same device measures nothing it measured before
    again = build_latency_model(model, x, st, runs=1, whole_runs=2, cache_dir=tmp_path)
    assert again.measured_points == 0 and again.cached_points == lm.measured_points + lm.cached_points
    js = lm.to_json()
    assert js["fingerprint"].startswith("cpu|") and js["tables"] >= 1 and "calibration" in js


def test_alignment_choice_is_one_of_the_candidates(tmp_path):
    model, x, st = _setup(lambda: ResidualCNN(c=64))
    ops = capture_ops(model, x, st)
    choice = choose_alignment(ops, st, device=torch.device("cpu"), dtype=torch.float32, candidates=(1, 8), runs=1)
    assert choice and set(choice) <= set(st.families)
    for c in choice.values():
        assert c.multiple in (1, 8) and set(c.vs_trend) <= {1, 8}
        assert c.to_json()["family"] == c.family


def test_alignment_scores_widths_against_one_trend():
    """A staircase of 32 (every width costs what the next multiple of 32 costs): multiples of 32 sit below the
    fitted trend and win; a straight line (no blocks): every multiple scores ~1 and the SIMD block (8) stays."""
    from prunepilot.latency.alignment import TIE, _choose, _score, sweep_widths

    widths = sweep_widths(256)
    assert widths[0] == 64 and widths[-1] == 256 and all(w % 4 == 0 for w in widths)
    stairs = [float(-(-w // 32) * 32) for w in widths]
    s = _score(widths, stairs, (1, 8, 16, 32, 64))
    assert min(s, key=s.get) in (32, 64) and s[32] < s[8] - TIE
    assert _choose(s) == 32  # 64 is no faster than 32 by TIE
    line = [1.0 + 0.01 * w for w in widths]
    flat = _score(widths, line, (1, 8, 16, 32, 64))
    assert all(abs(v - 1) < 1e-9 for v in flat.values()) and _choose(flat) == 8  # no evidence: the SIMD block
    assert len(sweep_widths(4096)) <= 64


def test_latency_model_tables_sit_on_the_chosen_multiples(tmp_path):
    model, x, st = _setup(lambda: ResidualCNN(c=64), shape=(1, 3, 32, 32))
    lm = build_latency_model(model, x, st, runs=1, whole_runs=2, cache_dir=tmp_path, align=True)
    mult = {g: lm.alignment[f].multiple for f, names in st.families.items() if f in lm.alignment for g in names}
    for o in lm.ops:
        for g in o.dims.out_groups if o.dims else {}:
            m = mult.get(g, 1)
            if m > 1 and o.kind == "conv" and not o.signature["depthwise"]:
                assert all(w % m == 0 for w in o.out_grid)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One table cache for the tests below (same model and shape): the second build reads, not measures."""
    path = tmp_path_factory.mktemp("prunepilot-cache") / "latency"  # PRUNEPILOT_CACHE/latency: the default
    path.mkdir()
    return path


def test_projector_meets_a_latency_goal_on_its_tables(shared_cache):
    """The projector puts the *predicted* latency inside the band (its guarantee on its own model); measuring
    the result is the job's business (run_prune_to_latency), checked for shape here, not for speed."""
    from prunepilot.budget import Budget
    from prunepilot.latency.job import LatencyTargeting
    from prunepilot.pipeline import Pruner
    from prunepilot.plan import Plan
    from prunepilot.sources.models import LoadedModel

    torch.manual_seed(0)
    model = ResidualCNN(c=32).eval()
    x = torch.randn(1, 3, 64, 64)
    pruner = Pruner(LoadedModel(model, x, "python:ResidualCNN", "tiny"))
    targeting = LatencyTargeting.enable(pruner, cache_dir=shared_cache, align=True, runs=1)
    rb = Budget.parse(latency_ms="80%", tolerance="+3%/-10%").resolve(pruner.profile.dense)
    proj = pruner.projector.project(Plan(), rb)
    assert proj.feasible and "latency_ms" in proj.predicted
    assert rb.within("latency_ms", proj.predicted["latency_ms"])
    cand = targeting.candidate(pruner, Plan(), rb)
    assert cand.metrics["latency_ms"] > 0 and cand.metrics["latency_predicted_ms"] > 0
    js = targeting.to_json()
    assert js["model"]["ops"] > 0 and set(js["alignment"]) <= set(pruner.structure.families)


def test_prune_to_latency_writes_the_latency_story(tmp_path, shared_cache, monkeypatch):
    from prunepilot.budget import Budget
    from prunepilot.latency.job import run_prune_to_latency
    from prunepilot.plan import Plan
    from prunepilot.sources.models import LoadedModel

    monkeypatch.setenv("PRUNEPILOT_CACHE", str(shared_cache.parent))
    torch.manual_seed(0)
    model = ResidualCNN(c=32).eval()
    x = torch.randn(1, 3, 64, 64)
    res = run_prune_to_latency(LoadedModel(model, x, "python:ResidualCNN", "tiny"), Budget.parse(latency_ms="70%"),
                               Plan(), tmp_path / "run", log=lambda _m: None)
    assert set(res["errors"]) == {"latency_ms"} and res["compressed"]["latency_ms"] > 0
    assert res["latency_targeting"]["model"]["fingerprint"].startswith("cpu|")
    assert res["within_band"] or res["reason"]  # out of band is never silent
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "Latency model" in summary and "of the MAC ratio became real speed" in summary
    assert res["compressed"]["files_mb"]["state_dict"] > 0
    from prunepilot.report.render import render_report

    _, md_path = render_report(tmp_path / "run")
    report = md_path.read_text()
    assert "Latency model of this device" in report and res["latency_targeting"]["model"]["fingerprint"].split("|")[1] in report
    for fam, a in res["latency_targeting"]["alignment"].items():
        assert fam in report and "vs_trend" in a


def test_sensitivity_strategist_trades_against_measured_latency_under_a_latency_budget():
    from prunepilot.agents.context import Context
    from prunepilot.agents.strategists import SensitivityStrategist

    fams = [{"family": "a", "macs_share": 0.8, "latency_share": 0.1, "sensitivity_z": 0.0},
            {"family": "b", "macs_share": 0.2, "latency_share": 0.9, "sensitivity_z": 0.0}]
    profile = {"families": fams, "groups": ["a", "b"]}
    s = SensitivityStrategist()
    by_macs = s.propose(Context("prune", profile, {"targets": {"macs": {}}}, []))
    by_latency = s.propose(Context("prune", profile, {"targets": {"latency_ms": {}}}, []))
    assert by_macs.ratios["a"] > by_macs.ratios["b"]  # MAC-heavy family loses more
    assert by_latency.ratios["b"] > by_latency.ratios["a"]  # latency-heavy family loses more
    assert "measured latency" in by_latency.rationale


def test_latency_candidate_corrects_a_biased_table_towards_the_band_middle():
    """Tables that under-predict by 12% (and a host that adds a constant): the first candidate misses the band,
    the corrections (bias, then secant) bring the measurement near the band's middle; the kept candidate is the
    closest one and its measured latency is what the candidate reports."""
    from types import SimpleNamespace

    from prunepilot.budget import Budget
    from prunepilot.latency.job import LatencyTargeting
    from prunepilot.plan import Plan

    goal = Budget.parse(latency_ms="10", tolerance="+1%/-5%").resolve({"latency_ms": 20.0})

    class FakePruner:
        dense, x = None, None

        def candidate(self, plan, budget, **kw):
            p = budget.goals["latency_ms"]
            return SimpleNamespace(model=p, metrics={}, projection=SimpleNamespace(predicted={"latency_ms": p}, feasible=True))

    targeting = LatencyTargeting(model=SimpleNamespace(dense_ms=20.0))
    targeting._measured = lambda pruner, model: 1.12 * model + 0.3  # the host's truth: biased and offset
    cand = targeting.candidate(FakePruner(), Plan(), goal)
    assert targeting.corrections >= 1
    assert goal.within("latency_ms", cand.metrics["latency_ms"])
    assert abs(goal.error("latency_ms", cand.metrics["latency_ms"]) - (-0.02)) < 0.015  # near the middle (-2%)
    assert cand.metrics["latency_ms"] == 1.12 * cand.model + 0.3
    assert "noisy" in targeting.out_of_band_reason(goal)
    # a retry the projector could not land on its rescaled aim (by its tables) still gets the second correction

    class StepPruner(FakePruner):
        calls = 0

        def candidate(self, plan, budget, **kw):
            StepPruner.calls += 1
            cand = super().candidate(plan, budget, **kw)
            cand.projection.feasible = StepPruner.calls == 1
            cand.projection.reason = "" if cand.projection.feasible else "no allocation puts every target inside the band"
            return cand

    targeting = LatencyTargeting(model=SimpleNamespace(dense_ms=20.0))
    targeting._measured = lambda pruner, model: 1.5 * model - 3.0  # not a pure bias: the bias step lands at -5%
    targeting.candidate(StepPruner(), Plan(), goal)
    assert targeting.corrections == 2
    # a host with a floor (fixed costs no channel cut removes): the corrections aim ever lower, the measurement
    # stays near 14 ms, and the reason says the target is below what pruning reaches, with the number
    targeting = LatencyTargeting(model=SimpleNamespace(dense_ms=20.0))
    targeting._measured = lambda pruner, model: 14.0 + 0.05 * model
    cand = targeting.candidate(FakePruner(), Plan(), goal)
    assert not goal.within("latency_ms", cand.metrics["latency_ms"])
    why = targeting.out_of_band_reason(goal)
    assert "below what pruning reaches" in why and f"{targeting.fastest_ms:.2f} ms" in why


def test_grid_keeps_a_grouped_convs_multiple():
    """A grouped conv's widths stay multiples of its groups (regnet: 6 groups) when aligned to the step."""
    g = _grid(48, 8, multiple=6)
    assert all(w % 6 == 0 for w in g) and g[-1] == 48
    assert all(w % 24 == 0 for w in _grid(96, 8, multiple=6))


def test_whole_network_check_overrides_the_per_family_choice_only_when_clearly_faster():
    """The per-family multiples against one multiple for every family, ranked by latency per MAC kept: a global
    multiple that runs 10% faster per MAC replaces the choice (families too narrow for it keep theirs); one
    within TIE does not."""
    from prunepilot.latency.alignment import CHECK_ROUNDS, TIE, AlignmentChoice, confirm_alignment

    _, _, st = _setup(lambda: ResidualCNN(c=64))
    per_family = {f: AlignmentChoice(f, "op", 8, {8: 1.0}) for f in st.families}
    built: list[dict] = []

    def build(mult):
        built.append(mult)
        return mult

    def run(speed_of_16: float):
        built.clear()
        return confirm_alignment(per_family, st, build, macs=lambda m: 100.0,
                                 latency_ratio=lambda m: speed_of_16 if max(m.values()) == 16 else 0.5,
                                 dense_macs=200.0)

    chosen, check = run(0.45)
    assert check.chosen == "all 16" and {"per family", "all 16"} <= set(check.options)
    assert check.options["per family"]["per_mac"] == pytest.approx(1.0) and check.options["all 16"]["per_mac"] == pytest.approx(0.9)
    assert all(c.multiple == 16 for f, c in chosen.items() if st.groups[st.families[f][0]].units >= 64)
    assert len(built) == CHECK_ROUNDS * len(check.options) and all(set(b) == set(st.groups) for b in built)
    chosen, check = run(0.5 * (1 - TIE / 2))
    assert check.chosen == "per family" and chosen is per_family
    calls = iter(range(100))  # one round says 16 is 10% faster, the next says it is not: noise, not taken
    chosen, check = confirm_alignment(per_family, st, build, macs=lambda m: 100.0, dense_macs=200.0,
                                      latency_ratio=lambda m: (0.45 if next(calls) < 1 else 0.5)
                                      if max(m.values()) == 16 else 0.5)
    assert check.chosen == "per family" and chosen is per_family
    narrow = {f: c for f, c in per_family.items() if st.groups[st.families[f][0]].units < 64}
    if narrow:
        assert all(chosen[f].multiple == 8 for f in narrow)


def test_latency_model_checks_its_alignment_in_the_whole_network(tmp_path):
    model, x, st = _setup(lambda: ResidualCNN(c=64))
    from prunepilot.pipeline import count_real

    from prunepilot.latency.model import aligned_width

    def aligned_uniform(r, mult):
        kept = {n: aligned_width(g.units * (1 - r), mult.get(n, 1), g.units) for n, g in st.groups.items()}
        return apply_allocation(copy.deepcopy(model), x, st, Allocation(kept, {})).eval()

    lm = build_latency_model(model, x, st, runs=1, whole_runs=2, cache_dir=tmp_path, align=True,
                             prune_uniform=aligned_uniform, count_macs=lambda m: count_real(m, x)["macs"])
    check = lm.alignment_check
    # the per-family choice is measured, so it may coincide with one global multiple (that option is then
    # dropped as a duplicate); at least one global multiple always differs from it on a 64-wide network
    assert "per family" in check["options"] and check["chosen"] in check["options"]
    assert any(k in check["options"] for k in ("all 16", "all 32")) and len(check["options"]) >= 2
    assert all(o["latency_ratio"] > 0 and 0 < o["macs_ratio"] < 1 for o in check["options"].values())
    # the check prunes to widths where the multiples differ: the options are different networks
    assert len({round(o["macs_ratio"], 6) for o in check["options"].values()}) == len(check["options"])
    assert lm.to_json()["alignment_check"] == check


def test_whole_network_check_times_a_network_that_two_multiples_build_only_once():
    """Coarser multiples can round to the per-family widths: the same network is not timed as a rival option."""
    from torch import nn

    from prunepilot.latency.alignment import CHECK_ROUNDS, AlignmentChoice, confirm_alignment

    _, _, st = _setup(lambda: ResidualCNN(c=64))
    per_family = {f: AlignmentChoice(f, "op", 8, {8: 1.0}) for f in st.families}
    timed: list[int] = []

    def build(mult):  # every multiple but 32 lands on the per-family widths
        return nn.Linear(8, 32 if max(mult.values()) == 32 else 8)

    def latency(m):
        timed.append(m.out_features)
        return 0.5

    _, check = confirm_alignment(per_family, st, build, macs=lambda m: float(m.out_features),
                                      latency_ratio=latency, dense_macs=64.0)
    assert set(check.options) == {"per family", "all 32"}
    assert len({o["macs_ratio"] for o in check.options.values()}) == 2
    assert len(timed) == CHECK_ROUNDS * 2
    _, none = confirm_alignment(per_family, st, lambda mult: nn.Linear(8, 8), macs=lambda m: 8.0,
                                latency_ratio=lambda m: 0.5, dense_macs=64.0)
    assert none.chosen == "per family" and none.options == {}
