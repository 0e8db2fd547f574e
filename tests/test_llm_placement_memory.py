"""Weights exist once: the upcast placement keeps a bf16 model's resting tensors (no per-block copies left behind),
writes back only what pruning changed, and gives exactly the weights of a float32 run rounded to bf16; lm_head is
upcast a slice at a time; knowledge prompts run batched; the probe and the dense reference keep their
log-probabilities on disk and score exactly as full logits do."""

from __future__ import annotations

import copy
import pickle
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from prunepilot.evaluate import language as lang
from prunepilot.sparsify import device as dev
from prunepilot.sparsify.calibrate import linear_layers, sequential_sparsify
from prunepilot.sparsify.device import Placement
from prunepilot.sparsify.loop import Probe
from prunepilot.sparsify.plan import project
from test_llm_memory import ids, tiny, word_tokenizer


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_upcast_gives_the_float32_run_rounded_to_bf16(method: str) -> None:
    """The same masks and weights as running the bf16 checkpoint in float32 throughout, rounded once at the end."""
    model, x = tiny(torch.bfloat16, seed=2), ids(4, 16, 5)
    ref = copy.deepcopy(model).float()  # bf16 values are exact in float32
    counts = project({}, linear_layers(model), 0.5)
    sequential_sparsify(ref, x, counts, method)
    pl = Placement.for_model(model, torch.device("cpu"), upcast=True)
    sequential_sparsify(model, x, counts, method, placement=pl)
    pl.detach()
    want = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        assert p.dtype == torch.bfloat16
        assert torch.equal(p, want[n].bfloat16()), n


def test_resting_tensors_are_kept_and_pruned_ones_written_in_place() -> None:
    model, x = tiny(torch.bfloat16, seed=3), ids(4, 16, 6)
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    pl = Placement.for_model(model, torch.device("cpu"), upcast=True)
    lang.mean_nll(model, x)  # forwards through the hooks: nothing converted back, nothing reallocated
    blocks = {n: p.data_ptr() for n, p in model.named_parameters() if ".layers." in n}
    assert blocks == {n: v for n, v in ptrs.items() if ".layers." in n}
    sequential_sparsify(model, x, project({}, linear_layers(model), 0.5), "wanda", placement=pl)
    pl.detach()
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs  # pruned in place, at rest in bf16
    assert all(float((m.weight == 0).float().mean()) > 0.4 for m in dict(model.named_modules()).values()
               if isinstance(m, torch.nn.Linear) and m is not model.lm_head)
    assert not pl._resting  # no block left onloaded


def test_chunked_upcast_head_equals_a_float32_head(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dev, "HEAD_CHUNK_MIN", 1)
    monkeypatch.setattr(dev, "HEAD_CHUNK_BYTES", 32 * 4 * 10)  # 10 rows of the 96-row head per slice
    model, x = tiny(torch.bfloat16, seed=4), ids(2, 12, 7)
    ref = copy.deepcopy(model).float()
    pl = Placement.for_model(model, torch.device("cpu"), upcast=True)
    assert model.lm_head in pl._heads and model.lm_head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        got = model(input_ids=x, use_cache=False).logits
        want = ref(input_ids=x, use_cache=False).logits
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    pl.detach()
    assert "forward" not in vars(model.lm_head)


def test_knowledge_prompts_batched_equal_one_at_a_time() -> None:
    model, tok = tiny(), word_tokenizer()
    prompts = ["w1 w2 w3", "w5", "w7 w8 w9 w10 w11", "w3 w3"]
    got = lang.last_token_probs(model, tok, prompts)
    for i, p in enumerate(prompts):
        ids_ = lang._prompt_ids(tok, p)
        with torch.no_grad():
            want = F.softmax(model(input_ids=ids_, use_cache=False).logits[0, -1].float(), -1)
        assert torch.allclose(got[i], want, atol=1e-6), p


def _full_scores(model: Any, dense: Any, probe_ids: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        p = F.log_softmax(dense(input_ids=probe_ids, use_cache=False).logits[:, :-1].float(), -1).half().float()
        q = F.log_softmax(model(input_ids=probe_ids, use_cache=False).logits[:, :-1].float(), -1)
    nll = F.nll_loss(q.reshape(-1, q.shape[-1]), probe_ids[:, 1:].reshape(-1), reduction="sum")
    n = probe_ids[:, 1:].numel()
    return float(nll) / n, float((p.exp() * (p - q)).sum()) / n


def test_probe_from_chunked_logits_on_disk_equals_full_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lang, "chunk_tokens", lambda model: 7)  # chunks straddle sequences and stored rows
    model, x = tiny(seed=5), ids(5, 20, 8)
    dense = copy.deepcopy(model)
    probe = Probe(model, x, batch_size=2)
    assert probe.dense.kl == pytest.approx(0.0, abs=1e-5)
    sequential_sparsify(model, ids(4, 16, 9), project({}, linear_layers(model), 0.5), "wanda")
    got = probe.measure(model)
    nll, kl = _full_scores(model, dense, x)
    assert got.nll == pytest.approx(nll, rel=1e-5) and got.kl == pytest.approx(kl, rel=1e-4, abs=1e-6)
    part = probe.measure(model, 3)
    nll3, kl3 = _full_scores(model, dense, x[:3])
    assert part.nll == pytest.approx(nll3, rel=1e-5) and part.kl == pytest.approx(kl3, rel=1e-4, abs=1e-6)
    again = pickle.loads(pickle.dumps(probe))  # a Ray worker gets the log-probabilities as tensors
    assert again.measure(model) == got


def test_prunepilot_sparsify_stays_callable_after_its_package_is_imported() -> None:
    """`import prunepilot.sparsify.run` binds the package to `prunepilot.sparsify`; calling it still runs the API."""
    import prunepilot
    import prunepilot.sparsify.run  # noqa: F401

    from prunepilot.errors import PlanError

    assert callable(prunepilot.sparsify)
    with pytest.raises(PlanError, match="unknown sparsify options"):
        prunepilot.sparsify(object(), None, not_an_option=1)
