"""Tiny random ViTs of several timm families, with weights large enough that every block matters."""
import timm
import torch

from regcls.planted import _reinit, layer_scales

TINY = dict(embed_dim=32, depth=3, num_heads=2, num_classes=0)
# ``regcls trace`` of a tiny random DINOv2-style model at 56 px (the command-line tests)
TINY_CLI = ["--model", "vit_small_patch14_reg4_dinov2", "--random", "--set", "embed_dim=48", "--set", "depth=2",
            "--set", "num_heads=3", "--img-size", "56", "--quiet"]
FAMILIES = {  # name -> (timm arch, overrides)
    "dinov2_reg4": ("vit_small_patch14_reg4_dinov2", dict(img_size=56)),
    "dinov2": ("vit_small_patch14_dinov2", dict(img_size=56)),
    "deit3": ("deit3_small_patch16_224", dict(img_size=48)),
    "clip": ("vit_base_patch16_clip_224", dict(img_size=48)),
    "qknorm": ("vit_small_patch16_224", dict(img_size=48, qk_norm=True)),  # no DINOv2 uses it, other ViTs do
    # DINOv3 (timm's Eva): rotary embedding on the patches, 4 registers, gamma_1 LayerScale; with a qkv bias added
    # outside the projection (qkvb), and with a SwiGLU MLP (S+, H+)
    "dinov3": ("vit_small_patch16_dinov3", dict(img_size=48)),
    "dinov3_qkvb": ("vit_small_patch16_dinov3_qkvb", dict(img_size=48)),
    "dinov3_swiglu": ("vit_huge_plus_patch16_dinov3", dict(img_size=48)),
    # EVA02 (timm's Eva with separate q, k, v projections, rotary embedding on every patch, no LayerScale)
    "eva02": ("eva02_large_patch14_448", dict(img_size=56)),
}


def tiny(family: str, seed: int = 0, dtype=torch.float64):
    arch, kw = FAMILIES[family]
    model = timm.create_model(arch, pretrained=False, **TINY, **kw)
    with torch.no_grad():
        _reinit(model, torch.Generator().manual_seed(seed))
        for blk in model.blocks:
            for gamma in layer_scales(blk):   # timm's ViT (ls1, ls2) or Eva (gamma_1, gamma_2)
                if gamma is not None:
                    gamma.uniform_(0.2, 1.0)
            for proj in (blk.attn.qkv,) if blk.attn.qkv is not None else (blk.attn.q_proj, blk.attn.k_proj, blk.attn.v_proj):
                if proj.bias is not None:
                    proj.bias.normal_(0, 0.1)
            if getattr(blk.attn, "q_bias", None) is not None:   # Eva's biases, added after the projection
                blk.attn.q_bias.normal_(0, 0.3)
                blk.attn.v_bias.normal_(0, 0.3)
            blk.attn.proj.bias.normal_(0, 0.1)
            for norm in (blk.attn.q_norm, blk.attn.k_norm):
                if isinstance(norm, torch.nn.LayerNorm):
                    norm.weight.uniform_(0.5, 1.5)
                    norm.bias.normal_(0, 0.3)
    return model.to(dtype).eval()


def images(model, n=3, seed=0, dtype=torch.float64):
    s = model.patch_embed.img_size
    return torch.randn(n, 3, *s, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def random_png_folder(folder, n: int, seed: int, name: str = "im{:03d}.png"):
    """``n`` random 64 x 64 RGB PNG files in ``folder`` (made if missing); returns the folder."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / name.format(i))
    return folder


def sklearn_probe(X, y, seed: int = 0, test_size: float = 0.3, Cs=(0.01, 0.1, 1.0, 10.0)) -> tuple[float, float]:
    """The oracle for ``regcls.probe.linear_probe``: its protocol in scikit-learn, written out C by C (stratified
    split, StandardScaler + LogisticRegression, C of the best mean cross-validated accuracy). Returns
    (held-out accuracy, C)."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score, train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=test_size, random_state=seed, stratify=y)
    cv = StratifiedKFold(max(2, min(3, int(np.bincount(ytr).min()))), shuffle=True, random_state=seed)

    def pipe(C):
        return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=3000))

    scores = [cross_val_score(pipe(C), Xtr, ytr, cv=cv).mean() for C in Cs]
    C = Cs[int(np.argmax(scores))]
    return float(pipe(C).fit(Xtr, ytr).score(Xte, yte)), float(C)
