"""Export a sparsified causal LM with save_pretrained and prove the reload is identical."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def save_and_verify(model: Any, tokenizer: Any, out: Path, probe: torch.Tensor) -> dict[str, Any]:
    """save_pretrained (safetensors) + tokenizer; reload and compare logits on `probe` ([n, T] ids)."""
    from transformers import AutoModelForCausalLM  # heavy; only when exporting

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=next(model.parameters()).dtype).eval()
    with torch.no_grad():
        a = model(input_ids=probe, use_cache=False).logits
        b = reloaded(input_ids=probe, use_cache=False).logits
    diff = float((a - b).abs().max())
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return {"path": str(out), "max_abs_logit_diff": diff, "identical": diff == 0.0, "size_mb": size / 2**20}


def sparse_size_mb(model: Any, names: list[str]) -> float:
    """Size if the pruned linears were stored as fp16 non-zeros + a 1-bit mask, the rest as float32."""
    mods = dict(model.named_modules())
    pruned = set(names)
    total = 0.0
    seen: set[int] = set()
    for n, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        mod = n.rsplit(".", 1)[0]
        if mod in pruned and n.endswith("weight"):
            total += int((p != 0).sum()) * 2 + p.numel() / 8
        else:
            total += p.numel() * p.element_size()
    del mods
    return total / 2**20
