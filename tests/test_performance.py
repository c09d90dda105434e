"""The GPU path's logic, checked on the CPU: batch sizing, uint8 transfer, the bf16 check and its fallback,
FLOP counting, the device benchmark and the paper-profile projection. (Timings are not asserted here; the
benchmark script measures them.)"""
import numpy as np
import pytest
import torch

from regcls import bench
from regcls import precision as Pr
from regcls import runner as R
from regcls import tracefile as F
from regcls.trace import trace_meta
from regcls.data import ImageStore
from regcls.models import create

TINY = dict(embed_dim=48, depth=2, num_heads=3)
ARCH = "vit_small_patch14_reg4_dinov2"


def tiny_model(arch=ARCH, seed=0):
    torch.manual_seed(seed)
    return create(arch, pretrained=False, img_size=56, overrides=TINY)


def uint8_store(n=6, size=56, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8)
    return ImageStore(pixels, [f"{i}" for i in range(n)])


def test_auto_batch_size_fits_half_the_free_memory(monkeypatch):
    with torch.device("meta"):
        small = create("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=224)
        giant = create("vit_giant_patch14_reg4_dinov2", pretrained=False, img_size=224)
    assert R.auto_batch_size(small, "cpu") == 16
    free = 8 * 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * 2**30))
    bs = {name: R.auto_batch_size(m, "cuda", amp=True) for name, m in (("S", small), ("g", giant))}
    assert bs["S"] == 512 and 1 <= bs["g"] < bs["S"]
    assert bs["g"] & (bs["g"] - 1) == 0  # a power of two
    N, D = 261, 1536
    hidden = giant.blocks[0].mlp.fc1.out_features
    assert bs["g"] * 2 * N * (6 * D + 2 * hidden) * 2 <= free / 2
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**20, 80 * 2**30))
    assert R.auto_batch_size(giant, "cuda", amp=True) == 1


def test_uint8_slices_normalise_like_the_float_path():
    store = uint8_store()
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = store.normalized(mean, std)
    ref = (torch.from_numpy(store.pixels[1:4]).float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) \
        / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.equal(x[1:4], ref) and torch.equal(x.to("cpu")[1:4], ref)
    assert x.to("cpu").stats == x.stats


def test_flops_per_image_matches_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode
    for arch in (ARCH, "vit_giant_patch14_dinov2"):
        model = create(arch, pretrained=False, img_size=56, overrides=dict(embed_dim=48, depth=2, num_heads=3))
        for blk in model.blocks:  # explicit matmuls, so that the counter sees the attention products too
            blk.attn.fused_attn = False
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            model.forward_features(torch.randn(2, 3, 56, 56))
        assert bench.flops_per_image(model) == pytest.approx(counter.get_total_flops() / 2, rel=1e-3)


def test_amp_agreement_reports_the_identity_and_precision():
    model = tiny_model()
    x = uint8_store(8).normalized((0.5,) * 3, (0.25,) * 3)[:]
    check = Pr.amp_agreement(model, x)
    assert check["identity_fp32"] < 1e-5            # float32: the decomposition is exact
    assert 1e-5 < check["identity_bf16"] < 5e-2      # bf16: visibly rounded, still close
    assert 0 < check["attn_mass_maxdiff"] < 5e-2        # bf16 moves the shares a little, not a lot
    assert 0 < check["share_change_p99"] <= check["attn_mass_maxdiff"]   # the heads' average moves less than one head
    assert check["cka_min_key"] in set(F.PER_IMAGE) - {"attn_mass"}   # every array the chapters read is compared
    assert 0 < check["penult_cosine_change"] < 1     # 1 - pairwise cosine of the prefix tokens moves a little
    assert 0 < check["norm_change_max"] < 5e-2 and 0 < check["prefix_error_max"] < 1e-1 and check["nonfinite"] == 0
    tol = Pr.AMP_TOLERANCE
    assert 0.9 < check["cka_min"] < 1.0 and check["ok"] == (check["cka_min"] >= tol["cka_min"]
                                                             and check["identity_bf16"] <= tol["identity_bf16"]
                                                             and check["share_change_p99"] <= tol["share_change_p99"]
                                                             and check["penult_cosine_change"] <= tol["penult_cosine_change"]
                                                             and check["norm_change_max"] <= tol["norm_change_max"]
                                                             and check["prefix_error_max"] <= tol["prefix_error_max"])


def test_amp_agreement_rejects_a_bf16_run_that_moves_the_penultimate_cosine(monkeypatch):
    """0.9989 has four digits: a bf16 run that changes 1 - cos of a prefix token by more than a tenth fails."""
    model = tiny_model()
    x = uint8_store(8).normalized((0.5,) * 3, (0.25,) * 3)[:]
    from regcls.trace import Tracer
    run = Tracer.run

    def shifted(self, xb):  # the bf16 pass sees every prefix token pulled towards one direction
        rec = run(self, xb)
        if torch.is_autocast_enabled("cpu"):
            rec["prefix_penult"] = rec["prefix_penult"] + 10 * rec["prefix_penult"].norm(dim=-1, keepdim=True)
        return rec

    monkeypatch.setattr(Tracer, "run", shifted)
    check = Pr.amp_agreement(model, x)
    assert check["penult_cosine_change"] > 0.5 and check["ok"] is False
    assert "penultimate pairwise cosine" in Pr.check_summary(check)


def _run(model, store, tmp_path, name, amp):
    meta = trace_meta(model, model="m", weights="random", dataset="d", img_size=56)
    out = R.run_trace(model, store.normalized((0.5,) * 3, (0.25,) * 3), store.ids, out=tmp_path / name, meta=meta,
                      batch_size=4, amp=amp, progress=False)
    return F.load_trace(out)


def test_bf16_is_used_only_within_tolerance(tmp_path, monkeypatch):
    model, store = tiny_model(), uint8_store()
    fp32 = _run(model, store, tmp_path, "fp32.npz", amp=False)
    assert "amp_used" not in fp32["meta"]
    monkeypatch.setattr(Pr, "AMP_TOLERANCE", {k: -1.0 if k == "cka_min" else 1e9 for k in Pr.AMP_TOLERANCE})
    low = _run(model, store, tmp_path, "bf16.npz", amp=True)
    assert low["meta"]["amp_used"] is True and low["meta"]["amp_check"]["ok"] is True
    assert not np.array_equal(low["attn_out_full"], fp32["attn_out_full"])
    np.testing.assert_allclose(low["attn_mass"], fp32["attn_mass"], atol=5e-2)
    monkeypatch.setattr(Pr, "AMP_TOLERANCE", {k: 1.1 if k == "cka_min" else 0.0 for k in Pr.AMP_TOLERANCE})
    with pytest.warns(UserWarning, match="bfloat16 autocast disagrees with float32.*tracing in full float32"):
        back = _run(model, store, tmp_path, "fallback.npz", amp=True)
    assert back["meta"]["amp_used"] is False and "tf32_check" not in back["meta"]   # the CPU has no TF32 to try
    assert back["meta"]["precision"] == "float32"
    for k in F.PER_IMAGE:
        assert np.array_equal(back[k], fp32[k]), k


@pytest.mark.filterwarnings("ignore:bfloat16 autocast disagrees")
def test_device_benchmark_and_projection_run_on_the_cpu():
    seen = []
    rows = bench.bench_device("cpu", [(ARCH, 56), (ARCH, 56)], batch=4, repeats=1, peak=1.0, overrides=TINY,
                              on_row=lambda rows: seen.append(len(rows)), budget=0)
    r, skipped = rows
    assert seen == [1, 2]  # reported as soon as each model is done
    assert skipped["skipped"].startswith("over the budget")    # the second would end past a budget of 0 s
    assert r["batch"] == 4 and r["trace_img_per_s"] > 0 and r["end_to_end_img_per_s"] > 0
    assert r["mfu"] == pytest.approx(r["gflop_per_img"] * r["trace_img_per_s"] / 1e3)
    assert r["identity_fp32"] < 1e-5 and isinstance(r["ok"], bool)
    assert r["precision"] == ("bf16" if r["ok"] else "fp32")
    assert r["check_s"] > 0 and {"check", "trace", "drain", "finish", "copy_wait", "write"} <= set(r["phases"])
    assert r["e2e_over_trace"] == pytest.approx(r["end_to_end_img_per_s"] / r["trace_img_per_s"])
    tables = bench.device_tables(rows)
    assert [t["model"] for t in tables["speed"]] == [ARCH, ARCH] and len(tables["phases"]) == 1
    jobs = bench.paper_workload()
    # both series, both on the labelled set, both series at 518 px, the other crop, and the appendix: DeiT III S-H, its
    # ImageNet-1k-only small, CLIP B-H, iBOT S-L; then DINOv3 S, S+, B, L, H+ at 224 and 256 px and on the labelled set,
    # DINOv2-L with a test-time register (L itself is traced already), the models with registers fixed to their mean
    assert len(jobs) == 8 + 8 + 8 + 4 + 11 + 15 + 1 + 8
    assert sum(j["img_size"] == 518 for j in jobs) == 8 and sum(j["dataset"] == "imagenetv2" for j in jobs) == 8 + 5 + 4
    assert sum(j["img_size"] == 256 for j in jobs) == 5 and sum("dinov3" in j["arch"] for j in jobs) == 15
    assert sum(j["crop_pct"] == 0.875 for j in jobs) == 4
    proj = bench.project_paper(rows, ready={"ready_s": 1.0, "file_gb": 1.0})
    assert proj["traces"] == len(jobs) and proj["flop_scaled"] == len(jobs) and proj["trace_seconds"] > 0
    assert proj["check_seconds"] > 0 and proj["load_seconds"] > 0
    assert proj["total_seconds"] == pytest.approx(proj["trace_seconds"] + proj["check_seconds"] + proj["load_seconds"])


def test_an_unmeasured_trace_is_projected_from_the_measured_model_nearest_in_flops(monkeypatch):
    job = {"arch": "vit_giant_patch14_reg4_dinov2", "dataset": "coco-val2017", "images": 1000, "img_size": 518,
           "crop_pct": 1.0}
    monkeypatch.setattr(bench, "paper_workload", lambda: [job])
    with torch.device("meta"):
        gflop = bench.flops_per_image(create(job["arch"], pretrained=False, img_size=518)) / 1e9
    small = {"model": "s", "img": 224, "gflop_per_img": 10.0, "end_to_end_img_per_s": 1000.0, "check_s": 1.0}
    large = {"model": "g", "img": 224, "gflop_per_img": 300.0, "end_to_end_img_per_s": 100.0, "check_s": 3.0}
    proj = bench.project_paper([small, small, large])    # a median would take the small model's 10 TFLOP/s
    assert proj["flop_scaled"] == 1
    assert proj["trace_seconds"] == pytest.approx(1000 * gflop / 30_000)            # the large model's 30 TFLOP/s
    assert proj["check_seconds"] == pytest.approx(3.0 * gflop / 300)


def test_gpu_peaks_by_name_and_a_clear_error_without_cuda(capsys):
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bench.peak_tflops("Tesla T4", "fp16") == 65.0 and bench.peak_tflops("NVIDIA H200", "fp16") == 989.0
    assert bench.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench.peak_tflops("NVIDIA H200") == 989.0
    assert np.isnan(bench.peak_tflops("Some Future GPU"))
    if not torch.cuda.is_available():
        assert bench.main(["--device", "cuda"]) == 2
        assert capsys.readouterr().out.strip() == "error: no CUDA device 'cuda' on this machine (0 visible); use --device cpu"


def test_profile_and_device_follow_the_hardware(monkeypatch):
    from types import SimpleNamespace

    from regcls import profiles
    from regcls.cache import resolve_device
    gib = 2**30
    monkeypatch.setattr(profiles, "hub_reachable", lambda timeout=2.0: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=80 * gib))
    assert profiles.detect_profile() == "paper"             # an A100/H100-class GPU
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=22.5 * gib))
    assert profiles.detect_profile() == "colab"             # an L4: bf16, but 22.5 GB
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=15 * gib))
    assert profiles.detect_profile() == "colab"             # a T4: every size, fewer images, float16 where it agrees
    assert profiles.PROFILES["colab"].device == "auto" and resolve_device("auto") == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert profiles.detect_profile() == "laptop"            # no GPU: the small models on the CPU
    assert resolve_device("auto") == "cpu"
    with pytest.warns(UserWarning, match="no CUDA device"):
        assert resolve_device("cuda") == "cpu"
    monkeypatch.setattr(profiles, "hub_reachable", lambda timeout=2.0: False)
    assert profiles.detect_profile() == "smoke"


@pytest.mark.slow
def test_the_gpu_check_runs_every_step_on_the_cpu(tmp_path):
    """``make gpu-check`` in its reduced form: every step of the GPU check on tiny models, the JSON and the table."""
    import json
    import subprocess
    import sys
    out = tmp_path / "gpu-check.json"
    r = subprocess.run([sys.executable, "-m", "regcls.gpucheck", "--device", "cpu", "--quick", "--budget", "60",
                        "--json", str(out)], capture_output=True, text=True, timeout=600,
                       env={**__import__("os").environ, "REGCLS_CACHE": str(tmp_path / "cache")})
    assert r.returncode in (0, 1), r.stderr[-2000:]
    got = json.loads(out.read_text())
    assert list(got["steps"]) == ["doctor", "exactness", "giant_518_cli", "model_ready", "benchmark"]
    assert got["steps"]["exactness"]["ok"] and got["steps"]["exactness"]["worst"] < 1e-4
    assert got["steps"]["giant_518_cli"]["ok"] and got["steps"]["giant_518_cli"]["images"] == 16
    assert got["steps"]["benchmark"]["device_rows"][0]["end_to_end_img_per_s"] > 0
    table = r.stdout[r.stdout.index("## gpu-check"):]
    for step in ("doctor", "exactness", "ViT-g 518 px CLI", "model ready", "paper profile"):
        assert f"| {step} |" in table, step
    assert [s["step"] for s in got["summary"]][:4] == ["doctor", "exactness", "ViT-g 518 px CLI", "model ready"]
