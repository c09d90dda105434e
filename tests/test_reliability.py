"""Bad input, interruptions, out-of-memory and downloads: clear errors, counted skips, nothing lost."""
import hashlib
import http.server
import io
import os
import signal
import subprocess
import sys
import threading
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import TINY_CLI, random_png_folder

from regcls.data import Geometry, decode_images, list_images, load_rgb
from regcls.errors import RegclsError
from regcls.runner import images_kept

ARCH_ARGS = TINY_CLI


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "regcls", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def odd_folder(tmp_path):
    """Every image mode that must convert, plus three broken files."""
    d = tmp_path / "odd"
    d.mkdir()
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(d / "a_rgb.jpg")
    Image.fromarray(rgb[..., 0]).save(d / "b_gray.png")
    Image.fromarray(np.dstack([rgb, rng.integers(0, 255, (30, 40), dtype=np.uint8)])).save(d / "c_rgba.png")
    Image.fromarray(rgb).convert("P").save(d / "d_palette.png")
    Image.fromarray(rgb).convert("CMYK").save(d / "e_cmyk.jpg")
    Image.fromarray((rng.integers(0, 65535, (30, 40))).astype(np.uint16)).save(d / "f_16bit.png")
    Image.fromarray(rgb[:1, :1]).save(d / "g_1x1.png")
    Image.fromarray(np.zeros((3000, 4000, 3), np.uint8)).save(d / "h_large.png")
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG")
    (d / "x_truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (d / "y_not_an_image.jpg").write_text("hello, I am text")
    (d / "z_empty.png").write_bytes(b"")
    return d


def test_every_mode_converts_to_rgb(odd_folder):
    for f in list_images(odd_folder)[:8]:
        im = load_rgb(f)
        assert im.mode == "RGB", f
    arr16 = np.asarray(load_rgb(odd_folder / "f_16bit.png"))
    assert arr16.max() > 200 and arr16.min() < 50  # scaled from 16 bits, not clipped to white


def test_broken_files_are_skipped_by_name_and_counted(odd_folder):
    files = list_images(odd_folder)
    with pytest.warns(UserWarning) as rec:
        store = decode_images(files, [f.name for f in files], Geometry(56, 1.0, "bicubic", "center"), progress=False)
    assert len(store) == 8 and store.pixels.shape == (8, 3, 56, 56)
    assert sorted(os.path.basename(f) for f, _ in store.skipped) == ["x_truncated.jpg", "y_not_an_image.jpg", "z_empty.png"]
    assert sum("skipped" in str(w.message) for w in rec) == 3


def test_cli_skips_with_count_and_exit_zero(odd_folder, tmp_path):
    r = run_cli("trace", *ARCH_ARGS, "--images", str(odd_folder), "--out", str(tmp_path / "t.npz"))
    assert r.returncode == 0, r.stderr
    assert "skipped 3 unreadable files" in r.stdout
    for name in ("x_truncated.jpg", "y_not_an_image.jpg", "z_empty.png"):
        assert name in r.stderr


def test_cli_strict_fails_before_any_work(odd_folder, tmp_path):
    r = run_cli("trace", *ARCH_ARGS, "--images", str(odd_folder), "--strict", "--out", str(tmp_path / "t.npz"))
    assert r.returncode == 2
    assert r.stderr.startswith("error: 3 unreadable image files (--strict)") and r.stderr.count("\n") == 1
    assert not list(tmp_path.glob("t.npz*"))


def test_empty_and_unreadable_folders_are_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    r = run_cli("trace", *ARCH_ARGS, "--images", str(tmp_path / "empty"), "--out", str(tmp_path / "t.npz"))
    assert r.returncode == 2 and "no image files" in r.stderr and r.stderr.count("\n") == 1
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jpg").write_text("x")
    r = run_cli("trace", *ARCH_ARGS, "--images", str(tmp_path / "bad"), "--out", str(tmp_path / "t.npz"))
    assert r.returncode == 2 and "no readable image" in r.stderr and r.stderr.count("\n") == 1


@pytest.fixture(scope="module")
def many_images(tmp_path_factory):
    return random_png_folder(tmp_path_factory.mktemp("many"), 48, seed=1)


@pytest.fixture(scope="module")
def uninterrupted(many_images, tmp_path_factory):
    ref = tmp_path_factory.mktemp("ref") / "ref.npz"
    assert run_cli("trace", *ARCH_ARGS, "--images", str(many_images), "--batch-size", "2", "--out", str(ref)).returncode == 0
    return ref


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_interrupted_trace_leaves_no_file_and_resumes_identically(many_images, uninterrupted, tmp_path, sig):
    args = ["trace", *ARCH_ARGS[:-1], "--images", str(many_images), "--batch-size", "2"]
    ref = uninterrupted
    out = tmp_path / "t.npz"
    env = {**os.environ, "REGCLS_TEST_PAUSE_AFTER_BATCHES": "3"}  # the run waits after batch 3 for the signal
    proc = subprocess.Popen([sys.executable, "-m", "regcls", *args, "--quiet", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a shell's
    # background job starts with SIGINT ignored; the user's Ctrl-C reaches a foreground run
    parts = tmp_path / "t.npz.parts"
    assert "paused after 3 batches" in proc.stderr.readline()
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert not out.exists(), "an interrupted run must not leave a file at --out"
    assert images_kept(parts) == 6                          # three batches of two on disk, resumable
    assert not list(parts.glob("*.tmp"))
    r = run_cli(*args, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "resuming: 6 of 48 images already traced" in r.stderr
    a, b = np.load(ref), np.load(out)
    for k in a.files:
        if a[k].dtype.kind == "f":
            np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-6, err_msg=k)
    assert not parts.exists()


def test_out_of_memory_halves_the_batch(monkeypatch, tmp_path):
    from regcls import runner as R
    from regcls import trace as T
    from regcls.tracefile import load_trace
    from regcls.models import create
    model = create("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=56,
                   overrides=dict(embed_dim=48, depth=2, num_heads=3))
    real = T.Tracer.run
    seen = []

    def fake(self, images):
        seen.append(len(images))
        if len(images) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, images)
    monkeypatch.setattr(T.Tracer, "run", fake)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    x = torch.randn(7, 3, 56, 56)
    meta = T.trace_meta(model, model="m", weights="random", dataset="d", img_size=56)
    R.run_trace(model, x, [str(i) for i in range(7)], out=tmp_path / "o.npz", meta=meta, batch_size=8, progress=False)
    assert seen[:3] == [7, 4, 2] and load_trace(tmp_path / "o.npz")["cls_final"].shape[0] == 7


# ------------------------------------------------------------------------------- downloads

class RangeHandler(http.server.BaseHTTPRequestHandler):
    payload = b""
    requests = []

    def do_GET(self):  # noqa: N802
        rng = self.headers.get("Range")
        RangeHandler.requests.append(rng)
        data, status = self.payload, 200
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            data, status = self.payload[start:], 206
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


@pytest.fixture
def server(tmp_path, monkeypatch):
    from regcls import data
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i in range(3):
            im = io.BytesIO()
            Image.fromarray(np.full((20, 20, 3), i * 60, np.uint8)).save(im, format="PNG")
            z.writestr(f"val2017/{i:012d}.png", im.getvalue())
    RangeHandler.payload, RangeHandler.requests = buf.getvalue(), []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    src = data.DATASETS["coco-val2017"]
    fake = data.DatasetSource(name=src.name, url=f"http://127.0.0.1:{httpd.server_port}/val2017.zip",
                              filename=src.filename, size=len(buf.getvalue()),
                              checksum="md5:" + hashlib.md5(buf.getvalue()).hexdigest(), folder=src.folder,
                              labelled=False, description="test")
    monkeypatch.setitem(data.DATASETS, "coco-val2017", fake)
    monkeypatch.setenv("REGCLS_DATA", str(tmp_path / "data"))
    yield fake
    httpd.shutdown()


def test_missing_dataset_names_the_command(tmp_path, monkeypatch):
    from regcls.data import dataset_files
    monkeypatch.setenv("REGCLS_DATA", str(tmp_path / "nothing"))
    with pytest.raises(RegclsError, match="regcls data download coco-val2017"):
        dataset_files("coco-val2017")


def test_download_verifies_unpacks_once(server, tmp_path):
    from regcls.data import dataset_files
    from regcls.data import download_dataset as download
    folder = download("coco-val2017", progress=False)
    assert len(list(folder.glob("*.png"))) == 3 and (folder / ".complete").is_file()
    download("coco-val2017", progress=False)
    assert len(RangeHandler.requests) == 1   # the second call downloads nothing
    assert len(dataset_files("coco-val2017")) == 3


def test_download_resumes_a_partial_file(server, tmp_path):
    from regcls.data import download_dataset as download
    root = tmp_path / "data"
    root.mkdir()
    half = len(RangeHandler.payload) // 2
    (root / "val2017.zip.part").write_bytes(RangeHandler.payload[:half])
    download("coco-val2017", progress=False)
    assert RangeHandler.requests == [f"bytes={half}-"]


def test_download_with_bad_checksum_is_refused(server, tmp_path, monkeypatch):
    from regcls import data
    from regcls.data import download_dataset as download
    monkeypatch.setitem(data.DATASETS, "coco-val2017",
                        data.DatasetSource(**{**server.__dict__, "checksum": "md5:" + "0" * 32}))
    with pytest.raises(RegclsError, match="failed its checksum"):
        download("coco-val2017", progress=False)
    assert (tmp_path / "data" / "val2017.zip.bad").is_file()
    assert not (tmp_path / "data" / "val2017").exists()


def test_shards_merge_into_a_single_run(many_images, uninterrupted, tmp_path):
    args = ["trace", *ARCH_ARGS, "--images", str(many_images), "--batch-size", "2"]
    shards = []
    for i in range(3):
        out = tmp_path / f"s{i}.npz"
        assert run_cli(*args, "--shard", f"{i}/3", "--out", str(out)).returncode == 0
        shards.append(str(out))
    r = run_cli("merge", *shards, "--out", str(tmp_path / "m.npz"))
    assert r.returncode == 0, r.stderr
    a, b = np.load(uninterrupted), np.load(tmp_path / "m.npz")
    assert list(a["image_ids"]) == list(b["image_ids"])
    for k in a.files:
        if a[k].dtype.kind == "f":
            np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-6, err_msg=k)
    assert run_cli("merge", shards[0], shards[0], "--out", str(tmp_path / "x.npz")).returncode == 2
