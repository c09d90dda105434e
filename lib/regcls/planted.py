"""Planted models: small ViTs in the DINOv2 architecture whose weights are set, not learned, so that each
analysis has a known answer. They are controls for the analysis code, not evidence about DINOv2.

Every kind starts from variance-preserving random weights (seeded), with LayerScale set per block, and
then fixes the last block:

``patch_integrator`` (negative control, with or without registers)
    The last block's queries are zero, so the [CLS] attends uniformly: the patch share is P_patch / N
    (> 0.9 at the smoke grid), the register share R / N. Its attention update is large against the skip
    term. Expected: patch share > 0.9; patch-only CKA > 0.9; skip norm < patch-part norm; the [CLS]
    jumps at the last block (cosine of the penultimate to the final [CLS] < 0.9).
``register_reader`` (positive control, needs registers)
    Registers carry a constant in reserved dimensions E that no block writes to; the last block's keys
    read E and its [CLS] query is a constant, so the [CLS] attends to the registers. Register ``HIGH``
    also carries huge image-independent values in reserved dimensions O (a high-norm register) which the
    last block's LayerNorm weight scales down; its other dimensions carry image content from earlier
    blocks. The query strength grows with the width (``Q_READ`` x embed_dim), so that the wider the model,
    the less its patch part counts (the paper's "collapses as size grows"). Expected: register share > 0.95; the patch part's variation < 0.1 x the full output's;
    patch-only CKA < 0.3 at the largest smoke size (built: 0.18);
    register-only CKA > 0.95 and > patch-only CKA + 0.1; one-shot accuracy near chance from the patch-only
    output, far above it from the register-only output; the same register has the highest norm for every
    image (> 3x the next token), its cosine across images > 0.99, its top dimensions shrink > 100x after the
    LayerNorm, and a linear probe still reads the image class from it.
``skip_dominated`` (positive control, no registers)
    LayerScale shrinks along the depth and is tiny in the last block, so the skip term dominates and the
    [CLS] converges smoothly. The last block's values read only reserved position dimensions (written by the
    patches' position embedding alone, value weights summing to zero over them, so LayerNorm's mean does not
    leak in): the patch part says where the attention falls, not what the image holds. Expected: skip norm >
    100 x patch-part norm; cosine of the penultimate to the final [CLS] > 0.99; CKA of the standard output
    with the skip-only output > 0.99 and with the patch-only output < 0.5. (Built at the smoke sizes: the skip norm
    is over 11,000 times the patch part's on every image; the tests pin 5,000.)
``outlier_neurons`` (known answer for test-time registers, no registers needed)
    Block ``OUTLIER_BLOCK``'s MLP units ``OUTLIER_UNITS`` fire, hugely, on the patches at ``OUTLIER_PATCHES`` only
    (their position embedding carries a marker in reserved dimensions that nothing else writes) and write into
    reserved dimensions O that nothing else writes: those patches become high-norm outliers, as DINOv2 without
    registers makes them. Expected: :func:`regcls.testtime.find_outlier_neurons` with ``top_k=2`` finds exactly
    those units (the published search, with an absolute threshold of the planted scale,
    :data:`regcls.profiles.PLANTED_THRESHOLD`, for DINOv2-L's 150); without a test-time register an outlier patch
    has the highest norm entering the last block, with one the test-time register has it, and no patch is an
    outlier any more.
``constant_registers`` (known answer for the replacement controls, needs registers)
    A patch integrator (uniform last-block attention) whose registers carry a huge constant in reserved
    dimensions E that nothing else writes, and whose last-block values read E strongly: the register part of the
    [CLS] output is a large offset, the same for every image up to a trace of image content. Expected: replacing
    it by its mean keeps the output (CKA > 0.99, one-shot accuracy unchanged); zeroing it keeps CKA (which centres)
    but not the one-shot accuracy of a classifier trained on unaltered outputs. The register reader is the
    opposite control: its registers carry the image, so every replacement hurts.
``equal_values`` / ``unequal_values`` (known answers for the maps of the [CLS])
    The last block's heads share one query and key map (so each patch gets the same attention in every head)
    and its value and output projections are orthogonal, so every token's value reaches the output with the
    same norm: a patch's contribution ||W_o a_i v_i|| is its attention times a constant, and the attention and
    contribution maps rank the patches alike (Spearman 1). In ``unequal_values`` every patch position carries a
    marker of its own strength (uniform in 0-1.5, seeded) in reserved dimensions that only the position embedding
    writes and only the last block's values read, and its queries are weak (attention varies mildly): value
    norms differ tens of times across the patches, independently of the attention, and the two maps disagree
    (Spearman < 0.5).
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import RegclsError

KINDS = ("patch_integrator", "register_reader", "skip_dominated", "outlier_neurons", "constant_registers",
         "equal_values", "unequal_values")
SEEDS = {"patch_integrator": 11, "register_reader": 12, "skip_dominated": 13, "outlier_neurons": 14,
         "constant_registers": 15, "equal_values": 16, "unequal_values": 16}
HIGH = 2           # index of the high-norm register among the registers
N_RESERVED = 4     # size of each reserved set of dimensions (O: outliers, E: register marker)
Q_READ = 0.005     # query strength of the register reader per embedding dimension: how far the patches are ignored
OUTLIER_BLOCK = 1            # outlier_neurons: the block whose MLP makes the outliers ...
OUTLIER_UNITS = (5, 17)      # ... its units that do ...
OUTLIER_PATCHES = (2, 7)     # ... and the patches (raster order) that become outliers
CONSTANT_MARKER = 300.0      # constant_registers: the registers' constant in E ...
CONSTANT_READ = 1.0          # ... and how strongly the last block's values read it


def _reinit(model: nn.Module, gen: torch.Generator) -> None:
    """Variance-preserving weights (std 1/sqrt(fan_in)), zero biases, unit LayerNorms, random tokens."""
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * mod.weight.shape[1] ** -0.5)
            if mod.bias is not None:
                mod.bias.zero_()
        elif isinstance(mod, nn.LayerNorm):
            mod.weight.fill_(1.0)
            if mod.bias is not None:
                mod.bias.zero_()
        elif isinstance(mod, nn.Conv2d):
            fan_in = mod.weight[0].numel()
            mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * fan_in ** -0.5)
            if mod.bias is not None:
                mod.bias.zero_()
    for name in ("cls_token", "reg_token", "pos_embed"):
        p = getattr(model, name, None)
        if p is not None:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def layer_scales(blk: nn.Module) -> tuple:
    """A block's LayerScale of the attention and the MLP branch (D,) each: timm's ViT keeps them in ``ls1``/``ls2``,
    Eva (DINOv3's layout) in ``gamma_1``/``gamma_2``; ``(None, None)`` without LayerScale."""
    if hasattr(blk, "ls1"):
        return getattr(blk.ls1, "gamma", None), getattr(blk.ls2, "gamma", None)
    return getattr(blk, "gamma_1", None), getattr(blk, "gamma_2", None)


def _layerscale(model: nn.Module, attn: list[float], mlp: list[float]) -> None:
    for blk, a, m in zip(model.blocks, attn, mlp):
        g1, g2 = layer_scales(blk)
        g1.fill_(a)
        g2.fill_(m)


def _query_bias(attn: nn.Module) -> torch.Tensor | None:
    """The bias of the queries (H*hd,): the first third of timm's qkv bias, or Eva's ``q_bias``; None without."""
    if getattr(attn, "q_bias", None) is not None:
        return attn.q_bias
    return attn.qkv.bias[: attn.qkv.weight.shape[1]] if attn.qkv.bias is not None else None


def plant(model: nn.Module, kind: str) -> nn.Module:
    """Set the weights of a timm DINOv2-style ViT or a DINOv3-style Eva (with LayerScale) to a planted control,
    in place."""
    if kind not in KINDS:
        raise RegclsError(f"unknown planted kind {kind!r}; known: {', '.join(KINDS)}")
    if layer_scales(model.blocks[0])[0] is None:
        raise RegclsError("planted models need LayerScale (a DINOv2- or DINOv3-style ViT)")
    gen = torch.Generator().manual_seed(SEEDS[kind])
    L, D = len(model.blocks), model.embed_dim
    last = model.blocks[-1]
    with torch.no_grad():
        _reinit(model, gen)
        if kind == "patch_integrator":
            _layerscale(model, [0.3] * (L - 1) + [4.0], [0.3] * (L - 1) + [0.05])
            q = last.attn.qkv
            q.weight[:D].zero_()     # zero queries: every token attends uniformly
        elif kind == "skip_dominated":
            decay = [1.0 / (1 + l) ** 1.5 for l in range(L)]
            _layerscale(model, decay[:-1] + [0.002], decay[:-1] + [0.002])
            _position_only_values(model, D)
        elif kind == "register_reader":
            reg = getattr(model, "reg_token", None)
            if reg is None or reg.shape[1] < HIGH + 1:
                raise RegclsError("register_reader needs at least 3 registers")
            if _query_bias(last.attn) is None:
                raise RegclsError("register_reader needs a query bias (for DINOv3, the _qkvb models)")
            _plant_register_reader(model, L, D)
        elif kind == "constant_registers":
            if getattr(model, "reg_token", None) is None:
                raise RegclsError("constant_registers needs registers")
            _layerscale(model, [0.3] * (L - 1) + [4.0], [0.3] * (L - 1) + [0.05])
            _plant_constant_registers(model, D)
        elif kind in ("equal_values", "unequal_values"):
            if getattr(model, "pos_embed", None) is None:
                raise RegclsError(f"{kind} needs an absolute position embedding (a DINOv2-style ViT)")
            _layerscale(model, [0.3] * L, [0.3] * L)
            _plant_values(model, D, gen, unequal=kind == "unequal_values")
        elif kind == "outlier_neurons":
            if getattr(model, "pos_embed", None) is None:
                raise RegclsError("outlier_neurons needs an absolute position embedding (a DINOv2-style ViT)")
            _layerscale(model, [0.3] * L, [0.3] * L)
            _plant_outlier_neurons(model, D)
    return model.eval()


def _position_only_values(model: nn.Module, D: int) -> None:
    """The last block's values read only the last ``2 * N_RESERVED`` dimensions, which only the patches' position
    embedding writes (no token, block or patch projection does)."""
    pos = torch.arange(D - 2 * N_RESERVED, D)
    model.patch_embed.proj.weight[pos] = 0.0
    if model.patch_embed.proj.bias is not None:
        model.patch_embed.proj.bias[pos] = 0.0
    for name in ("cls_token", "reg_token"):
        if getattr(model, name, None) is not None:
            getattr(model, name)[..., pos] = 0.0
    prefix_positions = model.pos_embed.shape[1] - model.patch_embed.num_patches   # 1 when [CLS] has a position
    model.pos_embed[:, :prefix_positions, pos] = 0.0
    for blk in model.blocks:
        for lin in (blk.attn.proj, blk.mlp.fc2):
            lin.weight[pos] = 0.0
            if lin.bias is not None:
                lin.bias[pos] = 0.0
    v = model.blocks[-1].attn.qkv.weight[2 * D:]     # (D, D) value weights
    others = torch.ones(D, dtype=torch.bool)
    others[pos] = False
    v[:, others] = 0.0
    v[:, pos] -= v[:, pos].mean(dim=1, keepdim=True)  # zero sum over pos: LayerNorm's mean term drops out


def _reserve(model: nn.Module, dims: torch.Tensor) -> None:
    """Nothing writes ``dims``: zero in the [CLS], register and position embeddings, the patch embedding, and every
    block's attention and MLP outputs (a planted kind then writes them where it wants them)."""
    for name in ("cls_token", "reg_token", "pos_embed"):
        if getattr(model, name, None) is not None:
            getattr(model, name)[..., dims] = 0.0
    for lin in (model.patch_embed.proj, *(m for blk in model.blocks for m in (blk.attn.proj, blk.mlp.fc2))):
        lin.weight[dims] = 0.0
        if lin.bias is not None:
            lin.bias[dims] = 0.0


def _plant_outlier_neurons(model: nn.Module, D: int) -> None:
    O = torch.arange(0, N_RESERVED)                 # where the outlier units write
    M = torch.arange(N_RESERVED, 2 * N_RESERVED)    # the marker of the outlier patches' positions
    _reserve(model, torch.cat([O, M]))               # nothing writes O or M ...
    first = model.pos_embed.shape[1] - model.patch_embed.num_patches   # 1 when [CLS] has a position
    for p in OUTLIER_PATCHES:
        model.pos_embed[0, first + p, M] = 3.0
    mlp = model.blocks[OUTLIER_BLOCK].mlp
    for u in OUTLIER_UNITS:                          # ... but these units, which read M only
        mlp.fc1.weight[u] = 0.0
        mlp.fc1.weight[u, M] = 10.0
        mlp.fc1.bias[u] = -5.0
        mlp.fc2.weight[O, u] = 2.0


def _plant_values(model: nn.Module, D: int, gen: torch.Generator, unequal: bool) -> None:
    last = model.blocks[-1]
    qkv, H, hd = last.attn.qkv, last.attn.num_heads, last.attn.head_dim
    for h in range(1, H):                            # every head: the first head's queries and keys
        for base in (0, D):
            qkv.weight[base + h * hd: base + (h + 1) * hd] = qkv.weight[base: base + hd]
    qkv.weight[2 * D:] = torch.linalg.qr(torch.randn(D, D, generator=gen))[0]   # orthogonal values ...
    last.attn.proj.weight.copy_(torch.linalg.qr(torch.randn(D, D, generator=gen))[0])   # ... and output
    if not unequal:
        return
    M = torch.arange(N_RESERVED, 2 * N_RESERVED)
    _reserve(model, M)
    first = model.pos_embed.shape[1] - model.patch_embed.num_patches
    strength = torch.rand(model.patch_embed.num_patches, 1, generator=gen) * 1.5   # small: LayerNorm stays linear
    model.pos_embed[0, first:, M] = strength          # each patch position its own marker strength
    qkv.weight[: 2 * D, M] = 0.0                     # attention does not see it (and varies mildly) ...
    qkv.weight[:D] *= 0.05
    qkv.weight[2 * D:, M] = 10.0                     # ... the values do, strongly


def _plant_constant_registers(model: nn.Module, D: int) -> None:
    E = torch.arange(N_RESERVED, 2 * N_RESERVED)
    _reserve(model, E)
    model.reg_token[..., E] = CONSTANT_MARKER
    qkv = model.blocks[-1].attn.qkv
    qkv.weight[:D].zero_()                           # zero queries: uniform attention, the same on every image
    qkv.weight[2 * D:, E] = CONSTANT_READ            # the values read the registers' constant


def _plant_register_reader(model: nn.Module, L: int, D: int) -> None:
    O = torch.arange(0, N_RESERVED)                 # outlier dimensions of the high-norm register
    E = torch.arange(N_RESERVED, 2 * N_RESERVED)    # register marker dimensions
    reserved = torch.cat([O, E])
    _layerscale(model, [0.3] * (L - 1) + [4.0], [0.3] * (L - 1) + [0.05])
    # Nothing but the registers carries the reserved dimensions, and no block writes into them.
    for p in (model.cls_token, model.pos_embed):
        if p is not None:   # DINOv3 has no absolute position embedding (rotary only)
            p[..., reserved] = 0.0
    model.patch_embed.proj.weight[reserved] = 0.0
    model.reg_token[..., reserved] = 0.0
    model.reg_token[..., E] = 3.0
    model.reg_token[0, HIGH, O] = 60.0
    for blk in model.blocks:
        blk.attn.proj.weight[reserved] = 0.0
        blk.mlp.fc2.weight[reserved] = 0.0
    last = model.blocks[-1]
    last.norm1.weight[O] = 0.01                      # LayerNorm scales the outliers down before attention
    qkv = last.attn.qkv
    H, hd = last.attn.num_heads, last.attn.head_dim
    qkv.weight[: 2 * D].zero_()                      # queries and keys: rebuilt below
    _query_bias(last.attn)[:] = Q_READ * D           # constant [CLS] (and every) query
    for h in range(H):                               # every key coordinate of every head reads the marker
        qkv.weight[D + h * hd: D + (h + 1) * hd, E] = 1.0
