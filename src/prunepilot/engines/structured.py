"""Apply an allocation (kept channel units per group) with torch-pruning, then repair timm attention metadata."""

from __future__ import annotations

import warnings
import torch
from torch import nn

from ..allocation import Allocation
from ..blocks import skip_blocks
from ..errors import PlanError
from ..inputs import call, output_signature, primary_output, signature_mismatch, traced_outputs
from ..structure import (ROOT_TYPES, Structure, _is_timm_attention, attention_heads, clear_caches, detach_caches, glu_channel_groups,
                         hf_attention_heads, hf_projections, mha_channel_groups, regroup_tracing, tp_options)

__all__ = ["Allocation", "apply_allocation", "verify_runs"]


def _importance(name: str):
    import torch_pruning as tp

    if name == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if name == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    if name == "random":
        return tp.importance.RandomImportance()
    raise ValueError(name)


def _exact_ratio(kept: int, units: int) -> float:
    # torch-pruning keeps int(units * (1 - ratio)); aim half a unit above so float error can't drop one.
    return 1.0 - (kept + 0.5) / units


def repair_metadata(model: nn.Module) -> None:
    """Widths some architectures keep as plain ints next to their layers (torch-pruning only edits layers)."""
    fix_timm_attention(model)
    for m in model.modules():
        # Hugging Face self-attention: the head size follows the pruned query width (the logit scaling stays
        # the dense one, so kept head dims compute what they did)
        found = hf_projections(m)
        if found:
            heads, (q, _, _) = found
            for attr in ("attention_head_size", "head_dim"):
                if isinstance(getattr(m, attr, None), int):
                    setattr(m, attr, q.out_features // heads)
            if isinstance(getattr(m, "all_head_size", None), int):
                m.all_head_size = q.out_features
        # torchvision VisionTransformer reshapes its patch embedding with hidden_dim
        conv = getattr(m, "conv_proj", None)
        if isinstance(getattr(m, "hidden_dim", None), int) and isinstance(conv, nn.Conv2d):
            m.hidden_dim = conv.out_channels


def fix_timm_attention(model: nn.Module) -> None:
    """After pruning qkv, timm's forward reshapes with num_heads/head_dim/attn_dim: keep them consistent."""
    for m in model.modules():
        if _is_timm_attention(m):  # (other layouts keep their qkv whole: see structure._is_attention_variant)
            qkv_out = m.qkv.out_features
            heads = int(m.num_heads)
            if qkv_out % (3 * heads):
                raise RuntimeError(f"attention qkv width {qkv_out} is not divisible by 3 x {heads} heads")
            m.head_dim = qkv_out // (3 * heads)
            if hasattr(m, "attn_dim"):
                m.attn_dim = heads * m.head_dim
            if hasattr(m, "scale"):
                m.scale = m.head_dim ** -0.5


def apply_allocation(
    model: nn.Module,
    example_input: torch.Tensor,
    structure: Structure,
    allocation: Allocation,
    *,
    importance: str = "l2",
    calibration: list[tuple[torch.Tensor, torch.Tensor]] | tuple[torch.Tensor, torch.Tensor] | None = None,
) -> nn.Module:
    """Prune `model` in place so every group keeps exactly `allocation.kept[group]` units. importance="taylor"
    ranks channels by first-order Taylor scores from the gradients of `calibration` (labelled batches)."""
    import torch_pruning as tp

    modules = dict(model.named_modules())
    ratio_dict: dict[nn.Module, float] = {}
    head_ratio: dict[nn.Module, float] = {}
    for gname, kept in allocation.kept.items():
        g = structure.groups[gname]
        if kept < g.units:
            ratio_dict[modules[gname]] = _exact_ratio(kept, g.units)
    for gname, kept_heads in allocation.heads.items():
        g = structure.groups[gname]
        removed = g.num_heads - kept_heads
        if removed > 0:
            head_ratio[modules[gname]] = (removed - 0.5) / g.num_heads  # torch-pruning removes ceil(r * heads)
            # torch-pruning only visits a scope with a positive width ratio; with head-dim pruning off this
            # ratio selects the group without removing any head dims
            ratio_dict.setdefault(modules[gname], 0.5 / g.units)
    ignored: list = [modules[n] for n, why in structure.ignored.items() if n in modules and isinstance(modules[n], ROOT_TYPES)]
    params = dict(model.named_parameters())
    ignored += [params[n] for n in structure.tables if n in params]  # bias tables: torch-pruning must not cut rows
    imp_name = importance
    if importance == "taylor" and not calibration:
        raise PlanError("Taylor importance needs labelled calibration batches (gradients of the loss)", "importance=taylor",
                        "pass --data (the agent loop computes them), or use --importance l2")
    batches = [calibration] if isinstance(calibration, tuple) else list(calibration or [])
    heads = {**attention_heads(model), **hf_attention_heads(model)}
    mha = mha_channel_groups(model)
    detach_caches(model)
    with regroup_tracing() as (forward, regroup), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.BasePruner(
            model,
            example_input,
            forward_fn=forward,
            output_transform=traced_outputs,
            in_channel_groups=dict(mha),
            out_channel_groups={**glu_channel_groups(model), **{modules[n]: k for n, k in structure.paired.items() if n in modules},
                                **mha},
            **tp_options(model),
            importance=_importance(imp_name),
            pruning_ratio=0.0,
            pruning_ratio_dict=ratio_dict,
            ignored_layers=ignored,
            round_to=None,
            num_heads=heads,
            prune_num_heads=bool(head_ratio),
            prune_head_dims=not head_ratio,
            head_pruning_ratio_dict=head_ratio or None,
            global_pruning=False,
        )
        pruner.DG._prunepilot_regroup = regroup
        if imp_name == "taylor":
            was_training = model.training
            model.eval()  # gradients of the deployed function; BN statistics untouched
            model.zero_grad()
            for x, y in batches:  # gradients accumulate over the batches
                (nn.functional.cross_entropy(primary_output(call(model, x)), y) / len(batches)).backward()
            model.train(was_training)
        pruner.step()
    if heads:
        for qkv, h in pruner.num_heads.items():
            for m in model.modules():
                if getattr(m, "qkv", None) is qkv:
                    m.num_heads = h
                elif hf_projections(m) and hf_projections(m)[1][0] is qkv:
                    m.num_attention_heads = h
    repair_metadata(model)
    clear_caches(model)
    model.zero_grad(set_to_none=True)
    if allocation.skip:  # after the channel cut: the groups were found on the whole model
        missing = [b for b in allocation.skip if b not in modules]
        if missing:
            raise PlanError("the allocation skips blocks the model does not have", ", ".join(missing[:5]),
                            "use block names from `prunepilot profile` (its blocks list)")
        skip_blocks(model, allocation.skip)
    return model


class VerificationError(PlanError, RuntimeError):
    """A pruned model does not run, or its outputs lost the dense model's shapes."""


def verify_runs(model: nn.Module, example_input, expected_shape) -> object:
    """A pruned model must run and give finite outputs of the dense model's shapes. `expected_shape` is a
    torch.Size (one tensor output) or an `inputs.output_signature` of the dense outputs. Returns the output."""
    expected = [tuple(expected_shape)] if isinstance(expected_shape, torch.Size) else [tuple(e) for e in expected_shape]
    try:
        with torch.no_grad():
            out = call(model, example_input)
    except Exception as exc:  # noqa: BLE001 - any failure of the pruned forward is a verification failure
        raise VerificationError(f"the pruned model does not run: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from exc
    why = signature_mismatch(expected, output_signature(out))
    if why:
        raise VerificationError(f"pruned model output differs: {why}")
    from ..inputs import tensors

    if not all(torch.isfinite(t).all() for t in tensors(out) if t.is_floating_point()):
        raise VerificationError("pruned model produced non-finite outputs")
    return out
