"""Faults of the file system, injected: two runs on one output, a damaged cache entry, a full disk. Each ends
in a one-line message or a warning, never a traceback, and a rerun gives the file a clean run gives."""
import errno
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from helpers import TINY_CLI, random_png_folder
from regcls import cli, files
from regcls.profiles import PROFILES

ARGS = ["trace", *TINY_CLI, "--batch-size", "2"]
SMOKE = PROFILES["smoke"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return random_png_folder(tmp_path_factory.mktemp("imgs"), 12, seed=2)


@pytest.fixture(scope="module")
def clean(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "clean.npz"
    assert cli.main([*ARGS, "--images", str(folder), "--out", str(out)]) == 0
    return np.load(out)


def same(path, ref):
    got = np.load(path)
    for k in ref.files:
        if ref[k].dtype.kind == "f":
            np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


def paused(cmd, env=None, after=1):
    """A run that stops after ``after`` batches (its parts on disk, its lock held) until it is killed."""
    env = {**os.environ, **(env or {}), "REGCLS_TEST_PAUSE_AFTER_BATCHES": str(after)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stderr:
        if line.startswith("paused after"):
            return proc
    raise AssertionError(f"the run did not pause: {proc.wait()}")


# --------------------------------------------------------------------------------- two runs, one output

@pytest.mark.slow
def test_a_second_command_refuses_in_one_line_then_takes_over_a_killed_run(folder, clean, tmp_path):
    out = tmp_path / "t.npz"
    first = paused([sys.executable, "-m", "regcls", *ARGS, "--images", str(folder), "--out", str(out)])
    try:
        r = subprocess.run([sys.executable, "-m", "regcls", *ARGS, "--images", str(folder), "--out", str(out)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith(f"error: {out} is being written by another regcls run (pid {first.pid} on ")
        assert r.stderr.rstrip().endswith("wait for it to finish, or stop it and run again")
    finally:
        first.kill()          # a crash: the operating system releases its lock
        first.wait()
    r = subprocess.run([sys.executable, "-m", "regcls", *ARGS, "--images", str(folder), "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"taking over t.npz from pid {first.pid}" in r.stderr and "resuming: 2 of 12 images" in r.stderr
    same(out, clean)
    assert not (tmp_path / "t.npz.lock").exists() and not (tmp_path / "t.npz.parts").exists()


GET = """
import sys
from regcls.cache import get_trace
from regcls.profiles import PROFILES
t = get_trace(PROFILES["smoke"].model("S", True), "samples", img_size=28, limit=12, batch_size=2, progress=False)
print("done", len(t["image_ids"]))
"""


@pytest.mark.slow
def test_a_second_chapter_waits_for_the_entry_and_both_end_well(tmp_path, monkeypatch):
    env = {"REGCLS_CACHE": str(tmp_path / "cache")}
    first = paused([sys.executable, "-c", GET], env)
    second = subprocess.Popen([sys.executable, "-c", GET], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, **env})
    try:
        for waiting in second.stderr:   # read until it says it waits (no sleep: it cannot go on while first holds)
            if waiting.startswith("waiting for pid"):
                break
        else:
            raise AssertionError(f"the second run ended without waiting: {second.wait()}")
        assert second.poll() is None   # it waits while the entry is being computed (the first holds it)
    finally:
        first.kill()
        first.wait()
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0 and out.strip() == "done 12", err
    assert waiting.startswith(f"waiting for pid {first.pid} on ")
    assert "taking over" in err and "resuming: 2 of 12" in err
    assert "Traceback" not in err
    monkeypatch.setenv("REGCLS_CACHE", str(tmp_path / "single"))
    from regcls.cache import get_trace
    ref = get_trace(SMOKE.model("S", True), "samples", img_size=28, limit=12, batch_size=2, progress=False)
    monkeypatch.setenv("REGCLS_CACHE", env["REGCLS_CACHE"])
    got = get_trace(SMOKE.model("S", True), "samples", img_size=28, limit=12, batch_size=2, progress=False)
    for k in ("cls_attn", "attn_out_full", "skip", "cls_final"):
        np.testing.assert_array_equal(got[k], ref[k])
    assert not list((tmp_path / "cache").rglob("*.lock"))


@pytest.mark.slow
def test_a_waiting_run_reads_the_entry_the_other_wrote(tmp_path, monkeypatch):
    """Nothing is computed twice: the second process finds the finished entry once the lock is free."""
    from regcls import cache, models
    monkeypatch.setenv("REGCLS_CACHE", str(tmp_path))
    spec = SMOKE.model("S", True)
    ref = cache.get_trace(spec, "samples", img_size=28, limit=4, progress=False)
    (path,) = (tmp_path / "traces").glob("*.npz")
    kept = tmp_path / "kept.npz"
    path.rename(kept)
    holder = subprocess.Popen([sys.executable, "-c", f"""
import shutil, time
from regcls.files import output_lock
with output_lock({str(path)!r}):
    print("holding", flush=True)
    time.sleep(3)
    shutil.copy({str(kept)!r}, {str(path)!r})
"""], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "holding"
    monkeypatch.setattr(models, "build", lambda *a, **k: pytest.fail("computed an entry another run was writing"))
    got = cache.get_trace(spec, "samples", img_size=28, limit=4, progress=False)
    holder.wait()
    np.testing.assert_array_equal(got["cls_final"], ref["cls_final"])


# --------------------------------------------------------------------------------- damaged cache entries

@pytest.fixture
def entry(tmp_path, monkeypatch):
    """A small cache entry of the smoke S model, computed in ``tmp_path``: ``(get, reference trace)``."""
    from regcls import cache
    monkeypatch.setenv("REGCLS_CACHE", str(tmp_path))

    def get():
        return cache.get_trace(SMOKE.model("S", True), "samples", img_size=28, limit=4, progress=False)
    return get, get()


def _damage(path, how):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncated" else np.random.default_rng(0).bytes(len(data)))


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_a_damaged_trace_is_set_aside_warned_once_and_recomputed(tmp_path, entry, how):
    get, ref = entry
    (path,) = (tmp_path / "traces").glob("*.npz")
    _damage(path, how)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = get()
        again = get()
    damaged = [str(w.message) for w in seen if "is damaged" in str(w.message)]
    assert len(damaged) == 1, damaged
    assert damaged[0].startswith(f"cache entry {path} is damaged (")
    assert damaged[0].endswith(f"): moved to {path.name}.bad, computing it again")
    assert (path.parent / (path.name + ".bad")).is_file()
    for k in ("cls_attn", "attn_out_full", "cls_final"):
        np.testing.assert_array_equal(got[k], ref[k])
        np.testing.assert_array_equal(again[k], ref[k])


def test_an_array_damaged_past_its_header_is_set_aside_when_read(tmp_path, monkeypatch):
    """The cache reads an entry's arrays when a chapter first uses them (regcls.cache.CachedTrace), so a member whose
    bytes are damaged past its header passes the check at the read and fails its CRC when used: one line, the
    entry set aside, and the next read computes it again."""
    import struct
    import zipfile

    from regcls import cache
    from regcls.errors import RegclsError
    monkeypatch.setenv("REGCLS_CACHE", str(tmp_path))

    def get():   # enough images that the array outgrows what the header check reads
        return cache.get_trace(SMOKE.model("S", True), "samples", img_size=28, limit=64, progress=False)
    want = np.array(get()["cls_layers"])
    (path,) = (tmp_path / "traces").glob("*.npz")
    info = zipfile.ZipFile(path).getinfo("cls_layers.npy")
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    end = info.header_offset + 30 + name_len + extra_len + info.file_size
    assert info.file_size > 16384
    data[end - 16: end - 8] = bytes(8)
    path.write_bytes(bytes(data))
    got = get()                                        # the headers are intact: the entry is read
    with pytest.raises(RegclsError, match=r"is damaged \(cls_layers: .*\); it was set aside: run again to recompute it"):
        got["cls_layers"]
    assert (path.parent / (path.name + ".bad")).is_file() and not path.exists()
    np.testing.assert_array_equal(get()["cls_layers"], want)


def test_a_trace_of_another_key_or_shape_is_not_read(tmp_path, entry):
    from regcls.tracefile import load_trace, save_trace
    get, ref = entry
    (path,) = (tmp_path / "traces").glob("*.npz")
    from regcls.tracefile import PER_IMAGE
    tr = load_trace(path)
    meta = {k: v for k, v in tr["meta"].items() if k not in ("regcls_version", "trace_schema")}
    arrays = {k: tr[k] for k in (*PER_IMAGE, "attn_out_bias", "image_ids")}
    arrays["cls_final"] = arrays["cls_final"][:3]        # one image short in one array
    save_trace(path, arrays, meta)
    with pytest.warns(UserWarning, match=r"is damaged \(cls_final disagree with its 4 image ids\)"):
        got = get()
    np.testing.assert_array_equal(got["cls_final"], ref["cls_final"])


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_a_damaged_image_store_is_set_aside_and_decoded_again(tmp_path, entry, how):
    get, ref = entry
    (store,) = (tmp_path / "stores").rglob("store-*.npz")
    for t in (tmp_path / "traces").glob("*.npz"):
        t.unlink()                                        # the trace is computed again, from the store
    _damage(store, how)
    with pytest.warns(UserWarning, match=rf"cache entry {store} is damaged \(.*\): moved to {store.name}\.bad"):
        got = get()
    np.testing.assert_array_equal(got["cls_final"], ref["cls_final"])


# --------------------------------------------------------------------------------- a full disk

class FullAfter:
    """A file object that takes ``budget`` bytes in all, then raises the given errno (a full disk, a read-only
    file system), as the operating system would."""

    def __init__(self, budget, code=errno.ENOSPC):
        self.left, self.code = budget, code

    def __call__(self, fd):
        f = os.fdopen(fd, "wb")
        outer = self

        class Writer:
            def write(self, b):
                if len(b) > outer.left:
                    raise OSError(outer.code, os.strerror(outer.code))
                outer.left -= len(b)
                return f.write(b)

            def __getattr__(self, name):
                return getattr(f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

        return Writer()


def file_bytes(n: int, batch: int) -> tuple[int, int]:
    """What this trace of ``n`` images writes before its first batch (the file's headers), and per batch."""
    import torch
    from regcls.models import create, layout
    from regcls.tracefile import file_layout, per_image_shapes
    with torch.device("meta"):
        model = create("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=56,
                       overrides=dict(embed_dim=48, depth=2, num_heads=3))   # TINY_CLI's model
    members, _ = file_layout(n, per_image_shapes(layout(model)))
    return sum(m.data - m.offset for m in members), batch * sum(m.row_bytes for m in members)


@pytest.mark.slow
def test_a_full_disk_says_what_was_kept_and_a_rerun_completes(folder, clean, tmp_path, monkeypatch, capsys):
    head, batch = file_bytes(12, 2)
    budget = head + int(2.5 * batch)     # the headers and two batches (with their progress notes) fit, the third not
    out = tmp_path / "t.npz"
    monkeypatch.setattr(files, "_writer", FullAfter(budget))
    assert cli.main([*ARGS, "--images", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: no space left on the device writing {out}.parts: 4 of 12 images traced are kept "
                          f"in {out}.parts; free some space, or write elsewhere (--out, REGCLS_CACHE), then run the "
                          "same command again to resume"), err
    assert not out.exists() and not list(tmp_path.rglob("*.tmp"))   # no temporary file left behind
    monkeypatch.setattr(files, "_writer", lambda fd: os.fdopen(fd, "wb"))
    assert cli.main([*ARGS, "--images", str(folder), "--out", str(out)]) == 0
    assert "resuming: 4 of 12 images already traced" in capsys.readouterr().err
    same(out, clean)


def test_a_read_only_folder_is_one_line_too(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(files, "_writer", FullAfter(0, errno.EROFS))
    out = tmp_path / "t.npz"
    assert cli.main([*ARGS, "--images", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: the file system is read-only writing {out}.parts: none of 12 images was kept; "
                          "make the folder writable, or write elsewhere"), err
    assert err.count("\n") == 1 and not list(tmp_path.rglob("*.tmp"))


@pytest.mark.notebook
def test_a_notebook_shows_a_regcls_error_in_one_line_and_the_cell_fails():
    """What a chapter shows for these faults: the command line's one line, not a traceback; the build still stops."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("from regcls.page import one_line_errors\none_line_errors()"),
                nbformat.v4.new_code_cell("from regcls.errors import RegclsError\nraise RegclsError('disk full')")]
    with pytest.raises(CellExecutionError):
        NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    (out,) = nb.cells[1].outputs
    assert out["output_type"] == "error" and out["traceback"] == ["error: disk full"]
