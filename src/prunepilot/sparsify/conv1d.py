"""GPT-2-family `Conv1D` layers (transformers.pytorch_utils): linear layers that store their weight transposed,
(in, out). Every engine here works on nn.Linear (out, in), so for the run each Conv1D is swapped for an
nn.Linear holding the same numbers, and swapped back before export and whenever the run ends, failed or not:
the user's model keeps its own module objects and parameter objects (an optimizer holding them stays valid),
now carrying the sparsified weights."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # no transformers: no Conv1D either
        return None
    return Conv1D


@dataclass
class Conv1DSwap:
    swapped: list[tuple[nn.Module, str, nn.Module, nn.Linear]] = field(default_factory=list)

    def swap(self, model: nn.Module) -> int:
        """Replace every Conv1D in `model` by an equivalent nn.Linear; returns how many were swapped."""
        conv1d = _conv1d_type()
        if conv1d is None:
            return 0
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if not isinstance(child, conv1d):
                    continue
                w = child.weight
                lin = nn.Linear(w.shape[0], w.shape[1], bias=child.bias is not None, device="meta")
                # the transposed copy is the linear's own (out, in) weight; the Conv1D's storage is released
                # meanwhile so the swap costs one layer's weight at a time, not a second model
                lin.weight = nn.Parameter(w.detach().T.contiguous(), requires_grad=w.requires_grad)
                if child.bias is not None:
                    lin.bias = nn.Parameter(child.bias.detach().clone(), requires_grad=child.bias.requires_grad)
                w.data = torch.empty(0, dtype=w.dtype, device=w.device)
                setattr(parent, name, lin)
                self.swapped.append((parent, name, child, lin))
        return len(self.swapped)

    def restore(self) -> None:
        """Put the original Conv1D modules back, carrying the linears' (sparsified) weights. Idempotent."""
        while self.swapped:
            parent, name, conv, lin = self.swapped.pop()
            conv.weight.data = lin.weight.detach().T.contiguous()
            if conv.bias is not None and lin.bias is not None:
                conv.bias.data = lin.bias.detach()
            setattr(parent, name, conv)
