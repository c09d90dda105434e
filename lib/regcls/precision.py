"""The precision of a trace: decided once per request by checking each lower precision against full float32 on
the request's first images, and remembered by what decides it.

The steps, each taken only where the device has it and its check passes: bfloat16 autocast (GPUs with native
bf16; the CPU when asked, for tests) -> float16 autocast (any CUDA GPU: a T4 has float16 tensor cores but no
bf16) -> float32 with TF32 matrix products (Ampere and newer) -> full float32. Whatever the model runs in, the
trace's own arithmetic runs in float32 (:func:`regcls.trace.own_arithmetic`).

A decision is stored under a key made of what decides it -- a digest of the weights, of the check images, the
device, the steps tried, the tolerances, and the torch and library versions -- in ``REGCLS_CACHE/precision/``, so
that shards, resumed runs, repeated calls and the benchmark's warm-up and timed runs check once.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__
from .env import cache_dir, native_bf16, native_tf32
from .files import atomic_write_text, source_digest
from .metrics import cka, mean_pairwise_cosine
from .models import layer_scale
from .trace import Tracer
from .tracefile import PER_IMAGE, SELECTED

# A lower precision is used only where it agrees with full float32 this closely (checked on the first images):
# the attention branch rebuilt from its parts (identity), the [CLS] attention shares (Sec. 3.1), every per-image
# array's CKA, 1 - the penultimate pairwise cosine of the prefix tokens (Sec. 3.2's 0.9989), the norms of every
# token and the prefix tokens themselves (the high-norm register and its outlier dimensions, where float16 can
# overflow), and no value that is not finite.
AMP_TOLERANCE = {"identity_bf16": 2e-2, "share_change_p99": 1e-2, "cka_min": 0.999, "penult_cosine_change": 0.1,
                 "norm_change_max": 5e-2, "prefix_error_max": 1e-1, "nonfinite": 0}

# What a trace file records as its precision, by mode (``fp32`` on a GPU: full float32, TF32 off).
PRECISION_LABELS = {"bf16": "bfloat16 autocast (the trace's own arithmetic float32)",
                    "fp16": "float16 autocast (the trace's own arithmetic float32)",
                    "tf32": "float32 with TF32 matrix products and convolutions", "fp32": "float32"}
CHECK_KEYS = {"bf16": "amp_check", "fp16": "fp16_check", "tf32": "tf32_check"}   # where a trace file keeps each check
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def precision_mode(device: str, mode: str = "fp32"):
    """Run the enclosed forward passes in ``mode``: ``"bf16"`` or ``"fp16"`` (autocast; what runs outside it in
    full float32), ``"tf32"`` (float32 with TF32 matrix products and convolutions, Ampere and newer) or ``"fp32"``
    (full float32: PyTorch otherwise lets convolutions use TF32 on A100/H100). Set through PyTorch's per-backend
    ``fp32_precision`` flags (the older ``allow_tf32`` flags fail once anything in the process used the new ones)
    and restored afterwards; on the CPU only the autocast matters."""
    if mode not in PRECISION_LABELS:
        raise ValueError(f"precision mode {mode!r}; one of {', '.join(PRECISION_LABELS)}")
    flags = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)
    old = [f.fp32_precision for f in flags]
    for f in flags:
        f.fp32_precision = "tf32" if mode == "tf32" else "ieee"
    try:
        with torch.autocast(torch.device(device).type, dtype=_AUTOCAST.get(mode, torch.bfloat16),
                            enabled=mode in _AUTOCAST):
            yield
    finally:
        for f, v in zip(flags, old):
            f.fp32_precision = v


def precision_label(device: str, mode: str) -> str:
    """What a trace file records as its precision."""
    if mode == "fp32" and torch.device(device).type == "cuda":
        return "float32 (TF32 off)"
    return PRECISION_LABELS[mode]


def _hook_branch(block: nn.Module, store: dict):
    """Record ``store["branch"]``: the block's attention branch as the model computes it, [CLS] row (B, D), after
    the LayerScale (timm's ViT: the output of ``ls1``; Eva: its attention's output times ``gamma_1``)."""
    if hasattr(block, "ls1"):
        return block.ls1.register_forward_hook(lambda m, i, o: store.__setitem__("branch", o[:, 0].float()))
    g = layer_scale(block)
    return block.attn.register_forward_hook(
        lambda m, i, o: store.__setitem__("branch", (o[:, 0] * g if g is not None else o[:, 0]).float()))


def amp_agreement(model: nn.Module, x: torch.Tensor, mode: str = "bf16") -> dict:
    """A lower precision (``mode``: bfloat16 or float16 autocast, or TF32 matrix products) against full float32
    on the same images (B, 3, S, S), B >= 2.

    ``identity_fp32`` (full float32) and ``identity_bf16`` (``mode``; the name kept for the files): relative L2
    distance between the decomposed attention branch (parts + bias) and the branch the model itself computed
    (output of the last block's LayerScale), [CLS] token.
    ``share_change_p99``: 99th percentile over images, blocks and token types of the change of the [CLS]
    attention share averaged over heads (what Sec. 3.1 compares); ``attn_mass_maxdiff``, the largest change of
    any single head's share, is reported beside it. ``cka_min``: smallest linear CKA across the images between
    the two over every per-image array of the trace (``cka_min_key`` names it; computed from n x n Gram matrices,
    so its memory does not grow with the width). ``penult_cosine_change``: the largest relative change of
    1 - (mean pairwise cosine across the images) of a prefix token entering the last block (Sec. 3.2 reports
    0.9989, four digits: the precision may move 1 - cos by a tenth of itself at most). ``norm_change_max``: the
    largest relative change of any token's norm entering the last block; ``prefix_error_max``: the largest
    relative L2 error of a prefix token there (the register's outlier dimensions dominate it); ``nonfinite``:
    values that are infinite or NaN (float16 overflows). ``ok``: all within :data:`AMP_TOLERANCE`.
    """
    own = {}
    hook = _hook_branch(model.blocks[-1], own)
    try:
        with Tracer(model) as tracer, torch.inference_mode():
            with precision_mode(str(x.device), "fp32"):   # the reference in full float32 (no TF32 convolutions)
                ref = tracer.run(x)
            ref_branch = own["branch"]
            with precision_mode(str(x.device), mode):
                low = tracer.run(x)
            low_branch = own["branch"]
    finally:
        hook.remove()

    def rel(a, b):
        return float((a.float() - b).norm() / b.norm())

    def flat(t):
        return t.double().flatten(1).cpu().numpy()

    nonfinite = int(sum((~torch.isfinite(v)).sum() for v in low.values()) + (~torch.isfinite(low_branch)).sum())
    # the rebuilt outputs select patches by rank, a step function of the inputs: their maps are compared instead
    ckas = {k: cka(flat(low[k]), flat(ref[k])) for k in PER_IMAGE if k != "attn_mass" and k not in SELECTED}
    ckas = {k: v for k, v in ckas.items() if np.isfinite(v)}   # the register arrays of a model without registers
    worst = min(ckas, key=ckas.get) if ckas else "none"
    share = (low["attn_mass"].double().mean(2) - ref["attn_mass"].double().mean(2)).abs()   # (B, L, 3)
    ref_p, low_p = (r["prefix_penult"].double().cpu().numpy() for r in (ref, low))
    gap = [(1 - mean_pairwise_cosine(ref_p[:, t]), 1 - mean_pairwise_cosine(low_p[:, t])) for t in range(ref_p.shape[1])]
    penult = max(abs(b - a) / max(a, 1e-3) for a, b in gap)
    norms = (low["token_norms_penult"].double() - ref["token_norms_penult"].double()).abs() \
        / ref["token_norms_penult"].double().clamp_min(1e-12)
    prefix = (low["prefix_penult"].double() - ref["prefix_penult"].double()).norm(dim=-1) \
        / ref["prefix_penult"].double().norm(dim=-1).clamp_min(1e-12)
    out = {"identity_fp32": rel(ref["attn_out_full"], ref_branch),
           "identity_bf16": rel(low["attn_out_full"], low_branch),
           "attn_mass_maxdiff": float((low["attn_mass"].float() - ref["attn_mass"].float()).abs().max()),
           "share_change_p99": float(torch.quantile(share.flatten(), 0.99)),
           "cka_min": float(ckas.get(worst, float("nan"))), "cka_min_key": worst,
           "penult_cosine_change": float(penult), "norm_change_max": float(norms.max()),
           "prefix_error_max": float(prefix.max()), "nonfinite": nonfinite, "images": len(x), "mode": mode}
    out["ok"] = nonfinite == 0 and all(out[k] >= tol if k == "cka_min" else out[k] <= tol
                                       for k, tol in AMP_TOLERANCE.items())
    return out


def steps(device: str) -> list[str]:
    """The lower precisions tried on ``device``, in order: bf16 where native (and on the CPU, where it is asked
    for in tests), fp16 on any CUDA GPU, TF32 where native."""
    cuda = torch.device(device).type == "cuda"
    return (["bf16"] if not cuda or native_bf16() else []) + (["fp16"] if cuda else []) \
        + (["tf32"] if native_tf32(device) else [])


def weights_digest(model: nn.Module) -> bytes:
    """A digest of a model's weights (every parameter and buffer, by name, shape, dtype and three sums of its
    values). Remembered on the model while no tensor of it is replaced or changed in place (each tensor's storage
    and version counter are the memo's key), so that the traces of one model pay it once (ViT-g: 0.7 s on an H200,
    about 4,000 small operations)."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    key = tuple((name, t.data_ptr(), t._version, t.dtype, tuple(t.shape)) for name, t in tensors)
    memo = getattr(model, "_regcls_weights_digest", None)
    if memo is not None and memo[0] == key:
        return memo[1]
    h = hashlib.sha256()
    with torch.no_grad():
        stats = []
        for name, t in tensors:
            h.update(f"{name}{tuple(t.shape)}{t.dtype};".encode())
            x = t.detach().flatten().double()
            w = torch.linspace(-1.0, 1.0, x.numel(), dtype=torch.float64, device=x.device)
            stats.append(torch.stack([x.sum(), (x * x).sum(), (x * w).sum()]))
        h.update(torch.stack(stats).cpu().numpy().tobytes())
    digest = h.digest()
    model.__dict__["_regcls_weights_digest"] = (key, digest)   # not a module attribute: never in a state dict
    return digest


def decision_key(model: nn.Module, images: torch.Tensor, device: str, tried: list[str]) -> str:
    """A digest of what decides the precision: the weights (:func:`weights_digest`), what is attached to the
    forward pass (test-time units, fixed register means), the check images, the device, the steps tried, the
    tolerances, the torch and library versions."""
    h = hashlib.sha256(weights_digest(model))
    with torch.no_grad():
        means = getattr(model, "fixed_register_means", None)
        h.update(repr(getattr(model, "test_time_neurons", None)).encode())
        h.update(b"" if means is None else means.double().cpu().numpy().tobytes())
        h.update(images.detach().float().cpu().numpy().tobytes())
    where = torch.cuda.get_device_name(torch.device(device)) if torch.device(device).type == "cuda" else "cpu"
    h.update(json.dumps([where, tried, AMP_TOLERANCE, torch.__version__, __version__,
                         source_digest(("trace.py", "precision.py", "metrics.py"))]).encode())
    return h.hexdigest()[:16]


def decide_precision(model: nn.Module, images: torch.Tensor, *, device: str, amp: bool, name: str = "this model",
                     decision_file: Path | None = None) -> tuple[str, dict]:
    """The precision of one trace request: ``(mode, checks)``, mode ``"bf16"``, ``"fp16"``, ``"tf32"`` or
    ``"fp32"`` (:func:`precision_mode`), checks the :func:`amp_agreement` figures of each mode tried, by mode.

    Without ``amp`` the trace runs in full float32. With it, the :func:`steps` of the device are checked in turn on
    ``images`` (the request's first 32) and the first that passes is used; else full float32. The decision is
    written to ``decision_file`` (in the run's parts folder; a resumed run reads it back, so that every batch of a
    trace has one precision) and to the decision cache, where shards of one request (which check the same images)
    and any later request on the same weights, images and device find it.
    """
    if decision_file is not None and decision_file.is_file():
        d = json.loads(decision_file.read_text())
        return d["mode"], d["checks"]
    tried = steps(device) if amp else []
    mode, checks = "fp32", {}
    if tried:   # the same first images for every mode tried
        head = images[0:min(len(images), 32)].to(device=device, dtype=next(model.parameters()).dtype)
        cached = cache_dir() / "precision" / f"{decision_key(model, head, device, tried)}.json"
        if cached.is_file():
            d = json.loads(cached.read_text())
            mode, checks = d["mode"], d["checks"]
            print(f"precision for {name}: {PRECISION_LABELS[mode].split(' (')[0]} (decided before, {cached.name})",
                  file=sys.stderr, flush=True)
        else:
            mode, checks = _check_in_turn(model, head, tried, name)
            atomic_write_text(cached, json.dumps({"mode": mode, "checks": checks}))
    if decision_file is not None:
        atomic_write_text(decision_file, json.dumps({"mode": mode, "checks": checks}))
    return mode, checks


def _check_in_turn(model: nn.Module, head: torch.Tensor, tried: list[str], name: str) -> tuple[str, dict]:
    checks = {}
    for i, m in enumerate(tried):
        check = checks[m] = amp_agreement(model, head, mode=m)
        if check["ok"]:   # a failed check says so once, in the warning below
            print(f"{m} check for {name}: passed ({check_summary(check)}; tolerance {AMP_TOLERANCE})",
                  file=sys.stderr, flush=True)
            return m, checks
        then = (f"trying {PRECISION_LABELS[tried[i + 1]].split(' (')[0]}" if i + 1 < len(tried)
                else "tracing in full float32")
        warnings.warn(f"{PRECISION_LABELS[m].split(' (')[0]} disagrees with float32 for {name} on the first "
                      f"{check['images']} images ({check_summary(check)}; tolerance {AMP_TOLERANCE}); {then}",
                      stacklevel=4)
    return "fp32", checks


def check_summary(check: dict) -> str:
    """A precision check's figures in one phrase (for the run's log and the chapter's last line)."""
    extra = (f", token norms {check['norm_change_max']:.1e}, prefix tokens {check['prefix_error_max']:.1e}"
             + (f", {check['nonfinite']} values not finite" if check.get("nonfinite") else "")
             if "norm_change_max" in check else "")
    return (f"identity error {check['identity_bf16']:.1e}, attention share change {check['share_change_p99']:.1e} "
            f"(99th percentile; one head at most {check['attn_mass_maxdiff']:.1e}), "
            f"CKA of {check['cka_min_key']} {check['cka_min']:.4f}, change of 1 - penultimate pairwise cosine "
            f"{check['penult_cosine_change']:.1%}{extra}")
