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
