"""Whole-block removal: which blocks are skippable, exact costs without them, the artefact replays them, the
`blocks` strategist ranks them by measured score lost per cost, and every job that cannot skip says so."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from prunepilot import pipeline
from prunepilot.agents.analyst import Names, narrow_schema, parse_plan, profile_names
from prunepilot.agents.context import Context
from prunepilot.agents.llm.base import LLMReply
from prunepilot.agents.strategists import BlockStrategist
from prunepilot.allocation import Allocation
from prunepilot.attempt import Attempt
from prunepilot.blocks import find_blocks, is_residual, skip_blocks
from prunepilot.budget import Budget
from prunepilot.engines.artifact import load_pruned
from prunepilot.engines.structured import apply_allocation
from prunepilot.errors import PlanError
from prunepilot.pipeline import Pruner, count_real
from prunepilot.plan import Plan
from prunepilot.sources.models import LoadedModel, load_model

from tiny_models import BlockNet, block_net


class Additive(nn.Module):
    """x + attn(x) + mlp(x), as a pre-norm transformer block (two residual adds in a chain)."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        x = x + self.a(x)
        return x + self.b(x)


class NotResidual(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.a = nn.Linear(d, d)

    def forward(self, x):
        return self.a(x) * 2 + 1  # same shape as its input, but no path carries the input through


class Scaled(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.a = nn.Linear(d, d)

    def forward(self, x):
        return torch.add(x, self.a(x), alpha=0.5)  # x + 0.5 f(x) is residual too; x - f(x) (alpha -1) would not be


def test_residual_forms_are_recognised_and_others_are_not():
    assert is_residual(Additive()) and is_residual(Scaled())
    assert not is_residual(NotResidual()) and not is_residual(nn.Linear(8, 8))
    net = BlockNet().eval()
    found = find_blocks(net, torch.randn(1, 3, 16, 16))
    # the stride-2 block changes the shape (and its shortcut is a conv): not skippable
    assert list(found) == ["stage1.0", "stage1.1", "stage2.1"]
    assert found["stage1.0"] == ["stage1.0.conv1", "stage1.0.conv2"]
    # a block holding a protected layer stays
    assert "stage1.1" not in find_blocks(net, torch.randn(1, 3, 16, 16), avoid=["stage1.1.conv2"])


@pytest.fixture(scope="module")
def pruner() -> Pruner:
    return Pruner(LoadedModel(block_net(), torch.randn(1, 3, 16, 16), "py:blocks", "blocks"), latency_runs=0)


def test_projection_with_skipped_blocks_is_exact(pruner):
    assert list(pruner.structure.blocks) == ["stage1.0", "stage1.1", "stage2.1"]
    rows = {r["block"]: r for r in pruner.profile.blocks}
    assert rows["stage1.0"]["macs_share"] > 0.1 and rows["stage2.1"]["params_share"] > rows["stage1.0"]["params_share"]
    rb = Budget.parse(macs="50%").resolve(pruner.profile.dense)
    cand = pruner.candidate(Plan(default_ratio=0.5, round_to=4, skip=["stage1.1", "stage2.1"]), rb)
    alloc = cand.projection.allocation
    assert alloc.skip == ("stage1.1", "stage2.1") and cand.projection.feasible
    # the analytic prediction is the real count of the built model: the skipped modules' terms are gone
    assert cand.projection.predicted["macs"] == pytest.approx(cand.metrics["macs"], rel=1e-6)
    assert rb.within("macs", cand.metrics["macs"])
    assert isinstance(cand.model.stage1[1], nn.Identity) and isinstance(cand.model.stage2[1], nn.Identity)
    # groups wholly inside a skipped block keep their width (they go with the block); the rest are cut harder
    inner = pruner.projector.view(alloc.skip).fixed
    assert "stage1.1.conv1" in inner and all(alloc.kept[g] == pruner.structure.groups[g].units for g in inner)
    # the skipped blocks carry part of the budget: the groups left are cut less than without them
    plain = pruner.candidate(Plan(default_ratio=0.5, round_to=4), rb)
    assert not plain.projection.allocation.skip
    outer = [g for g in alloc.kept if g not in inner]
    assert sum(alloc.kept[g] for g in outer) > sum(plain.projection.allocation.kept[g] for g in outer)


def test_a_plan_may_only_skip_skippable_blocks(pruner):
    rb = Budget.parse(macs="50%").resolve(pruner.profile.dense)
    with pytest.raises(PlanError, match="not a skippable residual block"):
        pruner.candidate(Plan(default_ratio=0.5, skip=["stage2.0"]), rb)  # the stride-2 block
    with pytest.raises(PlanError, match="does not have"):
        apply_allocation(block_net(), torch.randn(1, 3, 16, 16), pruner.structure, Allocation({}, {}, ("nope",)))


def test_allocation_json_round_trip_and_old_records():
    a = Allocation({"g": 3}, {}, ("b2", "b1"))
    assert Allocation.from_json(a.to_json()).skip == ("b1", "b2")
    assert "skip" not in Allocation({"g": 3}, {}).to_json()  # records of runs that skip nothing read as before
    assert Allocation.from_json({"kept": {"g": 3}, "heads": {}}).skip == ()


def test_skip_blocks_replaces_the_outermost():
    net = BlockNet().eval()
    skip_blocks(net, ["stage1.0.conv1", "stage1.0"])
    assert isinstance(net.stage1[0], nn.Identity)
    net(torch.randn(1, 3, 16, 16))


def test_load_pruned_replays_skipped_blocks(tmp_path):
    x = torch.randn(1, 3, 16, 16)
    dense = block_net()
    sd = tmp_path / "sd.pt"
    torch.save(dense.state_dict(), sd)
    loaded = load_model("py:tiny_models:block_net", input_shape=tuple(x.shape), state_dict=sd)
    result = pipeline.run_prune(loaded, Budget.parse(macs="50%"), Plan(round_to=4, skip=["stage1.0"]), tmp_path / "run",
                                latency_rounds=2)
    assert result["blocks_removed"] == ["stage1.0"]
    assert json.loads((tmp_path / "run" / "structure.json").read_text())["allocation"]["skip"] == ["stage1.0"]
    assert "Residual blocks removed" in (tmp_path / "run" / "summary.md").read_text()
    again = load_pruned(tmp_path / "run")
    assert isinstance(again.module.stage1[0], nn.Identity)
    assert count_real(again.module, x)["macs"] == pytest.approx(result["compressed"]["macs"])


def _ctx(blocks: list[dict], history: list[Attempt] | None = None, target: float = 0.5) -> Context:
    profile = {"dense": {"macs": 100.0}, "families": [{"family": "f", "macs_share": 0.5, "sensitivity_z": 0.0}],
               "groups": ["f.0"], "blocks": blocks}
    return Context("prune", profile, {"targets": {"macs": {"goal": 100.0 * target, "text": "50%"}}}, history or [])


def test_block_strategist_skips_the_cheapest_per_cost_within_its_share():
    blocks = [{"block": "a", "macs_share": 0.10, "score_drop": 0.05},   # 0.5 lost per share
              {"block": "b", "macs_share": 0.20, "score_drop": 0.01},   # 0.05: the cheapest
              {"block": "c", "macs_share": 0.05, "score_drop": 0.001},  # 0.02: cheaper still, small
              {"block": "d", "macs_share": 0.30, "score_drop": 0.0}]    # free, but larger than the share allows
    plan = BlockStrategist().propose(_ctx(blocks))  # round 0: half of the 50% to remove = 25% from blocks
    assert plan.params["block_share"] == 0.5 and sorted(plan.skip) == ["b", "c"]
    # unmeasured blocks are never skipped blind; with none measured the channel search decides alone
    plan = BlockStrategist().propose(_ctx([{"block": "a", "macs_share": 0.1}]))
    assert not plan.skip and "no skippable residual block" in plan.rationale


def _tried(i: int, share: float, skip: list[str], acc: float, alpha: float = 0.6) -> Attempt:
    return Attempt(index=i, job="prune", strategist="blocks", verdict="worse", within_band=True, score=acc,
                   plan=Plan(skip=skip, params={"block_share": share, "alpha": alpha}).model_dump(), metrics={"accuracy": acc})


def test_block_strategist_searches_distinct_block_sets_then_the_channel_shape():
    blocks = [{"block": n, "macs_share": 0.05, "score_drop": 0.01 * i} for i, n in enumerate("abcdefgh")]
    hist = [_tried(0, 0.5, ["a", "b", "c", "d", "e"], 0.80), _tried(1, 0.25, ["a", "b"], 0.85),
            _tried(2, 0.75, ["a", "b", "c", "d", "e", "f", "g"], 0.70)]
    plan = BlockStrategist().propose(_ctx(blocks, hist))
    # outwards from the best share (0.25, a set already measured): 0.1875 skips one block, a set not measured yet
    assert plan.params["block_share"] == 0.1875 and plan.skip == ["a"]
    # once every distinct set is measured, the channel shape of the best set moves (alpha), never a repeat
    sets = {tuple(sorted(BlockStrategist._choose(sorted(blocks, key=lambda b: b["score_drop"] / 0.05), "macs_share",
                                                 s * 0.5)[0])) for s in BlockStrategist.GRID}
    full = [_tried(i, s, list(k), 0.85 if k == ("a", "b") else 0.6) for i, (s, k) in
            enumerate((len(k) * 0.1, k) for k in sorted(sets))]
    plan = BlockStrategist().propose(_ctx(blocks, full))
    assert plan.skip == ["a", "b"] and plan.params["alpha"] != 0.6


def test_the_analyst_may_skip_listed_blocks_only():
    names = profile_names({"families": [{"family": "f"}], "groups": ["f.0"], "blocks": [{"block": "b1"}, {"block": "b2"}]})
    assert names.blocks == ["b1", "b2"]
    plan, err, _ = parse_plan(LLMReply(json.dumps({"ratios": {"f": 0.3}, "skip": ["b2"]}), None, "scripted"), names)
    assert err is None and plan.skip == ["b2"]
    plan, err, _ = parse_plan(LLMReply(json.dumps({"ratios": {"f": 0.3}, "skip": ["f.0"]}), None, "scripted"), names)
    assert plan is None and "not a skippable residual block" in err
    schema = narrow_schema(names)
    assert schema["properties"]["skip"]["items"]["enum"] == ["b1", "b2"]
    assert "skip" not in narrow_schema(Names(["f"], ["f.0"], None))["properties"]


def test_sparsify_refuses_a_plan_that_skips():
    from prunepilot.sparsify.plan import resolve

    with pytest.raises(PlanError, match="only structured pruning understands") as exc:
        resolve(Plan(ratios={}, skip=["model.layers.3"]), [], {}, {})
    assert "skip" in str(exc.value)


def test_the_agent_loop_measures_and_skips_blocks_end_to_end(tmp_path):
    """prunepilot.prune with agent="blocks": each block's cost of skipping is measured on the user's data, the
    strategist skips where it is cheapest, the journal, result and reload agree."""
    import prunepilot
    from torch.utils.data import DataLoader, TensorDataset

    from prunepilot.journal import Journal

    g = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(192, 3, 16, 16, generator=g), torch.randint(0, 10, (192,), generator=g)
    train = DataLoader(TensorDataset(xs, ys), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(xs[:64], ys[:64]), batch_size=64)
    res = prunepilot.prune(block_net(), torch.randn(1, 3, 16, 16), target_macs="30%", train=train, val=val,
                           agent="blocks", rounds=3, finetune_steps=2, finetune_epochs=0.1, history=False,
                           out=tmp_path / "run", log=None)
    profile = json.loads((tmp_path / "run" / "profile.json").read_text())
    assert {b["block"] for b in profile["blocks"]} == {"stage1.0", "stage1.1", "stage2.1"}
    assert all("score_drop" in b for b in profile["blocks"])
    attempts = [a for a in Journal(res.out / "journal.sqlite").attempts(res.run_id) if a.verdict != "repeat"]
    shares = [a.plan_params["block_share"] for a in attempts]
    assert shares == [0.5, 0.25, 0.75]
    # each block holds ~26% of the MACs: half of the 70% to remove fits one, a quarter none, three quarters two
    assert [len(a.allocation.get("skip", [])) for a in attempts] == [1, 0, 2]
    best = next(a for a in attempts if a.index == res.raw["best_round"])
    assert res.raw["blocks_removed"] == best.allocation.get("skip", [])
    for b in res.raw["blocks_removed"]:
        assert isinstance(res.model.get_submodule(b), nn.Identity)
    assert res.within_band


def test_latency_views_drop_the_skipped_ops(pruner, tmp_path):
    from prunepilot.latency.job import LatencyTargeting

    lt = LatencyTargeting.enable(pruner, align=False, cache_dir=tmp_path, runs=1)
    try:
        assert not pruner.projector.latency.block_adjust  # nothing timed until a plan or a strategist asks
        lt.profile_blocks(pruner)
        # (measured values: only their frame is asserted, never their size — timings are the host's)
        rows = {r["block"]: r for r in pruner.profile.blocks}
        assert set(rows) == set(pruner.structure.blocks) and all("latency_share" in r for r in rows.values())
        lm = pruner.projector.latency
        assert set(lm.block_adjust) == set(pruner.structure.blocks)
        view = lm.without(["stage1.0"])
        assert view.dense_elems == lm._elems and view.rest_a == pytest.approx(lm.rest_a + lm.block_adjust["stage1.0"])
        assert len(view.ops) < len(lm.ops) and all(not o.name.startswith("stage1.0.") for o in view.ops)
        # the view with the block skipped predicts what was measured with it skipped (never above dense)
        assert view.predict({}) <= lm.dense_ms + 1e-9
        rb = Budget.parse(latency_ms="70%").resolve(pruner.profile.dense)
        proj = pruner.projector.project(Plan(default_ratio=0.5, round_to=4, skip=["stage1.0"]), rb)
        assert proj.allocation.skip == ("stage1.0",)
        assert proj.predicted["latency_ms"] == pytest.approx(pruner.projector.view(["stage1.0"]).metrics(proj.allocation)["latency_ms"])
    finally:  # the module-scoped pruner goes back to its MAC-only projector
        from prunepilot.projector import Projector

        pruner.projector = Projector(pruner.structure, pruner.cost)


def test_a_skip_that_breaks_the_model_is_named_not_a_family(monkeypatch):
    """A forward that reads a skipped block's attributes fails: the error names the skip, no family is blamed."""
    class Reads(BlockNet):
        def forward(self, x):
            assert isinstance(self.stage1[1].conv1, nn.Conv2d)  # reads into the block it may lose
            return super().forward(x)

    torch.manual_seed(0)
    p = Pruner(LoadedModel(Reads().eval(), torch.randn(1, 3, 16, 16), "py:reads", "reads"), latency_runs=0)
    rb = Budget.parse(macs="50%").resolve(p.profile.dense)
    from prunepilot.engines.structured import VerificationError

    with pytest.raises(VerificationError, match="skipping stage1.1 breaks the model"):
        p.candidate(Plan(default_ratio=0.5, round_to=4, skip=["stage1.1"]), rb)
    assert not any("breaks the model" in why for why in p.structure.ignored.values())


def test_the_users_skip_holds_in_every_candidate_and_without_data(tmp_path):
    import prunepilot
    from torch.utils.data import DataLoader, TensorDataset

    from prunepilot.journal import Journal

    x = torch.randn(1, 3, 16, 16)
    one = prunepilot.prune(block_net(), x, target_macs="50%", skip=["stage2.1"], out=tmp_path / "one", log=None)
    assert one.raw["blocks_removed"] == ["stage2.1"] and isinstance(one.model.stage2[1], nn.Identity)
    g = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(96, 3, 16, 16, generator=g), torch.randint(0, 10, (96,), generator=g)
    loader = DataLoader(TensorDataset(xs, ys), batch_size=32)
    res = prunepilot.prune(block_net(), x, target_macs="50%", train=loader, val=loader, agent="sensitivity", rounds=2,
                           skip=["stage1.1"], finetune_steps=1, finetune_epochs=0.1, history=False,
                           out=tmp_path / "loop", log=None)
    attempts = Journal(res.out / "journal.sqlite").attempts(res.run_id)
    assert attempts and all("stage1.1" in a.allocation.get("skip", []) for a in attempts if a.allocation)
    assert "stage1.1" in res.raw["blocks_removed"]
    # a channel strategist does not read blocks: no evaluation is spent on what skipping each would cost
    assert all("score_drop" not in b for b in json.loads((res.out / "profile.json").read_text())["blocks"])
    with pytest.raises(PlanError, match="not a skippable residual block"):
        prunepilot.prune(block_net(), x, target_macs="50%", skip=["stem.0"], out=tmp_path / "bad", log=None)


def test_tracing_leaves_no_proxy_behind():
    """A forward that caches on its module (as LeViT's attention-bias cache does) keeps working after detection."""
    class Caching(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.cache: dict = {}

        def forward(self, x):
            self.cache["w"] = self.a.weight * 1.0
            self.last = x
            return x + torch.nn.functional.linear(x, self.cache["w"])

    m = Caching()
    assert is_residual(m)
    assert m.cache == {} and not hasattr(m, "last")
    m(torch.randn(2, 8))


def test_detection_leaves_the_users_model_as_it_was():
    net = BlockNet().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    find_blocks(net, torch.randn(4, 3, 16, 16) * 5)
    assert net.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # BN stats unmoved
