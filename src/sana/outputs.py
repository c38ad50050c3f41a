"""Image files written by sana: names that never overwrite, and PNG metadata that other tools can read.

Numbering (`numbered_paths`) for an output `out.png` (the folder holds the numbered files beside it):

- overwrite: 1 image -> `out.png`; n images -> `out-0001.png` ... `out-000n.png`, replaced if they exist.
- no overwrite: 1 image -> `out.png` if it does not exist. Otherwise, and always for n > 1 images, the numbers
  continue after the highest existing `out-NNNN.png` in the folder: `out-0001.png` ... in a folder that has none,
  `out-0005.png` ... after `out-0004.png`. An existing file is never returned, and the images of a later run sort
  after those of earlier runs. (Two processes choosing names in one folder at the same moment are not guarded.)

Metadata (`save_png`): two text chunks. `parameters` holds the AUTOMATIC1111 text that A1111, ComfyUI, Civitai and
image viewers display; `sana` holds JSON of every generation parameter plus `software`, read back with
`read_png_parameters`. ASCII text goes into tEXt chunks, anything else into UTF-8 iTXt chunks.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sana.errors import SanaError

__all__ = ["OutputError", "a1111_parameters", "numbered_paths", "read_png_parameters", "save_png"]

# params key -> A1111 label, in the order A1111 writes them ("Size" comes from width and height).
_A1111_LABELS = (
    ("steps", "Steps"),
    ("sampler", "Sampler"),
    ("guidance", "CFG scale"),
    ("seed", "Seed"),
    ("size", "Size"),
    ("model", "Model"),
    ("flow_shift", "Shift"),
)


class OutputError(SanaError, ValueError):
    """An output file cannot be named, written or read: the message names the path."""


def numbered_paths(output: str | Path, count: int, overwrite: bool) -> list[Path]:
    """The `count` PNG paths to write for `output` (scheme in the module docstring); creates the parent folder."""
    output = Path(output)
    if output.suffix.lower() != ".png":
        raise OutputError(f"{output}: the output must be a .png file, not {output.suffix or 'a name without suffix'!r}")
    if count < 1:
        raise OutputError(f"the number of images must be at least 1, got {count}")
    if output.is_dir():
        raise OutputError(f"{output} is a folder: name a .png file inside it, e.g. {output / 'image.png'}")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the output folder {output.parent}: {e.strerror or e}") from e

    def numbered(n: int) -> Path:
        return output.with_name(f"{output.stem}-{n:04d}{output.suffix}")

    if overwrite:
        return [output] if count == 1 else [numbered(n) for n in range(1, count + 1)]
    if count == 1 and not output.exists():
        return [output]
    pattern = re.compile(re.escape(output.stem) + r"-(\d{4,})" + re.escape(output.suffix))
    taken = [int(m.group(1)) for p in output.parent.iterdir() if (m := pattern.fullmatch(p.name))]
    n = max(taken, default=0) + 1
    paths: list[Path] = []
    while len(paths) < count:
        if not numbered(n).exists():  # only differs from the scan on case-insensitive file systems
            paths.append(numbered(n))
        n += 1
    return paths


def a1111_parameters(params: dict[str, Any]) -> str:
    """The AUTOMATIC1111 `parameters` text: the prompt, `Negative prompt: ...`, then one line of settings.

    Keys read (each optional; others are ignored here but kept in the `sana` JSON): prompt, negative_prompt
    (written only if non-empty), steps, sampler, guidance (-> "CFG scale"), seed, width and height (together ->
    "Size: WIDTHxHEIGHT", A1111's order), model, flow_shift (-> "Shift"), software (-> "Version"; defaults to
    "sana <version>"). Values holding ",", ":" or a newline are JSON-quoted, as A1111 does.
    Example: `a cat\\nSteps: 20, Sampler: flow_dpm_solver, CFG scale: 4.5, Seed: 0, Size: 1024x768, ...`.
    """
    width, height = params.get("width"), params.get("height")
    values = {**params, "size": f"{width}x{height}" if width is not None and height is not None else None}
    settings = [f"{label}: {_quote(values[key])}" for key, label in _A1111_LABELS if values.get(key) is not None]
    settings.append(f"Version: {_quote(params.get('software') or _software())}")
    lines = []
    if params.get("prompt"):
        lines.append(str(params["prompt"]))
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    lines.append(", ".join(settings))
    return "\n".join(lines)


def png_info(params: dict[str, Any]) -> PngInfo:
    """The PNG text chunks for `params`: `parameters` (A1111 text) and `sana` (JSON of every field + software)."""
    meta = {**params, "software": _software()}
    info = PngInfo()
    _add_text(info, "parameters", a1111_parameters(meta))
    _add_text(info, "sana", json.dumps(meta, ensure_ascii=False, default=_jsonable))
    return info


def png_bytes(image: Image.Image, params: dict[str, Any]) -> bytes:
    """The PNG `save_png` writes, in memory (for the HTTP server)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png_info(params))
    return buffer.getvalue()


def save_png(image: Image.Image, path: str | Path, params: dict[str, Any]) -> Path:
    """Write `image` as a PNG with `parameters` (A1111 text) and `sana` (JSON) chunks, atomically; returns the path.

    The PNG is written to a temporary file in the same folder and renamed over `path`, so a crash never leaves a
    torn file. Values JSON cannot hold (a Path, a dtype, a numpy scalar) are stored as their item or string.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise OutputError(f"{path}: the output must be a .png file, not {path.suffix or 'a name without suffix'!r}")
    info = png_info(params)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # os.open with mode 0o666 keeps the user's umask (mkstemp would make the image readable by its owner only).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_png_parameters(path: str | Path) -> dict[str, Any]:
    """The generation parameters stored by `save_png` in the `sana` chunk of a PNG."""
    try:
        with Image.open(path) as im:
            raw = getattr(im, "text", {}).get("sana")
    except OSError as e:
        raise OutputError(f"{path}: cannot read as an image: {e}") from e
    if raw is None:
        raise OutputError(f"{path} has no 'sana' metadata (not written by sana, or its metadata was stripped)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise OutputError(f"{path}: the 'sana' metadata is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise OutputError(f"{path}: the 'sana' metadata is not a JSON object")
    return meta


def _software() -> str:
    import sana  # at call time: sana/__init__ may import this module

    return f"sana {sana.__version__}"


def _quote(value: Any) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _add_text(info: PngInfo, key: str, text: str) -> None:
    if text.isascii():
        info.add_text(key, text)
    else:
        info.add_itxt(key, text)  # UTF-8; tEXt is Latin-1 only


def _jsonable(value: Any) -> Any:
    try:
        return value.item()  # numpy / torch scalars
    except (AttributeError, TypeError, ValueError, RuntimeError):
        return str(value)
