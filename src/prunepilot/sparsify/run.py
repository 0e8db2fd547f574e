"""One sparsify run end to end: load, split text, measure dense, profile, loop, apply, evaluate, export, write.

Output folder: result.json (results.build_result, kind="sparsify"), plan.json, profile.json,
journal.sqlite (every attempt and LLM call of this run), summary.md, report.html, model/ (save_pretrained).
"""

from __future__ import annotations

import copy
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
from ..errors import PlanError
from ..evaluate.language import fidelity, knowledge_retention, knowledge_targets, mean_nll
from ..results import build_result, write_json_atomic, write_text_atomic
from ..sources.llm import load_causal_lm
from ..sources.text import load_split, token_blocks
from .calibrate import activation_norms, gradient_importance, linear_layers, sequential_sparsify
from .export import save_and_verify, sparse_size_mb
from .loop import Probe, probe_costs
from .plan import project, resolve
from .profile import WandaBank, build_profile

ONE_SHOT = ("uniform", "owl")  # allocate once at the target; no loop


@dataclass
class SparsifyConfig:
    model: str
    sparsity: str = "50%"  # "50%" / "0.5" (unstructured, global parameter-weighted) or "2:4" / "4:8"
    method: str = "sparsegpt"  # how the final masks/weights are computed: magnitude | wanda | sparsegpt
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
    bands: int = 3
    group_probe: bool = True  # measure each group's and block's marginal cost (sensitivity / LLM agents)
    batch_size: int = 4
    seed: int = 0
    export: bool = True
    llm_base_url: str | None = None
    client: Any = None  # an LLMClient to use instead of building one from `agent` (tests, benches)
    extra: dict[str, Any] = field(default_factory=dict)


def parse_sparsity(text: str) -> tuple[float, sp.NM | None]:
    nm = sp.parse_nm(text)
    if nm is not None:
        return nm.sparsity, nm
    resolved = Budget.parse(sparsity=text).resolve({})
    return resolved.goals["sparsity"], None


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_sparsify(cfg: SparsifyConfig, out: Path | None = None, say: Callable[[str], None] = print, *,
                 run_id: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Run one sparsify job (or with `run_id`, continue a journaled one from its last attempt). Every attempt and
    LLM call goes to OUT/journal.sqlite as it happens; the run is marked done or failed there and report.html is
    rendered. Without `out` the journal lives in a temporary folder and nothing else is written."""
    import tempfile

    from ..journal import Journal, prepare_out

    parse_sparsity(cfg.sparsity)  # a bad target is refused before anything is written
    tmp = None
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="prunepilot-sparsify-")
        jdir, write = Path(tmp.name), False
    else:
        prepare_out(out, overwrite=overwrite, resume=run_id is not None)
        jdir, write = out, True
    journal = Journal(jdir / "journal.sqlite")
    if run_id is None:
        config = {k: v for k, v in asdict(cfg).items() if k != "client"} | {"out": str(out) if out else None}
        run_id = journal.start_run("sparsify", config, out or jdir)
    else:
        journal.set_status(run_id, "running")
    if write:
        (jdir / "run_id").write_text(run_id)
    say(f"run {run_id} (journal {jdir / 'journal.sqlite'})")
    try:
        result = _run(cfg, out, say, journal, run_id)
    except BaseException as exc:
        journal.finish_run(run_id, "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed",
                           {"error": f"{type(exc).__name__}: {exc}"[:2000]})
        raise
    finally:
        if tmp is not None:
            tmp.cleanup()
    if write:
        journal.finish_run(run_id, "done", result)
        from ..report.render import render_safely

        render_safely(out, say)
    return result


def _run(cfg: SparsifyConfig, out: Path | None, say: Callable[[str], None], journal: Any, run_id: str) -> dict[str, Any]:
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    target, nm = parse_sparsity(cfg.sparsity)
    torch.manual_seed(cfg.seed)

    def lap(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 2)

    t0 = time.perf_counter()
    lm = load_causal_lm(cfg.model)
    model, tok = lm.model, lm.tokenizer
    infos = linear_layers(model)
    lap("load", t0)

    t0 = time.perf_counter()
    text = load_split(cfg.calib, cfg.eval)
    cut = int(len(text.calib) * 0.9)  # the probe slice comes from held-out calibration text, never eval
    calib = token_blocks(tok, text.calib[:cut], cfg.calib_seqlen, cfg.calib_seqs, seed=cfg.seed)
    probe = token_blocks(tok, text.calib[cut:], cfg.probe_seqlen, cfg.probe_seqs)
    evalb = token_blocks(tok, text.eval, cfg.eval_seqlen, cfg.eval_seqs)
    protocol = {**text.protocol, "calib": f"{cfg.calib_seqs}x{cfg.calib_seqlen}", "probe": f"{cfg.probe_seqs}x{cfg.probe_seqlen} (last 10% of calibration text)",
                "eval": f"{cfg.eval_seqs}x{cfg.eval_seqlen}", "eval_tokens": int(evalb.numel()), "seed": cfg.seed,
                "fidelity": f"{cfg.fidelity_seqs}x{cfg.eval_seqlen}"}
    lap("text", t0)

    say(f"{lm.name}: {len(infos)} prunable linears, {sum(i.params for i in infos)/1e6:.1f}M weights; target {cfg.sparsity}")
    t0 = time.perf_counter()
    dense_nll = mean_nll(model, evalb, cfg.batch_size)
    facts = knowledge_targets(model, tok)
    dense_metrics = {"perplexity": math.exp(dense_nll), "sparsity": 0.0,
                     "knowledge": knowledge_retention(model, tok, facts)}
    dense_model = copy.deepcopy(model) if cfg.fidelity_seqs else None
    lap("dense_eval", t0)
    say(f"dense perplexity {dense_metrics['perplexity']:.2f} on {evalb.numel()} tokens")

    from ..agents.registry import make_strategist

    strategist, agent_used = make_strategist(cfg.agent, "sparsify", base_url=cfg.llm_base_url, client=cfg.client, say=say)
    total = sum(i.params for i in infos)
    profile_json: dict[str, Any] | None = None
    loop_info: dict[str, Any] = {}
    history: list[Any] = []

    if nm is not None:
        counts = {i.name: int(round(nm.sparsity * i.params)) for i in infos}
        agent_used = f"{agent_used} (N:M fixes every layer at {nm}; nothing to allocate)"
    elif cfg.agent == "uniform":  # needs no profile
        counts = project({}, infos, target)
    else:
        t0 = time.perf_counter()
        norms = activation_norms(model, calib, cfg.batch_size)
        grads = gradient_importance(model, calib[: cfg.grad_seqs, : min(cfg.calib_seqlen, 256)], 1) if cfg.grad_seqs else {}
        bank = WandaBank(model, infos, norms)
        profile = build_profile(lm.name, target, infos, bank, grads, cfg.bands)
        lap("profile", t0)
        if cfg.agent in ONE_SHOT:
            from ..agents.context import Context

            ctx = Context("sparsify", profile, {}, [], phase="ramp",
                          step={"level": target, "target": target, "current": {i.name: 0.0 for i in infos}})
            plan = strategist.propose(ctx)
            assert plan is not None  # one-shot strategists always answer on the ramp
            counts = project(resolve(plan, infos, profile.groups, {}), infos, target)
        else:
            counts, loop_info, history = _loop(cfg, model, bank, infos, profile, probe, target, strategist, journal,
                                               run_id, say, lap)
        profile_json = profile.to_json()
        bank.restore()
        del bank

    # final application: sequential block-by-block calibration with the chosen method
    t0 = time.perf_counter()
    achieved = sequential_sparsify(model, calib, counts, cfg.method, nm, cfg.batch_size)
    lap("apply", t0)
    achieved_global = sum(achieved[i.name] * i.params for i in infos) / total
    if nm is not None and not all(sp.is_nm(m.weight, nm) for m in _mods(model, infos)):
        raise PlanError("the N:M pattern did not hold after pruning", str(nm), "report this as a bug")

    t0 = time.perf_counter()
    comp_nll = mean_nll(model, evalb, cfg.batch_size)
    compressed = {"perplexity": math.exp(comp_nll), "sparsity": achieved_global,
                  "knowledge": knowledge_retention(model, tok, facts)}
    if dense_model is not None:
        compressed["fidelity"] = fidelity(model, dense_model, evalb[: cfg.fidelity_seqs], 1)
        del dense_model
    lap("final_eval", t0)
    say(f"{cfg.method} @ {cfg.sparsity} ({agent_used}): perplexity {compressed['perplexity']:.2f}, sparsity {achieved_global:.4f}")

    export_info: dict[str, Any] = {}
    compressed["sparse_size_mb"] = sparse_size_mb(model, [i.name for i in infos])
    if out and cfg.export:
        t0 = time.perf_counter()
        export_info = save_and_verify(model, tok, out / "model", evalb[:1, :128])
        compressed["size_mb"] = export_info["size_mb"]
        lap("export", t0)

    budget = Budget.parse(sparsity=f"{target * 100:.6g}%").resolve({})
    err = (achieved_global - target) / target if target else achieved_global
    per_layer = {n: round(v, 6) for n, v in achieved.items()}
    timings["total"] = round(time.perf_counter() - t_start, 2)
    result = build_result(
        kind="sparsify", model=cfg.model, budget=budget.to_json(), dense=dense_metrics, compressed=compressed,
        within_band=budget.within("sparsity", achieved_global), errors={"sparsity": err},
        method=cfg.method, pattern=str(nm) if nm else "unstructured", agent=agent_used, protocol=protocol,
        loop=loop_info, timings_s=timings, peak_rss_mb=_peak_rss_mb(), export=export_info,
        config={k: v for k, v in asdict(cfg).items() if k != "client"}, run_id=run_id,
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


def _loop(cfg: SparsifyConfig, model: Any, bank: WandaBank, infos: list, profile: Any, probe_ids: torch.Tensor,
          target: float, strategist: Any, journal: Any, run_id: str, say: Callable[[str], None],
          lap: Callable[[str, float], None]) -> tuple[dict[str, int], dict[str, Any], list[Any]]:
    """Cost probes, then the one Master over the sparsify job (ramp, reference, refine)."""
    from ..jobs.sparsify import RampSettings, SparsifyJob
    from ..loop import Master

    t0 = time.perf_counter()
    probe_set = Probe(model, probe_ids, cfg.batch_size)
    if cfg.group_probe:
        probe_costs(model, bank, infos, profile, probe_set, target)
        lap("group_probe", t0)
        say(f"probed {len(profile.groups)} groups and {len(profile.block_probe)} blocks at the uniform target")
    t0 = time.perf_counter()
    rs = RampSettings(target=target, step=cfg.step, threshold=cfg.rollback_threshold, max_iters=cfg.max_iters,
                      refine_iters=cfg.refine_iters)
    budget = Budget.parse(sparsity=f"{target * 100:.6g}%").resolve({}).to_json()
    job = SparsifyJob(model, bank, infos, profile, probe_set, rs, budget)
    Master(job, strategist, journal, run_id, seed=cfg.seed, log=say).run()
    history = journal.attempts(run_id)
    counts = job.best_counts(history)
    loop_info = {**job.summary(history), "llm_fallbacks": sum(1 for a in history if a.fallback_reason)}
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
