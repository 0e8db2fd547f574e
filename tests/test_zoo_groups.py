"""Groups torch-pruning builds wrong (channels coupled through an operation it cannot follow) are found at
analysis, protected with the reason, and the rest of the model pruned in band: no verification failure, no
bisection (each trial rebuilds the graph; on a large model that was a hang)."""

from __future__ import annotations

import torch
from torch import nn

from prunepilot.budget import Budget
from prunepilot.inputs import call, output_signature
from prunepilot.pipeline import Pruner
from prunepilot.plan import Plan
from prunepilot.sources.models import LoadedModel


class MixerBlock(nn.Module):
    """MLP-mixer: a token-mixing MLP over the transposed [B, C, N] map, then a channel MLP."""

    def __init__(self, tokens: int, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.tok = nn.Sequential(nn.Linear(tokens, 2 * tokens), nn.GELU(), nn.Linear(2 * tokens, tokens))
        self.norm2 = nn.LayerNorm(dim)
        self.ch = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.tok(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.ch(self.norm2(x))


class TinyMixer(nn.Module):
    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 8, stride=8)  # 32x32 -> 16 tokens
        self.blocks = nn.Sequential(MixerBlock(16, dim), MixerBlock(16, dim))
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        return self.head(self.blocks(x).mean(1))


def _pruner(model: nn.Module, x) -> Pruner:
    torch.manual_seed(0)
    return Pruner(LoadedModel(model.eval(), x, "py:test", "test"), latency_runs=0)


def test_token_mixing_group_is_protected_and_channel_mlps_pruned_in_band():
    torch.manual_seed(0)
    pruner = _pruner(TinyMixer(), torch.randn(1, 3, 32, 32))
    reasons = list(pruner.structure.ignored.values())
    assert any("torch-pruning maps its channels" in why for why in reasons), pruner.structure.ignored
    assert any(n.endswith("ch.0") for n in pruner.structure.groups)  # the channel MLP hidden widths stay prunable
    rb = Budget.parse(macs="50%").resolve(pruner.profile.dense)
    cand = pruner.candidate(Plan(), rb)
    assert pruner.isolation_trials == 0  # nothing had to be found by prune-and-run bisection
    assert rb.within("macs", cand.metrics["macs"]), rb.error("macs", cand.metrics["macs"])
    with torch.no_grad():
        assert len(output_signature(call(cand.model, pruner.x))) == 1
