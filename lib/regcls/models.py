"""Build a timm ViT by name, load its weights (hub, timm checkpoint, official DINOv2 checkpoint, planted),
and describe its token layout ``[CLS, register_1..R, patch_1..P]``."""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .data import dataset_files, decode_images, eval_config, is_labelled
from .env import checkpoints_dir, hub_offline, hub_reachable
from .errors import RegclsError
from .planted import layer_scales, plant
from .profiles import ModelSpec, resolve_arch
from .testtime import FixedRegisters, TestTimeRegister, find_outlier_neurons, register_means

@dataclass(frozen=True)
class TokenLayout:
    """Where each token type sits in the sequence, and the model's shape."""

    num_prefix: int     # P = 1 + registers
    num_registers: int  # R
    grid: tuple[int, int]
    depth: int          # L blocks
    heads: int          # H
    dim: int            # D

    @property
    def num_tokens(self) -> int:
        """N = P + rows * cols."""
        return self.num_prefix + self.grid[0] * self.grid[1]


def layout(model: nn.Module) -> TokenLayout:
    """Token layout of a (supported) timm VisionTransformer or Eva (DINOv3): [CLS], registers, patches. A test-time
    register (:class:`regcls.testtime.TestTimeRegister`) counts as the last register."""
    attn = model.blocks[-1].attn
    reg = getattr(model, "reg_token", None)
    extra = getattr(model, "test_time_registers", 0)
    registers = getattr(model, "num_reg_tokens", reg.shape[1] if reg is not None else 0) + extra
    return TokenLayout(num_prefix=model.num_prefix_tokens + extra, num_registers=registers,
                       grid=tuple(model.patch_embed.grid_size), depth=len(model.blocks),
                       heads=attn.num_heads, dim=model.embed_dim)


def layer_scale(block: nn.Module) -> torch.Tensor | None:
    """The LayerScale of a block's attention branch (D,), None without one (:func:`regcls.planted.layer_scales`)."""
    return layer_scales(block)[0]


def check_supported(model: nn.Module, name: str = "model") -> None:
    """Refuse, with the reason, anything the trace cannot decompose exactly.

    Supported: timm's ``VisionTransformer`` of pre-norm ``Block`` s with standard ``Attention`` (DINOv2, DeiT III,
    CLIP, ...), and timm's ``Eva`` of pre-norm ``EvaBlock`` s, with a fused ``qkv`` (DINOv3) or separate q, k, v
    projections (EVA02): rotary position embedding on the patch tokens, which changes queries and keys but not
    values, so the decomposition of the [CLS] output into token parts is unchanged."""
    from timm.layers import Attention
    from timm.models.eva import Eva, EvaAttention, EvaBlock
    from timm.models.vision_transformer import Block, VisionTransformer

    if not isinstance(model, (VisionTransformer, Eva)):
        raise RegclsError(f"{name} is a {type(model).__name__}, not a timm VisionTransformer or Eva; "
                          "the trace needs a ViT with a [CLS] token (e.g. DINOv2, DINOv3, DeiT III, CLIP)")
    if model.cls_token is None:
        raise RegclsError(f"{name} has no [CLS] token (class_token=False); the paper's analysis needs one")
    kinds = (EvaBlock, EvaAttention) if isinstance(model, Eva) else (Block, Attention)
    for i, blk in enumerate(model.blocks):
        if type(blk) is not kinds[0] or type(blk.attn) is not kinds[1]:
            raise RegclsError(f"{name} block {i} is {type(blk).__name__}/{type(blk.attn).__name__}; only timm's "
                              f"pre-norm {kinds[0].__name__} with {kinds[1].__name__} is supported")
        if getattr(blk.attn, "qkv", True) is None and getattr(blk.attn, "q_proj", None) is None:
            raise RegclsError(f"{name} block {i} has neither a fused qkv projection nor separate q, k and v ones")
    attn = model.blocks[-1].attn
    if not isinstance(attn.norm, nn.Identity) or getattr(attn, "gate", None) is not None:
        raise RegclsError(f"{name} normalises or gates the attention output, so it is not linear in "
                          "the token parts and cannot be decomposed")


def create(name: str, *, pretrained: bool, img_size: int, overrides: dict | None = None,
           empty: bool = False) -> nn.Module:
    """``timm.create_model`` without a classifier head, at ``img_size``, in eval mode.

    Pretrained weights come from the hub; offline, this fails at once with a one-line error. They are not preceded
    by a random initialisation: the parameters are made on the meta device and the hub's tensors (after timm's
    own conversion: key names, position embedding resampled to the grid) become them (:func:`no_throwaway_init`).
    ``empty``: the parameters stay on the meta device, for :func:`load_checkpoint` to fill.
    """
    import timm

    arch = resolve_arch(name)
    skip = skip_init(arch)
    with torch.device("meta"):  # shape-only build: refuse non-ViTs before any weights exist
        check_supported(timm.create_model(arch, pretrained=False, **skip, **(overrides or {})), name)
    kwargs = dict(num_classes=0, img_size=img_size, **(overrides or {}))
    try:
        with hub_offline(pretrained and not hub_reachable()):   # the local hub cache if it has the weights, no retries
            with no_throwaway_init(pretrained or empty):
                model = timm.create_model(name if pretrained else arch, pretrained=pretrained,
                                          **(skip if pretrained or empty else {}), **kwargs)
            if pretrained and on_meta(model):   # timm loaded these weights its own way: build it the usual way
                model = timm.create_model(name, pretrained=True, **kwargs)
    except RegclsError:
        raise
    except Exception as e:  # noqa: BLE001 -- turned into one line for the user
        if pretrained:
            raise RegclsError(hub_failure(name, e)) from None
        raise RegclsError(f"cannot build {name}: {e}") from None
    check_supported(model, name)
    return model.eval().requires_grad_(False)


def skip_init(arch: str) -> dict:
    """What tells timm to skip a model's weight initialisation, where the model's class can (timm's
    VisionTransformer: ``weight_init="skip"``): for a model whose weights come from a file, or a shape-only build
    (its initialisation on the meta device is slow: half a second for ViT-L)."""
    import timm

    return {"weight_init": "skip"} if timm.models.model_entrypoint(arch).__module__.endswith(".vision_transformer") else {}


@contextlib.contextmanager
def no_throwaway_init(active: bool = True):
    """Inside, modules keep the parameters they make on the meta device -- no memory, no random initialisation
    (seconds for ViT-g) that loaded weights would overwrite -- until the first ``load_state_dict``, which then
    takes the state dict's tensors as the parameters (``assign=True``; floating tensors in the module's own
    dtype) instead of copying them into new ones: the weights are in memory once. Buffers are made as usual
    (a rotary embedding's, computed at construction, stay real). Not thread-safe: it swaps two methods of
    ``nn.Module`` while active."""
    if not active:
        yield
        return
    register, load = nn.Module.register_parameter, nn.Module.load_state_dict
    state = {"meta": True}

    def register_on_meta(module, name, param):
        if state["meta"] and param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    def load_assigning(module, state_dict, strict=True, assign=False):
        state["meta"] = False
        return load(module, own_dtypes(module, state_dict), strict=strict, assign=True)

    nn.Module.register_parameter, nn.Module.load_state_dict = register_on_meta, load_assigning
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.load_state_dict = register, load


def own_dtypes(model: nn.Module, state_dict: dict) -> dict:
    """``state_dict`` with each floating tensor in the dtype of the model's own tensor of that name (a checkpoint
    stored in float16 still loads into a float32 model)."""
    own = model.state_dict()
    return {k: v.to(own[k].dtype) if k in own and v.is_floating_point() and own[k].is_floating_point() else v
            for k, v in state_dict.items()}


def on_meta(model: nn.Module) -> list[str]:
    """The parameters and buffers of ``model`` that hold no data (still on the meta device)."""
    return [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]


def hub_file(name: str) -> Path | None:
    """The cached hub weights file of ``arch.tag`` (``model.safetensors`` or ``pytorch_model.bin``), or None."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    repo = getattr(cfg, "hf_hub_id", None)
    if not repo:
        return None
    repo, _, revision = repo.partition("@")
    for filename in (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin"):
        path = try_to_load_from_cache(repo, filename, revision=revision or None) if filename else None
        if isinstance(path, str):
            return Path(path)
    return None


def hub_failure(name: str, error: Exception) -> str:
    """One line on why the hub weights of ``name`` did not load: not downloaded, or a damaged cached file."""
    import huggingface_hub.constants as hc

    cached = hub_file(name)
    why = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}" if str(error) else type(error).__name__
    damaged = ("safetensor", "deserializ", "header", "eof", "pickle", "incomplete", "truncat", "corrupt", "zip")
    if cached is not None and any(w in why.lower() for w in damaged):
        return (f"the cached weights of {name} ({cached.resolve()}) cannot be read ({why}); the file is "
                "truncated or corrupt: delete it and the next online run downloads it again")
    if cached is not None:
        return f"cannot load the cached weights of {name} ({cached.resolve()}): {why}"
    if hc.HF_HUB_OFFLINE or not hub_reachable():
        return (f"the weights of {name} are not in the hub cache ({hc.HF_HUB_CACHE}) and the hub is offline: "
                "run once with internet to download them, or pass --checkpoint FILE (offline, the smoke profile "
                "needs no weights: REGCLS_PROFILE=smoke)")
    return f"cannot get pretrained weights for {name} from the hub ({why})"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file, read safely (safetensors, or ``torch.load(weights_only=True)``).

    Unwraps the usual containers (``model``, ``state_dict``, ``teacher``), DDP ``module.`` prefixes and the
    ``backbone.`` of DINO/iBOT checkpoints (their projection heads are dropped).
    """
    path = Path(path)
    if not path.is_file():
        raise RegclsError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise RegclsError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") \
            from None
    for key in ("model", "state_dict", "teacher"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise RegclsError(f"checkpoint {path} holds no state dict of tensors")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if any(k.startswith("backbone.") for k in sd):  # DINO/iBOT: keep the backbone, drop projection heads
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    if any(k.startswith(("embeddings.patch_embeddings.", "dinov2.embeddings.")) for k in sd):
        sd = hf_dinov2_to_official(sd)
    return sd


def hf_dinov2_to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Hugging Face ``Dinov2Model`` / ``Dinov2WithRegistersModel`` state dict (the hub files' names --
    ``attention.attention.query``, ``attention.output.dense``, ``mlp.weights_in`` -- or transformers 5's --
    ``q_proj``, ``o_proj``, ``gate_proj``/``up_proj``) in the official DINOv2 format, which timm's filter then
    converts (position embedding resampled, ``w12``/``w3`` to the packed SwiGLU). The ``dinov2.`` of a model
    with a head (``Dinov2ForImageClassification``) is stripped and its classifier dropped; the mask token is
    kept for the filter to drop."""
    if any(k.startswith("dinov2.") for k in sd):
        sd = {k[len("dinov2."):]: v for k, v in sd.items() if k.startswith("dinov2.")}
    top = {"embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
           "embeddings.position_embeddings": "pos_embed", "embeddings.register_tokens": "register_tokens",
           "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
           "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
           "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
    renames = {"norm1": "norm1", "norm2": "norm2", "layer_scale1.lambda1": "ls1.gamma",
               "layer_scale2.lambda1": "ls2.gamma", "attention.output.dense": "attn.proj",
               "attention.o_proj": "attn.proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
               "mlp.weights_in": "mlp.w12", "mlp.weights_out": "mlp.w3", "mlp.down_proj": "mlp.w3"}
    fused = {"attn.qkv": (("attention.attention.query", "attention.attention.key", "attention.attention.value"),
                          ("attention.q_proj", "attention.k_proj", "attention.v_proj")),
             "mlp.w12": (("mlp.gate_proj", "mlp.up_proj"),)}
    out, used = {}, set()
    for k, v in sd.items():
        if k in top:
            out[top[k]] = v
            used.add(k)
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer.")})
    for i in layers:
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for old, new in renames.items():
            for end in ("weight", "bias") if "lambda1" not in old else ("",):
                key = src + old + (f".{end}" if end else "")
                if key in sd:
                    out[dst + new + (f".{end}" if end else "")] = sd[key]
                    used.add(key)
        for new, options in fused.items():
            for parts in options:
                for end in ("weight", "bias"):
                    keys = [f"{src}{p}.{end}" for p in parts]
                    if all(k in sd for k in keys):
                        out[f"{dst}{new}.{end}"] = torch.cat([sd[k] for k in keys])
                        used.update(keys)
    left = sorted(set(sd) - used)
    if left:
        raise RegclsError(f"a Hugging Face DINOv2 checkpoint with keys this loader does not know: {', '.join(left[:6])}"
                          + (f" (+{len(left) - 6} more)" if len(left) > 6 else ""))
    return out


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load a weights file in timm's, the official DINOv2 or Hugging Face's DINOv2 format into ``model`` (strict; the tensors read become
    the parameters, so ``model`` may be built empty: :func:`create` ``empty=True``).

    timm's own filter converts DINOv2 keys (``register_tokens``, ``mask_token``, ``w12``/``w3``) and
    resamples the position embedding to the model's grid. Mismatched keys are named in the error.
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    sd = read_state_dict(path)
    try:
        sd = checkpoint_filter_fn(sd, model)
    except Exception as e:  # noqa: BLE001
        raise RegclsError(f"checkpoint {path} does not fit {type(model).__name__}: {e}") from None
    sd = {k: v for k, v in sd.items() if not (k.startswith("head.") and isinstance(model.head, nn.Identity))}
    sd.pop("masked_embed", None)  # iBOT's mask token (unused at inference)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(sd) & set(own) if sd[k].shape != own[k].shape)
    if missing or unexpected or wrong:
        def few(keys):
            return ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")
        parts = [f"missing keys: {few(missing)}" if missing else "",
                 f"unexpected keys: {few(unexpected)}" if unexpected else "",
                 f"wrong shapes: {few(wrong)}" if wrong else ""]
        raise RegclsError(f"checkpoint {path} does not fit the architecture; "
                          + "; ".join(p for p in parts if p))
    model.load_state_dict(own_dtypes(model, sd), strict=True, assign=True)   # the tensors read become the weights


def build(spec: ModelSpec, img_size: int, checkpoint: str | Path | None = None) -> nn.Module:
    """The model of a profile entry, with its weights: checkpoint, hub, random (seeded) or planted; and its
    test-time register or its registers fixed to their mean, where the entry asks for them (attached for the
    model's life)."""
    model = _with_weights(spec, img_size, checkpoint)
    if spec.testtime is not None:
        model.eval()
        tt = spec.testtime
        neurons = dict(tt.neurons) or find_outlier_neurons(
            model, calibration_images(model, tt.calibration, tt.images, img_size), tt.top_k, tt.search)
        TestTimeRegister(model, neurons).attach()
    if spec.fix_registers is not None:
        model.eval()
        fr = spec.fix_registers
        FixedRegisters(model, register_means(model, calibration_images(model, fr.calibration, fr.images,
                                                                          img_size))).attach()
    return model


def calibration_images(model: nn.Module, dataset: str, n: int, img_size: int) -> torch.Tensor:
    """The first ``n`` images of ``dataset`` (one per class where labelled) as ``model`` sees them (n, 3, S, S)."""
    images = dataset_files(dataset, n, download=True, classes=n if is_labelled(dataset) else None)[:n]
    geometry, mean, std = eval_config(model, img_size)
    store = decode_images(images.files, images.ids, geometry, progress=False)
    return store.normalized(mean, std)[0:len(store)].to(next(model.parameters()).dtype)


def _with_weights(spec: ModelSpec, img_size: int, checkpoint: str | Path | None = None) -> nn.Module:
    overrides = dict(spec.overrides)
    if checkpoint is not None:   # built empty (no random initialisation), the checkpoint's tensors become its weights
        model = create(spec.arch, pretrained=False, img_size=img_size, overrides=overrides, empty=True)
        load_checkpoint(model, checkpoint)
        return model
    if spec.weights == "hub":
        return create(spec.name, pretrained=True, img_size=img_size, overrides=overrides)
    kind, _, arg = spec.weights.partition(":")
    if kind == "random":
        torch.manual_seed(int(arg or 0))
        return create(spec.arch, pretrained=False, img_size=img_size, overrides=overrides)
    if kind == "checkpoint":
        return _with_weights(ModelSpec(spec.size, spec.arch, overrides=spec.overrides), img_size, checkpoint_path(arg))
    if kind == "planted":
        model = create(spec.arch, pretrained=False, img_size=img_size, overrides=overrides)
        return plant(model, arg)
    raise RegclsError(f"unknown weights {spec.weights!r} for {spec.name}")


def checkpoint_path(name: str) -> Path:
    """A checkpoint file named in a profile: absolute, or under ``REGCLS_CHECKPOINTS`` (default
    ``~/.cache/regcls/checkpoints``)."""
    path = Path(name)
    if not path.is_absolute():
        path = checkpoints_dir() / name
    if not path.is_file():
        raise RegclsError(f"checkpoint {path} is missing: download the official file and put it there "
                          "(or set REGCLS_CHECKPOINTS to its folder)")
    return path


def weights_id(spec: ModelSpec, checkpoint: str | Path | None = None) -> str:
    """What identifies the weights in result files and cache keys."""
    if checkpoint is None and spec.weights.startswith("checkpoint:"):
        checkpoint = checkpoint_path(spec.weights.split(":", 1)[1])
    if checkpoint is not None:
        path = Path(checkpoint).resolve()
        st = path.stat()
        return f"checkpoint:{path.name}:sha256={_file_digest(path, st.st_size, st.st_mtime_ns)}"
    return f"hub:{spec.name}" if spec.weights == "hub" else spec.weights


@functools.lru_cache(maxsize=64)
def _file_digest(path: Path, size: int, mtime_ns: int) -> str:
    """SHA-256 (16 hex digits) of a file, read once per (path, size, mtime) in a process: weights are large."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]
