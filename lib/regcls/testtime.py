"""Changes to the forward pass at test time: registers added (Jiang et al., "Vision Transformers Don't Need Trained
Registers", NeurIPS 2025), and registers fixed to their mean (Fix-Reg-Mean; :class:`FixedRegisters`).

A model trained without registers writes its global scratch values into a few patch tokens ("high-norm outliers"),
and a handful of MLP neurons make them. The method adds one token at test time, a zero vector after the position
embedding (so it carries none), and in listed blocks moves those neurons' activation into it: per image, ``s`` is
the signed maximum (the max or the min, whichever is larger in magnitude) of the listed neurons' activations
(input of ``mlp.fc2``; (B, N, hidden)) over all tokens and all listed neurons of the block; the extra token gets
``s`` at those neurons, the patch tokens get zero there, the [CLS] token (and any trained register) is untouched.

The extra token sits right after the model's prefix tokens, [CLS, registers, test-time register, patches], so the
trace counts it as a register and keeps its [CLS], registers, patches layout. Attention and the MLP treat tokens
alike wherever they sit (no position enters after the position embedding), so this equals appending the token
after the patches, as the paper describes (tested in float64).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .errors import RegclsError

# The published neuron list of DINOv2-L without registers (vit_large_patch14_dinov2.lvd142m; 0-based blocks, units
# of the MLP's 4,096-wide activation), as given with the paper's released model.
DINOV2_L_NEURONS: dict[int, tuple[int, ...]] = {
    17: (884, 133, 1427, 3464, 2373, 2436, 841, 3574, 2129, 3355, 4047, 3341, 1330, 4031, 844, 944, 464),
    16: (2301, 3576, 1940, 3463, 1244, 407, 3152, 2517, 3465),
    15: (1714, 3507, 2492, 2680, 131, 720, 3499, 3062, 2625),
    14: (2110, 1510, 1082, 2711, 2464, 147, 543, 581),
    13: (2400,),
    12: (3168,),
}
OUTLIER_FACTOR = 3.0   # a token is an outlier where its norm exceeds this many times the median token norm


def signed_max(h: torch.Tensor) -> torch.Tensor:
    """Per row of ``h`` (B, ...): the largest entry in magnitude, with its sign (B,)."""
    flat = h.flatten(1)
    top, bottom = flat.amax(dim=1), flat.amin(dim=1)
    return torch.where(top >= -bottom, top, bottom)


class TestTimeRegister:
    """Add a test-time register to a timm VisionTransformer, in place, while attached::

        with TestTimeRegister(model, DINOV2_L_NEURONS):
            feats = model.forward_features(x)          # (B, 1 + R + 1 + patches, D)

    ``neurons`` maps 0-based block indices to MLP units; an empty map adds the zero token and moves nothing. While
    attached, ``model.test_time_registers`` is 1 (:func:`regcls.models.layout` counts it as a register) and
    ``model.test_time_neurons`` the units it moves (empty blocks dropped).
    """

    __test__ = False   # not a test class, whatever its name

    def __init__(self, model: nn.Module, neurons: dict[int, tuple[int, ...]]):
        from timm.models.vision_transformer import VisionTransformer

        if not isinstance(model, VisionTransformer):
            raise RegclsError(f"test-time registers need a timm VisionTransformer with absolute position embedding "
                              f"(DINOv2); {type(model).__name__} is not one (DINOv3's rotary embedding expects a "
                              "fixed number of prefix tokens)")
        depth, hidden = len(model.blocks), model.blocks[0].mlp.fc2.in_features
        bad = [f"block {b}" for b in neurons if not 0 <= b < depth]
        bad += [f"unit {u} of block {b}" for b, us in neurons.items() for u in us if not 0 <= u < hidden]
        if bad:
            raise RegclsError(f"test-time register neurons outside the model ({depth} blocks, {hidden} MLP units): "
                              + ", ".join(bad[:5]))
        if getattr(model, "test_time_registers", 0):
            raise RegclsError("this model already has a test-time register attached")
        self.model, self.neurons = model, {int(b): tuple(int(u) for u in us) for b, us in neurons.items() if us}
        self.at = model.num_prefix_tokens          # the extra token's index; the patches start after it
        self.handles: list = []

    def __enter__(self) -> "TestTimeRegister":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def attach(self) -> "TestTimeRegister":
        """Insert the zero token after the position embedding and hook the listed blocks' MLP."""
        at = self.at

        def add_token(_mod, _inp, x):   # (B, P + patches, D) -> (B, P + 1 + patches, D)
            return torch.cat([x[:, :at], x.new_zeros(x.shape[0], 1, x.shape[2]), x[:, at:]], dim=1)

        def shift(units):
            def hook(_mod, args):
                h = args[0]                                   # (B, N, hidden): the MLP's activation
                idx = units.to(h.device)                      # the model may have moved since attach
                s = signed_max(h[:, :, idx])                  # (B,): per image
                h = h.clone()
                h[:, at + 1:, idx] = 0                        # the patches give the units up ...
                h[:, at, idx] = s[:, None].to(h.dtype)        # ... and the test-time register takes them
                return (h, *args[1:])
            return hook

        self.handles.append(self.model.patch_drop.register_forward_hook(add_token))
        for b, units in self.neurons.items():
            self.handles.append(self.model.blocks[b].mlp.fc2.register_forward_pre_hook(shift(torch.tensor(units))))
        self.model.test_time_registers, self.model.test_time_neurons = 1, self.neurons
        return self

    def detach(self) -> None:
        """Remove the token and the hooks: the model runs as before."""
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.model.test_time_registers, self.model.test_time_neurons = 0, {}


@torch.inference_mode()
def find_outlier_neurons(model: nn.Module, images: torch.Tensor, top_k: int, last_block: int | None = None,
                         factor: float = OUTLIER_FACTOR, batch_size: int = 16) -> dict[int, tuple[int, ...]]:
    """The MLP units that make a model's high-norm outlier tokens, for :class:`TestTimeRegister`.

    Outliers are the tokens entering the block two before the end whose norm exceeds ``factor`` times the median
    token norm (all tokens of all ``images`` (n, 3, S, S)). Every unit of blocks ``0 .. last_block`` (default: the
    block two before the end, excluded) is ranked by its mean |activation| (input of ``mlp.fc2``) over the outlier
    tokens; the ``top_k`` units are kept, as ``{block: units}`` with units in rank order. Where no token is an
    outlier there is nothing to move: ``{}``, with a warning (the register then only adds a zero token).
    """
    blocks = model.blocks
    probe_at = len(blocks) - 2
    last_block = probe_at - 1 if last_block is None else last_block
    batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    seen: dict[str, torch.Tensor] = {}
    hook = blocks[probe_at].register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    try:   # first pass: the token norms, for the threshold
        norms = []
        for x in batches:
            model.forward_features(x)
            norms.append(seen["x"].float().norm(dim=-1))                             # (B, N)
    finally:
        hook.remove()
    norms_ = torch.cat(norms)
    outlier = norms_ > factor * norms_.median()                                        # (n, N)
    if not outlier.any():
        warnings.warn(f"no token entering block {probe_at} has a norm above {factor} x the median on these "
                      f"{len(images)} images: no high-norm outliers, no units to move", stacklevel=2)
        return {}
    hidden = blocks[0].mlp.fc2.in_features
    score = torch.zeros(last_block + 1, hidden, dtype=torch.float64)                   # (blocks, hidden)
    mask: dict[str, torch.Tensor] = {}

    def accumulate(b):
        def hook(_mod, args):   # sum of |activation| over this batch's outliers
            score[b] += args[0].abs()[mask["m"]].double().sum(dim=0).cpu()
        return hook

    handles = [blocks[b].mlp.fc2.register_forward_pre_hook(accumulate(b)) for b in range(last_block + 1)]
    try:   # second pass: the units' activation on the outliers
        at = 0
        for x in batches:
            mask["m"] = outlier[at:at + len(x)].to(x.device)
            at += len(x)
            model.forward_features(x)
    finally:
        for h in handles:
            h.remove()
    score /= int(outlier.sum())
    order = score.flatten().argsort(descending=True)[:top_k]
    found: dict[int, list[int]] = {}
    for k in order.tolist():
        found.setdefault(k // hidden, []).append(k % hidden)
    return {b: tuple(us) for b, us in sorted(found.items())}


class FixedRegisters:
    """Fix-Reg-Mean: at the input of every block the register tokens are replaced by fixed values, the same for
    every image (their means over calibration images, :func:`register_means`), so that no block -- in particular
    the last block's [CLS] -- reads image information from them::

        with FixedRegisters(model, register_means(model, calibration_images)):
            feats = model.forward_features(x)
    """

    __test__ = False

    def __init__(self, model: nn.Module, means: torch.Tensor):
        R = int(getattr(model, "num_reg_tokens", 0))
        if R == 0:
            raise RegclsError("Fix-Reg-Mean needs a model with registers")
        if tuple(means.shape) != (len(model.blocks), R, model.embed_dim):
            raise RegclsError(f"register means of shape {tuple(means.shape)}; this model needs "
                              f"{(len(model.blocks), R, model.embed_dim)} (blocks, registers, width)")
        self.model, self.means, self.handles = model, means, []
        self.first = model.num_prefix_tokens - R      # the registers' first index (after the [CLS])

    def __enter__(self) -> "FixedRegisters":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def attach(self) -> "FixedRegisters":
        a, b = self.first, self.first + self.means.shape[1]

        def fix(i):
            def hook(_mod, args):
                x = args[0].clone()
                x[:, a:b] = self.means[i].to(device=x.device, dtype=x.dtype)
                return (x, *args[1:])
            return hook

        self.handles = [blk.register_forward_pre_hook(fix(i)) for i, blk in enumerate(self.model.blocks)]
        self.model.fixed_register_means = self.means
        return self

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.model.fixed_register_means = None


@torch.inference_mode()
def register_means(model: nn.Module, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """The register tokens at the input of every block, averaged over ``images`` (n, 3, S, S), in float64 on the
    CPU: (blocks, registers, width). The model runs unaltered."""
    R = int(getattr(model, "num_reg_tokens", 0))
    first = model.num_prefix_tokens - R
    L, D = len(model.blocks), model.embed_dim
    total = torch.zeros(L, R, D, dtype=torch.float64)

    def add(i):
        def hook(_mod, args):
            total[i] += args[0][:, first:first + R].double().sum(dim=0).cpu()
        return hook

    handles = [blk.register_forward_pre_hook(add(i)) for i, blk in enumerate(model.blocks)]
    try:
        for j in range(0, len(images), batch_size):
            model.forward_features(images[j:j + batch_size])
    finally:
        for h in handles:
            h.remove()
    return total / len(images)
