"""Constructs the architecture zoo met, each in a tiny hand-built model (one parametrised table), pruned to 50%
MACs by the non-agent path: in band (every layer kept alive, outputs keep their shapes), or refused with the
expected reason. Plus a slice of real architectures at small sizes. The full zoo is bench/zoo.py."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from prunepilot.budget import Budget
from prunepilot.errors import BudgetError, PrunepilotError
from prunepilot.inputs import call, output_signature
from prunepilot.pipeline import Pruner, check_reachable, copy_model
from prunepilot.plan import Plan
from prunepilot.sources.models import LoadedModel


class PatchMerging(nn.Module):
    """timm Swin's 2x2 merge: reshape/permute lays four neighbours' channels out as [k * C + c]."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):  # x: B H W C
        b, h, w, c = x.shape
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


class Mlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class PatchMergingNet(nn.Module):
    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, c, 4, 4)
        self.stage1 = Mlp(c)
        self.merge = PatchMerging(c)
        self.stage2 = Mlp(2 * c)
        self.head = nn.Linear(2 * c, 10)

    def forward(self, x):
        x = self.embed(x).permute(0, 2, 3, 1)  # B H W C
        x = self.stage2(self.merge(self.stage1(x)))
        return self.head(x.mean((1, 2)))


def channel_shuffle(x, groups: int):
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous().view(b, c, h, w)


class ShuffleBlock(nn.Module):
    """ShuffleNetV2 unit: split channels, transform one half, concatenate, shuffle."""

    def __init__(self, c: int) -> None:
        super().__init__()
        h = c // 2
        self.branch = nn.Sequential(nn.Conv2d(h, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU(),
                                    nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h),
                                    nn.Conv2d(h, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU())

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([a, self.branch(b)], 1), 2)


class ShuffleNet(nn.Module):
    def __init__(self, c: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.blocks = nn.Sequential(ShuffleBlock(c), ShuffleBlock(c))
        self.conv5 = nn.Sequential(nn.Conv2d(c, 4 * c, 1, bias=False), nn.BatchNorm2d(4 * c), nn.ReLU())
        self.head = nn.Linear(4 * c, 10)

    def forward(self, x):
        return self.head(self.conv5(self.blocks(self.stem(x))).mean((2, 3)))


class SplitConcat(nn.Module):
    """Inception-style: branches of different widths concatenated, and a split feeding two convs."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 2 * c, 3, padding=1)
        self.b1 = nn.Sequential(nn.Conv2d(c, c, 1), nn.ReLU())
        self.b2 = nn.Sequential(nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU())
        self.mix = nn.Sequential(nn.Conv2d(3 * c, 2 * c, 1), nn.ReLU())
        self.head = nn.Linear(2 * c, 10)

    def forward(self, x):
        x1, x2 = torch.split(self.stem(x), [16, 16], dim=1)
        x = self.mix(torch.cat([self.b1(x1), self.b2(x2)], 1))
        return self.head(x.mean((2, 3)))


class BiasAttention(nn.Module):
    """LeViT-style attention: a learned bias table read by index, cached (a graph tensor) in eval mode."""

    def __init__(self, dim: int, heads: int, res: int) -> None:
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        pts = [(i, j) for i in range(res) for j in range(res)]
        offsets, idxs = {}, []
        for p1 in pts:
            for p2 in pts:
                off = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
                idxs.append(offsets.setdefault(off, len(offsets)))
        self.attention_biases = nn.Parameter(torch.randn(heads, len(offsets)) * 0.02)
        self.register_buffer("bias_idxs", torch.tensor(idxs).view(len(pts), len(pts)), persistent=False)
        self.attention_bias_cache: dict[str, torch.Tensor] = {}

    def biases(self):
        if self.training:
            return self.attention_biases[:, self.bias_idxs]
        key = str(self.attention_biases.device)
        if key not in self.attention_bias_cache:
            self.attention_bias_cache[key] = self.attention_biases[:, self.bias_idxs]
        return self.attention_bias_cache[key]

    def forward(self, x):  # B N C
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * self.hd ** -0.5 + self.biases()
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1))


class BiasNet(nn.Module):
    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 8, 8)
        self.attn = BiasAttention(dim, 4, 4)
        self.mlp = Mlp(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = self.mlp(x + self.attn(x))
        return self.head(x.mean(1))


class MHANet(nn.Module):
    """torchvision-ViT-style encoder on nn.MultiheadAttention, with class token and position embedding."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.hidden_dim = dim
        self.conv_proj = nn.Conv2d(3, dim, 8, 8)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.ln = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = Mlp(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        n = x.shape[0]
        x = self.conv_proj(x).reshape(n, self.hidden_dim, -1).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], 1) + self.pos_embedding
        y = self.ln(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return self.head(self.mlp(x)[:, 0])


class MultiOutput(nn.Module):
    """Two heads returned in a dict (segmentation-style main + auxiliary output)."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU())
        self.out = nn.Conv2d(2 * c, 5, 1)
        self.aux = nn.Conv2d(2 * c, 5, 1)

    def forward(self, x):
        f = self.body(x)
        return {"out": self.out(f), "aux": self.aux(f)}


class DictInput(nn.Module):
    """Keyword inputs (a Hugging Face style forward: pixel_values + a mask) and a ModelOutput-like dict."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU())
        self.classifier = nn.Linear(2 * c, 10)

    def forward(self, pixel_values, mask=None):
        f = self.conv(pixel_values)
        if mask is not None:
            f = f * mask
        return {"logits": self.classifier(f.mean((2, 3)))}


class ListInput(nn.Module):
    """Detection-style: a list of images in, a list of per-image dicts out (instance count data-dependent)."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU())
        self.box = nn.Conv2d(2 * c, 4, 1)
        self.score = nn.Conv2d(2 * c, 1, 1)

    def forward(self, images: list[torch.Tensor]):
        out = []
        for img in images:
            f = self.backbone(img[None])
            scores = self.score(f).flatten()
            keep = scores > scores.median()  # how many boxes survive depends on the weights
            out.append({"boxes": self.box(f).flatten(2)[0].T[keep], "scores": scores[keep]})
        return out


def _img(n: int = 32) -> torch.Tensor:
    return torch.randn(1, 3, n, n)


# (case, factory, example inputs, expected reason fragment in structure.ignored or None)
CASES = {
    "patch_merging": (PatchMergingNet, lambda: _img(), None),
    "channel_shuffle": (ShuffleNet, lambda: _img(), "channel shuffle"),
    "split_concat": (SplitConcat, lambda: _img(), None),
    "attention_bias_table": (BiasNet, lambda: _img(), "lookup table"),
    "multihead_attention": (MHANet, lambda: _img(), None),
    "multi_output_dict": (MultiOutput, lambda: _img(), "output layer"),
    "dict_inputs": (DictInput, lambda: {"pixel_values": _img(), "mask": torch.ones(1, 1, 32, 32)}, None),
    "list_of_images": (ListInput, lambda: ([torch.randn(3, 32, 32)],), "output layer"),
}


def _pruner(case: str) -> Pruner:
    factory, inputs, _ = CASES[case]
    torch.manual_seed(0)
    return Pruner(LoadedModel(factory().eval(), inputs(), f"py:{case}", case), latency_runs=0)


@pytest.mark.parametrize("case", list(CASES))
def test_construct_pruned_in_band(case):
    pruner = _pruner(case)
    reason = CASES[case][2]
    if reason:
        assert any(reason in why for why in pruner.structure.ignored.values()), pruner.structure.ignored
    rb = Budget.parse(macs="50%").resolve(pruner.profile.dense)
    cand = pruner.candidate(Plan(), rb)
    assert cand.projection.feasible, cand.projection.reason
    assert rb.within("macs", cand.metrics["macs"]), (rb.error("macs", cand.metrics["macs"]), pruner.structure.ignored)
    with torch.no_grad():  # verify_runs ran inside; the dense signature is kept
        out = call(cand.model, pruner.x)
    assert len(output_signature(out)) == len(pruner.out_signature)
    assert all(w > 0 for _, w in cand.projection.allocation.widths(pruner.structure).values())


def test_cached_graph_tensors_do_not_block_copies():
    model = BiasNet().eval()
    model(_img())  # eval forward with grad on: the bias cache now holds a non-leaf tensor
    assert any(t.grad_fn is not None for t in model.attn.attention_bias_cache.values())
    with pytest.raises(RuntimeError):
        copy.deepcopy(model)
    clone = copy_model(model)
    x = _img()
    assert torch.allclose(clone(x), model(x))


def test_group_that_breaks_the_model_is_protected_and_named():
    """A construct nothing flags statically: a module that reads its width from a stored int. Pruning its
    input breaks the forward; the pruner bisects to that family, protects it with the error, re-projects."""

    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 16, 3, padding=1)
            self.b = nn.Conv2d(16, 32, 3, padding=1)
            self.c = nn.Conv2d(32, 32, 3, padding=1)
            self.width = 16
            self.head = nn.Linear(32, 10)

        def forward(self, x):
            x = torch.relu(self.a(x))
            x = x * torch.ones(1, self.width, 1, 1)  # a fixed-width constant: breaks when a's width changes
            return self.head(torch.relu(self.c(torch.relu(self.b(x)))).mean((2, 3)))

    pruner = Pruner(LoadedModel(Fixed().eval(), _img(), "py:fixed", "fixed"), latency_runs=0)
    rb = Budget.parse(macs="60%", tolerance="+1%/-5%").resolve(pruner.profile.dense)
    cand = pruner.candidate(Plan(), rb)
    assert "a" in pruner.structure.ignored and "breaks the model" in pruner.structure.ignored["a"]
    assert rb.within("macs", cand.metrics["macs"])


def test_unreachable_budget_is_one_line_with_nearest_point():
    pruner = _pruner("channel_shuffle")
    rb = Budget.parse(macs="1%").resolve(pruner.profile.dense)
    with pytest.raises(BudgetError) as info:
        check_reachable(pruner, Plan(), rb)
    msg = str(info.value)
    assert "\n" not in msg and "unreachable" in msg and "% of dense" in msg


def test_nothing_prunable_is_refused_not_crashed():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4)).eval()
    pruner = Pruner(LoadedModel(model, torch.randn(1, 3, 2, 2), "py:one_layer", "one layer"), latency_runs=0)
    assert not pruner.structure.groups
    with pytest.raises(PrunepilotError):
        check_reachable(pruner, Plan(), Budget.parse(macs="50%").resolve(pruner.profile.dense))


# a representative slice of real architectures, small configurations (random weights, no download)
def _tv_vit():
    import torchvision

    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=48,
                                                mlp_dim=96, num_classes=10), _img()


def _tv_shufflenet():
    import torchvision

    return torchvision.models.shufflenet_v2_x0_5(num_classes=10), _img(64)


def _timm_levit_like():
    import timm

    return timm.create_model("efficientformerv2_s0", num_classes=10), _img(64)


def _hf(name):
    from prunepilot.sources.hf_models import build_hf_config

    return build_hf_config(name)


REAL = {
    "torchvision_vit_mha": _tv_vit,
    "torchvision_shufflenet": _tv_shufflenet,
    "hf_vit": lambda: _hf("vit:small"),
    "hf_bert": lambda: _hf("bert:small"),
}


@pytest.mark.parametrize("name", list(REAL))
def test_real_architecture_slice(name):
    model, x = REAL[name]()
    pruner = Pruner(LoadedModel(model.eval(), x, f"py:{name}", name), latency_runs=0)
    rb = Budget.parse(macs="50%").resolve(pruner.profile.dense)
    cand = pruner.candidate(Plan(round_to=8), rb)  # the CLI default rounding
    assert rb.within("macs", cand.metrics["macs"]), rb.error("macs", cand.metrics["macs"])
    assert not [why for why in pruner.structure.ignored.values() if "breaks the model" in why]
