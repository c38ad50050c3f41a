"""Fast paths that never change results: CUDA graph replay of the transformer for a fixed shape.

A sampler calls the transformer 20 times with the same shapes and the same text; only the latent and the
timestep change. `GraphedTransformer` captures one forward as a CUDA graph over static buffers and replays
it: no Python and no kernel-launch overhead per block, no host synchronisation inside the loop. Numerics are
those of the eager forward (the same kernels run).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sana.models.transformer import SanaTransformer, TextContext


class GraphedTransformer:
    """`run(x, t)` = `model(x, t, ctx, guidance, pag...)` replayed from a CUDA graph; `set_text(ctx)` swaps text."""

    def __init__(
        self,
        model: SanaTransformer,
        x: torch.Tensor,
        ctx: TextContext,
        guidance: torch.Tensor | None = None,
        pag_blocks: Sequence[int] = (),
        pag_from: int | None = None,
        warmup: int = 2,
        compile: bool = False,
    ):
        if x.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.model, self.pag_blocks, self.pag_from = model, tuple(pag_blocks), pag_from
        # Optional torch.compile (inductor fuses the element-wise work between the matmuls); its kernels are then
        # captured like the eager ones. Rounding may differ from eager within bf16 precision.
        self.fn = torch.compile(model, dynamic=False) if compile else model
        self.x = x.detach().clone()
        self.t = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        self.ctx = TextContext(
            tuple((k.clone(), v.clone()) for k, v in ctx.kv), None if ctx.bias is None else ctx.bias.clone()
        )
        self.guidance = None if guidance is None else guidance.clone()
        stream = torch.cuda.Stream(device=x.device)
        stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.no_grad(), torch.cuda.stream(stream):
            for _ in range(warmup):  # allocator and cuBLAS/cuDNN warm-up outside the capture
                self._forward()
        torch.cuda.current_stream(x.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self.out = self._forward()

    def _forward(self) -> torch.Tensor:
        return self.model(
            self.x, self.t, self.ctx, guidance=self.guidance, pag_blocks=self.pag_blocks, pag_from=self.pag_from
        )

    def matches(self, x: torch.Tensor, ctx: TextContext, guidance, pag_blocks, pag_from) -> bool:
        """Whether this graph can serve these inputs (same shapes, dtypes and options)."""
        same = (
            x.shape == self.x.shape
            and x.dtype == self.x.dtype
            and x.device == self.x.device
            and tuple(pag_blocks) == self.pag_blocks
            and pag_from == self.pag_from
            and (guidance is None) == (self.guidance is None)
            and (ctx.bias is None) == (self.ctx.bias is None)
            and len(ctx.kv) == len(self.ctx.kv)
        )
        return same and all(k.shape == k0.shape for (k, _), (k0, _) in zip(ctx.kv, self.ctx.kv, strict=True))

    def set_text(self, ctx: TextContext, guidance: torch.Tensor | None = None) -> None:
        """Copy a new text context (same shapes) into the captured buffers."""
        for (k, v), (k0, v0) in zip(ctx.kv, self.ctx.kv, strict=True):
            k0.copy_(k)
            v0.copy_(v)
        if ctx.bias is not None:
            self.ctx.bias.copy_(ctx.bias)
        if guidance is not None:
            self.guidance.copy_(guidance)

    def run(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """The velocity at (x, t); t is the flow time (a Python float: filled in without a host sync)."""
        self.x.copy_(x)
        if isinstance(t, torch.Tensor):
            self.t.copy_(t.expand(self.t.shape))
        else:
            self.t.fill_(t)
        self.graph.replay()
        return self.out.clone()
