"""The trace: hooks on a timm ViT that record, in one forward pass, every quantity of the schema
(:mod:`regcls.tracefile`), exactly.

The model's own forward keeps PyTorch's fused attention; the hooks recompute only the [CLS] query row of each
block from the ``qkv`` projection the block already computed, so no N x N attention is ever held. The per-patch
contributions of the last block are computed for the whole batch in a few batched operations (in chunks of at
most :attr:`Tracer.chunk_elements` values), so the work issued per batch does not grow with the batch; nothing in
a hook waits for the device. The trace's own arithmetic runs in float32 (IEEE, no TF32) whatever precision the
model runs in.
"""
from __future__ import annotations

import contextlib
import hashlib

import torch
from torch import nn

from .models import layer_scale, layout
from .tracefile import PARTS, SELECTED, TOP_PERCENT, derive, patch_sample_index


@contextlib.contextmanager
def own_arithmetic(device_type: str):
    """The trace's own arithmetic: autocast off and float32 matrix products in full precision (not TF32), whatever
    the model around it runs in; the model's settings are restored after."""
    matmul = torch.backends.cuda.matmul
    old = matmul.fp32_precision
    matmul.fp32_precision = "ieee"
    try:
        with torch.autocast(device_type, enabled=False):
            yield
    finally:
        matmul.fp32_precision = old


def _cls_row(attn: nn.Module, qkv: torch.Tensor, rope: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] query attention of one block from its ``qkv`` output (B, N, 3*H*hd).

    Returns the post-softmax row ``a`` (B, H, N) in float32 or wider, and the values ``v`` (B, N, H, hd) as
    computed (bfloat16 under autocast; a view of ``qkv``).

    The scores of every head come from one batched product of the keys as they lie in ``qkv`` (B, N, H*hd) with
    [CLS]'s query laid out block-diagonally (B, H*hd, H): no copy of the keys is made, and under autocast on a GPU
    the product reads the bfloat16 keys and accumulates and returns float32 (``out_dtype``), the same sums as
    widening the keys first (measured on an H200 for ViT-L at batch 256: the widened keys, their copies and a
    matrix-vector product per head took 20 ms a batch of the trace's 23 ms over the plain pass). Eva (DINOv3):
    the q/k/v biases the attention adds after its ``qkv`` projection are added, the keys normalised where the
    attention normalises them, and the rotary embedding ``rope`` the block received turns the patch keys as the
    model turns them (the [CLS] query is a prefix token: it is not turned); these change the keys, so the keys
    are widened to float32 first.
    """
    B, N, _ = qkv.shape
    H, hd = attn.num_heads, attn.head_dim
    dtype = torch.promote_types(qkv.dtype, torch.float32)
    split = qkv.reshape(B, N, 3, H, hd)
    v = split[:, :, 2]                                         # (B, N, H, hd)
    if getattr(attn, "q_bias", None) is None and isinstance(attn.q_norm, nn.Identity) and rope is None:
        q = qkv[:, 0, :H * hd].reshape(B, H, hd, 1)            # [CLS]'s query only
        eye = torch.eye(H, dtype=q.dtype, device=q.device).reshape(1, H, 1, H)
        block = (q * eye).reshape(B, H * hd, H)                # (B, H*hd, H): head h's query in column h, zeros else
        keys = qkv[:, :, H * hd:2 * H * hd]                    # (B, N, H*hd): a view, rows 3*H*hd apart
        if dtype != qkv.dtype and qkv.is_cuda:                 # bfloat16/float16 in, float32 sums and out
            scores = torch.bmm(keys, block, out_dtype=dtype)
        else:
            scores = torch.bmm(keys.to(dtype), block.to(dtype))
        scores = (scores * attn.scale).transpose(1, 2)         # (B, H, N)
        return scores.softmax(dim=-1), v
    q = split[:, 0, 0].to(dtype)                               # (B, H, hd): [CLS]'s query only
    k = split[:, :, 1].transpose(1, 2).to(dtype)               # (B, H, N, hd)
    if getattr(attn, "q_bias", None) is not None:              # Eva with qkv bias: added outside the projection
        b = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)).reshape(3, H, hd)
        q, k, v = q + b[0].to(dtype), k + b[1, :, None].to(dtype), v + b[2].to(v.dtype)
    if not isinstance(attn.q_norm, nn.Identity):
        q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        from timm.layers.pos_embed_sincos import apply_rot_embed_cat   # what EvaAttention applies

        P = attn.num_prefix_tokens
        k = torch.cat([k[:, :, :P], apply_rot_embed_cat(k[:, :, P:], rope, half=attn.rotate_half).to(dtype)], dim=2)
    scores = (k @ (q * attn.scale).unsqueeze(-1)).squeeze(-1)  # (B, H, N)
    return scores.softmax(dim=-1), v


def _split(a: torch.Tensor, P: int, dim: int = -1) -> list[torch.Tensor]:
    """Token index ranges of [CLS], registers, patches along axis ``dim``."""
    return [a.narrow(dim, 0, 1), a.narrow(dim, 1, P - 1), a.narrow(dim, P, a.shape[dim] - P)]


class Tracer:
    """Hooks on a timm ViT that record the trace of each forward pass.

    Use as ``with Tracer(model) as t: arrays = t.run(images)``; ``arrays`` are torch tensors on the
    model's device, per image, with the keys of :data:`PER_IMAGE`.
    """

    chunk_elements = 1 << 26   # the per-patch contributions are held for this many values at a time (256 MB, float32)

    def __init__(self, model: nn.Module):
        self.model = model
        self.lay = layout(model)
        self.rec: dict[str, torch.Tensor] = {}
        self.handles: list = []
        self._separate: list = []   # Eva attentions whose qkv_bias_separate the hooks changed, with the old value
        self._consts: dict = {}     # index tensors on the device, made once per (name, device, size)

    def __enter__(self) -> "Tracer":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def _const(self, name: str, device: torch.device, n: int) -> torch.Tensor:
        """A constant index tensor of the trace on ``device`` (made once, so that no hook copies from the host)."""
        key = (name, str(device), n)
        if key not in self._consts:
            values = {"sample": lambda: patch_sample_index(n) + self.lay.num_prefix,
                      "arange": lambda: range(n),
                      "counts": lambda: [max(1, -(-k * n // 100)) for k in TOP_PERCENT]}[name]()   # ceil(k % of n)
            self._consts[key] = torch.as_tensor(list(values), dtype=torch.long, device=device)  # pragma: no mutate (GPU only)
        return self._consts[key]

    def attach(self) -> "Tracer":
        """Register the hooks (what ``with Tracer(model)`` does on entry)."""
        blocks, P = self.model.blocks, self.lay.num_prefix
        last, L = len(blocks) - 1, len(blocks)
        ropes: list = [None] * L

        def on_attn_in(i):   # Eva: the rotary embedding the block hands its attention
            def hook(_mod, _args, kwargs):
                ropes[i] = kwargs.get("rope")
            return hook

        def on_qkv(i):
            def hook(_mod, _inp, qkv):
                with own_arithmetic(qkv.device.type):
                    record(i, qkv)
            return hook

        def record(i, qkv):
            a, v = _cls_row(blocks[i].attn, qkv, ropes[i])
            if "attn_mass" not in self.rec:   # one (B, L, H, 3) array, filled block by block
                self.rec["attn_mass"] = a.new_empty(a.shape[0], L, a.shape[1], 3)
            self.rec["attn_mass"][:, i] = torch.stack([a[..., 0], a[..., 1:P].sum(-1), a[..., P:].sum(-1)], dim=-1)
            if i == last:
                self.rec["cls_attn"] = a
                av = v * a.transpose(1, 2).unsqueeze(-1)           # (B, N, H, hd): a_i v_i per head, float32
                for name, part in zip(PARTS, _split(av, P, dim=1)):
                    # sum_i a_i v_i over the part, heads concatenated (B, D)
                    self.rec[f"attn_val_{name}"] = part.sum(1).flatten(1)
                # through the projection now, while the block's values exist anyway (none is kept beyond it)
                self._project(self.rec, a[:, :, P:], av[:, P:])

        def on_block(i):
            def hook(_mod, _inp, out):
                if "cls_layers" not in self.rec:   # one (B, L, D) array, filled block by block
                    self.rec["cls_layers"] = out.new_empty(out.shape[0], L, out.shape[-1])
                self.rec["cls_layers"][:, i] = out[:, 0]
            return hook

        def on_last_in(_mod, inp):
            x = inp[0]
            self.rec["prefix_penult"] = x[:, :P].clone()
            self.rec["patch_mean_penult"] = x[:, P:].mean(dim=1)
            self.rec["patch_sample_penult"] = x[:, self._const("sample", x.device, x.shape[1] - P)]
            self.rec["token_norms_penult"] = x.to(torch.promote_types(x.dtype, torch.float32)).norm(dim=-1)

        def on_last_norm1(_mod, _inp, out):
            self.rec["prefix_penult_ln"] = out[:, :P].clone()

        def on_projection(i, which, parts):   # EVA02: q, k and v from their own projections, in this order
            fused = on_qkv(i)

            def hook(mod, inp, out):
                parts[which] = out
                if which == "v":   # the block's qkv as a fused projection would give it (B, N, 3*H*hd)
                    fused(mod, inp, torch.cat([parts.pop("q"), parts.pop("k"), parts.pop("v")], dim=-1))
            return hook

        for i, blk in enumerate(blocks):
            if blk.attn.qkv is not None:
                self.handles.append(blk.attn.qkv.register_forward_hook(on_qkv(i)))
            else:
                parts: dict = {}
                for which in "qkv":
                    proj = getattr(blk.attn, f"{which}_proj")
                    self.handles.append(proj.register_forward_hook(on_projection(i, which, parts)))
            self.handles.append(blk.register_forward_hook(on_block(i)))
            if hasattr(blk.attn, "qkv_bias_separate"):   # Eva (its rotary embedding; with a fused qkv, its bias)
                self.handles.append(blk.attn.register_forward_pre_hook(on_attn_in(i), with_kwargs=True))
                if blk.attn.qkv is not None:
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
        derive(rec)
        return rec

    def _project(self, rec: dict[str, torch.Tensor], a: torch.Tensor, av: torch.Tensor) -> None:
        """The last block's parts through the output projection and LayerScale: attn_out_* and the bias; then the
        patches' contributions from their attention ``a`` (B, H, Np) and weighted values ``av`` (B, Np, H, hd)."""
        last = self.model.blocks[-1]
        weight, bias = last.attn.proj.weight, last.attn.proj.bias
        dtype = rec["attn_val_cls"].dtype
        gamma = layer_scale(last)
        gamma = gamma.to(dtype) if gamma is not None else None  # pragma: no mutate (equivalent in float32, on the CPU)
        weight = weight.to(dtype)  # pragma: no mutate (equivalent in float32, on the CPU)
        vals = torch.stack([rec[f"attn_val_{name}"] for name in PARTS])   # (3, B, D): one product for the three
        outs = vals @ weight.T
        outs = outs * gamma if gamma is not None else outs
        for name, out in zip(PARTS, outs):
            rec[f"attn_out_{name}"] = out
        b = bias.to(dtype) if bias is not None else torch.zeros(weight.shape[0], dtype=dtype, device=weight.device)  # pragma: no mutate (equivalent in float32, on the CPU)
        self.bias = b * gamma if gamma is not None else b
        rec["attn_out_full"] = outs.sum(0) + self.bias
        self._contributions(rec, weight, gamma, a, av)

    def _contributions(self, rec: dict[str, torch.Tensor], weight: torch.Tensor, gamma: torch.Tensor | None,
                       a_all: torch.Tensor, av_all: torch.Tensor) -> None:
        """Per patch i of the last block: its contribution z_i = LayerScale(W_o (a_i v_i)) to the [CLS] output
        (``weight`` W_o (D, D), ``gamma`` the LayerScale (D,) or None; ``a_all`` (B, H, Np), ``av_all`` the
        weighted values a_i v_i (B, Np, H, hd)); its norms, its projection on the output, and the patch part
        rebuilt from the top patches of each map (a 0/1 selection of the patches times the contributions: one
        product for every map and share). The (chunk, Np, D) contributions are held for as many images as
        :attr:`chunk_elements` allows."""
        B, Np, H, hd = av_all.shape
        D = weight.shape[0]
        heads = weight.T.reshape(H, hd, D)                                   # (H, hd, D): W_o^h, transposed
        heads = heads * gamma if gamma is not None else heads
        gram = heads @ heads.transpose(1, 2)       # (H, hd, hd): ||LS(W_o^h x)||^2 = x^T gram_h x, per head
        counts = self._const("counts", a_all.device, Np).view(1, 1, -1, 1)   # (1, 1, k, 1)
        ranks = self._const("arange", a_all.device, Np)
        step = max(1, self.chunk_elements // (Np * D))
        parts: dict[str, list] = {}
        for s in range(0, B, step):
            a, av = a_all[s:s + step], av_all[s:s + step]
            c = a.shape[0]
            z = av.reshape(c, Np, H * hd) @ weight.T                         # (c, Np, D)
            got = {"contrib_norm": z.norm(dim=-1)}                           # projected, before the LayerScale
            if gamma is not None:                                            # ... and after it (in place)
                z.mul_(gamma)
            got["contrib_norm_ls"] = z.norm(dim=-1)
            got["contrib_norm_heads"] = torch.einsum("bnhd,hde,bnhe->bhn", av, gram, av).clamp_min(0).sqrt()
            y = rec["attn_out_full"][s:s + step]
            got["contrib_proj"] = (z * (y / y.norm(dim=-1, keepdim=True)).unsqueeze(1)).sum(-1)
            maps = torch.stack([a.mean(dim=1), got["contrib_norm_ls"], got["contrib_proj"]], dim=1)   # (c, 3, Np)
            order = maps.argsort(dim=-1, descending=True)
            rank = torch.empty_like(order).scatter_(-1, order, ranks.expand_as(order))   # each patch's place
            chosen = (rank.unsqueeze(2) < counts).to(z.dtype).flatten(1, 2)   # (c, 3 maps x k shares, Np) of 0/1
            rebuilt = chosen @ z                                             # (c, 3 x k, D)
            for j, key in enumerate(SELECTED):
                got[key] = rebuilt[:, j]
            for key, value in got.items():
                parts.setdefault(key, []).append(value)
        rec.update({key: values[0] if len(values) == 1 else torch.cat(values) for key, values in parts.items()})


def trace_batch(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Trace one batch; also returns ``attn_out_bias`` (D,)."""
    with Tracer(model) as t:
        rec = t.run(images)
        rec["attn_out_bias"] = t.bias
    return rec


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
