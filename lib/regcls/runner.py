"""Tracing many images: batches to the device, the trace of each, its arrays to their place in the trace file.

One request (a model, its images, its options) is one :func:`run_trace`: the precision is decided once
(:mod:`regcls.precision`), the file is laid out before the first batch (:class:`regcls.tracefile.TraceWriter`), and
each batch travels to the host in one copy and is written once, by a background thread, while the device traces
the next. An interrupted run resumes from its last written batch.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .data import ImageList, Normalized, decode_images, eval_config, image_store
from .env import hardware
from .errors import RegclsError
from .files import disk_error, output_lock
from .models import layout
from .precision import CHECK_KEYS, decide_precision, precision_label, precision_mode
from .trace import Tracer, trace_meta
from .tracefile import STORED, TraceWriter, per_image_shapes, small_arrays


def auto_batch_size(model: nn.Module, device: str, amp: bool = False, cap: int = 512) -> int:
    """Images per batch: 16 on the CPU; on CUDA as many as half the free memory holds (a power of two <= cap);
    memory PyTorch holds in its cache but does not use counts as free.

    Inference holds about N x (6 D + 2 D_mlp) activations per image at once (residual stream, norm, qkv,
    attention output, the MLP's hidden layer before and after its activation); twice that is budgeted.
    An out-of-memory error still halves the batch (:func:`run_trace`).
    """
    if not str(device).startswith("cuda"):
        return 16
    lay = layout(model)
    hidden = max(m.out_features for m in model.blocks[0].mlp.modules() if isinstance(m, nn.Linear))
    per_image = 2 * lay.num_tokens * (6 * lay.dim + 2 * hidden) * (2 if amp else 4)
    dev = torch.device(device)
    free, _ = torch.cuda.mem_get_info(dev)
    free += torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)  # cached by PyTorch: free for us
    fits = max(1, int(0.5 * free // per_image))
    return min(cap, 1 << (fits.bit_length() - 1))


class _Packer:
    """A batch's arrays in one float32 buffer, on its way to the host: one device-to-host copy per batch. On CUDA
    the copy goes, without blocking, into one of ``slots`` page-locked buffers used in turn (the caller lets at
    most ``slots - 1`` earlier batches wait for the disk), and an event marks its end."""

    def __init__(self, slots: int = 3):
        self.slots: list = [None] * slots
        self.turn = 0

    def pack(self, rec: dict[str, torch.Tensor]) -> tuple:
        layout_ = [(k, tuple(rec[k].shape)) for k in STORED]
        flat = torch.cat([rec[k].detach().reshape(-1).to(torch.float32) for k in STORED])
        if flat.device.type != "cuda":  # pragma: no mutate (GPU only)
            return flat, layout_, None
        i, self.turn = self.turn, (self.turn + 1) % len(self.slots)  # pragma: no mutate (GPU only)
        if self.slots[i] is None or self.slots[i].numel() < flat.numel():  # pragma: no mutate (GPU only)
            self.slots[i] = torch.empty(flat.numel(), dtype=torch.float32, pin_memory=True)  # pragma: no mutate (GPU only)
        host = self.slots[i][:flat.numel()]  # pragma: no mutate (GPU only)
        host.copy_(flat, non_blocking=True)  # pragma: no mutate (GPU only)
        done = torch.cuda.Event()  # pragma: no mutate (GPU only)
        done.record()  # pragma: no mutate (GPU only)
        return host, layout_, done


def unpack(packed: tuple) -> dict[str, np.ndarray]:
    """The arrays of :meth:`_Packer.pack`, as float32 numpy views of its buffer (waiting for the copy to end)."""
    host, layout_, done = packed
    if done is not None:
        done.synchronize()  # pragma: no mutate (GPU only)
    buf, out, at = host.numpy(), {}, 0
    for k, shape in layout_:
        size = int(np.prod(shape))
        out[k] = buf[at:at + size].reshape(shape)
        at += size
    return out


class _Batches:
    """Model input for ``images[i:j]``; on CUDA the next batch is copied and normalised on a side stream while
    the current one is traced."""

    def __init__(self, images, device: str, dtype: torch.dtype):
        self.images, self.device, self.dtype = images, torch.device(device), dtype
        self.cuda = self.device.type == "cuda"
        self.side = torch.cuda.Stream(self.device) if self.cuda else None  # pragma: no mutate (GPU only)
        self.ahead: tuple | None = None

    def _load(self, i: int, j: int) -> torch.Tensor:
        return self.images[i:j].to(device=self.device, dtype=self.dtype)

    def get(self, i: int, j: int, next_j: int) -> torch.Tensor:
        """``images[i:j]`` on the device; starts copying ``images[j:next_j]`` (when there are any) behind it."""
        if not self.cuda:
            return self._load(i, j)
        if self.ahead is not None and self.ahead[:2] == (i, j):  # pragma: no mutate (GPU only)
            x = self.ahead[2]  # pragma: no mutate (GPU only)
            torch.cuda.current_stream(self.device).wait_stream(self.side)  # pragma: no mutate (GPU only)
            x.record_stream(torch.cuda.current_stream(self.device))  # pragma: no mutate (GPU only)
        else:
            x = self._load(i, j)  # pragma: no mutate (GPU only)
        self.ahead = None  # pragma: no mutate (GPU only)
        if next_j > j:  # pragma: no mutate (GPU only)
            with torch.cuda.stream(self.side):  # pragma: no mutate (GPU only)
                self.ahead = (j, next_j, self._load(j, next_j))  # pragma: no mutate (GPU only)
        return x


def run_trace(model: nn.Module, images, ids: list[str], *, out: str | Path, meta: dict,
              extra: dict[str, np.ndarray] | None = None, batch_size: int | None = None, device: str = "cpu",
              amp: bool = False, progress: bool = True, check_images=None, timings: dict | None = None) -> Path:
    """Trace all images into ``out`` (.npz), resuming an interrupted run of the same settings.

    The file is laid out in ``out.parts/`` before the first batch; each batch is written to its rows' place as it
    completes (in a background thread, so the device keeps working); at the end the file is completed and moved
    to ``out`` and the folder is removed. An out-of-memory error halves the batch; a full disk or an unwritable
    folder is one line saying how many images are kept.

    Args:
        model: a supported timm ViT (:func:`regcls.models.check_supported`), moved to ``device`` here.
        images: indexable by a slice, giving normalised float images (B, 3, S, S) (see
            :class:`regcls.data.ImageStore`; its slices travel to the device as uint8).
        ids: one id per image, in order; with ``meta`` they make the key that a resumed run must match.
        out: the trace file to write.
        meta: model, weights, dataset and preprocessing, stored in the file; the precision is added here.
        extra: arrays stored beside the trace (e.g. ``labels``), one row per image.
        batch_size: images per batch; None picks one from the free memory (:func:`auto_batch_size`).
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        amp: ask for a lower precision (bfloat16 or float16 autocast, TF32; the trace's own arithmetic stays
            float32), each checked before use, full float32 the last resort (:func:`regcls.precision.decide_precision`).
        progress: show a progress bar.
        check_images: the images the precision check runs on (default: the first of ``images``; shards pass the
            whole request's first images, so that every shard decides alike).
        timings: a dict that receives the seconds of each phase (``check``, ``trace`` -- the device's loop --,
            ``drain`` -- the last writes --, ``finish``; and from the writing thread ``copy_wait`` and ``write``).

    Returns:
        ``out``.
    """
    out = Path(out)
    parts_dir = out.with_name(out.name + ".parts")
    try:
        with output_lock(out):   # a second run on this output refuses in one line, naming this one
            return _trace_into(model, images, ids, out=out, meta=meta, extra=extra, batch_size=batch_size,
                               device=device, amp=amp, progress=progress, check_images=check_images,
                               timings={} if timings is None else timings)
    except OSError as e:
        why = disk_error(e)
        if why is None:
            raise
        kept = images_kept(parts_dir)
        todo = ("free some space, or write elsewhere (--out, REGCLS_CACHE)" if e.errno in (errno.ENOSPC, errno.EDQUOT)
                else "make the folder writable, or write elsewhere (--out, REGCLS_CACHE)")
        what = (f"{kept} of {len(ids)} images traced are kept in {parts_dir}" if kept
                else f"none of {len(ids)} images was kept")
        raise RegclsError(f"{why} writing {e.filename or parts_dir}: {what}; {todo}, then run the same command "
                          "again to resume") from None


def images_kept(parts_dir: Path) -> int:
    """Images an interrupted run left on disk in ``parts_dir`` (``OUT.parts``; read from its progress file), 0 if
    none: a rerun of the same command resumes after them."""
    try:
        return int(json.loads((parts_dir / "progress.json").read_text())["rows"])
    except (OSError, ValueError, KeyError):
        return 0


def _trace_into(model: nn.Module, images, ids: list[str], *, out: Path, meta: dict, extra, batch_size, device, amp,
                progress, check_images, timings: dict) -> Path:
    """:func:`run_trace` under its lock."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    n = len(ids)
    if n == 0:
        raise RegclsError("no images to trace")
    started = time.perf_counter()
    parts_dir = out.with_name(out.name + ".parts")
    _claim(parts_dir, json.dumps({**meta, "image_ids_hash": _hash_ids(ids)}, sort_keys=True, default=str))
    pause_after = int(os.environ.get("REGCLS_TEST_PAUSE_AFTER_BATCHES", 0))  # tests: stop at a known batch
    model = model.to(device)
    if isinstance(images, Normalized):
        images = images.to(device)
    dtype = next(model.parameters()).dtype
    t0 = time.perf_counter()
    mode, checks = decide_precision(model, images if check_images is None else check_images, device=device, amp=amp,
                                    name=meta.get("model", "this model"), decision_file=parts_dir / "precision.json")
    timings["check"] = time.perf_counter() - t0
    batch_size = batch_size or auto_batch_size(model, device, mode in ("bf16", "fp16"))
    slots = 3                     # page-locked buffers: the batch being copied, and at most two waiting for the disk
    writer = TraceWriter(parts_dir, n, per_image_shapes(layout(model)))
    start = writer.rows
    if start:
        print(f"resuming: {start} of {n} images already traced ({parts_dir})", file=sys.stderr, flush=True)
    bias, batches_done = None, 0
    bar = tqdm(total=n, initial=start, unit="img", desc=f"trace {meta.get('model', '')}", disable=not progress)
    batches, packer = _Batches(images, device, dtype), _Packer(slots)
    pool, pending = ThreadPoolExecutor(1), []
    timings.update(copy_wait=0.0, write=0.0)

    def write(i, packed):   # in the writing thread
        t = time.perf_counter()
        arrays = unpack(packed)
        timings["copy_wait"] += time.perf_counter() - t
        t = time.perf_counter()
        writer.write(i, arrays)
        timings["write"] += time.perf_counter() - t

    try:
        t0 = time.perf_counter()
        with Tracer(model) as tracer, precision_mode(device, mode):
            i = start
            while i < n:
                j = min(i + batch_size, n)
                x = batches.get(i, j, min(j + batch_size, n))
                try:
                    rec = tracer.run(x)
                except torch.OutOfMemoryError:
                    if batch_size == 1:
                        raise
                    batch_size = max(1, batch_size // 2)
                    del x
                    torch.cuda.empty_cache()
                    bar.write(f"out of memory: retrying with batch size {batch_size}")
                    continue
                while len(pending) > slots - 1:  # a page-locked buffer is free again once its batch is written
                    pending.pop(0).result()
                pending.append(pool.submit(write, i, packer.pack(rec)))
                del rec
                batches_done += 1
                bias = tracer.bias
                bar.update(j - i)
                i = j
                if pause_after and batches_done == pause_after:  # the batches so far are on disk; wait for a signal
                    for f in pending:
                        f.result()
                    print(f"paused after {pause_after} batches (pid {os.getpid()})", file=sys.stderr, flush=True)
                    while True:
                        time.sleep(0.05)
            if bias is None:  # everything came from an earlier run: one tiny batch recovers the bias, as it made it
                tracer.run(images[0:1].to(device=device, dtype=dtype))
                bias = tracer.bias
            bias = bias.detach().float().cpu().numpy()
        timings["trace"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for f in pending:
            f.result()  # a failed write raises here
        timings["drain"] = time.perf_counter() - t0
    finally:
        pool.shutdown(wait=True)  # finished batches reach the disk, also on an interrupt
        bar.close()
        if writer.rows < n:
            writer.close()
    t0 = time.perf_counter()
    meta = {**meta, "precision": precision_label(device, mode), "precision_mode": mode,
            # what computing it took (a resumed run: its own part), for the time a chapter that reads it shows
            "trace_seconds": round(time.perf_counter() - started, 3), "computed_on": hardware()}
    if amp:   # the checks that decided, each in its own field
        meta = {**meta, "amp_used": mode == "bf16", **{CHECK_KEYS[m]: c for m, c in checks.items()}}
        meta.setdefault("amp_check", None)
    writer.finish(small_arrays({"attn_out_bias": bias, "image_ids": ids, **(extra or {})}, meta), out)
    shutil.rmtree(parts_dir, ignore_errors=True)
    timings["finish"] = time.perf_counter() - t0
    return out


def _claim(parts_dir: Path, key: str) -> None:
    """The parts folder of a run with this key: an earlier run's (same key), resumed; else a new one."""
    key_file = parts_dir / "run.json"
    if parts_dir.is_dir() and key_file.is_file() and key_file.read_text() == key:
        return
    shutil.rmtree(parts_dir, ignore_errors=True)
    parts_dir.mkdir(parents=True)
    key_file.write_text(key)


def _hash_ids(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def trace_files(model: nn.Module, images: ImageList, *, out: str | Path,
                meta: dict, img_size: int, batch_size: int | None = None, device: str = "cpu", amp: bool = False,
                progress: bool = True, store_cache: str | Path | None = None, crop_pct: float | None = None,
                check_files: list | None = None):
    """Decode image files with the model's eval transform and trace them into ``out`` (:func:`run_trace`).

    Args:
        model: a supported timm ViT.
        images: the image files with their ids and labels (:func:`regcls.data.dataset_files`); unreadable files
            are skipped, named and counted; labels (where not None) are stored with the trace.
        out: the trace file to write.
        meta: model, weights and dataset; the preprocessing, the image count and the skipped files are added here.
        img_size: input resolution in pixels.
        batch_size, device, amp, progress: as for :func:`run_trace`.
        store_cache: folder of decoded uint8 image stores, reused by every model of one geometry (None: none).
        crop_pct: the model's crop fraction replaced (None: timm's; :func:`regcls.data.eval_config`).
        check_files: the files the precision check decodes and runs on (a shard passes the whole request's first
            files, so that every shard decides alike).

    Returns:
        The image store (its ``skipped`` lists unreadable files).
    """
    geometry, mean, std = eval_config(model, img_size, crop_pct)
    store = image_store(images.files, images.ids, geometry, cache=store_cache, progress=progress)
    meta = trace_meta(model, img_size=img_size, n_images=len(store), skipped=len(store.skipped), amp=amp,
                      mean=list(mean), std=list(std), geometry=geometry.key(), **meta)
    extra = {}
    if images.labels is not None:
        pos = {i: k for k, i in enumerate(images.ids)}
        extra["labels"] = np.asarray(images.labels)[[pos[i] for i in store.ids]]
    if getattr(model, "fixed_register_means", None) is not None:   # Fix-Reg-Mean's means, with the trace
        extra["register_means"] = model.fixed_register_means.float().cpu().numpy()
    check = None
    if amp and check_files:
        head = decode_images(list(check_files)[:32], [str(f) for f in list(check_files)[:32]], geometry, progress=False)
        check = head.normalized(mean, std)[0:len(head)]
    run_trace(model, store.normalized(mean, std), store.ids, out=out, meta=meta, extra=extra,
              batch_size=batch_size, device=device, amp=amp, progress=progress, check_images=check)
    return store


def shard_range(n: int, shard: str) -> tuple[int, int]:
    """Image range ``[start, stop)`` of shard ``"i/k"`` (0-based) of n images: contiguous, sizes differ by <= 1."""
    try:
        i, k = (int(v) for v in shard.split("/"))
        assert 0 <= i < k
    except (ValueError, AssertionError):
        raise RegclsError(f"--shard expects i/k with 0 <= i < k, got {shard!r}") from None
    return i * n // k, (i + 1) * n // k
