"""Run report: renders from synthetic run folders (full, sparsify, result-only, damaged), escapes LLM text."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest

from prunepilot.report.render import load_run, md, render_report

EVIL = '<script>alert("x")</script> & <img src=x onerror=alert(1)> | [link](http://evil.example) ![i](http://evil.example/i.png)'


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1))


def write_jsonl(path: Path, rows: list[Any]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def prune_result() -> dict[str, Any]:
    return {
        "kind": "prune",
        "model": "torchvision:resnet18",
        "budget": {"targets": {"macs": {"goal": 911088884.0, "text": "50%"}}, "band": {"over": 0.01, "under": 0.05}},
        "dense": {"macs": 1822177768.0, "params": 11689512.0, "latency_ms": 680.07, "size_mb": 44.63, "accuracy": 0.912},
        "compressed": {"macs": 910759440.0, "params": 5741448.0, "latency_ms": 459.95, "size_mb": 21.93, "accuracy": 0.8875},
        "within_band": True,
        "errors": {"macs": -0.00036159369934756},
        "environment": {"torch": "2.14.1", "threads": 2, "python": "3.11.7", "cpus": 2},
        "projection": {"iterations": 26, "seconds": 0.11, "reason": "", "notes": ["round_to 8 kept"], "ratios": {"conv1": 0.25}},
        "speedup": 1.4786,
        "ideal_speedup": 2.0007,
        "widths": {"conv1": [64, 48], "layer1.0.conv1": [64, 40], "layer1.1.conv1": [64, 40], "layer4.0.conv1": [512, 352]},
        "skipped": {"fc": "output layer: its width is the model's output"},
        "export": {"module": "model.pt", "exported_program": "model.pt2"},
        "best_round": 2,
        "stop_reason": "no improvement in 2 rounds",
        "recovery": {"epochs": 1, "kd": False},
        "seconds": 66.1,
    }


def profile() -> dict[str, Any]:
    groups = [
        {"name": "conv1", "family": "conv1", "kind": "residual_stream", "width": 64, "macs": 6.5e8, "params": 1e5, "latency_ms": 30.0},
        {"name": "layer1.0.conv1", "family": "layer1.*.conv1", "kind": "conv_channels", "width": 64, "macs": 2.3e8, "params": 4e4, "latency_ms": 11.0},
        {"name": "layer1.1.conv1", "family": "layer1.*.conv1", "kind": "conv_channels", "width": 64, "macs": 2.3e8, "params": 4e4, "latency_ms": 11.0},
        {"name": "layer4.0.conv1", "family": "layer4.*.conv1", "kind": "conv_channels", "width": 512, "macs": 2.0e8, "params": 2.4e6, "latency_ms": 20.0},
    ]
    return {
        "model": "torchvision:resnet18",
        "dense": {"macs": 1822177768.0, "params": 11689512.0},
        "families": [
            {"family": "conv1", "kind": "residual_stream", "groups": 1, "width": [64], "macs_share": 0.356, "params_share": 0.01, "latency_share": 0.21, "sensitivity_z": 0.5},
            {"family": "layer1.*.conv1", "kind": "conv_channels", "groups": 2, "width": [64], "macs_share": 0.2547, "params_share": 0.01, "latency_share": 0.15, "sensitivity_z": -0.2},
            {"family": "layer4.*.conv1", "kind": "conv_channels", "groups": 1, "width": [512], "macs_share": 0.11, "params_share": 0.2, "latency_share": 0.14, "sensitivity_z": 1.1},
        ],
        "groups": groups,
        "ignored": {"fc": "output layer: its width is the model's output", "layer4.1.conv2": "protected: user asked"},
    }


def attempts() -> list[dict[str, Any]]:
    base = {"strategist": "llm:scripted", "plan": {"default_ratio": 0.3, "ratios": {"conv1": 0.2, "layer4.*.conv1": 0.5}, "importance": "taylor"},
            "projected_ratios": {"conv1": 0.25}, "predicted": {"macs": 9.1e8}}
    return [
        {**base, "round": 1, "metrics": {"macs": 8.2e8, "accuracy": 0.70}, "errors": {"macs": -0.10}, "within_band": False,
         "verdict": "infeasible", "rationale": "Start uniform.", "reflection": "Overshot.", "seconds": 12.0},
        {**base, "round": 2, "metrics": {"macs": 9.10e8, "accuracy": 0.8875, "fidelity_agreement": 0.93}, "errors": {"macs": -0.0004},
         "within_band": True, "verdict": "best", "rationale": EVIL, "reflection": "Protect conv1.\nSecond line.",
         "guidance": ["stagnation: try a different family split"], "seconds": 11.5},
        {**base, "round": 3, "metrics": {"macs": 9.11e8, "accuracy": 0.41}, "within_band": True, "verdict": "rolled_back",
         "rationale": "Push layer4 harder.", "reflection": "Accuracy collapsed; rolled back.", "fallback_reason": "invalid JSON twice"},
        {"round": 4, "verdict": "failed"},  # a crashed attempt with almost nothing recorded
    ]


def llm_calls() -> list[dict[str, Any]]:
    return [
        {"round": 1, "model": "claude-sonnet-4-5", "status": "ok", "input_tokens": 2400, "output_tokens": 310, "latency_s": 4.2},
        {"round": 2, "model": "claude-sonnet-4-5", "status": "ok", "input_tokens": 3100, "output_tokens": 280, "latency_s": 3.1},
        {"round": 3, "model": "claude-sonnet-4-5", "status": "invalid", "input_tokens": 3300, "output_tokens": 150, "latency_s": 2.0},
        {"round": 3, "model": "smollm2-135m", "status": "ok", "input_tokens": 900, "output_tokens": 120, "latency_s": 8.5},
    ]


@pytest.fixture()
def full_run(tmp_path: Path) -> Path:
    run = tmp_path / "full"
    run.mkdir()
    write_json(run / "result.json", prune_result())
    write_json(run / "profile.json", profile())
    write_json(run / "plan.json", {"requested": {"protected": ["layer4.1.conv2"]}, "projected": {"protected": ["layer4.1.conv2"]}})
    write_jsonl(run / "attempts.jsonl", attempts())
    with (run / "attempts.jsonl").open("a") as fh:
        fh.write('{"round": 5, "verdict": "be')  # a line cut short by a crash
    write_jsonl(run / "llm_calls.jsonl", llm_calls())
    (run / "model.pt").write_bytes(b"\0" * 1024)
    return run


def _imgs(text: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)]


def test_full_run(full_run: Path) -> None:
    html_path, md_path = render_report(full_run)
    assert html_path == full_run / "report.html" and md_path == full_run / "report.md"
    html = html_path.read_text()
    # key numbers: budget goal/achieved/error, dense vs compressed, speed-up vs MAC ratio, accuracy
    for s in ("911.1 M", "910.8 M", "-0.04%", "1.822 G", "5.741 M", "1.48×", "2.00×", "88.75%", "91.20%", "-2.45 pt",
              "within budget band", "no improvement in 2 rounds"):
        assert s in html, s
    # every plot is an embedded, valid PNG; no external assets at all
    imgs = _imgs(html)
    assert len(imgs) == 3  # trajectory, widths, distribution (no sparsity in a prune run)
    assert all(b.startswith(b"\x89PNG\r\n\x1a\n") for b in imgs)
    assert not re.search(r'(src|href)="(?!data:)', html)
    assert "<link" not in html and "<script" not in html
    # LLM text is inert: escaped, never raw markup
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in html
    assert "<img src=x" not in html
    # trajectory table, guidance, fallback, LLM stats, skipped/protected, export
    for s in ("Start uniform.", "Protect conv1.", "stagnation: try a different family split", "invalid JSON twice",
              "rolled back", "claude-sonnet-4-5", "smollm2-135m", "8.8 k", "9.7 k", "invalid 1, ok 2",
              "output layer: its width is the model&#39;s output", "protected: user asked", "protected by the plan",
              "model.pt2", "1 malformed line(s) skipped", "recovery"):
        assert s in html, s
    assert html.count('class="best"') == 1


def test_markdown(full_run: Path) -> None:
    _, md_path = render_report(full_run)
    text = md_path.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(links) == ["report-distribution.png", "report-trajectory.png", "report-widths.png"]
    for link in links:
        assert (full_run / link).read_bytes().startswith(b"\x89PNG")
    assert "<script>" not in text and "&lt;script&gt;" in text
    # no live link or remote image from LLM text: brackets escaped
    assert "\\[link\\](http://evil.example)" in text and not re.search(r"(?<!\\)\]\(http", text)
    assert "911.1 M" in text and "1.48×" in text
    # every table row has the header's column count (a '|' in LLM text must not add a column)
    for block in re.findall(r"(?:^\|.*\|$\n?)+", text, flags=re.M):
        counts = {len(re.findall(r"(?<!\\)\|", row)) for row in block.strip().splitlines()}
        assert len(counts) == 1, block


def test_result_only(tmp_path: Path) -> None:
    write_json(tmp_path / "result.json", {"kind": "prune", "model": "m", "budget": {"targets": {"params": {"goal": 1e6, "text": "1M"}}, "band": {"over": 0.01, "under": 0.05}},
                                          "dense": {"params": 2e6}, "compressed": {"params": 1.2e6}, "within_band": False})
    html_path, md_path = render_report(tmp_path)
    html = html_path.read_text()
    assert "outside budget band" in html and "+20.00%" in html and "1.2 M" in html
    assert _imgs(html) == [] and not list(tmp_path.glob("report-*.png"))
    assert "None recorded" in md_path.read_text()


def test_bare_and_damaged(tmp_path: Path) -> None:
    html_path, _ = render_report(tmp_path)  # empty folder: still a report that says what is missing
    assert "result.json: absent" in html_path.read_text()
    (tmp_path / "result.json").write_text("{not json")
    write_json(tmp_path / "profile.json", ["not", "an", "object"])
    write_json(tmp_path / "quantization.json", {"backend": "eager"})
    html = render_report(tmp_path)[0].read_text()
    assert "result.json: unreadable" in html and "profile.json: expected a JSON object" in html


def test_odd_values_do_not_crash(tmp_path: Path) -> None:
    r = prune_result()
    r.update(budget={"targets": {}, "band": None}, errors=None, within_band="maybe", widths={"conv1": [64], "x": "bad", "y": [0, 0]},
             speedup=None, projection="n/a", skipped=["a", {"name": "b", "reason": "why"}], export=None,
             environment="?", dense={"macs": None, "memory": {"peak": 1}}, compressed={"macs": float("nan")})
    write_json(tmp_path / "result.json", r)
    write_json(tmp_path / "profile.json", {"families": None, "groups": [{"name": "conv1"}, "junk"]})
    write_jsonl(tmp_path / "attempts.jsonl", [{"round": "one", "metrics": None, "errors": {"macs": "big"}, "plan": "text"}, [1, 2]])
    write_jsonl(tmp_path / "llm_calls.jsonl", [{"latency_s": None}])
    html = render_report(tmp_path)[0].read_text()
    assert "no budget for this run" in html and "why" in html


def test_sparsify_and_quantize(tmp_path: Path) -> None:
    layers = {f"model.layers.{b}.{k}": 0.3 + 0.02 * b for b in range(30) for k in ("self_attn.q_proj", "mlp.down_proj")}
    write_json(tmp_path / "result.json", {
        "kind": "sparsify", "model": "gguf:smollm2",
        "budget": {"targets": {"sparsity": {"goal": 0.45, "text": "45%"}}, "band": {"over": 0.01, "under": 0.05}},
        "dense": {"sparsity": 0.0, "perplexity": 19.2, "params": 1.35e8}, "compressed": {"sparsity": 0.4501, "perplexity": 24.7, "params": 1.35e8},
        "within_band": True, "errors": {"sparsity": 0.0002}, "sparsity_per_layer": layers,
        "quantization": {"backend": "eager", "n_quantized": 1, "quantized": [{"name": "lm_head", "reason": "int8 dynamic"}],
                         "skipped": [{"name": "embed", "reason": "embedding: not offered"}]},
    })
    write_jsonl(tmp_path / "attempts.jsonl", [
        {"round": r, "metrics": {"sparsity": s, "perplexity": p}, "verdict": v}
        for r, (s, p, v) in enumerate([(0.2, 20.0, "kept"), (0.35, 22.0, "kept"), (0.45, 90.0, "rolled_back"), (0.45, 24.7, "best")], 1)
    ])
    html = render_report(tmp_path)[0].read_text()
    assert len(_imgs(html)) == 2  # trajectory + sparsity per layer
    for s in ("45.01%", "perplexity", "24.7", "embedding: not offered", "not quantized", "lm_head"):
        assert s in html, s
    assert (tmp_path / "report-sparsity.png").is_file()


def test_stale_plots_removed(full_run: Path) -> None:
    render_report(full_run)
    assert (full_run / "report-trajectory.png").is_file()
    (full_run / "attempts.jsonl").unlink()
    render_report(full_run)
    assert not (full_run / "report-trajectory.png").exists()


def test_md_escape() -> None:
    assert md("a|b") == "a\\|b"
    assert md("<b>x</b>\nnext") == "&lt;b&gt;x&lt;/b&gt;<br>next"
    assert md("[t](u)") == "\\[t\\](u)"


def test_load_run_empty(tmp_path: Path) -> None:
    rf = load_run(tmp_path)
    assert rf.result == {} and rf.attempts == [] and rf.problems


def test_long_text_folded_and_files_readable(full_run: Path) -> None:
    rows = attempts()
    rows[0]["rationale"] = "word " * 400  # 2000 characters
    write_jsonl(full_run / "attempts.jsonl", rows)
    html_path, md_path = render_report(full_run)
    html = html_path.read_text()
    assert "full text (2000 characters)" in html
    assert "word " * 130 in md_path.read_text() and "word " * 200 not in md_path.read_text()
    for p in (html_path, md_path, *full_run.glob("report-*.png")):
        assert p.stat().st_mode & 0o044  # group/other may read, as with a plain open() under a usual umask


def test_broken_section_is_reported_not_fatal(full_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prunepilot.report import plots, render

    def boom(*a: Any, **k: Any) -> None:
        raise RuntimeError("unforeseen data")

    monkeypatch.setattr(render, "skipped_section", boom)
    monkeypatch.setattr(plots, "widths_png", boom)
    html = render_report(full_run)[0].read_text()
    assert "section &#39;skipped layers&#39; not shown: RuntimeError: unforeseen data" in html
    assert "plot &#39;widths&#39; failed" in html
    assert len(_imgs(html)) == 2 and "911.1 M" in html


def test_large_run(tmp_path: Path) -> None:
    """A ViT/LLM-sized run: hundreds of groups, many attempts; labels give way to family spans."""
    r = prune_result()
    fams = [f"blocks.*.{k}" for k in ("attn.qkv", "mlp.fc1", "attn.proj", "mlp.fc2")]
    groups = [{"name": f"blocks.{b}.{k.split('.*.')[1]}", "family": k, "kind": "linear", "width": 768, "macs": 1e7}
              for b in range(48) for k in fams]
    r["widths"] = {g["name"]: [768, 512 + (i % 5) * 32] for i, g in enumerate(groups)}
    write_json(tmp_path / "result.json", r)
    write_json(tmp_path / "profile.json", {"dense": {"macs": 2e9}, "groups": groups, "families": []})
    write_jsonl(tmp_path / "attempts.jsonl", [
        {"round": i, "metrics": {"macs": 9.1e8 * (1 + 0.1 / i), "accuracy": 0.8 - 0.001 * i}, "verdict": "kept"} for i in range(1, 61)
    ])
    html = render_report(tmp_path)[0].read_text()
    assert len(_imgs(html)) == 3
    assert html.count('<tr class="best">') == 1  # best_round 2


def test_sparsify_loop_shapes(tmp_path: Path) -> None:
    """What `prunepilot sparsify` writes today: iteration/probe_ppl/accept|rollback rows, LLM calls without
    status, per-layer sparsity in plan.json, nested fidelity metrics."""
    write_json(tmp_path / "result.json", {
        "kind": "sparsify", "model": "hf:tiny",
        "budget": {"targets": {"sparsity": {"goal": 0.5, "text": "50%"}}, "band": {"over": 0.01, "under": 0.05}},
        "dense": {"perplexity": 95.1, "sparsity": 0.0}, "within_band": True, "errors": {"sparsity": 0.0},
        "compressed": {"perplexity": 97.3, "sparsity": 0.5, "fidelity": {"top1_agreement": 0.84375, "kl": 8.9e-05},
                       "knowledge": {"facts": 0, "retained": float("nan")}},
        "loop": {"iterations": 3, "rollbacks": 1},
    })
    write_json(tmp_path / "plan.json", {"layers": {f"model.layers.{b}.mlp.down_proj": 0.5 for b in range(3)}})
    write_jsonl(tmp_path / "attempts.jsonl", [
        {"iteration": 1, "strategist": "llm:fake", "level": 0.25, "achieved": 0.25, "probe_ppl": 98.4, "verdict": "accept",
         "rationale": "mlp first", "llm_reflection": "went fine", "group_sparsity": {"mlp@0-1": 0.3, "attn@0-1": 0.1}},
        {"iteration": 2, "level": 0.5, "achieved": 0.5, "probe_ppl": 180.0, "verdict": "rollback",
         "reflection": "rolled back: probe perplexity rose 83%"},
        {"iteration": 3, "level": 0.5, "achieved": 0.5, "probe_ppl": 101.0, "verdict": "rollback; best candidate forced"},
    ])
    write_jsonl(tmp_path / "llm_calls.jsonl", [{"phase": "propose", "level": 0.25, "model": "fake-1", "reply": "{}",
                                               "input_tokens": 10, "output_tokens": 5, "latency_s": 0.1}])
    html = render_report(tmp_path)[0].read_text()
    assert len(_imgs(html)) == 2 and (tmp_path / "report-sparsity.png").is_file()
    for s in ("probe perplexity", "180", "went fine", "rolled back: probe perplexity rose 83%", "rollback; best candidate forced",
              "v-rolled_back", "v-kept", "group_sparsity: 2 keys, 0.1–0.3", "fidelity.top1_agreement", "84.38%", "ok 1",
              "level 0.25", "loop.rollbacks"):
        assert s in html, s


@pytest.mark.slow
def test_real_prune_run(tmp_path: Path) -> None:
    """The real prune job's folder (tiny residual CNN, through profile/projector/engine) renders with its numbers."""
    from prunepilot.budget import Budget
    from prunepilot.pipeline import run_prune
    from prunepilot.plan import Plan
    from prunepilot.sources.models import LoadedModel
    from tiny_models import make

    model, x = make("residual")
    result = run_prune(LoadedModel(model, x, "py:tiny", "tiny"), Budget.parse(macs="50%"), Plan(round_to=4), tmp_path,
                       latency_rounds=2)
    html_path, md_path = render_report(tmp_path)
    html = html_path.read_text()
    assert len(_imgs(html)) == 2  # widths + family distribution; no attempts in a single-shot prune
    assert f"{100 * result['errors']['macs']:+.2f}%" in html
    assert f"MAC ratio {result['ideal_speedup']:.2f}×" in html
    assert ("within budget band" in html) == result["within_band"]
    for fam in json.loads((tmp_path / "profile.json").read_text())["families"]:
        assert f"<code>{fam['family']}</code>" in html  # per-family table under the distribution plot
    assert "model.pt" in md_path.read_text()


def test_compare_section_shows_the_score_before_the_final_recovery() -> None:
    from prunepilot.report.render import compare_section

    r = {"dense": {"accuracy": 0.90, "macs": 10.0},
         "compressed": {"accuracy": 0.874, "macs": 4.0, "before_recovery": {"accuracy": 0.830}}}
    rows = {row["metric"]: row for row in compare_section(r)["rows"]}
    assert rows["accuracy"]["compressed"] != rows["accuracy before the final recovery"]["compressed"]
    assert rows["accuracy before the final recovery"]["compressed"] == "83.00%"
