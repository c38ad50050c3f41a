"""Full-size models in bf16 on a GPU against diffusers (run on the device; skipped without CUDA).

Criterion: our bf16 output is as close to the fp32 reference as diffusers' own bf16 output is
(err(ours_bf16) <= 1.5 x err(diffusers_bf16) + tiny), and close to diffusers' bf16 output.
"""

import json
import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device)"),
]
diffusers = pytest.importorskip("diffusers")

RESULTS = {}
torch.backends.cudnn.allow_tf32 = False  # exact fp32 references (cuDNN convs default to TF32)
torch.backends.cuda.matmul.allow_tf32 = False


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def _record(name, **kw):
    RESULTS[name] = kw
    print(name, json.dumps(kw))
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gpu_parity.json"), "w") as f:
            json.dump(RESULTS, f, indent=2)


@pytest.mark.parametrize("preset", ["sana-600m-1024", "sana-1600m-1024"])
def test_full_size_transformer_bf16(preset):
    from sana.models import TRANSFORMER_PRESETS, SanaTransformer
    from sana.weights import transformer as tconv

    cfg = TRANSFORMER_PRESETS[preset]
    torch.manual_seed(0)
    ref = diffusers.SanaTransformer2DModel.from_config(tconv.config_to_diffusers(cfg)).cuda().eval()
    ours = SanaTransformer(cfg).cuda().eval()
    ours.load_state_dict(tconv.to_native(ref.state_dict(), "diffusers", cfg))
    B, L = 2, 300
    x = torch.randn(B, 32, 32, 32, device="cuda")
    text = torch.randn(B, L, 2304, device="cuda")
    mask = torch.zeros(B, L, dtype=torch.long, device="cuda")
    mask[0, :40] = 1
    mask[1, :300] = 1
    t = torch.tensor([0.999, 0.5], device="cuda")
    with torch.no_grad():
        ref32 = ref(x, encoder_hidden_states=text, timestep=t * 1000, encoder_attention_mask=mask)[0]
        ours32 = ours(x, t, text, mask)
        ref.to(torch.bfloat16)
        ours.to(torch.bfloat16)
        ref16 = ref(
            x.bfloat16(), encoder_hidden_states=text.bfloat16(), timestep=t * 1000, encoder_attention_mask=mask
        )[0]
        ours16 = ours(x.bfloat16(), t, text.bfloat16(), mask)
    r = dict(
        fp32_ours_vs_diffusers=_rel(ours32, ref32),
        bf16_ours_vs_fp32=_rel(ours16, ref32),
        bf16_diffusers_vs_fp32=_rel(ref16, ref32),
        bf16_ours_vs_diffusers_bf16=_rel(ours16, ref16),
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
    )
    _record(f"transformer {preset} 1024x1024 batch 2", **r)
    assert r["fp32_ours_vs_diffusers"] < 1e-4
    assert r["bf16_ours_vs_fp32"] <= 1.5 * r["bf16_diffusers_vs_fp32"] + 1e-3


def test_full_size_dcae_bf16():
    from sana.models import DCAE, DCAE_PRESETS
    from sana.weights import dcae as aconv

    cfg = DCAE_PRESETS["dc-ae-f32c32-sana-1.1"]
    torch.manual_seed(0)
    ref = diffusers.AutoencoderDC.from_config(aconv.config_to_diffusers(cfg)).cuda().eval()
    with torch.no_grad():  # diffusers inits norms to 1/0: perturb so that every term matters
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours = DCAE(cfg).cuda().eval()
    ours.load_state_dict(aconv.to_native(ref.state_dict(), "diffusers", cfg))
    img = torch.rand(1, 3, 1024, 1024, device="cuda") * 2 - 1
    with torch.no_grad():
        z32_ref = ref.encode(img).latent
        x32_ref = ref.decode(z32_ref).sample
        z32, x32 = ours.encode(img), ours.decode(z32_ref)
        ref.to(torch.bfloat16)
        ours.to(torch.bfloat16)
        z16_ref, x16_ref = ref.encode(img.bfloat16()).latent, ref.decode(z32_ref.bfloat16()).sample
        z16, x16 = ours.encode(img.bfloat16()), ours.decode(z32_ref.bfloat16())
    r = dict(
        fp32_encode=_rel(z32, z32_ref),
        fp32_decode=_rel(x32, x32_ref),
        bf16_encode_ours_vs_fp32=_rel(z16, z32_ref),
        bf16_encode_diffusers_vs_fp32=_rel(z16_ref, z32_ref),
        bf16_decode_ours_vs_fp32=_rel(x16, x32_ref),
        bf16_decode_diffusers_vs_fp32=_rel(x16_ref, x32_ref),
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
    )
    _record("dc-ae-f32c32-sana-1.1 1024x1024", **r)
    assert r["fp32_encode"] < 1e-4 and r["fp32_decode"] < 1e-4
    assert r["bf16_encode_ours_vs_fp32"] <= 1.5 * r["bf16_encode_diffusers_vs_fp32"] + 1e-3
    assert r["bf16_decode_ours_vs_fp32"] <= 1.5 * r["bf16_decode_diffusers_vs_fp32"] + 1e-3


def test_cuda_graph_pipeline_equals_eager(tmp_path):
    """The fast path (CUDA graph replay) gives the eager path's latents, for CFG, PAG and Sprint."""
    from sana.pipeline import Pipeline
    from tiny import make_tiny_pipeline

    for sprint in (False, True):
        folder = make_tiny_pipeline(tmp_path / f"p{sprint}", sprint=sprint)
        fast = Pipeline.from_pretrained(folder, device="cuda", dtype=torch.float32, progress=False)
        ref = Pipeline.from_pretrained(folder, device="cuda", dtype=torch.float32, progress=False, fast=False)
        kwargs = (
            [dict(steps=2)] if sprint else [dict(steps=4), dict(steps=4, pag_scale=2.0), dict(steps=3, guidance=1.0)]
        )
        for kw in kwargs:
            for prompt in ("a cat", "a dog on a skateboard"):  # the second call reuses the graph with new text
                a = fast.generate_latents(prompt, height=512, width=512, seed=0, **kw)
                b = ref.generate_latents(prompt, height=512, width=512, seed=0, **kw)
                _record(f"graph vs eager sprint={sprint} {kw} {prompt}", max_abs=(a - b).abs().max().item())
                torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        assert fast._graphs and not ref._graphs
