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
``skip``                            (n, D)        [CLS] hidden state entering the last block (derived:
                                                  ``prefix_penult[:, 0]``, not stored twice)
``cls_layers``                      (n, L, D)     [CLS] hidden state after every block (before final norm)
``prefix_penult`` / ``_ln``         (n, P, D)     prefix tokens entering the last block, raw / after norm1
``token_norms_penult``              (n, N)        L2 norm of every token entering the last block
``patch_mean_penult``               (n, D)        mean of the patch tokens entering the last block
``patch_sample_penult``             (n, K, D)     K = 8 patch tokens entering the last block, at the fixed
                                                  grid positions ``patch_sample_index`` (for position probes)
``cls_final``                       (n, D)        final [CLS] embedding (after the final norm)
``contrib_norm`` / ``_ls``          (n, Np)       last block, per patch i: ||W_o (a_i v_i)|| (heads concatenated),
                                                  before / after the LayerScale (Kobayashi et al. 2020)
``contrib_norm_heads``              (n, H, Np)    the same per head, after the LayerScale: ||LS(W_o^h a_hi v_hi)||
``contrib_proj``                    (n, Np)       the same contribution (after LayerScale) projected on the unit
                                                  vector of ``attn_out_full``: signed, sums with the other parts'
                                                  projections to its norm
``rebuilt_{map}_{k}``               (n, D)        the patch contributions (after LayerScale) summed over the top
                                                  ``k`` % of the patches by ``map``: ``attn`` (head-averaged
                                                  attention), ``norm`` (``contrib_norm_ls``), ``proj``
                                                  (``contrib_proj``); k in :data:`TOP_PERCENT`
==================================  ============  =====================================================

The model's own forward keeps PyTorch's fused attention; the hooks recompute only the [CLS] query row of
each block from the ``qkv`` projection the block already computed, so no N x N attention is ever held.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__
from .data import ImageList, Normalized, decode_images, eval_config, image_store
from .env import native_bf16, native_tf32
from .errors import RegclsError
from .files import atomic_savez, atomic_write_text, disk_error, output_lock
from .metrics import cka, mean_pairwise_cosine
from .models import layer_scale, layout
from .profiles import ModelSpec

TRACE_SCHEMA = 5
MAPS = ("attn", "norm", "proj")          # the maps of the [CLS] over the patches that select patches to rebuild
TOP_PERCENT = (1, 5, 10, 25, 50)         # ... the share of the patches kept, in percent
SELECTED = tuple(f"rebuilt_{m}_{k}" for m in MAPS for k in TOP_PERCENT)
PER_IMAGE = ("cls_attn", "attn_mass", "attn_val_cls", "attn_val_reg", "attn_val_patch", "attn_out_cls",
             "attn_out_reg", "attn_out_patch", "attn_out_full", "skip", "cls_layers", "prefix_penult",
             "prefix_penult_ln", "token_norms_penult", "patch_mean_penult", "patch_sample_penult", "cls_final",
             "contrib_norm", "contrib_norm_ls", "contrib_norm_heads", "contrib_proj", *SELECTED)
DERIVED = ("skip",)   # views of stored arrays, added by Tracer.run and load_trace, never written
STORED = tuple(k for k in PER_IMAGE if k not in DERIVED)
PARTS = ("cls", "reg", "patch")
N_PATCH_SAMPLE = 8


def per_image_shapes(lay) -> dict[str, tuple[int, ...]]:
    """The shape one image has in every stored array of the schema, for a model's :class:`TokenLayout`."""
    H, N, L, D, P = lay.heads, lay.num_tokens, lay.depth, lay.dim, lay.num_prefix
    Np = N - P
    shapes = {"cls_attn": (H, N), "attn_mass": (L, H, 3), "cls_layers": (L, D), "prefix_penult": (P, D),
              "prefix_penult_ln": (P, D), "token_norms_penult": (N,), "patch_sample_penult": (len(patch_sample_index(Np)), D),
              "contrib_norm": (Np,), "contrib_norm_ls": (Np,), "contrib_norm_heads": (H, Np), "contrib_proj": (Np,)}
    return {k: shapes.get(k, (D,)) for k in STORED}   # the rest: one D-vector per image


def patch_sample_index(num_patches: int, k: int = N_PATCH_SAMPLE) -> np.ndarray:
    """K patch indices (raster order) spread evenly over the grid, the same for every image."""
    return np.unique(np.linspace(0, num_patches - 1, min(k, num_patches)).round().astype(int))


def _cls_row(attn: nn.Module, qkv: torch.Tensor, rope: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] query attention of one block from its ``qkv`` output (B, N, 3*H*hd).

    Returns the post-softmax row ``a`` (B, H, N) in float32 or wider, and the values ``v`` (B, H, N, hd) as
    computed (bfloat16 under autocast). Only [CLS]'s query and the keys are widened, not the whole ``qkv``.
    Eva (DINOv3): the q/k/v biases the attention adds after its ``qkv`` projection are added here, and the
    rotary embedding ``rope`` the block received turns the patch keys as the model turns them (the [CLS] query
    is a prefix token: it is not turned).
    """
    B, N, _ = qkv.shape
    dtype = torch.promote_types(qkv.dtype, torch.float32)
    qkv = qkv.reshape(B, N, 3, attn.num_heads, attn.head_dim)
    q = qkv[:, 0, 0].to(dtype)                                 # (B, H, hd): [CLS]'s query only
    k = qkv[:, :, 1].transpose(1, 2).to(dtype)                 # (B, H, N, hd)
    v = qkv[:, :, 2].transpose(1, 2)
    if getattr(attn, "q_bias", None) is not None:              # Eva with qkv bias: added outside the projection
        b = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)).reshape(3, attn.num_heads, attn.head_dim)
        q, k, v = q + b[0].to(dtype), k + b[1, :, None].to(dtype), v + b[2, :, None].to(v.dtype)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        from timm.layers.pos_embed_sincos import apply_rot_embed_cat   # what EvaAttention applies

        P = attn.num_prefix_tokens
        k = torch.cat([k[:, :, :P], apply_rot_embed_cat(k[:, :, P:], rope, half=attn.rotate_half).to(dtype)], dim=2)
    scores = torch.einsum("bhd,bhnd->bhn", q * attn.scale, k)  # (B, H, N)
    return scores.softmax(dim=-1), v


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
        self._separate: list = []   # Eva attentions whose qkv_bias_separate the hooks changed, with the old value

    def __enter__(self) -> "Tracer":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def attach(self) -> "Tracer":
        """Register the hooks (what ``with Tracer(model)`` does on entry)."""
        blocks, P = self.model.blocks, self.lay.num_prefix
        last = len(blocks) - 1
        mass: list = [None] * len(blocks)
        cls_layers: list = [None] * len(blocks)
        self._mass, self._layers = mass, cls_layers

        ropes: list = [None] * len(blocks)

        def on_attn_in(i):   # Eva: the rotary embedding the block hands its attention
            def hook(_mod, _args, kwargs):
                ropes[i] = kwargs.get("rope")
            return hook

        def on_qkv(i):
            def hook(_mod, _inp, qkv):
                with torch.autocast(qkv.device.type, enabled=False):  # the trace's own arithmetic in float32
                    record(i, qkv)
            return hook

        def record(i, qkv):
            a, v = _cls_row(blocks[i].attn, qkv, ropes[i])
            mass[i] = torch.stack([p.sum(-1) for p in _split(a, P)], dim=-1)  # (B, H, 3)
            if i == last:
                self.rec["cls_attn"] = a
                for name, ap, vp in zip(PARTS, _split(a, P), _split(v.to(a.dtype).transpose(-2, -1), P)):
                    # sum_i a_i v_i over the part: (B, H, hd) -> heads concatenated (B, D)
                    val = (vp @ ap.unsqueeze(-1)).squeeze(-1)
                    self.rec[f"attn_val_{name}"] = val.flatten(1)
                # through the projection now, while the block's values exist anyway (none is kept beyond it)
                self._project(self.rec, a[:, :, P:], v[:, :, P:])

        # Slices are cloned: a view would keep the whole (B, N, D) activation of its block alive.
        def on_block(i):
            def hook(_mod, _inp, out):
                cls_layers[i] = out[:, 0].clone()
            return hook

        def on_last_in(_mod, inp):
            x = inp[0]
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
            if hasattr(blk.attn, "qkv_bias_separate"):   # Eva
                self.handles.append(blk.attn.register_forward_pre_hook(on_attn_in(i), with_kwargs=True))
                # with a qkv bias Eva calls F.linear, not its qkv module; adding the bias after the module (the
                # same sum) lets the hook see every block's qkv
                self._separate.append((blk.attn, blk.attn.qkv_bias_separate))
                blk.attn.qkv_bias_separate = True
        self.handles.append(blocks[last].register_forward_pre_hook(on_last_in))
        self.handles.append(blocks[last].norm1.register_forward_hook(on_last_norm1))
        return self

    def detach(self) -> None:
        """Remove the hooks: the model runs as before."""
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for attn, separate in self._separate:
            attn.qkv_bias_separate = separate
        self._separate.clear()

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
        _derive(rec)
        return rec

    def _project(self, rec: dict[str, torch.Tensor], a: torch.Tensor, v: torch.Tensor) -> None:
        """The last block's parts through the output projection and LayerScale: attn_out_* and the bias; then the
        patches' contributions from their attention ``a`` (B, H, Np) and values ``v`` (B, H, Np, hd)."""
        last = self.model.blocks[-1]
        weight, bias = last.attn.proj.weight, last.attn.proj.bias
        dtype = rec["attn_val_cls"].dtype
        gamma = layer_scale(last)
        gamma = gamma.to(dtype) if gamma is not None else None  # pragma: no mutate (equivalent in float32, on the CPU)

        def out(x):  # output projection without bias, then LayerScale: linear in the parts
            y = x @ weight.to(dtype).T  # pragma: no mutate (equivalent in float32, on the CPU)
            return y * gamma if gamma is not None else y

        for name in PARTS:
            rec[f"attn_out_{name}"] = out(rec[f"attn_val_{name}"])
        b = bias.to(dtype) if bias is not None else torch.zeros(weight.shape[0], dtype=dtype, device=weight.device)  # pragma: no mutate (equivalent in float32, on the CPU)
        self.bias = b * gamma if gamma is not None else b
        rec["attn_out_full"] = rec["attn_out_cls"] + rec["attn_out_reg"] + rec["attn_out_patch"] + self.bias
        self._contributions(rec, weight.to(dtype), gamma, a, v)

    def _contributions(self, rec: dict[str, torch.Tensor], weight: torch.Tensor, gamma: torch.Tensor | None,
                       a_all: torch.Tensor, v_all: torch.Tensor, chunk: int = 4) -> None:
        """Per patch i of the last block: its contribution z_i = LayerScale(W_o (a_i v_i)) to the [CLS] output
        (``weight`` W_o (D, D), ``gamma`` the LayerScale (D,) or None), held for ``chunk`` images at a time
        ((chunk, Np, D), so the trace's memory stays that of the model); its norms, its projection on the output,
        and the patch part rebuilt from the top patches of each map."""
        dtype = weight.dtype
        H, hd = v_all.shape[1], v_all.shape[3]
        heads = weight.T.reshape(H, hd, -1)                                  # (H, hd, D): W_o^h, transposed
        heads = heads * gamma if gamma is not None else heads
        gram = heads @ heads.transpose(1, 2)       # (H, hd, hd): ||LS(W_o^h x)||^2 = x^T gram_h x, per head
        parts: dict[str, list] = {}
        for s in range(0, a_all.shape[0], chunk):
            a, v = a_all[s:s + chunk].to(dtype), v_all[s:s + chunk].to(dtype)
            B, _, Np, _ = v.shape
            z = (a.unsqueeze(-1) * v).permute(0, 2, 1, 3).reshape(B, Np, H * hd) @ weight.T   # (B, Np, D)
            got = {"contrib_norm": z.norm(dim=-1)}                           # projected, before the LayerScale
            zl = z * gamma if gamma is not None else z                       # ... and after it
            del z
            got["contrib_norm_ls"] = zl.norm(dim=-1)
            got["contrib_norm_heads"] = a * torch.einsum("bhnd,hde,bhne->bhn", v, gram, v).clamp_min(0).sqrt()
            y = rec["attn_out_full"][s:s + chunk]
            got["contrib_proj"] = (zl @ (y / y.norm(dim=-1, keepdim=True)).unsqueeze(-1)).squeeze(-1)
            maps = {"attn": a.mean(dim=1), "norm": got["contrib_norm_ls"], "proj": got["contrib_proj"]}
            for name, m in maps.items():
                order = m.argsort(dim=1, descending=True)
                for k in TOP_PERCENT:
                    top = order[:, :max(1, -(-k * Np // 100))]               # ceil(k % of the patches)
                    got[f"rebuilt_{name}_{k}"] = zl.gather(1, top.unsqueeze(-1).expand(-1, -1, zl.shape[-1])).sum(1)
            for key, value in got.items():
                parts.setdefault(key, []).append(value)
        rec.update({key: torch.cat(values) for key, values in parts.items()})


# bfloat16 autocast (or, where it fails, TF32 matrix products) is used only where it agrees with full float32
# this closely (checked on the first images).
AMP_TOLERANCE = {"identity_bf16": 2e-2, "share_change_p99": 1e-2, "cka_min": 0.999, "penult_cosine_change": 0.1}

# What a trace file records as its precision, by mode (``fp32`` on a GPU: full float32, TF32 off).
PRECISION_LABELS = {"bf16": "bfloat16 autocast (the trace's own arithmetic float32)",
                    "tf32": "float32 with TF32 matrix products and convolutions", "fp32": "float32"}


@contextlib.contextmanager
def precision_mode(device: str, mode: str = "fp32"):
    """Run the enclosed forward passes in ``mode``: ``"bf16"`` (bfloat16 autocast; what runs outside it in full
    float32), ``"tf32"`` (float32 with TF32 matrix products and convolutions, Ampere and newer) or ``"fp32"`` (full
    float32: PyTorch otherwise lets convolutions use TF32 on A100/H100). Set through PyTorch's per-backend
    ``fp32_precision`` flags (the older ``allow_tf32`` flags fail once anything in the process used the new ones)
    and restored afterwards; on the CPU only the autocast matters."""
    if mode not in PRECISION_LABELS:
        raise ValueError(f"precision mode {mode!r}; one of {', '.join(PRECISION_LABELS)}")
    flags = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)
    old = [f.fp32_precision for f in flags]
    for f in flags:
        f.fp32_precision = "tf32" if mode == "tf32" else "ieee"
    try:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=mode == "bf16"):
            yield
    finally:
        for f, v in zip(flags, old):
            f.fp32_precision = v


def _hook_branch(block: nn.Module, store: dict):
    """Record ``store["branch"]``: the block's attention branch as the model computes it, [CLS] row (B, D), after
    the LayerScale (timm's ViT: the output of ``ls1``; Eva: its attention's output times ``gamma_1``)."""
    if hasattr(block, "ls1"):
        return block.ls1.register_forward_hook(lambda m, i, o: store.__setitem__("branch", o[:, 0].float()))
    g = layer_scale(block)
    return block.attn.register_forward_hook(
        lambda m, i, o: store.__setitem__("branch", (o[:, 0] * g if g is not None else o[:, 0]).float()))


def amp_agreement(model: nn.Module, x: torch.Tensor, mode: str = "bf16") -> dict:
    """A lower precision (``mode``: bfloat16 autocast, or TF32 matrix products) against full float32 on the same
    images (B, 3, S, S), B >= 2.

    ``identity_fp32`` (full float32) and ``identity_bf16`` (``mode``; the name kept for the files): relative L2
    distance between the decomposed attention branch (parts + bias) and the branch the model itself computed
    (output of the last block's LayerScale), [CLS] token.
    ``share_change_p99``: 99th percentile over images, blocks and token types of the change of the [CLS]
    attention share averaged over heads (what Sec. 3.1 compares); ``attn_mass_maxdiff``, the largest change of
    any single head's share, is reported beside it. ``cka_min``: smallest linear CKA across the images between
    bf16 and float32 over every per-image array of the trace (``cka_min_key`` names it). ``penult_cosine_change``: the largest relative change of
    1 - (mean pairwise cosine across the images) of a prefix token entering the last block (Sec. 3.2 reports
    0.9989, four digits: bf16 may move 1 - cos by a tenth of itself at most). ``ok``: all within
    :data:`AMP_TOLERANCE`.
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

    # the rebuilt outputs select patches by rank, a step function of the inputs: their maps are compared instead
    ckas = {k: cka(flat(low[k]), flat(ref[k])) for k in PER_IMAGE if k != "attn_mass" and k not in SELECTED}
    ckas = {k: v for k, v in ckas.items() if np.isfinite(v)}   # the register arrays of a model without registers
    worst = min(ckas, key=ckas.get)
    share = (low["attn_mass"].double().mean(2) - ref["attn_mass"].double().mean(2)).abs()   # (B, L, 3)
    ref_p, low_p = (r["prefix_penult"].double().cpu().numpy() for r in (ref, low))
    gap = [(1 - mean_pairwise_cosine(ref_p[:, t]), 1 - mean_pairwise_cosine(low_p[:, t])) for t in range(ref_p.shape[1])]
    penult = max(abs(b - a) / max(a, 1e-3) for a, b in gap)
    out = {"identity_fp32": rel(ref["attn_out_full"], ref_branch),
           "identity_bf16": rel(low["attn_out_full"], low_branch),
           "attn_mass_maxdiff": float((low["attn_mass"].float() - ref["attn_mass"].float()).abs().max()),
           "share_change_p99": float(torch.quantile(share.flatten(), 0.99)),
           "cka_min": float(ckas[worst]), "cka_min_key": worst, "penult_cosine_change": float(penult),
           "images": len(x), "mode": mode}
    out["ok"] = all(out[k] >= tol if k == "cka_min" else out[k] <= tol for k, tol in AMP_TOLERANCE.items())
    return out


def trace_batch(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Trace one batch; also returns ``attn_out_bias`` (D,)."""
    with Tracer(model) as t:
        rec = t.run(images)
        rec["attn_out_bias"] = t.bias
    return rec


# ---------------------------------------------------------------------------------------- files

def _derive(tr: dict) -> None:
    """Add the :data:`DERIVED` arrays as views: ``skip`` (n, D) is the [CLS] of ``prefix_penult``."""
    if "prefix_penult" in tr:
        tr["skip"] = tr["prefix_penult"][:, 0]


def save_trace(path: str | Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Save a trace: float32 arrays plus metadata (model, weights, dataset, sizes, version, options)."""
    out = {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()
           if k not in ("image_ids", "labels", *DERIVED)}
    out["image_ids"] = np.asarray(arrays["image_ids"], dtype=str)
    if "labels" in arrays:
        out["labels"] = np.asarray(arrays["labels"], dtype=np.int64)
    for k in ("model", "weights", "dataset", "img_size", "num_prefix_tokens", "num_registers", "grid"):
        if k not in meta:
            raise ValueError(f"trace metadata lacks {k!r}")
    meta = {"regcls_version": __version__, "trace_schema": TRACE_SCHEMA, **meta}
    out["meta_json"] = np.asarray(json.dumps(meta, sort_keys=True, default=str))
    atomic_savez(path, out)


class Trace(dict):
    """A trace as :func:`load_trace` reads it: the arrays by name (``tr["cls_attn"]``, (n, H, N)), ``tr["meta"]``
    (plain Python), and the token layout and image count as properties."""

    @property
    def meta(self) -> dict:
        return self["meta"]

    @property
    def num_prefix(self) -> int:
        """P = 1 + registers: the patches start at token P."""
        return int(self["meta"]["num_prefix_tokens"])

    @property
    def num_registers(self) -> int:
        return int(self["meta"]["num_registers"])

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of the patch grid."""
        return tuple(int(v) for v in self["meta"]["grid"])

    @property
    def n_images(self) -> int:
        return int(self["meta"].get("n_images", len(self.get("image_ids", ()))))

    @property
    def label(self) -> str:
        """The model's short label for figures and tables: ``L+reg``, ``L``, ``L+ttr``, ``H+ v3``
        (:attr:`ModelSpec.label`)."""
        spec = self["meta"].get("model_spec")
        return (ModelSpec.from_description(spec) if spec else ModelSpec("?", self["meta"]["model"])).label


def load_trace(path: str | Path, meta_only: bool = False, keys: list[str] | None = None) -> Trace:
    """Read a trace: a :class:`Trace` of arrays; ``meta`` holds the metadata as plain Python.

    ``meta_only`` reads just the metadata, ``keys`` just those arrays (the rest of a large trace stays on disk;
    ``skip`` comes with ``prefix_penult``)."""
    path = Path(path)
    if not path.is_file():
        raise RegclsError(f"trace {path} does not exist")
    with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:   # closed also when the file is damaged
        wanted = z.files if keys is None else [k for k in z.files if k in {*keys, "image_ids", "labels"}
                                                or (k == "prefix_penult" and "skip" in keys)]
        tr = {k: z[k] for k in (["meta_json"] if meta_only else [*wanted, "meta_json"])}
    tr["meta"] = json.loads(str(tr.pop("meta_json")))
    if tr["meta"].get("trace_schema") != TRACE_SCHEMA:
        raise RegclsError(f"trace {path} has schema {tr['meta'].get('trace_schema')}, expected {TRACE_SCHEMA}; "
                          "delete it to recompute")
    _derive(tr)
    return Trace(tr)


def check_trace(tr: dict, key: str | None = None) -> dict:
    """``tr`` as :func:`load_trace` read it, checked: every array of the schema, one row per image in each, and
    (for a cache entry) the cache key it was written under. Raises :class:`RegclsError` saying what is wrong."""
    missing = [k for k in (*PER_IMAGE, "attn_out_bias", "image_ids") if k not in tr]
    if missing:
        raise RegclsError(f"it lacks {', '.join(missing)}")
    n = len(tr["image_ids"])
    uneven = [k for k in PER_IMAGE if tr[k].shape[:1] != (n,)]
    if uneven or tr["meta"].get("n_images", n) != n:
        raise RegclsError(f"{', '.join(uneven) or 'n_images'} disagree with its {n} image ids")
    if key is not None and tr["meta"].get("cache_key") != key:
        raise RegclsError(f"it was written under cache key {tr['meta'].get('cache_key')}, not {key}")
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
        return {k: v for k, v in t["meta"].items() if k not in ("n_images", "skipped", "shard", "amp_check", "tf32_check")}

    first = settings(traces[0])
    for p, t in zip(paths, traces):
        meta = settings(t)
        if meta != first:
            diff = sorted(k for k in set(meta) | set(first) if meta.get(k) != first.get(k))
            raise RegclsError(f"{p} was traced with other settings ({', '.join(diff)}) and cannot be merged")
        if not np.array_equal(t["attn_out_bias"], traces[0]["attn_out_bias"]):
            raise RegclsError(f"{p} comes from other weights and cannot be merged")
    arrays = {k: np.concatenate([t[k] for t in traces]) for k in STORED}
    arrays["attn_out_bias"] = traces[0]["attn_out_bias"]
    if "register_means" in traces[0]:   # Fix-Reg-Mean: one set of means (their digest is in the settings)
        arrays["register_means"] = traces[0]["register_means"]
    arrays["image_ids"] = np.concatenate([t["image_ids"] for t in traces])
    if "labels" in traces[0]:
        arrays["labels"] = np.concatenate([t["labels"] for t in traces])
    if len(set(arrays["image_ids"].tolist())) != len(arrays["image_ids"]):
        raise RegclsError("the shards overlap (an image appears twice)")
    meta = {**first, "n_images": len(arrays["image_ids"]), "skipped": sum(t["meta"].get("skipped", 0) for t in traces)}
    for k in ("amp_check", "tf32_check"):   # shards of one request checked the same images: one check; else each
        checks = [t["meta"].get(k) for t in traces]
        if checks[0] is not None:
            meta[k] = checks[0] if all(c == checks[0] for c in checks) else checks
    meta.pop("regcls_version", None)
    meta.pop("trace_schema", None)
    save_trace(out, arrays, meta)
    return Path(out)


def trace_meta(net: nn.Module, **meta) -> dict:
    """Metadata from the network's layout plus what the caller knows (model name, weights, dataset ...)."""
    lay = layout(net)
    out = {"num_prefix_tokens": lay.num_prefix, "num_registers": lay.num_registers, "grid": list(lay.grid),
           "patch_sample_index": patch_sample_index(lay.grid[0] * lay.grid[1]).tolist(),
           "depth": lay.depth, "heads": lay.heads, "dim": lay.dim}
    if getattr(net, "test_time_registers", 0):   # the units moved into the test-time register, as used
        out["test_time_neurons"] = {str(b): list(u) for b, u in net.test_time_neurons.items()}
    if getattr(net, "fixed_register_means", None) is not None:   # Fix-Reg-Mean: the means (stored as an array)
        out["fixed_register_means_sha256"] = hashlib.sha256(
            net.fixed_register_means.double().cpu().numpy().tobytes()).hexdigest()[:16]
    return {**out, **meta}


# ------------------------------------------------------------------------------ many images

def _pack(rec: dict[str, torch.Tensor]) -> tuple:
    """A batch's arrays in one buffer, on its way to the host: one device-to-host copy per batch instead of one
    per array. On CUDA the copy goes to pinned memory without blocking, and an event marks its end (the writer
    thread waits on it); float64 (the exactness tests) travels as float64, everything else as float32."""
    wide = any(rec[k].dtype == torch.float64 for k in STORED)  # pragma: no mutate (memory only: exact either way)
    dtype = torch.float64 if wide else torch.float32  # pragma: no mutate (memory only: exact either way)
    layout_ = [(k, tuple(rec[k].shape), rec[k].dtype == torch.float64) for k in STORED]
    flat = torch.cat([rec[k].detach().reshape(-1).to(dtype) for k in STORED])  # pragma: no mutate (cat promotes)
    if flat.device.type != "cuda":  # pragma: no mutate (GPU only)
        return flat, layout_, None
    host = torch.empty(flat.shape, dtype=dtype, pin_memory=True)  # pragma: no mutate (GPU only)
    host.copy_(flat, non_blocking=True)  # pragma: no mutate (GPU only)
    done = torch.cuda.Event()  # pragma: no mutate (GPU only)
    done.record()  # pragma: no mutate (GPU only)
    return host, layout_, done


def _unpack(packed: tuple) -> dict[str, np.ndarray]:
    """The arrays of :func:`_pack`, as numpy (float32, or float64 where the trace computed float64)."""
    host, layout_, done = packed
    if done is not None:
        done.synchronize()  # pragma: no mutate (GPU only)
    buf, out, at = host.numpy(), {}, 0
    for k, shape, wide in layout_:
        size = int(np.prod(shape))
        part = buf[at:at + size].reshape(shape)
        out[k] = part.astype(np.float64 if wide else np.float32, copy=True)  # pragma: no mutate (a view holds the same values)
        at += size
    return out


def _write_part(path: Path, packed: tuple) -> None:
    atomic_savez(path, _unpack(packed))


class _Batches:
    """Model input for ``images[i:j]``; on CUDA the next batch is copied and normalised on a side stream while
    the current one is traced."""

    def __init__(self, images, device: str, dtype: torch.dtype):
        self.images, self.device, self.dtype = images, torch.device(device), dtype
        self.cuda = self.device.type == "cuda"
        self.side = torch.cuda.Stream(self.device) if self.cuda else None  # pragma: no mutate (GPU only)
        self.ahead: tuple | None = None

    def _load(self, i: int, j: int) -> torch.Tensor:
        return self.images[i:j].to(device=self.device, dtype=self.dtype)

    def get(self, i: int, j: int, next_j: int) -> torch.Tensor:
        """``images[i:j]`` on the device; starts copying ``images[j:next_j]`` (when there are any) behind it."""
        if not self.cuda:
            return self._load(i, j)
        if self.ahead is not None and self.ahead[:2] == (i, j):  # pragma: no mutate (GPU only)
            x = self.ahead[2]  # pragma: no mutate (GPU only)
            torch.cuda.current_stream(self.device).wait_stream(self.side)  # pragma: no mutate (GPU only)
            x.record_stream(torch.cuda.current_stream(self.device))  # pragma: no mutate (GPU only)
        else:
            x = self._load(i, j)  # pragma: no mutate (GPU only)
        self.ahead = None  # pragma: no mutate (GPU only)
        if next_j > j:  # pragma: no mutate (GPU only)
            with torch.cuda.stream(self.side):  # pragma: no mutate (GPU only)
                self.ahead = (j, next_j, self._load(j, next_j))  # pragma: no mutate (GPU only)
        return x


def auto_batch_size(model: nn.Module, device: str, amp: bool = False, cap: int = 512) -> int:
    """Images per batch: 16 on the CPU; on CUDA as many as half the free memory holds (a power of two <= cap);
    memory PyTorch holds in its cache but does not use counts as free.

    Inference holds about N x (6 D + 2 D_mlp) activations per image at once (residual stream, norm, qkv,
    attention output, the MLP's hidden layer before and after its activation); twice that is budgeted.
    An out-of-memory error still halves the batch (:func:`run_trace`).
    """
    if not str(device).startswith("cuda"):
        return 16
    lay = layout(model)
    hidden = max(m.out_features for m in model.blocks[0].mlp.modules() if isinstance(m, nn.Linear))
    per_image = 2 * lay.num_tokens * (6 * lay.dim + 2 * hidden) * (2 if amp else 4)
    dev = torch.device(device)
    free, _ = torch.cuda.mem_get_info(dev)
    free += torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)  # cached by PyTorch: free for us
    fits = max(1, int(0.5 * free // per_image))
    return min(cap, 1 << (fits.bit_length() - 1))


def decide_precision(model: nn.Module, images: torch.Tensor, *, device: str, amp: bool, name: str = "this model",
                     decision_file: Path | None = None) -> tuple[str, dict]:
    """The precision of one trace request: ``(mode, checks)``, mode ``"bf16"``, ``"tf32"`` or ``"fp32"``
    (:func:`precision_mode`), checks the :func:`amp_agreement` figures of each mode tried, by mode.

    Without ``amp`` the trace runs in full float32. With it, bf16 autocast is used where the GPU has it natively
    (the CPU runs it too, for tests) and its check on ``images`` (the request's first 32) passes; where it fails
    on a GPU with TF32 (Ampere and newer), float32 with TF32 matrix products where *its* check passes; else full
    float32. The decision is written to ``decision_file`` (in the parts folder) and read back by a resumed run,
    and shards of one request check the same images, so that every part of a trace has one precision.
    """
    if decision_file is not None and decision_file.is_file():
        d = json.loads(decision_file.read_text())
        return d["mode"], d["checks"]
    mode, checks = "fp32", {}
    if amp and torch.device(device).type == "cuda" and not native_bf16():
        warnings.warn(f"{torch.cuda.get_device_name(torch.device(device))} has no native bfloat16; tracing in float32",
                      stacklevel=3)
        amp = False
    tried = (["bf16"] + (["tf32"] if native_tf32(device) else [])) if amp else []
    if tried:   # the same first images for every mode tried
        head = images[0:min(len(images), 32)].to(device=device, dtype=next(model.parameters()).dtype)
    for m in tried:
        check = checks[m] = amp_agreement(model, head, mode=m)
        if check["ok"]:   # a failed check says so once, in the warning below
            print(f"{m} check for {name}: passed ({_describe_check(check)})", file=sys.stderr, flush=True)
            mode = m
            break
        then = "trying float32 with TF32 matrix products" if m == "bf16" and len(tried) > 1 else "tracing in full float32"
        warnings.warn(f"{PRECISION_LABELS[m].split(' (')[0]} disagrees with float32 for {name} on the first "
                      f"{check['images']} images ({_describe_check(check)}); {then}", stacklevel=3)
    if decision_file is not None:
        atomic_write_text(decision_file, json.dumps({"mode": mode, "checks": checks}))
    return mode, checks


def precision_label(device: str, mode: str) -> str:
    """What a trace file records as its precision."""
    if mode == "fp32" and torch.device(device).type == "cuda":
        return "float32 (TF32 off)"
    return PRECISION_LABELS[mode]


def run_trace(model: nn.Module, images, ids: list[str], *, out: str | Path, meta: dict,
              extra: dict[str, np.ndarray] | None = None, batch_size: int | None = None, device: str = "cpu",
              amp: bool = False, progress: bool = True, check_images=None) -> Path:
    """Trace all images into ``out`` (.npz), resuming an interrupted run of the same settings.

    Finished batches go to ``out.parts/`` as they complete (atomic writes, in a background thread so the device
    keeps working); the final file is written atomically and the parts are removed. An out-of-memory error halves
    the batch; a full disk or an unwritable folder is one line saying how many images are kept.

    Args:
        model: a supported timm ViT (:func:`regcls.models.check_supported`), moved to ``device`` here.
        images: indexable by a slice, giving normalised float images (B, 3, S, S) (see
            :class:`regcls.data.ImageStore`; its slices travel to the device as uint8).
        ids: one id per image, in order; with ``meta`` they make the key that a resumed run must match.
        out: the trace file to write.
        meta: model, weights, dataset and preprocessing, stored in the file; the precision is added here.
        extra: arrays stored beside the trace (e.g. ``labels``), one row per image.
        batch_size: images per batch; None picks one from the free memory (:func:`auto_batch_size`).
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        amp: ask for bfloat16 autocast (the trace's own arithmetic stays float32), checked before use, with TF32
            and full float32 as fallbacks (:func:`decide_precision`).
        progress: show a progress bar.
        check_images: the images the precision check runs on (default: the first of ``images``; shards pass the
            whole request's first images, so that every shard decides alike).

    Returns:
        ``out``.
    """
    out = Path(out)
    parts_dir = out.with_name(out.name + ".parts")
    try:
        with output_lock(out):   # a second run on this output refuses in one line, naming this one
            return _trace_into(model, images, ids, out=out, meta=meta, extra=extra, batch_size=batch_size,
                               device=device, amp=amp, progress=progress, check_images=check_images)
    except OSError as e:
        why = disk_error(e)
        if why is None:
            raise
        kept = _contiguous(parts_dir)[-1:]
        todo = ("free some space, or write elsewhere (--out, REGCLS_CACHE)" if e.errno in (errno.ENOSPC, errno.EDQUOT)
                else "make the folder writable, or write elsewhere (--out, REGCLS_CACHE)")
        what = (f"{kept[0][1]} of {len(ids)} images traced are kept in {parts_dir}" if kept
                else f"none of {len(ids)} images was kept")
        raise RegclsError(f"{why} writing {e.filename or parts_dir}: {what}; {todo}, then run the same command "
                          "again to resume") from None


def _contiguous(parts_dir: Path) -> list[tuple[int, int]]:
    """The finished batch ranges in ``parts_dir`` that follow each other from image 0."""
    done, end = [], 0
    for a, b in sorted(tuple(int(x) for x in p.stem.split("-")) for p in parts_dir.glob("*-*.npz")):
        if a != end:
            break
        done.append((a, b))
        end = b
    return done


def _trace_into(model: nn.Module, images, ids: list[str], *, out: Path, meta: dict, extra, batch_size, device, amp,
                progress, check_images) -> Path:
    """:func:`run_trace` under its lock."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

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
    asked = amp
    mode, checks = decide_precision(model, images if check_images is None else check_images, device=device, amp=amp,
                                    name=meta.get("model", "this model"), decision_file=parts_dir / "precision.json")
    batch_size = batch_size or auto_batch_size(model, device, mode == "bf16")
    bias = None
    bar = tqdm(total=n, initial=start, unit="img", desc=f"trace {meta.get('model', '')}", disable=not progress)
    batches = _Batches(images, device, dtype)
    writer, pending = ThreadPoolExecutor(1), []
    try:
        with Tracer(model) as tracer, precision_mode(device, mode):
            i = start
            while i < n:
                j = min(i + batch_size, n)
                x = batches.get(i, j, min(j + batch_size, n))
                try:
                    rec = tracer.run(x)
                except torch.OutOfMemoryError:
                    if batch_size == 1:
                        raise
                    batch_size = max(1, batch_size // 2)
                    del x
                    torch.cuda.empty_cache()
                    bar.write(f"out of memory: retrying with batch size {batch_size}")
                    continue
                pending.append(writer.submit(_write_part, parts_dir / f"{i:09d}-{j:09d}.npz", _pack(rec)))
                del rec
                while len(pending) > 2:  # at most two batches wait for the disk
                    pending.pop(0).result()
                done.append((i, j))
                bias = tracer.bias
                bar.update(j - i)
                i = j
                if pause_after and len(done) == pause_after:  # the parts so far are on disk; wait for a signal
                    for f in pending:
                        f.result()
                    print(f"paused after {pause_after} batches (pid {os.getpid()})", file=sys.stderr, flush=True)
                    while True:
                        time.sleep(0.05)
            if bias is None:  # everything came from parts: one tiny batch recovers the bias, as the run made it
                tracer.run(images[0:1].to(device=device, dtype=dtype))
                bias = tracer.bias
    finally:
        writer.shutdown(wait=True)  # finished batches reach the disk, also on an interrupt
        bar.close()
    for f in pending:
        f.result()  # a failed write raises here
    arrays = {k: np.concatenate([np.load(parts_dir / f"{a:09d}-{b:09d}.npz")[k] for a, b in done])
              for k in STORED}
    arrays["attn_out_bias"] = bias.detach().float().cpu().numpy()
    arrays["image_ids"] = np.asarray(ids)
    meta = {**meta, "precision": precision_label(device, mode), "precision_mode": mode}
    if asked:   # the checks that decided: bf16's, and TF32's where bf16 failed on a GPU that has it
        meta = {**meta, "amp_used": mode == "bf16", "amp_check": checks.get("bf16"),
                **({"tf32_check": checks["tf32"]} if "tf32" in checks else {})}
    save_trace(out, {**arrays, **(extra or {})}, meta)
    shutil.rmtree(parts_dir, ignore_errors=True)
    return out


def check_summary(check: dict) -> str:
    """A precision check's figures (bf16's or TF32's) in one phrase (for the run's log and the chapter's last
    line)."""
    return (f"identity error {check['identity_bf16']:.1e}, attention share change {check['share_change_p99']:.1e} "
            f"(99th percentile; one head at most {check['attn_mass_maxdiff']:.1e}), "
            f"CKA of {check['cka_min_key']} {check['cka_min']:.4f}, change of 1 - penultimate pairwise cosine "
            f"{check['penult_cosine_change']:.1%}")


def _describe_check(check: dict) -> str:
    return f"{check_summary(check)}; tolerance {AMP_TOLERANCE}"


def trace_files(model: nn.Module, images: ImageList, *, out: str | Path,
                meta: dict, img_size: int, batch_size: int | None = None, device: str = "cpu", amp: bool = False,
                progress: bool = True, store_cache: str | Path | None = None, crop_pct: float | None = None,
                check_files: list | None = None):
    """Decode image files with the model's eval transform and trace them into ``out`` (:func:`run_trace`).

    Args:
        model: a supported timm ViT.
        images: the image files with their ids and labels (:func:`regcls.data.dataset_files`); unreadable files
            are skipped, named and counted; labels (where not None) are stored with the trace.
        out: the trace file to write.
        meta: model, weights and dataset; the preprocessing, the image count and the skipped files are added here.
        img_size: input resolution in pixels.
        batch_size, device, amp, progress: as for :func:`run_trace`.
        store_cache: folder of decoded uint8 image stores, reused by every model of one geometry (None: none).
        crop_pct: the model's crop fraction replaced (None: timm's; :func:`regcls.data.eval_config`).
        check_files: the files the precision check decodes and runs on (a shard passes the whole request's first
            files, so that every shard decides alike).

    Returns:
        The image store (its ``skipped`` lists unreadable files).
    """
    geometry, mean, std = eval_config(model, img_size, crop_pct)
    store = image_store(images.files, images.ids, geometry, cache=store_cache, progress=progress)
    meta = trace_meta(model, img_size=img_size, n_images=len(store), skipped=len(store.skipped), amp=amp,
                      mean=list(mean), std=list(std), geometry=geometry.key(), **meta)
    extra = {}
    if images.labels is not None:
        pos = {i: k for k, i in enumerate(images.ids)}
        extra["labels"] = np.asarray(images.labels)[[pos[i] for i in store.ids]]
    if getattr(model, "fixed_register_means", None) is not None:   # Fix-Reg-Mean's means, with the trace
        extra["register_means"] = model.fixed_register_means.float().cpu().numpy()
    check = None
    if amp and check_files:
        head = decode_images(list(check_files)[:32], [str(f) for f in list(check_files)[:32]], geometry, progress=False)
        check = head.normalized(mean, std)[0:len(head)]
    run_trace(model, store.normalized(mean, std), store.ids, out=out, meta=meta, extra=extra,
              batch_size=batch_size, device=device, amp=amp, progress=progress, check_images=check)
    return store


def _hash_ids(ids: list[str]) -> str:
    import hashlib
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def _resume(parts_dir: Path, key: str) -> list[tuple[int, int]]:
    """Finished, contiguous batch ranges of an earlier run with the same key; else start afresh."""
    key_file = parts_dir / "run.json"
    if parts_dir.is_dir() and key_file.is_file() and key_file.read_text() == key:
        return _contiguous(parts_dir)
    shutil.rmtree(parts_dir, ignore_errors=True)
    parts_dir.mkdir(parents=True)
    key_file.write_text(key)
    return []
