"""sana.resolution against diffusers' PixArtImageProcessor and aspect-ratio tables (the oracle)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.image_processor import PixArtImageProcessor
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_512_BIN, ASPECT_RATIO_1024_BIN
from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN
from diffusers.pipelines.sana.pipeline_sana import ASPECT_RATIO_4096_BIN

from sana.resolution import (
    ASPECT_RATIO_512,
    ASPECT_RATIO_1024,
    ASPECT_RATIO_2048,
    ASPECT_RATIO_4096,
    _cover_size,
    bin_size,
    check_size,
    resize_and_crop,
    table_for_sample_size,
    to_pil,
)

# (sample_size, ours, diffusers')
TABLES = [
    (16, ASPECT_RATIO_512, ASPECT_RATIO_512_BIN),
    (32, ASPECT_RATIO_1024, ASPECT_RATIO_1024_BIN),
    (64, ASPECT_RATIO_2048, ASPECT_RATIO_2048_BIN),
    (128, ASPECT_RATIO_4096, ASPECT_RATIO_4096_BIN),
]
TABLE_IDS = ["512", "1024", "2048", "4096"]
GRID = range(256, 4097, 32)


@pytest.mark.parametrize(("sample_size", "ours", "ref"), TABLES, ids=TABLE_IDS)
def test_tables_equal_diffusers(sample_size, ours, ref):
    assert list(ours) == list(ref)  # same keys in the same order (order decides ties)
    for key, (h, w) in ref.items():
        assert h == int(h) and w == int(w), key
        assert ours[key] == (int(h), int(w)), key
        assert all(type(v) is int for v in ours[key]), key
    assert table_for_sample_size(sample_size) is ours


@pytest.mark.parametrize("sample_size", [0, -32])
def test_table_for_sample_size_rejects_non_positive(sample_size):
    with pytest.raises(ValueError, match=f"sample_size must be >= 1, got {sample_size}"):
        table_for_sample_size(sample_size)


@pytest.mark.parametrize("sample_size", [8, 24, 48])
def test_other_sample_sizes_scale_the_1024_table(sample_size):
    """Sizes without a table of Sana's (our 256 px shapes model: 8) bin into the 1024 table scaled to their size."""
    table = table_for_sample_size(sample_size)
    base = sample_size * 32
    assert list(table) == list(ASPECT_RATIO_1024)
    assert table["1.0"] == (base, base)
    for key, (h, w) in table.items():
        h_ref, w_ref = ASPECT_RATIO_1024[key]
        assert h % 32 == 0 and w % 32 == 0 and h >= 32 and w >= 32
        assert abs(h - h_ref * base / 1024) <= 16 and abs(w - w_ref * base / 1024) <= 16


@pytest.mark.parametrize(("ours", "ref"), [t[1:] for t in TABLES], ids=TABLE_IDS)
def test_bin_size_equals_diffusers(ours, ref):
    g = torch.Generator().manual_seed(0)
    sizes = [(h, w) for h in GRID for w in GRID]  # every multiple of 32 from 256 to 4096
    sizes += [tuple(s) for s in torch.randint(1, 9000, (2000, 2), generator=g).tolist()]  # arbitrary sizes
    keys = [float(k) for k in ref]  # ratios exactly between two neighbouring keys: the tie-breaking cases
    sizes += [(round((a + b) * 1000), 2000) for a, b in zip(keys, keys[1:], strict=False)]
    for h, w in sizes:
        assert bin_size(h, w, ours) == PixArtImageProcessor.classify_height_width_bin(h, w, ref), (h, w)


def test_bin_size_examples():
    assert bin_size(1024, 1024, ASPECT_RATIO_1024) == (1024, 1024)
    assert bin_size(720, 1280, ASPECT_RATIO_1024) == (768, 1344)  # 0.5625 -> key 0.57
    assert bin_size(4096, 1024, ASPECT_RATIO_4096) == (8192, 2048)
    with pytest.raises(ValueError, match="positive"):
        bin_size(512, 0, ASPECT_RATIO_1024)


RESIZE_CASES = [
    ((2, 3, 64, 96), (80, 112)),  # up, non-square
    ((1, 3, 96, 64), (48, 40)),  # down
    ((2, 4, 40, 72), (40, 56)),  # crop only
    ((1, 3, 64, 128), (96, 96)),  # one side up, the other down
    ((3, 3, 37, 53), (61, 29)),  # odd sizes
    ((1, 3, 352, 704), (320, 672)),  # a 512-table bin back to a request
    ((1, 3, 576, 448), (640, 416)),
]


@pytest.mark.parametrize(("shape", "size"), RESIZE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resize_and_crop_equals_diffusers(shape, size, dtype):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref = PixArtImageProcessor.resize_and_crop_tensor(x, size[1], size[0])
    out = resize_and_crop(x, *size)
    assert out.shape == (*shape[:2], *size) == ref.shape
    assert out.dtype == dtype
    assert torch.equal(out, ref)


def test_resize_and_crop_same_size_is_identity():
    x = torch.randn(1, 3, 32, 64)
    assert resize_and_crop(x, 32, 64) is x


def test_resize_and_crop_never_short_of_the_request():
    # diffusers#8911: int(832 * (960 / 832)) == 959, so diffusers returns a (1, 3, 1, 1280) image here.
    x = torch.randn(1, 3, 832, 1152, generator=torch.Generator().manual_seed(2))
    out = resize_and_crop(x, 960, 1280)
    expected = F.interpolate(x, size=(960, 1329), mode="bilinear", align_corners=False)[:, :, :, 24 : 24 + 1280]
    assert torch.equal(out, expected)


@pytest.mark.parametrize("table", [t[1] for t in TABLES], ids=TABLE_IDS)
def test_cover_size_covers_every_binned_request(table):
    for h in GRID:
        for w in GRID:
            bh, bw = bin_size(h, w, table)
            ch, cw = _cover_size(bh, bw, h, w)
            assert ch >= h and cw >= w and min(ch - h, cw - w) == 0, (h, w, ch, cw)
            scale = max(h / bh, w / bw)  # where diffusers' size is not short, ours is diffusers'
            if int(bh * scale) >= h and int(bw * scale) >= w:
                assert (ch, cw) == (int(bh * scale), int(bw * scale))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_to_pil_equals_diffusers(dtype):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 3, 17, 23, generator=g) * 0.8).to(dtype)  # some values beyond [-1, 1]: the clamp matters
    x[0, :, :, :] = torch.linspace(-1.05, 1.05, 3 * 17 * 23).reshape(3, 17, 23).to(dtype)  # every 1/255 step
    ref = PixArtImageProcessor(vae_scale_factor=32).postprocess(x, output_type="pil")
    ours = to_pil(x)
    assert len(ours) == len(ref) == 2
    for a, b in zip(ours, ref, strict=True):
        assert a.mode == b.mode == "RGB" and a.size == b.size == (23, 17)
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_to_pil_values_and_shape_errors():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).reshape(1, 1, 1, 4).expand(1, 3, 1, 4)
    assert np.asarray(to_pil(x)[0])[0, :, 0].tolist() == [0, 128, 255, 255]  # 127.5 rounds half to even
    x = torch.tensor([-0.4941176176071167, -0.4784313440322876]).reshape(1, 1, 1, 2).expand(1, 3, 1, 2)
    assert (((x * 0.5 + 0.5) * 255)[0, 0, 0] == torch.tensor([64.5, 66.5])).all()  # exactly half-way in float32
    assert np.asarray(to_pil(x)[0])[0, :, 0].tolist() == [64, 66]  # half to even, as numpy's round
    assert np.array_equal(np.asarray(to_pil(x)[0]), np.asarray(PixArtImageProcessor().postprocess(x)[0]))
    with pytest.raises(ValueError, match="B, 3, H, W"):
        to_pil(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="B, 3, H, W"):
        to_pil(torch.zeros(1, 4, 8, 8))


def test_check_size_accepts_valid():
    check_size(32, 4096)
    check_size(1024, 608)
    check_size(8192, 64, max_side=8192, multiple=64)


@pytest.mark.parametrize(
    ("height", "width", "match"),
    [
        (0, 512, "height must be a positive multiple of 32 up to 4096, got 0"),
        (512, -32, "width must be a positive multiple of 32 up to 4096, got -32"),
        (500, 512, "height .* got 500"),
        (512, 4128, "width .* got 4128"),
        (512.0, 512, "height must be an integer"),
        (512, True, "width must be an integer"),
    ],
)
def test_check_size_errors(height, width, match):
    with pytest.raises(ValueError, match=match):
        check_size(height, width)


def test_check_size_custom_limits():
    with pytest.raises(ValueError, match="multiple of 64 up to 2048, got 96"):
        check_size(96, 128, max_side=2048, multiple=64)
    with pytest.raises(ValueError, match="up to 2048, got 2112"):
        check_size(2112, 128, max_side=2048, multiple=64)
