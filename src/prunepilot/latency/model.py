"""A latency model of one model on one device: measured per-op tables over kept widths, plus a calibrated rest.

Every channel-mixing op (Conv1d/2d, Linear, timm attention core) is timed alone, in context (its own input
size, batch, threads, dtype, device), on a grid of kept input x output widths at multiples of the alignment
step (HALP's latency lookup tables). A candidate's latency is the sum of its ops' interpolated table entries
plus the rest of the network (norms, activations, pools, adds: memory-bound work), which is calibrated from
two whole-model measurements (dense and a uniformly pruned copy) as a + b x (activation volume kept). The
difference between the table sum and the whole-model measurement is reported, not hidden.

Tables are cached on disk by device fingerprint and op signature, so a second run on the same machine measures
nothing it measured before.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..costmodel import _phi  # a dimension's kept fraction, as the cost model computes it
from ..evaluate.allocator import steady_allocator
from ..inputs import call
from ..structure import ModuleDims, Structure

GRID = (0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0)  # kept fractions measured per dimension (0.1: the deepest cut)


def device_fingerprint(device: torch.device, dtype: torch.dtype, threads: int) -> str:
    """What a latency table is valid for: CPU model / GPU name, torch version, threads, dtype, and on CPU the
    allocator the timings ran under (pinned glibc thresholds time a forward without page faults)."""
    alloc = ""
    if device.type == "cuda":
        hw = torch.cuda.get_device_name(device)
    else:
        hw = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    hw = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        a = steady_allocator()
        alloc = "|malloc pinned" if a["pinned"] else ""
    return f"{device.type}|{hw}|torch {torch.__version__}|threads {threads}|{str(dtype).removeprefix('torch.')}{alloc}"


def default_cache() -> Path:
    root = Path(os.environ.get("PRUNEPILOT_CACHE", Path.home() / ".cache" / "prunepilot"))
    return root / "latency"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_call(fn: Callable[[], Any], device: torch.device, *, warmup: int = 2, runs: int = 5) -> float:
    """Minimum wall time in ms over `runs` (the least disturbed run on a shared machine), after a warm-up."""
    steady_allocator()
    for _ in range(warmup):
        fn()
    _sync(device)
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, (time.perf_counter() - t0) * 1000)
    return best


def whole_model_ms(model: nn.Module, example_inputs: Any, device: torch.device, *, runs: int = 7) -> float:
    """A whole forward, timed like the tables (least disturbed of `runs`), so the two are comparable."""
    model.eval()
    return time_call(lambda: call(model, example_inputs), device, warmup=2, runs=runs)


@torch.inference_mode()
def paired_ms(a: nn.Module, b: nn.Module, example_inputs: Any, device: torch.device, *, pairs: int = 21,
              warmup: int = 2) -> tuple[float, float, float]:
    """(a ms, b ms, median of b/a over `pairs`): single forwards of the two interleaved (order alternated), so
    a host whose speed drifts between seconds slows both sides of each pair alike. Shared machines drift by tens
    of percent; a ratio of pairs is what a relative latency budget is judged on."""
    steady_allocator()
    a.eval()
    b.eval()
    for _ in range(warmup):
        call(a, example_inputs)
        call(b, example_inputs)
    _sync(device)

    def one(m: nn.Module) -> float:
        t0 = time.perf_counter()
        call(m, example_inputs)
        _sync(device)
        return (time.perf_counter() - t0) * 1000

    ta, tb = [], []
    for i in range(pairs):
        if i % 2:
            tb.append(one(b))
            ta.append(one(a))
        else:
            ta.append(one(a))
            tb.append(one(b))
    ratios = sorted(y / x for x, y in zip(ta, tb))
    return min(ta), min(tb), ratios[len(ratios) // 2]


@dataclass
class Op:
    """One timed op: how to build it at any kept (cin, cout), and which groups its widths are made of."""

    name: str
    kind: str  # conv | linear | attn
    signature: dict[str, Any]  # everything but the widths (kernel, stride, input size, batch, ...)
    dense_in: int
    dense_out: int
    dims: ModuleDims | None
    in_grid: list[int] = field(default_factory=list)
    out_grid: list[int] = field(default_factory=list)
    table: list[list[float]] = field(default_factory=list)  # [in][out] ms
    out_elems: int = 0  # output activation elements at dense width (for the rest's calibration)

    def key(self) -> str:
        return json.dumps({"kind": self.kind, **self.signature, "in": self.dense_in, "out": self.dense_out},
                          sort_keys=True)

    def build(self, cin: int, cout: int, device: torch.device, dtype: torch.dtype) -> Callable[[], Any]:
        s = self.signature
        if self.kind == "conv":
            groups = s["groups"]
            if s["depthwise"]:  # one width: its channels are its groups
                cin = cout = groups = max(1, cout)
            conv_t = nn.Conv2d if s["ndim"] == 2 else nn.Conv1d
            m = conv_t(cin, cout, s["kernel"], stride=s["stride"], padding=s["padding"], dilation=s["dilation"],
                       groups=groups, bias=s["bias"]).to(device=device, dtype=dtype).eval()
            x = torch.randn(s["batch"], cin, *s["spatial"], device=device, dtype=dtype)
            return lambda: m(x)
        if self.kind == "linear":
            m = nn.Linear(cin, cout, bias=s["bias"]).to(device=device, dtype=dtype).eval()
            x = torch.randn(*s["lead"], cin, device=device, dtype=dtype)
            return lambda: m(x)
        # attention core: softmax(q k^T / sqrt(d)) v at kept q/k/v width `cout` (heads fixed)
        heads = s["heads"]
        d = max(1, cout // heads)
        q = torch.randn(s["batch"], heads, s["tokens"], d, device=device, dtype=dtype)
        return lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q)

    def predict(self, frac: dict[str, float]) -> float:
        phi_in = _phi(self.dims.in_groups, self.dims.in_dim, frac) if self.dims else 1.0
        phi_out = _phi(self.dims.out_groups, self.dims.out_dim, frac) if self.dims else 1.0
        if self.kind == "attn":
            phi_in = 1.0
        return _bilinear(self.in_grid, self.out_grid, self.table, phi_in * self.dense_in, phi_out * self.dense_out)


def _interp1(grid: list[int], x: float) -> tuple[int, int, float]:
    if len(grid) == 1 or x <= grid[0]:
        return 0, 0, 0.0
    if x >= grid[-1]:
        return len(grid) - 1, len(grid) - 1, 0.0
    for i in range(len(grid) - 1):
        if grid[i] <= x <= grid[i + 1]:
            span = grid[i + 1] - grid[i]
            return i, i + 1, (x - grid[i]) / span if span else 0.0
    return len(grid) - 1, len(grid) - 1, 0.0


def _bilinear(gi: list[int], go: list[int], table: list[list[float]], x: float, y: float) -> float:
    i0, i1, ti = _interp1(gi, x)
    j0, j1, tj = _interp1(go, y)
    a = table[i0][j0] * (1 - tj) + table[i0][j1] * tj
    b = table[i1][j0] * (1 - tj) + table[i1][j1] * tj
    return a * (1 - ti) + b * ti


def _grid(dense: int, step: int, multiple: int = 1) -> list[int]:
    """Kept widths to measure: GRID fractions of `dense`, rounded to the alignment step (and to `multiple`)."""
    q = multiple
    if dense >= 4 * step:  # align to the step too, keeping the op's own multiple (grouped convs: its groups)
        both = _lcm(multiple, step)
        q = both if 2 * both <= dense else multiple
    widths = sorted({max(q, int(round(f * dense / q)) * q) for f in GRID} | {dense})
    return [w for w in widths if w <= dense]


def _multiple(groups: dict[str, int], multiple: dict[str, int]) -> int:
    """The channel multiple a dimension's widths land on: its groups' chosen alignment (1 when none)."""
    return max((multiple.get(g, 1) for g in groups), default=1)


def _lcm(a: int, b: int) -> int:
    return a * b // math.gcd(a, b)


def aligned_width(width: float, multiple: int, units: int) -> int:
    """`width` rounded to `multiple` (at least one multiple, at most `units`)."""
    if multiple <= 1 or units < 2 * multiple:
        return max(1, min(units, int(round(width))))
    return max(multiple, min(units, int(round(width / multiple)) * multiple))


def _rescale_to_now(ops: list[Op], tables: dict[str, tuple[list[int], list[int], list[list[float]]]],
                    device: torch.device, dtype: torch.dtype, runs: int, probes: int = 3, tolerance: float = 0.12) -> float:
    """Cached tables were timed on another day: re-time the heaviest ops at dense width now and, when the host
    runs faster or slower than then by more than `tolerance`, scale every table to now (the median ratio), so
    tables and the whole-model measurements the rest is calibrated from share one frame. Returns the factor."""
    heavy = sorted({o.key(): o for o in ops}.values(), key=lambda o: -o.predict({}))[:probes]
    ratios = sorted(time_call(o.build(o.dense_in, o.dense_out, device, dtype), device, runs=2 * runs) / then
                    for o, then in ((o, o.predict({})) for o in heavy) if then > 0)
    if not ratios:
        return 1.0
    factor = ratios[len(ratios) // 2]
    if abs(factor - 1) <= tolerance:
        return 1.0
    for gi, go, table in tables.values():
        for row in table:
            row[:] = [v * factor for v in row]
    return factor


def _monotone(rows: list[list[float]], remeasure: Callable[[int, int], float], spike: float = 1.5) -> list[list[float]]:
    """Latency does not fall as width grows: a point slower than a wider neighbour by `spike`x is measured once
    more (a busy machine's hiccup), then each row and column is made non-decreasing from the widest end."""
    t = [list(r) for r in rows]
    n, m = len(t), len(t[0]) if t else 0
    for i in range(n):
        for j in range(m):
            wider = [t[i][j + 1]] if j + 1 < m else []
            wider += [t[i + 1][j]] if i + 1 < n else []
            if wider and t[i][j] > spike * min(wider):
                t[i][j] = min(t[i][j], remeasure(i, j))
    for i in range(n):
        for j in range(m - 2, -1, -1):
            t[i][j] = min(t[i][j], t[i][j + 1])
    for j in range(m):
        for i in range(n - 2, -1, -1):
            t[i][j] = min(t[i][j], t[i + 1][j])
    return t


def capture_ops(model: nn.Module, example_inputs: Any, structure: Structure) -> list[Op]:
    """Every Conv/Linear (and timm attention core) the forward runs, with the shapes it runs at."""
    found: list[Op] = []
    hooks = []
    mods = dict(model.named_modules())

    def conv_hook(name: str):
        def hook(m: nn.Module, inp: tuple, out: Any) -> None:
            x = inp[0]
            depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
            sig = {"ndim": x.dim() - 2, "kernel": list(m.kernel_size), "stride": list(m.stride),
                   "padding": m.padding if isinstance(m.padding, str) else list(m.padding),
                   "dilation": list(m.dilation), "groups": int(m.groups), "depthwise": depthwise,
                   "bias": m.bias is not None, "batch": int(x.shape[0]), "spatial": list(x.shape[2:])}
            found.append(Op(name, "conv", sig, m.in_channels, m.out_channels, structure.modules.get(name),
                            out_elems=int(out.numel()) if isinstance(out, torch.Tensor) else 0))
        return hook

    def linear_hook(name: str):
        def hook(m: nn.Module, inp: tuple, out: Any) -> None:
            x = inp[0]
            sig = {"lead": list(x.shape[:-1]), "bias": m.bias is not None}
            found.append(Op(name, "linear", sig, m.in_features, m.out_features, structure.modules.get(name),
                            out_elems=int(out.numel()) if isinstance(out, torch.Tensor) else 0))
        return hook

    def attn_hook(name: str, qkv_name: str):
        def hook(m: nn.Module, inp: tuple, out: Any) -> None:
            x = inp[0]
            if not isinstance(x, torch.Tensor) or x.dim() != 3:
                return
            qkv = mods[qkv_name]
            width = qkv.out_features // 3
            dims = ModuleDims(name, "attention", {}, dict(structure.modules[qkv_name].out_groups)
                              if qkv_name in structure.modules else {}, 0, width)
            if dims.out_groups:  # q/k/v widths: the qkv group's channels, a third each
                dims.out_groups = {g: n // 3 for g, n in dims.out_groups.items()}
                dims.out_dim = width
            sig = {"batch": int(x.shape[0]), "tokens": int(x.shape[1]), "heads": int(getattr(m, "num_heads", 1))}
            found.append(Op(name, "attn", sig, width, width, dims))
        return hook

    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            hooks.append(m.register_forward_hook(conv_hook(name)))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook(name)))
        if name in structure.attention:
            hooks.append(m.register_forward_hook(attn_hook(name, structure.attention[name][0])))
    try:
        with torch.inference_mode():
            call(model, example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return found


@dataclass
class LatencyModel:
    ops: list[Op]
    dense_ms: float  # whole dense model, measured
    ops_dense_ms: float  # the tables' sum at dense widths
    rest_a: float  # rest of the network: rest_a + rest_b * kept activation fraction
    rest_b: float
    fingerprint: str
    seconds: float  # what building it cost (measurements), cache hits included
    measured_points: int
    cached_points: int
    calibration: dict[str, float] = field(default_factory=dict)
    alignment_check: dict[str, Any] = field(default_factory=dict)  # alignment.WholeModelCheck.to_json()
    device: str = "cpu"
    dtype: str = "float32"
    alignment: dict[str, Any] = field(default_factory=dict)  # family -> alignment.AlignmentChoice
    dense_elems: int = 0  # activation volume of the whole model (a view without skipped blocks keeps it)
    # per skippable block: measured latency with it skipped minus what the tables predict for that (ms); the
    # tables miss what skipping also removes (its norms', activations' and add's per-op overhead)
    block_adjust: dict[str, float] = field(default_factory=dict)
    # measures the latency with one block skipped (ms, the tables' frame), the first time a view skips it
    skip_probe: Callable[[str], float] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_group: dict[str, list[Op]] = {}
        for o in self.ops:
            if o.dims is not None:
                for g in {*o.dims.in_groups, *o.dims.out_groups}:
                    self._by_group.setdefault(g, []).append(o)
        self._elems = self.dense_elems or sum(o.out_elems for o in self.ops) or 1
        self._views: dict[tuple[str, ...], LatencyModel] = {}

    def without(self, skip: tuple[str, ...] | list[str]) -> "LatencyModel":
        """The model with the residual blocks `skip` replaced by the identity: their ops' tables drop out, the
        rest (norms, activations, adds) shrinks with the activation volume they produced, and each block's
        measured correction (`block_adjust`, probed on first use when `skip_probe` is set) is added."""
        key = tuple(sorted(skip))
        if not key:
            return self
        if key not in self._views:
            for b in key:
                if b not in self.block_adjust and self.skip_probe is not None:
                    # a skip never costs time: a probe above dense is the host's noise on a block too small to see
                    self.block_adjust[b] = min(self.skip_probe(b), self.dense_ms) - self._tables_without((b,)).predict({})
            view = self._tables_without(key)
            view.rest_a += sum(self.block_adjust.get(b, 0.0) for b in key)
            self._views[key] = view
        return self._views[key]

    def _tables_without(self, key: tuple[str, ...]) -> "LatencyModel":
        import dataclasses

        from ..blocks import inside

        return dataclasses.replace(self, ops=[o for o in self.ops if not inside(o.name, key)], dense_elems=self._elems,
                                   block_adjust={}, skip_probe=None)

    def group_delta(self, frac: dict[str, float], group: str, new_frac: float) -> float:
        """predict(frac with frac[group] = new_frac) - predict(frac), from the ops the group's width enters."""
        ops = self._by_group.get(group, [])
        old_ops = sum(o.predict(frac) for o in ops)
        old_act = sum(o.out_elems * _phi(o.dims.out_groups, o.dims.out_dim, frac) for o in ops if o.dims)
        saved = frac.get(group)
        frac[group] = new_frac
        try:
            new_ops = sum(o.predict(frac) for o in ops)
            new_act = sum(o.out_elems * _phi(o.dims.out_groups, o.dims.out_dim, frac) for o in ops if o.dims)
        finally:
            if saved is None:
                frac.pop(group, None)
            else:
                frac[group] = saved
        return new_ops - old_ops + self.rest_b * (new_act - old_act) / self._elems

    def activation_fraction(self, frac: dict[str, float]) -> float:
        total = self._elems
        kept = 0.0
        for o in self.ops:
            phi = _phi(o.dims.out_groups, o.dims.out_dim, frac) if o.dims else 1.0
            kept += o.out_elems * phi
        return kept / total

    def predict(self, frac: dict[str, float], head_frac: dict[str, float] | None = None) -> float:
        ops = sum(o.predict(frac) for o in self.ops)
        return ops + self.rest_a + self.rest_b * self.activation_fraction(frac)

    def to_json(self) -> dict[str, Any]:
        return {"dense_ms": self.dense_ms, "ops_dense_ms": self.ops_dense_ms, "rest_ms": self.dense_ms - self.ops_dense_ms,
                "rest_model": {"a": self.rest_a, "b": self.rest_b}, "fingerprint": self.fingerprint,
                "ops": len(self.ops), "tables": len({o.key() for o in self.ops}), "seconds": round(self.seconds, 2),
                "measured_points": self.measured_points, "cached_points": self.cached_points,
                "calibration": self.calibration, "alignment_check": self.alignment_check,
                **({"allocator": steady_allocator()} if self.device.startswith("cpu") else {}),
                **({"block_adjust_ms": {b: round(v, 4) for b, v in self.block_adjust.items()}} if self.block_adjust else {})}


class TableCache:
    """op signature -> {(cin, cout): ms}, one JSON file per device fingerprint."""

    def __init__(self, root: Path | None, fingerprint: str) -> None:
        self.path = None if root is None else root / (hashlib.sha256(fingerprint.encode()).hexdigest()[:16] + ".json")
        self.data: dict[str, dict[str, float]] = {}
        if self.path is not None and self.path.exists():
            try:
                self.data = json.loads(self.path.read_text()).get("tables", {})
            except (OSError, ValueError):
                self.data = {}
        self.fingerprint = fingerprint

    def get(self, key: str, cin: int, cout: int) -> float | None:
        return self.data.get(key, {}).get(f"{cin}x{cout}")

    def put(self, key: str, cin: int, cout: int, ms: float) -> None:
        self.data.setdefault(key, {})[f"{cin}x{cout}"] = ms

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "tables": self.data}))
        tmp.replace(self.path)


def build_latency_model(model: nn.Module, example_inputs: Any, structure: Structure, *, step: int = 8,
                        runs: int = 3, cache_dir: Path | None | bool = True, uniform_ratio: float = 0.5,
                        whole_runs: int = 7, prune_uniform: Callable[[float, dict[str, int]], nn.Module] | None = None,
                        align: bool = False, count_macs: Callable[[nn.Module], float] | None = None,
                        log: Callable[[str], None] | None = None) -> LatencyModel:
    """Measure (or read from the cache) every op's table, then calibrate the rest of the network.

    `prune_uniform(ratio, multiple)` returns the model with every group pruned by `ratio`, kept widths on
    `multiple[group]` (the caller's engine); without it
    the rest is taken as constant (rest_b = 0). `align`: choose each family's channel multiple by measurement
    first (latency.alignment) and measure the tables at widths on those multiples, the widths the projector
    will pick; with `count_macs` too, that choice is checked in the whole network against one multiple for every
    family (alignment.confirm_alignment) before the tables are measured."""
    t0 = time.perf_counter()
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None else torch.float32
    threads = torch.get_num_threads()
    fp = device_fingerprint(device, dtype, threads)
    cache = TableCache(default_cache() if cache_dir is True else (None if cache_dir is False else Path(cache_dir)), fp)
    ops = capture_ops(model, example_inputs, structure)
    counts = {"measured": 0, "cached": 0}

    def timed(op: Op, cin: int, cout: int) -> float:
        ms = cache.get(op.key(), cin, cout)
        if ms is None:
            ms = time_call(op.build(cin, cout, device, dtype), device, runs=runs)
            cache.put(op.key(), cin, cout, ms)
            counts["measured"] += 1
        else:
            counts["cached"] += 1
        return ms

    alignment: dict[str, Any] = {}
    whole_check = None
    if align:
        from .alignment import choose_alignment

        alignment = choose_alignment(ops, structure, device=device, dtype=dtype, runs=runs, timed=timed)
        if alignment and prune_uniform is not None and count_macs is not None:
            from .alignment import CHECK_RATIO, confirm_alignment

            alignment, whole_check = confirm_alignment(
                alignment, structure, lambda mult: prune_uniform(CHECK_RATIO, mult), count_macs,
                lambda small: paired_ms(model, small, example_inputs, device, pairs=3 * whole_runs)[2],
                count_macs(model))
            if log and whole_check.chosen != "per family":
                log(f"latency model: {whole_check.chosen} runs faster per MAC in the whole network than the "
                    f"per-family multiples; taken")
    multiple = {g: alignment[f].multiple for f, names in structure.families.items() if f in alignment for g in names}
    tables: dict[str, tuple[list[int], list[int], list[list[float]]]] = {}
    for op in ops:
        key = op.key()
        if key not in tables:
            mult = op.signature.get("groups", 1) if op.kind == "conv" and not op.signature.get("depthwise") else 1
            prunable_in = bool(op.dims and op.dims.in_groups) and op.kind != "attn" and not op.signature.get("depthwise")
            prunable_out = bool(op.dims and op.dims.out_groups)
            gi = _grid(op.dense_in, step, _lcm(mult, _multiple(op.dims.in_groups, multiple))) if prunable_in \
                else [op.dense_in]
            go = _grid(op.dense_out, step if op.kind != "attn" else max(step, op.signature["heads"]),
                       _lcm(mult, _multiple(op.dims.out_groups, multiple)) if op.kind != "attn"
                       else op.signature["heads"]) if prunable_out else [op.dense_out]
            try:
                rows = [[timed(op, cin, cout) for cout in go] for cin in gi]
            except (RuntimeError, ValueError) as exc:  # a width this op can't run at: time it dense only
                if log:
                    log(f"latency model: {op.name} timed at its dense width only ({type(exc).__name__}: {exc})")
                gi, go = [op.dense_in], [op.dense_out]
                rows = [[timed(op, op.dense_in, op.dense_out)]]
            tables[key] = (gi, go, _monotone(rows, lambda i, j: time_call(op.build(gi[i], go[j], device, dtype),
                                                                         device, runs=2 * runs)))
        op.in_grid, op.out_grid, op.table = tables[key]
    measured, cached = counts["measured"], counts["cached"]
    cache.save()
    drift = _rescale_to_now(ops, tables, device, dtype, runs) if cached else 1.0
    # the uniform copy is timed as a ratio to dense over interleaved pairs: a transient slowdown of the host
    # (seconds long on shared machines) slows both sides of a pair, not the calibration
    small = prune_uniform(uniform_ratio, multiple) if prune_uniform is not None else None
    dense_ms = min(whole_model_ms(model, example_inputs, device, runs=whole_runs) for _ in range(2))
    small_ratio = paired_ms(model, small, example_inputs, device, pairs=3 * whole_runs)[2] if small is not None else 1.0
    ops_dense = sum(o.predict({}) for o in ops)
    lm = LatencyModel(ops, dense_ms, ops_dense, dense_ms - ops_dense, 0.0, fp, 0.0, measured, cached,
                      device=str(device), dtype=str(dtype).removeprefix("torch."))
    calibration: dict[str, float] = {"dense_measured_ms": dense_ms, "dense_ops_sum_ms": ops_dense,
                                     "cached_tables_rescaled_by": drift}
    if small is not None:
        frac = {g: aligned_width(grp.units * (1 - uniform_ratio), multiple.get(g, 1), grp.units) / grp.units
                for g, grp in structure.groups.items()}
        small_ms = dense_ms * small_ratio
        act = lm.activation_fraction(frac)
        ops_small = sum(o.predict(frac) for o in ops)
        rest_dense, rest_small = dense_ms - ops_dense, small_ms - ops_small
        if act < 0.999:
            lm.rest_b = (rest_dense - rest_small) / (1 - act)
            lm.rest_a = rest_dense - lm.rest_b
        calibration.update({"uniform_ratio": uniform_ratio, "uniform_measured_ms": small_ms,
                            "uniform_ops_sum_ms": ops_small})
    lm.calibration = calibration
    lm.alignment = alignment
    lm.alignment_check = whole_check.to_json() if whole_check is not None else {}
    lm.seconds = time.perf_counter() - t0
    if log:
        log(f"latency model: {len(ops)} ops, {len(tables)} tables ({measured} points measured, {cached} cached) in "
            f"{lm.seconds:.1f} s; dense {dense_ms:.2f} ms measured, ops sum {ops_dense:.2f} ms")
    return lm
