"""Every quantity of the trace equals what timm computes, in float64, on five ViT families and on DINOv3 (timm's
Eva: rotary embedding, a qkv bias added after the projection, SwiGLU)."""
import numpy as np
import pytest
import torch
from timm.layers.pos_embed_sincos import apply_rot_embed_cat

from helpers import FAMILIES, images, tiny
from regcls.models import layout
from regcls.runner import run_trace
from regcls.trace import trace_batch, trace_meta
from regcls.tracefile import MAPS, PARTS, STORED, TOP_PERCENT, load_trace, per_image_shapes, save_trace

TOL = dict(rtol=1e-8, atol=1e-8)


def layer_scale(blk, y):
    """The attention branch's LayerScale, written out per family (timm's ViT: ``ls1``; Eva: ``gamma_1``)."""
    return blk.ls1(y) if hasattr(blk, "ls1") else y * blk.gamma_1 if blk.gamma_1 is not None else y


def reference(model, x):
    """Independent ground truth: timm's own intermediate tensors, and an explicit unfused attention."""
    blocks, P = model.blocks, model.num_prefix_tokens
    got, handles = {"in": [], "rope": [], "branch": None, "post": None, "out": []}, []
    for blk in blocks:
        handles.append(blk.register_forward_pre_hook(lambda m, a, k: got["in"].append(a[0]) or
                                                     got["rope"].append(k.get("rope")), with_kwargs=True))
        handles.append(blk.register_forward_hook(lambda m, a, o: got["out"].append(o)))
    last = blocks[-1]
    handles.append(last.attn.register_forward_hook(lambda m, a, o: got.__setitem__("branch", layer_scale(last, o))))
    handles.append(last.norm2.register_forward_pre_hook(lambda m, a: got.__setitem__("post", a[0])))
    with torch.no_grad():
        feats = model.forward_features(x)
    for h in handles:
        h.remove()

    def explicit_attention(blk, xin, rope):
        a = blk.attn
        B, N, D = xin.shape
        if a.qkv is None:   # EVA02: separate projections
            h = blk.norm1(xin)
            qkv = torch.cat([a.q_proj(h), a.k_proj(h), a.v_proj(h)], dim=-1)
        else:
            bias = torch.cat((a.q_bias, a.k_bias, a.v_bias)) if getattr(a, "q_bias", None) is not None else a.qkv.bias
            qkv = torch.nn.functional.linear(blk.norm1(xin), a.qkv.weight, bias)
        qkv = qkv.reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = a.q_norm(qkv[0]), a.k_norm(qkv[1]), qkv[2]
        if rope is not None:   # Eva: the patch queries and keys turned, the prefix tokens not
            q, k = (torch.cat([t[:, :, :P], apply_rot_embed_cat(t[:, :, P:], rope, half=a.rotate_half)], dim=2)
                    for t in (q, k))
        scores = (q @ k.transpose(-2, -1)) * a.scale
        A = torch.exp(scores - scores.amax(-1, keepdim=True))
        return A / A.sum(-1, keepdim=True), v                         # (B, H, N, N), (B, H, N, hd)

    with torch.no_grad():
        rows = [explicit_attention(b, xi, r)[0][:, :, 0] for b, xi, r in zip(blocks, got["in"], got["rope"])]
        A, v = explicit_attention(last, got["in"][-1], got["rope"][-1])
        a0 = A[:, :, 0]                                                 # (B, H, N)
        masks = {"cls": slice(0, 1), "reg": slice(1, P), "patch": slice(P, None)}
        vals = {}
        for name, sl in masks.items():
            am = torch.zeros_like(a0)
            am[..., sl] = a0[..., sl]
            vals[name] = torch.einsum("bhn,bhnd->bhd", am, v).flatten(1)
        full_val = torch.einsum("bhn,bhnd->bhd", a0, v).flatten(1)
        manual_branch = layer_scale(last, last.attn.proj(full_val))
        # each patch's contribution, one patch at a time: heads concatenated, projected (no bias), LayerScale
        u = torch.stack([(a0[:, :, i, None] * v[:, :, i]).flatten(1) for i in range(P, a0.shape[-1])], dim=1)
        z = u @ last.attn.proj.weight.T
    return dict(feats=feats, rows=rows, vals=vals, full_val=full_val, manual_branch=manual_branch, a0=a0, v=v, z=z,
                zl=layer_scale(last, z), **got)


@pytest.fixture(scope="module", params=list(FAMILIES))
def case(request):
    model = tiny(request.param)
    x = images(model)
    with torch.no_grad():
        tr = trace_batch(model, x)
    return request.param, model, x, tr, reference(model, x)


def close(a, b):
    torch.testing.assert_close(a, b, **TOL)


def test_each_projected_part_equals_the_explicit_masked_attention(case):
    """attn_out_* of each part: the explicit masked values through the output projection (no bias), LayerScale."""
    _, model, _, tr, ref = case
    last = model.blocks[-1]
    with torch.no_grad():
        for name in PARTS:
            close(tr[f"attn_out_{name}"], layer_scale(last, torch.nn.functional.linear(ref["vals"][name],
                                                                                       last.attn.proj.weight)))
        close(tr["attn_out_bias"], layer_scale(last, last.attn.proj.bias))


def test_full_equals_timm_attention_branch(case):
    _, _, _, tr, ref = case
    close(tr["attn_out_full"], ref["branch"][:, 0])       # timm's fused forward
    close(tr["attn_out_full"], ref["manual_branch"])      # explicit unfused attention


def test_values_equal_explicit_masked_attention(case):
    _, _, _, tr, ref = case
    for name in PARTS:
        close(tr[f"attn_val_{name}"], ref["vals"][name])
    close(tr["attn_val_cls"] + tr["attn_val_reg"] + tr["attn_val_patch"], ref["full_val"])


def test_per_patch_contributions_and_the_outputs_rebuilt_from_the_top_patches(case):
    """Kobayashi et al.'s contribution norms, their projection on the output, and the patch part rebuilt from the
    top patches of each map, against the contributions written out one patch at a time."""
    _, model, _, tr, ref = case
    P = model.num_prefix_tokens
    z, zl = ref["z"], ref["zl"]
    close(zl.sum(dim=1), tr["attn_out_patch"])                       # the contributions add up to the patch part
    close(tr["contrib_norm"], z.norm(dim=-1))
    close(tr["contrib_norm_ls"], zl.norm(dim=-1))
    last, hd = model.blocks[-1], model.blocks[-1].attn.head_dim
    with torch.no_grad():   # each head alone: its columns of the output projection, then the LayerScale
        per_head = torch.stack([layer_scale(last, torch.einsum("bn,bnd,ed->bne", ref["a0"][:, h, P:], ref["v"][:, h, P:],
                                                                last.attn.proj.weight[:, h * hd:(h + 1) * hd]))
                                .norm(dim=-1) for h in range(last.attn.num_heads)], dim=1)
    close(tr["contrib_norm_heads"], per_head)
    y = ref["branch"][:, 0]
    proj = (zl * (y / y.norm(dim=-1, keepdim=True))[:, None]).sum(-1)
    close(tr["contrib_proj"], proj)
    close(proj.sum(1) + sum((tr[f"attn_out_{p}"] * y).sum(-1) / y.norm(dim=-1) for p in ("cls", "reg"))
          + (tr["attn_out_bias"] * y).sum(-1) / y.norm(dim=-1), y.norm(dim=-1))   # the projections add to the norm
    maps = {"attn": ref["a0"][:, :, P:].mean(dim=1), "norm": zl.norm(dim=-1), "proj": proj}
    assert set(maps) == set(MAPS)
    Np = z.shape[1]
    for name, m in maps.items():
        for k in TOP_PERCENT:
            top = m.argsort(dim=1, descending=True)[:, :max(1, int(np.ceil(k * Np / 100)))]
            close(tr[f"rebuilt_{name}_{k}"], torch.stack([zl[b, top[b]].sum(0) for b in range(len(zl))]))


def test_skip_plus_branch_is_post_attention_state(case):
    _, _, _, tr, ref = case
    close(tr["skip"], ref["in"][-1][:, 0])
    close(tr["skip"] + tr["attn_out_full"], ref["post"][:, 0])


def test_cls_layers_and_final_match_timm(case):
    _, model, _, tr, ref = case
    for i, out in enumerate(ref["out"]):
        close(tr["cls_layers"][:, i], out[:, 0])
    close(tr["cls_final"], ref["feats"][:, 0])


def test_cls_attention_equals_unfused_softmax(case):
    _, model, _, tr, ref = case
    P = model.num_prefix_tokens
    close(tr["cls_attn"], ref["rows"][-1])
    for i, row in enumerate(ref["rows"]):
        expect = torch.stack([row[..., :1].sum(-1), row[..., 1:P].sum(-1), row[..., P:].sum(-1)], -1)
        close(tr["attn_mass"][:, i], expect)
    np.testing.assert_allclose(tr["attn_mass"].sum(-1).numpy(), 1.0, rtol=0, atol=1e-12)


def test_penultimate_tokens(case):
    _, model, _, tr, ref = case
    P = model.num_prefix_tokens
    xin = ref["in"][-1]
    close(tr["prefix_penult"], xin[:, :P])
    close(tr["prefix_penult_ln"], model.blocks[-1].norm1(xin)[:, :P])
    close(tr["token_norms_penult"], xin.norm(dim=-1))
    close(tr["patch_mean_penult"], xin[:, P:].mean(dim=1))
    from regcls.tracefile import patch_sample_index
    idx = patch_sample_index(xin.shape[1] - P)
    close(tr["patch_sample_penult"], xin[:, P + idx])


def test_shapes(case):
    family, model, x, tr, _ = case
    n, L, H, D = x.shape[0], len(model.blocks), model.blocks[0].attn.num_heads, model.embed_dim
    N = model.num_prefix_tokens + model.patch_embed.num_patches
    assert tr["cls_attn"].shape == (n, H, N)
    assert tr["attn_mass"].shape == (n, L, H, 3)
    assert tr["cls_layers"].shape == (n, L, D)
    assert tr["prefix_penult"].shape == (n, model.num_prefix_tokens, D)
    assert (layout(model).num_registers == 4) == (family in ("dinov2_reg4", "dinov3", "dinov3_qkvb", "dinov3_swiglu"))


def test_the_file_stores_each_array_once_and_reads_the_skip_term_back(tmp_path):
    model = tiny("dinov2_reg4")
    x = images(model, n=4)
    meta = trace_meta(model, model="tiny", weights="random", dataset="noise", img_size=x.shape[-1])
    out = run_trace(model, x, list("abcd"), out=tmp_path / "t.npz", meta=meta, batch_size=2, progress=False)
    with np.load(out) as z:
        stored = set(z.files)
    assert stored == {*STORED, "attn_out_bias", "image_ids", "meta_json"}   # no skip, metadata once (its JSON)
    tr, ref = load_trace(out), trace_batch(model, x)
    np.testing.assert_allclose(tr["skip"], ref["skip"].numpy(), rtol=1e-6, atol=1e-6)
    close(ref["skip"], reference(model, x)["in"][-1][:, 0])
    assert tr.meta["model"] == "tiny" and tr.num_registers == 4
    shapes = per_image_shapes(layout(model))                          # what the disk estimate counts
    assert {k: tr[k].shape[1:] for k in STORED} == shapes
    part = load_trace(out, keys=["cls_final", "skip"])                  # only what a reader needs
    assert set(part) == {"cls_final", "prefix_penult", "skip", "image_ids", "meta"}
    np.testing.assert_array_equal(part["skip"], tr["skip"])
    save_trace(tmp_path / "again.npz", {k: v for k, v in tr.items() if k != "meta"}, tr.meta)   # still once
    with np.load(tmp_path / "again.npz") as z:
        assert set(z.files) == stored


@pytest.mark.parametrize("family", ["dinov2_reg4", "dinov3_qkvb"])
def test_trace_keeps_fused_attention(monkeypatch, family):
    """One fused attention call per block during a trace: the trace never falls back to explicit N x N."""
    model = tiny(family, dtype=torch.float32)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(*a, **k):
        calls.append(a[0].shape)
        return sdpa(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    with torch.no_grad():
        trace_batch(model, images(model, dtype=torch.float32))
    assert len(calls) == len(model.blocks)


@pytest.mark.parametrize("family", ["qknorm", "dinov2_reg4"])
def test_bfloat16_autocast_keeps_the_traces_own_arithmetic_in_float32(family):
    """Under bfloat16 autocast the model computes q, k, v in bfloat16; the trace's own products (the [CLS] row,
    the parts' values, the projection) run in float32 on what the model computed: the attention row equals a
    float64 softmax of the same bfloat16 q and k to float32 precision, and each projected part its float32
    projection (with LayerScale where the family has it)."""
    import copy

    model = tiny(family, dtype=torch.float32)
    x = images(model, dtype=torch.float32)
    last = model.blocks[-1]
    qkvs = []
    h = last.attn.qkv.register_forward_hook(lambda m, a, o: qkvs.append(o))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        tr = trace_batch(model, x)
    h.remove()
    assert qkvs[0].dtype == torch.bfloat16
    for key in ("cls_attn", "attn_mass", "attn_val_patch", "attn_out_patch", "attn_out_full", "token_norms_penult"):
        assert tr[key].dtype == torch.float32, key
    a = last.attn
    B, N, _ = qkvs[0].shape
    qkv = qkvs[0].reshape(B, N, 3, a.num_heads, a.head_dim).double()
    with torch.no_grad():
        q = copy.deepcopy(a.q_norm).double()(qkv[:, 0, 0])                     # (B, H, hd)
        k = copy.deepcopy(a.k_norm).double()(qkv[:, :, 1]).transpose(1, 2)     # (B, H, N, hd)
        want = torch.einsum("bhd,bhnd->bhn", q * a.scale, k).softmax(-1)
        torch.testing.assert_close(tr["cls_attn"].double(), want, rtol=0, atol=2e-6)
        gamma = last.ls1.gamma if hasattr(last.ls1, "gamma") else 1.0
        torch.testing.assert_close(tr["attn_out_patch"], (tr["attn_val_patch"] @ a.proj.weight.T) * gamma,
                                   rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(tr["attn_mass"].sum(-1).numpy(), 1.0, atol=1e-6)   # a float32 softmax


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the bfloat16 x bfloat16 -> float32 product is CUDA's")
def test_on_a_gpu_the_cls_row_from_bfloat16_keys_equals_the_widened_keys():
    """On CUDA the [CLS] scores come from the bfloat16 keys with float32 sums and output (``bmm(out_dtype=)``):
    the same row as widening the keys first, to float32 precision (an H200 gave 4.7e-10)."""
    from regcls.trace import _cls_row, own_arithmetic

    model = tiny("dinov2_reg4", dtype=torch.float32).cuda()
    seen = []
    h = model.blocks[0].attn.qkv.register_forward_hook(lambda m, a, o: seen.append(o))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model.forward_features(images(model, dtype=torch.float32).cuda())
    h.remove()
    a, qkv = model.blocks[0].attn, seen[0]
    assert qkv.dtype == torch.bfloat16
    with torch.no_grad(), own_arithmetic("cuda"):
        got, _ = _cls_row(a, qkv)
        B, N, _ = qkv.shape
        s = qkv.reshape(B, N, 3, a.num_heads, a.head_dim).double()
        want = (s[:, :, 1].transpose(1, 2) @ (s[:, 0, 0] * a.scale).unsqueeze(-1)).squeeze(-1).softmax(-1)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6)


def test_a_dinov3_model_runs_as_before_after_a_trace():
    """The trace lets Eva add its qkv bias after the projection while it is attached (so that its hook sees the
    projection); detached, the model computes as before, and the bf16 check reads Eva's LayerScale."""
    from regcls.precision import amp_agreement
    from regcls.trace import Tracer

    model = tiny("dinov3_qkvb", dtype=torch.float32)
    x = images(model, dtype=torch.float32)
    with torch.no_grad():
        before = model.forward_features(x)
        with Tracer(model):
            assert all(b.attn.qkv_bias_separate for b in model.blocks)
        assert not any(b.attn.qkv_bias_separate for b in model.blocks)
        torch.testing.assert_close(model.forward_features(x), before, rtol=0, atol=0)
    check = amp_agreement(model, x)
    assert check["identity_fp32"] < 1e-5 and check["identity_bf16"] < 5e-2
