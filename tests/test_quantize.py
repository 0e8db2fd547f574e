"""Quantization engine: per-layer selection, skip reasons, output closeness, sizes, auto selection."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunepilot.engines.quantize import (
    check_plan_map,
    layer_rows,
    plan_map_from_layers_option,
    quantize_,
    resolve_scheme,
    select_layers_auto,
    weight_layers,
)
from prunepilot.errors import PlanError
from prunepilot.evaluate.memory import memory_report, parameter_bytes, peak_activation_bytes, state_dict_bytes


class Tiny(nn.Module):
    """Conv stem, two MLP Linears, an nn.MultiheadAttention and a small head: every skip reason appears."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 8 * 8, 256)
        self.fc2 = nn.Linear(256, 256)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x).flatten(1)  # (B, 512)
        h = F.relu(self.fc1(h))  # (B, 256)
        t = h.view(h.shape[0], 8, 32)  # (B, 8 tokens, 32)
        t = t + self.attn(t, t, t, need_weights=False)[0]
        h = F.relu(self.fc2(t.reshape(h.shape[0], 256)))
        return self.head(h)  # (B, 10)


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    torch.manual_seed(0)
    return Tiny().eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(4, 3, 8, 8)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))


# plan map -> layers expected to be quantized (eager backend)
SELECTION_CASES = [
    ({"*": "int8_dynamic"}, {"fc1", "fc2", "head"}),
    ({"fc1": "int8_dynamic"}, {"fc1"}),
    ({"re:^fc": "int8_dynamic"}, {"fc1", "fc2"}),
    ({"*": "int8_dynamic", "head": "none"}, {"fc1", "fc2"}),  # exact name beats '*'
    ({"re:fc\\d": "none", "*": "int8_dynamic"}, {"head"}),  # regex beats '*'
    ({"fc2": "int8_dynamic", "re:fc": "none"}, {"fc2"}),  # exact name beats regex
    ({"re:fc": "none", "re:fc1": "int8_dynamic"}, set()),  # first matching regex wins
    ({}, set()),
]


@pytest.mark.parametrize(("plan_map", "expected"), SELECTION_CASES)
def test_selection_by_name_regex_and_star(tiny: nn.Module, x: torch.Tensor, plan_map: dict, expected: set) -> None:
    q = copy.deepcopy(tiny)
    rep = quantize_(q, plan_map, measure_size=False)
    assert {d.name for d in rep.quantized} == expected
    # every weight layer is accounted for exactly once
    assert sorted(d.name for d in rep.layers) == sorted(n for n, _ in weight_layers(tiny))
    for name in expected:
        assert type(q.get_submodule(name)).__module__.startswith("torch.ao.nn.quantized.dynamic")
    assert q(x).shape == (4, 10)


def test_skipped_layers_carry_reasons(tiny: nn.Module) -> None:
    rep = quantize_(copy.deepcopy(tiny), {"*": "int8_dynamic", "fc2": "none"}, measure_size=False)
    reasons = {d.name: d.reason for d in rep.skipped}
    assert "Conv2d is not supported" in reasons["stem"]
    assert "MultiheadAttention reads .weight directly" in reasons["attn.out_proj"]
    assert "plan says 'none'" in reasons["fc2"]
    js = rep.to_json()
    assert js["n_quantized"] == 2 and js["n_skipped"] == 3
    assert all(s["reason"] for s in js["skipped"])


def test_unselected_layers_are_reported(tiny: nn.Module) -> None:
    rep = quantize_(copy.deepcopy(tiny), {"fc1": "int8_dynamic"}, measure_size=False)
    assert {d.name: d.reason for d in rep.skipped}["head"] == "not selected by the plan"


def test_weight_only_on_eager_is_skipped_with_reason(tiny: nn.Module) -> None:
    rep = quantize_(copy.deepcopy(tiny), {"fc1": "int8_weight_only"}, measure_size=False)
    assert not rep.quantized
    assert "use backend='torchao'" in rep.skipped[[d.name for d in rep.skipped].index("fc1")].reason


@pytest.mark.parametrize(
    ("plan_map", "message"),
    [
        ({"fc9": "int8_dynamic"}, "names a layer the model does not have"),
        ({"re:^nothing$": "int8_dynamic"}, "must match at least one weight layer"),
        ({"re:(": "int8_dynamic"}, "valid regular expression"),
        ({"fc1": "int4"}, "scheme must be one of"),
    ],
)
def test_bad_plan_maps_are_rejected(tiny: nn.Module, plan_map: dict, message: str) -> None:
    with pytest.raises(PlanError, match=message.replace("(", r"\(")):
        quantize_(copy.deepcopy(tiny), plan_map)


def test_unknown_backend_is_rejected(tiny: nn.Module) -> None:
    with pytest.raises(PlanError, match="backend must be one of"):
        quantize_(copy.deepcopy(tiny), {"*": "int8_dynamic"}, backend="tensorrt")  # type: ignore[arg-type]


def test_resolve_scheme_precedence() -> None:
    pm = {"re:blocks\\.0": "none", "blocks.0.fc": "int8_dynamic", "*": "int8_weight_only"}
    assert resolve_scheme(pm, "blocks.0.fc") == ("int8_dynamic", "blocks.0.fc")
    assert resolve_scheme(pm, "blocks.0.qkv") == ("none", "re:blocks\\.0")
    assert resolve_scheme(pm, "blocks.1.qkv") == ("int8_weight_only", "*")
    assert resolve_scheme({}, "x") == ("none", None)
    check_plan_map(pm, ["blocks.0.fc", "blocks.0.qkv"])


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 512), nn.GELU(), nn.Linear(512, 512), nn.GELU(), nn.Linear(512, 16)).eval()


def _vit_block() -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.models.vision_transformer.Block(dim=128, num_heads=4, mlp_ratio=4.0).eval()


@pytest.mark.parametrize("backend", ["eager", "torchao"])
@pytest.mark.parametrize(("make", "shape"), [(_mlp, (8, 64)), (_vit_block, (2, 17, 128))], ids=["mlp", "vit_block"])
def test_outputs_stay_close_after_quantization(backend: str, make, shape) -> None:
    if backend == "torchao":
        pytest.importorskip("torchao")
    model = make()
    xin = torch.randn(*shape)
    with torch.inference_mode():
        ref = model(xin)
    q = copy.deepcopy(model)
    rep = quantize_(q, {"*": "int8_dynamic"}, backend=backend)  # type: ignore[arg-type]
    assert rep.quantized and not [d for d in rep.skipped if d.kind == "Linear"]
    with torch.inference_mode():
        out = q(xin)
    assert _cos(ref, out) > 0.99
    # int8 weights: the serialized state_dict shrinks to roughly a quarter (+ scales, biases, pickling)
    assert rep.size_after_bytes < 0.4 * rep.size_before_bytes


def test_torchao_weight_only(tiny: nn.Module, x: torch.Tensor) -> None:
    pytest.importorskip("torchao")
    q = copy.deepcopy(tiny)
    rep = quantize_(q, {"re:^fc": "int8_weight_only"}, backend="torchao")
    assert {d.name for d in rep.quantized} == {"fc1", "fc2"}
    assert all("Int8WeightOnlyConfig" in d.reason for d in rep.quantized)
    with torch.inference_mode():
        assert _cos(tiny(x), q(x)) > 0.99


# ------------------------------------------------------------------------------------ auto selection


def _rows() -> list[dict]:
    return [
        {"name": "stem", "kind": "Conv2d", "params": 5000, "latency_share": 0.30},
        {"name": "qkv", "kind": "Linear", "params": 200_000, "latency_share": 0.35},
        {"name": "fc1", "kind": "Linear", "params": 400_000, "latency_share": 0.25},
        {"name": "fc2", "kind": "Linear", "params": 400_000, "latency_share": 0.08},
        {"name": "head", "kind": "Linear", "params": 2_000, "latency_share": 0.02},
    ]


def test_select_layers_auto_orders_by_measured_latency() -> None:
    sel = select_layers_auto(_rows(), coverage=0.7)
    # quantizable time: qkv .35, fc1 .25, fc2 .08 (head too small); 70% coverage needs qkv + fc1
    assert sel.plan_map == {"qkv": "int8_dynamic", "fc1": "int8_dynamic"}
    assert "not quantizable" in sel.reasons["stem"]
    assert "small" in sel.reasons["head"]
    assert "coverage" in sel.reasons["fc2"]
    assert sel.covered_latency_share == pytest.approx(0.60)


def test_select_layers_auto_protect_and_full_coverage() -> None:
    sel = select_layers_auto(_rows(), coverage=1.0, protect=["re:^qkv$"], scheme="int8_weight_only")
    assert sel.plan_map == {"fc1": "int8_weight_only", "fc2": "int8_weight_only"}
    assert sel.reasons["qkv"] == "protected"


def test_select_layers_auto_falls_back_to_params_without_latency() -> None:
    rows = [{k: v for k, v in r.items() if k != "latency_share"} for r in _rows()]
    sel = select_layers_auto(rows, coverage=0.5)
    # by size: fc1 (40%) then fc2 (40%) reach 50% coverage; the smaller qkv is left out
    assert set(sel.plan_map) == {"fc1", "fc2"}
    assert "params" in sel.reasons["fc1"]


def test_layer_rows_with_fake_clock(tiny: nn.Module, x: torch.Tensor) -> None:
    ticks = itertools.count()
    rows = layer_rows(tiny, x, runs=2, clock=lambda: float(next(ticks)))
    by = {r["name"]: r for r in rows}
    assert set(by) == {n for n, _ in weight_layers(tiny)}
    # every layer's pre/post hook pair advances the fake clock by exactly one tick per call
    assert by["fc1"]["latency_ms"] == pytest.approx(1000.0)
    assert sum(r["latency_share"] for r in rows) == pytest.approx(1.0)
    assert by["fc1"]["params"] == 512 * 256 + 256


def test_layers_option_parsing(tiny: nn.Module, x: torch.Tensor) -> None:
    assert plan_map_from_layers_option("all", tiny)[0] == {"*": "int8_dynamic"}
    assert plan_map_from_layers_option("^fc", tiny)[0] == {"re:^fc": "int8_dynamic"}
    pm, sel = plan_map_from_layers_option("auto", tiny, x)
    assert sel is not None and set(pm) <= {"fc1", "fc2"}  # head is below min_params, stem is a Conv
    with pytest.raises(PlanError, match="needs an example input"):
        plan_map_from_layers_option("auto", tiny, None)


# ---------------------------------------------------------------------------------------------- memory


def test_memory_metrics_reflect_packed_int8(x: torch.Tensor) -> None:
    model = _mlp()
    xin = torch.randn(8, 64)
    q = copy.deepcopy(model)
    quantize_(q, {"*": "int8_dynamic"})
    assert state_dict_bytes(q) < 0.4 * state_dict_bytes(model)
    assert parameter_bytes(q) == 0  # every weight moved into packed params
    act = peak_activation_bytes(model, xin)
    # the largest live pair is the (8, 512) input and output of a hidden layer
    assert act.peak_bytes >= 8 * 512 * 4
    hooks = peak_activation_bytes(model, xin, method="hooks")
    assert hooks.method == "hooks" and hooks.peak_bytes == 2 * 8 * 512 * 4
    rep = memory_report(model, xin)
    assert rep.total_mb > rep.weights_bytes / 2**20


# ----------------------------------------------------------------------------------- command pipeline


def _loaded(model: nn.Module, shape: tuple[int, ...]):
    from prunepilot.sources.models import LoadedModel

    return LoadedModel(model, torch.randn(*shape), "py:tests:mlp", "tiny test model")


@pytest.mark.parametrize("layers", ["all", "auto", "^0$"])
def test_run_quantize_writes_result_report_and_artefact(tmp_path, layers: str) -> None:
    import json

    from prunepilot.jobs.quantize import run_quantize

    res = run_quantize(_loaded(_mlp(), (4, 64)), out=tmp_path, layers=layers, rounds=2)
    assert res["kind"] == "quantize" and res["backend"] == "eager"
    for key in ("size_mb", "latency_ms", "memory_mb"):
        assert res["dense"][key] > 0 and res["compressed"][key] > 0
    assert res["compressed"]["size_mb"] < res["dense"]["size_mb"]
    rep = json.loads((tmp_path / "quantization.json").read_text())
    assert rep["n_quantized"] >= 1 and all(s["reason"] for s in rep["skipped"])
    if layers == "^0$":
        assert [q["name"] for q in rep["quantized"]] == ["0"]
    assert not (tmp_path / "model.pt").exists()  # no pickle by default: float weights + the int8 recipe
    record = json.loads((tmp_path / "structure.json").read_text())
    assert sorted(record["quantization"]["layers"]) == sorted(q["name"] for q in rep["quantized"])
    from safetensors.torch import load_file

    assert all(v.dtype == torch.float32 for v in load_file(str(tmp_path / "model.safetensors")).values())
    assert (tmp_path / "summary.md").read_text().startswith("# prunepilot quantize")
    assert json.loads((tmp_path / "result.json").read_text())["input_shape"] == [4, 64]


def test_run_quantize_rejects_bad_options(tmp_path) -> None:
    from prunepilot.jobs.quantize import run_quantize

    with pytest.raises(PlanError, match="backend is eager, torchao or onnx"):
        run_quantize(_loaded(_mlp(), (4, 64)), out=tmp_path, backend="tflite")
    with pytest.raises(PlanError, match="must match at least one weight layer"):
        run_quantize(_loaded(_mlp(), (4, 64)), out=tmp_path, layers="^nothing_matches_this$")
    with pytest.raises(PlanError, match="no layer was quantized"):  # weight-only needs torchao
        run_quantize(_loaded(_mlp(), (4, 64)), out=tmp_path, layers="all", scheme="int8_weight_only")
    with pytest.raises(PlanError, match="--compile applies to the torchao backend"):
        run_quantize(_loaded(_mlp(), (4, 64)), out=tmp_path, compile_=True)


def test_layer_rows_reuse_external_times(tiny: nn.Module) -> None:
    rows = layer_rows(tiny, times_ms={"fc1": 3.0, "fc2": 1.0})
    by = {r["name"]: r for r in rows}
    assert by["fc1"]["latency_share"] == pytest.approx(0.75) and by["head"]["latency_ms"] == 0.0
    with pytest.raises(PlanError, match="example input"):
        layer_rows(tiny)


def test_why_not_explains_unselected_layers(tiny: nn.Module) -> None:
    rep = quantize_(copy.deepcopy(tiny), {"fc1": "int8_dynamic"}, measure_size=False,
                    why_not={"fc2": "coverage 95% already reached"})
    reasons = {d.name: d.reason for d in rep.skipped}
    assert reasons["fc2"] == "not selected: coverage 95% already reached"
    assert reasons["head"] == "not selected by the plan"


def test_run_quantize_takes_the_plan_quantize_map(tmp_path) -> None:
    import json

    from prunepilot.jobs.quantize import run_quantize
    from prunepilot.plan import Plan

    plan_path = tmp_path / "plan.json"
    plan_path.write_text(Plan(quantize={"re:^[02]$": "int8_dynamic"}).model_dump_json())
    run_quantize(_loaded(_mlp(), (4, 64)), out=tmp_path / "run", plan_file=plan_path, rounds=1)
    rep = json.loads((tmp_path / "run" / "quantization.json").read_text())
    assert sorted(q["name"] for q in rep["quantized"]) == ["0", "2"]
    plan_path.write_text(Plan().model_dump_json())
    with pytest.raises(PlanError, match="empty 'quantize' map"):
        run_quantize(_loaded(_mlp(), (4, 64)), out=tmp_path / "run2", plan_file=plan_path, rounds=1)


def test_quantize_python_entry_point_on_a_tiny_model(tmp_path, monkeypatch) -> None:
    import json

    from tiny_models import make

    from prunepilot.errors import PrunepilotError
    from prunepilot.jobs.quantize import fresh_run_dir, quantize, run_quantize

    pytest.importorskip("timm")
    model, x = make("vit")  # timm ViT: qkv / proj / mlp Linears to quantize
    res = quantize(model, x, out=tmp_path / "q", layers="all", rounds=2)
    assert res["kind"] == "quantize" and res["model"] == "python:VisionTransformer"
    assert res["out"] == str(tmp_path / "q")
    assert res["compressed"]["size_mb"] < res["dense"]["size_mb"] and res["size_reduction"] > 0
    assert res["quantization"]["n_quantized"] >= 1
    written = json.loads((tmp_path / "q" / "result.json").read_text())
    assert written["compressed"]["size_mb"] == pytest.approx(res["compressed"]["size_mb"])
    assert written["input_shape"] == list(x.shape) and (tmp_path / "q" / "model.safetensors").exists()
    assert not (tmp_path / "q" / "model.pt").exists()
    # options the job cannot honour are refused, not ignored
    with pytest.raises(PrunepilotError, match="cannot select layers"):
        quantize(model, x, out=tmp_path / "o", backend="onnx", layers="auto")
    with pytest.raises(PrunepilotError, match="unknown quantize option"):
        quantize(model, x, out=tmp_path / "u", warmup=3)
    with pytest.raises(PrunepilotError, match="LoadedModel"):
        run_quantize(model, out=tmp_path / "m")
    # out=None: a fresh runs/quantize-<timestamp> folder under the current directory, never reused
    monkeypatch.chdir(tmp_path)
    a, b = fresh_run_dir(), fresh_run_dir()
    assert a != b and a.parent == b.parent == tmp_path / "runs" and a.name.startswith("quantize-")


def test_quantized_artefact_reloads_without_a_pickle(tmp_path) -> None:
    """A model source + float weights + the recipe rebuild the same int8 model (load_pruned quantizes again)."""
    from prunepilot.engines.artifact import load_pruned
    from prunepilot.engines.quantize import quantized_layer_names
    from prunepilot.jobs.quantize import run_quantize
    from prunepilot.sources.models import load_model

    from tiny_models import make

    model, x = make("vit")
    sd = tmp_path / "sd.pt"
    torch.save(model.state_dict(), sd)
    loaded = load_model("py:tiny_models:tiny_vit", input_shape=tuple(x.shape), state_dict=sd)
    res, qmodel = run_quantize(loaded, out=tmp_path / "q", layers="all", rounds=2, return_model=True)
    back = load_pruned(tmp_path / "q").module
    assert quantized_layer_names(back) == quantized_layer_names(qmodel) != []
    with torch.no_grad():
        assert torch.allclose(back(x), qmodel(x), atol=1e-5)
    run_quantize(loaded, out=tmp_path / "p", layers="all", rounds=2, pickle_module=True)
    assert (tmp_path / "p" / "model.pt").exists()  # the pickle only on request


def test_a_slower_quantized_model_is_said_so_with_the_likely_reason():
    from prunepilot.evaluate.speed import LatencyStats
    from prunepilot.jobs.quantize import slowdown_note

    steady = [LatencyStats(median_ms=10.0, p90_ms=11.0, runs=10, threads=1)] * 2
    assert slowdown_note(1.3, steady, 0.5) is None and slowdown_note(0.98, steady, 0.5) is None
    note = slowdown_note(0.8, steady, 0.53)
    assert "0.80x" in note and "slower" in note and "53%" in note and "noise" not in note and "quiet" not in note
    noisy = [LatencyStats(median_ms=10.0, p90_ms=30.0, runs=10, threads=1), steady[0]]
    assert "quiet machine" in slowdown_note(0.8, noisy, 0.53)


def test_run_quantize_refuses_a_folder_holding_another_run(tmp_path) -> None:
    """One run per folder, as for prune/compress/sparsify: a second quantize (or a quantize into a prune run's
    folder) would silently replace its model and result.json."""
    from prunepilot.errors import PrunepilotError
    from prunepilot.jobs.quantize import run_quantize

    run_quantize(_loaded(_mlp(), (4, 64)), out=tmp_path / "q", layers="all", rounds=1)
    before = (tmp_path / "q" / "result.json").read_text()
    with pytest.raises(PrunepilotError, match="already holds a run"):
        run_quantize(_loaded(_mlp(), (4, 64)), out=tmp_path / "q", layers="all", rounds=1)
    assert (tmp_path / "q" / "result.json").read_text() == before
    run_quantize(_loaded(_mlp(), (4, 64)), out=tmp_path / "q", layers="all", rounds=1, overwrite=True)
