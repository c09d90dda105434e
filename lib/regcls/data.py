"""Images: sources (a folder, COCO val2017, ImageNetV2, images shipped with installed packages), the
download of datasets, the eval transform, and the image store that every model reuses.

The store holds each dataset decoded, resized and centre-cropped once per geometry (resolution, crop,
interpolation) as uint8 ``(n, 3, S, S)``; a model only normalises it with its own mean and std.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .download import download
from .env import data_root, hub_reachable
from .files import DAMAGED, STORE_SOURCES, atomic_savez, output_lock, set_aside, source_digest
from .errors import RegclsError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass(frozen=True)
class DatasetSource:
    """A downloadable dataset: where it comes from, how big it is, how to check it, where it unpacks."""

    name: str
    url: str
    filename: str
    size: int                # bytes of the archive
    checksum: str            # "md5:..." or "sha256:..."
    folder: str              # the folder the archive unpacks to, under the data root
    labelled: bool           # class sub-folders
    description: str
    n_images: int = 0        # images in the unpacked folder


DATASETS = {
    "coco-val2017": DatasetSource(
        name="coco-val2017", url="http://images.cocodataset.org/zips/val2017.zip", filename="val2017.zip",
        size=815_585_330, checksum="md5:442b8da7639aecaf257c1dceb8ba8c80", folder="val2017", labelled=False,
        description="MS COCO 2017 validation images (5,000), the paper's image set", n_images=5000),
    "imagenetv2": DatasetSource(
        name="imagenetv2",
        url="https://huggingface.co/datasets/vaishaal/ImageNetV2/resolve/main/imagenetv2-matched-frequency.tar.gz",
        filename="imagenetv2-matched-frequency.tar.gz", size=1_264_079_360,
        checksum="sha256:f0c37fdf925916b19ea1323cd9a2208cdb6959ba2c32eef2a7fc393835c9ca7c",
        folder="imagenetv2-matched-frequency-format-val", labelled=True,
        description="ImageNetV2 matched-frequency (10 images for each of the 1,000 ImageNet classes, no login)",
        n_images=10_000),
}
SHIPPED = {
    "samples": "25 photos and scans that ship with scikit-image, scikit-learn and matplotlib, and 4 random crops of each (125, unlabelled)",
    "samples-crops": "random crops of 8 shipped photos, one class per photo (labelled, generated, seed 0)",
}


# --------------------------------------------------------------------------------- listing

def list_images(folder: str | Path, labelled: bool = False) -> list[Path]:
    """Image files of a folder in sorted name order; with ``labelled``, inside its class sub-folders."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RegclsError(f"image folder {folder} does not exist")
    pattern = "*/*" if labelled else "*"
    files = sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_EXTS
                   and not p.name.startswith("."))
    if not files:
        raise RegclsError(f"no image files ({', '.join(IMAGE_EXTS)}) in {folder}")
    return files


@dataclass(frozen=True)
class ImageList:
    """Image files with their ids (paths relative to their folder) and integer labels (None: unlabelled), kept in
    step: ``images[a:b]`` slices all three."""
    files: list[Path]
    ids: list[str]
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, rows: slice) -> "ImageList":
        if not isinstance(rows, slice):
            raise TypeError("an ImageList is sliced (images[a:b]); its files, ids and labels are its fields")
        return ImageList(self.files[rows], self.ids[rows], None if self.labels is None else self.labels[rows])


def folder_images(folder: str | Path, limit: int | None = None) -> ImageList:
    """The first ``limit`` image files of an unlabelled folder (all when None), in name order."""
    files = list_images(folder)[:limit]
    return ImageList(files, [f.relative_to(Path(folder)).as_posix() for f in files])


def dataset_folder(name: str, download: bool = False) -> Path:
    """The unpacked folder of a dataset; shipped ones are generated on first use.

    With ``download``, a missing downloadable dataset is fetched when the network answers (the chapters do
    this; the CLI asks for ``regcls data download`` instead).
    """
    if name in SHIPPED:
        return make_shipped(name)
    if name not in DATASETS:
        raise RegclsError(f"unknown dataset {name!r}; known: {', '.join([*SHIPPED, *DATASETS])}")
    folder = data_root() / DATASETS[name].folder
    if not folder.is_dir() and download and hub_reachable():
        return download_dataset(name)
    if not folder.is_dir():
        raise RegclsError(f"dataset {name} is not downloaded (looked in {folder}); run: "
                          f"regcls data download {name}   (or set REGCLS_DATA to where it is)")
    return folder


def download_dataset(name: str, progress: bool = True, keep_archive: bool = False) -> Path:
    """Download, verify and unpack a dataset of the registry once (``regcls data download NAME``); its folder."""
    if name not in DATASETS:
        raise RegclsError(f"unknown dataset {name!r}; downloadable: {', '.join(DATASETS)}")
    return download(DATASETS[name], data_root(), progress=progress, keep_archive=keep_archive)


def is_labelled(name: str) -> bool:
    return name == "samples-crops" or (name in DATASETS and DATASETS[name].labelled)


def dataset_files(name: str, limit: int | None = None, download: bool = False,
                  classes: int | None = None) -> ImageList:
    """The image files of a dataset, with ids (paths relative to the dataset folder) and integer labels (or None).

    ``limit`` keeps the first ``limit`` files in sorted order. Labelled sets keep the first ``classes``
    classes (all when None; classes in numeric order of their folder names) and ``ceil(limit / classes)``
    files of each, so every kept class stays; labels are numbered 0..classes-1.
    """
    folder = dataset_folder(name, download=download)
    labelled = is_labelled(name)
    files = list_images(folder, labelled=labelled)
    labels = None
    if labelled:
        names = sorted({f.parent.name for f in files}, key=lambda c: (len(c), c))
        if classes is not None:
            names = names[:classes]
        index = {c: i for i, c in enumerate(names)}
        files = [f for f in files if f.parent.name in index]
        labels = np.array([index[f.parent.name] for f in files])
        if limit is not None and limit < len(files):
            per = -(-limit // len(names))
            keep = np.concatenate([np.flatnonzero(labels == c)[:per] for c in range(len(names))])
            keep.sort()
            files, labels = [files[i] for i in keep], labels[keep]
    elif limit is not None:
        files = files[:limit]
    return ImageList(files, [f.relative_to(folder).as_posix() for f in files], labels)


# ----------------------------------------------------------------------------- shipped images

def _shipped_arrays() -> dict[str, np.ndarray]:
    import matplotlib
    import skimage.data as skd
    from PIL import Image
    from sklearn.datasets import load_sample_images

    names = ["astronaut", "camera", "chelsea", "coffee", "coins", "moon", "page", "rocket", "text", "clock",
             "immunohistochemistry", "hubble_deep_field", "colorwheel", "logo", "grass", "gravel", "brick",
             "retina", "checkerboard", "horse"]
    out = {f"skimage_{n}": np.asarray(getattr(skd, n)()) for n in names}
    for fname, im in zip(load_sample_images().filenames, load_sample_images().images):
        out[f"sklearn_{Path(fname).stem}"] = im
    sample = Path(matplotlib.get_data_path()) / "sample_data"
    for fname in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png"):
        with Image.open(sample / fname) as im:
            out[f"matplotlib_{Path(fname).stem}"] = np.asarray(im)
    return out


SMOKE_CLASSES = ("skimage_astronaut", "skimage_chelsea", "skimage_coffee", "skimage_rocket",
                 "skimage_immunohistochemistry", "skimage_hubble_deep_field", "sklearn_china", "sklearn_flower")


def _random_crop(img, rng: np.random.Generator, size: int):
    """A random square-resized crop (45-85% of each side), flipped half of the time."""
    from PIL import Image

    w, h = img.size
    s = rng.uniform(0.45, 0.85)
    cw, ch = int(w * s), int(h * s)
    x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
    crop = img.crop((x0, y0, x0 + cw, y0 + ch)).resize((size, size), Image.BICUBIC)
    return crop.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


def make_shipped(name: str, crops_per_class: int = 10, seed: int = 0) -> Path:
    """Write a shipped dataset to the data root once (PNG files; labelled sets in class folders)."""
    from PIL import Image

    folder = data_root() / name
    done = folder / ".complete"
    if done.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    arrays = _shipped_arrays()
    rng = np.random.default_rng(seed)
    if name == "samples":  # every photo in its own mode (grayscale, RGBA ...) and 4 random RGB crops of it
        for key, arr in arrays.items():
            arr = (arr * 255).astype(np.uint8) if arr.dtype == bool else arr
            img = Image.fromarray(arr)
            img.save(folder / f"{key}.png")
            for i in range(4):
                _random_crop(img.convert("RGB"), rng, 224).save(folder / f"{key}_crop{i}.png")
    elif name == "samples-crops":
        for c, key in enumerate(SMOKE_CLASSES):
            img = Image.fromarray(arrays[key]).convert("RGB")
            (folder / f"{c}").mkdir(exist_ok=True)
            for i in range(crops_per_class):
                _random_crop(img, rng, 160).save(folder / f"{c}" / f"{key}_{i:02d}.png")
        (folder / "classes.json").write_text(json.dumps(list(SMOKE_CLASSES)))
    else:
        raise RegclsError(f"unknown shipped dataset {name!r}")
    done.write_text("ok\n")
    return folder


# --------------------------------------------------------------------------------- decoding

def load_rgb(path: str | Path):
    """Decode an image file as an RGB PIL image (grayscale, RGBA, palette, CMYK and 16-bit converted).

    Transparent pixels are composited on white. Very large images are allowed (the decompression-bomb
    guard is lifted: the files are the user's own).
    """
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    with Image.open(path) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, dtype=np.float64)  # pragma: no mutate (equivalent)
            hi = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
            scaled = arr / hi * 255.0 + 0.5
            im = Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8))  # pragma: no mutate (in range)
        elif im.mode == "F":
            arr = np.asarray(im, dtype=np.float64)  # pragma: no mutate (equivalent)
            im = Image.fromarray(np.clip(arr * (255.0 if arr.max() <= 1 else 1.0), 0, 255).astype(np.uint8))
        if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))  # pragma: no mutate (equivalent)
            im = Image.alpha_composite(bg, im)
        return im.convert("RGB")


@dataclass(frozen=True)
class Geometry:
    """The model-independent part of timm's eval transform: resize, centre crop (no normalisation)."""

    img_size: int
    crop_pct: float
    interpolation: str
    crop_mode: str

    def key(self) -> str:
        return f"{self.img_size}-{self.crop_pct}-{self.interpolation}-{self.crop_mode}"

    @functools.lru_cache(maxsize=8)   # built once per geometry, not once per image
    def transform(self):
        from timm.data import create_transform

        t = create_transform(input_size=(3, self.img_size, self.img_size), crop_pct=self.crop_pct,
                             interpolation=self.interpolation, crop_mode=self.crop_mode, is_training=False)
        *geometric, to_tensor, normalize = t.transforms
        if type(to_tensor).__name__ not in ("ToTensor", "MaybeToTensor") or type(normalize).__name__ != "Normalize":  # pragma: no mutate (timm's own check)
            raise RegclsError(f"unexpected timm eval transform {t}")  # pragma: no mutate (timm's own check)
        from torchvision.transforms import Compose
        return Compose(geometric)


def eval_config(model, img_size: int, crop_pct: float | None = None
                ) -> tuple[Geometry, tuple[float, ...], tuple[float, ...]]:
    """timm's eval preprocessing for ``model`` at ``img_size``: geometry, mean, std.

    ``crop_pct`` replaces the model's crop fraction (the open choice of preprocessing: timm resizes DINOv2
    images to the input size and crops all of it, 1.0; Hugging Face's processor resizes to 256 and crops 224,
    0.875)."""
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    crop_mode = cfg.get("crop_mode", "center")  # pragma: no mutate (timm always sets it)
    if crop_pct is not None and not 0 < crop_pct <= 1:
        raise RegclsError(f"crop_pct={crop_pct}: give the fraction of the resized image kept, in (0, 1]")
    geo = Geometry(img_size=img_size, crop_pct=float(cfg["crop_pct"] if crop_pct is None else crop_pct),
                   interpolation=cfg["interpolation"], crop_mode=crop_mode)
    return geo, tuple(cfg["mean"]), tuple(cfg["std"])


def _reason(e: Exception) -> str:
    """Why a file could not be read, in one short line."""
    first = str(e).splitlines()[0][:120] if str(e) else ""
    return f"{type(e).__name__}: {first}"


def _decode_one(args) -> tuple[np.ndarray | None, str | None]:
    path, geometry = args
    try:
        img = geometry.transform()(load_rgb(path))
        return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy(), None  # pragma: no mutate (equivalent)
    except Exception as e:  # noqa: BLE001 -- reported by name and counted
        return None, _reason(e)


def scan_images(files: list[Path], progress: bool = True) -> list[tuple[str, str]]:
    """Decode every file once, without resizing; returns ``(file, reason)`` for each unreadable one."""
    from tqdm.auto import tqdm

    bad = []
    for f in tqdm(files, unit="img", desc="check", disable=not progress):
        try:
            load_rgb(f)
        except Exception as e:  # noqa: BLE001 -- reported by name
            bad.append((str(f), _reason(e)))
    return bad


class ImageStore:
    """Decoded, resized images as uint8 ``(n, 3, S, S)`` with their ids, and the files skipped.

    ``store.normalized(mean, std)[i:j]`` gives float32 model input (B, 3, S, S).
    """

    def __init__(self, pixels: np.ndarray, ids: list[str], skipped: list[tuple[str, str]] | None = None):
        self.pixels, self.ids, self.skipped = pixels, list(ids), list(skipped or [])

    def __len__(self) -> int:
        return len(self.ids)

    def normalized(self, mean, std) -> "Normalized":
        return Normalized(self.pixels, mean, std)


class Normalized:
    """Slices of a uint8 store as normalised float32 tensors, exactly as ToTensor + Normalize.

    ``Normalized(...).to("cuda")`` moves each slice as uint8 (a quarter of the float bytes) through a page-locked
    buffer, without blocking, and normalises it on the device.
    """

    def __init__(self, pixels: np.ndarray, mean, std, device: str | torch.device = "cpu"):
        self.pixels, self.device, self.stats = pixels, torch.device(device), (tuple(mean), tuple(std))
        self.staging: list = [(None, None), (None, None)]   # page-locked buffers a slice goes to a GPU through
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)  # pragma: no mutate (equivalent on the CPU)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)  # pragma: no mutate (equivalent on the CPU)

    def to(self, device: str | torch.device) -> "Normalized":
        return Normalized(self.pixels, *self.stats, device=device)  # pragma: no mutate (GPU only)

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, sl: slice) -> torch.Tensor:
        if self.device.type == "cuda":  # pragma: no mutate (GPU only)
            x = self._staged(sl)  # pragma: no mutate (GPU only)
        else:
            x = torch.from_numpy(np.ascontiguousarray(self.pixels[sl]))
        x = x.to(self.device).float().div_(255.0)
        return (x - self.mean) / self.std

    def _staged(self, sl: slice) -> torch.Tensor:  # pragma: no mutate (GPU only)
        """The slice on the GPU, copied without blocking through one of two page-locked buffers used in turn (a
        buffer is filled again only once the copy out of it has ended): page-locked memory for two batches, not
        for the whole store."""
        src = torch.from_numpy(np.ascontiguousarray(self.pixels[sl]))  # pragma: no mutate (GPU only)
        self.staging.append(self.staging.pop(0))  # pragma: no mutate (GPU only)
        buf, done = self.staging[-1]  # pragma: no mutate (GPU only)
        if buf is None or buf.numel() < src.numel():  # pragma: no mutate (GPU only)
            buf = torch.empty(src.numel(), dtype=torch.uint8, pin_memory=True)  # pragma: no mutate (GPU only)
        elif done is not None:  # pragma: no mutate (GPU only)
            done.synchronize()  # pragma: no mutate (GPU only)
        host = buf[:src.numel()].view(src.shape)  # pragma: no mutate (GPU only)
        host.copy_(src)  # pragma: no mutate (GPU only)
        x = host.to(self.device, non_blocking=True)  # pragma: no mutate (GPU only)
        done = torch.cuda.Event()  # pragma: no mutate (GPU only)
        done.record()  # pragma: no mutate (GPU only)
        self.staging[-1] = (buf, done)  # pragma: no mutate (GPU only)
        return x  # pragma: no mutate (GPU only)


def decode_images(files: list[Path], ids: list[str], geometry: Geometry, workers: int | None = None,
                  progress: bool = True) -> ImageStore:
    """Decode and resize files (in worker processes for many files); unreadable files are skipped."""
    from tqdm.auto import tqdm

    jobs = [(f, geometry) for f in files]
    bar = dict(total=len(jobs), unit="img", desc="decode", disable=not progress)  # pragma: no mutate (display)
    workers = min(os.cpu_count() or 1, 8) if workers is None else workers  # pragma: no mutate (speed)
    if workers > 1 and len(files) >= 64:  # pragma: no mutate (speed)
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as ex:  # pragma: no mutate (speed)
            results = list(tqdm(ex.map(_decode_one, jobs, chunksize=16), **bar))
    else:
        results = [_decode_one(j) for j in tqdm(jobs, **bar)]
    good, keep, skipped = [], [], []
    for (arr, err), f, i in zip(results, files, ids):
        if arr is None:
            skipped.append((str(f), err))
            warnings.warn(f"skipped {f}: {err}", stacklevel=2)  # pragma: no mutate (equivalent)
        else:
            good.append(arr)
            keep.append(i)
    if not good:
        raise RegclsError(f"no readable image among {len(files)} files")
    return ImageStore(np.stack(good), keep, skipped)


def image_store(files: list[Path], ids: list[str], geometry: Geometry, cache: Path | None = None,
                progress: bool = True) -> ImageStore:
    """The store for these files at this geometry, read from ``cache`` when it was built before."""
    if cache is None:
        return decode_images(files, ids, geometry, progress=progress)
    digest = hashlib.sha256(("\n".join(ids) + geometry.key() + source_digest(STORE_SOURCES)).encode()).hexdigest()[:16]
    path = Path(cache) / f"store-{geometry.key()}-{digest}.npz"
    with output_lock(path, wait=True):   # one process decodes; another waits and reads it
        if path.is_file():
            try:
                return _read_store(path, len(ids), geometry.img_size)
            except DAMAGED as e:
                set_aside(path, e)
        store = decode_images(files, ids, geometry, progress=progress)
        atomic_savez(path, {"pixels": store.pixels, "ids": np.asarray(store.ids),
                            "skipped": np.asarray(store.skipped, dtype=str).reshape(-1, 2)})
        return store


def _read_store(path: Path, n_files: int, size: int) -> ImageStore:
    """A stored image store, checked: uint8 (n, 3, size, size), one id per image, the skipped files on top."""
    with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:   # closed also when the file is damaged
        pixels, ids, skipped = z["pixels"], [str(i) for i in z["ids"]], z["skipped"]
    skipped = [tuple(s) for s in skipped.tolist()] if skipped.size else []
    if pixels.dtype != np.uint8 or pixels.shape[1:] != (3, size, size) or len(pixels) != len(ids) \
            or len(ids) + len(skipped) != n_files:
        raise RegclsError(f"it holds {pixels.dtype} pixels of shape {pixels.shape} for {len(ids)} ids and "
                          f"{len(skipped)} skipped files, not {n_files} files at {size} px")
    return ImageStore(pixels, ids, skipped)
