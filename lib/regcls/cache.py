"""Content-keyed cache of traces: a trace is computed once for everything that changes it (model, weights,
images, resolution, precision, schema) and read back afterwards. Interrupted traces resume."""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import warnings
import weakref
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .data import DATASETS, ImageList, dataset_files, eval_config
from .env import cache_dir, resolve_device, use_amp
from .files import DAMAGED, library_digest, output_lock, set_aside, source_digest
from .models import build, create, layout, weights_id
from .profiles import ModelSpec, Profile
from .launch import World, merge_parts, part_path
from .precision import check_summary
from .runner import shard_range, trace_files
from .errors import RegclsError
from .tracefile import DERIVED, TRACE_SCHEMA, Trace, check_trace, derive, per_image_shapes


def prepare_build(folder: str | Path, profile: str, lib_root: Path | None = None, always: tuple = ()) -> list[str]:
    """Before ``jupyter-book build`` into ``folder`` (``_build``): the execution cache is kept per profile and per
    library content.

    jupyter-cache re-runs a notebook only when its cells change, so a fix in ``lib/regcls`` would never reach a
    rebuilt page, and a smoke build's outputs must never show up in a paper build. When the profile or the
    digest of the library's files differs from the last build's (``folder/.profile``, ``folder/.library``), the
    executed notebooks and Sphinx's doctrees are dropped (and, for another profile, the html). Returns what was
    dropped. The pages in ``always`` (the claims page, which reads what the chapters recorded) are read and run
    by every build: Sphinx re-reads only sources newer than its last build, so they are touched.
    """
    import shutil

    folder = Path(folder)
    lib = library_digest(lib_root)
    dropped = []
    last = {k: (folder / f".{k}").read_text().strip() if (folder / f".{k}").is_file() else None
            for k in ("profile", "library")}
    stale = {"profile": last["profile"] not in (None, profile), "library": last["library"] not in (None, lib)}
    if stale["profile"] or stale["library"]:
        # Sphinx re-reads only changed sources: without its doctrees gone, the pages would not run again
        # the chapters' records (regcls.env.records_dir) go with the executed pages that show them
        for sub in (".jupyter_cache", "jupyter_execute", ".doctrees", "records") + (("html",) if stale["profile"] else ()):
            if (folder / sub).exists():
                shutil.rmtree(folder / sub)
                dropped.append(sub)
    if stale["library"] and not stale["profile"]:
        print("the library changed: every chapter runs again")
    for page in always:
        os.utime(page)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".profile").write_text(profile + "\n")
    (folder / ".library").write_text(lib + "\n")
    return dropped


def content_key(parts: dict) -> str:
    """A short hash of a JSON-serialisable description."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def get_trace(spec: ModelSpec, dataset: str, *, img_size: int, limit: int | None = None,
              classes: int | None = None, checkpoint: str | Path | None = None, batch_size: int | None = None, device: str = "cpu",
              amp: bool = False, progress: bool = True, crop_pct: float | None = None) -> dict:
    """The trace of ``spec`` on ``dataset`` (from the cache when it is there), a :class:`CachedTrace` (its arrays
    read from the file as they are used).

    The cache key holds everything that changes the numbers (model, weights, dataset, images, resolution,
    preprocessing, precision, schema and the trace code); a damaged entry is set aside and computed again.

    Args:
        spec: the model and its weights (hub, a local checkpoint, or a planted control).
        dataset: a name in :data:`regcls.data.DATASETS` (downloaded where it is missing and allowed).
        img_size: input resolution in pixels.
        limit: at most this many images (None: all; a profile passes its own, capped by ``REGCLS_LIMIT``).
        classes: the first images of this many classes (labelled sets).
        checkpoint: a local weights file instead of ``spec``'s (official DINOv2 or timm format).
        batch_size: images per batch (None: from the free memory).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``.
        amp: ask for bfloat16 where the GPU has it natively (checked before use; :func:`regcls.trace.run_trace`).
        progress: show progress bars.
        crop_pct: the model's crop fraction replaced (None: timm's, see :func:`regcls.data.eval_config`).
    """
    device = resolve_device(device)
    e = _entry(spec, dataset, img_size, limit, classes, checkpoint, device, amp, crop_pct)
    # One process computes an entry; another that needs it meanwhile waits and reads it. A damaged entry (cut
    # short, garbage, another shape or key) is moved aside with a warning and computed again.
    with output_lock(e.path, wait=True):
        if e.path.is_file():
            try:
                return _loaded(read_cached(e.path, e.key))
            except DAMAGED as err:
                set_aside(e.path, err)
        _trace_entry(e, e.images, e.path, batch_size, device, progress)
        return _loaded(read_cached(e.path), computed=True)


class Entry(NamedTuple):
    """A cache entry: where it lives, the key it is written under, and what computes it."""

    path: Path
    key: str
    spec: ModelSpec
    dataset: str
    images: ImageList
    img_size: int
    checkpoint: str | Path | None
    amp: bool
    crop_pct: float | None


def _entry(spec, dataset, img_size, limit, classes, checkpoint, device, amp, crop_pct) -> Entry:
    amp = amp and use_amp(device)  # a lower precision on a GPU (each step checked), float32 on the CPU
    images = dataset_files(dataset, limit, download=True, classes=classes)
    desc = {"model": spec.describe(), "weights": weights_id(spec, checkpoint), "dataset": dataset,
            "ids": content_key({"ids": images.ids}), "img_size": img_size, "crop_pct": crop_pct, "amp": amp,
            "schema": TRACE_SCHEMA, "code": source_digest()}
    key = content_key(desc)
    path = cache_dir() / "traces" / f"{spec.arch}-{dataset}-{img_size}-{key}.npz"
    return Entry(path, key, spec, dataset, images, img_size, checkpoint, amp, crop_pct)


# While :func:`model_reuse` is active: the model built last, with what built it (one model: the last goes before
# the next is built).
_REUSE: dict | None = None


@contextlib.contextmanager
def model_reuse():
    """Inside, consecutive traces of one model (the same spec, resolution and checkpoint; e.g. on both datasets and
    with the other crop) share one built model instead of loading its weights again; it is released on exit.
    ``regcls cache`` (and so ``make book``) and :func:`profile_traces` use it."""
    global _REUSE
    outer = _REUSE is not None
    if not outer:
        _REUSE = {}
    try:
        yield
    finally:
        if not outer:
            _REUSE = None


def _model(e: Entry):
    """The model of an entry: built, or the one :func:`model_reuse` holds for it."""
    if _REUSE is None:
        return build(e.spec, e.img_size, e.checkpoint)
    key = (json.dumps(e.spec.describe(), sort_keys=True, default=str), e.img_size, str(e.checkpoint))
    if _REUSE.get("key") != key:
        _REUSE.clear()   # the model before goes first: one model in memory at a time
        _REUSE.update(key=key, model=build(e.spec, e.img_size, e.checkpoint))
    return _REUSE["model"]


def _trace_entry(e: Entry, images: ImageList, out: Path, batch_size, device, progress, shard: str | None = None):
    model = _model(e)
    trace_files(model, images, out=out, img_size=e.img_size, batch_size=batch_size, device=device, amp=e.amp,
                progress=progress, store_cache=cache_dir() / "stores" / e.dataset, crop_pct=e.crop_pct,
                check_files=e.images.files[:32] if shard else None,
                meta={"model": e.spec.name, "weights": weights_id(e.spec, e.checkpoint), "dataset": e.dataset,
                      "model_spec": e.spec.describe(), "cache_key": e.key, **({"shard": shard} if shard else {})})


def fill_shard(spec: ModelSpec, dataset: str, world: World, *, img_size: int, limit: int | None = None,
               classes: int | None = None, checkpoint: str | Path | None = None, batch_size: int | None = None,
               device: str = "cpu", amp: bool = False, progress: bool = True, crop_pct: float | None = None) -> Path:
    """One torchrun rank's share of a cache entry (arguments as :func:`get_trace`): its shard of the images into
    its own part beside the entry (kept on a rerun); rank 0 then waits for every part and merges them into the
    entry. Returns the entry's path (complete on rank 0)."""
    e = _entry(spec, dataset, img_size, limit, classes, checkpoint, device, amp, crop_pct)
    if e.path.is_file():
        return e.path
    part = part_path(e.path, world.shard)
    if not part.is_file():
        a, b = shard_range(len(e.images), world.shard)
        _trace_entry(e, e.images[a:b], part, batch_size, device, progress, shard=world.shard)
    if world.rank == 0:
        with output_lock(e.path, wait=True):
            merge_parts(e.path, world.size)
    return e.path


# The precision of every trace this process has read (model and setting -> its precision label, with the checks
# that decided it), for the line at the end of each chapter (regcls.page.finish), and what each of them is (model,
# dataset, resolution, images), for the chapter's record of what it read.
PRECISIONS: dict[str, str] = {}
READ: dict[str, dict] = {}
# Every trace read, as a weak reference (READ key, the trace), and each time the arrays held grew (a trace read, or
# an array of one read from its file) what every trace still alive held then: (READ key, bytes per image), one
# entry per copy. The largest of these sums, each trace's bytes scaled to the full run's images, is what the
# chapter holds at most on the full run (tests/rehearsal.py).
_ALIVE: list[tuple[str, weakref.ref]] = []
HELD: list[list[tuple[str, float]]] = []
# What ``keep`` (profile_traces) returned of each trace, (READ key, bytes per image): counted as held to the end of
# the chapter (a chapter keeps such summaries; they cannot be followed by weak reference).
KEPT: list[tuple[str, float]] = []


def held_now() -> list[tuple[str, float]]:
    """(READ key, bytes per image held) of every trace read so far that is still alive, in the order read, and of
    what was kept of the traces read through ``keep``."""
    alive = [(k, r, r()) for k, r in _ALIVE]
    _ALIVE[:] = [(k, r) for k, r, t in alive if t is not None]
    return [(k, _bytes_per_image(t)) for k, _, t in alive if t is not None] + KEPT


def _bytes_per_image(trace: dict) -> float:
    """Bytes the trace's per-image arrays hold in memory, per image (views such as ``skip`` not counted twice)."""
    n = len(dict.get(trace, "image_ids", ())) or 1
    return sum(a.nbytes for k, a in dict.items(trace) if isinstance(a, np.ndarray) and k not in DERIVED
               and a.ndim and a.shape[0] == n) / n


def _kept_bytes(obj, n: int) -> float:
    """Bytes of the per-image arrays (first dimension ``n``) in ``obj`` and the dicts, lists and tuples inside it."""
    if isinstance(obj, np.ndarray):
        return float(obj.nbytes) if obj.ndim and obj.shape[0] == n and obj.base is None else 0.0
    if isinstance(obj, dict):
        obj = obj.values()
    return sum(_kept_bytes(v, n) for v in obj) if isinstance(obj, (list, tuple, type({}.values()))) else 0.0


def _keep(keep, trace: dict):
    """``keep(trace)``, noted in :data:`KEPT` with its bytes per image."""
    out = keep(trace)
    n = len(dict.get(trace, "image_ids", ())) or 1
    key = next((k for k, r in reversed(_ALIVE) if r() is trace), None)
    if key is not None:
        KEPT.append((key, _kept_bytes(out, n) / n))
        HELD.append(held_now())
    return out


class CachedTrace(Trace):
    """A trace read from the cache whose arrays are read from its file the first time each is used: a chapter holds
    only the arrays it uses (of a ViT-g trace of 10,000 ImageNet images, 5.3 GiB in all, the knockout reads under 0.5).
    ``image_ids``, ``labels`` and ``meta`` are read at once; ``shapes`` has every array's shape."""

    def __init__(self, path: Path, small: dict, shapes: dict[str, tuple[int, ...]]):
        super().__init__(small)
        self.path, self.shapes = path, shapes

    def __missing__(self, key: str):
        if key in DERIVED and "prefix_penult" in self.shapes:
            self["prefix_penult"]   # skip is its view (tracefile.derive)
            return dict.__getitem__(self, key)
        if key not in self.shapes:
            raise KeyError(key)
        try:
            with open(self.path, "rb") as f, np.load(f, allow_pickle=False) as z:
                value = z[key]
        except (OSError, ValueError, zipfile.BadZipFile) as e:   # damaged since it was checked (a bad CRC, say)
            with warnings.catch_warnings():   # set_aside's warning would say it is computed again: not here
                warnings.simplefilter("ignore")
                set_aside(self.path, e)
            raise RegclsError(f"trace {self.path} is damaged ({key}: {e}); it was set aside: run again to "
                              "recompute it") from None
        self[key] = value
        if key == "prefix_penult":
            derive(self)
        HELD.append(held_now())
        return value

    def __contains__(self, key) -> bool:
        return dict.__contains__(self, key) or key in self.shapes or (key in DERIVED and "prefix_penult" in self.shapes)

    def get(self, key, default=None):
        return self[key] if key in self else default


def read_cached(path: Path, key: str | None = None) -> CachedTrace:
    """The trace in ``path`` as a :class:`CachedTrace`, checked as :func:`regcls.tracefile.check_trace` checks a
    trace (every array of the schema, one row per image, the cache key) from the arrays' headers alone."""
    path = Path(path)
    shapes = {}
    with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:   # one opening: headers and the small arrays
        for name in z.zip.namelist():
            with z.zip.open(name) as m:
                major, _ = np.lib.format.read_magic(m)
                header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shapes[name.removesuffix(".npy")] = header(m)[0]
        small = {k: z[k] for k in ("image_ids", "labels", "meta_json") if k in shapes}
    small["meta"] = json.loads(str(small.pop("meta_json")))
    if small["meta"].get("trace_schema") != TRACE_SCHEMA:
        raise RegclsError(f"trace {path} has schema {small['meta'].get('trace_schema')}, expected {TRACE_SCHEMA}")
    del shapes["meta_json"]
    # check_trace reads each array's shape: stand-ins of that shape holding one float each (zero strides)
    stand_in = {k: np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), shape=s, strides=(0,) * len(s))
                for k, s in shapes.items() if k not in small}
    derive(stand_in)
    check_trace({**stand_in, **small}, key)
    return CachedTrace(path, small, shapes)


def _loaded(trace: dict, computed: bool = False) -> dict:
    """Note a trace a chapter read (``computed``: computed by this process, not read from the cache)."""
    meta = trace["meta"]
    label = meta.get("precision", "float32")
    checks = [(m, meta.get(k)) for m, k in (("bf16", "amp_check"), ("fp16", "fp16_check"), ("TF32", "tf32_check"))]
    said = [f"{m} check {'passed' if c['ok'] else 'failed'}: {check_summary(c)}" for m, c in checks if isinstance(c, dict)]
    if said:   # a lower precision was asked for: the checks decided, with these figures
        label += f" ({'; '.join(said)})"
    crop = "" if meta.get("geometry", "").split("-")[1:2] in ([], ["1.0"]) else f", {meta['geometry']}"
    ttr = (" with a test-time register" if "test_time_neurons" in meta else "") + (
        " with fixed registers" if "fixed_register_means_sha256" in meta else "")
    key = f"{meta.get('model', '?')}{ttr} on {meta.get('dataset', '?')} at {meta.get('img_size', '?')} px{crop}"
    PRECISIONS[key] = label
    READ[key] = {"model": meta.get("model"), "arch": meta.get("model_spec", {}).get("arch"),
                 "overrides": meta.get("model_spec", {}).get("overrides", {}), "dataset": meta.get("dataset"),
                 "img_size": meta.get("img_size"), "geometry": meta.get("geometry"), "images": meta.get("n_images"),
                 "precision": meta.get("precision_mode", "fp32"), "seconds": meta.get("trace_seconds"),
                 "computed_on": meta.get("computed_on"), "computed_here": computed}
    _ALIVE.append((key, weakref.ref(trace)))
    HELD.append(held_now())
    return trace


def trace_for(profile: Profile, spec: ModelSpec, dataset: str | None = None, img_size: int | None = None,
              progress: bool = True, crop_pct: float | None = None) -> dict:
    """The trace of one model on ``profile``'s images and settings (its cap, device and precision).

    ``dataset`` defaults to the profile's unlabelled set, ``img_size`` to the profile's resolution and
    ``crop_pct`` to the model's own preprocessing.
    """
    dataset = dataset or profile.dataset
    img_size = img_size or profile.img_size
    return get_trace(spec, dataset, img_size=img_size, progress=progress, crop_pct=crop_pct,
                     **profile_options(profile, dataset, img_size))


def profile_options(profile: Profile, dataset: str, img_size: int | None = None) -> dict:
    """What ``profile`` passes to :func:`get_trace` for ``dataset`` at ``img_size``: its image cap and classes
    (``REGCLS_LIMIT`` applied; fewer images at the other resolution where the profile says so), batch size, device
    and precision."""
    limit, classes = profile.sample(dataset, img_size=img_size)
    return dict(limit=limit, classes=classes, batch_size=profile.batch_size, device=profile.device,
                amp=profile.device != "cpu")


def profile_traces(profile: Profile, registers: bool, dataset: str | None = None, img_size: int | None = None,
                   progress: bool = True, crop_pct: float | None = None, specs=None, keep=None) -> dict[str, dict]:
    """Traces of every DINOv2 model of ``profile`` with (or without) registers, keyed by size ("S", ... "g"); or of
    ``specs`` (e.g. ``profile.dinov3``), keyed by their sizes. With ``keep`` (a function of one trace), what it
    returns instead of each trace, every trace let go before the next is read: a full run's traces can take more
    memory together than the machine has (a ViT-g trace of 10,000 ImageNet images holds 5 GiB)."""
    models = profile.models_with(registers) if specs is None else list(specs)
    out = {}
    with model_reuse():
        for m in models:
            trace = trace_for(profile, m, dataset, img_size, progress, crop_pct)
            out[m.size] = _keep(keep, trace) if keep else trace
            del trace   # with keep: let it go before the next is read
    return out


class Job(NamedTuple):
    """One trace the chapters read: model, dataset, resolution and (None: the model's own) crop fraction."""

    spec: ModelSpec
    dataset: str
    img_size: int
    crop_pct: float | None = None


def disk_needed(profile: Profile, capped: bool = False) -> float:
    """Bytes the cache needs for every trace of ``profile``'s workload (float32, as written) and the decoded image
    stores (uint8, one per dataset and geometry), from the schema's shapes and the datasets' sizes; ``capped``: under
    ``REGCLS_LIMIT``."""
    import torch

    total, stores = 0.0, set()
    for job in workload(profile):
        n = profile.sample(job.dataset, capped=capped, img_size=job.img_size)[0] or (
            DATASETS[job.dataset].n_images if job.dataset in DATASETS else len(dataset_files(job.dataset)))
        with torch.device("meta"):
            model = create(job.spec.arch, pretrained=False, img_size=job.img_size, overrides=dict(job.spec.overrides))
        floats = sum(math.prod(s) for s in per_image_shapes(layout(model)).values())
        total += n * (4.0 * floats + 256) + 20_000     # + each image's id, and each file's headers and metadata
        geometry = (job.dataset, eval_config(model, job.img_size, job.crop_pct)[0].key())   # one store per geometry
        if geometry not in stores:
            stores.add(geometry)
            total += n * 3.0 * job.img_size ** 2
    return total


def workload(profile: Profile) -> list[Job]:
    """Every trace the chapters read on ``profile``, each once: both model series on the unlabelled set and on the
    labelled set (the models without registers there for the "your model" chapter), the models with registers at
    the other resolution and with the other preprocessing, the models without registers at the other resolution
    (Sec. 4.1's sensitivity), the appendix families, and beyond
    the paper DINOv3 on both sets, also at its own input size, the model with a test-time register (with the
    model it is built on, where the profile does not trace that already), and the models with registers fixed to
    their mean (Fix-Reg-Mean) on both sets."""
    jobs = [Job(m, profile.dataset, profile.img_size) for reg in (True, False) for m in profile.models_with(reg)]
    jobs += [Job(m, profile.labelled, profile.img_size) for reg in (True, False) for m in profile.models_with(reg)]
    jobs += [Job(m, profile.dataset, profile.alt_img_size) for reg in (True, False) for m in profile.models_with(reg)]
    jobs += [Job(m, profile.dataset, profile.img_size, profile.alt_crop_pct) for m in profile.models_with(True)]
    jobs += [Job(m, profile.dataset, profile.img_size) for _, models in profile.appendix for m in models]
    jobs += [Job(m, ds, px) for m in profile.dinov3 for ds, px in ((profile.dataset, profile.img_size),
                                                                 (profile.dataset, profile.dinov3_img_size),
                                                                 (profile.labelled, profile.img_size))]
    if profile.testtime is not None:
        for m in (replace(profile.testtime, testtime=None), profile.testtime):
            if Job(m, profile.dataset, profile.img_size) not in jobs:
                jobs.append(Job(m, profile.dataset, profile.img_size))
    jobs += [Job(profile.with_fixed_registers(m, ds), ds, profile.img_size)
             for ds in (profile.dataset, profile.labelled) for m in profile.models_with(True)]
    return jobs
