"""`sana generate` through a subprocess on a tiny random pipeline folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sana.outputs import read_png_parameters
from tiny import make_tiny_pipeline


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny_cli"))


def sana_cli(*args, env=None, cwd=None):
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "sana", *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=300,
    )


def test_generate_writes_png_with_metadata(tmp_path, model_dir):
    out = tmp_path / "cat.png"
    r = sana_cli(
        "generate",
        "a cat in a hat 🎩",
        "-o",
        out,
        "--model",
        model_dir,
        "--size",
        "384x512",
        "--steps",
        "2",
        "--seed",
        "3",
        "--negative",
        "blurry",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    image = Image.open(out)
    assert image.size == (384, 512)
    params = read_png_parameters(out)
    assert params["prompt"] == "a cat in a hat 🎩" and params["seed"] == 3 and params["steps"] == 2
    assert params["negative_prompt"] == "blurry" and params["width"] == 384 and params["height"] == 512
    assert params["software"].startswith("sana ")
    text = image.text["parameters"]
    assert text.startswith("a cat in a hat 🎩\nNegative prompt: blurry\nSteps: 2, ")
    assert "Seed: 3" in text and "Size: 384x512" in text
    # Same seed, same image; never overwritten: a second run gets a new number.
    r = sana_cli(
        "generate",
        "a cat in a hat 🎩",
        "-o",
        out,
        "--model",
        model_dir,
        "--size",
        "384x512",
        "--steps",
        "2",
        "--seed",
        "3",
        "--negative",
        "blurry",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    second = sorted(p for p in tmp_path.glob("cat*.png") if p != out)
    assert len(second) == 1
    assert np.array_equal(np.asarray(Image.open(second[0])), np.asarray(image))


def test_prompts_file_and_numbering(tmp_path, model_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n\n一只猫\na bowl of ramen\n", encoding="utf-8")
    (tmp_path / "out").mkdir()
    existing = tmp_path / "out" / "img-0001.png"
    existing.write_bytes(b"keep me")
    r = sana_cli(
        "generate",
        "--prompts-file",
        prompts,
        "-o",
        tmp_path / "out" / "img.png",
        "--model",
        model_dir,
        "--steps",
        "1",
        "--num-images",
        "2",
        "--seed",
        "0",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    written = sorted((tmp_path / "out").glob("img-*.png"))
    assert len(written) == 7 and existing.read_bytes() == b"keep me"
    got = [read_png_parameters(p)["prompt"] for p in written[1:]]
    assert got == ["a red fox"] * 2 + ["一只猫"] * 2 + ["a bowl of ramen"] * 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--size", "500x512"], "multiple of 32"),
        (["--size", "4128x512"], "4096"),
        (["--size", "big"], "WIDTHxHEIGHT"),
        (["--steps", "0"], "--steps"),
        (["--guidance", "-1"], "--guidance"),
        (["--prompts-file", "/nonexistent/prompts.txt"], "prompts file"),
        (["--model", "no-such-model"], "no-such-model"),
        (["--model", "some-org/some-model"], "not in the local Hugging Face cache"),
        (["-o", "out.jpg"], ".png"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, model_dir, args, message):
    base = ["generate", "a cat", "--model", model_dir, "-o", tmp_path / "x.png", "--steps", "1", "--no-progress"]
    r = sana_cli(*base, *args, cwd=tmp_path, env={"HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert message in lines[0], lines[0]
    assert not list(tmp_path.glob("*.png"))


def test_help_lists_commands():
    r = sana_cli("--help")
    assert r.returncode == 0 and "generate" in r.stdout and "convert" in r.stdout
    r = sana_cli("generate", "--help")
    assert "--prompts-file" in r.stdout and "--no-progress" in r.stdout


def test_train_cli_tiny_and_bad_config(tmp_path):
    r = sana_cli(
        "train",
        "configs/train/tiny.toml",
        "--set",
        "schedule.max_steps=3",
        "--set",
        f"output_dir='{tmp_path / 'run'}'",
        cwd=Path(__file__).parents[1],
    )
    assert r.returncode == 0, r.stderr
    assert "trained to step 3" in r.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nlrr = 1.0\n")
    r = sana_cli("train", bad)
    assert r.returncode == 2 and "lrr" in r.stderr and "Traceback" not in r.stderr


def test_data_shapes_and_eval_shapes(tmp_path, model_dir):
    r = sana_cli(
        "data",
        "shapes",
        "--out",
        tmp_path / "shapes",
        "--n",
        "12",
        "--size",
        "128",
        "--seed",
        "3",
        "--workers",
        "1",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "shapes").rglob("*.png"))) == 12
    r = sana_cli("eval", "shapes", "--self-check", "--n", "12", "--size", "256", "--json", tmp_path / "gt.json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads((tmp_path / "gt.json").read_text())["overall"] >= 0.98
    # A random tiny model runs through the whole evaluation (its score is near 0, but the report is complete).
    r = sana_cli(
        "eval",
        "shapes",
        "--model",
        model_dir,
        "--n",
        "6",
        "--steps",
        "1",
        "--json",
        tmp_path / "m.json",
        "--device",
        "cpu",
    )
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "m.json").read_text())
    assert 0.0 <= report["overall"] <= 1.0
