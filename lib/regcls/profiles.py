"""The three profiles as data: which models, which images, at what scale.

``smoke``  tiny ViTs in the DINOv2 architecture (patch 14, LayerScale, 0 or 4 registers) at four sizes,
           on images that ship with installed packages. Offline, minutes on 2 CPU cores. Tests and CI.
``laptop`` real DINOv2 S and B (with and without registers) on a few hundred COCO val2017 images.
``paper``  real DINOv2 S/B/L/g with and without registers, all 5,000 COCO val2017 images, ImageNetV2 for
           the one-shot test.

Choose one with ``REGCLS_PROFILE`` (``make book PROFILE=...``); unset, :func:`active_profile` picks the
largest the machine can run and says so.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, replace

from .env import hub_reachable, image_cap, native_bf16
from .errors import RegclsError
from .testtime import DINOV2_L_NEURONS, OUTLIER_FACTOR, PUBLISHED, PUBLISHED_TOP_K, OutlierSearch

SIZES = ("S", "B", "L", "g")  # the paper's order
SIZE_NAMES = {"S": "small", "B": "base", "L": "large", "g": "giant"}
DINOV3_NAMES = {"S": "small", "S+": "small_plus", "B": "base", "L": "large", "H+": "huge_plus"}
ORDER = ("S", "S+", "B", "L", "H+", "g")   # every size of both series, smallest to largest (parameters)
MATCHED = {"S": "S", "B": "B", "L": "L", "H+": "g"}   # DINOv3 size -> the DINOv2 size it is compared with


@dataclass(frozen=True)
class TestTime:
    """A register added at test time (:mod:`regcls.testtime`): the MLP units whose activation moves into it, as
    listed in ``neurons`` ((block, units) pairs), or, where that is empty, the ``top_k`` units that
    :func:`regcls.testtime.find_outlier_neurons` finds with ``search`` (default: the published procedure) on the
    first ``images`` images of ``calibration`` (one per class of a labelled set; never the images a chapter
    evaluates)."""

    neurons: tuple[tuple[int, tuple[int, ...]], ...] = ()
    calibration: str = ""
    images: int = 64
    top_k: int = PUBLISHED_TOP_K
    search: OutlierSearch = PUBLISHED

    def describe(self) -> dict:
        """Plain-data record for result files and cache keys: the search's settings only where they differ from
        the published procedure's (so that a description written before the choice existed keeps its form)."""
        if self.neurons:
            return {"neurons": {str(b): list(u) for b, u in self.neurons}}
        changes = self.search.changes()
        return {"found_on": self.calibration, "images": self.images, "top_k": self.top_k,
                **({"search": changes} if changes else {})}

    @classmethod
    def from_description(cls, d: dict) -> "TestTime":
        if "neurons" in d:
            return cls(neurons=tuple((int(b), tuple(u)) for b, u in d["neurons"].items()))
        return cls(calibration=d["found_on"], images=d["images"], top_k=d["top_k"],
                   search=replace(PUBLISHED, **d.get("search", {})))


@dataclass(frozen=True)
class FixRegMean:
    """Registers fixed to their mean at every block input (:class:`regcls.testtime.FixedRegisters`), the means
    taken over the first ``images`` images of ``calibration`` (one per class of a labelled set)."""

    calibration: str
    images: int = 64

    def describe(self) -> dict:
        return {"calibration": self.calibration, "images": self.images}


@dataclass(frozen=True)
class ModelSpec:
    """One model of a profile.

    ``weights`` is ``"hub"`` (pretrained ``arch.tag`` from the Hugging Face hub), ``"random:SEED"``
    (timm's initialisation under a fixed seed) or ``"planted:KIND"`` (a known-answer control, see
    :mod:`regcls.planted`). ``overrides`` are keyword arguments for ``timm.create_model`` (smoke sizes).
    """

    size: str
    arch: str
    tag: str | None = None
    weights: str = "hub"
    overrides: tuple[tuple[str, object], ...] = ()
    testtime: TestTime | None = None   # a register added at test time (Jiang et al. 2025)
    fix_registers: FixRegMean | None = None   # registers fixed to their mean (Fix-Reg-Mean)
    custom_label: str | None = None    # a label of your own for figures and tables ("CLIP-L"; profile files)

    @property
    def name(self) -> str:
        """timm's full name, ``arch.tag`` for hub weights."""
        return f"{self.arch}.{self.tag}" if self.tag else self.arch

    @property
    def registers(self) -> bool:
        return "reg" in self.arch or "dinov3" in self.arch   # every DINOv3 has four registers

    @property
    def label(self) -> str:
        """Short label for figures: ``L+reg`` or ``L`` (DINOv2), ``L+ttr`` (a test-time register), ``H+ v3``
        (DINOv3, which always has registers)."""
        if self.custom_label:
            return self.custom_label
        if "dinov3" in self.arch:
            return f"{self.size} v3"
        return (self.size + ("+reg" if self.registers else "") + ("+ttr" if self.testtime else "")
                + (" fixed" if self.fix_registers else ""))

    def describe(self) -> dict:
        """Plain-data record for result files."""
        out = {"size": self.size, "arch": self.arch, "name": self.name, "weights": self.weights,
               "registers": self.registers, "overrides": dict(self.overrides)}
        if self.testtime is not None:   # only then: the other models keep their cache keys
            out["test_time_register"] = self.testtime.describe()
        if self.fix_registers is not None:
            out["fixed_registers"] = self.fix_registers.describe()
        if self.custom_label:
            out["label"] = self.custom_label
        return out

    @classmethod
    def from_description(cls, d: dict) -> "ModelSpec":
        """The spec :meth:`describe` recorded (a trace's ``model_spec``)."""
        tt, fr = d.get("test_time_register"), d.get("fixed_registers")
        return cls(d["size"], d["arch"], d["name"].partition(".")[2] or None, d["weights"],
                   tuple(sorted(d["overrides"].items())),
                   testtime=None if tt is None else TestTime.from_description(tt),
                   fix_registers=None if fr is None else FixRegMean(**fr), custom_label=d.get("label"))


@dataclass(frozen=True)
class Profile:
    """Scale of every chapter: models, images, resolution, batch size, device."""

    name: str
    models: tuple[ModelSpec, ...]
    dataset: str               # unlabelled images for most experiments (COCO val2017 in the paper)
    limit: int | None          # number of images of ``dataset`` (None = all)
    labelled: str              # labelled images for one-shot and probes (ImageNet in the paper)
    labelled_limit: int | None
    img_size: int
    batch_size: int | None     # None: as many as fit the device (regcls.trace.auto_batch_size)
    device: str                # "cpu", "cuda", or "auto" (CUDA when there is a GPU)
    alt_img_size: int = 518    # the other resolution of the open choice "224 vs 518 px"
    alt_limit: int | None = None   # images of the traces at the other resolution (None: as at img_size); the first
                                   # of the same images: the sensitivity to resolution costs ~6x per image at 518 px
    alt_crop_pct: float = 0.875  # the other preprocessing: resize to 256, crop 224 (Hugging Face's processor)
    appendix: tuple[tuple[str, tuple[ModelSpec, ...]], ...] = ()  # (family, models small to large)
    dinov3: tuple[ModelSpec, ...] = ()   # "Beyond the paper": DINOv3, small to large
    dinov3_img_size: int = 256           # DINOv3's own input size (its chapter also runs at img_size)
    testtime: ModelSpec | None = None    # "Beyond the paper": a model without registers given a test-time register
    calibration_images: int = 64         # images whose register means Fix-Reg-Mean uses (from the other dataset)
    oneshot_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    labelled_classes: int | None = None  # the first classes of ``labelled`` (None = all)
    note: str = ""

    def models_with(self, registers: bool) -> list[ModelSpec]:
        """The profile's models with (or without) registers, in the paper's size order."""
        chosen = [m for m in self.models if m.registers == registers]
        return sorted(chosen, key=lambda m: SIZES.index(m.size))

    def sizes(self, registers: bool = True) -> list[str]:
        """The sizes this profile has (with or without registers), in the paper's order."""
        return [m.size for m in self.models_with(registers)]

    def sample(self, dataset: str, capped: bool = True, img_size: int | None = None) -> tuple[int | None, int | None]:
        """``(images, classes)`` of ``dataset`` on this profile at ``img_size`` (None: the profile's own), with the
        ``REGCLS_LIMIT`` cap applied (unless ``capped`` is False: what the full run traces).

        Labelled sets keep whole classes: under a cap of N images, the first ``N // 2`` classes with two
        images each (at least two classes), so the one-shot test keeps one image to learn from and one to test.
        At the other resolution the unlabelled set keeps its first ``alt_limit`` images where the profile sets one.
        """
        labelled = dataset == self.labelled
        limit = self.labelled_limit if labelled else self.limit
        if (not labelled and self.alt_limit and img_size is not None and img_size == self.alt_img_size
                and img_size != self.img_size):
            limit = min(limit or self.alt_limit, self.alt_limit)
        classes = self.labelled_classes if labelled else None
        cap = image_cap() if capped else None
        if cap is None:
            return limit, classes
        if not labelled:
            return min(limit or cap, cap), None
        classes = max(2, min(classes or cap // 2, cap // 2))
        return min(limit or 2 * classes, 2 * classes), classes

    def with_fixed_registers(self, spec: ModelSpec, dataset: str) -> ModelSpec:
        """``spec`` with Fix-Reg-Mean for a trace on ``dataset``: the means come from the profile's other dataset,
        never from the images the trace measures (``calibration_images`` of them, capped by ``REGCLS_LIMIT``)."""
        other = self.labelled if dataset == self.dataset else self.dataset
        cap = image_cap()
        n = self.calibration_images if cap is None else min(self.calibration_images, cap)
        return replace(spec, fix_registers=FixRegMean(other, n))

    def model(self, size: str, registers: bool) -> ModelSpec:
        for m in self.models_with(registers):
            if m.size == size:
                return m
        raise RegclsError(f"profile {self.name!r} has no model of size {size!r} with registers={registers}")


def dinov2(size: str, registers: bool) -> ModelSpec:
    """The public DINOv2 checkpoint of one size, with or without 4 registers (timm names)."""
    arch = f"vit_{SIZE_NAMES[size]}_patch14_{'reg4_' if registers else ''}dinov2"
    return ModelSpec(size=size, arch=arch, tag="lvd142m", weights="hub")


def dinov3(size: str) -> ModelSpec:
    """The public DINOv3 checkpoint of one size (timm's copy, no login): patch 16, four registers, rotary
    position embedding."""
    return ModelSpec(size=size, arch=f"vit_{DINOV3_NAMES[size]}_patch16_dinov3", tag="lvd1689m", weights="hub")


# Tiny stand-ins with the DINOv2 architecture: same token layout, LayerScale, patch 14, giant keeps SwiGLU.
# The "large" sizes are planted positive controls and the "small" sizes negative controls (regcls.planted).
SMOKE_SIZES = {
    "S": dict(embed_dim=48, depth=4, num_heads=3),
    "B": dict(embed_dim=64, depth=4, num_heads=4),
    "L": dict(embed_dim=96, depth=6, num_heads=4),
    "g": dict(embed_dim=128, depth=8, num_heads=4),
}
SMOKE_PLANT = {  # (size, registers) -> planted kind, in the pattern the paper reports
    ("S", True): "patch_integrator", ("B", True): "patch_integrator",     # Sec. 3: L and g read registers
    ("L", True): "register_reader", ("g", True): "register_reader",
    ("S", False): "patch_integrator", ("B", False): "patch_integrator",   # Sec. 4: only g reads its skip term
    ("L", False): "patch_integrator", ("g", False): "skip_dominated",
}


def smoke_model(size: str, registers: bool) -> ModelSpec:
    arch = dinov2(size, registers).arch
    return ModelSpec(size=size, arch=arch, tag=None, weights=f"planted:{SMOKE_PLANT[size, registers]}",
                     overrides=tuple(sorted(SMOKE_SIZES[size].items())))


def _tiny(size, arch, weights, **over) -> ModelSpec:
    return ModelSpec(size=size, arch=arch, weights=weights, overrides=tuple(sorted(over.items())))


def with_test_time_register(spec: ModelSpec, testtime: TestTime) -> ModelSpec:
    """``spec`` (a DINOv2 without registers) given a test-time register."""
    return replace(spec, testtime=testtime)


# The published search's absolute threshold (norm 150) is DINOv2-L's scale; a planted model's norms are set by its
# planting. The planted outlier patches have norms of about 100-300 at the smoke sizes and images (the weakest under
# 150), every other token under 25 (tests/test_testtime.py pins both): the smoke profiles use the published search
# with this threshold instead, between the two, so that every planted outlier and nothing else counts.
PLANTED_THRESHOLD = 50.0


def smoke_testtime(size: str) -> ModelSpec:
    """A tiny DINOv2 without registers planted with known outlier neurons (:mod:`regcls.planted`), whose two units
    the published search (with :data:`PLANTED_THRESHOLD` for its absolute threshold) must find on shipped images."""
    base = ModelSpec(size, dinov2(size, False).arch, None, "planted:outlier_neurons",
                     tuple(sorted(SMOKE_SIZES[size].items())))
    return with_test_time_register(base, TestTime(calibration="samples-crops", images=16, top_k=2,
                                                  search=replace(PUBLISHED, threshold=PLANTED_THRESHOLD)))


# DINOv2-B (laptop) has no published list and no published settings (the authors' configs are DINOv2-L's and
# OpenCLIP ViT-B/16's). The published search with three of DINOv2-L's settings carried over by what they mean
# rather than their number: a threshold of 3 x the median token norm (150 is the norm scale of the large models,
# where Darcet et al. found their high-norm tokens; DINOv2-B's is not published), the first three quarters of the
# blocks searched (0-8 of 12, as 0-17 of DINOv2-L's 24) and 16 units (between the authors' 10 for OpenCLIP ViT-B/16
# and 50 for DINOv2-L). Detection at the second-to-last block's output, per-image ranking, the sparsity filter
# and patches only, as published.
LAPTOP_SEARCH = replace(PUBLISHED, threshold=OUTLIER_FACTOR, relative=True, highest_layer=8)


# The known answers of the replacement controls (regcls.ablation), traced on every profile's smoke images: registers
# that carry the image (every replacement hurts) and registers that add a constant (only zeroing hurts, and only the
# one-shot test).
REPLACEMENT_CONTROLS = {
    "registers carry the image": smoke_model("L", True),
    "registers add a constant": ModelSpec("S", dinov2("S", True).arch, None, "planted:constant_registers",
                                          tuple(sorted(SMOKE_SIZES["S"].items()))),
}


# The known answers of the maps of the [CLS] (regcls.maps): values of equal norm (the attention and contribution maps
# agree) and of very unequal norms across the patches (they disagree).
MAP_CONTROLS = {
    name: ModelSpec("S", dinov2("S", True).arch, None, f"planted:{kind}", tuple(sorted(SMOKE_SIZES["S"].items())))
    for name, kind in (("equal value norms", "equal_values"), ("unequal value norms", "unequal_values"))
}


# The appendix families (paper Figs. 7-9). Each size series is one training recipe, so that size is not confounded
# with data: DeiT III ImageNet-22k -> 1k at every size, CLIP trained on LAION-2B at every size (OpenAI's weights
# stop at L). The paper's DeiT III "tiny trained on less data" is its own entry: timm has no DeiT III tiny, so the
# small model trained on ImageNet-1k only stands for it. iBOT is not in timm: its official checkpoints load with
# --checkpoint (files named below, under REGCLS_CHECKPOINTS; see the appendix chapter).
SIZE_SERIES = ("DeiT III", "CLIP", "iBOT")   # families whose sizes form a series; others are single comparisons
LESS_DATA = "DeiT III, ImageNet-1k only"
SMOKE_APPENDIX = (
    ("DeiT III", (_tiny("S", "deit3_small_patch16_224", "planted:patch_integrator", embed_dim=48, depth=4, num_heads=3),
                  _tiny("H", "deit3_huge_patch14_224", "planted:skip_dominated", embed_dim=96, depth=6, num_heads=4))),
    (LESS_DATA, (_tiny("S", "deit3_small_patch16_224", "planted:skip_dominated", embed_dim=48, depth=4, num_heads=3),)),
    ("CLIP", (_tiny("B", "vit_base_patch16_clip_224", "random:0", embed_dim=48, depth=4, num_heads=3),
              _tiny("L", "vit_large_patch14_clip_224", "random:0", embed_dim=96, depth=6, num_heads=4))),
    ("iBOT", (_tiny("S", "vit_small_patch16_224", "random:0", embed_dim=48, depth=4, num_heads=3),
              _tiny("L", "vit_large_patch16_224", "random:0", embed_dim=96, depth=6, num_heads=4))),
)
# Tiny stand-ins in the DINOv3 layout (timm's Eva: patch 16, rotary embedding, four registers; the _qkvb models,
# whose query bias the register reader needs; H+ keeps SwiGLU), planted in the pattern of the DINOv2 stand-ins.
SMOKE_DINOV3 = (
    _tiny("S", "vit_small_patch16_dinov3_qkvb", "planted:patch_integrator", embed_dim=48, depth=4, num_heads=3),
    _tiny("B", "vit_base_patch16_dinov3_qkvb", "planted:patch_integrator", embed_dim=64, depth=4, num_heads=4),
    _tiny("L", "vit_large_patch16_dinov3_qkvb", "planted:register_reader", embed_dim=96, depth=6, num_heads=4),
    _tiny("H+", "vit_huge_plus_patch16_dinov3_qkvb", "planted:register_reader", embed_dim=128, depth=8, num_heads=4),
)
PAPER_APPENDIX = (
    ("DeiT III", tuple(ModelSpec(s, f"deit3_{n}_patch{p}_224", "fb_in22k_ft_in1k")
                       for s, n, p in (("S", "small", 16), ("B", "base", 16), ("L", "large", 16), ("H", "huge", 14)))),
    (LESS_DATA, (ModelSpec("S", "deit3_small_patch16_224", "fb_in1k"),)),
    ("CLIP", tuple(ModelSpec(s, f"vit_{n}_patch{p}_clip_224", "laion2b")
                   for s, n, p in (("B", "base", 16), ("L", "large", 14), ("H", "huge", 14)))),
    ("iBOT", (ModelSpec("S", "vit_small_patch16_224", None, "checkpoint:ibot_vits_16.pth"),
              ModelSpec("B", "vit_base_patch16_224", None, "checkpoint:ibot_vitb_16.pth"),
              ModelSpec("L", "vit_large_patch16_224", None, "checkpoint:ibot_vitl_16.pth"))),
)


def _all(make) -> tuple[ModelSpec, ...]:
    return tuple(make(s, r) for r in (True, False) for s in SIZES)


PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke", models=_all(smoke_model), dataset="samples", limit=None,
        labelled="samples-crops", labelled_limit=None, img_size=112, batch_size=16, device="cpu", alt_img_size=224,
        appendix=SMOKE_APPENDIX, dinov3=SMOKE_DINOV3, dinov3_img_size=128, testtime=smoke_testtime("L"),
        calibration_images=16,
        note="tiny planted-control ViTs on images shipped with installed packages"),
    "laptop": Profile(
        name="laptop", models=tuple(dinov2(s, r) for r in (True, False) for s in ("S", "B")),
        dataset="coco-val2017", limit=300, labelled="imagenetv2", labelled_limit=1000, labelled_classes=100,
        img_size=224, batch_size=None, device="auto", appendix=tuple((f, m[:2]) for f, m in PAPER_APPENDIX),
        dinov3=(dinov3("S"), dinov3("B")),
        testtime=with_test_time_register(dinov2("B", False), TestTime(calibration="imagenetv2", images=64, top_k=16,
                                                                      search=LAPTOP_SEARCH)),
        note="real DINOv2 small and base on 300 COCO val2017 images (ImageNetV2: 100 classes, 10 images each)"),
    # A free Colab GPU (a T4: 16 GB, float16 but no bfloat16, 65 TFLOP/s float16 tensor peak, 8 float32; about 12 GB
    # of host memory): every DINOv2 size, so that the main claims are judged, on enough images to decide them; each
    # chapter's traces in about 20 minutes (the reproducing page projects them from FLOPs). The appendix and DINOv3
    # as on the laptop profile; the test-time register on L with the published units, as on paper.
    "colab": Profile(
        name="colab", models=_all(dinov2), dataset="coco-val2017", limit=1000, alt_limit=200,
        labelled="imagenetv2", labelled_limit=1000, labelled_classes=100, img_size=224, batch_size=None,
        device="auto", appendix=tuple((f, m[:2]) for f, m in PAPER_APPENDIX), dinov3=(dinov3("S"), dinov3("B")),
        testtime=with_test_time_register(dinov2("L", False), TestTime(neurons=tuple(sorted(DINOV2_L_NEURONS.items())))),
        note="real DINOv2 S/B/L/g on 1,000 COCO val2017 images (200 at 518 px) and ImageNetV2 (100 classes, 10 images "
             "each): a free Colab GPU in about 20 minutes a chapter"),
    "paper": Profile(
        name="paper", models=_all(dinov2), dataset="coco-val2017", limit=None,
        labelled="imagenetv2", labelled_limit=None, img_size=224, batch_size=None, device="cuda",
        appendix=PAPER_APPENDIX, dinov3=tuple(dinov3(s) for s in DINOV3_NAMES),
        testtime=with_test_time_register(dinov2("L", False), TestTime(neurons=tuple(sorted(DINOV2_L_NEURONS.items())))),
        note="real DINOv2 S/B/L/g on all 5,000 COCO val2017 images and ImageNetV2"),
}
# The smoke models in the shape of ``laptop`` (S and B only; one model of each appendix family, fewer than any
# family has on ``laptop``):
# the tests run every chapter on it, so a chapter that indexes a size a profile lacks fails in seconds.
PROFILES["smoke-laptop"] = replace(
    PROFILES["smoke"], name="smoke-laptop", models=tuple(m for m in PROFILES["smoke"].models if m.size in ("S", "B")),
    appendix=tuple((f, m[:1]) for f, m in SMOKE_APPENDIX), dinov3=SMOKE_DINOV3[:2], testtime=smoke_testtime("B"),
    alt_limit=48,   # fewer images at the other resolution, as on colab: the chapters must not pair them with the rest
    note="the smoke profile's S and B models only, shaped like the laptop profile (for tests)")


def resolve_arch(name: str) -> str:
    """The timm architecture of ``name`` (``arch`` or ``arch.tag``); unknown names list the closest."""
    import timm

    arch = name.split(".")[0]
    if timm.is_model(arch):
        return arch
    close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; closest timm names: {', '.join(close)}" if close else ""
    raise RegclsError(f"unknown model {name!r}{hint}")


def appendix_missing(profile: Profile, family: str) -> list[str]:
    """Sizes of an appendix family's series that ``profile`` lacks (the smoke profiles' series is its stand-ins)."""
    full = dict(SMOKE_APPENDIX if profile.name.startswith("smoke") else PAPER_APPENDIX)[family]
    have = {m.size for m in dict(profile.appendix).get(family, ())}
    return [m.size for m in full if m.size not in have]


def _violated(m: ModelSpec) -> ModelSpec:
    if m.size != "B":
        return m
    return ModelSpec(m.size, m.arch, m.tag, "planted:register_reader" if m.registers else "planted:skip_dominated",
                     m.overrides)


# The smoke models with the paper's pattern broken at an intermediate size: B reads its registers (and, without
# registers, its skip term) like g. The tests run the chapters on it: every rule about sizes must flip.
PROFILES["smoke-violated"] = replace(
    PROFILES["smoke"], name="smoke-violated", models=tuple(_violated(m) for m in PROFILES["smoke"].models),
    note="the smoke models with B planted like g (for tests)")


# A GPU with this much memory and native bfloat16 runs the paper profile; a smaller one (or one without bf16) colab.
PAPER_GPU_GB = 24


def detect_profile() -> str:
    """The largest profile this machine can run, where the hub is reachable: a GPU with native bfloat16 (A100, H100
    or newer) and at least :data:`PAPER_GPU_GB` of memory -> paper; any other GPU (Colab's T4, an L4) -> colab;
    no GPU -> laptop. Offline: smoke."""
    import torch

    if not hub_reachable():
        return "smoke"
    if not torch.cuda.is_available():
        return "laptop"
    memory = torch.cuda.get_device_properties(0).total_memory / 2**30
    return "paper" if native_bf16() and memory >= PAPER_GPU_GB else "colab"


def active_profile(name: str | None = None, verbose: bool = True) -> Profile:
    """The profile named here, else in ``REGCLS_PROFILE``, else detected (printed). A name ending in ``.toml`` is a
    profile file of your own (:func:`profile_from_file`)."""
    name = name or os.environ.get("REGCLS_PROFILE") or None
    how = "chosen"
    if not name:
        name, how = detect_profile(), "detected (set REGCLS_PROFILE to choose)"
    if name.endswith(".toml"):
        profile = profile_from_file(name)
        how = f"from {name}"
    elif name not in PROFILES:
        raise RegclsError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}, or name a .toml file")
    else:
        profile = PROFILES[name]
    if verbose:
        print(f"regcls profile: {profile.name} ({how}): {profile.note}")
    return profile


# What a profile file may set, besides its models: the profile's own fields, each with the type it must have.
FILE_FIELDS = {"dataset": str, "limit": int, "labelled": str, "labelled_limit": int,
               "labelled_classes": int, "img_size": int, "alt_img_size": int, "alt_limit": int,
               "batch_size": int, "device": str, "note": str}
MODEL_FIELDS = {"size": str, "arch": str, "tag": str, "weights": str, "overrides": dict, "label": str}


def profile_from_file(path: str | os.PathLike) -> Profile:
    """A profile of your own, from a TOML file, without touching the library::

        name = "my-dinov2"        # claims are recorded under this name: never over the book's
        base = "laptop"           # every setting not given here comes from this profile
        limit = 500               # also: dataset, labelled, labelled_limit, img_size, device, note, ...

        [[models]]
        size = "L"                # the size the chapters compare it as: S, B, L or g
        label = "my L"            # optional: its label in figures and tables (default: L+reg, L)
        arch = "vit_large_patch14_reg4_dinov2"
        weights = "checkpoint:weights/model.safetensors"   # or "hub" (with tag = ...), "random:0"

    The models replace the base profile's (a checkpoint path is relative to the file's folder; timm's, the official
    DINOv2 and Hugging Face's DINOv2 formats load); the chapters beyond the paper (appendix families, DINOv3, the
    test-time register) keep the base profile's models. Errors name the file and the entry."""
    from pathlib import Path

    try:
        import tomllib
    except ImportError:   # Python 3.10
        raise RegclsError("profile files need Python 3.11 or newer (tomllib)") from None
    path = Path(path)
    if not path.is_file():
        raise RegclsError(f"profile file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise RegclsError(f"profile file {path}: {e}") from None
    where = f"profile file {path}"
    unknown = sorted(set(data) - set(FILE_FIELDS) - {"name", "base", "models"})
    if unknown:
        raise RegclsError(f"{where}: unknown settings {', '.join(unknown)}; known: name, base, models, "
                          + ", ".join(FILE_FIELDS))
    name, base = data.get("name"), data.get("base", "laptop")
    if not isinstance(name, str) or not name:
        raise RegclsError(f"{where}: give it a name (name = \"...\"): its claims are recorded under it")
    if name in PROFILES:
        raise RegclsError(f"{where}: the name {name!r} is the book's own profile; choose another, so that its claims "
                          "never replace the book's")
    if base not in PROFILES:
        raise RegclsError(f"{where}: unknown base profile {base!r}; choose one of {', '.join(PROFILES)}")
    settings = {}
    for key, kind in FILE_FIELDS.items():
        if key in data:
            if not isinstance(data[key], kind) or isinstance(data[key], bool):
                raise RegclsError(f"{where}: {key} = {data[key]!r} is not {'a string' if kind is str else 'an integer'}")
            settings[key] = data[key]
    models = PROFILES[base].models
    if "models" in data:
        models = tuple(_model_from_file(m, i, where, path.parent) for i, m in enumerate(data["models"]))
        seen = [(m.size, m.registers) for m in models]
        if len(set(seen)) < len(seen):
            raise RegclsError(f"{where}: two models share a size and a register setting; each size appears once "
                              "with registers and once without at most")
        models = tuple(sorted(models, key=lambda m: (not m.registers, SIZES.index(m.size))))
    return replace(PROFILES[base], name=name, models=models,
                   **{"note": f"{name}, a profile of your own ({path.name}, based on {base})", **settings})


def _model_from_file(entry, i: int, where: str, folder) -> ModelSpec:
    if not isinstance(entry, dict):
        raise RegclsError(f"{where}: models[{i}] is not a table ([[models]] with size, arch, weights)")
    unknown = sorted(set(entry) - set(MODEL_FIELDS))
    if unknown:
        raise RegclsError(f"{where}: models[{i}] has unknown keys {', '.join(unknown)}; known: {', '.join(MODEL_FIELDS)}")
    for key in ("size", "arch"):
        if key not in entry:
            raise RegclsError(f"{where}: models[{i}] needs {key} (a string)")
    for key, kind in MODEL_FIELDS.items():
        if key in entry and not isinstance(entry[key], kind):
            raise RegclsError(f"{where}: models[{i}] {key} = {entry[key]!r} is not "
                              f"{'a string' if kind is str else 'a table'}")
    if entry["size"] not in SIZES:
        raise RegclsError(f"{where}: models[{i}] size {entry['size']!r}: the chapters compare the sizes "
                          f"{', '.join(SIZES)}; give the size your model stands for")
    if "img_size" in entry.get("overrides", {}):
        raise RegclsError(f"{where}: models[{i}] overrides img_size; the resolution is the profile's (img_size = ...)")
    weights = entry.get("weights", "hub")
    kind, _, arg = weights.partition(":")
    if kind == "checkpoint":
        file = (folder / arg).resolve() if not os.path.isabs(arg) else arg
        weights = f"checkpoint:{file}"
    elif kind not in ("hub", "random"):
        raise RegclsError(f"{where}: models[{i}] weights {weights!r}: 'hub', 'random:SEED' or 'checkpoint:PATH'")
    arch = resolve_arch(entry["arch"])
    tag = entry.get("tag") or entry["arch"].partition(".")[2] or None
    return ModelSpec(entry["size"], arch, tag, weights, tuple(sorted(entry.get("overrides", {}).items())),
                     custom_label=entry.get("label"))
