"""The image pipeline equals timm's own eval transform, and labels stay with their images."""
import numpy as np
import pytest
import timm
import torch
from PIL import Image

from regcls.data import decode_images, eval_config, list_images

CASES = {  # name -> (timm name with its pretrained config, overrides): DINOv2 crops nothing, augreg crops 0.9
    "dinov2": ("vit_small_patch14_reg4_dinov2.lvd142m", dict(img_size=56)),
    "augreg": ("vit_small_patch16_224.augreg_in21k_ft_in1k", dict(img_size=48)),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(64, 40), (33, 71), (120, 90), (50, 50)]):
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([xx * 255 // w, yy * 255 // h, rng.integers(0, 255, (h, w))], -1).astype(np.uint8)
        Image.fromarray(img).save(d / f"im{i}.png")
    return d


@pytest.mark.parametrize("case", list(CASES))
def test_image_store_equals_timms_eval_transform(case, folder):
    name, over = CASES[case]
    model = timm.create_model(name, pretrained=False, num_classes=0, embed_dim=32, depth=1, num_heads=2, **over)
    S = over["img_size"]
    geometry, mean, std = eval_config(model, S)
    files = list_images(folder)
    store = decode_images(files, [f.name for f in files], geometry, progress=False)
    ours = store.normalized(mean, std)[0:len(files)]
    cfg = timm.data.resolve_data_config({"input_size": (3, S, S)}, model=model)
    assert cfg["crop_pct"] == (1.0 if case == "dinov2" else 0.9)
    reference = timm.data.create_transform(**cfg)
    want = torch.stack([reference(Image.open(f).convert("RGB")) for f in files])
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-6)


def test_labels_stay_with_their_images_when_a_file_is_skipped(tmp_path):
    """A broken file in the middle of a labelled folder: every later image keeps its own class."""
    from regcls.trace import load_trace, trace_files

    root = tmp_path / "lab"
    for c in range(3):
        (root / str(c)).mkdir(parents=True)
        for j in range(3):
            Image.fromarray(np.full((20, 30, 3), 40 * c + j, np.uint8)).save(root / str(c) / f"{j}.png")
    (root / "1" / "1.png").write_bytes(b"not an image")
    files = list_images(root, labelled=True)
    ids = [f.relative_to(root).as_posix() for f in files]
    labels = np.array([int(f.parent.name) for f in files])
    model = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0, img_size=28,
                              embed_dim=16, depth=1, num_heads=2).eval()
    with pytest.warns(UserWarning, match="skipped"):
        trace_files(model, files, ids, labels, out=tmp_path / "t.npz", meta={"model": "m", "weights": "random", "dataset": "lab"}, img_size=28,
                    progress=False)
    t = load_trace(tmp_path / "t.npz")
    assert len(t["image_ids"]) == 8 and "1/1.png" not in list(t["image_ids"])
    assert [int(str(i).split("/")[0]) for i in t["image_ids"]] == t["labels"].tolist()
