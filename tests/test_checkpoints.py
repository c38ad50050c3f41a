"""Bad checkpoints give errors that name the problem; files are written atomically; the CLI never traces back."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import sana
from sana.errors import CheckpointError
from sana.weights.io import atomic_write, write_safetensors
from test_transformer import tiny_diffusers


@pytest.fixture
def folder(tmp_path):
    ref = tiny_diffusers({})
    ref.save_pretrained(tmp_path / "t")
    return tmp_path / "t"


def _edit(folder, fn):
    path = folder / "diffusion_pytorch_model.safetensors"
    sd = load_file(path)
    fn(sd)
    save_file(sd, path)


def test_missing_key_is_named(folder):
    _edit(folder, lambda sd: sd.pop("transformer_blocks.1.attn2.to_k.bias"))
    with pytest.raises(CheckpointError, match=r"missing .*transformer_blocks\.1\.attn2\.to_k\.bias"):
        sana.load_transformer(folder)


def test_unexpected_key_is_named(folder):
    _edit(folder, lambda sd: sd.__setitem__("transformer_blocks.0.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected .*transformer_blocks\.0\.extra\.weight"):
        sana.load_transformer(folder)


def test_wrong_shape_is_named(folder):
    _edit(folder, lambda sd: sd.__setitem__("proj_out.weight", torch.zeros(7, 32)))
    with pytest.raises(CheckpointError, match=r"final\.linear\.weight has shape \(7, 32\)"):
        sana.load_transformer(folder)


def test_truncated_safetensors(folder):
    path = folder / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read .*diffusion_pytorch_model.safetensors"):
        sana.load_transformer(folder)


def test_truncated_pth(tmp_path):
    torch.save({"state_dict": {"a": torch.zeros(1000)}}, tmp_path / "x.pth")
    data = (tmp_path / "x.pth").read_bytes()
    (tmp_path / "x.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read .*x.pth"):
        sana.load_transformer(tmp_path / "x.pth")


def test_unknown_layout(tmp_path):
    save_file({"foo.weight": torch.zeros(2)}, tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="unknown checkpoint layout"):
        sana.load_transformer(tmp_path / "x.safetensors")


def test_pth_without_tensors(tmp_path):
    torch.save({"epoch": 3}, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="no state dict"):
        sana.load_transformer(tmp_path / "x.pth")


def test_missing_path_and_missing_config(tmp_path, folder):
    with pytest.raises(CheckpointError, match="no such file"):
        sana.load_transformer(tmp_path / "nope")
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        sana.load_transformer(folder / "diffusion_pytorch_model.safetensors")


def test_native_file_of_the_other_kind(tmp_path, folder):
    sana.save_model(sana.load_transformer(folder), tmp_path / "n.safetensors")
    with pytest.raises(CheckpointError, match="holds a transformer, not a autoencoder|holds a transformer"):
        sana.load_autoencoder(tmp_path / "n.safetensors")


def test_sharded_and_pipeline_folders(tmp_path):
    ref = tiny_diffusers({})
    ref.save_pretrained(tmp_path / "pipe" / "transformer", max_shard_size="20KB")
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    assert len(list((tmp_path / "pipe" / "transformer").glob("*.safetensors"))) > 1
    model = sana.load_transformer(tmp_path / "pipe")
    for k, v in sana.load_transformer(tmp_path / "pipe" / "transformer").state_dict().items():
        assert torch.equal(v, model.state_dict()[k])


def test_load_casts_dtype_and_parameters_are_real(folder):
    model = sana.load_transformer(folder, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in model.parameters())


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    dst = tmp_path / "w.safetensors"
    write_safetensors(dst, {"a": torch.ones(3)})

    def boom(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(dst, boom)
    assert torch.equal(load_file(dst)["a"], torch.ones(3))
    assert os.listdir(tmp_path) == ["w.safetensors"]


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "sana", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_cli_convert_and_errors(tmp_path, folder):
    ok = _cli("convert", folder, tmp_path / "n.safetensors")
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "n.safetensors").exists()
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 100)
    for args in (
        ("convert", tmp_path / "bad.safetensors", tmp_path / "o.safetensors"),
        ("convert", tmp_path / "missing", tmp_path / "o.safetensors"),
        ("convert", folder, tmp_path / "o.txt", "--to", "original"),
    ):
        r = _cli(*args)
        assert r.returncode == 2, r
        assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith("sana convert: error:")
    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "o.txt").exists()


def test_wrapper_prefixes_are_stripped(folder):
    _edit(folder, lambda sd: [sd.__setitem__("module." + k, sd.pop(k)) for k in list(sd)])  # as DDP saves
    reference = tiny_diffusers({})
    model = sana.load_transformer(folder)
    sd = model.state_dict()
    assert torch.equal(sd["final.linear.weight"], reference.state_dict()["proj_out.weight"])
