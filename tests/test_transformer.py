"""SanaTransformer against diffusers' SanaTransformer2DModel on random weights, through every layout."""

import dataclasses

import pytest
import torch

import sana
from conftest import assert_close_rel, randomize_
from sana.models import TRANSFORMER_PRESETS, SanaTransformer, TransformerConfig
from sana.weights import transformer as tconv

diffusers = pytest.importorskip("diffusers")

# Tiny versions of every released variant (diffusers config keys).
BASE = dict(
    in_channels=8,
    out_channels=8,
    num_attention_heads=4,
    attention_head_dim=8,
    num_layers=2,
    num_cross_attention_heads=2,
    cross_attention_head_dim=16,
    cross_attention_dim=32,
    caption_channels=24,
    sample_size=8,
    patch_size=1,
)
VARIANTS = {
    "sana-1.0 (NoPE)": {},
    "2K (PE, interpolation 1.0)": dict(interpolation_scale=1.0),
    "4K (PE, interpolation 2.0)": dict(interpolation_scale=2.0, sample_size=16),
    "sana-1.5 (qk norm)": dict(qk_norm="rms_norm_across_heads"),
    "sprint (qk norm, guidance)": dict(qk_norm="rms_norm_across_heads", guidance_embeds=True),
    "patch 2": dict(patch_size=2),
}


def tiny_diffusers(overrides: dict, seed: int = 0):
    model = diffusers.SanaTransformer2DModel(**{**BASE, **overrides}).eval()
    return randomize_(model, seed=seed)


def inputs(cfg: TransformerConfig, B=2, H=6, W=4, L=12):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, cfg.in_channels, H, W, generator=g)
    text = torch.randn(B, L, cfg.caption_channels, generator=g)
    mask = torch.zeros(B, L, dtype=torch.long)
    mask[0, :5] = 1  # different text lengths in one batch
    mask[1, :9] = 1
    t = torch.tensor([0.999, 0.5])[:B]
    return x, t, text, mask


def reference(model, cfg: TransformerConfig, x, t, text, mask, guidance=None):
    kwargs = {}
    if cfg.guidance_embeds:
        kwargs["guidance"] = guidance * cfg.guidance_embeds_scale
        timestep = t  # the Sprint pipeline feeds the flow time itself
    else:
        timestep = t * 1000.0
    with torch.no_grad():
        return model(
            x, encoder_hidden_states=text, timestep=timestep, encoder_attention_mask=mask, return_dict=False, **kwargs
        )[0]


def ours(model, x, t, text, mask, guidance=None):
    with torch.no_grad():
        return model(x, t, text, mask, guidance=guidance)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("size", [(6, 4), (8, 8)], ids=["6x4", "8x8"])
def test_parity_with_diffusers_folder(tmp_path, variant, size):
    ref = tiny_diffusers(VARIANTS[variant])
    ref.save_pretrained(tmp_path / "transformer")
    model = sana.load_transformer(tmp_path / "transformer")
    cfg = model.config
    assert cfg == tconv.config_from_diffusers(dict(ref.config))
    x, t, text, mask = inputs(cfg, H=size[0], W=size[1])
    g = torch.tensor([4.5, 2.0]) if cfg.guidance_embeds else None
    assert_close_rel(ours(model, x, t, text, mask, g), reference(ref, cfg, x, t, text, mask, g))


def to_original(sd: dict, guidance: bool) -> dict:
    """diffusers -> original NVlabs key names, written independently of the library (reference 2.4 / 5.1)."""
    out = {}
    sd = dict(sd)
    simple = [
        ("patch_embed.proj.", "x_embedder.proj."),
        ("time_embed.linear.", "t_block.1."),
        ("caption_projection.linear_1.", "y_embedder.y_proj.fc1."),
        ("caption_projection.linear_2.", "y_embedder.y_proj.fc2."),
        ("caption_norm.", "attention_y_norm."),
        ("proj_out.", "final_layer.linear."),
    ]
    t = "time_embed." if guidance else "time_embed.emb."
    simple += [
        (t + "timestep_embedder.linear_1.", "t_embedder.mlp.0."),
        (t + "timestep_embedder.linear_2.", "t_embedder.mlp.2."),
        ("time_embed.guidance_embedder.linear_1.", "cfg_embedder.mlp.0."),
        ("time_embed.guidance_embedder.linear_2.", "cfg_embedder.mlp.2."),
    ]
    out["final_layer.scale_shift_table"] = sd.pop("scale_shift_table")
    blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")})
    for i in blocks:
        d, o = f"transformer_blocks.{i}.", f"blocks.{i}."
        out[o + "scale_shift_table"] = sd.pop(d + "scale_shift_table")
        out[o + "attn.qkv.weight"] = torch.cat([sd.pop(d + f"attn1.to_{n}.weight") for n in "qkv"])
        for p in ("weight", "bias"):
            out[o + f"attn.proj.{p}"] = sd.pop(d + f"attn1.to_out.0.{p}")
            out[o + f"cross_attn.q_linear.{p}"] = sd.pop(d + f"attn2.to_q.{p}")
            out[o + f"cross_attn.kv_linear.{p}"] = torch.cat(
                [sd.pop(d + f"attn2.to_k.{p}"), sd.pop(d + f"attn2.to_v.{p}")]
            )
            out[o + f"cross_attn.proj.{p}"] = sd.pop(d + f"attn2.to_out.0.{p}")
            out[o + f"mlp.inverted_conv.conv.{p}"] = sd.pop(d + f"ff.conv_inverted.{p}")
            out[o + f"mlp.depth_conv.conv.{p}"] = sd.pop(d + f"ff.conv_depth.{p}")
        out[o + "mlp.point_conv.conv.weight"] = sd.pop(d + "ff.conv_point.weight")
        for a, b in (("attn1", "attn"), ("attn2", "cross_attn")):
            for n in ("q", "k"):
                if d + f"{a}.norm_{n}.weight" in sd:
                    out[o + f"{b}.{n}_norm.weight"] = sd.pop(d + f"{a}.norm_{n}.weight")
    for k in list(sd):
        for src, dst in simple:
            if k.startswith(src):
                out[dst + k[len(src) :]] = sd.pop(k)
    assert not sd, sorted(sd)
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_parity_through_original_layout(tmp_path, variant):
    ref = tiny_diffusers(VARIANTS[variant], seed=3)
    cfg = tconv.config_from_diffusers(dict(ref.config))
    sd = to_original(ref.state_dict(), cfg.guidance_embeds)
    # Original files also carry the stored PE buffer and the null caption embedding: ignored on load.
    sd["pos_embed"] = torch.zeros(1, cfg.sample_size**2 // cfg.patch_size**2, cfg.hidden_size)
    sd["y_embedder.y_embedding"] = torch.zeros(12, cfg.caption_channels)
    torch.save({"state_dict": sd}, tmp_path / "ckpt.pth")  # the NVlabs wrapper
    model = sana.load_transformer(tmp_path / "ckpt.pth", config=cfg)
    x, t, text, mask = inputs(cfg)
    g = torch.tensor([4.5, 2.0]) if cfg.guidance_embeds else None
    assert_close_rel(ours(model, x, t, text, mask, g), reference(ref, cfg, x, t, text, mask, g))


REFERENCE_COUNTS = {  # shared/reference/diffusers-sana.md 1.1, counted by instantiation
    "sana-600m-1024": 591_747_872,
    "sana-1600m-1024": 1_604_462_752,
    "sana-1600m-4k": 1_604_462_752,
    "sana1.5-1.6b": 1_604_641_952,
    "sana1.5-4.8b": 4_721_825_952,
    "sana-sprint-0.6b": 593_501_216,
    "sana-sprint-1.6b": 1_610_237_472,
}


@pytest.mark.parametrize("name", REFERENCE_COUNTS)
def test_full_size_parameter_counts(name):
    with torch.device("meta"):
        model = SanaTransformer(TRANSFORMER_PRESETS[name])
    assert sum(p.numel() for p in model.parameters()) == REFERENCE_COUNTS[name]


@pytest.mark.parametrize("name", TRANSFORMER_PRESETS)
def test_config_inferred_from_original_full_size(name):
    cfg = TRANSFORMER_PRESETS[name]
    with torch.device("meta"):
        native = SanaTransformer(cfg).state_dict()
    sd = tconv.from_native(native, "original", cfg)
    sd["pos_embed"] = torch.empty(1, cfg.sample_size**2, cfg.hidden_size, device="meta")
    assert tconv.config_from_state_dict(sd, "original") == cfg
    assert tconv.config_from_diffusers(tconv.config_to_diffusers(cfg)) == cfg


def test_diffusers_config_roundtrip_builds_diffusers_model(tmp_path):
    for overrides in VARIANTS.values():
        ref = tiny_diffusers(overrides)
        cfg = tconv.config_from_diffusers(dict(ref.config))
        rebuilt = diffusers.SanaTransformer2DModel.from_config(tconv.config_to_diffusers(cfg))
        assert tconv.config_from_diffusers(dict(rebuilt.config)) == cfg


def test_conversion_round_trips_are_exact(tmp_path):
    ref = tiny_diffusers(VARIANTS["sprint (qk norm, guidance)"])
    ref.save_pretrained(tmp_path / "d0")
    model = sana.load_transformer(tmp_path / "d0")
    sana.save_model(model, tmp_path / "a.safetensors")
    sana.convert(tmp_path / "a.safetensors", tmp_path / "d1", to="diffusers")
    sana.convert(tmp_path / "d1", tmp_path / "o.pth", to="original")
    sana.convert(tmp_path / "o.pth", tmp_path / "o.safetensors", to="original", config=model.config)
    sana.convert(tmp_path / "o.safetensors", tmp_path / "b.safetensors", to="native", config=model.config)
    back = sana.load_transformer(tmp_path / "b.safetensors")
    assert back.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    # The diffusers export loads in diffusers itself, bit-identical to what it was made from.
    d1 = diffusers.SanaTransformer2DModel.from_pretrained(tmp_path / "d1")
    for k, v in ref.state_dict().items():
        assert torch.equal(v, d1.state_dict()[k]), k


def test_dtypes_and_fp16_clamp():
    ref = tiny_diffusers({})
    cfg = tconv.config_from_diffusers(dict(ref.config))
    model = SanaTransformer(cfg)
    model.load_state_dict(tconv.to_native(ref.state_dict(), "diffusers", cfg))
    x, t, text, mask = inputs(cfg)
    full = ours(model.eval(), x, t, text, mask)
    for dtype in (torch.bfloat16, torch.float16):
        low = ours(model.to(dtype), x, t, text, mask)
        assert low.dtype == dtype
        assert_close_rel(low.float(), full, rel=0.05)
    # An exploding linear attention is clamped to the fp16 range (not inf) exactly as the reference.
    block = model.blocks[0].attn.to(torch.float16)
    with torch.no_grad():
        block.proj.weight.fill_(1000.0)
        y = block(torch.randn(1, 4, cfg.hidden_size, dtype=torch.float16) * 100)
    assert torch.isfinite(y).all() and y.abs().max() == 65504


def test_gradient_checkpointing_same_gradients():
    cfg = TransformerConfig(
        hidden_size=32, depth=2, linear_head_dim=8, cross_heads=2, in_channels=4, out_channels=4, caption_channels=16
    )
    model = randomize_(SanaTransformer(cfg))
    x, t, text, mask = inputs(cfg)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.set_gradient_checkpointing(ckpt)
        model(x, t, text, mask).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_guidance_required_for_sprint():
    cfg = dataclasses.replace(
        TRANSFORMER_PRESETS["sana-sprint-0.6b"], hidden_size=32, depth=1, cross_heads=2, caption_channels=8
    )
    model = SanaTransformer(cfg)
    x, t, text, mask = inputs(cfg)
    with pytest.raises(ValueError, match="guidance"):
        model(x, t, text, mask)


@pytest.mark.parametrize(
    "field, value",
    [("hidden_size", 30), ("cross_heads", 7), ("patch_size", 0), ("time_scale", 0.0)],
)
def test_config_invariants(field, value):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(TransformerConfig(), **{field: value})


def test_flop_count_matches_reference_anchors():
    from sana.bench import transformer_flops

    # shared/DESIGN.md: 600M forward at 1024^2, batch 2 = 2.24 TFLOP; 1600M = 5.93; at 4096^2: 34.5 / 91.1.
    assert transformer_flops(TRANSFORMER_PRESETS["sana-600m-1024"], 2, 32, 32) / 1e12 == pytest.approx(2.24, abs=0.01)
    assert transformer_flops(TRANSFORMER_PRESETS["sana-1600m-1024"], 2, 32, 32) / 1e12 == pytest.approx(5.93, abs=0.01)
    assert transformer_flops(TRANSFORMER_PRESETS["sana-600m-1024"], 2, 128, 128) / 1e12 == pytest.approx(34.5, abs=0.2)
    assert transformer_flops(TRANSFORMER_PRESETS["sana-1600m-4k"], 2, 128, 128) / 1e12 == pytest.approx(91.1, abs=0.3)


def test_chunked_linear_attention_equals_whole():
    from sana.nn.functional import relu_linear_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 100, 3, 8, generator=g).relu() for _ in range(3))
    whole = relu_linear_attention(q, k, v)
    for chunk in (7, 33, 99):
        assert_close_rel(relu_linear_attention(q, k, v, chunk=chunk), whole, rel=1e-6)
    low = relu_linear_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), out_dtype=torch.bfloat16, chunk=16)
    assert low.dtype == torch.bfloat16
    assert_close_rel(low.float(), whole, rel=2e-2)
