"""PEFT / diffusers LoRA files merged into the native transformer by Pipeline.load_lora, and the training export."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import randomize_
from sana.errors import CheckpointError
from sana.lora import save_lora
from sana.models.transformer import SanaTransformer
from sana.pipeline import Pipeline
from sana.train.model import add_lora, lora_adapters, merged_copy
from sana.weights import transformer as tconv
from sana.weights.io import write_safetensors
from test_transformer import BASE, inputs, ours, reference, tiny_diffusers
from train_tiny import TINY_ARCH

# diffusers module -> (native module, row block) as the test's own reference of the fused layouts.
ADAPTED = {
    "transformer_blocks.0.attn1.to_q": ("blocks.0.attn.qkv", 0, 3),
    "transformer_blocks.0.attn1.to_k": ("blocks.0.attn.qkv", 1, 3),
    "transformer_blocks.0.attn1.to_v": ("blocks.0.attn.qkv", 2, 3),
    "transformer_blocks.1.attn1.to_out.0": ("blocks.1.attn.proj", 0, 1),
    "transformer_blocks.0.attn2.to_q": ("blocks.0.cross_attn.q", 0, 1),
    "transformer_blocks.1.attn2.to_k": ("blocks.1.cross_attn.kv", 0, 2),
    "transformer_blocks.1.attn2.to_v": ("blocks.1.cross_attn.kv", 1, 2),
    "transformer_blocks.0.ff.conv_inverted": ("blocks.0.ffn.inverted", 0, 1),  # 1x1 conv in diffusers
    "transformer_blocks.1.ff.conv_point": ("blocks.1.ffn.point", 0, 1),
    "proj_out": ("final.linear", 0, 1),
}
CONVS = ("ff.conv_inverted", "ff.conv_point")


def tiny_pipeline(seed: int = 0) -> Pipeline:
    model = randomize_(SanaTransformer(TINY_ARCH), seed=seed).eval()
    return Pipeline(model, None, None, progress=False, fast=False)


def random_lora(model: SanaTransformer, rank: int = 3, prefix: str = "transformer.") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    sd = {}
    for module, (native, _, blocks) in ADAPTED.items():
        out, inp = model.get_submodule(native).weight.shape
        A, B = torch.randn(rank, inp, generator=g) * 0.3, torch.randn(out // blocks, rank, generator=g) * 0.3
        if module.endswith(CONVS):
            A, B = A[:, :, None, None], B[:, :, None, None]
        sd[f"{prefix}{module}.lora_A.weight"], sd[f"{prefix}{module}.lora_B.weight"] = A, B
    return sd


def explicit_lora_output(model, sd, scaling: float, prefix: str, x, t, text, mask) -> torch.Tensor:
    """The reference: y[rows] += scaling * (x A^T) B^T added by forward hooks, the weights left alone."""
    hooks = []
    for module, (native, block, _) in ADAPTED.items():
        A = sd[f"{prefix}{module}.lora_A.weight"].flatten(1)
        B = sd[f"{prefix}{module}.lora_B.weight"].flatten(1)

        def hook(_, args, y, A=A, B=B, block=block):
            y = y.clone()
            rows = slice(block * B.shape[0], (block + 1) * B.shape[0])
            y[..., rows] += scaling * (args[0] @ A.T) @ B.T
            return y

        hooks.append(model.get_submodule(native).register_forward_hook(hook))
    try:
        return ours(model, x, t, text, mask)
    finally:
        for h in hooks:
            h.remove()


def test_peft_file_merges_like_the_explicit_lora(tmp_path):
    pipe = tiny_pipeline()
    base = copy.deepcopy(pipe.transformer)
    sd = random_lora(base, rank=3, prefix="base_model.model.")
    write_safetensors(tmp_path / "adapter_model.safetensors", sd)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 3, "lora_alpha": 6, "target_modules": ["to_q"]}))
    adapted = pipe.load_lora(tmp_path, scale=0.7)
    assert sorted(adapted) == sorted(ADAPTED)
    args = inputs(TINY_ARCH)
    ref = explicit_lora_output(base, sd, 0.7 * 6 / 3, "base_model.model.", *args)
    torch.testing.assert_close(ours(pipe.transformer, *args), ref, rtol=1e-5, atol=1e-5)
    assert (ref - ours(base, *args)).abs().max() > 1e-2  # the LoRA matters


def test_diffusers_file_scale_zero_cumulative_and_unload(tmp_path):
    pipe = tiny_pipeline()
    base = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    path = tmp_path / "pytorch_lora_weights.safetensors"
    sd = random_lora(pipe.transformer)
    write_safetensors(path, sd)
    pipe.load_lora(path, scale=0.0)
    assert all(torch.equal(v, base[k]) for k, v in pipe.transformer.state_dict().items())
    # No config: alpha = r (diffusers' default). Two loads add up; unload restores bit for bit.
    pipe.load_lora(path, scale=0.5)
    pipe.load_lora(path, scale=0.5)
    args = inputs(TINY_ARCH)
    once = tiny_pipeline()
    once.load_lora(path, scale=1.0)
    torch.testing.assert_close(ours(pipe.transformer, *args), ours(once.transformer, *args), rtol=1e-5, atol=1e-5)
    assert not torch.equal(pipe.transformer.blocks[0].attn.qkv.weight, base["blocks.0.attn.qkv.weight"])
    pipe.unload_lora()
    assert all(torch.equal(v, base[k]) for k, v in pipe.transformer.state_dict().items())


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda sd: sd.update(
                {"transformer.transformer_blocks.0.ff.conv_depth.lora_A.weight": torch.zeros(3, 1, 3, 3)}
            ),
            "transformer.transformer_blocks.0.ff.conv_depth.lora_A.weight",
        ),
        (
            lambda sd: sd.update({"text_encoder.layers.0.q_proj.lora_A.weight": torch.zeros(3, 4)}),
            "text_encoder.layers.0.q_proj.lora_A.weight",
        ),
        (lambda sd: sd.pop("transformer.proj_out.lora_B.weight"), "transformer.proj_out.lora_A.weight has no lora_B"),
        (
            lambda sd: sd.update({"transformer.proj_out.lora_B.weight": torch.zeros(5, 3)}),
            "transformer.proj_out.lora_B.weight (5, 3) do not fit proj_out",
        ),
    ],
)
def test_bad_keys_are_named(tmp_path, edit, message):
    pipe = tiny_pipeline()
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    sd = random_lora(pipe.transformer)
    edit(sd)
    write_safetensors(tmp_path / "lora.safetensors", sd)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        pipe.load_lora(tmp_path / "lora.safetensors")
    assert all(torch.equal(v, before[k]) for k, v in pipe.transformer.state_dict().items())  # nothing merged


def _trained_lora(model: SanaTransformer, rank=2, alpha=5.0) -> SanaTransformer:
    targets = ("attn.qkv", "cross_attn.kv", "cross_attn.q", "ffn.inverted", "ffn.point", "final.linear")
    add_lora(model, rank, alpha, targets, torch.Generator().manual_seed(3))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".B"):
                p.copy_(torch.randn(p.shape) * 0.2)
    return model


def test_training_export_round_trips(tmp_path):
    pipe = tiny_pipeline()
    trained = _trained_lora(copy.deepcopy(pipe.transformer))
    save_lora(tmp_path, lora_adapters(trained), TINY_ARCH)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 2 and "transformer_blocks.0.attn1.to_k" in config["target_modules"]
    pipe.load_lora(tmp_path)
    merged = merged_copy(trained).state_dict()
    for k, v in pipe.transformer.state_dict().items():
        torch.testing.assert_close(v, merged[k], rtol=1e-6, atol=1e-6)


def test_training_export_loads_into_diffusers_with_peft(tmp_path):
    pytest.importorskip("peft")
    ref = tiny_diffusers({})
    cfg = tconv.config_from_diffusers(BASE)
    model = SanaTransformer(cfg).eval()
    model.load_state_dict(tconv.to_native(ref.state_dict(), "diffusers", cfg))
    trained = _trained_lora(copy.deepcopy(model), alpha=3.0)
    path = save_lora(tmp_path, lora_adapters(trained), cfg)
    ref.load_lora_adapter(str(path), prefix="transformer", adapter_name="trained")
    pipe = Pipeline(model, None, None, progress=False, fast=False)
    pipe.load_lora(path, scale=1.0)
    args = inputs(cfg)
    torch.testing.assert_close(ours(pipe.transformer, *args), reference(ref, cfg, *args), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours(pipe.transformer, *args), ours(merged_copy(trained), *args), rtol=1e-5, atol=1e-5)


def test_peft_adapter_trained_on_diffusers_matches_diffusers(tmp_path):
    peft = pytest.importorskip("peft")
    ref = tiny_diffusers({})
    cfg = tconv.config_from_diffusers(BASE)
    model = SanaTransformer(cfg).eval()
    model.load_state_dict(tconv.to_native(ref.state_dict(), "diffusers", cfg))
    targets = ["to_q", "to_k", "to_v", "to_out.0", "conv_inverted", "conv_point", "proj_out"]
    ref.add_adapter(peft.LoraConfig(r=4, lora_alpha=2, target_modules=targets))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape) * 0.2)
    sd = {f"base_model.model.{k}": v for k, v in peft.get_peft_model_state_dict(ref).items()}
    write_safetensors(tmp_path / "adapter_model.safetensors", sd)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 2, "target_modules": targets}))
    pipe = Pipeline(model, None, None, progress=False, fast=False)
    assert len(pipe.load_lora(tmp_path)) == len(sd) // 2
    args = inputs(cfg)
    torch.testing.assert_close(ours(pipe.transformer, *args), reference(ref, cfg, *args), rtol=1e-4, atol=1e-4)
