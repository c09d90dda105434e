"""Changes to the forward pass at test time: registers added (Jiang et al., "Vision Transformers Don't Need Trained
Registers", NeurIPS 2025), and registers fixed to their mean (Fix-Reg-Mean; :class:`FixedRegisters`).

A model trained without registers writes its global scratch values into a few patch tokens ("high-norm outliers"),
and a handful of MLP neurons make them. The method adds one token at test time, a zero vector after the position
embedding (so it carries none), and in listed blocks moves those neurons' activation into it: per image, ``s`` is
the signed maximum (the max or the min, whichever is larger in magnitude) of the listed neurons' activations
(input of ``mlp.fc2``; (B, N, hidden)) over all tokens and all listed neurons of the block; the extra token gets
``s`` at those neurons, the patch tokens get zero there, the [CLS] token (and any trained register) is untouched.

The units come from a published list (:data:`DINOV2_L_NEURONS`) or from :func:`find_outlier_neurons`, which by
default follows the published search (:data:`PUBLISHED`: patch tokens above norm 150 at the second-to-last block's
output; units of blocks 0-17 ranked per image by their mean |activation| on them; the top 50), with this project's
earlier search kept as a named variant (:data:`RELATIVE`).

The extra token sits right after the model's prefix tokens, [CLS, registers, test-time register, patches], so the
trace counts it as a register and keeps its [CLS], registers, patches layout. Attention and the MLP treat tokens
alike wherever they sit (no position enters after the position embedding), so this equals appending the token
after the patches, as the paper describes (tested in float64).
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from .errors import RegclsError

# The published neuron list of DINOv2-L without registers (vit_large_patch14_dinov2.lvd142m; 0-based blocks, units
# of the MLP's 4,096-wide activation), as given with the paper's released model (the authors' repository,
# dinov2/dinov2/hub/register_neurons.py, LARGE_REGISTER_NEURONS): 45 units, where the config's top_k is 50; how the
# list was cut to 45 is not in the repository, and a rerun of the search depends on the images it samples.
DINOV2_L_NEURONS: dict[int, tuple[int, ...]] = {
    17: (884, 133, 1427, 3464, 2373, 2436, 841, 3574, 2129, 3355, 4047, 3341, 1330, 4031, 844, 944, 464),
    16: (2301, 3576, 1940, 3463, 1244, 407, 3152, 2517, 3465),
    15: (1714, 3507, 2492, 2680, 131, 720, 3499, 3062, 2625),
    14: (2110, 1510, 1082, 2711, 2464, 147, 543, 581),
    13: (2400,),
    12: (3168,),
}

# The search for the units (Jiang et al.'s "register neurons"), as the authors' repository does it
# (github.com/nickjiang2378/test-time-registers, commit 860df43): shared/algorithms.py (find_register_neurons) with
# the settings of configs/dinov2_large.yaml, called as register_neurons.ipynb calls it (apply_sparsity_filter=True)
# and its units filtered and cut as that notebook does (shared/utils.py, filter_layers).
PUBLISHED_THRESHOLD = 150.0   # register_norm_threshold: an absolute norm, DINOv2-L's scale (Darcet et al.'s cut too)
PUBLISHED_TOP_K = 50          # top_k
OUTLIER_FACTOR = 3.0          # the relative variant: an outlier's norm exceeds this many times the median token norm


@dataclass(frozen=True)
class OutlierSearch:
    """How :func:`find_outlier_neurons` finds the units. The defaults are the published procedure's.

    ``threshold``: a token is an outlier where its norm (L2, of the residual stream) exceeds it -- an absolute
    norm, or with ``relative`` a factor of the median token norm (over all tokens of all images).
    ``detect_layer``: the block whose output is tested (0-based; negative counts from the end: -2, the
    second-to-last block, whose output enters the last one). ``highest_layer``: the last block searched,
    inclusive (negative counts from the end; at or past the model's depth: every block). ``prefix_tokens``: whether
    the [CLS] (and any register) can count as an outlier. ``ranking``: ``"per_image"`` -- per image with an
    outlier, the mean |activation| over its outliers, averaged over those images -- or ``"pooled"`` -- the mean
    |activation| over all outlier tokens of all images. ``sparsity_filter``: a unit scores zero on an image where
    fewer than half of the image's tokens have an activation below 0.5 (dense units are not taken).
    """

    threshold: float = PUBLISHED_THRESHOLD   # register_norm_threshold: 150
    relative: bool = False                   # absolute: filtered_norms > register_norm_threshold
    detect_layer: int = -2                   # detect_outliers_layer: -2
    highest_layer: int = 17                  # highest_layer: 17 (filter_layers keeps blocks <= 17)
    prefix_tokens: bool = False              # ours: the published code tests every token, the [CLS] too
    ranking: str = "per_image"               # neuron_scores per image, then their mean over the images
    sparsity_filter: bool = True             # apply_sparsity_filter=True, fraction 0.5, activation 0.5

    def __post_init__(self):
        if self.ranking not in ("per_image", "pooled"):
            raise RegclsError(f"unknown ranking {self.ranking!r}: 'per_image' (published) or 'pooled'")

    def changes(self) -> dict:
        """The settings that differ from the published procedure's (plain data, for result files)."""
        return {k: v for k, v in asdict(self).items() if v != getattr(PUBLISHED, k)}

    def in_words(self) -> str:
        """The settings in words (for warnings and pages)."""
        def block(i):
            ends = {-1: "the last block", -2: "the second-to-last block", -3: "the third-to-last block"}
            return f"block {i}" if i >= 0 else ends.get(i, f"block {i} (counted from the end)")
        norm = f"{self.threshold:g} x the median token norm" if self.relative else f"norm {self.threshold:g}"
        return (f"{'tokens' if self.prefix_tokens else 'patch tokens'} above {norm} at the output of "
                f"{block(self.detect_layer)}; units of the blocks up to {block(self.highest_layer)}, ranked "
                f"{self.ranking.replace('_', '-')}{', sparse units only' if self.sparsity_filter else ''}")


PUBLISHED = OutlierSearch()
# The procedure this project used before (kept to reproduce its runs): tokens above 3 x the median norm at the
# output of the third-to-last block (the input of the second-to-last), the [CLS] included; units of the blocks
# up to that one ranked by their mean |activation| over all outlier tokens; no sparsity filter.
RELATIVE = OutlierSearch(threshold=OUTLIER_FACTOR, relative=True, detect_layer=-3, highest_layer=-3,
                         prefix_tokens=True, ranking="pooled", sparsity_filter=False)
SEARCHES = {"published": PUBLISHED, "relative": RELATIVE}


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


def _search(search: OutlierSearch | str, settings: dict) -> OutlierSearch:
    if isinstance(search, str):
        if search not in SEARCHES:
            raise RegclsError(f"unknown outlier search {search!r}; known: {', '.join(SEARCHES)}")
        search = SEARCHES[search]
    return replace(search, **settings) if settings else search


@torch.inference_mode()
def outlier_tokens(model: nn.Module, images: torch.Tensor, search: OutlierSearch | str = "published",
                   batch_size: int = 16, **settings) -> torch.Tensor:
    """The high-norm outlier tokens of ``images`` (n, 3, S, S) as ``search`` defines them (default: the published
    procedure's, patch tokens whose norm exceeds 150 at the second-to-last block's output): (n, N) bool."""
    search = _search(search, settings)
    blocks = model.blocks
    depth = len(blocks)
    if not -depth <= search.detect_layer < depth:
        raise RegclsError(f"outlier detection at block {search.detect_layer}: the model has {depth} blocks")
    seen: dict[str, torch.Tensor] = {}
    hook = blocks[search.detect_layer % depth].register_forward_hook(lambda m, a, out: seen.__setitem__("x", out))
    try:
        norms = []
        for i in range(0, len(images), batch_size):
            model.forward_features(images[i:i + batch_size])
            norms.append(seen["x"].float().norm(dim=-1))                             # (B, N)
    finally:
        hook.remove()
    norms_ = torch.cat(norms)
    threshold = search.threshold * norms_.median() if search.relative else search.threshold
    outlier = norms_ > threshold
    if not search.prefix_tokens:
        outlier[:, :model.num_prefix_tokens] = False       # the [CLS] and registers are never outliers
    return outlier


@torch.inference_mode()
def find_outlier_neurons(model: nn.Module, images: torch.Tensor, top_k: int = PUBLISHED_TOP_K,
                         search: OutlierSearch | str = "published", batch_size: int = 16,
                         **settings) -> dict[int, tuple[int, ...]]:
    """The MLP units that make a model's high-norm outlier tokens, for :class:`TestTimeRegister`.

    By default Jiang et al.'s published procedure (:data:`PUBLISHED`; their repository's
    ``shared/algorithms.py`` with ``configs/dinov2_large.yaml``): the outliers are the patch tokens whose norm
    exceeds 150 at the output of the second-to-last block, on each of ``images`` (n, 3, S, S); every unit of
    blocks 0-17 (every block of a shallower model) gets, for each image with an outlier, its mean |activation|
    (input of ``mlp.fc2``) over that image's outliers -- zero where the unit is not sparse on that image (fewer
    than half its tokens below 0.5) -- averaged over the images with an outlier; the ``top_k`` (50) units with the
    highest scores are kept, as ``{block: units}`` with units in rank order. One deliberate difference from the
    published code: the [CLS] (and any register) never counts as an outlier (``prefix_tokens=False``), where the
    published code tests every token of the sequence.

    ``search`` is an :class:`OutlierSearch` or the name of one in :data:`SEARCHES` (``"relative"``: the procedure
    this project used before, kept to reproduce its runs); ``settings`` replace single fields of it (e.g.
    ``threshold=50.0`` for a model whose norms are not DINOv2-L's). Where no token is an outlier there is nothing
    to move: ``{}``, with a warning (the register then only adds a zero token).
    """
    search = _search(search, settings)
    blocks = model.blocks
    depth = len(blocks)
    last = min(search.highest_layer, depth - 1) if search.highest_layer >= 0 else depth + search.highest_layer
    if last < 0:
        raise RegclsError(f"highest block searched {search.highest_layer}: the model has {depth} blocks")
    batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    outlier = outlier_tokens(model, images, search, batch_size)                       # (n, N)
    if not outlier.any():
        warnings.warn(f"no token of these {len(images)} images is a high-norm outlier ({search.in_words()}): "
                      "no high-norm outliers, no units to move", stacklevel=2)
        return {}
    hidden = blocks[0].mlp.fc2.in_features
    score = torch.zeros(last + 1, hidden, dtype=torch.float64)                         # (blocks, hidden)
    mask: dict[str, torch.Tensor] = {}

    def accumulate(b):
        def hook(_mod, args):
            h, m = args[0], mask["m"]                                                  # (B, N, hidden), (B, N)
            if search.ranking == "pooled" and not search.sparsity_filter:   # the relative variant, as it was
                score[b] += h.abs()[m].double().sum(dim=0).cpu()
                return
            sums = (h.abs().double() * m[..., None]).sum(dim=1)                     # per image, over its outliers
            if search.sparsity_filter:   # a unit counts on an image where at least half its tokens are below 0.5
                sums *= (h < 0.5).sum(dim=1) >= 0.5 * h.shape[1]
            if search.ranking == "per_image":   # each image's mean over its outliers (images without any skipped)
                count = m.sum(dim=1)
                sums = (sums / count.clamp(min=1)[:, None])[count > 0]
            score[b] += sums.sum(dim=0).cpu()
        return hook

    handles = [blocks[b].mlp.fc2.register_forward_pre_hook(accumulate(b)) for b in range(last + 1)]
    try:   # second pass: the units' activation on the outliers
        at = 0
        for x in batches:
            mask["m"] = outlier[at:at + len(x)].to(x.device)
            at += len(x)
            model.forward_features(x)
    finally:
        for h in handles:
            h.remove()
    score /= int(outlier.sum()) if search.ranking == "pooled" else int(outlier.any(dim=1).sum())
    order = score.flatten().argsort(descending=True, stable=True)[:top_k]   # ties: the earlier unit first
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
