"""``regcls doctor``: is this machine ready for the real run? One line per check, a verdict at the end.

The checks: library versions against the NVIDIA driver, the GPU (name, native bfloat16, free memory and the
batch size it implies), the data and cache folders (writable, free space), the Hugging Face hub, and -- on a
GPU -- a short trace of a full-size ViT-S/14 with registers (random weights, synthetic images) on the GPU,
compared with the CPU on the same images. The exit code is 0 only when the GPU path is usable.
"""
from __future__ import annotations

import platform
import shutil
import tempfile
import time
from dataclasses import dataclass

from . import __version__
from .cache import disk_needed
from .env import (cache_dir, cuda_problem, data_root, driver_cuda_version, hub_reachable, native_bf16,
                  offline_requested, use_amp)
from .metrics import cka
from .models import create
from .profiles import PROFILES
from .precision import PRECISION_LABELS, decide_precision, precision_mode
from .runner import auto_batch_size
from .trace import Tracer

MARK = {"ok": "ok  ", "warn": "warn", "fail": "FAIL", "info": "    "}


@dataclass
class Check:
    name: str
    status: str    # "ok", "warn", "fail" or "info"
    text: str

    def line(self) -> str:
        return f"[{MARK[self.status]}] {self.name:8s} {self.text}"


def versions() -> Check:
    import timm
    import torch
    import torchvision

    return Check("versions", "info", f"regcls {__version__}, python {platform.python_version()}, torch {torch.__version__} "
                 f"(CUDA {torch.version.cuda or 'none: a CPU-only build'}), torchvision {torchvision.__version__}, "
                 f"timm {timm.__version__}")


def gpu() -> list[Check]:
    """The driver, whether torch can use the GPU, and what the GPU offers."""
    import torch

    driver = driver_cuda_version()
    out = [Check("driver", "info", "no NVIDIA driver on this machine" if driver is None
                 else f"the NVIDIA driver supports CUDA {driver[0]}.{driver[1]}")]
    if not torch.cuda.is_available():
        problem = cuda_problem()
        out.append(Check("gpu", "fail", problem or "no GPU: the smoke profile runs here in minutes; the laptop profile "
                                                   "is slow on a CPU and the paper profile needs a GPU"))
        return out

    free, total = torch.cuda.mem_get_info()
    props = torch.cuda.get_device_properties(0)
    with torch.device("meta"):
        sizes = {px: auto_batch_size(create("vit_giant_patch14_reg4_dinov2", pretrained=False, img_size=px),
                                     "cuda", amp=native_bf16()) for px in (224, 518)}
    out.append(Check("gpu", "ok" if native_bf16() else "warn",
                     f"{torch.cuda.device_count()} visible; {props.name} (compute capability {props.major}.{props.minor}), "
                     f"native bfloat16: {'yes' if native_bf16() else 'no (float32 traces, the laptop profile)'}; "
                     f"{free / 2**30:.0f} of {total / 2**30:.0f} GiB free: batch {sizes[224]} for ViT-g at 224 px, "
                     f"{sizes[518]} at 518 px"))
    return out


def folders() -> list[Check]:
    out = []
    # the paper profile: COCO val2017 and ImageNetV2 (about 2.5 GB); every trace and decoded image store of its
    # workload, from the trace schema's shapes (regcls.cache.disk_needed; about 107 GB)
    for name, folder, need in (("data", data_root(), 2.5), ("cache", cache_dir(), round(disk_needed(PROFILES["paper"]) / 1e9))):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder):
                pass
        except OSError as e:
            out.append(Check(name, "fail", f"{folder} is not writable ({e.strerror or e})"))
            continue
        free = shutil.disk_usage(folder).free / 1e9
        out.append(Check(name, "ok" if free >= need else "warn",
                         f"{folder}: writable, {free:.0f} GB free (the paper profile needs about {need:g} GB here)"))
    return out


def hub() -> Check:
    if hub_reachable():
        return Check("hub", "ok", "huggingface.co reachable: the real weights can be downloaded")
    why = "HF_HUB_OFFLINE is set" if offline_requested() else "not reachable"
    return Check("hub", "warn", f"the Hugging Face hub: {why}; only weights already in the hub cache load")


def gpu_trace(seconds: float = 30.0, device: str = "cuda") -> Check:
    """A full-size ViT-S/14 with registers (random weights) traced on ``device`` and on the CPU, same images (the
    tests run it with ``device="cpu"``, so that no line of it runs for the first time on a GPU)."""
    import numpy as np
    import torch

    torch.manual_seed(0)
    model = create("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=224).eval()
    x = torch.randn(32, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with Tracer(model) as t:
        ref = t.run(x[:8])["attn_out_full"].double().numpy()
    cuda = device.startswith("cuda")
    model = model.to(device)
    xg = x.to(device)
    mode, checks = decide_precision(model, xg, device=device, amp=use_amp(device), name="ViT-S/14+reg")
    with Tracer(model) as t, precision_mode(device, mode):
        got = t.run(xg[:8])["attn_out_full"].double().cpu().numpy()
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 3:
            t.run(xg)
            if cuda:
                torch.cuda.synchronize(device)
            n += len(xg)
        rate = n / (time.perf_counter() - start)
    rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    agree = cka(got, ref)
    ok = agree > 0.999 and rel < (1e-3 if mode == "fp32" else 5e-2)
    failed = " and ".join(m for m, c in checks.items() if not c["ok"])
    what = PRECISION_LABELS[mode].split(" (")[0] + (f" ({failed} check failed)" if failed else "")
    return Check("trace", "ok" if ok else "fail",
                 f"ViT-S/14+reg on {'the GPU' if cuda else device} in {what}: {rate:.0f} img/s at batch 32; against the CPU on 8 images: "
                 f"relative difference {rel:.1e}, CKA {agree:.5f}")


def run(trace: bool = True) -> int:
    """Print every check; 0 when the GPU path is usable, else 1."""
    import torch

    checks = [versions(), *gpu(), *folders(), hub()]
    for c in checks:
        print(c.line(), flush=True)
    if torch.cuda.is_available() and trace:
        c = gpu_trace()
        print(c.line(), flush=True)
        checks.append(c)
    usable = torch.cuda.is_available() and not any(c.status == "fail" for c in checks)
    if usable:
        print("verdict: the GPU path is usable" + ("" if trace else " (trace check skipped)"))
        return 0
    fails = [c for c in checks if c.status == "fail"]
    print("verdict: the GPU path is not usable: " + "; ".join(f"{c.name}: {c.text}" for c in fails))
    return 1
