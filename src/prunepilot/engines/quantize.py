"""Per-layer dynamic int8 post-training quantization (ProfilingAgent's second half).

One in-place verb, `quantize_(model, plan_map, backend=...)`, in the style of torchao's `quantize_`:
`plan_map` maps a layer name, a `re:` pattern or `*` to a scheme (`int8_dynamic`, `int8_weight_only`,
`none`), with the same keys as `Plan.quantize`. Precedence: exact name > first matching regex (in map
order) > `*`. Every weight layer of the model appears in the returned `QuantReport`, either as quantized
or as skipped with the reason (unsupported kind, scheme not offered by the backend, not selected...).

Backends:
- `eager`   — `torch.ao.quantization.quantize_dynamic` with a per-module qconfig dict (only the selected
              Linear modules). Deprecated upstream but still the fastest CPU path with plain eager PyTorch
              (fbgemm/onednn packed int8 GEMMs).
- `torchao` — torchao `quantize_` configs (Int8DynamicActivationInt8WeightConfig / Int8WeightOnlyConfig).
              Its tensor subclasses only pay off under `torch.compile`; in eager they are slower than fp32.

`select_layers_auto` picks layers from measured per-layer latency and size (a built-in ProfilingAgent-style
heuristic; the analyst can do the same from the profile), and `layer_rows` measures those rows.
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ..errors import PlanError, require

Scheme = Literal["none", "int8_dynamic", "int8_weight_only"]
Backend = Literal["eager", "torchao"]
SCHEMES: tuple[str, ...] = ("none", "int8_dynamic", "int8_weight_only")
BACKENDS: tuple[str, ...] = ("eager", "torchao")

# Weight-carrying leaf kinds the report accounts for; anything else (norms, activations) is not a layer
# a quantization plan talks about.
_WEIGHT_KINDS: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Embedding,
    nn.EmbeddingBag,
)


@dataclass(frozen=True)
class LayerDecision:
    """What happened to one weight layer."""

    name: str
    kind: str
    params: int
    scheme: str  # the scheme the plan asked for ("none" when not selected)
    quantized: bool
    reason: str  # why skipped, or how it was quantized
    matched_by: str | None = None  # the plan key that selected it


@dataclass
class QuantReport:
    """Every weight layer, quantized or skipped with its reason, plus sizes from real state_dict bytes."""

    backend: str
    layers: list[LayerDecision] = field(default_factory=list)
    size_before_bytes: int = 0
    size_after_bytes: int = 0
    seconds: float = 0.0

    @property
    def quantized(self) -> list[LayerDecision]:
        return [d for d in self.layers if d.quantized]

    @property
    def skipped(self) -> list[LayerDecision]:
        return [d for d in self.layers if not d.quantized]

    @property
    def quantized_params(self) -> int:
        return sum(d.params for d in self.quantized)

    def to_json(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "n_quantized": len(self.quantized),
            "n_skipped": len(self.skipped),
            "quantized_params": self.quantized_params,
            "total_weight_layer_params": sum(d.params for d in self.layers),
            "size_before_bytes": self.size_before_bytes,
            "size_after_bytes": self.size_after_bytes,
            "size_ratio": self.size_after_bytes / self.size_before_bytes if self.size_before_bytes else None,
            "seconds": round(self.seconds, 3),
            "quantized": [asdict(d) for d in self.quantized],
            "skipped": [asdict(d) for d in self.skipped],
        }

    def summary(self) -> str:
        mb = 1024 * 1024
        return (
            f"{self.backend}: {len(self.quantized)} layers quantized, {len(self.skipped)} skipped; "
            f"{self.size_before_bytes / mb:.1f} MB -> {self.size_after_bytes / mb:.1f} MB"
        )


# --------------------------------------------------------------------------------------------- plan map


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Leaf weight layers (Linear, Conv, Embedding), in module order."""
    return [(n, m) for n, m in model.named_modules() if n and isinstance(m, _WEIGHT_KINDS)]


def check_plan_map(plan_map: Mapping[str, str], names: Sequence[str]) -> None:
    """Reject unknown schemes, bad regexes and names the model does not have (never silently ignored)."""
    known = set(names)
    for key, scheme in plan_map.items():
        if scheme not in SCHEMES:
            raise PlanError("a quantize scheme must be one of " + ", ".join(SCHEMES), f"{key}: {scheme}", "fix the scheme")
        if key == "*":
            continue
        if key.startswith("re:"):
            try:
                pat = re.compile(key[3:])
            except re.error as exc:
                raise PlanError("a quantize key 're:...' must be a valid regular expression", key, str(exc)) from None
            if not any(pat.search(n) for n in names):
                raise PlanError(
                    "a quantize regex must match at least one weight layer",
                    key,
                    "list layer names with `prunepilot profile` (or model.named_modules())",
                )
        elif key not in known:
            close = [n for n in names if key.split(".")[-1] in n][:3]
            raise PlanError(
                "a quantize entry names a layer the model does not have",
                key,
                "use a layer name, a 're:' pattern or '*'" + (f" (did you mean {', '.join(close)}?)" if close else ""),
            )


def resolve_scheme(plan_map: Mapping[str, str], name: str) -> tuple[str, str | None]:
    """(scheme, matching key) for one layer: exact name > first matching regex > '*' > none."""
    if name in plan_map:
        return plan_map[name], name
    for key, scheme in plan_map.items():
        if key.startswith("re:") and re.search(key[3:], name):
            return scheme, key
    if "*" in plan_map:
        return plan_map["*"], "*"
    return "none", None


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters(recurse=False))


def _parents_using_weight_directly(model: nn.Module) -> dict[str, str]:
    """Layers whose parent reads `.weight` as a tensor (e.g. MultiheadAttention.out_proj): swapping them
    for a quantized module would break the parent's forward, so they must be skipped."""
    out: dict[str, str] = {}
    for pname, parent in model.named_modules():
        if isinstance(parent, nn.MultiheadAttention):
            out[f"{pname}.out_proj" if pname else "out_proj"] = type(parent).__name__
    return out


def _plan_decisions(
    model: nn.Module, plan_map: Mapping[str, str], backend: str, why_not: Mapping[str, str] | None = None
) -> tuple[list[LayerDecision], dict[str, list[str]]]:
    """Decide per layer without touching the model; returns decisions and {scheme: [selected names]}."""
    layers = weight_layers(model)
    check_plan_map(plan_map, [n for n, _ in layers])
    direct = _parents_using_weight_directly(model)
    decisions: list[LayerDecision] = []
    selected: dict[str, list[str]] = {}
    for name, mod in layers:
        scheme, key = resolve_scheme(plan_map, name)
        kind = type(mod).__name__
        n = _params(mod)

        def skip(reason: str) -> None:
            decisions.append(LayerDecision(name, kind, n, scheme, False, reason, key))

        if scheme == "none":
            if key is None:
                skip(f"not selected: {why_not[name]}" if why_not and name in why_not else "not selected by the plan")
            else:
                skip(f"plan says 'none' (via {key!r})")
        elif type(mod) is not nn.Linear and not isinstance(mod, nn.modules.linear.NonDynamicallyQuantizableLinear):
            skip(f"{kind} is not supported by dynamic int8 quantization on the {backend} backend (Linear only)")
        elif name in direct:
            skip(f"its parent {direct[name]} reads .weight directly; a quantized module would break its forward")
        elif backend == "eager" and scheme == "int8_weight_only":
            skip("int8_weight_only is not offered by the eager backend; use backend='torchao' or int8_dynamic")
        elif mod.weight.dtype != torch.float32:
            skip(f"weight dtype {mod.weight.dtype} (dynamic int8 expects float32 weights)")
        else:
            how = "eager quantize_dynamic (qint8 weights, dynamic per-tensor activations)" if backend == "eager" else (
                f"torchao {_TORCHAO_CONFIGS[scheme]}"
            )
            decisions.append(LayerDecision(name, kind, n, scheme, True, how, key))
            selected.setdefault(scheme, []).append(name)
    return decisions, selected


_TORCHAO_CONFIGS = {
    "int8_dynamic": "Int8DynamicActivationInt8WeightConfig",
    "int8_weight_only": "Int8WeightOnlyConfig",
}


# ----------------------------------------------------------------------------------------- the verb


def quantize_(
    model: nn.Module,
    plan_map: Mapping[str, str],
    *,
    backend: Backend = "eager",
    measure_size: bool = True,
    why_not: Mapping[str, str] | None = None,
) -> QuantReport:
    """Quantize the selected layers of `model` in place; returns the per-layer report.

    `model` should be in eval mode (dynamic quantization is post-training). The result is still a plain
    `nn.Module`: eager quantized layers are `torch.ao.nn.quantized.dynamic.Linear`, torchao layers keep
    `nn.Linear` with an int8 tensor-subclass weight. `why_not` (e.g. `AutoSelection.reasons`) explains
    layers the plan does not select, so the report says why each one stayed in float.
    """
    from ..evaluate.memory import state_dict_bytes

    if backend not in BACKENDS:
        raise PlanError("the quantization backend must be one of " + ", ".join(BACKENDS), backend,
                        "use --backend eager (fastest CPU path) or torchao (with torch.compile); ONNX via `prunepilot export`")
    t0 = time.perf_counter()
    decisions, selected = _plan_decisions(model, plan_map, backend, why_not)
    before = state_dict_bytes(model) if measure_size else 0
    if selected:
        if backend == "eager":
            _apply_eager(model, selected.get("int8_dynamic", []))
        else:
            _apply_torchao(model, selected)
    after = state_dict_bytes(model) if measure_size else 0
    return QuantReport(backend, decisions, before, after, time.perf_counter() - t0)


def _apply_eager(model: nn.Module, names: list[str]) -> None:
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    # A per-module qconfig dict keyed by name quantizes exactly these modules and nothing else.
    spec = {name: default_dynamic_qconfig for name in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation banner is noise for users of this path
        quantize_dynamic(model, qconfig_spec=spec, dtype=torch.qint8, inplace=True)


def _apply_torchao(model: nn.Module, selected: dict[str, list[str]]) -> None:
    quant = require("torchao.quantization", "quant", "the torchao quantization backend")
    for scheme, names in selected.items():
        config = getattr(quant, _TORCHAO_CONFIGS[scheme])()
        wanted = set(names)
        quant.quantize_(model, config, filter_fn=lambda m, fqn, wanted=wanted: fqn in wanted)


# ------------------------------------------------------------------------------------ auto selection


def layer_rows(
    model: nn.Module,
    example_input: torch.Tensor | None = None,
    *,
    runs: int = 3,
    clock: Callable[[], float] = time.perf_counter,
    times_ms: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Per weight layer: kind, params, weight bytes and measured forward time (hooks around each layer).

    The per-layer time is the mean per forward over `runs` passes after one warm-up; shares are relative to
    the sum over weight layers (what quantization can speed up), not to the whole forward. Pass `times_ms`
    (e.g. `prunepilot.profile.module_times(model, x)`) to reuse timings measured elsewhere.
    """
    layers = weight_layers(model)
    if times_ms is not None:
        return _rows(layers, {n: float(times_ms.get(n, 0.0)) for n, _ in layers})
    if example_input is None:
        raise PlanError("layer_rows needs an example input (or times_ms)", None, "pass the model's example input")
    times: dict[str, list[float]] = {n: [] for n, _ in layers}
    starts: dict[str, float] = {}
    handles = []
    for name, mod in layers:
        handles.append(mod.register_forward_pre_hook(lambda m, a, name=name: starts.__setitem__(name, clock())))
        handles.append(mod.register_forward_hook(lambda m, a, o, name=name: times[name].append(clock() - starts[name])))
    try:
        with torch.inference_mode():
            model(example_input)  # warm-up
            for ts in times.values():
                ts.clear()
            for _ in range(runs):
                model(example_input)
    finally:
        for h in handles:
            h.remove()
    # a layer called k times per forward appears k*runs times: time per forward = total / runs
    return _rows(layers, {n: sum(ts) / runs * 1000 for n, ts in times.items()})


def _rows(layers: list[tuple[str, nn.Module]], ms: Mapping[str, float]) -> list[dict[str, Any]]:
    rows = []
    for name, mod in layers:
        rows.append({
            "name": name,
            "kind": type(mod).__name__,
            "params": _params(mod),
            "weight_bytes": sum(p.numel() * p.element_size() for p in mod.parameters(recurse=False)),
            "latency_ms": ms[name],
        })
    total_t = sum(r["latency_ms"] for r in rows) or 1.0
    total_p = sum(r["params"] for r in rows) or 1
    for r in rows:
        r["latency_share"] = r["latency_ms"] / total_t
        r["params_share"] = r["params"] / total_p
    return rows


@dataclass(frozen=True)
class AutoSelection:
    """The plan map chosen by the heuristic and a one-line reason per considered layer."""

    plan_map: dict[str, str]
    reasons: dict[str, str]
    covered_latency_share: float
    covered_params_share: float


def select_layers_auto(
    profile_rows: Iterable[Mapping[str, Any]],
    *,
    scheme: Scheme = "int8_dynamic",
    coverage: float = 0.99,
    min_params: int = 16_384,
    kinds: Sequence[str] = ("Linear", "NonDynamicallyQuantizableLinear"),
    protect: Sequence[str] = (),
) -> AutoSelection:
    """Pick layers to quantize from measured latency share and size (ProfilingAgent-style heuristic).

    Rows need `name`, `kind`, `params` and ideally `latency_share` (else `params_share`/params are used).
    Layers are taken in decreasing latency share (ties: size) until `coverage` of the quantizable time is
    covered; layers smaller than `min_params` are left in fp32 (packing and per-call activation
    quantization cost more than the tiny GEMM saves), as are `protect`ed names / `re:` patterns.
    """
    rows = [dict(r) for r in profile_rows]
    if not 0 < coverage <= 1:
        raise PlanError("coverage must lie in (0, 1]", coverage, "e.g. 0.95")
    reasons: dict[str, str] = {}
    candidates = []
    for r in rows:
        name = r["name"]
        if r.get("kind") not in kinds:
            reasons[name] = f"{r.get('kind')} is not quantizable by dynamic int8"
        elif any(p == name or (p.startswith("re:") and re.search(p[3:], name)) for p in protect):
            reasons[name] = "protected"
        elif int(r.get("params", 0)) < min_params:
            reasons[name] = f"small ({r.get('params')} params < {min_params}): int8 overhead would outweigh the gain"
        else:
            candidates.append(r)
    key = "latency_share" if all("latency_share" in r for r in candidates) and candidates else None
    total = sum(float(r[key]) if key else float(r["params"]) for r in candidates) or 1.0
    candidates.sort(key=lambda r: (float(r[key]) if key else 0.0, float(r["params"])), reverse=True)
    plan_map: dict[str, str] = {}
    covered = 0.0
    for r in candidates:
        share = (float(r[key]) if key else float(r["params"])) / total
        if covered < coverage - 1e-12:
            plan_map[r["name"]] = scheme
            covered += share
            reasons[r["name"]] = f"selected: {share:.1%} of quantizable {'time' if key else 'params'}"
        else:
            reasons[r["name"]] = f"coverage {coverage:.0%} already reached ({share:.2%} share)"
    all_lat = sum(float(r.get("latency_share", 0.0)) for r in rows) or 1.0
    all_par = sum(int(r.get("params", 0)) for r in rows) or 1
    return AutoSelection(
        plan_map=plan_map,
        reasons=reasons,
        covered_latency_share=sum(float(r.get("latency_share", 0.0)) for r in rows if r["name"] in plan_map) / all_lat,
        covered_params_share=sum(int(r.get("params", 0)) for r in rows if r["name"] in plan_map) / all_par,
    )


def plan_map_from_layers_option(
    layers: str, model: nn.Module, example_input: torch.Tensor | None = None, *, scheme: Scheme = "int8_dynamic"
) -> tuple[dict[str, str], AutoSelection | None]:
    """CLI helper: `auto` (measured heuristic), `all` (every Linear) or a regex over layer names."""
    if layers == "all":
        return {"*": scheme}, None
    if layers == "auto":
        if example_input is None:
            raise PlanError("--layers auto needs an example input to measure per-layer latency", None,
                            "give the model's input shape or use --layers all")
        sel = select_layers_auto(layer_rows(model, example_input), scheme=scheme)
        return dict(sel.plan_map), sel
    pattern = layers[3:] if layers.startswith("re:") else layers
    return {f"re:{pattern}": scheme}, None


def quantized_layer_names(model: nn.Module) -> list[str]:
    """Names of eager dynamic-int8 layers in `model` (e.g. a model reloaded from a quantize run)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynLinear

    return [n for n, m in model.named_modules() if isinstance(m, DynLinear)]


def dequantize_(model: nn.Module) -> list[str]:
    """Replace eager dynamic-int8 Linears by float Linears holding the *dequantized* int8 weights, in place.

    The float model computes what the int8 one computes up to activation rounding, and unlike it can be
    exported to ONNX (where ORT int8 quantization can pack the weights again). Returns the replaced names.
    """
    names = quantized_layer_names(model)
    for name in names:
        q = model.get_submodule(name)
        w = q.weight().dequantize()  # (out, in) float32 on the int8 grid
        b = q.bias()
        lin = nn.Linear(q.in_features, q.out_features, bias=b is not None)
        with torch.no_grad():
            lin.weight.copy_(w)
            if b is not None:
                lin.bias.copy_(b)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, lin)
    return names
