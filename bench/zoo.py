"""Architecture zoo: every torchvision classification model, torchvision detection/segmentation models, 60+ timm
families and HF ViT/Swin/BERT from configs, random weights, pruned to a MAC target by the non-agent path
(`Pruner` -> projector -> torch-pruning -> verification -> real count), one model per subprocess with a timeout.

    nice -n 10 python bench/zoo.py                         # everything at 50% MACs -> bench/results/zoo.json
    python bench/zoo.py --only resnet50,timm:levit_128     # names or regexes (comma separated)
    python bench/zoo.py --subset core --target 30%         # the 30% subset -> bench/results/zoo_30.json
    python bench/zoo.py --table [--results FILE]           # markdown table of a results file

Per model: status (in_band: inside the +1%/-5% band; refused: a one-line PrunepilotError; out_of_band; failed:
any other exception; hang: killed at the timeout), the error text, analysis and projection seconds, achieved
MAC error, realised CPU speed-up (batch 1, few interleaved rounds) vs the ideal MAC ratio. Results are merged
into the JSON by (model, target), so a rerun of some models keeps the others.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select as selectors_mod
import subprocess
import tempfile
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

# timm: one or two small members per family (transformers, hybrids, MLP mixers, mobile and classic CNNs)
TIMM = """vit_tiny_patch16_224 deit_small_patch16_224 deit3_small_patch16_224 beit_base_patch16_224 eva02_tiny_patch14_224
cait_xxs24_224 xcit_tiny_12_p16_224 swin_tiny_patch4_window7_224 swinv2_tiny_window8_256 pvt_v2_b0 twins_svt_small
twins_pcpvt_small crossvit_tiny_240 pit_ti_224 levit_128 efficientformer_l1 efficientformerv2_s0 flexivit_small
davit_tiny gcvit_xxtiny focalnet_tiny_srf mvitv2_tiny sequencer2d_s volo_d1_224 visformer_tiny maxvit_nano_rw_256
coatnet_nano_rw_224 coat_lite_tiny mobilevit_s mobilevitv2_050 edgenext_xx_small fastvit_t8 tiny_vit_5m_224 repvit_m1
efficientvit_b0 efficientvit_m0 convit_tiny poolformer_s12 poolformerv2_s12 mixer_b16_224 resmlp_12_224 gmlp_ti16_224
ghostnet_100 ghostnetv2_100 mobilenetv3_large_100 mobilenetv4_conv_small efficientnet_b0 tf_efficientnet_lite0
mnasnet_100 fbnetc_100 lcnet_050 rexnet_100 hrnet_w18_small dla34 dpn68 cspresnet50 darknet53 res2net50_26w_4s
resnest14d skresnet18 selecsls42b ese_vovnet19b_dw regnety_002 nf_regnet_b0 convnext_atto convnextv2_atto
inception_next_tiny legacy_xception hgnet_tiny repghostnet_050 seresnext26d_32x4d ecaresnet26t gernet_s mobileone_s0
halonet26t botnet26t_256 hiera_tiny_224 starnet_s1 mambaout_femto""".split()

HF = ["hf-config:vit", "hf-config:swin", "hf-config:bert"]

# the 30% subset: one or two per construct
CORE = ["torchvision:resnet50", "torchvision:mobilenet_v3_large", "torchvision:vit_b_16", "torchvision:swin_t",
        "torchvision:shufflenet_v2_x1_0", "torchvision:convnext_tiny", "torchvision:efficientnet_b0",
        "torchvision:densenet121", "torchvision:regnet_y_400mf", "timm:deit_small_patch16_224",
        "timm:swin_tiny_patch4_window7_224", "timm:levit_128", "timm:ghostnet_100", "timm:poolformer_s12",
        "timm:mobilevit_s", "timm:mixer_b16_224", "timm:efficientformer_l1", "timm:maxvit_nano_rw_256",
        "tv-det:fasterrcnn_mobilenet_v3_large_320_fpn", "tv-seg:lraspp_mobilenet_v3_large", "hf-config:vit",
        "hf-config:bert"]


# torchvision models over ~15 GMACs or ~100M parameters: run last (minutes each on a shared CPU)
HEAVY = re.compile(r"vit_h_|vit_l_|regnet_[xy]_(128|32|16)gf|efficientnet_b[67]|swin_v2_b|swin_b|wide_resnet101|"
                   r"resnext101|vgg1[69]|convnext_large|maxvit")


def zoo_models() -> list[str]:
    import torchvision

    tv = [f"torchvision:{n}" for n in torchvision.models.list_models(module=torchvision.models)]
    det = [f"tv-det:{n}" for n in torchvision.models.list_models(module=torchvision.models.detection)]
    seg = [f"tv-seg:{n}" for n in torchvision.models.list_models(module=torchvision.models.segmentation)]
    light = [m for m in tv if not HEAVY.search(m)]
    heavy = [m for m in tv if HEAVY.search(m)]
    return light + [f"timm:{n}" for n in TIMM] + HF + det + seg + heavy


def family(uri: str) -> str:
    scheme = uri.split(":", 1)[0]
    return {"torchvision": "torchvision classification", "tv-det": "torchvision detection",
            "tv-seg": "torchvision segmentation", "timm": "timm", "hf-config": "HF transformers"}.get(scheme, scheme)


# ---------------------------------------------------------------- one model (runs in the worker subprocess)

DET_SIZE = 320  # detection/segmentation: a small image keeps CPU tracing to seconds
# Two-stage detectors run their box (mask, keypoint) heads once per proposal/detection left after NMS and the
# score threshold: with random weights that count changes with every pruning, so a MAC count (and any MAC
# target) would follow the weights, not the architecture. NMS and the score threshold are turned off, so the
# heads always see rpn_post_nms_top_n_test proposals and box_detections_per_img detections.
TWO_STAGE = ("fasterrcnn", "maskrcnn", "keypointrcnn")
TWO_STAGE_FIXED = {"rpn_nms_thresh": 1.0, "box_nms_thresh": 1.0, "box_score_thresh": 0.0}


def build(uri: str):
    """LoadedModel for a zoo URI: prunepilot's sources, plus torchvision detection/segmentation built here
    (random weights, no backbone download) with their example inputs (a list of images for detection)."""
    import torch
    from prunepilot.sources.models import LoadedModel, load_model

    scheme, _, name = uri.partition(":")
    if scheme not in ("tv-det", "tv-seg"):
        return load_model(uri)
    import torchvision

    torch.manual_seed(0)
    if scheme == "tv-det":
        kw = {"weights": None, "weights_backbone": None}
        if not name.startswith("ssd"):
            kw.update(min_size=DET_SIZE, max_size=DET_SIZE)
        if name.startswith(TWO_STAGE):
            kw.update(TWO_STAGE_FIXED)
        model = torchvision.models.get_model(name, **kw).eval()
        size = 300 if name.startswith("ssd300") else DET_SIZE
        x = ([torch.rand(3, size, size)],)  # one positional argument: the list of images
    else:
        model = torchvision.models.get_model(name, weights=None, weights_backbone=None, aux_loss=False).eval()
        x = torch.rand(1, 3, DET_SIZE, DET_SIZE)
    return LoadedModel(model, x, uri, f"{uri} (random weights)")


def one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:400]


def run_one(uri: str, target: str, rounds: int, threads: int) -> dict:
    import warnings

    import torch

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    from prunepilot.budget import Budget
    from prunepilot.errors import BudgetError, PrunepilotError
    from prunepilot.evaluate.speed import compare_latency
    from prunepilot.pipeline import Pruner, check_reachable
    from prunepilot.plan import Plan

    row: dict = {"model": uri, "family": family(uri), "target": target}
    stage = "load"
    try:
        loaded = build(uri)
        row["params_m"] = round(sum(p.numel() for p in loaded.module.parameters()) / 1e6, 2)
        stage = "analysis"
        t0 = time.perf_counter()
        pruner = Pruner(loaded, latency_runs=0)
        row["analysis_s"] = round(time.perf_counter() - t0, 2)
        row["groups"] = len(pruner.structure.groups)
        row["ignored"] = len(pruner.structure.ignored)
        reasons: dict[str, int] = {}
        for why in pruner.structure.ignored.values():
            reasons[why] = reasons.get(why, 0) + 1
        row["ignored_reasons"] = reasons
        stage = "prune"
        rb = Budget.parse(macs=target).resolve(pruner.profile.dense)
        t0 = time.perf_counter()
        plan = Plan(round_to=8)  # what `prunepilot prune MODEL --target-macs 50%` runs
        check_reachable(pruner, plan, rb)
        cand = pruner.candidate(plan, rb)
        if not cand.projection.feasible and "unreachable" in cand.projection.reason:
            raise BudgetError(cand.projection.reason.rstrip("."))
        row["prune_s"] = round(time.perf_counter() - t0, 2)
        row["projection_s"] = round(cand.projection.seconds, 3)
        row["corrections"] = cand.corrections
        row["dense_macs"] = pruner.profile.dense["macs"]
        row["achieved_macs"] = cand.metrics["macs"]
        row["error"] = rb.error("macs", cand.metrics["macs"])
        row["params_ratio"] = cand.metrics["params"] / pruner.profile.dense["params"]
        within = rb.within("macs", cand.metrics["macs"])
        row["within_half_percent"] = abs(row["error"]) <= 0.005
        row["status"] = "in_band" if within else "out_of_band"
        if not within:
            row["reason"] = cand.projection.reason or "real count outside the band"
        stage = "timing"
        lat = compare_latency({"dense": pruner.dense, "pruned": cand.model}, pruner.x, rounds=rounds, warmup=1)
        row["latency_dense_ms"] = lat["dense"].median_ms
        row["latency_pruned_ms"] = lat["pruned"].median_ms
        row["speedup"] = lat["dense"].median_ms / lat["pruned"].median_ms
        row["ideal_speedup"] = row["dense_macs"] / row["achieved_macs"]
    except PrunepilotError as exc:
        row.update(status="refused", stage=stage, reason=one_line(exc))
    except Exception as exc:  # noqa: BLE001 - the bench records every failure
        row.update(status="failed", stage=stage, reason=one_line(exc),
                   traceback="".join(traceback.format_exception(exc)[-6:])[-1500:])
    return row


# ---------------------------------------------------------------- driver

def select(models: list[str], only: str | None) -> list[str]:
    if not only:
        return models
    pats = [p.strip() for p in only.split(",") if p.strip()]
    out = []
    for m in models:
        if any(p == m or p == m.split(":", 1)[1] or re.search(p, m) for p in pats):
            out.append(m)
    for p in pats:  # a full URI not in the zoo list is run as given
        if ":" in p and p not in out and not any(re.search(re.escape(p), m) for m in out):
            out.append(p)
    return out


def load_results(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"rows": []}


def save_results(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float))
    os.replace(tmp, path)


def drive(models: list[str], target: str, timeout: float, rounds: int, threads: int, out: Path, resume: bool = False) -> None:
    """One worker process runs the models in turn (imports paid once); a model that gives no result within
    `timeout` seconds is recorded as a hang, its worker killed, and a fresh worker continues with the rest."""
    data = load_results(out)
    data["command"] = "python " + " ".join(sys.argv)
    data["timeout_s"] = timeout
    done = {r["model"] for r in data["rows"] if r["target"] == target} if resume else set()
    pending = [m for m in models if m not in done]
    n_total, n_done = len(pending), 0

    def record(row: dict) -> None:
        nonlocal n_done
        n_done += 1
        data["rows"] = [r for r in data["rows"] if not (r["model"] == row["model"] and r["target"] == target)] + [row]
        save_results(out, data)
        err = f"{row['error']:+.2%}" if row.get("error") is not None else ""
        sp = f"{row['speedup']:.2f}x/{row['ideal_speedup']:.2f}x" if row.get("speedup") else ""
        print(f"[{n_done}/{n_total}] {row['model']:55s} {row['status']:12s} {err:>8s} {sp:>12s} {row.get('wall_s', 0):6.1f}s "
              f"{row.get('reason', '')[:150]}", flush=True)

    while pending:
        log = tempfile.TemporaryFile(mode="w+")
        cmd = [sys.executable, __file__, "--worker", ",".join(pending), "--target", target, "--rounds", str(rounds),
               "--threads", str(threads)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT, bufsize=1)
        current, t0 = pending[0], time.perf_counter()
        while True:
            ready, _, _ = selectors_mod.select([proc.stdout], [], [], max(0.0, timeout - (time.perf_counter() - t0)))
            if not ready:  # no result within the timeout: a hang
                proc.kill()
                proc.wait()
                record({"model": current, "family": family(current), "target": target, "status": "hang",
                        "reason": f"no result after {timeout:.0f} s", "wall_s": round(time.perf_counter() - t0, 1)})
                pending.remove(current)
                break
            line = proc.stdout.readline()
            if not line:  # the worker died (segfault, out of memory): record what it said
                proc.wait()
                log.seek(0)
                tail = " ".join(log.read().split()[-60:])
                if current in pending:
                    record({"model": current, "family": family(current), "target": target, "status": "failed",
                            "reason": f"worker exited {proc.returncode} without a result: {tail[-400:]}",
                            "wall_s": round(time.perf_counter() - t0, 1)})
                    pending.remove(current)
                break
            if line.startswith("ZOO-START "):
                current, t0 = line.split(" ", 1)[1].strip(), time.perf_counter()
            elif line.startswith("ZOO-ROW "):
                row = json.loads(line[len("ZOO-ROW "):])
                row["wall_s"] = round(time.perf_counter() - t0, 1)
                record(row)
                if row["model"] in pending:
                    pending.remove(row["model"])
        log.close()


def table(data: dict) -> str:
    rows = data["rows"]
    lines = []
    fams: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        fams.setdefault((r["family"], r["target"]), []).append(r)
    lines.append("| family | target | models | in band | within ±0.5% | refused | out of band | failed | hang | median analysis s | median projection s | median speed-up / ideal |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (fam, tgt), rs in sorted(fams.items()):
        def n(s):
            return sum(1 for r in rs if r["status"] == s)
        half = sum(1 for r in rs if r.get("within_half_percent"))
        med = lambda k: _median([r[k] for r in rs if r.get(k) is not None])  # noqa: E731
        ratio = _median([r["speedup"] / r["ideal_speedup"] for r in rs if r.get("speedup")])
        lines.append(f"| {fam} | {tgt} | {len(rs)} | {n('in_band')} | {half} | {n('refused')} | {n('out_of_band')} | "
                     f"{n('failed')} | {n('hang')} | {_fmt(med('analysis_s'))} | {_fmt(med('projection_s'))} | {_fmt(ratio)} |")
    lines.append("")
    lines.append("| model | target | status | MAC error | analysis s | projection s | speed-up | ideal | note |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["family"], r["model"], r["target"])):
        err = f"{r['error']:+.2%}" if r.get("error") is not None else ""
        sp = f"{r['speedup']:.2f}x" if r.get("speedup") else ""
        ideal = f"{r['ideal_speedup']:.2f}x" if r.get("ideal_speedup") else ""
        note = (r.get("reason") or "").replace("|", "/")[:120]
        lines.append(f"| {r['model']} | {r['target']} | {r['status']} | {err} | {_fmt(r.get('analysis_s'))} | "
                     f"{_fmt(r.get('projection_s'))} | {sp} | {ideal} | {note} |")
    return "\n".join(lines)


def _median(xs: list[float]) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def _fmt(v) -> str:
    return "" if v is None else f"{v:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated names, URIs or regexes")
    ap.add_argument("--subset", choices=["core"], help="core: the 30%% subset (one or two models per construct)")
    ap.add_argument("--family", choices=["torchvision", "tv-det", "tv-seg", "timm", "hf-config"])
    ap.add_argument("--target", default="50%")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per model before it is recorded as a hang")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (batch 1)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default bench/results/zoo.json, zoo_30.json at 30%%)")
    ap.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    ap.add_argument("--resume", action="store_true", help="skip models that already have a row at this target")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        import gc

        for uri in args.worker.split(","):
            print(f"ZOO-START {uri}", flush=True)
            row = run_one(uri, args.target, args.rounds, args.threads)
            print("ZOO-ROW " + json.dumps(row, default=float), flush=True)
            gc.collect()
        return
    out = args.out or RESULTS / ("zoo.json" if args.target == "50%" else f"zoo_{args.target.rstrip('%')}.json")
    if args.table:
        print(table(load_results(out)))
        return
    models = CORE if args.subset == "core" else zoo_models()
    if args.family:
        models = [m for m in models if m.startswith(args.family + ":")]
    drive(select(models, args.only), args.target, args.timeout, args.rounds, args.threads, out, args.resume)


if __name__ == "__main__":
    main()
