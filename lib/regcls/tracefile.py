"""The trace file: what each array holds (the schema), and the .npz that holds it, written once.

Shapes (n images, H heads, N tokens ``[CLS, registers, patches]``, L blocks, D width, P = 1 + registers):

==================================  ============  =====================================================
key                                 shape         what
==================================  ============  =====================================================
``cls_attn``                        (n, H, N)     last block, [CLS] query, post-softmax attention
``attn_mass``                       (n, L, H, 3)  every block: [CLS] attention summed over [CLS], registers,
                                                  patches
``attn_val_{cls,reg,patch}``        (n, D)        last block, sum of a_i v_i over that token type, heads
                                                  concatenated, before the output projection
``attn_out_{cls,reg,patch}``        (n, D)        the same after the output projection and LayerScale
``attn_out_bias``                   (D,)          the projection bias after LayerScale
``attn_out_full``                   (n, D)        the three parts + the bias: the block's attention branch
``skip``                            (n, D)        [CLS] hidden state entering the last block (derived:
                                                  ``prefix_penult[:, 0]``, not stored twice)
``cls_layers``                      (n, L, D)     [CLS] hidden state after every block (before final norm)
``prefix_penult`` / ``_ln``         (n, P, D)     prefix tokens entering the last block, raw / after norm1
``token_norms_penult``              (n, N)        L2 norm of every token entering the last block
``patch_mean_penult``               (n, D)        mean of the patch tokens entering the last block
``patch_sample_penult``             (n, K, D)     K = 8 patch tokens entering the last block, at the fixed
                                                  grid positions ``patch_sample_index`` (for position probes)
``cls_final``                       (n, D)        final [CLS] embedding (after the final norm)
``contrib_norm`` / ``_ls``          (n, Np)       last block, per patch i: ||W_o (a_i v_i)|| (heads concatenated),
                                                  before / after the LayerScale (Kobayashi et al. 2020)
``contrib_norm_heads``              (n, H, Np)    the same per head, after the LayerScale: ||LS(W_o^h a_hi v_hi)||
``contrib_proj``                    (n, Np)       the same contribution (after LayerScale) projected on the unit
                                                  vector of ``attn_out_full``: signed, sums with the other parts'
                                                  projections to its norm
``rebuilt_{map}_{k}``               (n, D)        the patch contributions (after LayerScale) summed over the top
                                                  ``k`` % of the patches by ``map``: ``attn`` (head-averaged
                                                  attention), ``norm`` (``contrib_norm_ls``), ``proj``
                                                  (``contrib_proj``); k in :data:`TOP_PERCENT`
==================================  ============  =====================================================

Every array is stored as float32, beside ``image_ids``, ``labels`` (labelled sets), ``attn_out_bias`` and the
metadata (``meta_json``: model, weights, dataset, images, resolution, precision, library version, options).

A trace is written once (:class:`TraceWriter`): the final file is laid out before the first image is traced,
each batch goes to its rows' place in it, and an interrupted run resumes from a small progress file.
"""
from __future__ import annotations

import io
import json
import math
import os
import struct
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from . import __version__, files
from .errors import RegclsError
from .files import atomic_savez, atomic_write_text
from .profiles import ModelSpec

TRACE_SCHEMA = 5
MAPS = ("attn", "norm", "proj")          # the maps of the [CLS] over the patches that select patches to rebuild
TOP_PERCENT = (1, 5, 10, 25, 50)         # ... the share of the patches kept, in percent
SELECTED = tuple(f"rebuilt_{m}_{k}" for m in MAPS for k in TOP_PERCENT)
PER_IMAGE = ("cls_attn", "attn_mass", "attn_val_cls", "attn_val_reg", "attn_val_patch", "attn_out_cls",
             "attn_out_reg", "attn_out_patch", "attn_out_full", "skip", "cls_layers", "prefix_penult",
             "prefix_penult_ln", "token_norms_penult", "patch_mean_penult", "patch_sample_penult", "cls_final",
             "contrib_norm", "contrib_norm_ls", "contrib_norm_heads", "contrib_proj", *SELECTED)
DERIVED = ("skip",)   # views of stored arrays, added by Tracer.run and load_trace, never written
STORED = tuple(k for k in PER_IMAGE if k not in DERIVED)
PARTS = ("cls", "reg", "patch")
N_PATCH_SAMPLE = 8


def per_image_shapes(lay) -> dict[str, tuple[int, ...]]:
    """The shape one image has in every stored array of the schema, for a model's :class:`TokenLayout`."""
    H, N, L, D, P = lay.heads, lay.num_tokens, lay.depth, lay.dim, lay.num_prefix
    Np = N - P
    shapes = {"cls_attn": (H, N), "attn_mass": (L, H, 3), "cls_layers": (L, D), "prefix_penult": (P, D),
              "prefix_penult_ln": (P, D), "token_norms_penult": (N,), "patch_sample_penult": (len(patch_sample_index(Np)), D),
              "contrib_norm": (Np,), "contrib_norm_ls": (Np,), "contrib_norm_heads": (H, Np), "contrib_proj": (Np,)}
    return {k: shapes.get(k, (D,)) for k in STORED}   # the rest: one D-vector per image


def patch_sample_index(num_patches: int, k: int = N_PATCH_SAMPLE) -> np.ndarray:
    """K patch indices (raster order) spread evenly over the grid, the same for every image."""
    return np.unique(np.linspace(0, num_patches - 1, min(k, num_patches)).round().astype(int))


def derive(tr: dict) -> None:
    """Add the :data:`DERIVED` arrays as views: ``skip`` (n, D) is the [CLS] of ``prefix_penult``."""
    if "prefix_penult" in tr:
        tr["skip"] = tr["prefix_penult"][:, 0]


def small_arrays(arrays: dict, meta: dict) -> dict[str, np.ndarray]:
    """What a trace file holds beside the per-image float arrays: ``image_ids``, ``labels``, the bias and other
    float arrays (float32), and the metadata as JSON (checked for the fields every reader needs)."""
    for k in ("model", "weights", "dataset", "img_size", "num_prefix_tokens", "num_registers", "grid"):
        if k not in meta:
            raise ValueError(f"trace metadata lacks {k!r}")
    out = {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()
           if k not in ("image_ids", "labels", *DERIVED, *STORED)}
    out["image_ids"] = np.asarray(arrays["image_ids"], dtype=str)
    if "labels" in arrays:
        out["labels"] = np.asarray(arrays["labels"], dtype=np.int64)
    meta = {"regcls_version": __version__, "trace_schema": TRACE_SCHEMA, **meta}
    out["meta_json"] = np.asarray(json.dumps(meta, sort_keys=True, default=str))
    return out


def save_trace(path: str | Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Save a trace held in memory: float32 arrays plus metadata (model, weights, dataset, sizes, version,
    options). A run over many images writes through :class:`TraceWriter` instead."""
    out = {k: np.asarray(arrays[k], dtype=np.float32) for k in STORED if k in arrays}
    atomic_savez(path, {**out, **small_arrays(arrays, meta)})


class Trace(dict):
    """A trace as :func:`load_trace` reads it: the arrays by name (``tr["cls_attn"]``, (n, H, N)), ``tr["meta"]``
    (plain Python), and the token layout and image count as properties."""

    @property
    def meta(self) -> dict:
        return self["meta"]

    @property
    def num_prefix(self) -> int:
        """P = 1 + registers: the patches start at token P."""
        return int(self["meta"]["num_prefix_tokens"])

    @property
    def num_registers(self) -> int:
        return int(self["meta"]["num_registers"])

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of the patch grid."""
        return tuple(int(v) for v in self["meta"]["grid"])

    @property
    def n_images(self) -> int:
        return int(self["meta"].get("n_images", len(self.get("image_ids", ()))))

    @property
    def label(self) -> str:
        """The model's short label for figures and tables: ``L+reg``, ``L``, ``L+ttr``, ``H+ v3``
        (:attr:`ModelSpec.label`)."""
        spec = self["meta"].get("model_spec")
        return (ModelSpec.from_description(spec) if spec else ModelSpec("?", self["meta"]["model"])).label


def load_trace(path: str | Path, meta_only: bool = False, keys: list[str] | None = None) -> Trace:
    """Read a trace: a :class:`Trace` of arrays; ``meta`` holds the metadata as plain Python.

    ``meta_only`` reads just the metadata, ``keys`` just those arrays (the rest of a large trace stays on disk;
    ``skip`` comes with ``prefix_penult``)."""
    path = Path(path)
    if not path.is_file():
        raise RegclsError(f"trace {path} does not exist")
    with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:   # closed also when the file is damaged
        wanted = z.files if keys is None else [k for k in z.files if k in {*keys, "image_ids", "labels"}
                                                or (k == "prefix_penult" and "skip" in keys)]
        tr = {k: z[k] for k in (["meta_json"] if meta_only else [*wanted, "meta_json"])}
    tr["meta"] = json.loads(str(tr.pop("meta_json")))
    if tr["meta"].get("trace_schema") != TRACE_SCHEMA:
        raise RegclsError(f"trace {path} has schema {tr['meta'].get('trace_schema')}, expected {TRACE_SCHEMA}; "
                          "delete it to recompute")
    derive(tr)
    return Trace(tr)


def check_trace(tr: dict, key: str | None = None) -> dict:
    """``tr`` as :func:`load_trace` read it, checked: every array of the schema, one row per image in each, and
    (for a cache entry) the cache key it was written under. Raises :class:`RegclsError` saying what is wrong."""
    missing = [k for k in (*PER_IMAGE, "attn_out_bias", "image_ids") if k not in tr]
    if missing:
        raise RegclsError(f"it lacks {', '.join(missing)}")
    n = len(tr["image_ids"])
    uneven = [k for k in PER_IMAGE if tr[k].shape[:1] != (n,)]
    if uneven or tr["meta"].get("n_images", n) != n:
        raise RegclsError(f"{', '.join(uneven) or 'n_images'} disagree with its {n} image ids")
    if key is not None and tr["meta"].get("cache_key") != key:
        raise RegclsError(f"it was written under cache key {tr['meta'].get('cache_key')}, not {key}")
    return tr


def merge_traces(paths: list[str | Path], out: str | Path) -> Path:
    """Concatenate shard traces (in the given order) into one file equal to a single run over all images."""
    traces = [load_trace(p) for p in paths]
    if not traces:
        raise RegclsError("nothing to merge")

    def settings(t: dict) -> dict:  # what must agree between shards
        return {k: v for k, v in t["meta"].items() if k not in ("n_images", "skipped", "shard", "amp_check", "tf32_check",
                                                                "fp16_check", "trace_seconds", "computed_on")}

    first = settings(traces[0])
    for p, t in zip(paths, traces):
        meta = settings(t)
        if meta != first:
            diff = sorted(k for k in set(meta) | set(first) if meta.get(k) != first.get(k))
            raise RegclsError(f"{p} was traced with other settings ({', '.join(diff)}) and cannot be merged")
        if not np.array_equal(t["attn_out_bias"], traces[0]["attn_out_bias"]):
            raise RegclsError(f"{p} comes from other weights and cannot be merged")
    arrays = {k: np.concatenate([t[k] for t in traces]) for k in STORED}
    arrays["attn_out_bias"] = traces[0]["attn_out_bias"]
    if "register_means" in traces[0]:   # Fix-Reg-Mean: one set of means (their digest is in the settings)
        arrays["register_means"] = traces[0]["register_means"]
    arrays["image_ids"] = np.concatenate([t["image_ids"] for t in traces])
    if "labels" in traces[0]:
        arrays["labels"] = np.concatenate([t["labels"] for t in traces])
    if len(set(arrays["image_ids"].tolist())) != len(arrays["image_ids"]):
        raise RegclsError("the shards overlap (an image appears twice)")
    meta = {**first, "n_images": len(arrays["image_ids"]), "skipped": sum(t["meta"].get("skipped", 0) for t in traces)}
    seconds = [t["meta"]["trace_seconds"] for t in traces if "trace_seconds" in t["meta"]]
    if seconds:   # the shards ran side by side: the slowest
        meta.update(trace_seconds=max(seconds), computed_on=traces[0]["meta"].get("computed_on"))
    for k in ("amp_check", "fp16_check", "tf32_check"):   # shards of one request checked the same images: one check
        checks = [t["meta"].get(k) for t in traces]
        if checks[0] is not None:
            meta[k] = checks[0] if all(c == checks[0] for c in checks) else checks
    meta.pop("regcls_version", None)
    meta.pop("trace_schema", None)
    save_trace(out, arrays, meta)
    return Path(out)


# ------------------------------------------------------------------------------- writing once, in place
# A .npz is a zip archive of .npy members, stored uncompressed. The per-image arrays of a run are members of known
# size (n rows of a known shape), so the archive's layout is known before the first image: each member's local
# header, its .npy header and n rows of float32. Batches are written at their rows' offsets; at the end the local
# headers receive their CRC-32s (computed batch by batch), the small members (ids, labels, bias, metadata) and the
# central directory follow, and the file is moved into place. Every structure is ZIP64, so any size works.

_ZIP64 = 45            # the zip version that has ZIP64 records
_FULL = 0xFFFFFFFF     # "see the ZIP64 extra field"
_DOS_DATE = (1 << 5) | 1   # 1980-01-01: the members carry no time, so a file's bytes depend on its content alone


def _npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue()


def _local_header(name: bytes, size: int, crc: int) -> bytes:
    return struct.pack("<IHHHHHIIIHH", 0x04034B50, _ZIP64, 0, 0, 0, _DOS_DATE, crc, _FULL, _FULL, len(name), 20) \
        + name + struct.pack("<HHQQ", 1, 16, size, size)


def _central_entry(name: bytes, size: int, crc: int, offset: int) -> bytes:
    return struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, _ZIP64, _ZIP64, 0, 0, 0, _DOS_DATE, crc, _FULL, _FULL,
                       len(name), 28, 0, 0, 0, 0, _FULL) + name + struct.pack("<HHQQQ", 1, 24, size, size, offset)


def _end_records(count: int, cd_offset: int, cd_size: int) -> bytes:
    eocd64_at = cd_offset + cd_size
    return (struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, _ZIP64, _ZIP64, 0, 0, count, count, cd_size, cd_offset)
            + struct.pack("<IIQI", 0x07064B50, 0, eocd64_at, 1)
            + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, min(count, 0xFFFF), min(count, 0xFFFF),
                          min(cd_size, _FULL), min(cd_offset, _FULL), 0))


class Member(NamedTuple):
    """One per-image array's place in the file: its local header at ``offset``, its rows from ``data``."""

    key: str
    name: bytes
    offset: int
    npy: bytes          # the .npy header
    data: int           # file offset of row 0
    row_bytes: int

    def size(self, n: int) -> int:
        return len(self.npy) + n * self.row_bytes


def file_layout(n: int, shapes: dict[str, tuple[int, ...]]) -> tuple[list[Member], int]:
    """Where each per-image array of ``n`` images goes in the file (float32 rows of ``shapes``), and where the
    small members begin."""
    members, at = [], 0
    for key, shape in shapes.items():
        name = f"{key}.npy".encode()
        npy = _npy_header((n, *shape))
        local = 30 + len(name) + 20
        m = Member(key, name, at, npy, at + local + len(npy), 4 * math.prod(shape))
        members.append(m)
        at += local + m.size(n)
    return members, at


class TraceWriter:
    """The trace file of one run, written once and in place (see above) in ``folder`` (``OUT.parts``), with its
    progress (images written, each member's running CRC-32) in ``folder/progress.json``.

    ``rows`` says how many images are on disk (more than 0 after a resumed run); :meth:`write` adds the next batch,
    :meth:`finish` completes the file and moves it to its place. Writes go through ``regcls.files._writer`` (the tests' seam for a full disk).
    """

    def __init__(self, folder: Path, n: int, shapes: dict[str, tuple[int, ...]]):
        self.folder, self.n = Path(folder), n
        self.path, self.progress = self.folder / "trace.npz", self.folder / "progress.json"
        self.members, self.end = file_layout(n, shapes)
        self.plan = {"n": n, "shapes": {k: list(s) for k, s in shapes.items()}}
        self.rows, self.crc = 0, {m.key: zlib.crc32(m.npy) for m in self.members}
        self.folder.mkdir(parents=True, exist_ok=True)
        state = json.loads(self.progress.read_text()) if self.progress.is_file() else None
        if state and state["plan"] == self.plan and self.path.is_file() and self.path.stat().st_size >= self.end:
            self.rows, self.crc = state["rows"], state["crc"]
            self.file = files._writer(os.open(self.path, os.O_RDWR))
        else:
            self.progress.unlink(missing_ok=True)
            self.file = files._writer(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644))
            try:
                _reserve(self.file.fileno(), self.end)
                for m in self.members:   # the headers now (the CRCs follow at the end), the rows as they come
                    self._put(m.offset, _local_header(m.name, m.size(n), 0) + m.npy)
                self.file.flush()
            except BaseException:
                self.close()
                raise

    def _put(self, offset: int, data) -> None:
        self.file.seek(offset)
        self.file.write(data)

    def write(self, start: int, arrays: dict[str, np.ndarray]) -> None:
        """Rows ``start ...`` of every member (``arrays[key]``: float32, C order, (b, *shape)), then the progress."""
        if start != self.rows:
            raise ValueError(f"rows {start}... follow row {self.rows}")
        b = 0
        for m in self.members:
            rows = np.ascontiguousarray(arrays[m.key], dtype=np.float32)
            b = len(rows)
            view = memoryview(rows).cast("B")
            if len(view) != b * m.row_bytes:
                raise ValueError(f"{m.key}: {rows.shape[1:]} per image, the file holds {m.row_bytes // 4} floats")
            self._put(m.data + start * m.row_bytes, view)
            self.crc[m.key] = zlib.crc32(view, self.crc[m.key])
        self.file.flush()
        os.fdatasync(self.file.fileno())   # the rows are on disk before the progress says so
        self.rows = start + b
        atomic_write_text(self.progress, json.dumps({"plan": self.plan, "rows": self.rows, "crc": self.crc}))

    def finish(self, small: dict[str, np.ndarray], out: Path) -> None:
        """Complete the file (the CRCs, the ``small`` arrays as members, the directory) and move it to ``out``."""
        if self.rows != self.n:
            raise ValueError(f"{self.rows} of {self.n} images written")
        entries = []
        for m in self.members:
            self._put(m.offset, _local_header(m.name, m.size(self.n), self.crc[m.key]))
            entries.append((m.name, m.size(self.n), self.crc[m.key], m.offset))
        at = self.end
        for key, arr in small.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(arr), allow_pickle=False)
            data, name = buf.getvalue(), f"{key}.npy".encode()
            crc = zlib.crc32(data)
            self._put(at, _local_header(name, len(data), crc) + data)
            entries.append((name, len(data), crc, at))
            at += 30 + len(name) + 20 + len(data)
        directory = b"".join(_central_entry(*e) for e in entries)
        self._put(at, directory + _end_records(len(entries), at, len(directory)))
        self.file.truncate(at + len(directory) + 98)   # nothing after the end records (a larger reserve)
        self.file.flush()
        os.fsync(self.file.fileno())
        self.close()
        os.replace(self.path, out)

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()


def _reserve(fd: int, size: int) -> None:
    """Claim ``size`` bytes of disk for the file now, so that a full disk shows before any work (where the file
    system can; else the file is only extended)."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (95, 22):   # EOPNOTSUPP, EINVAL: a file system without it
            raise
        os.ftruncate(fd, size)
