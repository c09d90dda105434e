"""The trace: one forward pass with hooks, and the trace file.

Shapes (n images, H heads, N tokens ``[CLS, registers, patches]``, L blocks, D width, P = 1 + registers):

==================================  ============  =====================================================
key                                 shape         what
==================================  ============  =====================================================
``cls_attn``                        (n, H, N)     last block, [CLS] query, post-softmax attention
``attn_mass``                       (n, L, H, 3)  every block: [CLS] attention summed over [CLS], registers,
                                                  patches
``attn_val_{cls,reg,patch}``        (n, D)        last block, sum of a_i v_i over that token type, heads
                                                  concatenated, before the output projection
``attn_out_{cls,reg,patch}``        (n, D)        the same after the output projection and LayerScale
``attn_out_bias``                   (D,)          the projection bias after LayerScale
``attn_out_full``                   (n, D)        the three parts + the bias: the block's attention branch
``skip``                            (n, D)        [CLS] hidden state entering the last block
``cls_layers``                      (n, L, D)     [CLS] hidden state after every block (before final norm)
``prefix_penult`` / ``_ln``         (n, P, D)     prefix tokens entering the last block, raw / after norm1
``token_norms_penult``              (n, N)        L2 norm of every token entering the last block
``patch_mean_penult``               (n, D)        mean of the patch tokens entering the last block
``patch_sample_penult``             (n, K, D)     K = 8 patch tokens entering the last block, at the fixed
                                                  grid positions ``patch_sample_index`` (for position probes)
``cls_final``                       (n, D)        final [CLS] embedding (after the final norm)
==================================  ============  =====================================================

The model's own forward keeps PyTorch's fused attention; the hooks recompute only the [CLS] query row of
each block from the ``qkv`` projection the block already computed, so no N x N attention is ever held.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__
from .errors import RegclsError
from .models import layout
from .profiles import native_bf16

TRACE_SCHEMA = 3
PER_IMAGE = ("cls_attn", "attn_mass", "attn_val_cls", "attn_val_reg", "attn_val_patch", "attn_out_cls",
             "attn_out_reg", "attn_out_patch", "attn_out_full", "skip", "cls_layers", "prefix_penult",
             "prefix_penult_ln", "token_norms_penult", "patch_mean_penult", "patch_sample_penult", "cls_final")
PARTS = ("cls", "reg", "patch")
N_PATCH_SAMPLE = 8


def patch_sample_index(num_patches: int, k: int = N_PATCH_SAMPLE) -> np.ndarray:
    """K patch indices (raster order) spread evenly over the grid, the same for every image."""
    return np.unique(np.linspace(0, num_patches - 1, min(k, num_patches)).round().astype(int))


def _cls_row(attn: nn.Module, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] query attention of one block from its ``qkv`` output (B, N, 3*H*hd).

    Returns the post-softmax row ``a`` (B, H, N) in float32 or wider, and the values ``v`` (B, H, N, hd) as
    computed (bfloat16 under autocast). Only [CLS]'s query and the keys are widened, not the whole ``qkv``.
    """
    B, N, _ = qkv.shape
    dtype = torch.promote_types(qkv.dtype, torch.float32)
    qkv = qkv.reshape(B, N, 3, attn.num_heads, attn.head_dim)
    q = attn.q_norm(qkv[:, 0, 0].to(dtype))                    # (B, H, hd): [CLS]'s query only
    k = attn.k_norm(qkv[:, :, 1].transpose(1, 2).to(dtype))    # (B, H, N, hd)
    scores = torch.einsum("bhd,bhnd->bhn", q * attn.scale, k)  # (B, H, N)
    return scores.softmax(dim=-1), qkv[:, :, 2].transpose(1, 2)


def _split(a: torch.Tensor, P: int) -> list[torch.Tensor]:
    """Token index ranges of [CLS], registers, patches along the last axis."""
    return [a[..., :1], a[..., 1:P], a[..., P:]]


class Tracer:
    """Hooks on a timm ViT that record the trace of each forward pass.

    Use as ``with Tracer(model) as t: arrays = t.run(images)``; ``arrays`` are torch tensors on the
    model's device, per image, with the keys of :data:`PER_IMAGE`.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.lay = layout(model)
        self.rec: dict[str, torch.Tensor] = {}
        self.handles: list = []

    def __enter__(self) -> "Tracer":
        blocks, P = self.model.blocks, self.lay.num_prefix
        last = len(blocks) - 1
        mass: list = [None] * len(blocks)
        cls_layers: list = [None] * len(blocks)
        self._mass, self._layers = mass, cls_layers

        def on_qkv(i):
            def hook(_mod, _inp, qkv):
                with torch.autocast(qkv.device.type, enabled=False):  # the trace's own arithmetic in float32
                    record(i, qkv)
            return hook

        def record(i, qkv):
            a, v = _cls_row(blocks[i].attn, qkv)
            mass[i] = torch.stack([p.sum(-1) for p in _split(a, P)], dim=-1)  # (B, H, 3)
            if i == last:
                self.rec["cls_attn"] = a
                for name, ap, vp in zip(PARTS, _split(a, P), _split(v.to(a.dtype).transpose(-2, -1), P)):
                    # sum_i a_i v_i over the part: (B, H, hd) -> heads concatenated (B, D)
                    val = (vp @ ap.unsqueeze(-1)).squeeze(-1)
                    self.rec[f"attn_val_{name}"] = val.flatten(1)

        # Slices are cloned: a view would keep the whole (B, N, D) activation of its block alive.
        def on_block(i):
            def hook(_mod, _inp, out):
                cls_layers[i] = out[:, 0].clone()
            return hook

        def on_last_in(_mod, inp):
            x = inp[0]
            self.rec["skip"] = x[:, 0].clone()
            self.rec["prefix_penult"] = x[:, :P].clone()
            self.rec["patch_mean_penult"] = x[:, P:].mean(dim=1)
            idx = torch.as_tensor(patch_sample_index(x.shape[1] - P) + P, device=x.device)  # pragma: no mutate (GPU only)
            self.rec["patch_sample_penult"] = x[:, idx].clone()
            self.rec["token_norms_penult"] = x.to(torch.promote_types(x.dtype, torch.float32)).norm(dim=-1)

        def on_last_norm1(_mod, _inp, out):
            self.rec["prefix_penult_ln"] = out[:, :P].clone()

        for i, blk in enumerate(blocks):
            self.handles.append(blk.attn.qkv.register_forward_hook(on_qkv(i)))
            self.handles.append(blk.register_forward_hook(on_block(i)))
        self.handles.append(blocks[last].register_forward_pre_hook(on_last_in))
        self.handles.append(blocks[last].norm1.register_forward_hook(on_last_norm1))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    @torch.inference_mode()
    def run(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Trace one batch of normalised images (B, 3, S, S)."""
        self.rec = {}
        feats = self.model.forward_features(images)
        rec = self.rec
        rec["cls_final"] = feats[:, 0].clone()
        del feats
        rec["attn_mass"] = torch.stack(self._mass, dim=1)       # (B, L, H, 3)
        rec["cls_layers"] = torch.stack(self._layers, dim=1)    # (B, L, D)
        with torch.autocast(images.device.type, enabled=False):  # float32 (or wider), also under autocast
            self._project(rec)
        return rec

    def _project(self, rec: dict[str, torch.Tensor]) -> None:
        """The last block's parts through the output projection and LayerScale: attn_out_* and the bias."""
        last = self.model.blocks[-1]
        weight, bias = last.attn.proj.weight, last.attn.proj.bias
        dtype = rec["attn_val_cls"].dtype
        gamma = last.ls1.gamma.to(dtype) if hasattr(last.ls1, "gamma") else None  # pragma: no mutate (equivalent in float32, on the CPU)

        def out(x):  # output projection without bias, then LayerScale: linear in the parts
            y = x @ weight.to(dtype).T  # pragma: no mutate (equivalent in float32, on the CPU)
            return y * gamma if gamma is not None else y

        for name in PARTS:
            rec[f"attn_out_{name}"] = out(rec[f"attn_val_{name}"])
        b = bias.to(dtype) if bias is not None else torch.zeros(weight.shape[0], dtype=dtype, device=weight.device)  # pragma: no mutate (equivalent in float32, on the CPU)
        self.bias = b * gamma if gamma is not None else b
        rec["attn_out_full"] = rec["attn_out_cls"] + rec["attn_out_reg"] + rec["attn_out_patch"] + self.bias


# bfloat16 autocast is used only where it agrees with float32 this closely (checked on the first images).
AMP_TOLERANCE = {"identity_bf16": 2e-2, "attn_mass_maxdiff": 1e-2, "cka_min": 0.999, "penult_cosine_change": 0.1}


def amp_agreement(model: nn.Module, x: torch.Tensor) -> dict:
    """bfloat16 autocast against float32 on the same images (B, 3, S, S), B >= 2.

    ``identity_*``: relative L2 distance between the decomposed attention branch (parts + bias) and the
    branch the model itself computed (output of the last block's LayerScale), [CLS] token.
    ``attn_mass_maxdiff``: largest change of any [CLS] attention share (every block, head, token type).
    ``cka_min``: smallest linear CKA across the images between bf16 and float32, over the vectors the
    chapters compare (``cka_min_key`` names it). ``penult_cosine_change``: the largest relative change of
    1 - (mean pairwise cosine across the images) of a prefix token entering the last block (Sec. 3.2 reports
    0.9989, four digits: bf16 may move 1 - cos by a tenth of itself at most). ``ok``: all within
    :data:`AMP_TOLERANCE`.
    """
    from .metrics import cka, mean_pairwise_cosine

    own = {}
    hook = model.blocks[-1].ls1.register_forward_hook(lambda m, i, o: own.__setitem__("branch", o[:, 0].float()))
    try:
        with Tracer(model) as tracer, torch.inference_mode():
            ref = tracer.run(x)
            ref_branch = own["branch"]
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                low = tracer.run(x)
            low_branch = own["branch"]
    finally:
        hook.remove()

    def rel(a, b):
        return float((a.float() - b).norm() / b.norm())

    keys = ["attn_out_cls", "attn_out_patch", "attn_out_full", "skip", "cls_final"]
    keys += ["attn_out_reg"] if layout(model).num_registers else []
    ckas = {k: cka(low[k].float().cpu().numpy(), ref[k].float().cpu().numpy()) for k in keys}
    worst = min(ckas, key=ckas.get)
    ref_p, low_p = (r["prefix_penult"].double().cpu().numpy() for r in (ref, low))
    gap = [(1 - mean_pairwise_cosine(ref_p[:, t]), 1 - mean_pairwise_cosine(low_p[:, t])) for t in range(ref_p.shape[1])]
    penult = max(abs(b - a) / max(a, 1e-3) for a, b in gap)
    out = {"identity_fp32": rel(ref["attn_out_full"], ref_branch),
           "identity_bf16": rel(low["attn_out_full"], low_branch),
           "attn_mass_maxdiff": float((low["attn_mass"].float() - ref["attn_mass"].float()).abs().max()),
           "cka_min": float(ckas[worst]), "cka_min_key": worst, "penult_cosine_change": float(penult),
           "images": len(x)}
    out["ok"] = bool(out["identity_bf16"] <= AMP_TOLERANCE["identity_bf16"]
                     and out["attn_mass_maxdiff"] <= AMP_TOLERANCE["attn_mass_maxdiff"]
                     and out["cka_min"] >= AMP_TOLERANCE["cka_min"]
                     and out["penult_cosine_change"] <= AMP_TOLERANCE["penult_cosine_change"])
    return out


def trace_batch(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Trace one batch; also returns ``attn_out_bias`` (D,)."""
    with Tracer(model) as t:
        rec = t.run(images)
        rec["attn_out_bias"] = t.bias
    return rec


# ---------------------------------------------------------------------------------------- files

def atomic_savez(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an .npz so that ``path`` is either absent, the old file, or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_trace(path: str | Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Save a trace: float32 arrays plus metadata (model, weights, dataset, sizes, version, options)."""
    out = {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items() if k not in ("image_ids", "labels")}
    out["image_ids"] = np.asarray(arrays["image_ids"], dtype=str)
    if "labels" in arrays:
        out["labels"] = np.asarray(arrays["labels"], dtype=np.int64)
    for k in ("model", "weights", "dataset", "img_size", "num_prefix_tokens", "num_registers", "grid"):
        if k not in meta:
            raise ValueError(f"trace metadata lacks {k!r}")
    meta = {"regcls_version": __version__, "trace_schema": TRACE_SCHEMA, **meta}
    for k, v in meta.items():  # plain values also as arrays; everything in meta_json
        arr = np.asarray(v) if not isinstance(v, dict) else None
        if arr is not None and arr.dtype != object:
            out[k] = arr
    out["meta_json"] = np.asarray(json.dumps(meta, sort_keys=True, default=str))
    atomic_savez(path, out)


def load_trace(path: str | Path, meta_only: bool = False) -> dict:
    """Read a trace into a dict of arrays; ``meta`` holds the metadata as plain Python.

    ``meta_only`` reads just the metadata (the arrays of a large trace stay on disk)."""
    path = Path(path)
    if not path.is_file():
        raise RegclsError(f"trace {path} does not exist")
    with np.load(path, allow_pickle=False) as z:
        tr = {k: z[k] for k in (["meta_json"] if meta_only else z.files)}
    tr["meta"] = json.loads(str(tr.pop("meta_json")))
    if tr["meta"].get("trace_schema") != TRACE_SCHEMA:
        raise RegclsError(f"trace {path} has schema {tr['meta'].get('trace_schema')}, expected {TRACE_SCHEMA}; "
                          "delete it to recompute")
    return tr


def shard_range(n: int, shard: str) -> tuple[int, int]:
    """Image range ``[start, stop)`` of shard ``"i/k"`` (0-based) of n images: contiguous, sizes differ by <= 1."""
    try:
        i, k = (int(v) for v in shard.split("/"))
        assert 0 <= i < k
    except (ValueError, AssertionError):
        raise RegclsError(f"--shard expects i/k with 0 <= i < k, got {shard!r}") from None
    return i * n // k, (i + 1) * n // k


def merge_traces(paths: list[str | Path], out: str | Path) -> Path:
    """Concatenate shard traces (in the given order) into one file equal to a single run over all images."""
    traces = [load_trace(p) for p in paths]
    if not traces:
        raise RegclsError("nothing to merge")

    def settings(t: dict) -> dict:  # what must agree between shards
        return {k: v for k, v in t["meta"].items() if k not in ("n_images", "skipped", "shard", "amp_check")}

    first = settings(traces[0])
    for p, t in zip(paths, traces):
        meta = settings(t)
        if meta != first:
            diff = sorted(k for k in set(meta) | set(first) if meta.get(k) != first.get(k))
            raise RegclsError(f"{p} was traced with other settings ({', '.join(diff)}) and cannot be merged")
        if not np.array_equal(t["attn_out_bias"], traces[0]["attn_out_bias"]):
            raise RegclsError(f"{p} comes from other weights and cannot be merged")
    arrays = {k: np.concatenate([t[k] for t in traces]) for k in PER_IMAGE}
    arrays["attn_out_bias"] = traces[0]["attn_out_bias"]
    arrays["image_ids"] = np.concatenate([t["image_ids"] for t in traces])
    if "labels" in traces[0]:
        arrays["labels"] = np.concatenate([t["labels"] for t in traces])
    if len(set(arrays["image_ids"].tolist())) != len(arrays["image_ids"]):
        raise RegclsError("the shards overlap (an image appears twice)")
    meta = {**first, "n_images": len(arrays["image_ids"]), "skipped": sum(t["meta"].get("skipped", 0) for t in traces)}
    if "amp_check" in traces[0]["meta"]:  # each shard checked bf16 on its own first images
        meta["amp_check"] = [t["meta"]["amp_check"] for t in traces]
    meta.pop("regcls_version", None)
    meta.pop("trace_schema", None)
    save_trace(out, arrays, meta)
    return Path(out)


def trace_meta(net: nn.Module, **meta) -> dict:
    """Metadata from the network's layout plus what the caller knows (model name, weights, dataset ...)."""
    lay = layout(net)
    return {"num_prefix_tokens": lay.num_prefix, "num_registers": lay.num_registers, "grid": list(lay.grid),
            "patch_sample_index": patch_sample_index(lay.grid[0] * lay.grid[1]).tolist(),
            "depth": lay.depth, "heads": lay.heads, "dim": lay.dim, **meta}


# ------------------------------------------------------------------------------ many images

def _to_numpy(rec: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: rec[k].detach().float().cpu().numpy() if rec[k].dtype != torch.float64
            else rec[k].detach().cpu().numpy() for k in PER_IMAGE}


def auto_batch_size(model: nn.Module, device: str, amp: bool = False, cap: int = 512) -> int:
    """Images per batch: 16 on the CPU; on CUDA as many as half the free memory holds (a power of two <= cap).

    Inference holds about N x (6 D + 2 D_mlp) activations per image at once (residual stream, norm, qkv,
    attention output, the MLP's hidden layer before and after its activation); twice that is budgeted.
    An out-of-memory error still halves the batch (:func:`run_trace`).
    """
    if not str(device).startswith("cuda"):
        return 16
    lay = layout(model)
    hidden = max(m.out_features for m in model.blocks[0].mlp.modules() if isinstance(m, nn.Linear))
    per_image = 2 * lay.num_tokens * (6 * lay.dim + 2 * hidden) * (2 if amp else 4)
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    fits = max(1, int(0.5 * free // per_image))
    return min(cap, 1 << (fits.bit_length() - 1))


def run_trace(model: nn.Module, images, ids: list[str], *, out: str | Path, meta: dict,
              extra: dict[str, np.ndarray] | None = None, batch_size: int | None = None, device: str = "cpu",
              amp: bool = False, progress: bool = True) -> Path:
    """Trace all images into ``out`` (.npz), resuming an interrupted run of the same settings.

    ``images`` is indexable by a slice and returns normalised float images (B, 3, S, S) (see
    :class:`regcls.data.ImageStore`; its slices travel to the device as uint8). ``batch_size=None`` picks
    one from the free memory (:func:`auto_batch_size`); ``amp`` runs under bfloat16 autocast (the trace's
    own arithmetic stays float32). Finished batches go to ``out.parts/`` as they complete (atomic writes, in
    a background thread so the device keeps working); the final file is written atomically and the parts
    are removed.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    from .data import Normalized

    out = Path(out)
    n = len(ids)
    if n == 0:
        raise RegclsError("no images to trace")
    parts_dir = out.with_name(out.name + ".parts")
    key = json.dumps({**meta, "image_ids_hash": _hash_ids(ids)}, sort_keys=True, default=str)
    done = _resume(parts_dir, key)
    start = done[-1][1] if done else 0
    if start:
        print(f"resuming: {start} of {n} images already traced ({parts_dir})", file=sys.stderr, flush=True)
    pause_after = int(os.environ.get("REGCLS_TEST_PAUSE_AFTER_BATCHES", 0))  # tests: stop at a known batch
    model = model.to(device)
    if isinstance(images, Normalized):
        images = images.to(device)
    dtype = next(model.parameters()).dtype
    amp_check = None
    if amp and torch.device(device).type == "cuda" and not native_bf16():
        warnings.warn(f"{torch.cuda.get_device_name(torch.device(device))} has no native bfloat16; tracing in float32",
                      stacklevel=2)
        amp = False
    if amp:  # bf16 only where it agrees with float32 on these images
        amp_check = amp_agreement(model, images[0:min(n, 32)].to(device=device, dtype=dtype))
        if not amp_check["ok"]:
            warnings.warn(f"bfloat16 disagrees with float32 for {meta.get('model', 'this model')} on the first "
                          f"{amp_check['images']} images ({_describe_check(amp_check)}); tracing in float32",
                          stacklevel=2)
            amp = False
    batch_size = batch_size or auto_batch_size(model, device, amp)
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=amp)
    bias = None
    bar = tqdm(total=n, initial=start, unit="img", desc=f"trace {meta.get('model', '')}", disable=not progress)
    writer, pending = ThreadPoolExecutor(1), []
    try:
        with Tracer(model) as tracer:
            i = start
            while i < n:
                j = min(i + batch_size, n)
                x = images[i:j].to(device=device, dtype=dtype)
                try:
                    with autocast:
                        rec = tracer.run(x)
                except torch.OutOfMemoryError:
                    if batch_size == 1:
                        raise
                    batch_size = max(1, batch_size // 2)
                    del x
                    torch.cuda.empty_cache()
                    bar.write(f"out of memory: retrying with batch size {batch_size}")
                    continue
                pending.append(writer.submit(atomic_savez, parts_dir / f"{i:09d}-{j:09d}.npz", _to_numpy(rec)))
                while len(pending) > 2:  # at most two batches wait for the disk
                    pending.pop(0).result()
                done.append((i, j))
                bias = tracer.bias
                bar.update(j - i)
                i = j
                if pause_after and len(done) == pause_after:  # the parts so far are on disk; wait for a signal
                    for f in pending:
                        f.result()
                    print(f"paused after {pause_after} batches", file=sys.stderr, flush=True)
                    while True:
                        time.sleep(0.05)
            if bias is None:  # everything came from parts: one tiny batch recovers the bias
                tracer.run(images[0:1].to(device=device, dtype=dtype))
                bias = tracer.bias
    finally:
        writer.shutdown(wait=True)  # finished batches reach the disk, also on an interrupt
        bar.close()
    for f in pending:
        f.result()  # a failed write raises here
    arrays = {k: np.concatenate([np.load(parts_dir / f"{a:09d}-{b:09d}.npz")[k] for a, b in done])
              for k in PER_IMAGE}
    arrays["attn_out_bias"] = bias.detach().float().cpu().numpy()
    arrays["image_ids"] = np.asarray(ids)
    if amp_check is not None:
        meta = {**meta, "amp_used": amp, "amp_check": amp_check}
    save_trace(out, {**arrays, **(extra or {})}, meta)
    shutil.rmtree(parts_dir, ignore_errors=True)
    return out


def _describe_check(check: dict) -> str:
    return (f"identity error {check['identity_bf16']:.1e}, attention share change {check['attn_mass_maxdiff']:.1e}, "
            f"CKA of {check['cka_min_key']} {check['cka_min']:.4f}, change of 1 - penultimate pairwise cosine "
            f"{check['penult_cosine_change']:.1%}; tolerance {AMP_TOLERANCE}")


def trace_files(model: nn.Module, files: list, ids: list[str], labels: np.ndarray | None, *, out: str | Path,
                meta: dict, img_size: int, batch_size: int | None = None, device: str = "cpu", amp: bool = False,
                progress: bool = True, store_cache: str | Path | None = None, crop_pct: float | None = None):
    """Decode image files with the model's eval transform and trace them into ``out``.

    ``meta`` names the model, weights and dataset; the preprocessing, the image count and the skipped files
    are added here. ``crop_pct`` overrides the model's crop fraction (:func:`regcls.data.eval_config`). Returns the
    image store (its ``skipped`` lists unreadable files).
    """
    from .data import eval_config, image_store

    geometry, mean, std = eval_config(model, img_size, crop_pct)
    store = image_store(files, ids, geometry, cache=store_cache, progress=progress)
    meta = trace_meta(model, img_size=img_size, n_images=len(store), skipped=len(store.skipped), amp=amp,
                      mean=list(mean), std=list(std), geometry=geometry.key(), **meta)
    extra = None
    if labels is not None:
        pos = {i: k for k, i in enumerate(ids)}
        extra = {"labels": np.asarray(labels)[[pos[i] for i in store.ids]]}
    run_trace(model, store.normalized(mean, std), store.ids, out=out, meta=meta, extra=extra,
              batch_size=batch_size, device=device, amp=amp, progress=progress)
    return store


def _hash_ids(ids: list[str]) -> str:
    import hashlib
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def _resume(parts_dir: Path, key: str) -> list[tuple[int, int]]:
    """Finished, contiguous batch ranges of an earlier run with the same key; else start afresh."""
    key_file = parts_dir / "run.json"
    if parts_dir.is_dir() and key_file.is_file() and key_file.read_text() == key:
        ranges = sorted(tuple(int(x) for x in p.stem.split("-")) for p in parts_dir.glob("*-*.npz"))
        done, end = [], 0
        for a, b in ranges:
            if a != end:
                break
            done.append((a, b))
            end = b
        return done
    shutil.rmtree(parts_dir, ignore_errors=True)
    parts_dir.mkdir(parents=True)
    key_file.write_text(key)
    return []
