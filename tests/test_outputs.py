"""sana.outputs: numbered names that never overwrite, A1111 parameters text, PNG metadata, atomic writes."""

import json

import pytest
from PIL import Image

import sana
import sana.outputs
from sana.errors import SanaError
from sana.outputs import OutputError, a1111_parameters, numbered_paths, read_png_parameters, save_png

PARAMS = {
    "prompt": "a cat in a hat",
    "negative_prompt": "blurry, low quality",
    "steps": 20,
    "sampler": "flow_dpm_solver",
    "guidance": 4.5,
    "seed": 0,
    "width": 1024,
    "height": 768,
    "model": "sana-600m-1024",
}


def image(seed: int = 0, size=(16, 12)) -> Image.Image:
    """A small RGB image whose pixels depend on `seed`."""
    return Image.frombytes("RGB", size, bytes((seed * 7 + i * 31) % 256 for i in range(size[0] * size[1] * 3)))


def names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_single_free_name_and_parent_created(tmp_path):
    out = tmp_path / "new" / "deeper" / "cat.png"
    assert numbered_paths(out, 1, overwrite=False) == [out]
    assert out.parent.is_dir()
    assert numbered_paths(str(out), 1, overwrite=True) == [out]


def test_numbering_never_overwrites(tmp_path):
    out = tmp_path / "cat.png"
    out.write_bytes(b"first run")
    (tmp_path / "cat-0001.png").write_bytes(b"one")
    (tmp_path / "cat-0002.png").write_bytes(b"two")
    (tmp_path / "dog-0009.png").write_bytes(b"another stem")
    (tmp_path / "cat-0007.jpg").write_bytes(b"another suffix")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    single = numbered_paths(out, 1, overwrite=False)
    assert single == [tmp_path / "cat-0003.png"]
    several = numbered_paths(out, 3, overwrite=False)
    assert several == [tmp_path / f"cat-{n:04d}.png" for n in (3, 4, 5)]

    for i, path in enumerate(several):
        save_png(image(i), path, PARAMS)
    for name, data in before.items():
        assert (tmp_path / name).read_bytes() == data, name
    assert numbered_paths(out, 2, overwrite=False) == [tmp_path / "cat-0006.png", tmp_path / "cat-0007.png"]


def test_numbering_continues_after_the_highest_number(tmp_path):
    (tmp_path / "cat-0005.png").write_bytes(b"x")
    (tmp_path / "cat-12345.png").write_bytes(b"y")  # past 9999 the numbers just grow
    assert numbered_paths(tmp_path / "cat.png", 2, overwrite=False) == [
        tmp_path / "cat-12346.png",
        tmp_path / "cat-12347.png",
    ]
    assert numbered_paths(tmp_path / "dog.png", 2, overwrite=False) == [
        tmp_path / "dog-0001.png",
        tmp_path / "dog-0002.png",
    ]


def test_overwrite_returns_plain_names_and_replaces(tmp_path):
    out = tmp_path / "cat.png"
    out.write_bytes(b"old")
    (tmp_path / "cat-0001.png").write_bytes(b"old one")
    assert numbered_paths(out, 1, overwrite=True) == [out]
    assert numbered_paths(out, 2, overwrite=True) == [tmp_path / "cat-0001.png", tmp_path / "cat-0002.png"]
    save_png(image(), out, PARAMS)
    with Image.open(out) as im:
        assert im.size == (16, 12)


@pytest.mark.parametrize("name", ["cat.jpg", "cat", "cat.png.txt", "cat.webp"])
def test_rejects_other_suffixes(tmp_path, name):
    with pytest.raises(ValueError, match="must be a .png file") as info:
        numbered_paths(tmp_path / name, 1, overwrite=False)
    assert isinstance(info.value, SanaError)
    with pytest.raises(OutputError, match="must be a .png file"):
        save_png(image(), tmp_path / name, PARAMS)
    assert names(tmp_path) == []


def test_rejects_bad_count_and_folder(tmp_path):
    with pytest.raises(OutputError, match="at least 1, got 0"):
        numbered_paths(tmp_path / "cat.png", 0, overwrite=False)
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(OutputError, match="is a folder"):
        numbered_paths(tmp_path / "dir.png", 1, overwrite=True)


def test_parameters_text_format():
    text = a1111_parameters(PARAMS)
    assert text == (
        "a cat in a hat\n"
        "Negative prompt: blurry, low quality\n"
        "Steps: 20, Sampler: flow_dpm_solver, CFG scale: 4.5, Seed: 0, Size: 1024x768, Model: sana-600m-1024, "
        f"Version: sana {sana.__version__}"
    )


def test_parameters_text_optional_keys_and_quoting():
    params = {"prompt": "a dog", "negative_prompt": "", "seed": 7, "width": 512, "model": "/models/a,b:c"}
    # No negative prompt line; no Size without both sides; values with "," or ":" are JSON-quoted like A1111.
    assert a1111_parameters(params) == f'a dog\nSeed: 7, Model: "/models/a,b:c", Version: sana {sana.__version__}'
    extra = a1111_parameters({"prompt": "x", "flow_shift": 3.0, "software": "sana 9.9", "unknown": 1})
    assert extra == "x\nShift: 3.0, Version: sana 9.9"


def test_metadata_round_trip(tmp_path):
    path = tmp_path / "cat.png"
    img = image(3)
    assert save_png(img, path, PARAMS) == path
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.tobytes() == img.tobytes()
        assert set(im.text) == {"parameters", "sana"}
        assert im.text["parameters"] == a1111_parameters({**PARAMS, "software": f"sana {sana.__version__}"})
        assert im.text["parameters"].endswith(f"Version: sana {sana.__version__}")
        stored = json.loads(im.text["sana"])
    expected = {**PARAMS, "software": f"sana {sana.__version__}"}
    assert stored == expected
    assert read_png_parameters(path) == expected
    assert read_png_parameters(str(path)) == expected


def test_values_json_cannot_hold_are_stored_as_strings(tmp_path):
    path = save_png(image(), tmp_path / "x.png", {"prompt": "p", "source": tmp_path, "size": (4, 2)})
    meta = read_png_parameters(path)
    assert meta["source"] == str(tmp_path)
    assert meta["size"] == [4, 2]


@pytest.mark.parametrize(
    "prompt",
    ["一只戴帽子的猫", "chat à chapeau, café", "a cat 🐱🎩 with a hat", "Кот в шляпе\nна двух строках"],
)
def test_non_ascii_and_emoji_round_trip(tmp_path, prompt):
    params = {**PARAMS, "prompt": prompt, "negative_prompt": "flou, 模糊 😿"}
    path = save_png(image(), tmp_path / "cat.png", params)
    assert b"iTXt" in path.read_bytes()  # UTF-8 chunks: tEXt could not hold these
    with Image.open(path) as im:
        assert im.text["parameters"].startswith(prompt + "\nNegative prompt: flou, 模糊 😿\nSteps: 20, ")
    meta = read_png_parameters(path)
    assert meta["prompt"] == prompt
    assert meta["negative_prompt"] == "flou, 模糊 😿"


def test_latin1_text_is_utf8_itxt(tmp_path):
    data = save_png(image(), tmp_path / "cat.png", {"prompt": "café crème"}).read_bytes()
    assert b"iTXtparameters" in data and b"tEXtparameters" not in data
    assert "café crème".encode() in data  # UTF-8, not Latin-1


def test_ascii_metadata_is_plain_text(tmp_path):
    data = save_png(image(), tmp_path / "cat.png", PARAMS).read_bytes()
    assert b"tEXtparameters\x00a cat in a hat\n" in data
    assert b"iTXt" not in data


def test_atomic_write_leaves_nothing_behind(tmp_path):
    save_png(image(), tmp_path / "a.png", PARAMS)
    save_png(image(1), tmp_path / "a.png", PARAMS)  # replacing too
    assert names(tmp_path) == ["a.png"]


@pytest.mark.parametrize("fail_in", ["encode", "rename"])
def test_failed_write_keeps_old_file_and_no_temp(tmp_path, monkeypatch, fail_in):
    path = tmp_path / "cat.png"
    save_png(image(1), path, PARAMS)
    old = path.read_bytes()

    if fail_in == "encode":

        def broken_save(self, fp, *args, **kwargs):
            fp.write(b"\x89PNG\r\n\x1a\n half a file")  # a torn PNG, then the crash
            raise OSError("disk full")

        monkeypatch.setattr(Image.Image, "save", broken_save)
    else:

        def broken_replace(src, dst):
            raise OSError("rename failed")

        monkeypatch.setattr(sana.outputs.os, "replace", broken_replace)

    with pytest.raises(OSError, match="disk full|rename failed"):
        save_png(image(2), path, PARAMS)
    assert path.read_bytes() == old
    with pytest.raises(OSError):
        save_png(image(2), tmp_path / "new.png", PARAMS)
    assert names(tmp_path) == ["cat.png"]


def test_read_parameters_errors(tmp_path):
    plain = tmp_path / "plain.png"
    image().save(plain)
    with pytest.raises(OutputError, match="no 'sana' metadata"):
        read_png_parameters(plain)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(OutputError, match="cannot read as an image"):
        read_png_parameters(junk)
    with pytest.raises(OutputError, match="cannot read as an image"):
        read_png_parameters(tmp_path / "missing.png")
