"""Benchmark: the trace against timm's plain ``forward_features`` (wall time and peak memory, side by side in
one run), memory at two resolutions, image loading vs the whole trace, and on CUDA throughput with model
FLOPs utilisation. Random-initialised full-size models and synthetic images: the same compute as the real ones.

    python -m regcls.bench                 # CPU, 2 threads: ViT-S/B/L with registers at 224 px
    python -m regcls.bench --device cuda   # all eight DINOv2 models, bf16 autocast, MFU, paper-profile projection
    python -m regcls.bench --device cuda --json bench.json   # also keep the numbers with hardware and versions
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .cache import workload
from .data import DATASETS, ImageStore, dataset_files, decode_images, eval_config
from .env import check_device, hardware, use_bf16
from .errors import RegclsError
from .metrics import bootstrap_ci, cka, cka_interval, mean_pairwise_cosine, oneshot, oneshot_split
from .models import create, layout
from .probe import linear_probe
from .profiles import PROFILES, SIZES, SIZE_NAMES
from .trace import AMP_TOLERANCE, Tracer, amp_agreement, auto_batch_size, load_trace, run_trace, trace_meta


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak resident set size
    except OSError:
        pass


def _status_mb(field: str) -> float:
    """A memory line of /proc/self/status in MB: ``VmRSS`` (resident now) or ``VmHWM`` (peak resident)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def flops_per_image(model) -> float:
    """Forward FLOPs of one image (2 x multiply-adds): linear layers on every token plus attention."""
    lin = sum(m.weight.numel() for blk in model.blocks for m in blk.modules() if isinstance(m, torch.nn.Linear))
    N = model.num_prefix_tokens + model.patch_embed.num_patches
    D, L = model.embed_dim, len(model.blocks)
    return 2.0 * lin * N + 4.0 * N * N * D * L + 2.0 * model.patch_embed.proj.weight.numel() * model.patch_embed.num_patches


def time_pair(model, x, repeats: int, device: str) -> dict:
    """Median wall time and peak memory of plain forward_features vs the trace, alternated in one run.

    The trace's hooks are registered outside the timed region (a real run registers them once).
    """
    cuda = device.startswith("cuda")
    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)   # the device timed, not device 0
    tracer = Tracer(model)
    times = {"plain": [], "trace": []}
    mem = {"plain": 0.0, "trace": 0.0}
    with torch.inference_mode():
        for r in range(repeats + 1):                      # the first round is a warm-up
            for name in ("plain", "trace"):
                if name == "trace":
                    tracer.attach()
                fn = tracer.run if name == "trace" else model.forward_features
                if cuda:
                    torch.cuda.reset_peak_memory_stats(dev)
                    base = torch.cuda.memory_allocated(dev) / 2**20
                else:
                    _reset_peak()
                    base = _status_mb("VmRSS")
                sync()
                t = time.perf_counter()
                out = fn(x)
                sync()
                dt = time.perf_counter() - t
                peak = torch.cuda.max_memory_allocated(dev) / 2**20 if cuda else _status_mb("VmHWM")
                del out
                if name == "trace":
                    tracer.detach()
                if r > 0:
                    times[name].append(dt)
                    mem[name] = max(mem[name], peak - base)
    out = {"plain_s": statistics.median(times["plain"]), "trace_s": statistics.median(times["trace"])}
    if cuda:
        out.update(plain_mb=mem["plain"], trace_mb=mem["trace"])
    return out


def peak_forward_mb(arch: str, img: int, batch: int, mode: str) -> float:
    """Peak resident memory added by one first forward pass, measured in a fresh process (CPU).

    A fresh process is needed: once freed, memory stays with the allocator and a second pass adds none.
    glibc is told to serve every allocation over 64 KiB by mmap and to return it at once, so the resident
    peak follows the live tensors instead of the heap's history. Median of three processes.
    """
    import os
    import subprocess

    code = ("import torch,sys;from regcls import bench as b;torch.set_num_threads(2);"
            f"print(b._probe({arch!r},{img},{batch},{mode!r}))")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    runs = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                 env=env).stdout.strip().splitlines()[-1]) for _ in range(3)]
    return statistics.median(runs)


def _probe(arch: str, img: int, batch: int, mode: str) -> float:
    torch.manual_seed(0)
    model = create(arch, pretrained=False, img_size=img)
    x = torch.randn(batch, 3, img, img)
    with torch.inference_mode():
        tracer = Tracer(model).attach() if mode == "trace" else None
        base = _status_mb("VmRSS")
        _reset_peak()
        out = tracer.run(x) if tracer else model.forward_features(x)
        peak = _status_mb("VmHWM")
    del out
    return peak - base


def bench_cpu(sizes=("small", "base", "large"), batch: int = 8, repeats: int = 5, threads: int = 2) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    for size in sizes:
        arch = f"vit_{size}_patch14_reg4_dinov2"
        torch.manual_seed(0)
        model = create(arch, pretrained=False, img_size=224)
        x = torch.randn(batch, 3, 224, 224)
        r = time_pair(model, x, repeats, "cpu")
        del model
        r["plain_mb"], r["trace_mb"] = (peak_forward_mb(arch, 224, batch, m) for m in ("plain", "trace"))
        rows.append({"model": f"ViT-{size[0].upper()}/14+reg", "img": 224, "batch": batch, **r,
                     "time_ratio": r["trace_s"] / r["plain_s"], "mem_ratio": r["trace_mb"] / max(r["plain_mb"], 1e-9)})
    return rows


def bench_memory(resolutions=(224, 518), batch: int = 2) -> list[dict]:
    """Peak memory of the trace at two resolutions (linear in tokens: no N x N kept for any layer)."""
    rows = []
    arch = "vit_small_patch14_reg4_dinov2"
    for img in resolutions:
        with torch.device("meta"):
            lay = layout(create(arch, pretrained=False, img_size=img))
        N = lay.num_tokens
        rows.append({"img": img, "tokens": N, "plain_mb": peak_forward_mb(arch, img, batch, "plain"),
                     "trace_mb": peak_forward_mb(arch, img, batch, "trace"),
                     "N x N maps of all layers and heads (MB)": batch * N * N * lay.heads * lay.depth * 4 / 2**20})
    return rows


def bench_loading(n_images: int = 125, img_size: int = 224) -> dict:
    """Images per second for decoding + resizing alone vs the whole trace (ViT-B/14+reg, CPU)."""
    images = dataset_files("samples", n_images)
    model = create("vit_base_patch14_reg4_dinov2", pretrained=False, img_size=img_size)
    geo, mean, std = eval_config(model, img_size)
    t = time.perf_counter()
    store = decode_images(images.files, images.ids, geo, progress=False)
    load_s = time.perf_counter() - t
    x = store.normalized(mean, std)
    t = time.perf_counter()
    with Tracer(model) as tracer:
        for i in range(0, len(store), 16):
            tracer.run(x[i:i + 16])
    trace_s = time.perf_counter() - t
    return {"images": len(store), "decode_img_per_s": len(store) / load_s, "trace_img_per_s": len(store) / trace_s}


def sklearn_probe(X: np.ndarray, y: np.ndarray, seed: int = 0, test_size: float = 0.3,
                  Cs: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)) -> dict:
    """The baseline for :func:`regcls.probe.linear_probe`: the same probe written the usual way, scikit-learn's
    GridSearchCV over StandardScaler + LogisticRegression (same splits), timed as the baseline (the tests check
    linear_probe against their own scikit-learn oracle). Returns ``{"accuracy", "C"}``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold, train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=test_size, random_state=seed, stratify=y)
    folds = max(2, int(min(3, np.bincount(np.unique(ytr, return_inverse=True)[1]).min())))
    search = GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000)),
                          {"logisticregression__C": list(Cs)},
                          cv=StratifiedKFold(folds, shuffle=True, random_state=seed)).fit(Xtr, ytr)
    return {"accuracy": float(search.score(Xte, yte)), "C": float(search.best_params_["logisticregression__C"])}


def bench_analysis(n: int = 5000, d: int = 1536, n_boot: int = 300, probe: bool = True,
                   device: str = "cpu") -> list[dict]:
    """Seconds of the chapters' heaviest analysis steps at paper-profile shapes (ViT-g width, all COCO
    images; synthetic features). The bootstrap of CKA is timed both ways: resampling the rows and recomputing
    CKA (the generic path, timed on 3 resamples and scaled to ``n_boot``) and from the Gram matrices; the
    class probe both ways: scikit-learn on the CPU (the baseline) and :func:`linear_probe` on ``device``."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, d)) + 3.0
    Y = X @ rng.standard_normal((d, d)) / np.sqrt(d) + rng.standard_normal((n, d))
    rows = []

    def seconds(fn) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    def timed(what, fn):
        rows.append({"step": what, "seconds": seconds(fn)})

    once = seconds(lambda: bootstrap_ci(cka, X, Y, n_boot=0))
    per = (seconds(lambda: bootstrap_ci(cka, X, Y, n_boot=3)) - once) / 3
    rows.append({"step": f"CKA interval, {n_boot} resamples, generic loop (3 timed, scaled)",
                 "seconds": once + n_boot * per})
    timed(f"CKA interval, {n_boot} resamples, Gram form", lambda: cka_interval(X, Y, n_boot=n_boot))
    timed("debiased CKA", lambda: cka(X, Y, debiased=True))
    timed("mean pairwise cosine interval, 200 resamples", lambda: bootstrap_ci(mean_pairwise_cosine, X, n_boot=200))
    # ImageNetV2 shape: 10 images of each of 1,000 classes
    y = np.repeat(np.arange(1000), 10)
    F = rng.standard_normal((10_000, d)) + 0.12 * rng.standard_normal((1000, d))[y]
    train, test = oneshot_split(y, 0)
    timed("one-shot run: 1,000 classes x 1 image, 3 test sets of 1,000", lambda: oneshot(
        F[train], y[train], {p: F[test] for p in ("full", "patch", "reg")}, y[test]))
    if probe:
        timed("class probe: 10,000 x 1,536, 1,000 classes (13 fits), scikit-learn, CPU", lambda: sklearn_probe(F, y))
        timed(f"the same probe, regcls.probe (torch L-BFGS, float32), {device}",
              lambda: linear_probe(F, y, device=device))
    return rows


# Dense bfloat16 tensor-core peaks in TFLOP/s, from the vendors' data sheets; the first name that matches wins.
# Longer names come first where one name contains another (GB200 / B200, H200 NVL / H200, A100 / A10, L40S / L40 /
# L4). The T4 has no bfloat16 (its fp16 tensor peak is 65): traces run in float32 there.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200 NVL", 835.0), ("H200", 989.0),
                    ("GB200", 2500.0), ("B200", 2250.0), ("A100", 312.0), ("A10", 125.0), ("L40S", 362.0),
                    ("L40", 181.0), ("L4", 121.0))
# Float32 peaks without tensor cores (a float32 trace runs with TF32 off), same data sheets.
PEAK_FP32_TFLOPS = (("H100 PCIe", 51.0), ("H100 NVL", 60.0), ("H100", 67.0), ("H200 NVL", 60.0), ("H200", 67.0),
                    ("A100", 19.5), ("A10", 31.2), ("L40S", 91.6), ("L40", 90.5), ("L4", 30.3), ("T4", 8.1))


def peak_tflops(device_name: str, precision: str = "bf16") -> float:
    """Dense peak of a GPU from its name, for ``"bf16"``, ``"tf32"`` (half the bf16 peak on the tensor cores of
    Ampere and newer) or ``"fp32"`` (nan when unknown: pass ``--peak-tflops``)."""
    table = PEAK_FP32_TFLOPS if precision == "fp32" else PEAK_BF16_TFLOPS
    peak = next((tf for key, tf in table if key in device_name), float("nan"))
    return peak / 2 if precision == "tf32" else peak


def device_peak(device: str, override: float | None = None, precision: str = "bf16") -> float:
    """The peak MFU is measured against: ``override``, else the table's value for this GPU in the precision the
    trace ran in (nan on a CPU)."""
    if override:
        return override
    if not device.startswith("cuda"):
        return float("nan")
    return peak_tflops(torch.cuda.get_device_name(torch.device(device)), precision)


def end_to_end(model, device: str, batch: int, n_images: int, amp: bool) -> tuple[float, str, dict | None]:
    """Images per second of :func:`regcls.trace.run_trace` from a uint8 image store to the trace file:
    host-to-device copies, normalisation, the bf16 check, the trace, device-to-host copies and the writes
    included; the precision run_trace chose (``"bf16"``, or ``"tf32"`` / ``"fp32"`` where bf16 missed the
    tolerance) and the check that decided (None when bf16 was not asked for)."""
    import tempfile
    import warnings

    S = model.patch_embed.img_size[0]
    pixels = np.random.default_rng(0).integers(0, 256, (n_images, 3, S, S), dtype=np.uint8)
    ids = [f"{i:06d}" for i in range(n_images)]
    images = ImageStore(pixels, ids).normalized((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    meta = trace_meta(model, model="bench", weights="random", dataset="synthetic", img_size=S)
    with tempfile.TemporaryDirectory() as d:
        run_trace(model, images[:batch], ids[:batch], out=Path(d) / "warm.npz", meta=meta, batch_size=batch,
                  device=device, amp=amp, progress=False)
        t = time.perf_counter()
        with warnings.catch_warnings():  # the precision is reported in the table instead
            warnings.filterwarnings("ignore", ".* disagrees with float32")
            run_trace(model, images, ids, out=Path(d) / "t.npz", meta=meta, batch_size=batch, device=device,
                      amp=amp, progress=False)
        rate = n_images / (time.perf_counter() - t)
        meta = load_trace(Path(d) / "t.npz", meta_only=True)["meta"]
        mode = meta["precision_mode"]
        return rate, mode, meta.get("tf32_check") or meta.get("amp_check")


def dinov2_archs() -> list[str]:
    return [f"vit_{SIZE_NAMES[s]}_patch14_{'reg4_' if reg else ''}dinov2" for reg in (True, False) for s in SIZES]


def bench_device(device: str = "cuda", archs: list[str] | None = None, img_size: int = 224,
                 batch: int | None = None, repeats: int = 10, peak: float | None = None, amp: bool = True,
                 overrides: dict | None = None, on_row=None) -> list[dict]:
    """Every DINOv2 model (random weights, synthetic images): throughput of the plain forward pass and of
    the trace, model FLOPs utilisation (MFU, forward FLOPs over the device's dense bf16 peak), peak memory,
    the end-to-end rate of ``run_trace`` and the agreement of bf16 autocast with float32.
    ``on_row(rows)`` is called after each model, so that a run cut short keeps what it measured."""
    cuda = device.startswith("cuda")
    amp = amp and (not cuda or use_bf16(device))   # a T4 has no native bf16: its traces run in float32, timed so
    rows = []
    for arch in archs or dinov2_archs():
        torch.manual_seed(0)
        with torch.device(device):  # random init on the device (seconds for ViT-g instead of a minute)
            model = create(arch, pretrained=False, img_size=img_size, overrides=overrides)
        bs = batch or auto_batch_size(model, device, amp)
        x = torch.randn(bs, 3, img_size, img_size, device=device)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
            r = time_pair(model, x, repeats, device)
        flops = flops_per_image(model)
        e2e, precision, check = end_to_end(model, device, bs, max(8 * bs, 32), amp)   # fixed costs over 8 batches
        top = device_peak(device, peak, "bf16" if amp else "fp32")              # MFU in the precision timed
        top_e2e = device_peak(device, peak, precision)
        agree = check or amp_agreement(model, x[:32])   # the check the trace decided by (or, for float32, one for the table)
        rows.append({"model": arch, "img": img_size, "batch": bs, "plain_img_per_s": bs / r["plain_s"],
                     "trace_img_per_s": bs / r["trace_s"], "time_ratio": r["trace_s"] / r["plain_s"],
                     "mfu": flops * bs / r["trace_s"] / 1e12 / top, "trace_peak_gb": r.get("trace_mb", float("nan")) / 1024,
                     "end_to_end_img_per_s": e2e, "end_to_end_mfu": flops * e2e / 1e12 / top_e2e,
                     "end_to_end_precision": precision,
                     "gflop_per_img": flops / 1e9, **agree})
        del model, x
        if cuda:
            torch.cuda.empty_cache()
        if on_row:
            on_row(rows)
    return rows


def paper_workload() -> list[dict]:
    """Every trace the chapters request on the paper profile: model, dataset, images, resolution."""
    return [{"arch": j.spec.arch, "dataset": j.dataset, "images": DATASETS[j.dataset].n_images, "img_size": j.img_size,
             "crop_pct": j.crop_pct} for j in workload(PROFILES["paper"])]


def project_paper(rows: list[dict]) -> dict:
    """Trace time of the whole paper workload on this device: measured end-to-end rates where the benchmark
    ran the same model at the same resolution, else FLOPs over the median end-to-end FLOP rate measured."""
    rate = {(r["model"], r["img"]): r["end_to_end_img_per_s"] for r in rows}
    flop_rate = statistics.median(r["gflop_per_img"] * r["end_to_end_img_per_s"] for r in rows)  # GFLOP/s
    total, measured, scaled = 0.0, 0, 0
    for job in paper_workload():
        if (job["arch"], job["img_size"]) in rate:
            total += job["images"] / rate[job["arch"], job["img_size"]]
            measured += 1
        else:
            with torch.device("meta"):
                model = create(job["arch"], pretrained=False, img_size=job["img_size"])
            total += job["images"] * flops_per_image(model) / 1e9 / flop_rate
            scaled += 1
    return {"traces": measured + scaled, "measured_rate": measured, "flop_scaled": scaled, "trace_seconds": total}


def _print(title: str, rows) -> None:
    rows = rows if isinstance(rows, list) else [rows]
    print(f"\n## {title}")
    keys = list(rows[0])
    print(" | ".join(keys))
    for r in rows:
        print(" | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys))


def main(argv=None) -> int:
    import json
    import platform

    p = argparse.ArgumentParser(prog="python -m regcls.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (CPU benchmark)")
    p.add_argument("--quick", action="store_true", help="fewer models and repeats (a smoke check of the script)")
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, for GPUs not in the built-in table")
    p.add_argument("--analysis", action="store_true",
                   help="also time the heaviest analysis steps at paper-profile shapes (CPU, several minutes)")
    p.add_argument("--json", help="also write the results, with the hardware and versions, to this file")
    args = p.parse_args(argv)
    try:
        check_device(args.device)
    except RegclsError as e:
        print(f"error: {e}")
        return 2
    where = hardware()
    print(f"regcls benchmark on {where}")
    results: dict = {"hardware": where, "torch": torch.__version__, "regcls": __version__,
                     "command": "python -m regcls.bench " + " ".join(sys.argv[1:] if argv is None else argv),
                     "date": time.strftime("%Y-%m-%d")}
    if args.device.startswith("cuda"):
        archs = [a for a in dinov2_archs() if "small" in a or "giant" in a][:2] if args.quick else None
        def keep(rows):  # one line per model as it finishes, and the JSON so far
            r = rows[-1]
            print(f"{r['model']}: batch {r['batch']}, trace {r['trace_img_per_s']:.0f} img/s, MFU {r['mfu']:.2f}, "
                  f"end to end {r['end_to_end_img_per_s']:.0f} img/s ({r['end_to_end_precision']})", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps({**results, "device_rows": rows}, indent=1, default=str))

        rows = bench_device(args.device, archs, repeats=3 if args.quick else 10, peak=args.peak_tflops, on_row=keep)
        peak = device_peak(args.device, args.peak_tflops)
        _print(f"GPU: trace throughput and model FLOPs utilisation (224 px; against the peak of the precision timed: "
               f"bf16 {peak:.0f} TFLOP/s, fp32 {device_peak(args.device, args.peak_tflops, 'fp32'):.0f})",
               [{k: r[k] for k in ("model", "batch", "plain_img_per_s", "trace_img_per_s", "time_ratio", "mfu",
                                   "trace_peak_gb", "end_to_end_img_per_s", "end_to_end_mfu", "end_to_end_precision")}
                for r in rows])
        _print(f"GPU: bf16 against float32 (tolerance {AMP_TOLERANCE})",
               [{k: r[k] for k in ("model", "identity_fp32", "identity_bf16", "share_change_p99", "attn_mass_maxdiff", "cka_min",
                                   "cka_min_key", "ok")} for r in rows])
        proj = project_paper(rows)
        _print("projected GPU time of every trace of the paper profile", proj)
        print("\ntargets: mfu >= 0.25 for every DINOv2 model; all paper-profile traces in under 180 s")
        results.update(device_rows=rows, projection=proj, peak_tflops=peak, tolerance=AMP_TOLERANCE)
    else:
        sizes = ("small",) if args.quick else ("small", "base", "large")
        rows = bench_cpu(sizes, repeats=2 if args.quick else 5, threads=args.threads)
        _print(f"trace vs plain forward_features (CPU, {args.threads} threads, medians, alternated)", rows)
        mem = bench_memory()
        _print("peak memory by resolution (ViT-S/14+reg, batch 2)", mem)
        load = bench_loading(n_images=32 if args.quick else 125)
        _print("image loading vs whole trace (ViT-B/14+reg, 224 px)", load)
        print("\ntargets: time_ratio <= 1.10 and mem_ratio <= 1.2 for ViT-B/14+reg")
        results.update(cpu_rows=rows, memory=mem, loading=load, machine=platform.machine())
    if args.analysis:
        if not args.device.startswith("cuda"):
            torch.set_num_threads(args.threads)
        ana = bench_analysis(n_boot=30 if args.quick else 300, probe=not args.quick, device=args.device)
        _print("analysis at paper-profile shapes (n = 5,000 images, d = 1,536; numpy on the CPU)", ana)
        results["analysis"] = ana
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
