"""Dataset downloads: progress bar, resume of a partial download, checksum, unpack once."""
from __future__ import annotations

import hashlib
import shutil
import tarfile
import urllib.request
import zipfile
from pathlib import Path

from .errors import RegclsError


def verify(path: Path, checksum: str) -> bool:
    """True when the file's digest matches ``"md5:..."`` / ``"sha256:..."``."""
    algo, _, want = checksum.partition(":")
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest() == want


def fetch(url: str, dest: Path, size: int | None = None, progress: bool = True, timeout: float = 30) -> Path:
    """Download ``url`` to ``dest``, continuing a ``dest.part`` left by an interrupted run."""
    from tqdm.auto import tqdm

    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except Exception as e:  # noqa: BLE001
        raise RegclsError(f"cannot download {url}: {e}; check the network, or put the unpacked dataset "
                          f"under {dest.parent} yourself") from None
    with resp:
        if have and resp.status != 206:  # server ignored the range: start over
            have = 0
        total = size or (have + int(resp.headers.get("Content-Length", 0)) or None)
        with open(part, "ab" if have else "wb") as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                                          desc=dest.name, disable=not progress) as bar:
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                f.write(chunk)
                bar.update(len(chunk))
    part.replace(dest)
    return dest


def unpack(archive: Path, into: Path) -> None:
    """Extract a zip or tar (any compression) into ``into``, refusing paths that leave it."""
    into.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for name in z.namelist():
                if not (into / name).resolve().is_relative_to(into.resolve()):
                    raise RegclsError(f"{archive} holds an unsafe path {name!r}")
            z.extractall(into)
    else:
        with tarfile.open(archive, "r:*") as t:
            t.extractall(into, filter="data")


def download(src, root: Path, progress: bool = True, keep_archive: bool = False) -> Path:
    """Download, verify and unpack one archive into ``root`` once; returns its folder.

    ``src`` describes it (a :class:`regcls.data.DatasetSource`: ``url``, ``filename``, ``size``, ``checksum``,
    ``folder`` it unpacks to); the registry of datasets is :mod:`regcls.data`'s."""
    name = src.name
    folder = root / src.folder
    if (folder / ".complete").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    archive = root / src.filename
    if not archive.is_file():
        fetch(src.url, archive, src.size, progress)
    if not verify(archive, src.checksum):
        archive.rename(archive.with_name(archive.name + ".bad"))
        raise RegclsError(f"{archive.name} failed its checksum ({src.checksum.split(':')[0]}); it was moved "
                          "aside as .bad: run the command again to download it afresh")
    tmp = root / f".unpack-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    unpack(archive, tmp)
    if not (tmp / src.folder).is_dir():
        raise RegclsError(f"{archive.name} did not unpack to {src.folder}/")
    shutil.rmtree(folder, ignore_errors=True)
    (tmp / src.folder).rename(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    (folder / ".complete").write_text(f"{src.checksum}\n")
    if not keep_archive:
        archive.unlink()
    return folder
