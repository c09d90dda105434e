"""``make gpu-check``: one command that says how this project runs on a GPU machine, within a time budget.

    python -m regcls.gpucheck                      # on a GPU: about 7 minutes, gpu-check.json and a table
    python -m regcls.gpucheck --device cpu --quick # the same steps on tiny models (what the tests run)

The steps, in order of what they are worth in a short window: ``regcls doctor`` (versions, driver, GPU, folders,
hub, a short trace against the CPU), the trace's exactness on the device (float32, TF32 off, against float64 on
the CPU, every array), ViT-g/14 at 518 px through the command line (random weights from a checkpoint file, a
folder of JPEGs, the file written), then the benchmark (:mod:`regcls.bench`) for what time is left, with the paper
profile's projected time. The JSON is written after every step, so that a window that closes early keeps what ran.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .bench import device_benchmark, model_ready
from .doctor import folders, gpu, gpu_trace, hub, versions
from .env import check_device, hardware
from .errors import RegclsError
from .models import create
from .precision import precision_mode
from .trace import trace_batch
from .tracefile import SELECTED, load_trace

TINY = dict(embed_dim=48, depth=2, num_heads=3)   # --quick: the models of the tests
EXACT_TOLERANCE = 1e-4   # float32 on the device against float64 on the CPU, relative L2 of the worst array


def exactness(device: str, quick: bool = False) -> dict:
    """Every array of the trace of a full-size ViT-S/14 with registers (random weights, 8 images) on ``device`` in
    float32 (TF32 off) against the same trace in float64 on the CPU: the worst relative L2 distance and its array.
    The outputs rebuilt from the top patches select patches by rank (a step function), so they are counted apart:
    the share of them that agree."""
    torch.manual_seed(0)
    size = 56 if quick else 224
    model = create("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=size, overrides=TINY if quick else None)
    x = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = trace_batch(model.double(), x.double())
        model = model.float().to(device)
        with precision_mode(device, "fp32"):
            got = trace_batch(model, x.to(device))
    errors = {k: float((got[k].double().cpu() - ref[k]).norm() / ref[k].norm().clamp_min(1e-30))
              for k in ref if k not in SELECTED and k != "skip"}
    worst = max(errors, key=errors.get)
    same = np.mean([float(torch.allclose(got[k].double().cpu(), ref[k], rtol=1e-4, atol=1e-6)) for k in SELECTED])
    return {"worst": errors[worst], "worst_key": worst, "rebuilt_agree": float(same),
            "ok": errors[worst] < EXACT_TOLERANCE}


def giant_cli(device: str, quick: bool = False, n: int = 512) -> dict:
    """``regcls trace`` of ViT-g/14 with registers at 518 px, as a user runs it: weights from a checkpoint file
    (random, made on the device), ``n`` JPEG files decoded, the trace file written. Seconds and images per second
    of the whole command."""
    from PIL import Image
    from safetensors.torch import save_file

    arch, px = ("vit_small_patch14_reg4_dinov2", 56) if quick else ("vit_giant_patch14_reg4_dinov2", 518)
    n = 16 if quick else n
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        (d / "images").mkdir()
        rng = np.random.default_rng(0)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (600, 640, 3), dtype=np.uint8)).save(d / "images" / f"{i:04d}.jpg")
        torch.manual_seed(0)
        with torch.device(device if device.startswith("cuda") else "cpu"):
            model = create(arch, pretrained=False, img_size=px, overrides=TINY if quick else None)
        save_file({k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}, str(d / "w.safetensors"))
        del model
        cmd = [sys.executable, "-m", "regcls", "trace", "--model", arch, "--checkpoint", str(d / "w.safetensors"),
               "--img-size", str(px), "--images", str(d / "images"), "--out", str(d / "t.npz"), "--device", device,
               "--quiet", *(sum((["--set", f"{k}={v}"] for k, v in TINY.items()), []) if quick else [])]
        t = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if r.returncode != 0:
            return {"ok": False, "error": (r.stderr.strip().splitlines() or ["?"])[-1], "seconds": wall}
        meta = load_trace(d / "t.npz", meta_only=True)["meta"]
        size = (d / "t.npz").stat().st_size
    return {"ok": True, "model": arch, "img": px, "images": n, "seconds": wall, "img_per_s": n / wall,
            "precision": meta["precision_mode"], "file_mb": size / 2**20}


def run(device: str = "cuda", budget: float = 420.0, quick: bool = False, json_path: str | None = "gpu-check.json") -> int:
    """Every step, the JSON after each, the table at the end; 0 when every step passed."""
    start = time.monotonic()
    out: dict = {"hardware": hardware(), "torch": torch.__version__, "regcls": __version__, "device": device,
                 "date": time.strftime("%Y-%m-%d"), "budget_s": budget, "steps": {}}
    summary = []

    def save():
        if json_path:
            Path(json_path).write_text(json.dumps(out, indent=1, default=str))

    def step(name, fn):
        t = time.monotonic()
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001 -- one step's failure is a line of the table, the next steps still run
            value = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
        value["step_s"] = time.monotonic() - t
        out["steps"][name] = value
        save()
        return value

    print(f"regcls gpu-check on {out['hardware']} (budget {budget:.0f} s)", flush=True)
    doc = step("doctor", lambda: _doctor(device, quick))
    summary.append(("doctor", doc["ok"], doc.get("trace", doc.get("error", ""))))
    ex = step("exactness", lambda: exactness(device, quick))
    summary.append(("exactness", ex["ok"], f"worst {ex.get('worst_key')} {ex.get('worst', float('nan')):.1e} "
                                         f"(float32 on {device} vs float64 on the CPU; tolerance {EXACT_TOLERANCE:g}); "
                                         f"rebuilt outputs agreeing {ex.get('rebuilt_agree', float('nan')):.0%}"
                    if "worst" in ex else ex.get("error", "")))
    cli = step("giant_518_cli", lambda: giant_cli(device, quick))
    summary.append(("ViT-g 518 px CLI", cli["ok"], f"{cli['images']} JPEGs in {cli['seconds']:.0f} s "
                                                  f"({cli['img_per_s']:.1f} img/s, {cli['precision']}, "
                                                  f"{cli['file_mb']:.0f} MB)" if cli["ok"] else cli.get("error", "")))
    ready = step("model_ready", lambda: model_ready("vit_small_patch14_reg4_dinov2" if quick
                                                    else "vit_large_patch14_reg4_dinov2", device=device))
    summary.append(("model ready", ready.get("ratio", 9) <= 2, f"{ready.get('ready_s', float('nan')):.1f} s ready vs "
                                                              f"{ready.get('read_s', float('nan')):.1f} s to read the "
                                                              f"file ({ready.get('ratio', float('nan')):.2f}x; target 2)"))
    left = budget - (time.monotonic() - start)
    models = [("vit_small_patch14_reg4_dinov2", 56)] * 2 if quick else None
    bench = step("benchmark", lambda: {"ok": True, **device_benchmark(
        device, quick=quick, budget=max(left - 30, 0), models=models, overrides=TINY if quick else None,
        batch=4 if quick else None)})
    rows = [r for r in bench.get("device_rows", []) if "skipped" not in r]
    for r in rows:
        fast = r["model"].split("_")[1] not in ("large", "giant") or r["time_ratio"] <= 1.15
        summary.append((f"{r['model'].replace('vit_', '').replace('_patch14', '')} {r['img']} px", fast and r["e2e_over_trace"] >= 0.8,
                        f"trace {r['trace_img_per_s']:.0f} img/s = {r['time_ratio']:.2f}x plain, MFU {r['mfu']:.2f}; "
                        f"end to end {r['end_to_end_img_per_s']:.0f} img/s = {r['e2e_over_trace']:.2f}x the trace "
                        f"({r['precision']})"))
    skipped = [r for r in bench.get("device_rows", []) if "skipped" in r]
    if skipped:
        summary.append(("not measured", True, ", ".join(f"{r['model']} {r['img']} px" for r in skipped) + ": budget"))
    if "projection" in bench:
        p = bench["projection"]
        summary.append(("paper profile", p["total_seconds"] <= 600, f"{p['total_seconds'] / 60:.1f} min projected "
                        f"({p['traces']} traces: {p['trace_seconds']:.0f} s tracing, {p['check_seconds']:.0f} s "
                        f"checks, {p['load_seconds']:.0f} s loading; target 10 min)"))
    elif not bench["ok"]:
        summary.append(("benchmark", False, bench.get("error", "")))
    out["summary"] = [{"step": s, "ok": bool(ok), "result": text} for s, ok, text in summary]
    out["seconds"] = time.monotonic() - start
    save()
    print(f"\n## gpu-check: {out['seconds']:.0f} s on {out['hardware']}\n")
    print("| step | ok | result |\n|---|---|---|")
    for s, ok, text in summary:
        print(f"| {s} | {'yes' if ok else 'NO'} | {text} |")
    if json_path:
        print(f"\nresults written to {json_path}")
    return 0 if all(ok for _, ok, _ in summary) else 1


def _doctor(device: str, quick: bool) -> dict:
    checks = [versions(), *gpu(), *folders(), hub()]
    if device.startswith("cuda") or quick:
        checks.append(gpu_trace(seconds=0.3 if quick else 6, device=device))
    for c in checks:
        print(c.line(), flush=True)
    fails = [c for c in checks if c.status == "fail" and not (quick and c.name == "gpu")]   # --quick: no GPU wanted
    return {"ok": not fails, "lines": [c.line() for c in checks],
            "trace": next((c.text for c in checks if c.name == "trace"), "no GPU trace"),
            **({"error": "; ".join(f"{c.name}: {c.text}" for c in fails)} if fails else {})}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m regcls.gpucheck", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (with --quick: what the tests run)")
    p.add_argument("--budget", type=float, default=420.0, help="seconds for everything (default 420)")
    p.add_argument("--quick", action="store_true", help="tiny models: the steps, not the numbers")
    p.add_argument("--json", default="gpu-check.json", help="where the results go (default gpu-check.json)")
    args = p.parse_args(argv)
    try:
        check_device(args.device)
    except RegclsError as e:
        print(f"error: {e}")
        return 2
    return run(args.device, args.budget, args.quick, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
