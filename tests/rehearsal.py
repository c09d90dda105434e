"""Rehearsal of a real profile (``laptop``, ``colab`` or ``paper``), offline: everything the real run touches but
the network.

    python tests/rehearsal.py --profile laptop [--limit N] [--workdir DIR] [--clean]

1. A Hugging Face hub cache in the hub's own layout (``models--timm--NAME/{refs/main, blobs/, snapshots/REV/
   model.safetensors}``) with full-size random weights of every hub model the profile names, written as timm's
   hub files are: timm's key names, the pretrained config's classifier, DINOv2 at its native 518 px grid (37 x 37),
   so ``timm.create_model(NAME, pretrained=True)`` runs its real loading path, checkpoint filter and
   position-embedding resampling.
2. The datasets as their archives unpack (COCO ``val2017/000000xxxxxx.jpg``; ImageNetV2
   ``imagenetv2-matched-frequency-format-val/<0..999>/*.jpeg``), built from the photos that ship with
   scikit-image and scikit-learn, packed as the real archives are (zip, tar.gz), served from 127.0.0.1 and
   fetched, verified and unpacked by ``regcls.download`` (only the URL and checksum are this test's).
3. iBOT checkpoints in the official key format (random weights) where the appendix looks for them.
4. Every trace the chapters read (:func:`regcls.cache.workload`), each in its own process: wall time, time
   tracing, images/s, peak resident memory, and the GPU time projected from FLOPs for the uncapped run.
5. The book built on that profile with ``REGCLS_REHEARSAL=1`` (every page carries the rehearsal banner, checked);
   on ``colab`` instead every chapter executed on its own as Colab runs it (nbclient, a fresh kernel each, the
   banner checked in its outputs), and every claim row of Sections 3 and 4 judged (none "not testable").
6. Each chapter's record of its run (:func:`regcls.page.record_run`): seconds, peak resident memory, the traces it
   read, and from those its forward FLOPs on the full profile and its projected time on the profile's GPU.

Results: ``WORKDIR/rehearsal.json`` and ``WORKDIR/rehearsal.md``. Rehearsal code lives with the tests, not in
the library: nothing here is used by a real run.
"""
from __future__ import annotations

import argparse
import hashlib
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:   # torch loads inside the functions that need it (the server process does without)
    import torch

ROOT = Path(__file__).resolve().parents[1]
REVISION = hashlib.sha1(b"regcls rehearsal: random weights").hexdigest()  # the commit refs/main names
MEMORY_LIMIT_GB = {"laptop": 24.0, "paper": 24.0, "colab": 10.0}   # this machine and CI's; a free Colab machine
# has about 12.7 GB of host memory, so no step of the colab profile may take more than 10 GB
GPU_TFLOPS, GPU_MFU = 989.0, 0.25  # the projection's assumption: an H100's dense bf16 peak at 25% utilisation
# a Colab T4: float16 tensor cores (65 TFLOP/s dense) at 30% utilisation; float32 (8.1 TFLOP/s) at 50%, for a model
# whose float16 check fails
T4 = {"fp16": 65.0 * 0.30, "fp32": 8.1 * 0.50}
MAIN_SECTIONS = ("3.", "4.")    # the paper's main claims: every row of them is judged on colab
COCO_IMAGES = 64                # generated COCO-layout images (caps above this see only these)
IMAGENET_PER_CLASS = 2          # generated images in each of the 1,000 ImageNetV2 class folders


# ------------------------------------------------------------------------------------------ hub

def hub_specs(profile) -> list:
    """Every model of the profile that loads from the hub (DINOv2, the appendix's timm models and DINOv3)."""
    specs = list(profile.models) + [m for _, ms in profile.appendix for m in ms] + list(profile.dinov3)
    return [m for m in specs if m.weights == "hub"]


def _random_tensor(key: str, shape: tuple, gen) -> torch.Tensor:
    """Random weights with sensible scales: unit-ish LayerNorm gains, LayerScale 0.1, 1/sqrt(fan_in) matrices."""
    import torch

    last = key.rsplit(".", 1)[-1]
    noise = torch.randn(shape, generator=gen)
    if last in ("gamma", "gamma_1", "gamma_2") or key.endswith(".ls1.scale") or key.endswith(".ls2.scale"):
        return noise.mul_(0.02).add_(0.1)
    if last == "bias":
        return noise.mul_(0.02)
    if last == "weight" and len(shape) == 1:       # LayerNorm gains
        return noise.mul_(0.1).add_(1.0)
    if last == "weight":
        return noise.div_(float(np.prod(shape[1:])) ** 0.5)
    return noise.mul_(0.1 if "pos_embed" in key else 0.02)   # cls/reg tokens, position embedding


def write_hub_model(name: str, hub: Path) -> Path:
    """``models--timm--NAME`` in ``hub`` with random weights in the form of timm's hub file; returns the file."""
    import timm
    import torch
    from safetensors.torch import save_file

    cfg = timm.models.get_pretrained_cfg(name)
    repo = hub / f"models--{cfg.hf_hub_id.replace('/', '--')}"
    target = repo / "snapshots" / REVISION / "model.safetensors"
    if target.is_file() and (repo / "refs" / "main").is_file():
        return target
    with torch.device("meta"):  # the hub file's shapes: native resolution, pretrained classifier
        shapes = {k: tuple(v.shape) for k, v in timm.create_model(name, pretrained=False).state_dict().items()}
    gen = torch.Generator().manual_seed(int(hashlib.sha1(name.encode()).hexdigest()[:8], 16))
    sd = {k: _random_tensor(k, s, gen) for k, s in shapes.items()}
    blob = repo / "blobs" / hashlib.sha256(f"{name}:{REVISION}".encode()).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(blob) + ".tmp", metadata={"format": "pt", "regcls_rehearsal": "random weights"})
    os.replace(str(blob) + ".tmp", blob)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    target.symlink_to(os.path.relpath(blob, target.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)
    return target


def write_ibot_checkpoints(profile, folder: Path) -> list[Path]:
    """The appendix's iBOT files in the official release's format: ``{"state_dict": {"module.backbone.*",
    "module.head.*"}}`` with the mask embedding, random weights at full size."""
    import timm
    import torch

    out = []
    for _, specs in profile.appendix:
        for m in specs:
            if not m.weights.startswith("checkpoint:"):
                continue
            path = folder / m.weights.split(":", 1)[1]
            out.append(path)
            if path.is_file():
                continue
            with torch.device("meta"):
                shapes = {k: tuple(v.shape) for k, v in timm.create_model(m.arch, pretrained=False, num_classes=0)
                          .state_dict().items()}
            gen = torch.Generator().manual_seed(1)
            sd = {f"module.backbone.{k}": _random_tensor(k, s, gen) for k, s in shapes.items()}
            dim = shapes["cls_token"][-1]
            sd["module.backbone.masked_embed"] = torch.zeros(dim)
            sd["module.head.mlp.0.weight"] = _random_tensor("head.mlp.0.weight", (256, dim), gen)
            sd["module.head.last_layer.weight_g"] = torch.ones(8192, 1)
            folder.mkdir(parents=True, exist_ok=True)
            torch.save({"state_dict": sd, "epoch": 800}, str(path) + ".tmp")
            os.replace(str(path) + ".tmp", path)
    return out


# ------------------------------------------------------------------------------------- datasets

def _photos() -> list:
    from PIL import Image

    from regcls.data import _shipped_arrays

    out = []
    for arr in _shipped_arrays().values():
        arr = (arr * 255).astype(np.uint8) if arr.dtype == bool else arr
        if arr.ndim == 3 and arr.shape[2] in (3, 4) and min(arr.shape[:2]) >= 200:
            out.append(Image.fromarray(arr[..., :3]))
    return out


def _crop(img, rng, size):
    w, h = img.size
    s = rng.uniform(0.5, 1.0)
    cw, ch = int(w * s), int(h * s)
    x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
    return img.crop((x, y, x + cw, y + ch)).resize(size)


def coco_archive(n: int = COCO_IMAGES) -> bytes:
    """``val2017.zip``: ``val2017/000000xxxxxx.jpg`` in COCO's sizes, a few grayscale as in the real set."""
    rng = np.random.default_rng(0)
    photos = _photos()
    ids = sorted(rng.choice(np.arange(100, 581_000), n, replace=False))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("val2017/", b"")
        for k, i in enumerate(ids):
            size = [(640, 480), (480, 640), (640, 427), (500, 375)][k % 4]
            img = _crop(photos[k % len(photos)], rng, size)
            if k % 16 == 5:
                img = img.convert("L")
            im = io.BytesIO()
            img.save(im, format="JPEG", quality=85)
            z.writestr(f"val2017/{i:012d}.jpg", im.getvalue())
    return buf.getvalue()


def imagenetv2_archive(per_class: int = IMAGENET_PER_CLASS) -> bytes:
    """``imagenetv2-matched-frequency.tar.gz``: 1,000 class folders ``0``..``999`` of ``<sha1>.jpeg`` files."""
    rng = np.random.default_rng(1)
    photos = _photos()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as t:
        top = "imagenetv2-matched-frequency-format-val"
        for c in range(1000):
            for j in range(per_class):
                img = _crop(photos[(c + j) % len(photos)], rng, (96 + 8 * (c % 5), 80))
                im = io.BytesIO()
                img.save(im, format="JPEG", quality=80)
                data = im.getvalue()
                info = tarfile.TarInfo(f"{top}/{c}/{hashlib.sha1(data).hexdigest()}.jpeg")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class _Files(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}

    def do_GET(self):  # noqa: N802
        data = self.files.get(self.path.lstrip("/"))
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


def download_datasets(names: list[str]) -> None:
    """Serve the generated archives from 127.0.0.1 and run the real download (fetch, checksum, unpack)."""
    from regcls import data
    from regcls.data import download_dataset as download

    make = {"coco-val2017": coco_archive, "imagenetv2": imagenetv2_archive}
    todo = [n for n in names if n in make and not (data.data_root() / data.DATASETS[n].folder / ".complete").is_file()]
    if not todo:
        return
    _Files.files = {data.DATASETS[n].filename: make[n]() for n in todo}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        for n in todo:
            src, payload = data.DATASETS[n], _Files.files[data.DATASETS[n].filename]
            data.DATASETS[n] = data.DatasetSource(**{
                **src.__dict__, "url": f"http://127.0.0.1:{httpd.server_port}/{src.filename}", "size": len(payload),
                "checksum": "sha256:" + hashlib.sha256(payload).hexdigest()})
            folder = download(n, progress=False)
            print(f"downloaded {n}: {len(payload) / 1e6:.1f} MB archive -> {folder}")
            data.DATASETS[n] = src
    finally:
        httpd.shutdown()


# --------------------------------------------------------------------------------------- traces

def trace_one(profile_name: str, index: int, out: Path) -> None:
    """One trace of the workload, in this process; its measurements go to ``out`` (JSON)."""
    import regcls.runner as R
    from regcls.bench import _status_mb, flops_per_image  # VmHWM: peak since exec (ru_maxrss keeps the parent's)
    from regcls.cache import trace_for, workload
    from regcls.models import create
    from regcls.profiles import PROFILES

    profile = PROFILES[profile_name]
    spec, dataset, img_size, crop_pct = workload(profile)[index]
    timed = {}
    run_trace = R.run_trace

    def timed_run(*a, **k):
        t = time.perf_counter()
        r = run_trace(*a, **k)
        timed["trace_s"] = time.perf_counter() - t
        return r

    R.run_trace = timed_run
    start = time.perf_counter()
    tr = trace_for(profile, spec, dataset, img_size, progress=False, crop_pct=crop_pct)
    wall = time.perf_counter() - start
    import torch
    with torch.device("meta"):
        gflop = flops_per_image(create(spec.arch, pretrained=False, img_size=img_size,
                                       overrides=dict(spec.overrides))) / 1e9
    full = _full_images(profile, dataset, img_size)
    n = len(tr["image_ids"])
    t4 = {f"t4_{m}_s_projected": full * gflop / (tf * 1e3) for m, tf in T4.items()}
    out.write_text(json.dumps({
        "model": spec.name, "dataset": dataset, "img_size": img_size, "crop_pct": crop_pct, "images": n,
        "wall_s": wall, "trace_s": timed.get("trace_s"), "img_per_s": n / timed["trace_s"] if "trace_s" in timed else None,
        "peak_rss_gb": _status_mb("VmHWM") / 1024, "gflop_per_img": gflop,
        "full_images": full, "gpu_s_projected": full * gflop / (GPU_TFLOPS * 1e3 * GPU_MFU), **t4}))


def _full_images(profile, dataset: str, img_size: int | None = None) -> int:
    """Images of ``dataset`` the uncapped profile traces."""
    from regcls.data import DATASETS

    limit, classes = profile.sample(dataset, capped=False, img_size=img_size)
    total = DATASETS[dataset].n_images if dataset in DATASETS else 0
    if classes:
        total = min(total, classes * 10)
    return min(limit, total) if limit else total


def run_traces(profile, work: Path) -> list[dict]:
    from regcls.cache import workload

    from regcls.cache import content_key, source_digest
    from regcls.profiles import image_cap

    rows = []
    jobs = workload(profile)
    for i, (spec, dataset, img_size, crop_pct) in enumerate(jobs):
        # a measurement is kept for a resumed rehearsal only if it is of this job, this cap and this code
        key = content_key({"job": [spec.describe(), dataset, img_size, crop_pct], "cap": image_cap(),
                           "code": source_digest()})
        out = work / "measure" / f"{i:02d}-{key}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        if not out.is_file():
            r = subprocess.run([sys.executable, __file__, "_trace", "--profile", profile.name, "--index", str(i),
                                "--json", str(out)], env=os.environ.copy())
            if r.returncode != 0:
                raise SystemExit(f"rehearsal: trace {i} ({spec.name}, {dataset}, {img_size} px) failed "
                                 f"with exit code {r.returncode}")
        row = json.loads(out.read_text())
        rows.append(row)
        print(f"[{i + 1}/{len(jobs)}] {row['model']} {row['dataset']} {_px(row)} px: {row['images']} images, "
              f"{row['wall_s']:.1f} s wall, {row['img_per_s'] or float('nan'):.2f} img/s, "
              f"peak {row['peak_rss_gb']:.1f} GiB", flush=True)
        if row["peak_rss_gb"] > MEMORY_LIMIT_GB[profile.name]:
            raise SystemExit(f"rehearsal: {row['model']} at {row['img_size']} px peaked at "
                             f"{row['peak_rss_gb']:.1f} GiB, over {MEMORY_LIMIT_GB[profile.name]} GiB")
    return rows


# ----------------------------------------------------------------------------------------- book

def build_book(out: Path) -> Path:
    """Execute every chapter and build the site into ``out`` (afresh); returns the html folder."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(Path(sys.executable).with_name("jupyter-book")), "build", str(ROOT), "--path-output", str(out),
           "--warningiserror", "--nitpick", "--keep-going"]
    r = subprocess.run(cmd, env=os.environ.copy(), cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"rehearsal: the book build failed (exit {r.returncode}); see the log above")
    return out / "_build" / "html"


def run_chapters_as_colab(out: Path) -> list[str]:
    """Every chapter executed on its own, as Colab runs it: a fresh kernel each (nbclient), the executed notebook
    kept in ``out``; each must carry the rehearsal banner in its outputs. Returns the chapters run."""
    import nbformat
    from nbclient import NotebookClient

    out.mkdir(parents=True, exist_ok=True)
    names = []
    for path in sorted((ROOT / "chapters").glob("*.ipynb"), key=lambda p: (p.name == "summary_claims.ipynb", p.name)):
        t = time.perf_counter()
        nb = nbformat.read(path, as_version=4)
        try:
            NotebookClient(nb, timeout=3600, kernel_name="python3",
                           resources={"metadata": {"path": str(ROOT / "chapters")}}).execute()
        except Exception as e:  # noqa: BLE001 -- which chapter, in one line
            raise SystemExit(f"rehearsal: {path.name} failed as Colab runs it: {str(e).splitlines()[0][:300]}")
        nbformat.write(nb, out / path.name)
        text = json.dumps([c.get("outputs", []) for c in nb.cells])
        if path.name != "summary_claims.ipynb" and "regcls-rehearsal-banner" not in text:
            raise SystemExit(f"rehearsal: {path.name} ran without the rehearsal banner")
        print(f"chapter {path.stem}: {time.perf_counter() - t:.0f} s", flush=True)
        names.append(path.name)
    return names


def check_main_claims_judged(profile_name: str, cache: Path) -> list[dict]:
    """Every claim row of the paper's Sections 3 and 4 is judged (agrees or not), none "not testable": the profile
    has what every main claim needs. Returns the rows, each with the widest interval its numbers show."""
    import re

    rows = [r for f in sorted((cache / "claims" / profile_name).glob("*.json")) for r in json.loads(f.read_text())
            if r["section"].startswith(MAIN_SECTIONS)]
    untested = [f"{r['section']} {r['claim']}" for r in rows if r["agrees"] is None]
    if not rows or untested:
        raise SystemExit(f"rehearsal: {len(untested)} main claim rows not testable on {profile_name}: "
                         + "; ".join(untested[:5]) if rows else "rehearsal: no main claim rows were recorded")
    interval = re.compile(r"\[(-?\d+\.\d+), (-?\d+\.\d+)\]")
    return [{"section": r["section"], "claim": r["claim"], "agrees": r["agrees"], "images_cap": r["images_cap"],
             "widest_interval": max((float(b) - float(a) for a, b in interval.findall(r["ours"])), default=None)}
            for r in rows]


def chapter_rows(profile, cache: Path) -> list[dict]:
    """Each chapter's record (:func:`regcls.page.record_run`) with the forward FLOPs of the traces it read on the
    full profile and their projected GPU time (an H100, and a Colab T4 in float16 or float32): what one chapter
    costs when it is the first one run (nothing cached); and its peak memory projected to the full run: the
    rehearsal's peak plus what the traces it held at once held (``held`` in its record: the arrays it had read of
    each, in bytes per image, measured each time they grew), scaled to the images the cap left out, at the largest
    (the arrays a chapter holds grow with the images; its models are on the GPU)."""
    import torch

    from regcls.bench import flops_per_image
    from regcls.models import create

    rows = []
    for f in sorted((cache / "chapters" / profile.name).glob("*.json")):
        rec = json.loads(f.read_text())
        pflop, more = 0.0, []
        for t in rec["traces"]:
            more.append(0.0)
            if not t.get("arch") or t.get("dataset") not in (profile.dataset, profile.labelled):
                continue   # the planted controls every profile traces on shipped images: seconds
            with torch.device("meta"):
                model = create(t["arch"], pretrained=False, img_size=t["img_size"], overrides=t.get("overrides") or {})
            full = _full_images(profile, t["dataset"], t["img_size"])
            pflop += full * flops_per_image(model) / 1e15
            more[-1] = max(0, full - (t.get("images") or 0)) / 2**30   # GiB per byte per image
        sums = [sum(more[i] * per_image for i, per_image in held) for held in rec["held"]]
        top = max(range(len(sums)), key=sums.__getitem__, default=None)   # the snapshot that holds the most
        held_gb = sums[top] if top is not None else 0.0
        rows.append({"chapter": rec["chapter"], "traces": len(rec["traces"]),
                     "held_at_once": len({i for i, _ in rec["held"][top]}) if top is not None else 0,
                     "seconds": rec["seconds"],
                     "peak_rss_gb": rec["peak_rss_gb"], "full_run_gb": (rec["peak_rss_gb"] or 0) + held_gb, "pflop": pflop,
                     "h100_min": pflop * 1e3 / (GPU_TFLOPS * GPU_MFU) / 60,
                     **{f"t4_{m}_min": pflop * 1e3 / tf / 60 for m, tf in T4.items()}})
    return rows


def check_chapter_memory(profile, rows: list[dict]) -> None:
    """Every chapter's projected full-run memory within the profile's limit; else one line naming each over it."""
    over = [r for r in rows if r["full_run_gb"] > MEMORY_LIMIT_GB[profile.name]]
    if over:
        raise SystemExit(f"rehearsal: on the full {profile.name} run, over {MEMORY_LIMIT_GB[profile.name]} GiB: "
                         + "; ".join(f"chapter {r['chapter']} would hold {r['full_run_gb']:.1f} GiB "
                                     f"({r['held_at_once']} traces at once)" for r in over))


def chapter_table(rows: list[dict]) -> str:
    head = ("| chapter | traces read | held at once | rehearsal s | peak RSS GiB | full run GiB (projected) | PFLOP (full run) | "
            "H100 min | T4 min, float16 | T4 min, float32 |\n|---|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(f"| {r['chapter']} | {r['traces']} | {r['held_at_once']} | {r['seconds']:.0f} | {r['peak_rss_gb'] or float('nan'):.1f} | "
                          f"{r['full_run_gb']:.1f} | {r['pflop']:.2f} | {r['h100_min']:.1f} | {r['t4_fp16_min']:.1f} | "
                          f"{r['t4_fp32_min']:.1f} |\n" for r in rows)


def check_pages(html: Path) -> list[str]:
    """Every chapter page carries the rehearsal banner; returns the pages checked."""
    pages = sorted((html / "chapters").glob("*.html"))
    if not pages:
        raise SystemExit(f"rehearsal: no chapter pages in {html}")
    bad = [p.name for p in pages if "regcls-rehearsal-banner" not in p.read_text(errors="replace")]
    if bad:
        raise SystemExit(f"rehearsal: pages without the rehearsal banner: {', '.join(bad)}")
    return [p.name for p in pages]


def _px(row: dict) -> str:
    """The resolution, with the crop fraction where a trace overrides the model's preprocessing."""
    return f"{row['img_size']}" + (f" (crop {row['crop_pct']})" if row.get("crop_pct") else "")


def table(rows: list[dict]) -> str:
    head = ("| model | dataset | px | images | wall s | trace s | img/s | peak RSS GiB | GFLOP/img | "
            "projected GPU s (full run) |\n|---|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['model']} | {r['dataset']} | {_px(r)} | {r['images']} | {r['wall_s']:.1f} | "
        f"{r['trace_s'] or float('nan'):.1f} | {r['img_per_s'] or float('nan'):.2f} | {r['peak_rss_gb']:.1f} | "
        f"{r['gflop_per_img']:.0f} | {r['gpu_s_projected']:.1f} |\n" for r in rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", nargs="?", default="run", choices=["run", "_trace"])
    ap.add_argument("--profile", default="laptop", choices=["laptop", "colab", "paper"])
    ap.add_argument("--limit", type=int, default=None,
                    help="REGCLS_LIMIT for the run (default: 16 laptop, 4 colab and paper)")
    ap.add_argument("--workdir", type=Path, default=None, help="default: _rehearsal/PROFILE in the repository")
    ap.add_argument("--clean", action="store_true", help="delete the mock hub afterwards (it is large)")
    ap.add_argument("--index", type=int)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.mode == "_trace":
        trace_one(args.profile, args.index, args.json)
        return 0

    work = (args.workdir or ROOT / "_rehearsal" / args.profile).resolve()
    limit = args.limit or {"laptop": 16, "colab": 4, "paper": 4}[args.profile]
    os.environ.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(work / "hub"), REGCLS_PROFILE=args.profile,
                      REGCLS_LIMIT=str(limit), REGCLS_REHEARSAL="1", REGCLS_DATA=str(work / "data"),
                      REGCLS_CACHE=str(work / "cache"), REGCLS_CHECKPOINTS=str(work / "checkpoints"))
    os.environ.pop("HF_HOME", None)
    from regcls.profiles import PROFILES

    profile = PROFILES[args.profile]
    t0 = time.perf_counter()
    specs = hub_specs(profile)
    for k, m in enumerate(specs, 1):
        t = time.perf_counter()
        f = write_hub_model(m.name, work / "hub")
        print(f"hub [{k}/{len(specs)}] {m.name}: {f.stat().st_size / 1e9:.2f} GB ({time.perf_counter() - t:.0f} s)",
              flush=True)
    write_ibot_checkpoints(profile, work / "checkpoints")
    download_datasets([profile.dataset, profile.labelled])
    t_setup = time.perf_counter() - t0
    rows = run_traces(profile, work)
    t_traces = time.perf_counter() - t0 - t_setup
    traced = set((work / "cache" / "traces").glob("*.npz"))
    shutil.rmtree(work / "cache" / "chapters", ignore_errors=True)   # this run's chapter records only
    if args.profile == "colab":   # Colab runs one notebook at a time, not the book
        html = work / "executed"
        pages = run_chapters_as_colab(html)
        judged = check_main_claims_judged(args.profile, work / "cache")
        print(f"rehearsal: every one of the {len(judged)} claim rows of Sections 3 and 4 is judged on {args.profile}")
    else:
        html = build_book(work / "book")
        pages = check_pages(html)
    chapters = chapter_rows(profile, work / "cache")
    extra = sorted(p.name for p in set((work / "cache" / "traces").glob("*.npz")) - traced
                   if f"-{profile.dataset}-" in p.name or f"-{profile.labelled}-" in p.name)  # not the controls'
    if extra:  # the workload is what the benchmark projects and the rehearsal measures: it must be complete
        raise SystemExit(f"rehearsal: the chapters traced {len(extra)} models that regcls.cache.workload does not "
                         f"list: {', '.join(extra)}")
    t_all = time.perf_counter() - t0
    summary = {"profile": args.profile, "limit": limit, "setup_s": t_setup, "traces_s": t_traces,
               "book_s": t_all - t_setup - t_traces, "total_s": t_all, "pages": pages, "traces": rows,
               "chapters": chapters, "t4_assumption": {k: f"{v:.2f} TFLOP/s" for k, v in T4.items()},
               "main_claims": judged if args.profile == "colab" else None,
               "gpu_assumption": f"{GPU_TFLOPS:.0f} TFLOP/s bf16 at {GPU_MFU:.0%} MFU (an H100)",
               "cpu": f"{os.cpu_count()} cores", "python": sys.version.split()[0]}
    (work / "rehearsal.json").write_text(json.dumps(summary, indent=1))
    (work / "rehearsal.md").write_text(table(rows) + "\n" + chapter_table(chapters))
    print(table(rows))
    print(chapter_table(chapters))
    print(f"rehearsal of {args.profile} (REGCLS_LIMIT={limit}): setup {t_setup:.0f} s, traces {t_traces:.0f} s, "
          f"{'chapters' if args.profile == 'colab' else 'book'} {summary['book_s']:.0f} s, total {t_all:.0f} s; "
          f"{len(pages)} chapter pages carry the banner; {'executed notebooks' if args.profile == 'colab' else 'site'}: "
          f"{html}")
    if args.clean:
        shutil.rmtree(work / "hub", ignore_errors=True)
    check_chapter_memory(profile, chapters)   # after the report is written: it says what each chapter holds
    return 0


if __name__ == "__main__":
    sys.exit(main())
