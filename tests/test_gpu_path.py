"""The GPU path, tested on the CPU: the device and precision defaults, the driver message with the CUDA query
faked, one precision decision per trace request (resumes and shards), strict float32, the benchmark's peak
table and memory accounting, and ``regcls doctor``. No GPU is used; nothing here is timed."""
import json

import numpy as np
import pytest
import torch

from test_performance import tiny_model, uint8_store
from regcls import bench, cli, env
from regcls import precision as Pr
from regcls import runner as R
from regcls import tracefile as F
from regcls.errors import RegclsError

AGREEMENT = Pr.amp_agreement   # the real check, for tests that wrap it
PERMISSIVE = {k: -1.0 if k == "cka_min" else 1e9 for k in Pr.AMP_TOLERANCE}


@pytest.fixture(autouse=True)
def own_decisions(tmp_path, monkeypatch):
    """Each test its own decision cache: the checks these tests fake must run, not a decision from elsewhere."""
    monkeypatch.setenv("REGCLS_CACHE", str(tmp_path / "cache"))


def forget_decisions():
    import shutil
    shutil.rmtree(env.cache_dir() / "precision", ignore_errors=True)


# --------------------------------------------------------------------------- driver and defaults

@pytest.fixture
def old_driver(monkeypatch):
    """A machine whose NVIDIA driver supports CUDA 12.4 and a torch built for CUDA 13.0: no GPU for torch."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(env, "driver_cuda_version", lambda: (12, 4))
    monkeypatch.setattr(torch.version, "cuda", "13.0")


def test_the_driver_message_names_both_cuda_versions(old_driver, monkeypatch):
    msg = env.cuda_problem()
    assert msg.startswith("the NVIDIA driver (CUDA 12.4) is too old for this torch ")
    assert "(CUDA 13.0): update the driver (CUDA 13 needs the 580 series or newer) or install the CUDA 12 build" in msg
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "is a CPU-only build, but this machine has an NVIDIA driver (CUDA 12.4)" in env.cuda_problem()
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert env.cuda_problem() == ("an NVIDIA driver (CUDA 12.4) is installed but torch sees no GPU "
                                       "(CUDA_VISIBLE_DEVICES='')")
    monkeypatch.setattr(env, "driver_cuda_version", lambda: None)
    assert env.cuda_problem() is None                    # no driver: nothing to explain


def test_no_silent_cpu_run_on_a_machine_with_an_unusable_gpu(old_driver):
    from regcls.env import resolve_device
    with pytest.warns(UserWarning, match=r"too old for this torch .*: tracing on the CPU"):
        assert resolve_device("auto") == "cpu"
    with pytest.raises(RegclsError, match=r"^the NVIDIA driver \(CUDA 12.4\) is too old"):
        env.check_device("cuda")
    assert cli.main(["trace", "--model", "m", "--images", ".", "--device", "cuda", "--out", "x.npz"]) == 2


def test_the_driver_query_answers_without_a_driver():
    assert env.driver_cuda_version() is None or len(env.driver_cuda_version()) == 2


def test_trace_defaults_to_the_gpu_and_a_lower_precision_where_the_machine_has_one(monkeypatch):
    args = cli.parser().parse_args(["trace", "--model", "m", "--images", ".", "--out", "o.npz"])
    assert (args.device, args.precision, args.amp) == ("auto", "auto", False)
    if not torch.cuda.is_available():
        assert env.resolve_precision("auto", "auto") == ("cpu", False)
    assert env.resolve_precision("cpu", "bf16") == ("cpu", True)     # asked for: still checked before use
    assert env.resolve_precision("cpu", "fp32") == ("cpu", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)   # an H100: CUDA and bf16 by default
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert env.resolve_precision("auto", "auto") == ("cuda", True)
    assert env.resolve_precision("cuda:0", "fp32") == ("cuda:0", False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: (8, 0))   # an A100: TF32 to fall back on
    assert env.native_tf32("cuda:0") and not env.native_tf32("cpu")
    assert Pr.steps("cuda:0") == ["bf16", "fp16", "tf32"] and Pr.steps("cpu") == ["bf16"]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)  # a T4
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: (7, 5))
    assert env.resolve_precision("auto", "auto") == ("cuda", True)     # float16 autocast, checked
    assert not env.native_tf32("cuda") and not env.native_tf32("cpu")
    assert Pr.steps("cuda") == ["fp16"]


# --------------------------------------------------------------------------- one precision per request

def _meta(model):
    from regcls.trace import trace_meta
    return trace_meta(model, model="m", weights="random", dataset="d", img_size=56)


def _images():
    store = uint8_store(12)
    return store, store.normalized((0.5,) * 3, (0.25,) * 3)


def test_a_resumed_bf16_run_equals_an_uninterrupted_one_and_keeps_its_decision(tmp_path, monkeypatch):
    monkeypatch.setattr(Pr, "AMP_TOLERANCE", PERMISSIVE)
    model = tiny_model()
    store, images = _images()
    whole = R.run_trace(model, images, store.ids, out=tmp_path / "whole.npz", meta=_meta(model), batch_size=4, amp=True)
    forget_decisions()    # this request decides on its own
    finish = F.TraceWriter.finish

    def fail(*a, **k):
        raise OSError("interrupted before the final file")

    monkeypatch.setattr(F.TraceWriter, "finish", fail)    # every batch is on disk, the final file is not
    with pytest.raises(OSError):
        R.run_trace(model, images, store.ids, out=tmp_path / "r.npz", meta=_meta(model), batch_size=4, amp=True)
    decision = json.loads((tmp_path / "r.npz.parts" / "precision.json").read_text())
    assert decision["mode"] == "bf16" and decision["checks"]["bf16"]["ok"] is True
    forget_decisions()    # the request's own record decides a resumed run
    monkeypatch.setattr(F.TraceWriter, "finish", finish)
    monkeypatch.setattr(Pr, "amp_agreement", lambda *a, **k: pytest.fail("a resumed run checked bf16 again"))
    R.run_trace(model, images, store.ids, out=tmp_path / "r.npz", meta=_meta(model), batch_size=4, amp=True)
    a, b = F.load_trace(whole), F.load_trace(tmp_path / "r.npz")
    for k in (*F.PER_IMAGE, "attn_out_bias"):
        assert np.array_equal(a[k], b[k]), k          # the bias recovered from the parts under the same autocast
    assert a["meta"]["precision"] == b["meta"]["precision"] == "bfloat16 autocast (the trace's own arithmetic float32)"
    assert b["meta"]["amp_used"] is True


def test_shards_decide_on_the_same_images_and_merge(tmp_path, monkeypatch):
    seen = []
    check = Pr.amp_agreement

    def recording(model, x, mode="bf16"):
        seen.append(x.double().sum().item())
        return check(model, x, mode=mode)

    monkeypatch.setattr(Pr, "AMP_TOLERANCE", PERMISSIVE)
    monkeypatch.setattr(Pr, "amp_agreement", recording)
    model = tiny_model()
    store, images = _images()
    head = images[0:12]
    parts = []
    for i, (a, b) in enumerate(((0, 6), (6, 12))):
        out = tmp_path / f"part{i}.npz"
        R.run_trace(model, images[a:b], store.ids[a:b], out=out, meta={**_meta(model), "shard": f"{i}/2"},
                    batch_size=6, amp=True, check_images=head)   # the single run's batches: bf16 alike
        parts.append(out)
    assert len(seen) == 1      # the second shard found the decision the first made on the same images
    forget_decisions()
    R.run_trace(model, images[6:12], store.ids[6:], out=tmp_path / "again.npz", meta={**_meta(model), "shard": "1/2"},
                batch_size=6, amp=True, check_images=head)
    assert len(seen) == 2 and seen[0] == seen[1]       # decided anew: on the request's first images, as the first
    merged = F.load_trace(F.merge_traces(parts, tmp_path / "all.npz"))
    whole = F.load_trace(R.run_trace(model, images, store.ids, out=tmp_path / "one.npz", meta=_meta(model),
                                     batch_size=6, amp=True))
    for k in (*F.PER_IMAGE, "attn_out_bias"):
        assert np.array_equal(merged[k], whole[k]), k
    assert merged["meta"]["amp_check"] == whole["meta"]["amp_check"]   # one check, as for the single run


def test_shards_of_other_precisions_refuse_to_merge(tmp_path, monkeypatch):
    monkeypatch.setattr(Pr, "AMP_TOLERANCE", PERMISSIVE)
    model = tiny_model()
    store, images = _images()
    low = R.run_trace(model, images[0:6], store.ids[:6], out=tmp_path / "a.npz", meta=_meta(model), amp=True)
    full = R.run_trace(model, images[6:12], store.ids[6:], out=tmp_path / "b.npz", meta=_meta(model), amp=False)
    with pytest.raises(RegclsError, match=r"traced with other settings \(amp_used, precision, precision_mode\) and cannot be merged"):
        F.merge_traces([low, full], tmp_path / "m.npz")


def test_float32_traces_record_their_precision_and_keep_tf32_off_on_cuda(tmp_path):
    model = tiny_model()
    store, images = _images()
    t = F.load_trace(R.run_trace(model, images, store.ids, out=tmp_path / "f.npz", meta=_meta(model)))
    assert t["meta"]["precision"] == "float32" and "amp_used" not in t["meta"]
    assert Pr.precision_label("cuda:1", "fp32") == "float32 (TF32 off)"
    assert Pr.precision_label("cuda:1", "tf32") == "float32 with TF32 matrix products and convolutions"
    assert Pr.precision_label("cuda:1", "fp16") == "float16 autocast (the trace's own arithmetic float32)"
    flags = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)
    before = [f.fp32_precision for f in flags]
    try:
        for f in flags:   # PyTorch's convolution default, set through the new API (the legacy flags then fail)
            f.fp32_precision = "tf32"
        with Pr.precision_mode("cuda", "fp32"):
            assert [f.fp32_precision for f in flags] == ["ieee", "ieee"]
            assert not torch.is_autocast_enabled("cuda")
        assert [f.fp32_precision for f in flags] == ["tf32", "tf32"]
        with Pr.precision_mode("cpu", "bf16"):
            assert [f.fp32_precision for f in flags] == ["ieee", "ieee"]   # what runs outside autocast: full float32
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        with Pr.precision_mode("cuda:0", "tf32"):
            assert [f.fp32_precision for f in flags] == ["tf32", "tf32"]
        with Pr.precision_mode("cpu", "fp16"):
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.float16
        with pytest.raises(ValueError, match="precision mode 'fp8'"):
            with Pr.precision_mode("cpu", "fp8"):
                pass
    finally:
        for f, v in zip(flags, before):
            f.fp32_precision = v


@pytest.fixture
def an_ampere_gpu_on_the_cpu(monkeypatch):
    """The precision decision as on an A100 (bf16 and TF32 native), its forward passes run on the CPU."""
    monkeypatch.setattr(Pr, "native_bf16", lambda: True)
    monkeypatch.setattr(Pr, "native_tf32", lambda device: True)


def _judged(verdicts: dict[str, bool], seen: list):
    """An agreement check that passes or fails by mode, and records the flags each mode ran under."""
    def check(model, x, mode="bf16"):
        out = AGREEMENT(model, x, mode=mode)
        seen.append((mode, torch.backends.cuda.matmul.fp32_precision))
        return {**out, "ok": verdicts[mode]}
    return check


def test_the_float32_fallback_uses_tf32_only_where_its_own_check_passes(tmp_path, monkeypatch, an_ampere_gpu_on_the_cpu):
    model = tiny_model()
    store, images = _images()
    seen, flags = [], []
    before = torch.backends.cuda.matmul.fp32_precision
    monkeypatch.setattr(Pr, "amp_agreement", _judged({"bf16": False, "tf32": True}, seen))
    hook = model.blocks[0].register_forward_hook(lambda *a: flags.append(torch.backends.cuda.matmul.fp32_precision))
    with pytest.warns(UserWarning, match=r"bfloat16 autocast disagrees .*; trying float32 with TF32 matrix products"):
        t = F.load_trace(R.run_trace(model, images, store.ids, out=tmp_path / "t.npz", meta=_meta(model),
                                     batch_size=6, amp=True, progress=False))
    hook.remove()
    assert [m for m, _ in seen] == ["bf16", "tf32"]
    assert t["meta"]["precision"] == "float32 with TF32 matrix products and convolutions"
    assert t["meta"]["precision_mode"] == "tf32"
    assert t["meta"]["amp_used"] is False and t["meta"]["amp_check"]["ok"] is False and t["meta"]["tf32_check"]["ok"]
    assert t["meta"]["tf32_check"]["mode"] == "tf32"
    # the checks' passes (bf16: full float32 reference, bf16; TF32: reference, TF32), then both batches with TF32
    assert flags == ["ieee", "ieee", "ieee", "tf32", "tf32", "tf32"]
    assert torch.backends.cuda.matmul.fp32_precision == before   # restored after the run

    seen.clear()
    forget_decisions()
    monkeypatch.setattr(Pr, "amp_agreement", _judged({"bf16": False, "tf32": False}, seen))
    with pytest.warns(UserWarning) as said:
        t = F.load_trace(R.run_trace(model, images, store.ids, out=tmp_path / "f.npz", meta=_meta(model),
                                     batch_size=6, amp=True, progress=False))
    assert [m for m, _ in seen] == ["bf16", "tf32"] and t["meta"]["precision"] == "float32"
    assert "TF32 matrix products and convolutions disagrees with float32" in str(said[-1].message)
    assert str(said[-1].message).endswith("tracing in full float32")

    seen.clear()
    t = F.load_trace(R.run_trace(model, images, store.ids, out=tmp_path / "n.npz", meta=_meta(model),
                                 batch_size=6, amp=False, progress=False))
    assert seen == [] and t["meta"]["precision"] == "float32" and "tf32_check" not in t["meta"]   # fp32 asked: no TF32


def test_a_resumed_tf32_run_keeps_its_decision_and_reports_both_checks(tmp_path, monkeypatch, an_ampere_gpu_on_the_cpu):
    from regcls import cache
    model = tiny_model()
    store, images = _images()
    seen = []
    monkeypatch.setattr(Pr, "amp_agreement", _judged({"bf16": False, "tf32": True}, seen))
    monkeypatch.setenv("REGCLS_TEST_PAUSE_AFTER_BATCHES", "0")
    finish = F.TraceWriter.finish
    monkeypatch.setattr(F.TraceWriter, "finish", lambda *a, **k: (_ for _ in ()).throw(OSError("interrupted")))
    with pytest.raises(OSError), pytest.warns(UserWarning):
        R.run_trace(model, images, store.ids, out=tmp_path / "r.npz", meta=_meta(model), batch_size=6, amp=True,
                    progress=False)
    forget_decisions()
    monkeypatch.setattr(F.TraceWriter, "finish", finish)
    monkeypatch.setattr(Pr, "amp_agreement", lambda *a, **k: pytest.fail("a resumed run checked again"))
    t = F.load_trace(R.run_trace(model, images, store.ids, out=tmp_path / "r.npz", meta=_meta(model), batch_size=6,
                                 amp=True, progress=False))
    assert t["meta"]["precision"].startswith("float32 with TF32") and t["meta"]["tf32_check"]["ok"] is True
    label = cache._loaded(t)["meta"] and cache.PRECISIONS["m on d at 56 px"]
    assert label.startswith("float32 with TF32 matrix products and convolutions (bf16 check failed: identity error ")
    assert "; TF32 check passed: identity error " in label


def test_peak_of_tf32_is_half_the_bf16_peak():
    assert bench.peak_tflops("NVIDIA A100-SXM4-80GB", "tf32") == 156.0
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3", "tf32") == bench.peak_tflops("NVIDIA H100 80GB HBM3") / 2


# --------------------------------------------------------------------------- benchmark and memory

@pytest.mark.parametrize("name, bf16, fp32", [
    ("NVIDIA H200 NVL", 835.0, 60.0), ("NVIDIA H200", 989.0, 67.0), ("NVIDIA GB200", 2500.0, float("nan")),
    ("NVIDIA B200", 2250.0, float("nan")), ("NVIDIA L40", 181.0, 90.5), ("NVIDIA L40S", 362.0, 91.6),
    ("NVIDIA L4", 121.0, 30.3), ("NVIDIA A100-SXM4-80GB", 312.0, 19.5), ("NVIDIA A10", 125.0, 31.2),
    ("NVIDIA A10G", 125.0, 31.2), ("Tesla T4", float("nan"), 8.1), ("NVIDIA H100 PCIe", 756.0, 51.0)])
def test_peak_table_matches_the_longest_name(name, bf16, fp32):
    np.testing.assert_equal(bench.peak_tflops(name), bf16)
    np.testing.assert_equal(bench.peak_tflops(name, "fp32"), fp32)


def test_auto_batch_size_counts_memory_pytorch_has_cached(monkeypatch):
    with torch.device("meta"):
        from regcls.models import create
        model = create("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=224)
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (1 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev=None: 40 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev=None: 8 * gib)
    cached = R.auto_batch_size(model, "cuda", amp=True)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev=None: 8 * gib)
    assert R.auto_batch_size(model, "cuda", amp=True) < cached <= 512


# --------------------------------------------------------------------------- regcls doctor

def test_doctor_says_in_one_line_that_there_is_no_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from regcls import doctor
    assert cli.main(["doctor"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[    ] versions regcls ") and "torch 2.14.1" in out[0]
    assert any(line.startswith("[FAIL] gpu      no GPU") for line in out)
    assert out[-1].startswith("verdict: the GPU path is not usable: gpu: no GPU")
    assert all(line.startswith(tuple(f"[{m}]" for m in doctor.MARK.values())) for line in out[:-1])


def test_doctor_gpu_trace_runs_every_line_on_the_cpu():
    from regcls.doctor import gpu_trace
    c = gpu_trace(seconds=0.3, device="cpu")
    assert c.status == "ok" and c.text.startswith("ViT-S/14+reg on cpu in float32: ")
    assert "relative difference 0.0e+00, CKA 1.00000" in c.text


# --------------------------------------------------------------------------- one copy per batch

def test_one_buffer_per_batch_carries_every_array_exactly():
    """Every array of a batch travels in one float32 buffer (what the file stores): float64 and bfloat16 arrive as
    their float32 values, each in its shape."""
    g = torch.Generator().manual_seed(0)
    rec = {k: torch.randn(3, 2, 5, generator=g) for k in F.PER_IMAGE}
    rec["cls_attn"] = torch.randn(3, 4, 7, generator=g, dtype=torch.float64)
    rec["cls_final"] = torch.randn(3, 6, generator=g).to(torch.bfloat16)
    got = R.unpack(R._Packer().pack(rec))
    assert list(got) == list(F.STORED)
    for k in F.STORED:
        assert got[k].dtype == np.float32, k
        assert got[k].shape == tuple(rec[k].shape) and np.array_equal(got[k], rec[k].float().numpy()), k


def test_batches_are_the_store_slices_on_the_cpu():
    store, images = _images()
    b = R._Batches(images, "cpu", torch.float32)
    assert torch.equal(b.get(4, 8, 12), images[4:8]) and b.ahead is None
