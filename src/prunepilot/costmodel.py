"""Analytic MACs/params of a pruned model as a function of each group's kept fraction.

Counts mirror torch-pruning's `count_ops_and_params` (the counter the published MAC targets use, and one that
counts attention matmuls). Each counted module contributes its dense cost scaled by the kept fraction of its
input and output dimensions, which are compositions of group channels. Evaluating a candidate allocation then
costs microseconds instead of a prune-and-count; the projector still verifies the final plan with a real count.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .structure import Structure


@dataclass
class _Term:
    coef: float
    mode: str  # "bilinear" | "out" | "attn" | "const"
    in_comp: dict[str, int] = field(default_factory=dict)
    out_comp: dict[str, int] = field(default_factory=dict)
    in_dim: int = 1
    out_dim: int = 1
    attn: tuple[str, int, int, int, int, bool] | None = None  # (group, tokens, embed_in, qdim, heads, bias)
    module: str = ""  # the module whose cost this is (a skipped block drops its modules' terms)


def _phi(comp: dict[str, int], dim: int, frac: dict[str, float]) -> float:
    if not comp or dim <= 0:
        return 1.0
    fixed = dim - sum(comp.values())
    return (fixed + sum(n * frac.get(g, 1.0) for g, n in comp.items())) / dim


@dataclass
class CostModel:
    mac_terms: list[_Term]
    param_terms: list[_Term]
    dense_macs: float
    dense_params: float
    module_macs: dict[str, float] = field(default_factory=dict)  # dense MACs of each conv/linear (for diagnosis)

    def __post_init__(self) -> None:
        self._index: dict[str, dict[str, list[_Term]]] = {}
        self._views: dict[tuple[str, ...], CostModel] = {}

    def without(self, skip: tuple[str, ...] | list[str]) -> "CostModel":
        """The model with the residual blocks `skip` replaced by the identity: their modules cost nothing. The
        dense totals stay those of the whole model (budgets are fractions of it)."""
        from .blocks import inside

        key = tuple(sorted(skip))
        if not key:
            return self
        if key not in self._views:
            self._views[key] = CostModel([t for t in self.mac_terms if not inside(t.module, key)],
                                         [t for t in self.param_terms if not inside(t.module, key)],
                                         self.dense_macs, self.dense_params,
                                         {n: v for n, v in self.module_macs.items() if not inside(n, key)})
        return self._views[key]

    def macs(self, frac: dict[str, float], head_frac: dict[str, float] | None = None) -> float:
        return sum(self._eval(t, frac, head_frac or {}) for t in self.mac_terms)

    def terms_of(self, metric: str, group: str) -> list[_Term]:
        """The terms a group's width enters (so a one-group move is re-evaluated on those alone)."""
        if metric not in self._index:
            idx: dict[str, list[_Term]] = {}
            for t in self.mac_terms if metric == "macs" else self.param_terms:
                for g in {*t.in_comp, *t.out_comp, *((t.attn[0],) if t.attn else ())}:
                    idx.setdefault(g, []).append(t)
            self._index[metric] = idx
        return self._index[metric].get(group, [])

    def group_delta(self, metric: str, frac: dict[str, float], head_frac: dict[str, float], group: str,
                    new_frac: float, new_head: float | None = None) -> float:
        """metric(frac with frac[group] = new_frac) - metric(frac), from the group's own terms."""
        terms = self.terms_of(metric, group)
        old = sum(self._eval(t, frac, head_frac) for t in terms)
        saved, saved_h = frac.get(group), head_frac.get(group)
        frac[group] = new_frac
        if new_head is not None:
            head_frac[group] = new_head
        try:
            new = sum(self._eval(t, frac, head_frac) for t in terms)
        finally:
            _restore(frac, group, saved)
            if new_head is not None:
                _restore(head_frac, group, saved_h)
        return new - old

    def params(self, frac: dict[str, float], head_frac: dict[str, float] | None = None) -> float:
        return sum(self._eval(t, frac, head_frac or {}) for t in self.param_terms)

    @staticmethod
    def _eval(t: _Term, frac: dict[str, float], head_frac: dict[str, float]) -> float:
        if t.mode == "const":
            return t.coef
        if t.mode == "out":
            return t.coef * _phi(t.out_comp, t.out_dim, frac)
        if t.mode == "bilinear":
            return t.coef * _phi(t.in_comp, t.in_dim, frac) * _phi(t.out_comp, t.out_dim, frac)
        # timm attention, mirroring torch-pruning's counter: projections, QK^T, softmax, AV, output projection
        group, n, e0, q0, h0, bias = t.attn  # type: ignore[misc]
        e = e0 * _phi(t.in_comp, t.in_dim, frac)
        q = q0 * frac.get(group, 1.0)
        h = max(1.0, h0 * head_frac.get(group, 1.0))
        flops = n * q + 3 * n * e * q + (3 * n * q if bias else 0) + h * (2 * n * n * (q / h) + n * n) + n * q * (q + 1)
        return t.coef * flops  # coef: the counter's batch of windows/sequences per sample (1 for a plain ViT)


def _restore(d: dict[str, float], key: str, value: float | None) -> None:
    if value is None:
        d.pop(key, None)
    else:
        d[key] = value


def build_cost_model(model: nn.Module, example_input, structure: Structure) -> CostModel:
    from torch_pruning.utils.op_counter import count_ops_and_params, is_supported_instance

    from .inputs import call
    from .structure import detach_caches

    detach_caches(model)  # the counter deep-copies the model
    name_of = {m: n for n, m in model.named_modules()}
    total_macs, total_params, layer_flops, _ = count_ops_and_params(model, example_input, layer_wise=True)

    # Execution order, so uncounted-structure ops (activations, pools) inherit the width of what fed them.
    order: list[str] = []
    tokens: dict[str, int] = {}
    mha_seq: dict[str, tuple[int, int]] = {}  # MultiheadAttention -> (sequence length, batch)
    hooks = []
    for n, m in model.named_modules():
        if is_supported_instance(m) or n in structure.modules:
            def hook(mod, inp, out, n=n):
                order.append(n)
                if isinstance(mod, nn.MultiheadAttention) and inp and isinstance(inp[0], torch.Tensor) and inp[0].dim() == 3:
                    q = inp[0]
                    mha_seq[n] = (int(q.shape[1]), int(q.shape[0])) if mod.batch_first else (int(q.shape[0]), int(q.shape[1]))
                if n in structure.attention and inp and isinstance(inp[0], torch.Tensor) and inp[0].dim() == 3:
                    tokens[n] = int(inp[0].shape[1])
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            call(model, example_input)
    finally:
        for h in hooks:
            h.remove()

    modules = dict(model.named_modules())
    # the counter reports the total per sample but per-layer flops summed over the batch: normalise
    raw = sum(float(layer_flops.get(m) or 0.0) for n, m in modules.items() if is_supported_instance(m))
    per_sample = float(total_macs) / raw if raw else 1.0
    mac_terms: list[_Term] = []
    last_out: tuple[dict[str, int], int] = ({}, 1)
    seen: set[str] = set()
    tagged, current = 0, ""  # the terms the module handled last added are tagged when the next one starts
    for n in order:
        if n in seen:
            continue
        seen.add(n)
        for t in mac_terms[tagged:]:
            t.module = current
        tagged, current = len(mac_terms), n
        m = modules[n]
        # only modules the counter hooks count themselves: for any other module it reports the sum of its
        # children (a BEiT/EVA attention's proj), which the children's own terms already cover
        flops = float(layer_flops.get(m) or 0.0) * per_sample if is_supported_instance(m) else 0.0
        d = structure.modules.get(n)
        if d is not None and d.kind == "attention" and not flops:
            last_out = (d.out_groups, d.out_dim)  # the counter does not count this attention variant: its Linears are
            continue
        if d is not None and d.kind == "attention":
            qkv_name, _ = structure.attention[n]
            qd = structure.modules[qkv_name]
            group = next(iter(qd.out_groups), "")
            q0 = m.qkv.out_features // 3
            term = _Term(1.0, "attn", in_comp=qd.in_groups, in_dim=qd.in_dim,
                         attn=(group, tokens.get(n, 1), m.qkv.in_features, q0, int(m.num_heads), m.qkv.bias is not None))
            calc = CostModel._eval(term, {}, {})
            # the counter multiplies its per-sequence formula by the batch of sequences (windows in Swin)
            term.coef = flops / calc if calc else 0.0
            mac_terms.append(term)
            last_out = (d.out_groups, d.out_dim)
            continue
        if d is not None and d.kind == "mha" and flops:
            # nn.MultiheadAttention as torch-pruning counts it: projections 4*L*E^2 scale with the kept embed
            # fraction squared, the h*L^2 softmax not at all, the rest (scaling, biases, QK^T, AV) linearly
            seq, batch = mha_seq.get(n, (1, 1))
            quad = 4.0 * seq * d.out_dim ** 2 * batch * per_sample
            const = float(m.num_heads) * seq * seq * batch * per_sample
            mac_terms.append(_Term(quad, "bilinear", d.out_groups, d.out_groups, d.out_dim, d.out_dim))
            mac_terms.append(_Term(const, "const"))
            mac_terms.append(_Term(max(0.0, flops - quad - const), "out", out_comp=d.out_groups, out_dim=d.out_dim))
            last_out = (d.out_groups, d.out_dim)
            continue
        if d is not None and d.kind == "rnn" and flops:
            mac_terms.extend(_rnn_terms(m, d, flops))
            last_out = (d.out_groups, d.out_dim)
            continue
        if d is not None:
            if d.kind in ("conv", "linear"):
                if flops:
                    bias = _bias_flops(m, flops, per_sample)  # bias adds scale with the output width only
                    mac_terms.append(_Term(flops - bias, "bilinear", d.in_groups, d.out_groups, d.in_dim, d.out_dim))
                    if bias:
                        mac_terms.append(_Term(bias, "out", out_comp=d.out_groups, out_dim=d.out_dim))
            elif flops:
                mac_terms.append(_Term(flops, "out", out_comp=d.out_groups, out_dim=d.out_dim))
            last_out = (d.out_groups, d.out_dim)
        elif flops:
            mac_terms.append(_Term(flops, "out", out_comp=last_out[0], out_dim=last_out[1]))

    for t in mac_terms[tagged:]:
        t.module = current
    param_terms = _param_terms(model, structure, name_of)
    module_macs = {n: float(layer_flops.get(m) or 0.0) * per_sample for n, m in modules.items()
                   if n in structure.modules and structure.modules[n].kind in ("conv", "linear", "depthwise")
                   and is_supported_instance(m)}
    return CostModel(mac_terms, param_terms, float(total_macs), float(total_params), module_macs)


def _rnn_terms(m: nn.Module, d, flops: float) -> list[_Term]:
    """LSTM/GRU/RNN as torch-pruning's counter counts it: the per-step cost (input-hidden weights, which follow
    the input width, plus hidden-hidden weights and gate ops, which do not) times the first sequence's
    shape[0] x shape[1], where shape[1] is the feature (input) width: the input-weight part scales with the kept
    input fraction squared, the rest linearly."""
    gates = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}[type(m)] if type(m) in (nn.LSTM, nn.GRU, nn.RNN) else 4
    h = m.hidden_size
    per_step = 0.0
    for i in range(m.num_layers):
        w_ih, w_hh = getattr(m, f"weight_ih_l{i}"), getattr(m, f"weight_hh_l{i}")
        per_step += w_ih.shape[0] * w_ih.shape[1] + w_hh.shape[0] * w_hh.shape[1]
        per_step += {4: 10 * h, 3: 7 * h, 1: h}[gates]
        if m.bias:
            per_step += 2 * gates * h
    first = gates * h * m.input_size  # layer 0's input weights: the only part of a step that follows the input
    quad = flops * first / per_step if per_step else 0.0
    return [_Term(quad, "bilinear", d.in_groups, d.in_groups, d.in_dim, d.in_dim),
            _Term(flops - quad, "out", out_comp=d.in_groups, out_dim=d.in_dim)]


def _bias_flops(m: nn.Module, flops: float, per_sample: float) -> float:
    if getattr(m, "bias", None) is None:
        return 0.0
    if isinstance(m, nn.Linear):
        return m.out_features * per_sample  # the counter adds the bias once per forward, not per token
    k = (m.in_channels // m.groups) * float(torch.tensor(m.kernel_size).prod())
    return flops / (k + 1)


def _param_terms(model: nn.Module, structure: Structure, name_of: dict) -> list[_Term]:
    terms: list[_Term] = []
    for mname, m in model.named_modules():
        d = structure.modules.get(mname)
        first = len(terms)
        for pname, p in m.named_parameters(recurse=False):
            n = float(p.numel())
            if d is not None and d.kind == "mha":  # in_proj_weight [3E, E]: both dims are the embed dim
                terms.append(_Term(n, "bilinear", d.out_groups, d.out_groups, d.out_dim, d.out_dim) if p.dim() == 2
                             else _Term(n, "out", out_comp=d.out_groups, out_dim=d.out_dim))
            elif d is None or d.kind == "attention":
                # unwrapped parameters (cls_token, pos_embed, layer scales) follow their last dim's group
                comp = structure.param_groups.get(f"{mname}.{pname}" if mname else pname, {})
                terms.append(_Term(n, "out", out_comp=comp, out_dim=p.shape[-1]) if comp else _Term(n, "const"))
            elif d.kind == "rnn":  # layer 0's input weights follow the input width; the rest stays
                terms.append(_Term(n, "bilinear", d.in_groups, {}, d.in_dim, 1) if pname in ("weight_ih_l0", "weight_ih_l0_reverse")
                             else _Term(n, "const"))
            elif d.kind in ("conv", "linear") and pname == "weight":
                terms.append(_Term(n, "bilinear", d.in_groups, d.out_groups, d.in_dim, d.out_dim))
            else:  # biases, norm affine, depthwise kernels: one per output channel
                terms.append(_Term(n, "out", out_comp=d.out_groups, out_dim=d.out_dim))
        for t in terms[first:]:
            t.module = mname
    return terms
