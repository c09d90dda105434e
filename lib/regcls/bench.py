"""Benchmark: the trace against timm's plain ``forward_features`` (wall time and peak memory, side by side in
one run), memory at two resolutions, image loading vs the whole trace, and on CUDA throughput with model
FLOPs utilisation. Random-initialised full-size models and synthetic images: the same compute as the real ones.

    python -m regcls.bench                 # CPU, 2 threads: ViT-S/B/L with registers at 224 px
    python -m regcls.bench --device cuda   # all eight DINOv2 models, bf16 autocast
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from .models import create
from .trace import Tracer


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak resident set size
    except OSError:
        pass


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
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
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    tracer = Tracer(model)
    times = {"plain": [], "trace": []}
    mem = {"plain": 0.0, "trace": 0.0}
    with torch.inference_mode():
        for r in range(repeats + 1):                      # the first round is a warm-up
            for name in ("plain", "trace"):
                if name == "trace":
                    tracer.__enter__()
                fn = tracer.run if name == "trace" else model.forward_features
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated() / 2**20
                else:
                    _reset_peak()
                    base = _rss_mb()
                sync()
                t = time.perf_counter()
                out = fn(x)
                sync()
                dt = time.perf_counter() - t
                peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mb()
                del out
                if name == "trace":
                    tracer.__exit__()
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
    import sys

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
        tracer = Tracer(model).__enter__() if mode == "trace" else None
        base = _rss_mb()
        _reset_peak()
        out = tracer.run(x) if tracer else model.forward_features(x)
        peak = _peak_rss_mb()
    del out
    return peak - base


def bench_cpu(sizes=("small", "base", "large"), batch: int = 8, repeats: int = 5, threads: int = 2) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    for size in sizes:
        torch.manual_seed(0)
        model = create(f"vit_{size}_patch14_reg4_dinov2", pretrained=False, img_size=224)
        x = torch.randn(batch, 3, 224, 224)
        r = time_pair(model, x, repeats, "cpu")
        del model
        arch = f"vit_{size}_patch14_reg4_dinov2"
        r["plain_mb"], r["trace_mb"] = (peak_forward_mb(arch, 224, batch, m) for m in ("plain", "trace"))
        rows.append({"model": f"ViT-{size[0].upper()}/14+reg", "img": 224, "batch": batch, **r,
                     "time_ratio": r["trace_s"] / r["plain_s"], "mem_ratio": r["trace_mb"] / max(r["plain_mb"], 1e-9)})
    return rows


def bench_memory(resolutions=(224, 518), batch: int = 2) -> list[dict]:
    """Peak memory of the trace at two resolutions (linear in tokens: no N x N kept for any layer)."""
    rows = []
    arch = "vit_small_patch14_reg4_dinov2"
    for img in resolutions:
        N = 5 + (img // 14) ** 2
        rows.append({"img": img, "tokens": N, "plain_mb": peak_forward_mb(arch, img, batch, "plain"),
                     "trace_mb": peak_forward_mb(arch, img, batch, "trace"),
                     "N x N maps of all layers and heads (MB)": batch * N * N * 6 * 12 * 4 / 2**20})
    return rows


def bench_loading(n_images: int = 125, img_size: int = 224) -> dict:
    """Images per second for decoding + resizing alone vs the whole trace (ViT-B/14+reg, CPU)."""
    from .data import dataset_files, decode_images, eval_config

    files, ids, _ = dataset_files("samples")
    files, ids = files[:n_images], ids[:n_images]
    model = create("vit_base_patch14_reg4_dinov2", pretrained=False, img_size=img_size)
    geo, mean, std = eval_config(model, img_size)
    t = time.perf_counter()
    store = decode_images(files, ids, geo, progress=False)
    load_s = time.perf_counter() - t
    x = store.normalized(mean, std)
    t = time.perf_counter()
    with Tracer(model) as tracer:
        for i in range(0, len(store), 16):
            tracer.run(x[i:i + 16])
    trace_s = time.perf_counter() - t
    return {"images": len(store), "decode_img_per_s": len(store) / load_s, "trace_img_per_s": len(store) / trace_s}


def bench_cuda(batch: int = 64, repeats: int = 10, peak_tflops: float | None = None) -> list[dict]:
    """Every DINOv2 model: bf16 autocast throughput and model FLOPs utilisation, and float32 agreement."""
    from .metrics import cka
    from .profiles import SIZE_NAMES

    name = torch.cuda.get_device_name(0)
    peak = peak_tflops or (989.0 if "H100" in name or "H200" in name else float("nan"))  # dense bf16
    rows = []
    for reg in (True, False):
        for size in ("S", "B", "L", "g"):
            arch = f"vit_{SIZE_NAMES[size]}_patch14_{'reg4_' if reg else ''}dinov2"
            torch.manual_seed(0)
            model = create(arch, pretrained=False, img_size=224).cuda()
            x = torch.randn(batch, 3, 224, 224, device="cuda")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                r = time_pair(model, x, repeats, "cuda")
            with Tracer(model) as t32, torch.inference_mode():
                ref = t32.run(x[:16])
                ref = {k: v.float().cpu().numpy() for k, v in ref.items()}
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    lo = {k: v.float().cpu().numpy() for k, v in t32.run(x[:16]).items()}
            flops = flops_per_image(model) * batch
            rows.append({"model": arch, "batch": batch, "trace_img_per_s": batch / r["trace_s"],
                         "mfu": flops / r["trace_s"] / 1e12 / peak, "time_ratio": r["trace_s"] / r["plain_s"],
                         "bf16_vs_fp32_cls_attn_maxdiff": float(np.abs(lo["cls_attn"] - ref["cls_attn"]).max()),
                         "bf16_vs_fp32_cka_full": cka(lo["attn_out_full"], ref["attn_out_full"])})
            del model
            torch.cuda.empty_cache()
    return rows


def _print(title: str, rows) -> None:
    rows = rows if isinstance(rows, list) else [rows]
    print(f"\n## {title}")
    keys = list(rows[0])
    print(" | ".join(keys))
    for r in rows:
        print(" | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m regcls.bench", description=__doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="ViT-S only, fewer repeats (for a smoke check)")
    args = p.parse_args(argv)
    from .plots import hardware
    print(f"regcls benchmark on {hardware()}")
    if args.device.startswith("cuda"):
        _print("CUDA: bf16 autocast trace throughput, model FLOPs utilisation, agreement with float32", bench_cuda())
        return 0
    sizes = ("small",) if args.quick else ("small", "base", "large")
    _print(f"trace vs plain forward_features (CPU, {args.threads} threads, medians, alternated)",
           bench_cpu(sizes, repeats=2 if args.quick else 5, threads=args.threads))
    _print("peak memory by resolution (ViT-S/14+reg, batch 2)", bench_memory())
    _print("image loading vs whole trace (ViT-B/14+reg, 224 px)", bench_loading(n_images=32 if args.quick else 125))
    print("\ntargets: time_ratio <= 1.10 and mem_ratio <= 1.2 for ViT-B/14+reg")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
