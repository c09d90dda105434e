"""Benchmark: the trace against timm's plain ``forward_features`` (wall time and peak memory, side by side in
one run), memory at two resolutions, image loading vs the whole trace, and on CUDA throughput with model
FLOPs utilisation. Random-initialised full-size models and synthetic images: the same compute as the real ones.

    python -m regcls.bench                 # CPU, 2 threads: ViT-S/B/L with registers at 224 px
    python -m regcls.bench --device cuda   # all eight DINOv2 models, bf16 autocast, MFU, paper-profile projection
    python -m regcls.bench --device cuda --json bench.json   # also keep the numbers with hardware and versions
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import __version__, files
from .cache import workload
from .data import DATASETS, ImageStore, dataset_files, decode_images, eval_config
from .env import check_device, hardware, use_amp
from .errors import RegclsError
from .metrics import bootstrap_ci, cka, cka_interval, mean_pairwise_cosine, oneshot, oneshot_split
from .models import build, create, layout
from .probe import linear_probe
from .profiles import PROFILES, SIZES, SIZE_NAMES, ModelSpec
from .precision import AMP_TOLERANCE, CHECK_KEYS, amp_agreement, precision_mode
from .runner import auto_batch_size, run_trace
from .trace import Tracer, trace_meta
from .tracefile import load_trace


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
# Dense float16 tensor-core peaks: as bf16 on Ampere and newer, and the T4's (which has no bf16).
PEAK_FP16_TFLOPS = (("T4", 65.0), *PEAK_BF16_TFLOPS)
# Float32 peaks without tensor cores (a float32 trace runs with TF32 off), same data sheets.
PEAK_FP32_TFLOPS = (("H100 PCIe", 51.0), ("H100 NVL", 60.0), ("H100", 67.0), ("H200 NVL", 60.0), ("H200", 67.0),
                    ("A100", 19.5), ("A10", 31.2), ("L40S", 91.6), ("L40", 90.5), ("L4", 30.3), ("T4", 8.1))


def peak_tflops(device_name: str, precision: str = "bf16") -> float:
    """Dense peak of a GPU from its name, for ``"bf16"``, ``"fp16"`` (the bf16 peak where the GPU has bf16; the T4's
    float16 tensor cores otherwise), ``"tf32"`` (half the bf16 peak on the tensor cores of Ampere and newer) or
    ``"fp32"`` (nan when unknown: pass ``--peak-tflops``)."""
    table = PEAK_FP32_TFLOPS if precision == "fp32" else PEAK_FP16_TFLOPS if precision == "fp16" else PEAK_BF16_TFLOPS
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


def end_to_end(model, device: str, batch: int, n_images: int, amp: bool) -> dict:
    """:func:`regcls.runner.run_trace` from a uint8 image store to the trace file -- host-to-device copies,
    normalisation, the precision check, the trace, device-to-host copies and the writes -- in a fresh decision
    cache: ``img_per_s`` of the timed run (its decision found in the cache, as every later request on the same
    weights finds it), ``check_s`` (the decision the warm-up made: checks of each precision tried), the timed
    run's ``phases`` (seconds: ``check`` -- finding the decision --, ``trace`` -- the device's loop --, ``drain``,
    ``finish``; and in the writing thread ``copy_wait`` and ``write``), the ``precision`` chosen and the
    ``check`` that decided (None where no lower precision was asked for)."""
    import os
    import tempfile
    import warnings

    S = model.patch_embed.img_size[0]
    pixels = np.random.default_rng(0).integers(0, 256, (n_images, 3, S, S), dtype=np.uint8)
    ids = [f"{i:06d}" for i in range(n_images)]
    images = ImageStore(pixels, ids).normalized((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    meta = trace_meta(model, model="bench", weights="random", dataset="synthetic", img_size=S)
    before = os.environ.get("REGCLS_CACHE")
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".* disagrees with float32")   # the precision is reported in the table
        os.environ["REGCLS_CACHE"] = d
        try:
            warm, timed = {}, {}
            run_trace(model, images[:batch], ids[:batch], out=Path(d) / "warm.npz", meta=meta, batch_size=batch,
                      device=device, amp=amp, progress=False, timings=warm)
            t = time.perf_counter()
            run_trace(model, images, ids, out=Path(d) / "t.npz", meta=meta, batch_size=batch, device=device,
                      amp=amp, progress=False, timings=timed)
            rate = n_images / (time.perf_counter() - t)
            meta = load_trace(Path(d) / "t.npz", meta_only=True)["meta"]
        finally:
            if before is None:
                os.environ.pop("REGCLS_CACHE", None)
            else:
                os.environ["REGCLS_CACHE"] = before
    mode = meta["precision_mode"]
    check = meta.get(CHECK_KEYS.get(mode, "")) or next((c for c in (meta.get(k) for k in CHECK_KEYS.values()) if c), None)
    return {"img_per_s": rate, "check_s": warm["check"], "phases": timed, "precision": mode, "check": check}


def model_ready(arch: str, img_size: int = 224, device: str = "cpu") -> dict:
    """Seconds to read a weights file (safetensors, random weights of ``arch``; just written, so from the page cache
    both times) against seconds until the model built from it (:func:`regcls.models.build` with the file as
    checkpoint) is on ``device``, ready to trace: the model is not initialised randomly first, and the tensors read
    become its weights."""
    import tempfile

    from safetensors.torch import save_file

    with torch.device("meta"):
        shapes = {k: (v.shape, v.dtype) for k, v in create(arch, pretrained=False, img_size=518).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.randn(s, generator=g) * 0.02).to(dt) for k, (s, dt) in shapes.items()}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "w.safetensors"
        save_file(sd, str(path))
        del sd
        t = time.perf_counter()
        buf = bytearray(1 << 24)
        with open(path, "rb") as f:   # every byte (safetensors maps the file: its load alone reads nothing yet)
            while f.readinto(buf):
                pass
        read = time.perf_counter() - t
        t = time.perf_counter()
        model = build(ModelSpec("?", arch), img_size, checkpoint=path).to(device)
        if device.startswith("cuda"):
            torch.cuda.synchronize(torch.device(device))
        ready = time.perf_counter() - t
        size = path.stat().st_size / 1e9
    del model
    return {"model": arch, "file_gb": size, "read_s": read, "ready_s": ready, "ratio": ready / read}


# The models of the GPU benchmark, most important first (a short window measures what matters most): the largest
# with registers (the paper's main claims), L, the giant at 518 px (Sec. 4.1's sensitivity), B and S, then the
# models without registers.
DEVICE_MODELS = (("giant", True, 224), ("large", True, 224), ("giant", True, 518), ("base", True, 224),
                 ("small", True, 224), ("giant", False, 224), ("large", False, 224), ("base", False, 224),
                 ("small", False, 224))


def dinov2_models(quick: bool = False) -> list[tuple[str, int]]:
    """``(timm arch, px)`` of :data:`DEVICE_MODELS` (quick: S and g with registers at 224 px)."""
    chosen = [m for m in DEVICE_MODELS if m[1] and m[2] == 224 and m[0] in ("small", "giant")] if quick else DEVICE_MODELS
    return [(f"vit_{size}_patch14_{'reg4_' if reg else ''}dinov2", px) for size, reg, px in chosen]


def dinov2_archs() -> list[str]:
    return [f"vit_{SIZE_NAMES[s]}_patch14_{'reg4_' if reg else ''}dinov2" for reg in (True, False) for s in SIZES]


def bench_device(device: str = "cuda", models: list[tuple[str, int]] | None = None, batch: int | None = None,
                 repeats: int = 10, peak: float | None = None, amp: bool = True, overrides: dict | None = None,
                 on_row=None, budget: float | None = None) -> list[dict]:
    """DINOv2 models (random weights, synthetic images; ``models``: ``(arch, px)``, most important first):
    throughput of the plain forward pass and of the trace in the precision the trace chose, model FLOPs
    utilisation (MFU, forward FLOPs over the device's dense peak in that precision), peak memory, the end-to-end
    rate of ``run_trace`` with its phases, and the agreement check that decided. ``on_row(rows)`` is called after
    each model, so that a run cut short keeps what it measured; with ``budget`` (seconds) a model whose time,
    projected from the last one's by FLOPs, would end past the budget is skipped (listed in a row of its own)."""
    cuda = device.startswith("cuda")
    amp = amp and (not cuda or use_amp(device))
    rows, start, last = [], time.monotonic(), None
    for arch, img_size in models or dinov2_models():
        torch.manual_seed(0)
        with torch.device("meta"):
            flops = flops_per_image(create(arch, pretrained=False, img_size=img_size, overrides=overrides))
        if budget is not None and last is not None:
            left = budget - (time.monotonic() - start)
            if last[0] * flops / last[1] > left:
                rows.append({"model": arch, "img": img_size, "skipped": f"over the budget ({left:.0f} s left)"})
                if on_row:
                    on_row(rows)
                continue
        t_model = time.monotonic()
        with torch.device(device):  # random init on the device (seconds for ViT-g instead of a minute)
            model = create(arch, pretrained=False, img_size=img_size, overrides=overrides)
        bs = batch or auto_batch_size(model, device, amp)
        e2e = end_to_end(model, device, bs, max(8 * bs, 32), amp)    # fixed costs over 8 batches; decides precision
        mode = e2e["precision"]
        x = torch.randn(bs, 3, img_size, img_size, device=device)
        with precision_mode(device, mode):
            r = time_pair(model, x, repeats, device)
        top = device_peak(device, peak, mode)
        agree = e2e["check"] or amp_agreement(model, x[:32])   # the check that decided (or, for float32, one for the table)
        rows.append({"model": arch, "img": img_size, "batch": bs, "precision": mode,
                     "plain_img_per_s": bs / r["plain_s"], "trace_img_per_s": bs / r["trace_s"],
                     "time_ratio": r["trace_s"] / r["plain_s"], "mfu": flops * bs / r["trace_s"] / 1e12 / top,
                     "trace_peak_gb": r.get("trace_mb", float("nan")) / 1024,
                     "end_to_end_img_per_s": e2e["img_per_s"], "e2e_over_trace": e2e["img_per_s"] * r["trace_s"] / bs,
                     "end_to_end_mfu": flops * e2e["img_per_s"] / 1e12 / top, "check_s": e2e["check_s"],
                     "phases": e2e["phases"], "gflop_per_img": flops / 1e9, **agree})
        del model, x
        if cuda:
            torch.cuda.empty_cache()
        last = (time.monotonic() - t_model, flops)
        if on_row:
            on_row(rows)
    return rows


def paper_workload() -> list[dict]:
    """Every trace the chapters request on the paper profile: model, dataset, images, resolution."""
    return [{"arch": j.spec.arch, "dataset": j.dataset, "images": DATASETS[j.dataset].n_images, "img_size": j.img_size,
             "crop_pct": j.crop_pct} for j in workload(PROFILES["paper"])]


def project_paper(rows: list[dict], ready: dict | None = None) -> dict:
    """Time of every trace of the paper workload on this device: the images at the measured end-to-end rates
    where the benchmark ran the same model at the same resolution, else FLOPs over the end-to-end FLOP rate of
    the measured model nearest in FLOPs per image (a small model uses a GPU less well than a large one: a median
    over the models measured moves with which of them a short window reached); plus each trace's precision check
    (measured per model where it ran, else scaled by FLOPs from the nearest)
    and, with ``ready`` (:func:`model_ready`), each distinct model's loading, scaled by its weights' size."""
    rows = [r for r in rows if "skipped" not in r]
    rate = {(r["model"], r["img"]): r["end_to_end_img_per_s"] for r in rows}
    check = {(r["model"], r["img"]): r["check_s"] for r in rows}

    def nearest(gflop: float) -> dict:
        return min(rows, key=lambda r: abs(math.log(r["gflop_per_img"] / gflop)))
    total, checks, loads, measured, scaled, seen = 0.0, 0.0, 0.0, 0, 0, set()
    for job in paper_workload():
        with torch.device("meta"):
            model = create(job["arch"], pretrained=False, img_size=job["img_size"])
        gflop = flops_per_image(model) / 1e9
        key = (job["arch"], job["img_size"])
        if key in rate:
            total += job["images"] / rate[key]
            measured += 1
        else:
            near = nearest(gflop)
            total += job["images"] * gflop / (near["gflop_per_img"] * near["end_to_end_img_per_s"])
            scaled += 1
        if key in check:
            checks += check[key]
        else:
            near = nearest(gflop)
            checks += near["check_s"] * gflop / near["gflop_per_img"]
        if ready and (job["arch"], job["img_size"]) not in seen:
            seen.add((job["arch"], job["img_size"]))
            loads += ready["ready_s"] / ready["file_gb"] * sum(p.numel() for p in model.parameters()) * 4 / 1e9
    return {"traces": measured + scaled, "measured_rate": measured, "flop_scaled": scaled, "trace_seconds": total,
            "check_seconds": checks, "load_seconds": loads, "total_seconds": total + checks + loads}


def bench_costs(threads: int = 2, quick: bool = False) -> list[dict]:
    """The CPU proxies of the real run's costs, each against its target: the trace against a plain forward pass of a
    narrow ViT at batch 256 (where issuing operations dominates, as on a GPU), the bytes handed to ``write()`` per
    byte of trace file, the peak host memory of a bf16 trace against a float32 one (ViT-L, 8 images; fresh
    processes), and the time until a model built from a weights file is ready against reading the file (ViT-L)."""
    import os
    import subprocess
    import tempfile

    torch.set_num_threads(threads)
    rows = []
    torch.manual_seed(0)
    narrow = create("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=56,
                    overrides=dict(embed_dim=48, depth=2, num_heads=3))
    r = time_pair(narrow, torch.randn(256, 3, 56, 56), 5 if quick else 20, "cpu")
    rows.append({"cost": "Tracer.run / plain forward_features, narrow ViT (D 48, 2 blocks, 56 px), batch 256",
                 "value": r["trace_s"] / r["plain_s"], "target": 1.3})
    written, real = [0], files._writer

    class Counting:
        def __init__(self, fd):
            self.f = real(fd)

        def write(self, b):
            written[0] += memoryview(b).nbytes
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

    files._writer = Counting
    try:
        with tempfile.TemporaryDirectory() as d:
            out = run_trace(narrow, torch.randn(64, 3, 56, 56), [str(i) for i in range(64)], out=Path(d) / "t.npz",
                            meta=trace_meta(narrow, model="m", weights="random", dataset="d", img_size=56),
                            batch_size=16, progress=False)
            size = out.stat().st_size
    finally:
        files._writer = real
    rows.append({"cost": "bytes handed to write() / trace file, 64 images", "value": written[0] / size, "target": 1.15})
    if not quick:
        code = ("import sys,torch;from regcls import bench as b;torch.set_num_threads(2);"
                "print(b._traced_peak(sys.argv[1], sys.argv[2] == 'bf16'))")
        peaks = {m: float(subprocess.run([sys.executable, "-c", code, "vit_large_patch14_reg4_dinov2", m], check=True,
                                         capture_output=True, text=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536",
                                                                             "MALLOC_TRIM_THRESHOLD_": "0"})
                         .stdout.strip().splitlines()[-1]) for m in ("bf16", "fp32")}
        rows.append({"cost": "peak host memory, bf16 trace / float32 trace, ViT-L/14+reg, 8 images (whole process)",
                     "value": peaks["bf16"] / peaks["fp32"], "target": 1.3, **{f"{m}_mb": v for m, v in peaks.items()}})
        ready = model_ready("vit_large_patch14_reg4_dinov2")
        rows.append({"cost": f"model ready / weights file read, ViT-L/14+reg ({ready['file_gb']:.1f} GB)",
                     "value": ready["ratio"], "target": 2.0, "read_s": ready["read_s"], "ready_s": ready["ready_s"]})
    return rows


def _traced_peak(arch: str, bf16: bool, n: int = 8) -> float:
    """Peak resident memory (MB) of this process after tracing ``n`` random images with ``arch`` (random weights)
    into a file, with bf16 asked for (and checked) or in float32."""
    import os
    import tempfile

    torch.manual_seed(0)
    model = create(arch, pretrained=False, img_size=224)
    x = torch.randn(n, 3, 224, 224)
    with tempfile.TemporaryDirectory() as d:
        os.environ["REGCLS_CACHE"] = d
        run_trace(model, x, [str(i) for i in range(n)], out=Path(d) / "t.npz", amp=bf16, progress=False,
                  meta=trace_meta(model, model="m", weights="random", dataset="d", img_size=224))
    return _status_mb("VmHWM")


def _print(title: str, rows) -> None:
    rows = rows if isinstance(rows, list) else [rows]
    print(f"\n## {title}")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    print(" | ".join(keys))
    for r in rows:
        print(" | ".join(f"{r[k]:.3f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys))


def device_tables(rows: list[dict]) -> dict[str, list[dict]]:
    """The GPU benchmark's rows as the tables it prints: throughput, the phases of the end-to-end run, the
    checks."""
    done = [r for r in rows if "skipped" not in r]
    speed = [{k: r[k] for k in ("model", "img", "batch", "precision", "plain_img_per_s", "trace_img_per_s",
                                "time_ratio", "mfu", "trace_peak_gb", "end_to_end_img_per_s", "e2e_over_trace",
                                "end_to_end_mfu")} for r in done] + [r for r in rows if "skipped" in r]
    phases = [{"model": r["model"], "img": r["img"], "decide_s": r["check_s"],
               **{f"{k}_s": v for k, v in r["phases"].items()}} for r in done]
    checks = [{k: r.get(k) for k in ("model", "img", "mode", "identity_fp32", "identity_bf16", "share_change_p99",
                                     "cka_min", "cka_min_key", "norm_change_max", "prefix_error_max", "nonfinite", "ok")}
              for r in done]
    return {"speed": speed, "phases": phases, "checks": checks}


def main(argv=None) -> int:
    import json
    import platform

    p = argparse.ArgumentParser(prog="python -m regcls.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (CPU benchmark)")
    p.add_argument("--quick", action="store_true", help="fewer models and repeats (a smoke check of the script)")
    p.add_argument("--budget", type=float, help="seconds for the GPU models: the most important first, a model "
                                                "projected to end past the budget is skipped")
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense peak in the precision traced, for GPUs not in "
                                                     "the built-in table")
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
        results.update(device_benchmark(args.device, quick=args.quick, budget=args.budget, peak=args.peak_tflops,
                                        json_path=args.json, head=results))
    else:
        costs = bench_costs(args.threads, quick=args.quick)
        _print("the real run's costs, CPU proxies (each against its target)", costs)
        sizes = ("small",) if args.quick else ("small", "base", "large")
        rows = bench_cpu(sizes, repeats=2 if args.quick else 5, threads=args.threads)
        _print(f"trace vs plain forward_features (CPU, {args.threads} threads, medians, alternated)", rows)
        mem = bench_memory()
        _print("peak memory by resolution (ViT-S/14+reg, batch 2)", mem)
        load = bench_loading(n_images=32 if args.quick else 125)
        _print("image loading vs whole trace (ViT-B/14+reg, 224 px)", load)
        print("\ntargets: time_ratio <= 1.10 and mem_ratio <= 1.2 for ViT-B/14+reg; each cost within its target")
        results.update(costs=costs, cpu_rows=rows, memory=mem, loading=load, machine=platform.machine())
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


def device_benchmark(device: str, quick: bool = False, budget: float | None = None, peak: float | None = None,
                     json_path: str | None = None, head: dict | None = None, models=None, overrides=None,
                     batch: int | None = None) -> dict:
    """The GPU benchmark (:func:`bench_device` with its tables and the paper profile's projected time), printed;
    with ``json_path`` the JSON is written after every model. Returns what it measured."""
    import json

    def keep(rows):  # one line per model as it finishes, and the JSON so far
        r = rows[-1]
        if "skipped" in r:
            print(f"{r['model']} at {r['img']} px: skipped, {r['skipped']}", flush=True)
        else:
            print(f"{r['model']} at {r['img']} px: batch {r['batch']}, trace {r['trace_img_per_s']:.0f} img/s "
                  f"({r['time_ratio']:.2f}x plain), MFU {r['mfu']:.2f}, end to end {r['end_to_end_img_per_s']:.0f} "
                  f"img/s ({r['precision']})", flush=True)
        if json_path:
            Path(json_path).write_text(json.dumps({**(head or {}), "device_rows": rows}, indent=1, default=str))

    rows = bench_device(device, models or dinov2_models(quick), repeats=3 if quick else 10, peak=peak, on_row=keep,
                        budget=budget, overrides=overrides, batch=batch)
    tables = device_tables(rows)
    _print("GPU: throughput, the trace against a plain forward pass, MFU (against the peak of the precision traced)",
           tables["speed"])
    _print("GPU: the end-to-end run's phases (seconds; decide: the precision checks, once per weights and images)",
           tables["phases"])
    _print(f"GPU: the check that decided each precision (tolerance {AMP_TOLERANCE})", tables["checks"])
    out = {"device_rows": rows, "tables": tables, "tolerance": AMP_TOLERANCE}
    if any("skipped" not in r for r in rows):
        out["projection"] = project_paper(rows)
        _print("projected GPU time of every trace of the paper profile (seconds)", out["projection"])
    print("\ntargets: trace <= 1.15x plain for ViT-L and ViT-g; end to end >= 0.8x the trace; the paper profile's "
          "traces <= 600 s")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
