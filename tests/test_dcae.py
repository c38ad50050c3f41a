"""DC-AE: parity with diffusers' AutoencoderDC (diffusers and original key layouts), converters, configs."""

from __future__ import annotations

import dataclasses
import re

import diffusers
import pytest
import torch

import sana.models.dcae as dcae_module
from sana import dataclass_io
from sana.errors import CheckpointError
from sana.models.dcae import DCAE, DCAE_PRESETS, BlockType, DCAEConfig
from sana.nn.functional import relu_linear_attention
from sana.weights.dcae import (
    config_from_diffusers,
    config_from_state_dict,
    config_to_diffusers,
    detect_layout,
    from_native,
    to_native,
)
from sana.weights.io import find_weights_in_folder, read_json, read_weights, write_json, write_safetensors
from sana.weights.strict import build_and_load

RES, VIT = BlockType.RES, BlockType.VIT
# Sana-like: 2 ResBlock stages then 2 EfficientViT stages with a 5x5 multi-scale branch, f = 8. The widths
# give both shortcut flavours: channel doubling (group/repeat 2) and equal widths (group/repeat 4).
TINY = DCAEConfig(
    latent_channels=8,
    widths=(16, 32, 32, 64),
    encoder_depths=(1, 2, 1, 2),
    decoder_depths=(2, 1, 2, 1),
    encoder_block_types=(RES, RES, VIT, VIT),
    decoder_block_types=(RES, RES, VIT, VIT),
    encoder_qkv_multiscales=((), (), (5,), (5,)),
    decoder_qkv_multiscales=((), (), (5,), (5,)),
    head_dim=8,
    scaling_factor=0.5,
)
# The same model written by hand as a diffusers config (not through config_to_diffusers).
TINY_DIFFUSERS = {
    "in_channels": 3,
    "latent_channels": 8,
    "attention_head_dim": 8,
    "encoder_block_types": ["ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"],
    "decoder_block_types": ["ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"],
    "encoder_block_out_channels": [16, 32, 32, 64],
    "decoder_block_out_channels": [16, 32, 32, 64],
    "encoder_layers_per_block": [1, 2, 1, 2],
    "decoder_layers_per_block": [2, 1, 2, 1],
    "encoder_qkv_multiscales": [[], [], [5], [5]],
    "decoder_qkv_multiscales": [[], [], [5], [5]],
    "upsample_block_type": "interpolate",
    "downsample_block_type": "Conv",
    "decoder_norm_types": "rms_norm",
    "decoder_act_fns": "silu",
    "scaling_factor": 0.5,
}
# (B, 3, H, W): square, non-square, latent 2x4 = head_dim tokens (quadratic path, the boundary), latent 1x1.
SHAPES = [(2, 3, 32, 32), (1, 3, 24, 40), (1, 3, 16, 32), (1, 3, 8, 8)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A randomly initialised diffusers AutoencoderDC saved with save_pretrained, and its folder."""
    torch.manual_seed(0)
    ref = diffusers.AutoencoderDC(**TINY_DIFFUSERS).eval()
    with torch.no_grad():  # diffusers inits norms to 1 / 0: perturb every 1-D parameter so each term counts
        for p in ref.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("dcae_diffusers")
    ref.save_pretrained(folder)
    return ref, folder


@pytest.fixture(scope="module")
def diffusers_sd(reference):
    sd, _ = read_weights(find_weights_in_folder(reference[1]))
    return sd


@pytest.fixture(scope="module")
def ours(reference, diffusers_sd):
    cfg = config_from_diffusers(read_json(reference[1] / "config.json"))
    return build_and_load(lambda: DCAE(cfg), to_native(diffusers_sd, "diffusers", cfg), "test")


def assert_close(ours: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    assert ours.shape == ref.shape
    err, scale = (ours.float() - ref.float()).abs().max().item(), ref.abs().max().item()
    assert err <= rel * scale, f"max abs diff {err:.3g} > {rel} * max|ref| = {rel * scale:.3g}"


def check_parity(model: DCAE, ref) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for shape in SHAPES:
            img = torch.rand(shape) * 2 - 1
            assert_close(model.encode(img), ref.encode(img).latent, 1e-5)
            z = torch.randn(shape[0], 8, shape[2] // 8, shape[3] // 8)
            assert_close(model.decode(z), ref.decode(z).sample, 1e-5)


# ---------------------------------------------------------------------------------------------------------
# Parity


def test_config_from_diffusers_file(reference):
    assert config_from_diffusers(read_json(reference[1] / "config.json")) == TINY


def test_parity_through_diffusers_layout(reference, diffusers_sd, ours):
    assert detect_layout(diffusers_sd) == "diffusers"
    check_parity(ours, reference[0])


def _original_block_suffix(rest: str, resample: str) -> str:
    """A diffusers block suffix in efficientvit names (inverse of the reference's substring rules)."""
    table = [
        (r"conv1\.(weight|bias)", r"main.conv1.conv.\1"),
        (r"conv2\.weight", "main.conv2.conv.weight"),
        (r"norm\.(weight|bias)", r"main.conv2.norm.\1"),
        (r"conv\.(weight|bias)", resample + r".\1"),
        (r"attn\.to_qkv_multiscale\.(\d+)\.proj_in\.weight", r"context_module.main.aggreg.\1.0.weight"),
        (r"attn\.to_qkv_multiscale\.(\d+)\.proj_out\.weight", r"context_module.main.aggreg.\1.1.weight"),
        (r"attn\.norm_out\.(weight|bias)", r"context_module.main.proj.norm.\1"),
        (r"conv_out\.conv_inverted\.(weight|bias)", r"local_module.main.inverted_conv.conv.\1"),
        (r"conv_out\.conv_depth\.(weight|bias)", r"local_module.main.depth_conv.conv.\1"),
        (r"conv_out\.conv_point\.weight", "local_module.main.point_conv.conv.weight"),
        (r"conv_out\.norm\.(weight|bias)", r"local_module.main.point_conv.norm.\1"),
    ]
    for pattern, replacement in table:
        if re.fullmatch(pattern, rest):
            return re.sub(pattern, replacement, rest)
    raise AssertionError(f"unhandled diffusers suffix {rest}")


def diffusers_to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The test's own renaming diffusers -> efficientvit DCAE_HF, re-fusing to_q/to_k/to_v into qkv.conv."""
    top = {
        "encoder.conv_in": "encoder.project_in.conv",
        "encoder.conv_out": "encoder.project_out.main.op_list.0.conv",
        "decoder.conv_in": "decoder.project_in.main.conv",
        "decoder.norm_out": "decoder.project_out.op_list.0",
        "decoder.conv_out": "decoder.project_out.op_list.2.conv",
    }
    out = {}
    for key, t in sd.items():
        head, param = key.rsplit(".", 1)
        if head in top:
            out[f"{top[head]}.{param}"] = t
            continue
        side, kind, i, j, rest = re.fullmatch(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(\d+)\.(.+)", key).groups()
        prefix = f"{side}.stages.{i}.op_list.{j}."
        if rest in ("attn.to_k.weight", "attn.to_v.weight"):
            continue
        if rest == "attn.to_q.weight":
            qkv = [sd[f"{side}.{kind}_blocks.{i}.{j}.attn.to_{x}.weight"] for x in "qkv"]
            out[prefix + "context_module.main.qkv.conv.weight"] = torch.cat(qkv)[:, :, None, None]
        elif rest == "attn.to_out.weight":
            out[prefix + "context_module.main.proj.conv.weight"] = t[:, :, None, None]
        else:
            resample = "main.conv" if side == "encoder" else "main.conv.conv"
            out[prefix + _original_block_suffix(rest, resample)] = t
    return out


def test_parity_through_original_layout(reference, diffusers_sd):
    original = diffusers_to_original(diffusers_sd)
    assert detect_layout(original) == "original"
    cfg = config_from_state_dict(original, "original")
    assert cfg == dataclasses.replace(TINY, scaling_factor=DCAEConfig.scaling_factor)  # not stored in weights
    model = build_and_load(lambda: DCAE(cfg), to_native(original, "original", cfg), "test")
    check_parity(model, reference[0])


def test_export_to_diffusers_loads_in_diffusers(ours, tmp_path):
    write_safetensors(
        tmp_path / "diffusion_pytorch_model.safetensors", from_native(ours.state_dict(), "diffusers", TINY)
    )
    write_json(tmp_path / "config.json", config_to_diffusers(TINY))
    ref = diffusers.AutoencoderDC.from_pretrained(tmp_path).eval()
    assert ref.config.scaling_factor == TINY.scaling_factor
    check_parity(ours, ref)


def test_bf16_close_to_fp32(reference, diffusers_sd):
    cfg = TINY
    sd = to_native(diffusers_sd, "diffusers", cfg)
    fp32 = build_and_load(lambda: DCAE(cfg), sd, "test")
    bf16 = build_and_load(lambda: DCAE(cfg), sd, "test", dtype=torch.bfloat16)
    torch.manual_seed(2)
    img, z = torch.rand(1, 3, 32, 24) * 2 - 1, torch.randn(1, 8, 4, 3)
    with torch.no_grad():
        latent, image = bf16.encode(img.bfloat16()), bf16.decode(z.bfloat16())
        assert latent.dtype == image.dtype == torch.bfloat16
        assert_close(latent, fp32.encode(img), 0.06)
        assert_close(image, fp32.decode(z), 0.06)


# ---------------------------------------------------------------------------------------------------------
# Model behaviour


def test_forward_is_pure_and_checks_input(ours):
    before = {name: dict(vars(m)) for name, m in ours.named_modules()}
    with torch.no_grad():
        out = ours(torch.zeros(1, 3, 16, 24))
    assert out.shape == (1, 3, 16, 24)
    assert {name: dict(vars(m)) for name, m in ours.named_modules()} == before
    with pytest.raises(ValueError, match="multiples of 8"):
        ours.encode(torch.zeros(1, 3, 16, 20))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        ours.encode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 8, h, w\)"):
        ours.decode(torch.zeros(1, 3, 2, 2))


def test_attention_switches_to_quadratic_form_at_head_dim(ours, monkeypatch):
    calls = []
    for name in ("relu_linear_attention", "quadratic_relu_attention"):
        real = getattr(dcae_module, name)

        def spy(q, k, v, eps, real=real, name=name, **kwargs):
            calls.append((name, q.shape[1]))  # (name, N)
            return real(q, k, v, eps, **kwargs)

        monkeypatch.setattr(dcae_module, name, spy)
    with torch.no_grad():
        ours.encode(torch.zeros(1, 3, 16, 32))  # stage 2 at 4x8 (32 tokens), stage 3 at 2x4 (8 = head_dim)
    assert calls == [("relu_linear_attention", 32)] + [("quadratic_relu_attention", 8)] * 2


def test_quadratic_form_equals_linear_form():
    torch.manual_seed(4)
    q, k, v = torch.randn(3, 2, 7, 5, 8).unbind(0)  # (B, N, h, d) each
    q, k = q.relu(), k.relu()
    assert_close(dcae_module.quadratic_relu_attention(q, k, v, 1e-15), relu_linear_attention(q, k, v, 1e-15), 1e-6)


def test_backward_reaches_every_parameter():
    torch.manual_seed(3)
    model = DCAE(TINY)
    model(torch.rand(1, 3, 16, 16) * 2 - 1).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_decoder_stages_in_execution_order():
    with torch.device("meta"):
        model = DCAE(TINY)
    stages = model.decoder.stages
    assert stages[0].up is None and all(s.up is not None for s in stages[1:])
    assert [s.up.conv.out_channels for s in stages[1:]] == [32, 32, 16]
    assert [len(s.blocks) for s in stages] == [1, 2, 1, 2]  # decoder_depths reversed


def test_full_size_parameter_counts():
    for name in ("dc-ae-f32c32-sana-1.0", "dc-ae-f32c32-sana-1.1"):
        with torch.device("meta"):
            model = DCAE(DCAE_PRESETS[name])
        assert sum(p.numel() for p in model.decoder.parameters()) == 159_223_171
        assert sum(p.numel() for p in model.parameters()) == 312_250_275
        assert model.scaling_factor == 0.41407


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(head_dim=24), "widths[2]=32 is not divisible by head_dim=24"),
        (dict(encoder_depths=(1, 2, 1)), "encoder_depths=(1, 2, 1) has 3 entries"),
        (dict(decoder_depths=(0, 1, 2, 1)), "decoder_depths=(0, 1, 2, 1)"),
        (dict(latent_channels=7), "latent_channels=7"),
        (dict(widths=(16, 32, 32, 96)), "4 * 32 is not a multiple of 96"),
        (dict(encoder_qkv_multiscales=((5,), (), (5,), (5,))), "encoder_qkv_multiscales[0]=(5,)"),
    ],
)
def test_invalid_config_names_values(change, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        dataclasses.replace(TINY, **change)


# ---------------------------------------------------------------------------------------------------------
# Converters and configs


def _meta_state_dict(cfg: DCAEConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return DCAE(cfg).state_dict()


@pytest.mark.parametrize("layout", ["diffusers", "original", "native"])
def test_round_trip_is_exact(ours, layout):
    sd = ours.state_dict()
    there = from_native(sd, layout, TINY)
    assert detect_layout(there) == layout
    back = to_native(there, layout, TINY)
    assert list(back) == list(sd)
    for key, t in sd.items():
        assert back[key].dtype == t.dtype and torch.equal(back[key], t), key


def test_full_size_names_match_diffusers_and_original():
    cfg = DCAE_PRESETS["dc-ae-f32c32-sana-1.0"]
    with torch.device("meta"):
        ref = diffusers.AutoencoderDC(**config_to_diffusers(cfg)).state_dict()
    native = _meta_state_dict(cfg)
    shapes = lambda sd: {k: tuple(v.shape) for k, v in sd.items()}  # noqa: E731
    assert shapes(from_native(native, "diffusers", cfg)) == shapes(ref)  # 375 tensors
    original = from_native(native, "original", cfg)
    assert len(original) == 339
    assert shapes(original) == shapes(diffusers_to_original(ref))
    assert original["encoder.stages.3.op_list.0.context_module.main.aggreg.0.1.weight"].shape == (
        1536,
        32,
        1,
        1,
    )
    assert original["decoder.stages.1.op_list.0.main.conv.conv.weight"].shape == (256, 512, 3, 3)
    for layout, sd in (("native", native), ("diffusers", ref), ("original", original)):
        assert config_from_state_dict(sd, layout) == cfg


@pytest.mark.parametrize("cfg", [TINY, DCAE_PRESETS["dc-ae-f32c32-sana-1.1"]], ids=["tiny", "sana"])
def test_config_round_trips(cfg):
    assert config_from_diffusers(config_to_diffusers(cfg)) == cfg
    assert dataclass_io.from_json(DCAEConfig, dataclass_io.to_json(cfg)) == cfg
    assert config_from_state_dict(_meta_state_dict(cfg), "native") == dataclasses.replace(
        cfg, scaling_factor=DCAEConfig.scaling_factor
    )


def test_detect_layout_unknown():
    assert detect_layout({"blocks.0.attn.qkv.weight": torch.zeros(1)}) is None


@pytest.mark.parametrize(
    "edit, key",
    [
        ("missing", "encoder.down_blocks.2.0.attn.to_k.weight"),
        ("extra", "encoder.down_blocks.0.9.conv1.weight"),
        ("shape", "decoder.up_blocks.1.1.conv2.weight"),
        ("shape", "encoder.down_blocks.3.1.attn.to_v.weight"),
    ],
)
def test_bad_state_dict_names_the_key(diffusers_sd, edit, key):
    sd = dict(diffusers_sd)
    if edit == "missing":
        del sd[key]
    elif edit == "extra":
        sd[key] = torch.zeros(16, 16, 3, 3)
    else:
        sd[key] = torch.zeros(*sd[key].shape[:-1], sd[key].shape[-1] + 1)
    with pytest.raises(CheckpointError, match=re.escape(key)):
        to_native(sd, "diffusers", TINY)


def test_bad_native_state_dict_names_the_key(ours):
    sd = ours.state_dict()
    sd["decoder.stages.0.blocks.0.attn.proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=re.escape("decoder.stages.0.blocks.0.attn.proj.weight")):
        from_native(sd, "original", TINY)


@pytest.mark.parametrize(
    "field, value",
    [
        ("downsample_block_type", "pixel_unshuffle"),
        ("upsample_block_type", "pixel_shuffle"),
        ("decoder_norm_types", ["batch_norm", "batch_norm", "rms_norm", "rms_norm"]),
        ("decoder_act_fns", "relu"),
        ("encoder_out_shortcut", False),
        ("decoder_in_shortcut", False),
        ("decoder_conv_act_fn", "silu"),
        ("encoder_layers_per_block", [0, 2, 1, 2]),
        ("decoder_block_types", "Bogus"),
        ("decoder_block_out_channels", [16, 32, 64, 64]),
        ("upsample_block_type", None),  # absent: diffusers' default is pixel_shuffle
    ],
)
def test_unsupported_diffusers_config_names_the_field(field, value):
    cfg = dict(TINY_DIFFUSERS)
    if value is None:
        del cfg[field]
    else:
        cfg[field] = value
    with pytest.raises(CheckpointError, match=field):
        config_from_diffusers(cfg)
