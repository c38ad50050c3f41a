"""Profile one bf16 transformer forward (1024x1024, batch 2): the top CUDA kernels by time."""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from sana.models import TRANSFORMER_PRESETS, SanaTransformer

for preset in sys.argv[1:] or ["sana-600m-1024", "sana-1600m-1024"]:
    cfg = TRANSFORMER_PRESETS[preset]
    model = SanaTransformer(cfg).cuda().eval().bfloat16()
    x = torch.randn(2, 32, 32, 32, device="cuda", dtype=torch.bfloat16)
    text = torch.randn(2, 300, 2304, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(2, 300, dtype=torch.long, device="cuda")
    t = torch.full((2,), 0.5, device="cuda")
    with torch.no_grad():
        ctx = model.encode_text(text, mask)
        for _ in range(3):
            model(x, t, ctx)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                model(x, t, ctx)
            torch.cuda.synchronize()
    print(preset)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70))
