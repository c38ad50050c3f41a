"""`sana bench`: our transformer and pipeline against diffusers, in one process, on the same GPU and inputs.

Prints a table (ms, TFLOP/s, % of the GPU's measured dense bf16 matmul rate, peak memory, ratio to diffusers)
and writes JSON. Random weights of the released configs (no Hub needed).
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sana.models.transformer import TRANSFORMER_PRESETS, SanaTransformer, TransformerConfig


def transformer_flops(cfg: TransformerConfig, batch: int, height: int, width: int, text_len: int = 300) -> float:
    """Dense FLOPs (2 per multiply-add) of one forward at latent size height x width (matmuls, convs, attention)."""
    B, C, F, L, d = batch, cfg.hidden_size, cfg.ffn_hidden, text_len, cfg.linear_head_dim
    N = (height // cfg.patch_size) * (width // cfg.patch_size)
    per_block = (
        2 * B * N * C * 3 * C  # qkv
        + 4 * B * N * C * d  # linear attention: K^T V and Q (K^T V)
        + 2 * B * N * C * C  # attention out projection
        + 2 * B * N * C * C
        + 2 * B * L * C * 2 * C
        + 4 * B * N * L * C
        + 2 * B * N * C * C  # cross-attention
        + 2 * B * N * C * 2 * F
        + 2 * B * N * 2 * F * 9
        + 2 * B * N * F * C  # Mix-FFN
    )
    head = 2 * B * L * (cfg.caption_channels * C + C * C) + 2 * B * N * C * cfg.patch_size**2 * cfg.out_channels
    return cfg.depth * per_block + head


def cuda_time_ms(fn: Callable[[], object], reps: int = 10, warmup: int = 3) -> float:
    """Mean wall time of fn on the GPU (CUDA events), after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def matmul_tflops(n: int = 8192) -> float:
    """The GPU's measured dense bf16 matmul rate (n x n x n products)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = cuda_time_ms(lambda: a @ b, reps=20)
    return 2 * n**3 / ms / 1e9


@dataclass
class Row:
    what: str
    ms: float
    flops: float = 0.0
    peak_gib: float = 0.0
    extra: dict = field(default_factory=dict)


def _peak(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def bench_transformer(preset: str, batch: int = 2, size: int = 1024, compile_diffusers: bool = True) -> list[Row]:
    """One forward at size x size: diffusers eager (+ torch.compile), ours eager and CUDA-graphed."""
    from sana.fast import GraphedTransformer

    cfg = TRANSFORMER_PRESETS[preset]
    h = w = size // 32
    flops = transformer_flops(cfg, batch, h, w)
    torch.manual_seed(0)
    ours = SanaTransformer(cfg).cuda().eval().bfloat16()
    x = torch.randn(batch, 32, h, w, device="cuda", dtype=torch.bfloat16)
    text = torch.randn(batch, 300, cfg.caption_channels, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(batch, 300, dtype=torch.long, device="cuda")
    mask[0, 40:] = 0
    t = torch.full((batch,), 0.5, device="cuda")
    rows = []
    with torch.no_grad():
        ctx = ours.encode_text(text, mask)
        rows.append(
            Row(
                f"{preset} forward ours eager",
                cuda_time_ms(lambda: ours(x, t, ctx)),
                flops,
                _peak(lambda: ours(x, t, ctx)),
            )
        )
        graphed = GraphedTransformer(ours, x, ctx)
        rows.append(
            Row(
                f"{preset} forward ours CUDA graph",
                cuda_time_ms(lambda: graphed.run(x, 0.5)),
                flops,
                _peak(lambda: graphed.run(x, 0.5)),
            )
        )
        start = time.perf_counter()
        compiled = GraphedTransformer(ours, x, ctx, compile=True)
        compile_s = time.perf_counter() - start
        rows.append(
            Row(
                f"{preset} forward ours torch.compile + CUDA graph",
                cuda_time_ms(lambda: compiled.run(x, 0.5)),
                flops,
                _peak(lambda: compiled.run(x, 0.5)),
                {
                    "compile_s": compile_s,
                    "max_abs_vs_eager": (compiled.run(x, 0.5) - ours(x, t, ctx)).abs().max().item(),
                },
            )
        )
        try:
            import diffusers

            from sana.weights import transformer as tconv
        except ImportError:
            return rows
        ref = diffusers.SanaTransformer2DModel.from_config(tconv.config_to_diffusers(cfg)).cuda().eval().bfloat16()

        def run_ref(model):
            return lambda: model(x, encoder_hidden_states=text, timestep=t * 1000, encoder_attention_mask=mask)

        rows.append(Row(f"{preset} forward diffusers eager", cuda_time_ms(run_ref(ref)), flops, _peak(run_ref(ref))))
        if compile_diffusers:
            compiled = torch.compile(ref)
            start = time.perf_counter()
            run_ref(compiled)()
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - start
            rows.append(
                Row(
                    f"{preset} forward diffusers torch.compile",
                    cuda_time_ms(run_ref(compiled)),
                    flops,
                    _peak(run_ref(compiled)),
                    {"compile_s": compile_s},
                )
            )
    return rows


def report(rows: list[Row], matmul: float) -> dict:
    """Print the table and return it as JSON-able data."""
    env = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        python=platform.python_version(),
        date=time.strftime("%Y-%m-%d"),
        matmul_tflops=round(matmul, 1),
    )
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    print(f"{'what':58s} {'ms':>9s} {'TFLOP/s':>8s} {'%matmul':>8s} {'peak GiB':>9s}")
    out = []
    for r in rows:
        tflops = r.flops / r.ms / 1e9 if r.flops else 0.0
        print(f"{r.what:58s} {r.ms:9.2f} {tflops:8.1f} {100 * tflops / matmul:7.1f}% {r.peak_gib:9.2f}")
        out.append(
            dict(what=r.what, ms=r.ms, tflops=tflops, pct_matmul=100 * tflops / matmul, peak_gib=r.peak_gib, **r.extra)
        )
    return dict(env=env, rows=out)


def main(presets: list[str], out: str | None, compile_diffusers: bool = True) -> dict:
    if not torch.cuda.is_available():
        from sana.errors import SanaError

        raise SanaError("sana bench needs a CUDA GPU")
    matmul = matmul_tflops()
    rows = []
    for preset in presets:
        rows += bench_transformer(preset, compile_diffusers=compile_diffusers)
        torch.cuda.empty_cache()
    data = report(rows, matmul)
    if out:
        with open(out, "w") as f:
            json.dump(data, f, indent=2)
    return data
