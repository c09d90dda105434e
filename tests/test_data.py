"""The image pipeline equals timm's own eval transform, and labels stay with their images."""
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from regcls.data import ImageList, decode_images, eval_config, list_images
from regcls.errors import RegclsError

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
    from regcls.runner import trace_files
    from regcls.tracefile import load_trace

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
        trace_files(model, ImageList(files, ids, labels), out=tmp_path / "t.npz", meta={"model": "m", "weights": "random", "dataset": "lab"}, img_size=28,
                    progress=False)
    t = load_trace(tmp_path / "t.npz")
    assert len(t["image_ids"]) == 8 and "1/1.png" not in list(t["image_ids"])
    assert [int(str(i).split("/")[0]) for i in t["image_ids"]] == t["labels"].tolist()


# ------------------------------------------------------------------ every pixel format, exact values

def _img16(mode, arr):
    """A 16-bit image in Pillow's ``mode`` (I;16L is written as a little-endian TIFF and read back as I;16)."""
    return Image.frombytes(mode, (arr.shape[1], arr.shape[0]), arr.astype(">u2" if mode == "I;16B" else "<u2").tobytes())


@pytest.fixture
def rgb(tmp_path):
    """``rgb(image)``: the array load_rgb gives for a PIL image written to a file (TIFF keeps every mode below)."""
    from regcls.data import load_rgb
    names = iter(range(1000))

    def convert(im, suffix=".tif", **save):
        path = tmp_path / f"{next(names)}{suffix}"
        im.save(path, **save)
        out = load_rgb(path)
        assert out.mode == "RGB"
        return np.asarray(out)
    return convert


def _grey(values):  # expected RGB of a grey image
    return np.repeat(np.asarray(values, np.uint8)[..., None], 3, -1)


# 60000 -> 233 (a 255/65535 scale), not 234; 51529 -> 201 (/65535), not 200 (/65536)
V16 = np.array([[0, 257, 30000, 60000], [65535, 1000, 40000, 51529]])


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L"])
def test_16_bit_images_scale_to_8_bits(mode, rgb):
    np.testing.assert_array_equal(rgb(_img16(mode, V16)), _grey(np.floor(V16 * 255.0 / 65535.0 + 0.5)))


def test_16_bit_images_scale_from_16_bits_even_when_dark(rgb):
    dark = np.array([[0, 100, 255, 200]])   # a 16-bit image whose values fit 8 bits is dark, not bright
    np.testing.assert_array_equal(rgb(_img16("I;16", dark)), _grey(np.floor(dark * 255.0 / 65535.0 + 0.5)))


def test_32_bit_integer_and_float_images(rgb):
    small = np.array([[0, 7, 200, 255]], np.int32)        # 8-bit range stored as 32 bits: kept as is
    np.testing.assert_array_equal(rgb(Image.fromarray(small, "I")), _grey(small))
    for big in (np.array([[0, 300, 65535, 30000]], np.int32), np.array([[0, 256, 128]], np.int32)):  # beyond 8 bits
        np.testing.assert_array_equal(rgb(Image.fromarray(big, "I")), _grey(np.floor(big * 255 / 65535 + 0.5)))
    unit = np.array([[0.0, 0.5, 0.999, 1.0]], np.float32)  # [0, 1] floats: times 255, truncated
    np.testing.assert_array_equal(rgb(Image.fromarray(unit, "F")), _grey([[0, 127, 254, 255]]))
    np.testing.assert_array_equal(rgb(Image.fromarray(np.array([[0.0, 1.5]], np.float32), "F")), _grey([[0, 1]]))
    wide = np.array([[-3.0, 3.7, 254.2, 400.0, 1.5]], np.float32)  # beyond 1: values as they are, clipped
    np.testing.assert_array_equal(rgb(Image.fromarray(wide, "F")), _grey([[0, 3, 254, 255, 1]]))


def test_transparent_pixels_become_white_and_opaque_ones_keep_their_colour(rgb):
    rgba = np.zeros((1, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)   # opaque
    rgba[0, 1] = (10, 20, 30, 0)     # transparent
    want = np.array([[[10, 20, 30], [255, 255, 255]]], np.uint8)
    np.testing.assert_array_equal(rgb(Image.fromarray(rgba, "RGBA")), want)
    la = Image.fromarray(np.array([[[90, 255], [90, 0]]], np.uint8), "LA")
    np.testing.assert_array_equal(rgb(la), np.array([[[90] * 3, [255] * 3]], np.uint8))
    pal = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    np.testing.assert_array_equal(rgb(pal, ".png", transparency=1), np.array([[[10, 20, 30], [255, 255, 255]]], np.uint8))


def test_palette_cmyk_and_greyscale_convert_like_pillow(rgb):
    colour = Image.fromarray(np.random.default_rng(1).integers(0, 255, (5, 6, 3), dtype=np.uint8))
    for im in (colour.convert("P"), colour.convert("CMYK"), colour.convert("L"), colour.convert("1")):
        np.testing.assert_array_equal(rgb(im), np.asarray(im.convert("RGB")))


# ------------------------------------------------------------------ listing, geometry, normalisation, decoding

def test_list_images_keeps_image_files_in_name_order(tmp_path):
    from regcls.errors import RegclsError
    for name in ["b.png", "a.JPG", "c.txt", ".hidden.png", "d.webp"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "e.png").write_bytes(b"x")
    assert [p.name for p in list_images(tmp_path)] == ["a.JPG", "b.png", "d.webp"]
    assert [p.name for p in list_images(tmp_path, labelled=True)] == ["e.png"]
    with pytest.raises(RegclsError, match="does not exist"):
        list_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegclsError, match=r"^no image files \(\.jpg, \.jpeg, \.png, .*\) in "):
        list_images(tmp_path / "empty")


def test_eval_config_reads_the_models_preprocessing():
    model = timm.create_model("vit_small_patch16_224.augreg_in21k_ft_in1k", pretrained=False, num_classes=0,
                              embed_dim=32, depth=1, num_heads=2)
    geo, mean, std = eval_config(model, 64)
    assert (geo.img_size, geo.crop_pct, geo.interpolation, geo.crop_mode) == (64, 0.9, "bicubic", "center")
    assert mean == (0.5, 0.5, 0.5) and std == (0.5, 0.5, 0.5)
    assert geo.key() == "64-0.9-bicubic-center"
    dino = timm.create_model("vit_small_patch14_reg4_dinov2.lvd142m", pretrained=False, num_classes=0, img_size=56,
                             embed_dim=32, depth=1, num_heads=2)
    geo, mean, std = eval_config(dino, 56)
    assert geo.crop_pct == 1.0 and mean == pytest.approx((0.485, 0.456, 0.406)) and std == pytest.approx((0.229, 0.224, 0.225))
    geo, mean2, _ = eval_config(dino, 56, crop_pct=0.875)   # the open choice: resize 64, crop 56 (HF's 256/224)
    assert geo.key() == "56-0.875-bicubic-center" and mean2 == mean
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(RegclsError, match=r"^crop_pct=.*: give the fraction of the resized image kept, in \(0, 1\]$"):
            eval_config(dino, 56, crop_pct=bad)


def test_geometry_resizes_the_short_side_and_crops_the_centre():
    from regcls.data import Geometry
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, 20:60] = 255  # a white centre square of a 2:1 image
    out = np.asarray(Geometry(20, 1.0, "nearest", "center").transform()(Image.fromarray(arr)))
    assert out.shape == (20, 20, 3) and out.min() == 255  # the centre 40 x 40, resized to 20
    out = np.asarray(Geometry(20, 0.5, "nearest", "center").transform()(Image.fromarray(arr)))
    assert out.shape == (20, 20, 3) and out.min() == 255


def test_normalized_slices_equal_to_tensor_and_normalize():
    from regcls.data import ImageStore
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (5, 3, 4, 4), dtype=np.uint8)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    store = ImageStore(pixels, list("abcde"))
    norm = store.normalized(mean, std)
    assert len(store) == 5 and len(norm) == 5 and store.skipped == []
    want = (torch.from_numpy(pixels[1:4]).double() / 255 - torch.tensor(mean).view(1, 3, 1, 1).double()) \
        / torch.tensor(std).view(1, 3, 1, 1).double()
    for n in (norm, norm.to("cpu")):
        got = n[1:4]
        assert got.dtype == torch.float32 and got.device.type == "cpu"
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("workers", [1, 2])
def test_decoding_skips_broken_files_by_name_in_serial_and_in_workers(tmp_path, workers):
    from regcls.data import Geometry
    from regcls.errors import RegclsError
    files = []
    for i in range(70):   # 64 or more files go to worker processes
        f = tmp_path / f"{i:03d}.png"
        if i in (3, 50):
            f.write_bytes(b"broken")
        else:
            Image.fromarray(np.full((8, 12, 3), i, np.uint8)).save(f)
        files.append(f)
    geo = Geometry(4, 1.0, "nearest", "center")
    with pytest.warns(UserWarning) as warned:
        store = decode_images(files, [f.stem for f in files], geo, workers=workers, progress=False)
    assert [str(w.message).split(":")[0] for w in warned] == [f"skipped {files[3]}", f"skipped {files[50]}"]
    assert store.ids == [f"{i:03d}" for i in range(70) if i not in (3, 50)]
    assert store.pixels.shape == (68, 3, 4, 4) and store.pixels.dtype == np.uint8
    np.testing.assert_array_equal(store.pixels[:, 0, 0, 0], [i for i in range(70) if i not in (3, 50)])
    assert [Path(f).name for f, _ in store.skipped] == ["003.png", "050.png"]
    assert all(r.startswith("UnidentifiedImageError: ") for _, r in store.skipped)
    with pytest.raises(RegclsError, match="no readable image among 1 files"), pytest.warns(UserWarning):
        decode_images([files[3]], ["x"], geo, progress=False)


def test_decoded_pixels_are_channel_first_and_not_transposed(tmp_path):
    from regcls.data import Geometry
    arr = np.zeros((4, 4, 3), np.uint8)
    arr[0, 3] = (200, 100, 50)      # row 0, column 3
    path = tmp_path / "one.png"
    Image.fromarray(arr).save(path)
    store = decode_images([path], ["one"], Geometry(4, 1.0, "nearest", "center"), progress=False)
    assert store.pixels[0, :, 0, 3].tolist() == [200, 100, 50] and store.pixels[0, :, 3, 0].tolist() == [0, 0, 0]
