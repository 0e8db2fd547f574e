"""The run report: `report.html` (self-contained) and `report.md` (+ PNGs beside it) from a run folder.

Reads what a run leaves on disk (result.json, and when present profile.json, attempts.jsonl,
llm_calls.jsonl, plan.json, quantization.json) and renders whatever is there: a missing file, key or
malformed line is noted in the report, never fatal. Every string from a run (layer names, LLM rationales)
is escaped: autoescaped in HTML, HTML- and Markdown-escaped in Markdown, so LLM output stays inert text.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import os
import re
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..results import write_text_atomic
from . import plots

HTML_NAME, MD_NAME = "report.html", "report.md"
PLOT_PREFIX = "report-"
CLIP_AT = 700  # characters of an LLM rationale shown inline; the HTML folds the rest, attempts.jsonl keeps it all
# metrics stored as fractions and shown in percent (matched on the last dotted component)
PERCENT_METRICS = {"accuracy", "top1", "top5", "fidelity_agreement", "sparsity", "agreement", "top1_agreement", "retained"}
COST_ORDER = ("macs", "params", "latency_ms", "size_mb", "memory_mb", "sparsity")
QUALITY_ORDER = ("accuracy", "top5", "mse", "mae", "fidelity_agreement", "fidelity_kl", "perplexity")
# top-level result.json keys the report shows in their own sections (the rest go to "Other details")
SHOWN_KEYS = {
    "kind", "model", "budget", "dense", "compressed", "within_band", "errors", "environment", "projection",
    "speedup", "ideal_speedup", "widths", "skipped", "export", "best_round", "stop_reason",
    "sparsity_per_layer", "quantized_layers", "quantization", "protected", "notes", "latency", "seconds",
    "latency_targeting", "blocks_removed",
}


@dataclass
class RunFiles:
    """The parsed contents of a run folder; `problems` says what could not be read."""

    result: dict[str, Any] = field(default_factory=dict)
    profile: dict[str, Any] | None = None
    plan: dict[str, Any] | None = None
    quantization: dict[str, Any] | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)
    llm_calls: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _read_json(path: Path, problems: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        problems.append(f"{path.name}: unreadable ({type(exc).__name__}: {str(exc)[:120]}); not shown")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path.name}: expected a JSON object, found {type(data).__name__}; not shown")
        return None
    return data


def _read_jsonl(path: Path, problems: list[str]) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            bad += 1  # e.g. a line cut short by a crash
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    if bad:
        problems.append(f"{path.name}: {bad} malformed line(s) skipped")
    return rows


def load_run(run_dir: Path) -> RunFiles:
    """Everything the report reads; tolerant of any file being absent or damaged."""
    rf = RunFiles()
    result = _read_json(run_dir / "result.json", rf.problems)
    if result is None and not (run_dir / "result.json").exists():
        rf.problems.append("result.json: absent (the run may not have finished); showing what else is there")
    rf.result = result or {}
    rf.profile = _read_json(run_dir / "profile.json", rf.problems)
    rf.plan = _read_json(run_dir / "plan.json", rf.problems)
    rf.quantization = _read_json(run_dir / "quantization.json", rf.problems)
    kind = str(rf.result.get("kind") or "")
    attempts, calls = _from_journal(run_dir, rf)
    if attempts is None:
        attempts = _read_jsonl(run_dir / "attempts.jsonl", rf.problems)
        calls = _read_jsonl(run_dir / "llm_calls.jsonl", rf.problems)
    rf.attempts = [normalise_attempt(a, kind) for a in attempts]
    rf.llm_calls = [normalise_call(c) for c in calls or []]
    return rf


def _from_journal(run_dir: Path, rf: RunFiles) -> tuple[list[dict[str, Any]] | None, list[dict[str, Any]] | None]:
    """The run's attempts and LLM calls from OUT/journal.sqlite, for this run id only (never a mix of runs)."""
    run_id = rf.result.get("run_id")
    if not run_id and (run_dir / "run_id").is_file():
        run_id = (run_dir / "run_id").read_text().strip()
    if not run_id or not (run_dir / "journal.sqlite").is_file():
        return None, None
    try:
        from ..journal import Journal

        j = Journal(run_dir / "journal.sqlite")
        attempts = [a.model_dump() for a in j.attempts(run_id)]
        calls = j.llm_calls(run_id)
    except Exception as exc:  # a damaged journal: say so, fall back to the files
        rf.problems.append(f"journal.sqlite: unreadable ({type(exc).__name__}: {str(exc)[:120]})")
        return None, None
    return attempts, calls


# ---------------------------------------------------------------- normalisation

# verdict spellings seen in run folders -> the report's vocabulary (markers, colours)
VERDICT_ALIASES = {"accept": "kept", "accepted": "kept", "keep": "kept", "forced": "kept", "improved": "kept",
                   "rollback": "rolled_back", "rolled back": "rolled_back", "reject": "worse", "rejected": "worse",
                   "error": "failed"}
# metrics an attempt may carry at top level instead of under "metrics"
TOP_LEVEL_METRICS = ("accuracy", "perplexity", "fidelity_agreement", "macs", "params", "latency_ms", "size_mb",
                     "memory_mb", "sparsity")


def normalise_verdict(v: Any) -> str:
    raw = str(v or "").strip().lower()
    if raw in VERDICT_ALIASES:
        return VERDICT_ALIASES[raw]
    if raw.startswith(("rollback", "rolled")):
        return "rolled_back"
    return raw.replace(" ", "_")


def normalise_attempt(a: dict[str, Any], kind: str) -> dict[str, Any]:
    """One attempt in the common shape (round, metrics, verdict, reflection), whatever loop wrote it; the
    original verdict text is kept for the table."""
    out = dict(a)
    if out.get("round") is None:
        for k in ("iteration", "step", "attempt", "index"):
            if out.get(k) is not None and not isinstance(out[k], dict):  # a Master attempt's step is a dict
                out["round"] = out[k]
                break
    metrics = dict(a["metrics"]) if isinstance(a.get("metrics"), dict) else {}
    for k in TOP_LEVEL_METRICS:
        if k not in metrics and num(a.get(k)) is not None:
            metrics[k] = a[k]
    if "probe_perplexity" not in metrics and num(metrics.get("probe_ppl")) is not None:
        metrics["probe_perplexity"] = metrics["probe_ppl"]
    if "probe_perplexity" not in metrics and num(a.get("probe_ppl")) is not None:
        metrics["probe_perplexity"] = a["probe_ppl"]  # the sparsify loop scores candidates on a probe slice
    if "probe_kl" not in metrics and num(a.get("probe_kl")) is not None:
        metrics["probe_kl"] = a["probe_kl"]  # ... and keeps the one closest to the dense model there
    if kind == "sparsify" and "sparsity" not in metrics and num(a.get("achieved")) is not None:
        metrics["sparsity"] = a["achieved"]
    out["metrics"] = metrics
    out["verdict_text"] = str(a.get("verdict") or "")
    out["verdict"] = normalise_verdict(a.get("verdict"))
    refl = [str(x) for x in (a.get("reflection"), a.get("llm_reflection")) if x]
    out["reflection"] = "\n".join(dict.fromkeys(refl))
    return out


def normalise_call(c: dict[str, Any]) -> dict[str, Any]:
    out = dict(c)
    if out.get("round") is None:
        for k in ("iteration", "level"):
            if out.get(k) is not None:
                out["round"] = f"{k} {out[k]:.3g}" if isinstance(out[k], float) else out[k]
                break
    if not out.get("status"):
        out["status"] = "error" if c.get("error") else ("ok" if c.get("reply") is not None or c.get("data") is not None else "?")
    return out


# ---------------------------------------------------------------- formatting


def num(v: Any) -> float | None:
    return plots._num(v)


def fmt(metric: str, v: Any) -> str:
    """A metric value for humans; '—' when absent; non-numbers shown as text."""
    f = num(v)
    if f is None:
        return "—" if v is None else str(v)
    if metric in ("macs", "params", "input_tokens", "output_tokens"):
        a = abs(f)
        if a >= 1e9:
            return f"{f / 1e9:.4g} G"
        if a >= 1e6:
            return f"{f / 1e6:.4g} M"
        if a >= 1e3:
            return f"{f / 1e3:.4g} k"
        return f"{f:.4g}"
    if metric.rsplit(".", 1)[-1] in PERCENT_METRICS:
        return f"{100 * f:.2f}%"
    if metric.endswith("_ms"):
        return f"{f:.4g} ms"
    if metric.endswith("_mb"):
        return f"{f:.4g} MB"
    if metric.endswith("_s") or metric == "seconds":
        return f"{f:.3g} s"
    return f"{f:.4g}"


def pct(e: Any, signed: bool = True) -> str:
    f = num(e)
    if f is None:
        return "—"
    return f"{100 * f:+.2f}%" if signed else f"{100 * f:.2f}%"


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def short_json(v: Any, limit: int = 300) -> str:
    text = v if isinstance(v, str) else json.dumps(v, default=str, separators=(", ", ": "))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def md(text: Any) -> str:
    """Markdown-safe inline text: HTML-escaped (so `<script>` is inert), Markdown syntax and table pipes
    escaped (so LLM text cannot add links, images or columns), newlines as <br>."""
    s = html.escape("" if text is None else str(text), quote=False)
    s = re.sub(r"([\\`*_\[\]|#!~])", r"\\\1", s)
    return s.replace("\r\n", "\n").replace("\n", "<br>")


def clip(text: Any, n: int) -> str:
    s = "" if text is None else str(text)
    return s if len(s) <= n else s[: n - 1].rstrip() + "…"


def md_code(text: Any) -> str:
    """A layer name etc. as inline code; backticks dropped, pipes escaped for tables."""
    s = str(text).replace("`", "'").replace("|", "\\|").replace("\n", " ")
    return f"`{s}`"


# ---------------------------------------------------------------- sections


def budget_section(r: dict[str, Any]) -> dict[str, Any]:
    budget = r.get("budget") if isinstance(r.get("budget"), dict) else {}
    targets = budget.get("targets") if isinstance(budget.get("targets"), dict) else {}
    band = budget.get("band") if isinstance(budget.get("band"), dict) else None
    comp = r.get("compressed") if isinstance(r.get("compressed"), dict) else {}
    errors = r.get("errors") if isinstance(r.get("errors"), dict) else {}
    rows = []
    for m, t in targets.items():
        t = t if isinstance(t, dict) else {"goal": t}
        goal = num(t.get("goal"))
        achieved = comp.get(m)
        err = errors.get(m)
        if err is None and goal and num(achieved) is not None:
            err = (float(achieved) - goal) / goal
        inside = None
        if num(err) is not None and band and num(band.get("over")) is not None and num(band.get("under")) is not None:
            if m == "sparsity" and goal is not None and num(achieved) is not None:
                inside = abs(float(achieved) - goal) <= 0.005  # as Budget.within: sparsity is exact to 0.5 pt
            else:
                inside = -float(band["under"]) - 1e-12 <= float(err) <= float(band["over"]) + 1e-12
        rows.append({"metric": m, "text": str(t.get("text") or ""), "goal": fmt(m, goal),
                     "achieved": fmt(m, achieved), "error": pct(err), "inside": inside})
    band_text = None
    if band and num(band.get("over")) is not None and num(band.get("under")) is not None:
        band_text = f"+{100 * float(band['over']):.1f}% / −{100 * float(band['under']):.1f}%"
    within = r.get("within_band")
    if not rows:  # e.g. quantize: within_band is true by convention, there is no band to be within
        within = None
    return {"rows": rows, "band": band_text if rows else None, "within": within if isinstance(within, bool) else None}


def flatten_metrics(block: Any) -> dict[str, Any]:
    """{'fidelity': {'kl': 0.1}} -> {'fidelity.kl': 0.1}, one level deep, numbers only for nested values; a
    nested key that repeats a top-level one (memory.memory_mb) is dropped."""
    if not isinstance(block, dict):
        return {}
    flat = {k: v for k, v in block.items() if _scalar(v)}
    for k, v in block.items():
        if isinstance(v, dict):
            for k2, v2 in v.items():
                if k2 not in block and num(v2) is not None and not isinstance(v2, bool):
                    flat[f"{k}.{k2}"] = v2
    return flat


def compare_section(r: dict[str, Any]) -> dict[str, Any]:
    dense = flatten_metrics(r.get("dense"))
    comp = flatten_metrics(r.get("compressed"))
    keys = [k for k in (*COST_ORDER, *QUALITY_ORDER) if k in dense or k in comp]
    keys += [k for k in dict.fromkeys([*dense, *comp]) if k not in keys and k != "module_ms"
             and _scalar(dense.get(k)) and _scalar(comp.get(k)) and (num(dense.get(k)) is not None or num(comp.get(k)) is not None)]
    rows = []
    for k in keys:
        d, c = num(dense.get(k)), num(comp.get(k))
        if k in PERCENT_METRICS and d is not None and c is not None:
            change = f"{100 * (c - d):+.2f} pt"
        elif d and c is not None:
            change = f"×{c / d:.3f}"
        else:
            change = "—"
        rows.append({"metric": k, "dense": fmt(k, dense.get(k)), "compressed": fmt(k, comp.get(k)), "change": change})
    before = (r.get("compressed") or {}).get("before_recovery") if isinstance(r.get("compressed"), dict) else None
    for k, v in (before.items() if isinstance(before, dict) else []):  # the winner as the loop scored it
        d, c = num(dense.get(k)), num(v)
        change = f"{100 * (c - d):+.2f} pt" if k in PERCENT_METRICS and d is not None and c is not None else "—"
        rows.append({"metric": f"{k} before the final recovery", "dense": fmt(k, dense.get(k)), "compressed": fmt(k, v),
                     "change": change})
    speed = None
    sp, ideal = num(r.get("speedup")), num(r.get("ideal_speedup"))
    if ideal is None and num(dense.get("macs")) and num(comp.get("macs")):
        ideal = float(dense["macs"]) / float(comp["macs"])
    if sp is not None or ideal is not None:
        env = r.get("environment") if isinstance(r.get("environment"), dict) else {}
        parts = []
        if sp is not None:
            threads = f", {env['threads']} threads" if env.get("threads") is not None else ""
            parts.append(f"measured CPU speed-up {sp:.2f}× (side by side{threads})")
        if ideal is not None:
            parts.append(f"MAC ratio {ideal:.2f}×")
        if sp is not None and ideal:
            parts.append(f"{100 * sp / ideal:.0f}% of the MAC ratio realised")
        speed = "; ".join(parts)
        if isinstance(r.get("speed_explanation"), str) and r["speed_explanation"]:
            speed += ". " + r["speed_explanation"]
    removed = r.get("blocks_removed")
    if isinstance(removed, list) and removed:
        speed = (speed + ". " if speed else "") + (f"{len(removed)} residual block(s) removed whole (replaced by the "
                                                  f"identity): " + ", ".join(str(b) for b in removed[:12])
                                                  + (", …" if len(removed) > 12 else ""))
    timings = []
    lat = r.get("latency")
    for name, t in (lat.items() if isinstance(lat, dict) else []):
        if isinstance(t, dict):
            timings.append({"name": str(name), "median": fmt("median_ms", t.get("median_ms")), "p90": fmt("p90_ms", t.get("p90_ms")),
                            "runs": str(t.get("runs", "—")), "threads": str(t.get("threads", "—"))})
    return {"rows": rows, "speed": speed, "timings": timings}


def latency_section(r: dict[str, Any]) -> dict[str, Any] | None:
    """The device's latency model (what the projector predicted from) and the channel multiple each family got."""
    lat = r.get("latency_targeting")
    if not isinstance(lat, dict) or not isinstance(lat.get("model"), dict):
        return None
    lm = lat["model"]
    facts = [("device", str(lm.get("fingerprint", "—"))),
             ("tables", f"{lm.get('ops', '?')} ops in {lm.get('tables', '?')} tables; {lm.get('measured_points', '?')} "
                        f"points measured, {lm.get('cached_points', '?')} cached; {lm.get('seconds', '?')} s")]
    alloc = lm.get("allocator") if isinstance(lm.get("allocator"), dict) else None
    if alloc:
        facts.append(("allocator", f"{alloc.get('allocator', '?')}: {alloc.get('why', '')}"))
    if num(lm.get("dense_ms")) is not None and num(lm.get("ops_dense_ms")) is not None:
        facts.append(("dense", f"measured {lm['dense_ms']:.2f} ms; the tables' ops sum {lm['ops_dense_ms']:.2f} ms, the "
                               f"rest (norms, activations, pools, adds) {lm['dense_ms'] - lm['ops_dense_ms']:.2f} ms"))
    comp = r.get("compressed") if isinstance(r.get("compressed"), dict) else {}
    p, m = num(comp.get("latency_predicted_ms")), num(comp.get("latency_ms"))
    if p and m:
        facts.append(("pruned", f"predicted {p:.2f} ms, measured {m:.2f} ms ({m / p - 1:+.1%})"))
    check = lm.get("alignment_check") if isinstance(lm.get("alignment_check"), dict) else {}
    if check.get("options"):
        opts = "; ".join(f"{k}: {float(o.get('per_mac', 0)):.3f}" for k, o in check["options"].items() if isinstance(o, dict))
        facts.append(("alignment check", f"uniform copies in the whole network, latency per MAC kept ({opts}); kept: "
                                         f"{check.get('chosen', '?')}"))
    facts += [("note", str(n)) for n in lat.get("notes") or []]
    rows = []
    for fam, a in (lat.get("alignment") or {}).items():
        if isinstance(a, dict):
            vs = a.get("vs_trend") or {}
            rows.append({"family": str(fam), "multiple": str(a.get("multiple", "—")),
                         "vs_trend": ", ".join(f"{k}: {float(v):.3f}" for k, v in vs.items() if num(v) is not None),
                         "ops": clip(a.get("op", ""), 80)})
    return {"facts": facts, "alignment": rows}


def facts_section(r: dict[str, Any], attempts: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Short run facts: stop reason, best round, projection, run time, notes."""
    facts: list[tuple[str, str]] = []
    for key, label in (("stop_reason", "stop reason"), ("best_round", "best round")):
        if r.get(key) is not None:
            facts.append((label, str(r[key])))
    if attempts:
        facts.append(("attempts", str(len(attempts))))
    proj = r.get("projection")
    if isinstance(proj, dict):
        bits = []
        if proj.get("iterations") is not None:
            bits.append(f"{proj['iterations']} evaluations")
        if num(proj.get("seconds")) is not None:
            bits.append(f"in {float(proj['seconds']):.3g} s")
        if proj.get("corrections"):
            bits.append(f"{proj['corrections']} real-count correction(s)")
        if proj.get("feasible") is False:
            bits.append("infeasible")
        if proj.get("reason"):
            bits.append(str(proj["reason"]))
        if bits:
            facts.append(("projection", ", ".join(bits)))
        for n in proj.get("notes") or []:
            facts.append(("projection note", str(n)))
    if num(r.get("seconds")) is not None:
        facts.append(("run time", f"{float(r['seconds']):.1f} s"))
    notes = r.get("notes")
    for n in notes if isinstance(notes, list) else ([notes] if notes else []):
        facts.append(("note", str(n)))
    return facts


def plan_summary(plan: Any) -> str:
    """One line per plan: scalar settings and the spread of its ratio maps."""
    if not isinstance(plan, dict):
        return "" if plan is None else short_json(plan, 200)
    parts = []
    for k, v in plan.items():
        if k in ("rationale", "reflection", "version", "source"):
            continue
        if isinstance(v, dict):
            vals = [num(x) for x in v.values()]
            vals_f = [x for x in vals if x is not None]
            if not v:
                continue
            if vals_f and len(vals_f) == len(vals):
                parts.append(f"{k}: {len(v)} keys, {min(vals_f):.3g}–{max(vals_f):.3g}")
            else:
                parts.append(f"{k}: {short_json(v, 80)}")
        elif isinstance(v, list):
            if v:
                parts.append(f"{k}: {short_json(v, 80)}")
        elif v not in (None, "", False):
            parts.append(f"{k}: {v}")
    return "; ".join(parts)


def attempts_section(attempts: list[dict[str, Any]], goals: dict[str, float], best_round: Any) -> list[dict[str, Any]]:
    xs, _ = plots.attempt_x(attempts)
    qkey = plots.quality_key(attempts)
    rows = []
    for x, a in zip(xs, attempts):
        errs = plots.attempt_errors(a, goals)
        metrics = a.get("metrics") if isinstance(a.get("metrics"), dict) else {}
        guidance = a.get("guidance")
        guidance = [str(g) for g in guidance] if isinstance(guidance, list) else ([str(guidance)] if guidance else [])
        plan = a.get("plan")
        rationale = a.get("rationale") or (plan.get("rationale") if isinstance(plan, dict) else None)
        rows.append({
            "x": a.get("round", int(x)),
            "strategist": str(a.get("strategist") or ""),
            "verdict": str(a.get("verdict") or ""),
            "verdict_text": str(a.get("verdict_text") or a.get("verdict") or ""),
            "best": a.get("verdict") == "best" or (best_round is not None and a.get("round") == best_round),
            "errors": ", ".join(f"{m} {pct(e)}" for m, e in errs.items()),
            "within": a.get("within_band") if isinstance(a.get("within_band"), bool) else None,
            "quality": fmt(qkey, metrics.get(qkey)) if qkey and metrics.get(qkey) is not None else "",
            "seconds": fmt("seconds", a.get("seconds")) if a.get("seconds") is not None else "",
            "plan": plan_summary(plan if plan is not None else
                                 ({"group_sparsity": a["group_sparsity"]} if isinstance(a.get("group_sparsity"), dict) else None)),
            "rationale": str(rationale or ""),
            "reflection": str(a.get("reflection") or ""),
            "guidance": guidance,
            "fallback": str(a.get("fallback_reason") or ""),
        })
    return rows


def llm_section(calls: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not calls:
        return None
    by_model: dict[str, list[dict[str, Any]]] = {}
    for c in calls:
        by_model.setdefault(str(c.get("model") or "?"), []).append(c)

    def stats(cs: list[dict[str, Any]], label: str) -> dict[str, Any]:
        lat = [float(c["latency_s"]) for c in cs if num(c.get("latency_s")) is not None]
        status: dict[str, int] = {}
        for c in cs:
            s = str(c.get("status") or "?")
            status[s] = status.get(s, 0) + 1
        return {
            "model": label,
            "calls": len(cs),
            "status": ", ".join(f"{k} {v}" for k, v in sorted(status.items())),
            "input_tokens": fmt("input_tokens", sum(num(c.get("input_tokens")) or 0 for c in cs)),
            "output_tokens": fmt("output_tokens", sum(num(c.get("output_tokens")) or 0 for c in cs)),
            "latency": (f"{statistics.median(lat):.2f} s median, {max(lat):.2f} s max, {sum(lat):.1f} s total"
                        if lat else "—"),
        }

    rows = [stats(cs, m) for m, cs in by_model.items()]
    if len(rows) > 1:
        rows.append(stats(calls, "all"))
    per_call = [{"round": str(c.get("round", "")), "model": str(c.get("model") or ""), "status": str(c.get("status") or ""),
                 "input_tokens": str(c.get("input_tokens", "")), "output_tokens": str(c.get("output_tokens", "")),
                 "latency": fmt("latency_s", c.get("latency_s")) if c.get("latency_s") is not None else ""} for c in calls]
    return {"rows": rows, "calls": per_call}


def _reason_map(v: Any, default_reason: str) -> list[tuple[str, str]]:
    """{layer: reason} | [{name, reason}] | [layer] -> [(layer, reason)]."""
    if isinstance(v, dict):
        return [(str(k), str(r) if not isinstance(r, (dict, list)) else short_json(r, 200)) for k, r in v.items()]
    out = []
    if isinstance(v, list):
        for item in v:
            if isinstance(item, dict):
                name = item.get("name") or item.get("layer") or item.get("group") or "?"
                out.append((str(name), str(item.get("reason") or default_reason)))
            elif item is not None:
                out.append((str(item), default_reason))
    return out


def skipped_section(rf: RunFiles) -> list[dict[str, str]]:
    """Every layer not compressed, and why, from every place a run records it (deduplicated)."""
    r = rf.result
    rows: list[dict[str, str]] = []
    seen: set[tuple[str, str]] = set()

    def add(layer: str, status: str, reason: str, source: str) -> None:
        if (layer, status) in seen:
            return
        seen.add((layer, status))
        rows.append({"layer": layer, "status": status, "reason": reason, "source": source})

    for layer, why in _reason_map(r.get("skipped"), "skipped"):
        add(layer, "skipped", why, "result.json")
    if rf.profile:
        for layer, why in _reason_map(rf.profile.get("ignored"), "not prunable"):
            add(layer, "skipped", why, "profile.json")
    protected: list[Any] = []
    if isinstance(r.get("protected"), (list, dict)):
        protected.append(r["protected"])
    if rf.plan:
        for part in ("requested", "projected"):
            p = rf.plan.get(part)
            if isinstance(p, dict) and p.get("protected"):
                protected.append(p["protected"])
        if rf.plan.get("protected"):
            protected.append(rf.plan["protected"])
    for p in protected:
        for layer, why in _reason_map(p, "protected by the plan"):
            add(layer, "protected", why, "plan")
    quant = rf.quantization or (r.get("quantization") if isinstance(r.get("quantization"), dict) else None)
    if quant:
        for layer, why in _reason_map(quant.get("skipped"), "not quantized"):
            add(layer, "not quantized", why, "quantization")
    return rows


def quant_section(rf: RunFiles) -> dict[str, Any] | None:
    q = rf.quantization or (rf.result.get("quantization") if isinstance(rf.result.get("quantization"), dict) else None)
    ql = rf.result.get("quantized_layers")
    if not q and not ql:
        return None
    facts = []
    for k, v in (q or {}).items():
        if k in ("quantized", "skipped", "plan_map"):
            continue
        if k.endswith("_bytes") and num(v) is not None:
            facts.append((k.removesuffix("_bytes"), _size(int(v))))
        elif k.endswith("params") and num(v) is not None:
            facts.append((k, fmt("params", v)))
        elif _scalar(v) and v is not None:
            facts.append((k, fmt(k, v) if isinstance(v, float) else str(v)))
        elif isinstance(v, dict) and v:
            facts.append((k, short_json(v, 300)))
    layers = _reason_map((q or {}).get("quantized") or ql or [], "quantized")
    for k in ("backend", "scheme"):
        if rf.result.get(k) is not None and all(f[0] != k for f in facts):
            facts.insert(0, (k, str(rf.result[k])))
    return {"facts": facts, "layers": [{"layer": a, "how": b} for a, b in layers]}


def kv_rows(d: Any, run_dir: Path | None = None) -> list[tuple[str, str]]:
    if not isinstance(d, dict):
        return []
    rows = []
    for k, v in d.items():
        text = "—" if v is None else (fmt(str(k), v) if isinstance(v, float) else str(v) if _scalar(v) else short_json(v, 400))
        if run_dir is not None and isinstance(v, str) and v and "/" not in v.strip("./") and (run_dir / v).is_file():
            text += f" ({_size((run_dir / v).stat().st_size)})"
        rows.append((str(k), text))
    return rows


def _size(n: int) -> str:
    return f"{n / 2**20:.2f} MB" if n >= 2**20 else f"{n / 2**10:.1f} KB"


def other_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for k, v in r.items():
        if k in SHOWN_KEYS:
            continue
        if _scalar(v):
            rows.append((k, "—" if v is None else (fmt(k, v) if isinstance(v, float) else str(v))))
        elif isinstance(v, dict) and 0 < len(v) <= 40:  # e.g. protocol, timings, loop: one row per entry
            for k2, v2 in v.items():
                key = f"{k}.{k2}"
                rows.append((key, "—" if v2 is None else (fmt(key, v2) if isinstance(v2, float) else short_json(v2, 300))))
        elif isinstance(v, (list, dict)) and len(json.dumps(v, default=str)) <= 400:
            rows.append((k, short_json(v, 400)))
        else:
            rows.append((k, f"({type(v).__name__}, {len(v) if hasattr(v, '__len__') else '?'} items: see result.json)"))
    return rows


# ---------------------------------------------------------------- plots


@dataclass
class Figure:
    key: str  # file stem: report-<key>.png
    title: str
    caption: str
    png: bytes

    @property
    def filename(self) -> str:
        return f"{PLOT_PREFIX}{self.key}.png"

    @property
    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


def build_figures(rf: RunFiles, goals: dict[str, float], band: dict[str, float] | None) -> tuple[list[Figure], list[dict[str, Any]], list[str]]:
    """The report's figures; a plot that fails is reported as a problem, the rest still render."""
    r = rf.result
    figs: list[Figure] = []
    problems: list[str] = []
    widths = r.get("widths") if isinstance(r.get("widths"), dict) else None
    family_of: dict[str, str] = {}
    order: list[str] = []
    if rf.profile:
        for g in rf.profile.get("groups") or []:
            if isinstance(g, dict) and g.get("name"):
                family_of[str(g["name"])] = str(g.get("family") or g["name"])
                order.append(str(g["name"]))
    dist = plots.family_distribution(rf.profile, widths)
    sp_layers = r.get("sparsity_per_layer") if isinstance(r.get("sparsity_per_layer"), dict) else None
    if sp_layers is None and r.get("kind") == "sparsify" and rf.plan and isinstance(rf.plan.get("layers"), dict):
        sp_layers = rf.plan["layers"]  # the sparsify command keeps the per-layer result in plan.json
    comp = r.get("compressed") if isinstance(r.get("compressed"), dict) else {}
    jobs = [
        ("trajectory", "Trajectory",
         "Budget error per attempt (left axis; the shaded strip is the band) and quality (right axis, dashed). "
         "Markers show the verdict; a light red column marks a rolled-back attempt.",
         lambda: plots.trajectory_png(rf.attempts, goals, band)),
        ("widths", "Width per group, before and after",
         "Outline: dense width; filled: width after pruning, coloured by isomorphic family.",
         lambda: plots.widths_png(widths or {}, family_of, order) if widths else None),
        ("sparsity", "Sparsity per layer",
         "Fraction of zero weights per layer in model order, coloured by layer kind; dashed: global sparsity.",
         lambda: plots.sparsity_png(sp_layers, num(comp.get("sparsity"))) if sp_layers else None),
        ("distribution", "MACs and latency per family",
         "Share of the dense model's MACs and measured module time that each family's groups touch "
         "(shares overlap: a layer between two groups counts in both). After-pruning MACs are estimated from "
         "the kept width of each group.",
         lambda: plots.distribution_png(dist)),
    ]
    for key, title, caption, make in jobs:
        try:
            png = make()
        except Exception as exc:  # a plot must never cost the report
            problems.append(f"plot '{key}' failed: {type(exc).__name__}: {str(exc)[:160]}")
            continue
        if png:
            figs.append(Figure(key, title, caption, png))
    return figs, dist, problems


# ---------------------------------------------------------------- render


def _safe(problems: list[str], name: str, make: Callable[[], Any], default: Any) -> Any:
    """One section's content; a section that cannot be built is named in the report, the rest still render."""
    try:
        return make()
    except Exception as exc:  # data we did not foresee must not cost the whole report
        problems.append(f"section '{name}' not shown: {type(exc).__name__}: {str(exc)[:160]}")
        return default


def _distribution_rows(dist: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**row, "macs_share": pct(row["macs_share"], False), "macs_share_after": pct(row["macs_share_after"], False),
             "latency_share": pct(row["latency_share"], False), "macs_kept": pct(row["macs_kept"], False)}
            for row in dist]


def build_context(run_dir: Path, rf: RunFiles) -> dict[str, Any]:
    """Everything the two templates show, as display-ready strings and rows."""
    r = rf.result
    problems = list(rf.problems)
    budget = r.get("budget") if isinstance(r.get("budget"), dict) else {}
    targets = budget.get("targets") if isinstance(budget.get("targets"), dict) else {}
    goals = {m: float(t["goal"]) for m, t in targets.items() if isinstance(t, dict) and num(t.get("goal")) is not None}
    band = budget.get("band") if isinstance(budget.get("band"), dict) else None
    figs, dist, plot_problems = _safe(problems, "plots", lambda: build_figures(rf, goals, band), ([], [], []))
    problems += plot_problems
    kind = str(r.get("kind") or "run")
    model = str(r.get("model") or (rf.profile or {}).get("model") or run_dir.name)
    quant = _safe(problems, "quantization", lambda: quant_section(rf), None)
    quant_keys = {k for k, _ in quant["facts"]} if quant else set()
    return {
        "title": f"prunepilot {kind}: {model}",
        "kind": kind,
        "model": model,
        "run_dir": str(run_dir),
        "generated": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "budget": _safe(problems, "budget", lambda: budget_section(r), {"rows": [], "band": None, "within": None}),
        "compare": _safe(problems, "dense vs compressed", lambda: compare_section(r), {"rows": [], "speed": None, "timings": []}),
        "facts": _safe(problems, "facts", lambda: facts_section(r, rf.attempts), []),
        "latency_model": _safe(problems, "latency model", lambda: latency_section(r), None),
        "figures": figs,
        "distribution": _safe(problems, "distribution", lambda: _distribution_rows(dist), []),
        "attempts": _safe(problems, "attempts", lambda: attempts_section(rf.attempts, goals, r.get("best_round")), []),
        "quality_label": plots.quality_key(rf.attempts) or "quality",
        "llm": _safe(problems, "LLM calls", lambda: llm_section(rf.llm_calls), None),
        "skipped": _safe(problems, "skipped layers", lambda: skipped_section(rf), []),
        "quant": quant,
        "export": _safe(problems, "export", lambda: kv_rows(r.get("export"), run_dir), []),
        "environment": _safe(problems, "environment", lambda: kv_rows(r.get("environment")), []),
        "other": _safe(problems, "other", lambda: [(k, v) for k, v in other_rows(r) if k not in quant_keys], []),
        "problems": problems,
        "clip_at": CLIP_AT,
    }


def _env() -> Any:
    import jinja2  # lazy: only the report needs it

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("prunepilot.report", "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default_for_string=False),
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,  # a template typo fails the tests, not silently
    )
    env.filters["md"] = md
    env.filters["code"] = md_code
    env.filters["clip"] = clip
    return env


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def render_report(run_dir: Path) -> tuple[Path, Path]:
    """Write `report.html` (self-contained: inline CSS, plots as base64 PNG) and `report.md` (plots as
    `report-*.png` beside it) into `run_dir`, from whatever the run left there. Returns (html, md) paths."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rf = load_run(run_dir)
    ctx = build_context(run_dir, rf)
    env = _env()
    html_text = env.get_template("report.html.j2").render(**ctx)
    md_text = env.get_template("report.md.j2").render(**ctx)
    keep = {f.filename for f in ctx["figures"]}
    for f in ctx["figures"]:
        _write_bytes_atomic(run_dir / f.filename, f.png)
    for stale in run_dir.glob(f"{PLOT_PREFIX}*.png"):  # a re-render with fewer plots leaves no dead files
        if stale.name not in keep:
            stale.unlink(missing_ok=True)
    html_path, md_path = run_dir / HTML_NAME, run_dir / MD_NAME
    write_text_atomic(html_path, html_text)
    write_text_atomic(md_path, md_text)
    for p in [html_path, md_path, *(run_dir / f.filename for f in ctx["figures"])]:
        _readable(p)
    return html_path, md_path


def _readable(path: Path) -> None:
    """Atomic writes go through mkstemp (mode 0600); give the report the permissions the umask allows, as a
    plain open() would, so it can be shared or served."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


__all__ = ["render_report", "load_run", "RunFiles", "build_context"]


def render_safely(out: Path, log=print) -> None:
    """Render the run's report; a report failure must never lose the run's results."""
    try:
        html, _ = render_report(out)
        log(f"report: {html}")
    except Exception as exc:
        log(f"report rendering failed ({type(exc).__name__}: {exc}); results are in {out}")
