"""Groups torch-pruning builds wrong (channels coupled through an operation it cannot follow) are found at
analysis, protected with the reason, and the rest of the model pruned in band: no verification failure, no
bisection (each trial rebuilds the graph; on a large model that was a hang)."""

from __future__ import annotations

import pytest
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


class ChannelAttention(nn.Module):
    """XCiT/EdgeNeXt cross-covariance attention: heads split the input width (C // heads), attention over channels."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 4, 1).unbind(0)
        q, k = nn.functional.normalize(q, dim=-1), nn.functional.normalize(k, dim=-1)
        attn = ((q @ k.transpose(-2, -1)) * self.temperature).softmax(-1)
        return self.proj((attn @ v).permute(0, 3, 1, 2).reshape(b, n, c))


class KVAttention(nn.Module):
    """GCViT-style global-query attention: qkv holds only k and v (2 x dim), fixed head sizes."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 2 * dim)
        self.q = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        k, v = self.qkv(x).reshape(b, n, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q = self.q(x).reshape(b, n, self.num_heads, self.head_dim).permute(0, 2, 1, 3)
        attn = (q @ k.transpose(-2, -1) * self.head_dim ** -0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class AttnBlock(nn.Module):
    def __init__(self, attn: nn.Module, dim: int) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(dim), attn, nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)  # two families (fc1.*, fc2.*)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class TinyTransformer(nn.Module):
    def __init__(self, attn_cls, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 8, stride=8)
        self.blocks = nn.Sequential(AttnBlock(attn_cls(dim, heads), dim), AttnBlock(attn_cls(dim, heads), dim))
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        return self.head(self.blocks(x).mean(1))


@pytest.mark.parametrize("attn_cls,reason", [(ChannelAttention, "heads stay whole"), (KVAttention, "not 3 x its")])
def test_attention_layouts_it_cannot_prune_by_heads_keep_them_whole(attn_cls, reason, monkeypatch):
    import prunepilot.structure as structure

    monkeypatch.setattr(structure, "RUNAWAY_REPEATS", 10 ** 9)  # the torn-group check itself (not the early stop)
    torch.manual_seed(0)
    pruner = _pruner(TinyTransformer(attn_cls), torch.randn(1, 3, 32, 32))
    assert any(reason in why for why in pruner.structure.ignored.values()), pruner.structure.ignored
    rb = Budget.parse(macs="60%").resolve(pruner.profile.dense)  # whole attention + stem: ~48% stays
    cand = pruner.candidate(Plan(), rb)
    assert rb.within("macs", cand.metrics["macs"]), (rb.error("macs", cand.metrics["macs"]), pruner.structure.ignored)
    with torch.no_grad():
        assert len(output_signature(call(cand.model, pruner.x))) == 1


@pytest.mark.slow
def test_group_whose_index_mappings_multiply_is_stopped_early_not_timed_out():
    """EfficientViT (MSRA)'s cascaded group attention: chunks added into the next head's input make some groups
    reach a layer with ever more channel sets; analysis stops them at once (was 10 s each, a minute in all)."""
    timm = pytest.importorskip("timm")
    from prunepilot.structure import analyse

    torch.manual_seed(0)
    model = timm.create_model("efficientvit_m0", pretrained=False).eval()
    st, _ = analyse(model, torch.randn(1, 3, 128, 128))
    reasons = list(st.ignored.values())
    assert any("does not close" in why for why in reasons)
    assert not any("took over" in why for why in reasons)  # no build ran into the time bound
    assert st.groups


class FixedSplit(nn.Module):
    """Res2Net / SelectiveKernel style: a conv's output split with sizes fixed in the forward (torch.split(x, c))."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.c = c
        self.stem = nn.Conv2d(3, 2 * c, 3, padding=1)
        self.b1, self.b2 = nn.Conv2d(c, 2 * c, 3, padding=1), nn.Conv2d(c, 2 * c, 3, padding=1)
        self.mix = nn.Conv2d(4 * c, 2 * c, 1)
        self.head = nn.Linear(2 * c, 10)

    def forward(self, x):
        x1, x2 = torch.split(torch.relu(self.stem(x)), self.c, 1)
        x = torch.relu(self.mix(torch.cat([torch.relu(self.b1(x1)), torch.relu(self.b2(x2))], 1)))
        return self.head(x.mean((2, 3)))


def test_fixed_size_channel_split_is_protected_at_analysis():
    torch.manual_seed(0)
    pruner = _pruner(FixedSplit(), torch.randn(1, 3, 32, 32))
    assert "torch.split(x, 16)" in pruner.structure.ignored.get("stem", ""), pruner.structure.ignored
    rb = Budget.parse(macs="50%").resolve(pruner.profile.dense)
    cand = pruner.candidate(Plan(), rb)
    assert pruner.isolation_trials == 0
    assert rb.within("macs", cand.metrics["macs"]), rb.error("macs", cand.metrics["macs"])


class LSTMMixer(nn.Module):
    """Sequencer-style: a bidirectional LSTM over tokens between channel MLPs (the LSTM's input width is pruned)."""

    def __init__(self, dim: int = 32, hidden: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 8, stride=8)
        self.rnn = nn.LSTM(dim, hidden, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(2 * hidden, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        x = x + self.fc(self.rnn(x)[0])
        x = x + self.fc2(torch.relu(self.fc1(x)))
        return self.head(x.mean(1))


def test_lstm_cost_follows_its_pruned_input_width():
    torch.manual_seed(0)
    pruner = _pruner(LSTMMixer(), torch.randn(1, 3, 32, 32))
    assert pruner.structure.modules["rnn"].in_groups  # its input width is a group's
    rb = Budget.parse(macs="50%").resolve(pruner.profile.dense)
    cand = pruner.candidate(Plan(), rb)
    assert cand.corrections == 0
    for metric in ("macs", "params"):  # the analytic count is the counter's, exactly
        assert abs(cand.projection.predicted[metric] - cand.metrics[metric]) <= 1e-6 * cand.metrics[metric], metric
    assert rb.within("macs", cand.metrics["macs"]), rb.error("macs", cand.metrics["macs"])
