"""Content-keyed cache of traces: a trace is computed once for everything that changes it (model, weights,
images, resolution, precision, schema) and read back afterwards. Interrupted traces resume."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .profiles import ModelSpec, Profile, native_bf16

# The library files whose code decides a trace's numbers (the hooks, the weights, the planted controls, the
# image pipeline) and an image store's pixels: their content is part of each cache key, so a fix in any of them
# is never hidden by a trace computed by the old code.
LIB_ROOT = Path(__file__).resolve().parent
TRACE_SOURCES = ("trace.py", "models.py", "planted.py", "data.py")
STORE_SOURCES = ("data.py",)


def source_digest(names: tuple[str, ...] = TRACE_SOURCES, root: Path | None = None) -> str:
    """SHA-256 (16 hex digits) of the named library files' content."""
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode() + b"\0" + ((root or LIB_ROOT) / name).read_bytes())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    """``REGCLS_CACHE`` or ``~/.cache/regcls``."""
    return Path(os.environ.get("REGCLS_CACHE", Path.home() / ".cache" / "regcls"))


def content_key(parts: dict) -> str:
    """A short hash of a JSON-serialisable description."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resolve_device(device: str) -> str:
    """``"auto"``: CUDA when there is a GPU, else the CPU. ``"cuda"`` without a GPU: the CPU, with a warning."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        import warnings
        warnings.warn("no CUDA device: tracing on the CPU, which is slow for the large models", stacklevel=3)
        return "cpu"
    return device


def get_trace(spec: ModelSpec, dataset: str, *, img_size: int, limit: int | None = None,
              classes: int | None = None, checkpoint: str | Path | None = None, batch_size: int | None = None, device: str = "cpu",
              amp: bool = False, progress: bool = True) -> dict:
    """The trace of ``spec`` on ``dataset`` (from the cache when it is there), as :func:`load_trace` gives."""
    from .data import dataset_files
    from .models import build, weights_id
    from .trace import TRACE_SCHEMA, load_trace, trace_files

    device = resolve_device(device)
    amp = amp and device.startswith("cuda") and native_bf16()  # a T4 (Colab) runs float32 without a warning
    files, ids, labels = dataset_files(dataset, limit, download=True, classes=classes)
    wid = weights_id(spec, checkpoint)
    desc = {"model": spec.describe(), "weights": wid, "dataset": dataset, "ids": content_key({"ids": ids}),
            "img_size": img_size, "amp": amp, "schema": TRACE_SCHEMA, "code": source_digest()}
    path = cache_dir() / "traces" / f"{spec.arch}-{dataset}-{img_size}-{content_key(desc)}.npz"
    if path.is_file():
        return load_trace(path)
    model = build(spec, img_size, checkpoint)
    trace_files(model, files, ids, labels, out=path, img_size=img_size, batch_size=batch_size, device=device,
                amp=amp, progress=progress, store_cache=cache_dir() / "stores" / dataset,
                meta={"model": spec.name, "weights": wid, "dataset": dataset, "model_spec": spec.describe()})
    return load_trace(path)


def trace_for(profile: Profile, spec: ModelSpec, dataset: str | None = None, img_size: int | None = None,
              progress: bool = True) -> dict:
    """The trace of one model on ``profile``'s images and settings (its cap, device and precision).

    ``dataset`` defaults to the profile's unlabelled set and ``img_size`` to the profile's resolution.
    """
    dataset = dataset or profile.dataset
    limit, classes = profile.sample(dataset)
    return get_trace(spec, dataset, img_size=img_size or profile.img_size, limit=limit, classes=classes,
                     batch_size=profile.batch_size, device=profile.device, amp=profile.device != "cpu",
                     progress=progress)


def profile_traces(profile: Profile, registers: bool, dataset: str | None = None, img_size: int | None = None,
                   progress: bool = True) -> dict[str, dict]:
    """Traces of every model of ``profile`` with (or without) registers, keyed by size ("S", ... "g")."""
    return {m.size: trace_for(profile, m, dataset, img_size, progress) for m in profile.models_with(registers)}


def workload(profile: Profile) -> list[tuple[ModelSpec, str, int]]:
    """Every trace the chapters read on ``profile``, as ``(model, dataset, resolution)``, each once."""
    jobs = [(m, profile.dataset, profile.img_size) for reg in (True, False) for m in profile.models_with(reg)]
    jobs += [(m, profile.labelled, profile.img_size) for m in profile.models_with(True)]
    jobs += [(m, profile.dataset, profile.alt_img_size) for m in profile.models_with(True)]
    jobs += [(m, profile.dataset, profile.img_size) for _, models in profile.appendix for m in models]
    return jobs
