"""prunepilot.api.sparsify on a tiny random Llama in bf16: the user's model object sparsified in place (dtype
kept), calibration as strings / token ids / a datasets Dataset, a bf16 export, bad input refused in one line,
and a journaled Python-model run that `runs resume` refuses with a clear reason."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from prunepilot.api import Result, sparsify
from prunepilot.errors import PlanError, PrunepilotError, SourceError
from test_llm_memory import ids, tiny, word_docs, word_tokenizer

SMALL = dict(calib_seqs=4, calib_seqlen=32, eval_seqs=2, eval_seqlen=32, probe_seqs=1, probe_seqlen=32,
             fidelity_seqs=1, log=None, progress=False)


def _weights_sparsity(model: Any) -> float:
    from prunepilot.sparsify.calibrate import linear_layers, modules_by_name

    infos = linear_layers(model)
    mods = modules_by_name(model, infos)
    return sum(int((mods[i.name].weight == 0).sum()) for i in infos) / sum(i.params for i in infos)


def test_sparsify_a_bf16_model_object_with_text_calibration(tmp_path: Path) -> None:
    model, tok = tiny(torch.bfloat16), word_tokenizer()
    ticks: list[tuple[str, int, int]] = []
    res = sparsify(model, tok, sparsity=0.5, calib=word_docs(30, 200), agent="uniform", out=tmp_path / "run",
                   **(SMALL | {"progress": lambda phase, done, total: ticks.append((phase, done, total))}))
    assert isinstance(res, Result) and res.model is model
    assert next(model.parameters()).dtype == torch.bfloat16  # computed and kept in the checkpoint's dtype
    assert res.within_band and res.metrics["sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert _weights_sparsity(model) == pytest.approx(0.5, abs=1e-6)
    assert res.dense["perplexity"] > 0 and 0 <= res.metrics["fidelity"]["top1_agreement"] <= 1
    assert res.run_id and res.report_path and res.report_path.exists() and res.plan["method"] == "sparsegpt"
    assert ticks and ticks[-1][1] == ticks[-1][2] == 3  # one tick per decoder block
    exp = res.raw["export"]
    assert exp["dtype"] == "bfloat16" and exp["tensors_identical"]
    assert res.metrics["size_mb"] == exp["size_mb"] > 0
    assert json.loads((tmp_path / "run" / "model" / "config.json").read_text())["dtype"] == "bfloat16"
    config = json.loads((tmp_path / "run" / "result.json").read_text())["config"]
    assert config["model"] == "python:LlamaForCausalLM" and config["calib"] == "python:texts[30]"
    assert res.raw["memory"]["dtype"] == "bfloat16" and res.raw["memory"]["peak_rss_mb"] > 0


def test_token_ids_calibration_without_out_writes_nothing() -> None:
    model = tiny(torch.bfloat16)
    res = sparsify(model, word_tokenizer(), sparsity="2:4", calib=ids(10, 32, 1), method="wanda", **SMALL)
    assert res.out is None and res.report_path is None and res.raw["pattern"] == "2:4"
    assert res.metrics["sparsity"] == pytest.approx(0.5) and "size_mb" not in res.metrics
    assert res.raw["protocol"]["calib"] == "7x32" and res.raw["protocol"]["eval"] == "2x32"


def test_datasets_calibration() -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": word_docs(30, 200)})
    res = sparsify(tiny(), word_tokenizer(), sparsity=0.3, calib=ds, agent="uniform", method="wanda", **SMALL)
    assert res.metrics["sparsity"] == pytest.approx(0.3, abs=1e-4)


def test_bad_input_is_refused_in_one_line() -> None:
    model, tok = tiny(), word_tokenizer()
    cases: list[tuple[dict[str, Any], type[PrunepilotError], str]] = [
        ({"sparsity": 1.5}, PlanError, "fraction"),
        ({"calib": 42}, SourceError, "calib is"),
        ({"calib": ids(2, 8, 0)}, SourceError, "n_seqs >= 3"),
        ({"calib": torch.zeros(40, dtype=torch.long)}, SourceError, r"\[n_seqs, seqlen\]"),  # 1-D: one clear line
        ({"calib": []}, SourceError, "calib is"),
        ({"nonsense_option": 1}, PlanError, "unknown sparsify options"),
        ({"device": "tpu"}, SourceError, "a device is"),
        ({"dtype": "int4"}, SourceError, "a dtype is"),
    ]
    for kwargs, err, text in cases:
        with pytest.raises(err, match=text) as info:
            sparsify(model, tok, **(SMALL | kwargs))
        assert "\n" not in str(info.value) and "fix:" in str(info.value)
    with pytest.raises(SourceError, match="transformers causal LM"):
        sparsify(torch.nn.Linear(2, 2), tok, **SMALL)


def test_resume_of_a_python_model_run_is_refused_with_the_reason(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from prunepilot.cli import app

    out = tmp_path / "run"

    def stop(phase: str, done: int, total: int) -> None:
        raise KeyboardInterrupt  # killed during the block-by-block application

    with pytest.raises(KeyboardInterrupt):
        sparsify(tiny(), word_tokenizer(), sparsity=0.5, calib=word_docs(30, 200), agent="uniform", out=out,
                 export=False, **(SMALL | {"progress": stop}))
    run_id = (out / "run_id").read_text()
    shown = CliRunner().invoke(app, ["runs", "resume", run_id, "--journal", str(out / "journal.sqlite")],
                               env={"COLUMNS": "300"})
    assert shown.exit_code != 0 and isinstance(shown.exception, SourceError)  # cli.main prints it in one line
    assert "handed in from Python" in str(shown.exception) and "resume=True" in str(shown.exception)


def test_gpt2_conv1d_layers_are_sparsified_and_handed_back_as_conv1d(tmp_path: Path) -> None:
    """GPT-2 stores its projections as transformers Conv1D (weights transposed): sparsified as linears, handed back
    as the same Conv1D modules and parameters, exported in a checkpoint transformers reloads exactly."""
    import transformers
    from transformers.pytorch_utils import Conv1D

    tok = word_tokenizer()
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                                                 vocab_size=len(tok)))
    convs = {n: m for n, m in model.named_modules() if isinstance(m, Conv1D)}
    params = {n: m.weight for n, m in convs.items()}
    res = sparsify(model, tok, sparsity=0.5, calib=word_docs(30, 200), agent="uniform", out=tmp_path / "run", **SMALL)
    assert res.within_band and res.metrics["sparsity"] == pytest.approx(0.5, abs=1e-6)
    after = {n: m for n, m in model.named_modules() if isinstance(m, Conv1D)}
    assert after.keys() == convs.keys() and all(after[n] is convs[n] and after[n].weight is params[n] for n in convs)
    zeros = sum(int((m.weight == 0).sum()) for m in after.values())
    assert zeros / sum(m.weight.numel() for m in after.values()) == pytest.approx(0.5, abs=1e-3)
    assert all(m.weight.shape == (m.nx, m.nf) for m in after.values())
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert torch.equal(reloaded.transformer.h[1].mlp.c_fc.weight, model.transformer.h[1].mlp.c_fc.weight)
    with pytest.raises(PlanError, match="Conv1D"):
        sparsify(model, tok, sparsity="2:4", calib=word_docs(30, 200), agent="uniform", out=tmp_path / "nm",
                 export_format="compressed-tensors", **SMALL)
    assert all(isinstance(m, Conv1D) for n, m in model.named_modules() if n in convs)  # restored after the refusal
