"""What the real run costs, checked on the CPU by counting rather than timing (the benchmark times it): the work
the trace issues per batch, the bytes a trace file costs to write, the memory of the precision check, the random
initialisation a loaded model skips, the models a cache fill builds. Each test fails where the old behaviour
returns (operations per image, parts written then merged, a width x width CKA, weights initialised then
overwritten, a model built per trace)."""
import json
import os
import tracemalloc
import zipfile

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import images, tiny
from regcls import files
from regcls import precision as Pr
from regcls.metrics import cka
from regcls.models import create, read_state_dict
from regcls.runner import run_trace
from regcls.trace import Tracer, trace_batch, trace_meta
from regcls.tracefile import STORED, TraceWriter, file_layout, load_trace

NARROW = dict(embed_dim=48, depth=2, num_heads=3)


class Ops(TorchDispatchMode):
    """The operations dispatched inside, by name."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def narrow_model(seed=0):
    torch.manual_seed(seed)
    return create("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=56, overrides=NARROW)


def test_the_work_a_batch_issues_does_not_grow_with_the_batch():
    """On a GPU each operation costs a launch whatever its size: the trace issues the same operations for 4 images as
    for 64 (the per-patch contributions were once computed four images at a time), and nothing in it waits for the
    device (no ``.item()``: ``_local_scalar_dense``)."""
    model = narrow_model()
    counts = {}
    for B in (4, 64):
        x = torch.randn(B, 3, 56, 56)
        with Tracer(model) as t:
            t.run(x)                          # the first batch makes the trace's index tensors on the device
            with Ops() as ops:
                t.run(x)
        with Ops() as plain, torch.inference_mode():
            model.forward_features(x)
        counts[B] = (len(ops.names), len(plain.names))
        assert "_local_scalar_dense" not in ops.names
    assert counts[4] == counts[64]
    traced, plain = counts[64]
    assert traced < plain + 80 * len(model.blocks) + 120      # the hooks' own work: a few dozen operations a block


def test_a_trace_file_is_written_once(tmp_path, monkeypatch):
    """The bytes handed to ``write()`` for a trace are its file's size (+ the small progress notes), not the 2.45x
    of batches written to part files and merged; the file is a valid zip whose members equal the trace in memory."""
    written = [0]
    real = files._writer

    class Counting:
        def __init__(self, fd):
            self.f = real(fd)

        def write(self, b):
            written[0] += memoryview(b).nbytes
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(files, "_writer", Counting)
    model = narrow_model()
    x = torch.randn(64, 3, 56, 56)
    ids = [f"im{i:02d}" for i in range(64)]
    out = run_trace(model, x, ids, out=tmp_path / "t.npz", meta=trace_meta(model, model="m", weights="random",
                                                                          dataset="d", img_size=56),
                    batch_size=8, progress=False)
    size = out.stat().st_size
    assert written[0] <= 1.15 * size, (written[0], size)
    with zipfile.ZipFile(out) as z:
        assert z.testzip() is None                                      # every member's CRC-32 is right
    tr, ref = load_trace(out), trace_batch(model, x)
    for k in STORED:
        np.testing.assert_allclose(tr[k], ref[k].numpy(), rtol=1e-5, atol=1e-5, err_msg=k)
    assert list(tr["image_ids"]) == ids and not (tmp_path / "t.npz.parts").exists()


def test_a_writer_resumes_from_its_progress_and_refuses_rows_out_of_order(tmp_path):
    shapes = {"a": (3,), "b": (2, 2)}
    rows = {k: np.arange(5 * int(np.prod(s)), dtype=np.float32).reshape(5, *s) for k, s in shapes.items()}
    w = TraceWriter(tmp_path, 5, shapes)
    w.write(0, {k: v[:2] for k, v in rows.items()})
    with pytest.raises(ValueError, match="rows 3... follow row 2"):
        w.write(3, {k: v[3:] for k, v in rows.items()})
    w.close()
    again = TraceWriter(tmp_path, 5, shapes)                          # an interrupted run, started again
    assert again.rows == 2
    again.write(2, {k: v[2:] for k, v in rows.items()})
    again.finish({"image_ids": np.array(list("abcde")), "meta_json": np.asarray("{}")}, tmp_path / "t.npz")
    with np.load(tmp_path / "t.npz") as z:
        for k, v in rows.items():
            np.testing.assert_array_equal(z[k], v)
        assert list(z["image_ids"]) == list("abcde")
    other = TraceWriter(tmp_path / "o", 5, {"a": (4,)})              # another layout starts afresh
    assert other.rows == 0
    other.close()


def test_a_trace_file_over_4_gib_is_zip64_throughout():
    """The layout's offsets and sizes are 64-bit: a 5 GiB member and the members after it."""
    members, end = file_layout(350_000, {"big": (4096,), "after": (1,)})
    assert members[0].size(350_000) > 2**32 and members[1].offset > 2**32 and end > 2**32


def test_the_precision_checks_cka_needs_memory_for_the_images_not_the_width():
    """cls_layers of ViT-g at 518 px is 61,440 values per image: its CKA over the check's 32 images once built two
    61,440 x 61,440 matrices (30 GB each). The n x n Gram form gives the same value in kilobytes."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((8, 4000))
    Y = X + 0.3 * rng.standard_normal((8, 4000))
    tracemalloc.start()
    got = cka(X, Y)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 10 * 2**20, peak                                   # a 4000 x 4000 float64 matrix is 128 MB
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    want = np.linalg.norm(Yc.T @ Xc) ** 2 / (np.linalg.norm(Xc.T @ Xc) * np.linalg.norm(Yc.T @ Yc))
    assert got == pytest.approx(want, rel=1e-12)


def test_a_precision_decision_is_remembered_by_what_decides_it(tmp_path, monkeypatch):
    monkeypatch.setenv("REGCLS_CACHE", str(tmp_path))
    calls = []
    check = Pr.amp_agreement
    monkeypatch.setattr(Pr, "amp_agreement", lambda m, x, mode="bf16": calls.append(mode) or check(m, x, mode=mode))
    model = narrow_model()
    x = torch.randn(6, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    first = Pr.decide_precision(model, x, device="cpu", amp=True)
    assert calls == ["bf16"] and len(list((tmp_path / "precision").glob("*.json"))) == 1
    assert Pr.decide_precision(model, x, device="cpu", amp=True) == first and calls == ["bf16"]   # remembered
    assert Pr.decide_precision(model, x * 1.01, device="cpu", amp=True) and calls == ["bf16"] * 2   # other images
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight[0, 0] += 1e-3                # one weight changed
    Pr.decide_precision(model, x, device="cpu", amp=True)
    assert calls == ["bf16"] * 3
    monkeypatch.setattr(Pr, "AMP_TOLERANCE", {**Pr.AMP_TOLERANCE, "cka_min": 0.5})   # other tolerances
    Pr.decide_precision(model, x, device="cpu", amp=True)
    assert calls == ["bf16"] * 4


def test_the_weights_digest_is_paid_once_per_model_until_a_weight_changes():
    model = narrow_model()
    with Ops() as first:
        digest = Pr.weights_digest(model)
    with Ops() as again:
        assert Pr.weights_digest(model) == digest
    assert len(first.names) > 50 and again.names == []            # remembered: no operation at all
    with torch.no_grad():
        model.blocks[1].norm1.weight.mul_(1.5)                      # changed in place
    assert Pr.weights_digest(model) != digest
    other = narrow_model()
    other.load_state_dict(model.state_dict())                       # copied in: the same weights, the same digest
    assert Pr.weights_digest(other) == Pr.weights_digest(model)
    assert "_regcls_weights_digest" not in model.state_dict()


def test_float16_that_overflows_fails_its_check_and_the_next_step_is_taken(tmp_path, monkeypatch):
    """float16 holds at most 65504: a model whose first block's norm scales its output by 1e5 overflows under float16
    autocast (not under bfloat16, which has float32's range); the check counts the values that are not finite and
    the chain moves on. An ordinary model passes float16's check."""
    monkeypatch.setenv("REGCLS_CACHE", str(tmp_path))
    model = narrow_model()
    x = torch.randn(6, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    assert Pr.amp_agreement(model, x, mode="fp16")["ok"]
    with torch.no_grad():
        model.blocks[0].norm1.weight.mul_(1e5)
    check = Pr.amp_agreement(model, x, mode="fp16")
    assert check["nonfinite"] > 0 and not check["ok"] and "values not finite" in Pr.check_summary(check)
    assert Pr.amp_agreement(model, x, mode="bf16")["nonfinite"] == 0
    monkeypatch.setattr(Pr, "steps", lambda device: ["fp16", "bf16"])   # as on a GPU: float16, then the next step
    monkeypatch.setattr(Pr, "AMP_TOLERANCE", {k: -1.0 if k == "cka_min" else 1e9 for k in Pr.AMP_TOLERANCE})
    with pytest.warns(UserWarning, match=r"float16 autocast disagrees with float32 .* values not finite.*; trying "
                                         r"bfloat16 autocast"):
        mode, checks = Pr.decide_precision(model, x, device="cpu", amp=True)
    assert mode == "bf16" and checks["fp16"]["ok"] is False and checks["bf16"]["ok"] is True


def test_a_float16_trace_records_its_check(tmp_path, monkeypatch):
    monkeypatch.setenv("REGCLS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(Pr, "steps", lambda device: ["fp16"])          # a T4's chain, its passes on the CPU
    model = narrow_model()
    x = torch.randn(6, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    out = run_trace(model, x, list("abcdef"), out=tmp_path / "t.npz", progress=False, amp=True, batch_size=3,
                    meta=trace_meta(model, model="m", weights="random", dataset="d", img_size=56))
    meta = load_trace(out, meta_only=True)["meta"]
    assert meta["precision_mode"] == "fp16" and meta["precision"].startswith("float16 autocast")
    assert meta["fp16_check"]["ok"] is True and meta["amp_used"] is False and meta["amp_check"] is None


class InitCount:
    """In-place random initialisations of tensors that hold data (not meta), by count and values."""

    def __init__(self, monkeypatch):
        self.calls, self.values = 0, 0
        for name in ("uniform_", "normal_"):
            real = getattr(torch.Tensor, name)

            def counting(t, *a, _real=real, **k):
                if t.device.type != "meta":
                    self.calls += 1
                    self.values += t.numel()
                return _real(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, counting)


def test_a_checkpoint_loads_without_a_throwaway_initialisation(tmp_path, monkeypatch):
    """Its tensors become the weights (no random initialisation first, no second copy): ViT-g spent 20 s of CPU on
    an initialisation the checkpoint overwrote."""
    from safetensors.torch import save_file

    from regcls.models import build
    from regcls.profiles import ModelSpec

    ref = tiny("dinov2_reg4", dtype=torch.float32)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous().half() for k, v in ref.state_dict().items()}, str(path))   # stored in float16
    spec = ModelSpec("S", "vit_small_patch14_reg4_dinov2", overrides=(("embed_dim", 32), ("depth", 3), ("num_heads", 2)))
    counted = InitCount(monkeypatch)
    model = build(spec, 56, checkpoint=path)
    assert counted.values == 0, counted.values
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())   # float32, real
    sd = read_state_dict(path)
    torch.testing.assert_close(model.blocks[2].mlp.fc2.weight, sd["blocks.2.mlp.fc2.weight"].float())
    x = images(ref, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), ref.half().float().forward_features(x), rtol=1e-5, atol=1e-5)


def test_hub_weights_load_without_a_throwaway_initialisation(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    from rehearsal import write_hub_model

    name = "vit_small_patch14_reg4_dinov2.lvd142m"
    write_hub_model(name, tmp_path)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    counted = InitCount(monkeypatch)
    model = create(name, pretrained=True, img_size=224)
    assert counted.values < 1000, counted.values         # the position embedding's small random start at most
    assert not [n for n, t in model.state_dict().items() if t.device.type == "meta"]


def test_a_cache_fill_builds_each_model_once(monkeypatch, smoke, tmp_path):
    """The traces of one model on both datasets (and with the other crop) share one built model."""
    from regcls import cache

    monkeypatch.setenv("REGCLS_CACHE", str(tmp_path))
    built = []
    real = cache.build
    monkeypatch.setattr(cache, "build", lambda spec, *a, **k: built.append(spec.name) or real(spec, *a, **k))
    spec = smoke.model("S", True)
    jobs = [dict(dataset="samples", img_size=28, limit=4), dict(dataset="samples-crops", img_size=28, limit=4, classes=2),
            dict(dataset="samples", img_size=28, limit=4, crop_pct=0.875)]
    with cache.model_reuse():
        for job in jobs:
            cache.get_trace(spec, progress=False, **job)
    assert built == [spec.name]
    for job in jobs:                     # from the cache now: nothing is built at all
        cache.get_trace(spec, progress=False, **job)
    assert built == [spec.name]
    cache.get_trace(spec, "samples", img_size=42, limit=4, progress=False)     # without it: one build a trace
    cache.get_trace(spec, "samples-crops", img_size=42, limit=4, classes=2, progress=False)
    assert built == [spec.name] * 3


def test_the_progress_note_is_small(tmp_path):
    w = TraceWriter(tmp_path, 100, {"a": (1000,), "b": (7, 3)})
    w.write(0, {"a": np.zeros((10, 1000), np.float32), "b": np.zeros((10, 7, 3), np.float32)})
    note = json.loads((tmp_path / "progress.json").read_text())
    assert note["rows"] == 10 and set(note["crc"]) == {"a", "b"} and os.path.getsize(tmp_path / "progress.json") < 400
    w.close()


def test_a_chapter_records_what_it_read_and_its_peak_memory(monkeypatch, smoke, tmp_path):
    """What the reproducing page projects a chapter's time from, and checks its memory against (the colab
    rehearsal): every trace it read, with model, dataset, resolution and images, and its process's peak memory."""
    from regcls import cache, page

    monkeypatch.setenv("REGCLS_CACHE", str(tmp_path))
    monkeypatch.setattr(cache, "READ", {})
    monkeypatch.setattr(page, "READ", cache.READ)
    spec = smoke.model("S", True)
    cache.trace_for(smoke, spec, img_size=28, progress=False)
    rec = page.record_run("sec9_9_example", smoke, 1.5)
    saved = json.loads((tmp_path / "chapters" / "smoke" / "sec9_9_example.json").read_text())
    assert saved == json.loads(json.dumps(rec))
    (t,) = saved["traces"]
    assert (t["arch"], t["dataset"], t["img_size"], t["images"]) == (spec.arch, smoke.dataset, 28, 125)
    assert dict(t["overrides"]) == dict(spec.overrides) and 0.05 < saved["peak_rss_gb"] < 24 and saved["seconds"] == 1.5


def test_a_chapter_records_which_traces_it_held_at_once(monkeypatch, smoke, tmp_path):
    """What the rehearsal projects a chapter's memory from: each time the arrays held grew, the traces alive and
    what each held. A trace from the cache holds only the arrays read of it (each read from the file when first
    used, equal to the file's); traces read through ``keep`` are let go one by one; two a chapter holds are
    recorded together."""
    from regcls import cache, page

    monkeypatch.setenv("REGCLS_CACHE", str(tmp_path))
    for name, value in (("READ", {}), ("HELD", []), ("_ALIVE", []), ("KEPT", [])):
        monkeypatch.setattr(cache, name, value)
    monkeypatch.setattr(page, "READ", cache.READ)
    monkeypatch.setattr(page, "HELD", cache.HELD)
    S, B = smoke.model("S", True), smoke.model("B", True)
    kept = cache.profile_traces(smoke, True, img_size=28, progress=False, specs=[S, B],
                                keep=lambda t: {"first block": t["cls_layers"][:, 0].copy(), "sum": float(t["cls_layers"].sum())})
    # what keep returned is held to the end (4 bytes per dimension per image); the traces, one at a time
    assert [b for _, b in cache.KEPT] == [4 * kept[S.size]["first block"].shape[1], 4 * kept[B.size]["first block"].shape[1]]
    assert all(len([e for e in now if e not in cache.KEPT]) <= 1 for now in cache.HELD)
    rec = page.record_run("one_at_a_time", smoke, 1.0)
    assert {i for h in rec["held"] for i, _ in h} == {0, 1}
    kept = {k: v["sum"] for k, v in kept.items()}
    cache.KEPT.clear()
    a = cache.trace_for(smoke, S, img_size=28, progress=False)
    b = cache.trace_for(smoke, B, img_size=28, progress=False)
    full = load_trace(a.path)
    assert set(full) - {"meta"} == set(a.shapes) | {"skip"} and dict.keys(a) == {"image_ids", "labels", "meta"} & set(full)
    assert kept[S.size] == float(full["cls_layers"].sum())
    np.testing.assert_array_equal(a["skip"], full["skip"])   # read with prefix_penult, its view
    assert "cls_attn" in a and "nothing" not in a and a.get("nothing") is None and "cls_attn" not in dict.keys(a)
    np.testing.assert_array_equal(a["cls_attn"], full["cls_attn"])
    b["cls_layers"]
    rec = page.record_run("both", smoke, 1.0)
    n = len(full["image_ids"])

    def held(t):   # what a trace holds in memory, per image
        return sum(v.nbytes for k, v in dict.items(t) if k not in ("meta", "skip")) / n

    assert sorted(dict.keys(b)) == sorted({"image_ids", "meta", "cls_layers"} | ({"labels"} & set(full)))
    assert max(rec["held"], key=lambda h: sum(x for _, x in h)) == [[0, round(held(a))], [1, round(held(b))]]
    assert held(a) < 0.5 * sum(v.nbytes for k, v in full.items() if k not in ("meta", "skip")) / n


def test_the_rehearsal_projects_a_chapters_memory_from_the_traces_it_held_at_once(tmp_path):
    """The full run's memory of a chapter: its peak plus the most its traces held at once, each trace's bytes per
    image times the images the cap left out; a chapter over the limit is named, with the others."""
    import rehearsal
    from regcls.profiles import PROFILES

    paper = PROFILES["paper"]
    full = rehearsal._full_images(paper, paper.dataset, 224)
    t = {"arch": "vit_small_patch14_reg4_dinov2", "dataset": paper.dataset, "img_size": 224, "images": 4}
    traces = [t, t, t]
    folder = tmp_path / "chapters" / "paper"
    folder.mkdir(parents=True)
    M = 2**20   # bytes per image: 1, 2 and 4 MiB
    for name, held in (("a", [[[0, M]], [[1, 2 * M], [2, 4 * M]]]), ("b", [[[0, M], [1, 2 * M]], [[2, 4 * M]]]),
                       ("c", [[[0, M], [1, 2 * M], [2, 4 * M]]])):
        (folder / f"{name}.json").write_text(json.dumps({"chapter": name, "seconds": 1.0, "peak_rss_gb": 1.0,
                                                         "traces": traces, "held": held}))
    rows = {r["chapter"]: r for r in rehearsal.chapter_rows(paper, tmp_path)}
    left = (full - 4) / 1024   # GiB per MiB per image
    assert rows["a"]["full_run_gb"] == pytest.approx(1 + 6 * left)
    assert rows["b"]["full_run_gb"] == pytest.approx(1 + 4 * left)
    assert rows["c"]["full_run_gb"] == pytest.approx(1 + 7 * left) and rows["c"]["held_at_once"] == 3
    limit = rehearsal.MEMORY_LIMIT_GB["paper"]
    assert rows["b"]["full_run_gb"] < limit < rows["a"]["full_run_gb"]
    with pytest.raises(SystemExit, match=r"chapter a would hold .* \(2 traces at once\); chapter c would hold"):
        rehearsal.check_chapter_memory(paper, list(rows.values()))
    rehearsal.check_chapter_memory(paper, [rows["b"]])


def test_a_page_shows_the_time_its_numbers_took_its_cached_traces_included(monkeypatch, smoke, tmp_path):
    """A chapter rerun on cached traces takes seconds; the page's time counts what computing those traces took
    (recorded in each trace file), and not a trace this run computed itself twice."""
    import time

    from regcls import cache, page

    monkeypatch.setenv("REGCLS_CACHE", str(tmp_path))
    monkeypatch.setattr(cache, "READ", {})
    monkeypatch.setattr(page, "READ", cache.READ)
    glued = {}
    monkeypatch.setattr(page, "glue", lambda name, value, display=False: glued.__setitem__(name, value))
    spec = smoke.model("S", True)
    meta = cache.trace_for(smoke, spec, img_size=28, progress=False)["meta"]
    assert meta["trace_seconds"] > 0 and meta["computed_on"]
    (computed,) = cache.READ.values()
    assert computed["computed_here"] and computed["seconds"] == meta["trace_seconds"]
    computed["seconds"] = 100.0                                   # already inside this run's time: not added
    line = page.finish(time.time() - 2.0)
    assert glued["run_seconds"] == pytest.approx(2.0, abs=0.5) and "from the cache" not in line
    cache.READ.clear()
    cache.trace_for(smoke, spec, img_size=28, progress=False)     # read from the cache this time
    (read,) = cache.READ.values()
    assert not read["computed_here"] and read["seconds"] == meta["trace_seconds"]
    cache.READ["another"] = {"seconds": 100.0, "computed_here": False, "computed_on": "an H200"}
    cache.READ["an old trace"] = {"seconds": None, "computed_here": False}
    line = page.finish(time.time() - 2.0)
    assert glued["run_seconds"] == pytest.approx(2.0 + meta["trace_seconds"] + 100.0, abs=0.5)
    assert "the 3 traces it read from the cache took" in line and "1 of them from before" in line and "H200" in line
