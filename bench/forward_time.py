"""Time one transformer forward (bf16, 1024x1024, batch 2 = CFG) for ours and diffusers, eager, same process."""

import json
import os
import sys

import diffusers
import torch

from sana.bench import cuda_time_ms
from sana.models import TRANSFORMER_PRESETS, SanaTransformer
from sana.weights import transformer as tconv


def timed(fn, reps=20):
    return cuda_time_ms(fn, reps=reps)


def bench_one(preset):
    cfg = TRANSFORMER_PRESETS[preset]
    ref = diffusers.SanaTransformer2DModel.from_config(tconv.config_to_diffusers(cfg)).cuda().eval().bfloat16()
    ours = SanaTransformer(cfg).cuda().eval().bfloat16()
    x = torch.randn(2, 32, 32, 32, device="cuda", dtype=torch.bfloat16)
    text = torch.randn(2, 300, 2304, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(2, 300, dtype=torch.long, device="cuda")
    t = torch.tensor([0.5, 0.5], device="cuda")
    with torch.no_grad():
        ms_ref = timed(lambda: ref(x, encoder_hidden_states=text, timestep=t * 1000, encoder_attention_mask=mask))
        ms_ours = timed(lambda: ours(x, t, text, mask))
    return dict(diffusers_ms=ms_ref, ours_ms=ms_ours, device=torch.cuda.get_device_name(), torch=torch.__version__)


def main(presets):
    results = {}
    for preset in presets:
        results[preset] = bench_one(preset)
        print(preset, json.dumps(results[preset]))
        torch.cuda.empty_cache()
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "forward_time.json"), "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1:] or ["sana-600m-1024", "sana-1600m-1024"])
