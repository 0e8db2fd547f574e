"""Exactness of the sparsity engines (magnitude, Wanda, SparseGPT; unstructured and N:M), projection, and how
a Plan resolves to per-layer sparsity (precedence, unknown names, structured-only fields rejected)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from prunepilot.engines import sparsity as sp
from prunepilot.errors import BudgetError, PlanError
from prunepilot.plan import Plan
from prunepilot.sparsify.calibrate import LinearInfo
from prunepilot.sparsify.plan import (
    MAX_RATIO,
    STRUCTURED_ONLY,
    project,
    resolve,
    validate_keys,
)


def _toy(seed: int = 0, out: int = 24, inp: int = 32, tokens: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    mix = torch.randn(inp, inp, generator=g) * 0.5 + torch.eye(inp)  # correlated inputs: OBS can exploit them
    x = torch.randn(tokens, inp, generator=g) @ mix * torch.linspace(0.2, 3.0, inp)
    return w, x


@pytest.mark.parametrize("s", [0.0, 0.3, 0.5, 0.77])
def test_unstructured_counts_are_exact(s: float) -> None:
    w, x = _toy()
    k = sp.count_pruned(w.numel(), s)
    assert int((~sp.magnitude_mask(w, s)).sum()) == k
    wm = sp.wanda_mask(w, x.pow(2).sum(0), s)
    assert int((~wm).sum()) == k
    per_row = (~wm).sum(1)
    assert int(per_row.max() - per_row.min()) <= 1  # Wanda compares within rows, spread evenly
    new, mask = sp.sparsegpt_prune(w, x.T @ x, s, blocksize=8)
    assert int((~mask).sum()) == k and int((new == 0).sum()) >= k


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_pattern_holds_for_every_method(pattern: str) -> None:
    nm = sp.parse_nm(pattern)
    assert nm is not None and nm.sparsity == 0.5
    w, x = _toy()
    for mask in (sp.magnitude_mask(w, 0, nm), sp.wanda_mask(w, x.pow(2).sum(0), 0, nm)):
        assert sp.is_nm(w * mask, nm) and sp.sparsity_of(w * mask) == 0.5
    new, _ = sp.sparsegpt_prune(w, x.T @ x, 0, nm, blocksize=16)
    assert sp.is_nm(new, nm) and sp.sparsity_of(new) == 0.5


def test_nm_rejects_bad_patterns() -> None:
    assert sp.parse_nm("50%") is None
    with pytest.raises(PlanError, match="fix:"):
        sp.parse_nm("4:2")
    with pytest.raises(PlanError):
        sp.nm_mask(torch.randn(4, 6), sp.NM(2, 4))


def test_sparsegpt_beats_wanda_and_magnitude_on_reconstruction() -> None:
    w, x = _toy(seed=1)
    ref = x @ w.T  # [tokens, out]
    err = lambda wp: float((x @ wp.T - ref).pow(2).sum() / ref.pow(2).sum())
    s = 0.5
    e_mag = err(w * sp.magnitude_mask(w, s))
    e_wanda = err(w * sp.wanda_mask(w, x.pow(2).sum(0), s))
    new, _ = sp.sparsegpt_prune(w, x.T @ x, s)  # one block (32 columns): masks adapt to the updates
    e_sgpt = err(new)
    assert e_sgpt < e_wanda < e_mag


def test_exact_counts_sum_to_target() -> None:
    sizes = [1000, 333, 4096, 7]
    counts = sp.exact_counts(sizes, [0.5, 0.4, 0.61, 0.9], 0.55)
    assert sum(counts) == round(0.55 * sum(sizes))
    assert all(0 <= c <= s for c, s in zip(counts, sizes))


def _infos() -> list[LinearInfo]:
    return [LinearInfo(f"m.layers.{b}.{k}", b, k, o, i) for b in range(3)
            for k, o, i in (("attn.q", 16, 16), ("mlp.up", 48, 16), ("mlp.down", 16, 48))]


def _groups(infos: list[LinearInfo]) -> dict[str, list[str]]:
    return {"mlp.up@0-2": [i.name for i in infos if i.kind == "mlp.up"]}


@pytest.mark.parametrize("level", [0.1, 0.5, 0.733])
def test_projection_hits_exact_global_sparsity_and_respects_floors(level: float) -> None:
    infos = _infos()
    total = sum(i.params for i in infos)
    floor = {i.name: 0.1 if "up" in i.kind else 0.0 for i in infos}
    desired = {i.name: (0.9 if "down" in i.kind else 0.2) for i in infos}
    counts = project(desired, infos, level, floor=floor)
    assert sum(counts.values()) == round(level * total)
    for i in infos:
        assert counts[i.name] >= round(floor[i.name] * i.params)
        assert counts[i.name] <= round(0.95 * i.params) + 1
    # the shape survives: down layers stay sparser than q layers
    assert counts["m.layers.0.mlp.down"] / 768 > counts["m.layers.0.attn.q"] / 256


def test_projection_refuses_unreachable_level() -> None:
    infos = _infos()
    with pytest.raises(BudgetError, match="floors"):
        project({}, infos, 0.05, floor={i.name: 0.5 for i in infos})


def test_plan_resolution_precedence_and_unknown_names() -> None:
    infos = _infos()
    groups = _groups(infos)
    plan = Plan(ratios={"mlp.up@0-2": 0.7, "re:layers\\.2\\.": 0.3, "m.layers.2.mlp.up": 0.99}, default_ratio=0.5)
    r = resolve(plan, infos, groups, {})
    assert r["m.layers.0.mlp.up"] == 0.7 and r["m.layers.2.attn.q"] == 0.3
    assert r["m.layers.2.mlp.up"] == MAX_RATIO == 0.95  # exact name wins, clamped to the sparsity ceiling
    assert r["m.layers.0.attn.q"] == 0.5
    bad = Plan(ratios={"nonsense": 0.5, "re:nowhere\\.": 0.1, "mlp.up@0-2": 0.2})
    assert validate_keys(bad, infos, groups) == ["nonsense", "re:nowhere\\."]
    with pytest.raises(PlanError, match="groups"):
        resolve(bad, infos, groups, {})
    # a broken regex never gets as far as resolve: the Plan itself refuses it (and validate_keys would too)
    with pytest.raises(ValidationError, match="regular expression"):
        Plan(ratios={"re:(": 0.1})
    assert validate_keys(Plan.model_construct(ratios={"re:(": 0.1}), infos, groups) == ["re:("]


def test_default_ratio_counts_only_when_set_explicitly() -> None:
    infos = _infos()
    groups = _groups(infos)
    fallback = {i.name: 0.25 for i in infos}
    implicit = resolve(Plan(ratios={"mlp.up@0-2": 0.7}), infos, groups, fallback)  # Plan's 0.3 default: no opinion
    assert implicit["m.layers.0.mlp.up"] == 0.7 and implicit["m.layers.0.attn.q"] == 0.25
    explicit = resolve(Plan(ratios={"mlp.up@0-2": 0.7}, default_ratio=0.3), infos, groups, fallback)
    assert explicit["m.layers.0.attn.q"] == 0.3
    explicit_none = resolve(Plan(ratios={"mlp.up@0-2": 0.7}, default_ratio=None), infos, groups, fallback)
    assert explicit_none["m.layers.1.mlp.down"] == 0.25  # None = keep the current (fallback) allocation
    assert resolve(Plan(default_ratio=1.0), infos, groups, {})["m.layers.0.attn.q"] == MAX_RATIO


STRUCTURED = [("importance", "taylor"), ("round_to", 8), ("protected", ["mlp.up@0-2"]), ("prune_heads", True),
              ("quantize", {"m.layers.0.attn.q": "int8_dynamic"}), ("importance", "l2")]  # the default, set: still no


@pytest.mark.parametrize("field,value", STRUCTURED, ids=[f"{f}={v}" for f, v in STRUCTURED])
def test_resolve_rejects_structured_only_fields(field: str, value: object) -> None:
    infos = _infos()
    plan = Plan(ratios={"mlp.up@0-2": 0.6}, default_ratio=0.5, **{field: value})
    with pytest.raises(PlanError, match="only structured pruning") as err:
        resolve(plan, infos, _groups(infos), {})
    assert field in str(err.value)
    # the same plan from JSON (an LLM's or a file's) is refused the same way
    with pytest.raises(PlanError, match="only structured pruning"):
        resolve(Plan.model_validate_json(plan.model_dump_json(exclude_unset=True)), infos, _groups(infos), {})


def test_structured_only_list_covers_every_structured_field() -> None:
    sparsify_fields = {"version", "ratios", "default_ratio", "rationale", "reflection", "source", "params"}
    assert set(Plan.model_fields) - sparsify_fields == set(STRUCTURED_ONLY)


def test_sparsegpt_float32_factorisation_matches_float64_and_falls_back(monkeypatch) -> None:
    """Wide layers factorise H in float32 (memory); the result matches the float64 path, and a float32
    factorisation that fails is redone in float64 instead of failing the layer."""
    from prunepilot.engines import sparsity as sp

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g)
    x = torch.randn(512, 96, generator=g) * torch.linspace(0.2, 3.0, 96)
    h = x.T @ x
    w64, m64 = sp.sparsegpt_prune(w, h, 0.5)
    monkeypatch.setattr(sp, "DOUBLE_MAX_COLS", 0)
    w32, m32 = sp.sparsegpt_prune(w, h, 0.5)
    assert (m32 == m64).float().mean() > 0.99
    err = lambda v: float(((x @ (v - w).T) ** 2).mean())  # noqa: E731 - output error on the calibration inputs
    assert err(w32) == pytest.approx(err(w64), rel=0.01)

    real = torch.linalg.cholesky
    calls: list[torch.dtype] = []

    def flaky(a, *args, **kw):
        calls.append(a.dtype)
        if a.dtype == torch.float32:
            raise torch.linalg.LinAlgError("not positive definite")
        return real(a, *args, **kw)

    monkeypatch.setattr(torch.linalg, "cholesky", flaky)
    w_fb, m_fb = sp.sparsegpt_prune(w, h, 0.5)
    assert calls[0] == torch.float32 and torch.float64 in calls and torch.equal(m_fb, m64)


def test_sparsegpt_inverse_factor_in_place_matches_reference() -> None:
    """The factor computed inside one copy of H equals the textbook chain of fresh tensors, and the caller's
    Hessian (shared by the layers that read the same input) is left as it was."""
    from prunepilot.engines import sparsity as sp

    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 80, generator=g, dtype=torch.float64)
    h = x.T @ x
    h[:, 5] = 0.0
    h[5, :] = 0.0  # a dead input column
    before = h.clone()
    dead = torch.diag(h) == 0
    ref = h.clone()
    ref[dead, dead] = 1.0
    ref.diagonal().add_(0.01 * torch.mean(torch.diag(ref)))
    ref = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(ref)), upper=True).float()
    got = sp._inverse_factor(h, dead, 0.01, torch.float64, torch.device("cpu"))
    assert torch.allclose(got, ref, rtol=1e-6, atol=1e-7)
    assert torch.equal(h, before)
