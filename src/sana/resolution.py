"""Resolution handling for Sana inference: aspect-ratio binning, resize-and-crop back, conversion to PIL.

With binning on, a request for (height, width) is generated at the table entry whose H/W ratio key is closest,
then the decoded (B, C, H_bin, W_bin) image is resized to cover the request and centre-cropped to it. The
tables equal diffusers 0.42.1's ``ASPECT_RATIO_{512,1024,2048,4096}_BIN``, the ones ``SanaPipeline`` bins to:
PixArt-alpha's 33-key 512/1024 test tables, PixArt-Sigma's 40-key 2048 table and Sana's 4096 table (twice the
2048 one). Keys are H/W ratios as strings, values (height, width) in pixels; key order matters for ties.

The original's 40-key training bucket tables at 512/1024 are not reproduced: the reference names their seven
extra keys but not the sizes they map to.
"""

from collections.abc import Mapping
from numbers import Integral
from types import MappingProxyType

import numpy as np
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from sana.errors import ConfigError

AspectRatioTable = Mapping[str, tuple[int, int]]

# fmt: off
_RATIOS_1024 = {
    "0.25": (512, 2048), "0.28": (512, 1856), "0.32": (576, 1792), "0.33": (576, 1728), "0.35": (576, 1664),
    "0.4": (640, 1600), "0.42": (640, 1536), "0.48": (704, 1472), "0.5": (704, 1408), "0.52": (704, 1344),
    "0.57": (768, 1344), "0.6": (768, 1280), "0.68": (832, 1216), "0.72": (832, 1152), "0.78": (896, 1152),
    "0.82": (896, 1088), "0.88": (960, 1088), "0.94": (960, 1024), "1.0": (1024, 1024), "1.07": (1024, 960),
    "1.13": (1088, 960), "1.21": (1088, 896), "1.29": (1152, 896), "1.38": (1152, 832), "1.46": (1216, 832),
    "1.67": (1280, 768), "1.75": (1344, 768), "2.0": (1408, 704), "2.09": (1472, 704), "2.4": (1536, 640),
    "2.5": (1600, 640), "3.0": (1728, 576), "4.0": (2048, 512),
}
_RATIOS_2048 = {
    "0.25": (1024, 4096), "0.26": (1024, 3968), "0.27": (1024, 3840), "0.28": (1024, 3712), "0.32": (1152, 3584),
    "0.33": (1152, 3456), "0.35": (1152, 3328), "0.4": (1280, 3200), "0.42": (1280, 3072), "0.48": (1408, 2944),
    "0.5": (1408, 2816), "0.52": (1408, 2688), "0.57": (1536, 2688), "0.6": (1536, 2560), "0.68": (1664, 2432),
    "0.72": (1664, 2304), "0.78": (1792, 2304), "0.82": (1792, 2176), "0.88": (1920, 2176), "0.94": (1920, 2048),
    "1.0": (2048, 2048), "1.07": (2048, 1920), "1.13": (2176, 1920), "1.21": (2176, 1792), "1.29": (2304, 1792),
    "1.38": (2304, 1664), "1.46": (2432, 1664), "1.67": (2560, 1536), "1.75": (2688, 1536), "2.0": (2816, 1408),
    "2.09": (2944, 1408), "2.4": (3072, 1280), "2.5": (3200, 1280), "2.89": (3328, 1152), "3.0": (3456, 1152),
    "3.11": (3584, 1152), "3.62": (3712, 1024), "3.75": (3840, 1024), "3.88": (3968, 1024), "4.0": (4096, 1024),
}
# fmt: on

ASPECT_RATIO_512: AspectRatioTable = MappingProxyType({k: (h // 2, w // 2) for k, (h, w) in _RATIOS_1024.items()})
ASPECT_RATIO_1024: AspectRatioTable = MappingProxyType(_RATIOS_1024)
ASPECT_RATIO_2048: AspectRatioTable = MappingProxyType(_RATIOS_2048)
ASPECT_RATIO_4096: AspectRatioTable = MappingProxyType({k: (2 * h, 2 * w) for k, (h, w) in _RATIOS_2048.items()})

_TABLES = {16: ASPECT_RATIO_512, 32: ASPECT_RATIO_1024, 64: ASPECT_RATIO_2048, 128: ASPECT_RATIO_4096}


def scaled_table(base: int, multiple: int = 32) -> AspectRatioTable:
    """Sana's 1024 table scaled by base / 1024, each side rounded to a multiple of `multiple` (at least one)."""
    if base < multiple or multiple < 1:
        raise ConfigError(f"base resolution {base} must be >= multiple {multiple} >= 1")
    scale = base / 1024

    def side(x: int) -> int:
        return max(multiple, round(x * scale / multiple) * multiple)

    return MappingProxyType({k: (side(h), side(w)) for k, (h, w) in _RATIOS_1024.items()})


def table_for_sample_size(sample_size: int) -> AspectRatioTable:
    """The binning table for a transformer's latent ``sample_size``: Sana's own for 16, 32, 64, 128 (512 ... 4096
    px), else the 1024 table scaled to sample_size * 32 px (e.g. 8 -> 256 px, our shapes model)."""
    if sample_size < 1:
        raise ConfigError(f"sample_size must be >= 1, got {sample_size!r}")
    if sample_size in _TABLES:
        return _TABLES[sample_size]
    return scaled_table(sample_size * 32)


def bin_size(height: int, width: int, table: AspectRatioTable) -> tuple[int, int]:
    """Aspect-ratio binning: the (h, w) whose ratio key is closest to height / width, the first on a tie."""
    if height <= 0 or width <= 0:
        raise ConfigError(f"height and width must be positive, got {height}x{width}")
    ratio = height / width
    key = min(table, key=lambda k: abs(float(k) - ratio))
    return table[key]


def _cover_size(src_h: int, src_w: int, height: int, width: int) -> tuple[int, int]:
    """The (h, w) that an (src_h, src_w) image is scaled to so that it covers (height, width), aspect kept."""
    scale = max(height / src_h, width / src_w)
    # int(src * scale) can land one pixel short of the target it was scaled to (src * (t / src) < t in floating
    # point); diffusers then crops to a 1-pixel side (huggingface/diffusers#8911). Never go below the target.
    return max(int(src_h * scale), height), max(int(src_w * scale), width)


def resize_and_crop(images: Tensor, height: int, width: int) -> Tensor:
    """Resize (B, C, H, W) bilinearly to cover (height, width), then centre-crop to it (diffusers' binning undo)."""
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(images.shape)}")
    src_h, src_w = images.shape[-2:]
    if (src_h, src_w) == (height, width):
        return images
    new_h, new_w = _cover_size(src_h, src_w, height, width)
    images = F.interpolate(images, size=(new_h, new_w), mode="bilinear", align_corners=False)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return images[:, :, top : top + height, left : left + width]  # (B, C, height, width)


def check_size(height: int, width: int, max_side: int = 4096, multiple: int = 32) -> None:
    """Raise ConfigError unless height and width are positive multiples of ``multiple`` up to ``max_side``."""
    for name, side in (("height", height), ("width", width)):
        if isinstance(side, bool) or not isinstance(side, Integral):
            raise ConfigError(f"{name} must be an integer, got {side!r}")
        if side <= 0 or side % multiple or side > max_side:
            raise ConfigError(f"{name} must be a positive multiple of {multiple} up to {max_side}, got {side}")


def to_pil(images: Tensor) -> list[Image.Image]:
    """Decoder output (B, 3, H, W) in [-1, 1] to RGB PIL images: round(255 (x / 2 + 1/2).clamp(0, 1)) as uint8."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    images = (images * 0.5 + 0.5).clamp(0, 1)  # in the decoder's dtype, as diffusers
    array = images.detach().cpu().permute(0, 2, 3, 1).float().numpy()  # (B, H, W, 3) float32
    array = (array * 255).round().astype(np.uint8)  # numpy rounds half to even
    return [Image.fromarray(image) for image in array]
