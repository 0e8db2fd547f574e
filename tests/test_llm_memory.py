"""Bounded-memory LLM machinery on a tiny random Llama: sequential statistics equal full-forward ones, the Wanda
bank keeps nothing dense in RAM, fidelity from stored dense log-probs equals fidelity against a model copy,
chunked evaluation equals full logits, streamed gradients equal plain backward, checkpoint dtypes are kept,
and device/dtype resolution (CPU here; CUDA paths skip cleanly)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from prunepilot.errors import SourceError
from prunepilot.evaluate import language as lang
from prunepilot.sparsify.calibrate import (
    activation_norms,
    gradient_importance,
    linear_layers,
    modules_by_name,
    sequential_sparsify,
)
from prunepilot.sparsify.device import Placement, resolve_device, resolve_dtype, timer, weight_bytes
from prunepilot.sparsify.plan import project
from prunepilot.sparsify.profile import TensorStore, WandaBank

VOCAB = 96


def tiny(dtype: torch.dtype = torch.float32, seed: int = 0, layers: int = 3) -> Any:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def word_tokenizer(vocab: int = VOCAB) -> Any:
    """Words w0..w{vocab-3} plus <unk> and <s>: text like "w3 w17 w5" tokenizes one id per word."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab - 2)} | {"<unk>": vocab - 2, "<s>": vocab - 1}
    tk = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>")


def word_docs(n: int, words: int, seed: int = 3) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 2, (words,), generator=g)) for _ in range(n)]


def ids(n: int, t: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def test_sequential_norms_equal_a_full_forward_pass() -> None:
    model, x = tiny(), ids(6, 24, 1)
    infos = linear_layers(model)
    mods = modules_by_name(model, infos)
    ref = {i.name: torch.zeros(i.in_features, dtype=torch.float64) for i in infos}
    def add(m: Any, a: tuple, n: str) -> None:
        ref[n].add_(a[0].reshape(-1, a[0].shape[-1]).double().pow(2).sum(0))

    hooks = [mods[n].register_forward_pre_hook(lambda m, a, n=n: add(m, a, n)) for n in ref]
    with torch.no_grad():
        model(input_ids=x, use_cache=False)
    for h in hooks:
        h.remove()
    got = activation_norms(model, x, batch_size=4)
    for n in ref:
        assert torch.allclose(got[n], ref[n], rtol=1e-4), n


def test_wanda_bank_keeps_no_dense_copy_in_memory() -> None:
    model = tiny()
    infos = linear_layers(model)
    norms = activation_norms(model, ids(4, 16, 2))
    before = {i.name: m.weight.detach().clone() for i, m in zip(infos, modules_by_name(model, infos).values())}
    bank = WandaBank(model, infos, norms)
    held = [v for v in vars(bank).values() if isinstance(v, dict) for t in v.values() if isinstance(t, torch.Tensor)]
    assert held == []  # dense weights and orders live in the scratch file only
    w_bytes = sum(t.numel() * t.element_size() for t in before.values())
    assert bank.store.nbytes >= w_bytes  # dense values + orders on disk
    bank.apply(project({}, infos, 0.5))
    mods = modules_by_name(model, infos)
    assert all(abs(float((mods[i.name].weight == 0).float().mean()) - 0.5) < 0.01 for i in infos)
    bank.restore()
    assert all(torch.equal(mods[n].weight, w) for n, w in before.items())
    assert all(torch.equal(bank.dense[n], w) for n, w in before.items())
    bank.close()


def test_wanda_bank_stores_bf16_in_bf16() -> None:
    model = tiny(torch.bfloat16)
    infos = linear_layers(model)
    bank = WandaBank(model, infos, activation_norms(model, ids(2, 16, 2)))
    assert bank.dense[infos[0].name].dtype == torch.bfloat16
    assert bank.order[infos[0].name].dtype == torch.int16
    bank.close()


def test_tensor_store_roundtrip(tmp_path: Path) -> None:
    store = TensorStore(tmp_path)
    a, b = torch.randn(5, 7).bfloat16(), torch.arange(12, dtype=torch.int16).reshape(3, 4)
    store.put("a", a)
    store.put("b", b)
    assert torch.equal(store.get("a"), a) and torch.equal(store.get("b"), b) and "a" in store
    store.close()


def test_fidelity_from_stored_dense_logprobs_equals_a_model_copy() -> None:
    model, ev = tiny(), ids(2, 40, 3)
    dense = copy.deepcopy(model)
    ref = lang.dense_reference(model, ev)
    sequential_sparsify(model, ids(4, 24, 4), project({}, linear_layers(model), 0.5), "wanda")
    old = _fidelity_with_copy(model, dense, ev)
    new = lang.fidelity(model, ref)
    assert new["top1_agreement"] == pytest.approx(old["top1_agreement"])
    assert new["kl"] == pytest.approx(old["kl"], abs=1e-5)  # float16 storage of the dense log-probs: ~1e-6 nats


def _fidelity_with_copy(model: Any, dense: Any, blocks: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        p = F.log_softmax(dense(input_ids=blocks, use_cache=False).logits.float(), -1)
        q = F.log_softmax(model(input_ids=blocks, use_cache=False).logits.float(), -1)
    return {"top1_agreement": float((p.argmax(-1) == q.argmax(-1)).float().mean()),
            "kl": float((p.exp() * (p - q)).sum() / blocks.numel())}


def test_chunked_nll_equals_full_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    model, ev = tiny(), ids(3, 50, 5)
    with torch.no_grad():
        logits = model(input_ids=ev, use_cache=False).logits[:, :-1].float()
    ref = float(F.cross_entropy(logits.reshape(-1, VOCAB), ev[:, 1:].reshape(-1)))
    monkeypatch.setattr(lang, "chunk_tokens", lambda model: 7)  # many chunks, a ragged last one
    assert lang._can_split(model)
    assert lang.mean_nll(model, ev, batch_size=2) == pytest.approx(ref, rel=1e-5)


def test_streamed_gradients_equal_plain_backward() -> None:
    model, x = tiny(), ids(2, 16, 6)
    infos = linear_layers(model)
    mods = modules_by_name(model, infos)
    ref = {n: 0.0 for n in mods}
    for b in (x[:1], x[1:]):
        model.zero_grad()
        model(input_ids=b, labels=b, use_cache=False).loss.backward()
        for n, m in mods.items():
            ref[n] += float(m.weight.grad.abs().mean()) / 2
    model.zero_grad(set_to_none=True)
    got = gradient_importance(model, x, 1)
    assert all(got[n] == pytest.approx(ref[n], rel=1e-4) for n in ref)
    assert all(p.grad is None for p in model.parameters())


def test_checkpoint_dtype_is_kept_and_overridable(tmp_path: Path) -> None:
    from prunepilot.sources.llm import load_causal_lm
    model = tiny(torch.bfloat16)
    model.save_pretrained(tmp_path / "m")
    word_tokenizer().save_pretrained(tmp_path / "m")
    lm = load_causal_lm(f"hf:{tmp_path / 'm'}")
    assert next(lm.model.parameters()).dtype == torch.bfloat16 and lm.checkpoint_dtype == torch.bfloat16
    lm32 = load_causal_lm(f"hf:{tmp_path / 'm'}", dtype="float32")
    assert next(lm32.model.parameters()).dtype == torch.float32 and lm32.checkpoint_dtype == torch.bfloat16


def test_device_and_dtype_resolution_on_cpu() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "cuda:x", "gpu0"):
        with pytest.raises(SourceError, match="fix:"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(SourceError, match="CUDA"):
            resolve_device("cuda:0")
    assert resolve_dtype("auto") is None and resolve_dtype("bf16") == torch.bfloat16
    assert resolve_dtype("float16") == torch.float16 and resolve_dtype(torch.float32) == torch.float32
    with pytest.raises(SourceError, match="dtype"):
        resolve_dtype("int8")
    model = tiny()
    pl = Placement.for_model(model, torch.device("cpu"))
    assert not pl.offload and pl.mode == "cpu (resident)"
    assert weight_bytes(model) == sum(p.numel() * 4 for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    assert timer("cpu") > 0


def test_offload_hooks_hold_one_block_and_match_resident_results() -> None:
    """The offload placement's plumbing (hooks, hold, quiet) on the CPU, where moves are no-ops: results equal."""
    model, x = tiny(), ids(4, 16, 7)
    ref = activation_norms(model, x)
    from prunepilot.sparsify.calibrate import decoder_layers

    _, layers = decoder_layers(model)
    pl = Placement(torch.device("cpu"), True, list(layers))
    for block in layers:
        pl._handles.append(block.register_forward_pre_hook(pl._onload_hook))
        pl._handles.append(block.register_forward_hook(pl._offload_hook))
    got = activation_norms(model, x, placement=pl)
    pl.detach()
    assert all(torch.allclose(got[n], ref[n]) for n in ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_offload_sequential_sparsify_matches_cpu() -> None:  # pragma: no cover - GPU machines only
    cpu_model, gpu_model, x = tiny(), tiny(), ids(4, 16, 8)
    counts = project({}, linear_layers(cpu_model), 0.5)
    sequential_sparsify(cpu_model, x, counts, "wanda")
    pl = Placement.for_model(gpu_model, torch.device("cuda"), offload=True)
    sequential_sparsify(gpu_model, x, counts, "wanda", placement=pl)
    a = dict(cpu_model.named_parameters())
    for n, p in gpu_model.named_parameters():
        assert torch.equal((p.detach().cpu() == 0), (a[n] == 0)), n


def test_upcast_runs_bf16_blocks_in_fp32_one_at_a_time() -> None:
    model, x = tiny(torch.bfloat16), ids(4, 16, 9)
    pl = Placement.for_model(model, torch.device("cpu"), upcast=True)
    assert pl.compute_dtype == torch.float32 and "upcast" in pl.mode
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16  # the table stays bf16; lookups upcast
    assert model.model.norm.weight.dtype == torch.float32  # small outside parts in the compute dtype meanwhile
    seen: list[torch.dtype] = []
    from prunepilot.sparsify.calibrate import decoder_layers

    _, layers = decoder_layers(model)
    h = layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(m.weight.dtype))
    counts = project({}, linear_layers(model), 0.5)
    achieved = sequential_sparsify(model, x, counts, "sparsegpt", placement=pl)
    assert lang.mean_nll(model, x) > 0  # a full forward through the hooks
    h.remove()
    pl.detach()
    assert set(seen) == {torch.float32}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # at rest and after: the checkpoint dtype
    assert all(v == pytest.approx(0.5, abs=0.02) for v in achieved.values())
    assert all(float((m.weight == 0).float().mean()) == pytest.approx(achieved[n])
               for n, m in modules_by_name(model, linear_layers(model)).items())
