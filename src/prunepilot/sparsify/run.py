"""One sparsify run end to end: load, split text, measure dense, profile, loop, apply, evaluate, export, write.

Output folder: result.json (results.build_result, kind="sparsify"), plan.json, profile.json,
journal.sqlite (every attempt and LLM call of this run), summary.md, report.html, model/ (save_pretrained).
"""

from __future__ import annotations

import json
import math
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..budget import Budget
from ..engines import sparsity as sp
from ..errors import BudgetError, PlanError
from ..errors import SourceError
from ..evaluate.language import dense_reference, fidelity, knowledge_retention, knowledge_targets, mean_nll
from ..results import build_result, write_json_atomic, write_text_atomic
from ..sources.llm import LoadedLM, load_causal_lm
from ..sources.text import TextSplit, load_split, token_blocks
from .calibrate import (activation_norms, decoder_layers, gradient_importance, linear_layers, modules_by_name,
                        sequential_sparsify)
from .conv1d import Conv1DSwap
from .device import (Placement, current_rss_mb, peak_memory_mb, release_memory, resolve_device, resolve_dtype,
                     synchronize, weight_bytes)
from .export import FORMATS, folder_mb, save_and_verify
from .progress import Reporter
from .loop import Probe, probe_costs
from .plan import MAX_RATIO, nm_layer_choice, project, resolve
from .profile import WandaBank, build_profile

ONE_SHOT = ("uniform", "owl")  # allocate once at the target; no loop
SEARCH_MASKS = ("wanda", "sparsegpt")
EVOLVE_EVALS = 100  # the evolve search's evaluation budget when --evals is not given


def has_loop(agent: str, sparsity: str) -> bool:
    """Whether a run measures candidates in the loop: not for a one-shot agent, nor for N:M (nothing to allocate)."""
    return agent.strip() not in ONE_SHOT and ":" not in str(sparsity)


@dataclass
class SparsifyConfig:
    model: str
    sparsity: str = "50%"  # "50%" / "0.5" (unstructured, global parameter-weighted), "2:4" / "4:8", or "2:4@40%"
    method: str = "sparsegpt"  # how the final masks/weights are computed: magnitude | wanda | sparsegpt
    search_masks: str = "wanda"  # how the loop scores trial allocations: wanda (mask bank) | sparsegpt (level database)
    agent: str = "auto"  # auto | uniform | owl | sensitivity | local | anthropic:.. | openai:.. | scripted
    calib: str = "pydocs"
    eval: str | None = None
    calib_seqs: int = 32
    calib_seqlen: int = 512
    eval_seqs: int = 16
    eval_seqlen: int = 1024
    probe_seqs: int = 4
    probe_seqlen: int = 256
    grad_seqs: int = 2
    fidelity_seqs: int = 2
    rollback_threshold: float = 0.15
    step: float = 0.1
    max_iters: int = 24
    refine_iters: int = 8  # re-allocations tried at the target (the best by probe KL is kept)
    evals: int | None = None  # evaluation budget of the loop (measured candidates, any probe size); overrides refine_iters
    bands: int = 3
    group_probe: bool = True  # measure each group's and block's marginal cost (sensitivity / LLM agents)
    batch_size: int = 4
    seed: int = 0
    export: bool = True
    export_format: str = "safetensors"  # safetensors (dense, the checkpoint's dtype) | compressed-tensors
    device: str = "auto"  # auto (CUDA when available) | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (the checkpoint's dtype) | float32 | bfloat16 | float16
    offload: bool | None = None  # CUDA: keep blocks on the CPU, one on the device at a time (None: when it does not fit)
    upcast: bool | None = None  # CPU: run bf16/fp16 blocks in float32 one at a time (None: when the CPU lacks bf16 units)
    history: str | None = None  # cross-run history store (None: the prunepilot cache's history.sqlite)
    use_history: bool = True  # read (warm start, the analyst's context) and record cross-run history
    llm_base_url: str | None = None
    client: Any = None  # an LLMClient to use instead of building one from `agent` (tests, benches)
    progress: Any = None  # None: a rich progress bar on a terminal, quiet otherwise; False: quiet; or a callable
    extra: dict[str, Any] = field(default_factory=dict)


NOT_JOURNALED = ("client", "progress")  # live objects, not configuration


@dataclass
class CalibInput:
    """Calibration handed in from Python instead of a text spec: documents, or token ids [n, T]."""

    texts: list[str] | None = None
    ids: torch.Tensor | None = None

    def describe(self) -> str:
        if self.ids is not None:
            return f"python:token_ids[{'x'.join(str(d) for d in self.ids.shape)}]"
        return f"python:texts[{len(self.texts or [])}]"


NM_AGENTS = ("auto", "sensitivity")  # strategists an N:M budget ("2:4@40%") accepts: its choice is their rule


def parse_sparsity(text: str) -> tuple[float, sp.NM | None]:
    """'50%' -> (0.5, None); '2:4' -> (0.5, 2:4) every layer; '2:4@40%' -> (0.4, 2:4): layers 2:4 or dense."""
    pattern, at, budget = str(text).partition("@")
    nm = sp.parse_nm(pattern)
    if nm is not None and at:
        share = Budget.parse(sparsity=budget).resolve({}).goals["sparsity"]
        if not 0 < share <= nm.sparsity + 1e-9:
            raise BudgetError(f"a {nm} budget lies in (0%, {nm.sparsity:.0%}]: each layer is either {nm} or dense",
                              text, f"e.g. {nm}@{nm.sparsity * 0.8:.0%}, or {nm} for every layer")
        return share, nm
    if nm is not None:
        return nm.sparsity, nm
    if at:
        raise BudgetError("a sparsity with '@' is an N:M pattern and a budget", text, "e.g. 2:4@40%")
    resolved = Budget.parse(sparsity=text).resolve({})
    target = resolved.goals["sparsity"]
    if target > MAX_RATIO:  # refused before the model is loaded
        raise BudgetError("the sparsity target is above what every layer may lose", text,
                          f"ask for at most {MAX_RATIO:.0%} (every layer keeps at least {1 - MAX_RATIO:.0%} of its weights)")
    return target, None


def check_search_masks(cfg: SparsifyConfig) -> None:
    """--search-masks sparsegpt is refused where it would change nothing or mean something else, before any work."""
    if cfg.search_masks not in SEARCH_MASKS:
        raise PlanError(f"search masks are one of {', '.join(SEARCH_MASKS)}", cfg.search_masks,
                        "e.g. --search-masks sparsegpt")
    if cfg.search_masks == "wanda":
        return
    where = f"--agent {cfg.agent} --sparsity {cfg.sparsity}"
    if not has_loop(cfg.agent, cfg.sparsity):
        raise PlanError("--search-masks scores the loop's trial allocations, and this run has no loop", where,
                        "drop --search-masks, or use a loop strategist (sensitivity, evolve, an LLM)")
    if cfg.method != "sparsegpt":
        raise PlanError("--search-masks sparsegpt ranks allocations as SparseGPT would prune them, but this run "
                        "applies another method", f"--method {cfg.method}",
                        "use --method sparsegpt, or --search-masks wanda")
    if (cfg.extra.get("executor") or {}).get("workers", 1) > 1 or (cfg.extra.get("executor") or {}).get("ray_address"):
        raise PlanError("--search-masks sparsegpt keeps its level database in this process; Ray workers cannot "
                        "score from it", "--workers/--ray-address with --search-masks sparsegpt",
                        "drop --workers/--ray-address, or use --search-masks wanda")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _config_json(cfg: SparsifyConfig, out: Path | None, calib_input: CalibInput | None) -> dict[str, Any]:
    config = {k: v for k, v in asdict(cfg).items() if k not in NOT_JOURNALED}
    if calib_input is not None:
        config["calib"] = calib_input.describe()
    return config | {"out": str(out) if out else None}


def run_sparsify(cfg: SparsifyConfig, out: Path | None = None, say: Callable[[str], None] = print, *,
                 run_id: str | None = None, overwrite: bool = False, loaded: LoadedLM | None = None,
                 calib_input: CalibInput | None = None) -> dict[str, Any]:
    """Run one sparsify job (or with `run_id`, continue a journaled one from its last attempt). Every attempt and
    LLM call goes to OUT/journal.sqlite as it happens; the run is marked done or failed there and report.html is
    rendered. Without `out` the journal lives in a temporary folder and nothing else is written.

    `loaded`: a model and tokenizer already in memory (the Python API); it is sparsified in place and the journal
    records model="python:<class>", so such a run can only be continued from Python with the same object.
    `calib_input`: calibration texts or token ids instead of the `cfg.calib` spec."""
    import tempfile

    from ..journal import Journal, prepare_out

    target, nm = parse_sparsity(cfg.sparsity)  # a bad target is refused before anything is written
    if cfg.export_format not in FORMATS:
        raise PlanError(f"an export format is one of {', '.join(FORMATS)}", cfg.export_format,
                        "e.g. --format compressed-tensors")
    resolve_device(cfg.device), resolve_dtype(cfg.dtype)  # bad device/dtype: refused before anything is written
    check_search_masks(cfg)
    if nm is not None and target < nm.sparsity - 1e-9 and cfg.agent.strip() not in NM_AGENTS:
        raise PlanError(f"an N:M budget ({cfg.sparsity}) chooses its {nm} layers by their mask's measured error; "
                        "no other strategist chooses them", f"--agent {cfg.agent}",
                        f"use --agent {' or '.join(NM_AGENTS)}, or an unstructured target")
    if loaded is not None:
        cfg.model = loaded.spec
    elif cfg.model.startswith("python:"):
        raise SourceError("this run's model was handed in from Python, so the journal cannot reload it", cfg.model,
                          "continue it from Python: prunepilot.sparsify(model, tokenizer, ..., out=OUT, resume=True) "
                          "with the same model object, still dense, or start a new run")
    if calib_input is None and cfg.calib.startswith("python:"):
        raise SourceError("this run's calibration data was handed in from Python, so the journal cannot reload it",
                          cfg.calib, "continue it from Python with the same calib, or start a new run")
    tmp = None
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="prunepilot-sparsify-")
        jdir, write = Path(tmp.name), False
    else:
        prepare_out(out, overwrite=overwrite, resume=run_id is not None)
        jdir, write = out, True
    journal = Journal(jdir / "journal.sqlite")
    if run_id is None:
        run_id = journal.start_run("sparsify", _config_json(cfg, out, calib_input), out or jdir)
    else:
        journal.set_status(run_id, "running")
    if write:
        (jdir / "run_id").write_text(run_id)
    say(f"run {run_id} (journal {jdir / 'journal.sqlite'})")
    conv1d = Conv1DSwap()
    try:
        result = _run(cfg, out, say, journal, run_id, loaded, calib_input, conv1d)
    except BaseException as exc:
        journal.finish_run(run_id, "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed",
                           {"error": f"{type(exc).__name__}: {exc}"[:2000]})
        raise
    finally:
        conv1d.restore()  # the user's model gets its own GPT-2 Conv1D modules back, whatever happened
        if tmp is not None:
            tmp.cleanup()
    if write:
        journal.finish_run(run_id, "done", result)
        from ..report.render import render_safely

        render_safely(out, say)
    return result


def _tokens(cfg: SparsifyConfig, tok: Any, calib_input: CalibInput | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Calibration, probe and evaluation token blocks ([n, T] each), disjoint, and how they were made."""
    if calib_input is not None and calib_input.ids is not None:
        ids = calib_input.ids
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32) or ids.shape[0] < 3:
            raise SourceError("calibration token ids are an integer tensor [n_seqs, seqlen] with n_seqs >= 3 "
                              "(calibration, probe and evaluation rows are split from it)",
                              f"{tuple(ids.shape)} {ids.dtype}", "e.g. tokenizer(texts, return_tensors='pt').input_ids")
        ids = ids.long().cpu()
        n = ids.shape[0]
        n_probe = max(1, n // 10)
        n_eval = 0 if cfg.eval else max(1, n // 5)
        calib, probe = ids[: n - n_probe - n_eval], ids[n - n_probe - n_eval : n - n_eval]
        if n_eval:
            evalb = ids[n - n_eval :]
        else:
            evalb = token_blocks(tok, load_split(cfg.eval, cfg.eval).eval, cfg.eval_seqlen, cfg.eval_seqs,
                                 role=(f"the evaluation text ({cfg.eval})", "--eval-seqs", "--eval-seqlen"))
        protocol = {"calib_source": calib_input.describe(), "eval_source": cfg.eval or "the last 20% of the token rows",
                    "calib": f"{calib.shape[0]}x{calib.shape[1]}", "probe": f"{probe.shape[0]}x{probe.shape[1]} (rows after calibration)"}
    else:
        if calib_input is not None:  # documents from Python: the last 20% evaluate unless --eval is given
            docs = [t for t in (calib_input.texts or []) if t and t.strip()]
            if not docs:
                raise SourceError("calibration texts must hold some text", len(calib_input.texts or []),
                                  "pass a list of documents (strings)")
            if cfg.eval:
                text = TextSplit("\n\n".join(docs), load_split(cfg.eval, cfg.eval).eval, {"eval_source": cfg.eval})
            else:
                joined = "\n\n".join(docs)
                cut = int(len(joined) * 0.8)
                cut = joined.rfind(" ", 0, cut) if " " in joined[:cut] else cut
                text = TextSplit(joined[:cut], joined[cut:], {"eval_source": "the last 20% of the calibration texts"})
            text.protocol["calib_source"] = calib_input.describe()
        else:
            text = load_split(cfg.calib, cfg.eval)
        cut = int(len(text.calib) * 0.9)  # the probe slice comes from held-out calibration text, never eval
        source = text.protocol.get("calib_source") or cfg.calib
        # only a loop, or an N:M budget's per-layer costs, measures on the probe
        loop = has_loop(cfg.agent, cfg.sparsity) or "@" in str(cfg.sparsity)
        asks = [("calib", text.calib[:cut], cfg.calib_seqlen, cfg.calib_seqs, cfg.seed,
                 (f"the calibration text ({source}, its first 90%)", "--calib-seqs", "--seqlen")),
                ("probe", text.calib[cut:], cfg.probe_seqlen, cfg.probe_seqs if loop else 0, None,
                 (f"the probe text (the last 10% of {source})", "--probe-seqs", "--probe-seqlen")),
                ("eval", text.eval, cfg.eval_seqlen, cfg.eval_seqs, None,
                 (f"the evaluation text ({text.protocol.get('eval_source') or cfg.eval or source})",
                  "--eval-seqs", "--eval-seqlen"))]
        blocks: dict[str, torch.Tensor] = {}
        short: list[SourceError] = []  # every short text at once: one message, one fix, not three tries
        for name, body, seqlen, n, seed, role in asks:
            try:
                blocks[name] = (token_blocks(tok, body, seqlen, n, seed=seed, role=role) if n
                                else torch.empty(0, seqlen, dtype=torch.long))
            except SourceError as exc:
                short.append(exc)
        if short:
            raise SourceError("; and ".join(e.rule for e in short), ", ".join(str(e.value) for e in short),
                              "; ".join(e.fix or "" for e in short))
        calib, probe, evalb = blocks["calib"], blocks["probe"], blocks["eval"]
        protocol = {**text.protocol, "calib": f"{cfg.calib_seqs}x{cfg.calib_seqlen}",
                    "probe": f"{cfg.probe_seqs}x{cfg.probe_seqlen} (last 10% of calibration text)" if loop
                    else "none (no loop measures candidates)"}
    protocol |= {"eval": f"{evalb.shape[0]}x{evalb.shape[1]}", "eval_tokens": int(evalb.numel()), "seed": cfg.seed,
                 "fidelity": f"{min(cfg.fidelity_seqs, evalb.shape[0])}x{evalb.shape[1]}"}
    return calib, probe, evalb, protocol


def _checkpoint_mb(lm: LoadedLM) -> float | None:
    """Bytes of the weight files the model was loaded from (None for a model handed in from Python)."""
    from .export import files_mb

    spec = lm.spec.strip()
    if spec.startswith("python:"):
        return None
    from ..sources.gguf import ALIASES, cached_model_dir

    if spec.lower() in ALIASES or spec.startswith("gguf:") or spec.lower().endswith(".gguf"):
        folder = cached_model_dir(spec)  # the float copy actually loaded (the GGUF itself is quantised)
    else:
        folder = Path(spec.removeprefix("hf:")).expanduser()
    return round(files_mb(folder), 3) if folder.is_dir() else None


def _run(cfg: SparsifyConfig, out: Path | None, say: Callable[[str], None], journal: Any, run_id: str,
         loaded: LoadedLM | None = None, calib_input: CalibInput | None = None,
         conv1d: Conv1DSwap | None = None) -> dict[str, Any]:
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    target, nm = parse_sparsity(cfg.sparsity)
    torch.manual_seed(cfg.seed)
    device, want_dtype = resolve_device(cfg.device), resolve_dtype(cfg.dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    report = Reporter(cfg.progress)

    hwm: dict[str, float] = {}  # the process's peak RSS at the end of each phase: where the peak was reached

    def lap(name: str, t0: float) -> None:
        synchronize(device)  # CUDA work is asynchronous: time it, not its launch
        timings[name] = round(time.perf_counter() - t0, 2)
        hwm[name] = round(_peak_rss_mb(), 1)
        release_memory()

    t0 = time.perf_counter()
    rss_start = current_rss_mb()
    early: dict[str, Any] = {}  # text that cannot fill its token blocks fails before the weights are read

    def tokens_first(tokenizer: Any) -> None:
        early["tokens"] = _tokens(cfg, tokenizer, calib_input)

    lm = loaded or load_causal_lm(cfg.model, dtype=want_dtype or "auto", before_weights=tokens_first)
    model, tok = lm.model, lm.tokenizer
    if want_dtype is not None and next(model.parameters()).dtype != want_dtype:
        model.to(want_dtype)
    model_dtype = next(model.parameters()).dtype
    conv1d = conv1d if conv1d is not None else Conv1DSwap()
    if conv1d.swap(model) and nm is not None and out and cfg.export and cfg.export_format == "compressed-tensors":
        # refused before any work: the N:M groups run along the input dimension, which Conv1D stores first
        raise PlanError("compressed-tensors' N:M layout is for (out, in) weights; this model's GPT-2 Conv1D layers "
                        "store theirs transposed", f"{type(model).__name__}, {cfg.sparsity}",
                        "use --format safetensors (the default) for this model, or an unstructured target")
    placement = Placement.for_model(model, device, cfg.offload, cfg.upcast)
    infos = linear_layers(model)
    if not infos:
        prefix, blocks = decoder_layers(model)
        raise SourceError("this model has no linear layer inside its decoder blocks to sparsify",
                          f"{type(model).__name__}: {len(blocks)} blocks under {prefix!r}, no nn.Linear "
                          "(or transformers Conv1D) in them",
                          "sparsify needs a decoder whose projections are nn.Linear (Llama, Qwen, Mistral, GPT-2, ...)")
    n_blocks = max(i.block for i in infos) + 1
    export_dtype = lm.checkpoint_dtype or model_dtype  # exports keep the input's dtype
    memory = {"device": placement.mode, "dtype": str(model_dtype).removeprefix("torch."),
              "compute_dtype": str(placement.compute_dtype or model_dtype).removeprefix("torch."),
              "weights_mb": round(weight_bytes(model) / 2**20, 3),
              # this process before any weight was read: imports (+ the tokenizer, loaded before the weights)
              "rss_at_start_mb": rss_start and round(rss_start, 1),
              "rss_before_weights_mb": lm.rss_before_weights_mb and round(lm.rss_before_weights_mb, 1)}
    lap("load", t0)

    t0 = time.perf_counter()
    calib, probe, evalb, protocol = early.get("tokens") or _tokens(cfg, tok, calib_input)
    lap("text", t0)

    say(f"{lm.name}: {len(infos)} prunable linears, {sum(i.params for i in infos)/1e6:.1f}M weights "
        f"({memory['dtype']}, {placement.mode}); target {cfg.sparsity}")
    t0 = time.perf_counter()
    dense_nll = mean_nll(model, evalb, cfg.batch_size)
    facts = knowledge_targets(model, tok)
    dense_metrics = {"perplexity": math.exp(dense_nll), "sparsity": 0.0,
                     "knowledge": knowledge_retention(model, tok, facts)}
    checkpoint_mb = _checkpoint_mb(lm)
    if checkpoint_mb is not None:
        dense_metrics["size_mb"] = checkpoint_mb
    # fidelity is measured against the dense log-probabilities of a few sequences, not a copy of the model
    reference = dense_reference(model, evalb[: cfg.fidelity_seqs]) if cfg.fidelity_seqs else None
    lap("dense_eval", t0)
    say(f"dense perplexity {dense_metrics['perplexity']:.2f} on {evalb.numel()} tokens")

    from ..agents.registry import make_strategist

    nm_budget = nm is not None and target < nm.sparsity - 1e-9  # "2:4@40%": which layers take the pattern
    strategist, agent_used = ((None, "") if nm_budget else
                              make_strategist(cfg.agent, "sparsify", base_url=cfg.llm_base_url, client=cfg.client, say=say))
    total = sum(i.params for i in infos)
    profile_json: dict[str, Any] | None = None
    loop_info: dict[str, Any] = {}
    history: list[Any] = []

    nm_choice: dict[str, Any] | None = None
    if nm_budget:
        t0 = time.perf_counter()
        with report.task("activation norms (block by block)", n_blocks) as bar:
            norms = activation_norms(model, calib, cfg.batch_size, placement, progress=bar)
        mods = modules_by_name(model, infos)
        probe_set = Probe(model, probe.to(placement.device), cfg.batch_size)

        def measure(name: str, keep: torch.Tensor) -> float:  # the probe's KL with only this layer under N:M
            w = mods[name].weight
            saved = w.detach().clone()
            with torch.no_grad():
                w.mul_(keep.to(w.device, w.dtype))
                kl = probe_set.measure(model).kl
                w.copy_(saved)
            return max(kl - probe_set.dense.kl, 0.0)

        with report.task(f"{nm} cost probes (one layer at a time)", len(infos)) as bar:
            counts, cost = nm_layer_choice(infos, {n: m.weight for n, m in mods.items()}, norms, nm, target,
                                           measure=measure, progress=bar)
        del norms, probe_set
        dense = [i.name for i in infos if i.name not in counts]
        agent_used = f"{nm} on the layers whose mask costs least (probe KL per weight removed), the rest dense"
        nm_choice = {"pattern": str(nm), "budget": target, "nm_layers": len(counts), "dense_layers": dense,
                     "rule": "greedy: probe KL to the dense model with only that layer under its Wanda N:M mask, "
                             "per weight removed, cheapest first",
                     "probe": f"{probe.shape[0]}x{probe.shape[1]}",
                     "cost": {n: round(c, 6) for n, c in cost.items()}}
        lap("nm_choice", t0)
        say(f"{nm} on {len(counts)} of {len(infos)} linears, {len(dense)} kept dense, for {target:.1%} sparsity")
    elif nm is not None:
        counts = {i.name: int(round(nm.sparsity * i.params)) for i in infos}
        agent_used = f"{agent_used} (N:M fixes every layer at {nm}; nothing to allocate)"
    elif cfg.agent == "uniform":  # needs no profile
        counts = project({}, infos, target)
    else:
        t0 = time.perf_counter()
        with report.task("activation norms (block by block)", n_blocks) as bar:
            norms = activation_norms(model, calib, cfg.batch_size, placement, progress=bar)
        grads: dict[str, float] = {}
        if cfg.grad_seqs and placement.active:
            say("gradient scores skipped: blocks are onloaded/upcast one at a time, a backward pass would hold them "
                "all (Wanda scores and probes remain)")
        elif cfg.grad_seqs:
            grads = gradient_importance(model, calib[: cfg.grad_seqs, : min(cfg.calib_seqlen, 256)], 1)
        bank: Any = WandaBank(model, infos, norms)
        try:
            profile = build_profile(lm.name, target, infos, bank, grads, cfg.bands)
            lap("profile", t0)
            if cfg.search_masks == "sparsegpt":
                bank.close()  # the profile has what it needs from the Wanda bank
                bank = _sparsegpt_bank(model, infos, calib, target, strategist, cfg, placement, report, say, lap)
            if cfg.agent in ONE_SHOT:
                from ..agents.context import Context

                ctx = Context("sparsify", profile, {}, [], phase="ramp",
                              step={"level": target, "target": target, "current": {i.name: 0.0 for i in infos}})
                plan = strategist.propose(ctx)
                assert plan is not None  # one-shot strategists always answer on the ramp
                counts = project(resolve(plan, infos, profile.groups, {}), infos, target)
            else:
                learned = _history_seed(cfg, model, infos, profile, target, journal, run_id, say)
                counts, loop_info, history = _loop(cfg, model, bank, infos, profile, probe.to(placement.device),
                                                   target, strategist, journal, run_id, say, lap, report, learned)
            profile_json = profile.to_json()
        finally:  # also when interrupted: a model handed in from Python is left dense, so the run can resume
            bank.restore()
            bank.close()
        del bank

    # final application: sequential block-by-block calibration with the chosen method
    t0 = time.perf_counter()
    with report.task(f"{cfg.method} (block by block)", n_blocks) as bar:
        achieved = sequential_sparsify(model, calib, counts, cfg.method, nm, cfg.batch_size, progress=bar,
                                       placement=placement)
    lap("apply", t0)
    achieved_global = sum(achieved.get(i.name, 0.0) * i.params for i in infos) / total
    nm_mods = [m for i, m in zip(infos, _mods(model, infos)) if i.name in counts]  # the layers that took N:M
    if nm is not None and not all(sp.is_nm(m.weight, nm) for m in nm_mods):
        raise PlanError("the N:M pattern did not hold after pruning", str(nm), "report this as a bug")

    t0 = time.perf_counter()
    comp_nll = mean_nll(model, evalb, cfg.batch_size)
    compressed = {"perplexity": math.exp(comp_nll), "sparsity": achieved_global,
                  "knowledge": knowledge_retention(model, tok, facts)}
    if reference is not None:
        compressed["fidelity"] = fidelity(model, reference)
        reference.close()  # its scratch file
        del reference
    lap("final_eval", t0)
    if history and nm is None:
        from .prior import fingerprint, record

        best = next((a for a in history if a.index == loop_info.get("best_attempt")), None)
        record(_store(cfg), fingerprint(model, infos), run_id, target, best, history, infos, counts,
               compressed["perplexity"], agent_used, say)
    say(f"{cfg.method} @ {cfg.sparsity} ({agent_used}): perplexity {compressed['perplexity']:.2f}, sparsity {achieved_global:.4f}")

    placement.detach()  # hooks off; an upcast model's embeddings/head back in the checkpoint dtype
    kernels: dict[str, Any] = {}
    if nm is not None and str(nm) == "2:4":
        from .kernels import semi_structured_speedup

        kernels = semi_structured_speedup(nm_mods, device)
    export_info: dict[str, Any] = {}
    conv1d.restore()  # exports and the caller see the model's own module types
    if out and cfg.export:
        t0 = time.perf_counter()
        export_info = save_and_verify(model, tok, out / "model", evalb[:1, :128], fmt=cfg.export_format,
                                      dtype=export_dtype, sparse_names=[i.name for i in infos if i.name in counts], nm=nm,
                                      sparsity=achieved_global)
        compressed["size_mb"] = export_info["size_mb"]  # bytes of the weight files written
        if cfg.export_format == "compressed-tensors":
            compressed["sparse_size_mb"] = export_info["size_mb"]
        export_info["folder_mb"] = round(folder_mb(out / "model"), 3)
        lap("export", t0)
    report.close()

    budget = Budget.parse(sparsity=f"{target * 100:.6g}%").resolve({})
    err = (achieved_global - target) / target if target else achieved_global
    per_layer = {i.name: round(achieved.get(i.name, 0.0), 6) for i in infos}
    within = budget.within("sparsity", achieved_global)
    if nm_choice is not None:  # a floor met by whole layers: at most the last layer's share above it
        step = max(nm.sparsity * i.params for i in infos) / total  # type: ignore[union-attr]
        within = target - 1e-9 <= achieved_global <= target + max(step, 0.005) + 1e-9
    timings["total"] = round(time.perf_counter() - t_start, 2)
    memory |= {k: round(v, 1) for k, v in peak_memory_mb(device).items()}
    memory["peak_rss_after_phase_mb"] = hwm
    result = build_result(
        kind="sparsify", model=cfg.model, budget=budget.to_json(), dense=dense_metrics, compressed=compressed,
        within_band=within, errors={"sparsity": err},
        method=cfg.method, pattern=str(nm) if nm else "unstructured", agent=agent_used, protocol=protocol,
        loop=loop_info, timings_s=timings, peak_rss_mb=_peak_rss_mb(), export=export_info,
        config=_config_json(cfg, out, calib_input), run_id=run_id, memory=memory,
        **({"kernels": kernels} if kernels else {}),
        **({"search_masks": cfg.search_masks} if history else {}),  # how the loop scored its trial allocations
        **({"nm_choice": nm_choice} if nm_choice else {}),
    )
    if out:
        groups = profile_json["groups"] if profile_json else []
        write_json_atomic(out / "result.json", result)
        write_json_atomic(out / "plan.json", {"target": target, "pattern": str(nm) if nm else "unstructured",
                                              "method": cfg.method, "agent": agent_used, "counts": counts,
                                              "layers": per_layer, "groups": groups})
        if profile_json:
            write_json_atomic(out / "profile.json", profile_json)
        write_text_atomic(out / "summary.md", summary_markdown(result, per_layer, history))
    return result


def _sparsegpt_bank(model: Any, infos: list, calib: torch.Tensor, target: float, strategist: Any,
                    cfg: SparsifyConfig, placement: Placement, report: Reporter, say: Callable[[str], None],
                    lap: Callable[[str, float], None]) -> Any:
    """The SparseGPT level database the loop scores trial allocations from, over the levels the loop can reach."""
    from .sgpt_bank import SparseGPTBank, levels_for

    t0 = time.perf_counter()
    levels = levels_for(strategist, target)
    with report.task(f"SparseGPT level database ({len(levels)} levels, block by block)", len(decoder_layers(model)[1])) as bar:
        bank = SparseGPTBank(model, infos, calib, levels, cfg.batch_size, placement, progress=bar)
    lap("sparsegpt_bank", t0)
    say(f"SparseGPT level database: {len(levels)} levels {levels[0]:.0%}..{levels[-1]:.0%} per linear, "
        f"{bank.nbytes / 2**30:.2f} GB in a scratch file, {time.perf_counter() - t0:.0f} s")
    return bank


def _store(cfg: SparsifyConfig) -> Any:
    from ..history import HistoryStore, NullHistory

    return HistoryStore(cfg.history) if cfg.use_history else NullHistory()


def _history_seed(cfg: SparsifyConfig, model: Any, infos: list, profile: Any, target: float, journal: Any, run_id: str,
                  say: Callable[[str], None]) -> dict[str, Any]:
    """What earlier runs on this model give this one (warm start, priors for the analyst), journaled once."""
    from ..history import journaled_seed
    from .prior import fingerprint, lookup

    learned = journaled_seed(journal, run_id,
                             lambda: lookup(_store(cfg), fingerprint(model, infos), target, infos, profile.groups))
    if learned.get("warm_start"):
        say(f"history: {len(learned['priors'])} earlier run(s) on this model; the first re-allocation at the target "
            f"starts from run {learned['from_run']}")
    return learned


def _loop(cfg: SparsifyConfig, model: Any, bank: Any, infos: list, profile: Any, probe_ids: torch.Tensor,
          target: float, strategist: Any, journal: Any, run_id: str, say: Callable[[str], None],
          lap: Callable[[str, float], None], report: Reporter | None = None,
          learned: dict[str, Any] | None = None) -> tuple[dict[str, int], dict[str, Any], list[Any]]:
    """Cost probes, then the one Master over the sparsify job (ramp, reference, refine)."""
    from ..history import seed_plan
    from ..jobs.sparsify import RampSettings, SparsifyJob
    from ..loop import LoopLimits, Master

    t0 = time.perf_counter()
    probe_set = Probe(model, probe_ids, cfg.batch_size)
    if cfg.group_probe:
        n_probes = 1 + len(profile.groups) + len({i.block for i in infos})
        with (report or Reporter(False)).task("cost probes (groups, blocks)", n_probes) as bar:
            probe_costs(model, bank, infos, profile, probe_set, target, progress=bar)
        lap("group_probe", t0)
        say(f"probed {len(profile.groups)} groups and {len(profile.block_probe)} blocks at the uniform target")
    t0 = time.perf_counter()
    evals = cfg.evals if cfg.evals is not None else (EVOLVE_EVALS if getattr(strategist, "needs_ramp", True) is False else None)
    if evals is not None and evals < 1:
        raise PlanError("the evaluation budget must be at least 1", evals, "e.g. --evals 100")
    rs = RampSettings(target=target, step=cfg.step, threshold=cfg.rollback_threshold, max_iters=cfg.max_iters,
                      refine_iters=evals if evals is not None else cfg.refine_iters, evals=evals,
                      ramp=getattr(strategist, "needs_ramp", True))
    budget = Budget.parse(sparsity=f"{target * 100:.6g}%").resolve({}).to_json()
    learned = learned or {}
    warm = seed_plan(learned)
    job = SparsifyJob(model, bank, infos, profile, probe_set, rs, budget, warm_start=warm)
    # cached repeats cost no evaluation but are attempts: leave room for them past the evaluation budget
    limits = LoopLimits(max_attempts=max(200, 2 * (evals or 0) + rs.max_iters + 10))
    Master(job, strategist, journal, run_id, seed=cfg.seed, limits=limits, priors=learned.get("priors") or [],
           log=say).run()
    history = journal.attempts(run_id)
    counts = job.best_counts(history)
    best = job.best(history)
    loop_info = {**job.summary(history), "llm_fallbacks": sum(1 for a in history if a.fallback_reason),
                 "best_attempt": best.index if best else None}
    if warm is not None:
        loop_info["warm_start_from"] = learned.get("from_run")
    if getattr(strategist, "needs_ramp", True) is False:
        from ..agents.evolve import evolve_report

        loop_info["search"] = evolve_report(history)
    lap("loop", t0)
    return counts, loop_info, history


def _mods(model: Any, infos: list) -> list[Any]:
    mods = dict(model.named_modules())
    return [mods[i.name] for i in infos]


def summary_markdown(result: dict[str, Any], per_layer: dict[str, float], attempts: list[Any]) -> str:
    d, c = result["dense"], result["compressed"]
    lines = [
        f"# sparsify {result['model']}: {result['pattern']} {c['sparsity']:.2%} ({result['method']}, agent {result['agent']})",
        "",
        "| | dense | compressed |", "|---|---|---|",
        f"| perplexity | {d['perplexity']:.2f} | {c['perplexity']:.2f} |",
        f"| sparsity (parameter-weighted) | 0 | {c['sparsity']:.4f} |",
        f"| knowledge retained | {d['knowledge']['facts']} facts | "
        + (f"{c['knowledge']['retained']:.0%} |" if d["knowledge"]["facts"] else "n/a (no confident facts) |"),
    ]
    if "fidelity" in c:
        lines.append(f"| top-1 agreement / KL | 1 / 0 | {c['fidelity']['top1_agreement']:.3f} / {c['fidelity']['kl']:.4f} |")
    lines += ["", f"Protocol: {json.dumps(result['protocol'])}", "", f"Timings (s): {json.dumps(result['timings_s'])}"]
    if attempts:
        masks = result.get("search_masks", "wanda")
        lines += ["", "Trial allocations were scored with " + ("a SparseGPT level database (each layer's SparseGPT "
                  "weights at the nearest level at or below its count, topped up by Wanda score)" if masks == "sparsegpt" else "Wanda masks")
                  + f"; the final weights are {result['method']}'s, block by block."]
        lines += ["", "## Iterations", "", "| it | phase | level | probe ppl | probe KL | rise | verdict | note |",
                  "|---|---|---|---|---|---|---|---|"]
        for a in attempts:
            note = a.reflection or a.rationale or a.error or ""
            m, st = a.metrics, a.step
            lines.append(f"| {a.index} | {a.phase} | {st.get('from_level', 0):.3f} -> {st.get('level', 0):.3f} | "
                         f"{m.get('probe_ppl', float('nan')):.2f} | {m.get('probe_kl', float('nan')):.4f} | "
                         f"{m.get('rise', float('nan')):+.1%} | {a.verdict} | {note[:160]} |")
    by_block: dict[str, list[float]] = {}
    for n, v in per_layer.items():
        parts = n.split(".")
        kind = ".".join(parts[-2:])
        by_block.setdefault(kind, []).append(v)
    lines += ["", "## Sparsity per layer kind (blocks in order)", ""]
    for kind, vals in by_block.items():
        lines.append(f"- `{kind}`: " + " ".join(f"{v:.2f}" for v in vals))
    return "\n".join(lines) + "\n"
