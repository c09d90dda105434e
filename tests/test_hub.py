"""The real hub loading path on a local hub cache in the hub's own layout (random full-size weights): timm's
pretrained config, checkpoint filter and position-embedding resampling run; failures are one line."""
import huggingface_hub.constants as hc
import pytest
import torch

from regcls.errors import RegclsError
from regcls.models import create, hub_file

from rehearsal import write_hub_model

NAME = "vit_small_patch14_reg4_dinov2.lvd142m"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    write_hub_model(NAME, root)
    return root


def test_pretrained_loads_from_the_hub_cache_and_resamples_the_grid(hub, monkeypatch):
    from safetensors.torch import load_file
    from timm.layers import resample_abs_pos_embed

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(hub))
    model = create(NAME, pretrained=True, img_size=224)
    sd = load_file(str(hub_file(NAME)))
    assert sd["pos_embed"].shape == (1, 37 * 37, 384)    # the hub file's native 518 px grid (registers: no
    want = resample_abs_pos_embed(sd["pos_embed"], (16, 16), num_prefix_tokens=0)  # [CLS] position)
    torch.testing.assert_close(model.pos_embed, want)                  # resampled to 224 px: 16 x 16
    torch.testing.assert_close(model.reg_token, sd["reg_token"])
    torch.testing.assert_close(model.blocks[3].attn.qkv.weight, sd["blocks.3.attn.qkv.weight"])


def test_weights_missing_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(RegclsError) as e:
        create(NAME, pretrained=True, img_size=224)
    msg = str(e.value)
    assert "\n" not in msg and NAME in msg and "not in the hub cache" in msg and "with internet" in msg


def test_truncated_weights_file_names_the_file(hub, tmp_path, monkeypatch):
    import shutil
    copy = tmp_path / "hub"
    shutil.copytree(hub, copy, symlinks=True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(copy))
    blob = hub_file(NAME).resolve()
    blob.write_bytes(blob.read_bytes()[: blob.stat().st_size // 2])
    with pytest.raises(RegclsError) as e:
        create(NAME, pretrained=True, img_size=224)
    msg = str(e.value)
    assert "\n" not in msg and str(blob) in msg and "truncated or corrupt" in msg and "delete it" in msg


def test_an_unreachable_hub_is_offline_for_the_load_only(hub, monkeypatch):
    """Offline during the load (the local cache, no retries); the process's own setting untouched afterwards."""
    import os

    import timm

    from regcls import models

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(hub))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(models, "hub_reachable", lambda: False)
    during = []
    real = timm.create_model

    def recording(*a, **k):
        during.append((os.environ.get("HF_HUB_OFFLINE"), hc.HF_HUB_OFFLINE))
        return real(*a, **k)

    monkeypatch.setattr(timm, "create_model", recording)
    create(NAME, pretrained=True, img_size=224)
    assert during[-1] == ("1", True)
    assert "HF_HUB_OFFLINE" not in os.environ and hc.HF_HUB_OFFLINE is False
