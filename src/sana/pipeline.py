"""Text to image: prompt encoding, resolution bins, noise, sampling, decoding, PIL images.

`Pipeline` holds the three models and the sampling defaults of one released model. Numerics follow diffusers'
SanaPipeline / SanaSprintPipeline (the test oracle): noise drawn in fp32 from a CPU generator, CFG batch
[negative, positive] each with its own mask, the transformer fed int(1000 sigma) by the DPM solver, decode of
latent / scaling_factor, then resize-and-crop back from the resolution bin.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

from sana import resolution, sampling
from sana.errors import ConfigError, SanaError
from sana.fast import GraphedTransformer
from sana.models.dcae import DCAE
from sana.models.text_encoder import DEFAULT_CHI, TextEncoder
from sana.models.tiled_decode import decode_auto
from sana.models.transformer import SanaTransformer
from sana.weights.load import load_autoencoder, load_transformer


class Sampler(enum.Enum):
    FLOW_DPM_SOLVER = "flow_dpm_solver"
    FLOW_EULER = "flow_euler"
    SCM = "scm"  # Sana-Sprint: 1-4 steps, guidance embedded in the model


@dataclasses.dataclass(frozen=True)
class PipelinePreset:
    """A released model: where its diffusers-format pipeline lives and how to sample it."""

    repo: str  # Hugging Face repo id of the diffusers-format pipeline ("" for a model shipped in the package)
    sampler: Sampler = Sampler.FLOW_DPM_SOLVER
    flow_shift: float = 3.0
    steps: int = 20
    guidance: float = 4.5
    gpu_dtype: str = "bfloat16"  # the dtype the checkpoint was trained for ("float16" for fp16-trained ones)
    description: str = ""
    local: str = ""  # a pipeline folder inside the installed package (sana/assets/NAME): no download, works offline

    def folder(self) -> Path | None:
        """The shipped pipeline folder of a `local` preset (None for a Hub one)."""
        return Path(__file__).parent / "assets" / self.local if self.local else None


_ORG = "Efficient-Large-Model"
# Flow shifts are those of the diffusers scheduler configs (the converter writes 3.0, and 6.0 for 4K; the NVlabs
# yaml of 600M-1024 says 4.0). A folder's own scheduler_config.json, when present, wins.
PIPELINE_PRESETS: dict[str, PipelinePreset] = {
    # Our own small model, trained on the shapes world (`sana data shapes`) with `sana train`; shipped in the package.
    "sana-tiny-shapes": PipelinePreset(
        "",
        local="sana-tiny-shapes",
        gpu_dtype="float32",
        description="sana-tiny-shapes: our 256px model of coloured shapes, in the package (offline)",
    ),
    "sana-600m-512": PipelinePreset(
        f"{_ORG}/Sana_600M_512px_diffusers", gpu_dtype="float16", description="Sana 0.6B, 512px"
    ),
    "sana-600m-1024": PipelinePreset(
        f"{_ORG}/Sana_600M_1024px_diffusers", gpu_dtype="float16", description="Sana 0.6B, 1024px"
    ),
    "sana-1600m-512": PipelinePreset(
        f"{_ORG}/Sana_1600M_512px_diffusers", gpu_dtype="float16", description="Sana 1.6B, 512px"
    ),
    "sana-1600m-1024": PipelinePreset(f"{_ORG}/Sana_1600M_1024px_BF16_diffusers", description="Sana 1.6B, 1024px"),
    "sana-1600m-2k": PipelinePreset(f"{_ORG}/Sana_1600M_2Kpx_BF16_diffusers", description="Sana 1.6B, 2048px"),
    "sana-1600m-4k": PipelinePreset(
        f"{_ORG}/Sana_1600M_4Kpx_BF16_diffusers", flow_shift=6.0, description="Sana 1.6B, 4096px"
    ),
    "sana1.5-1.6b": PipelinePreset(f"{_ORG}/SANA1.5_1.6B_1024px_diffusers", description="Sana-1.5 1.6B, 1024px"),
    "sana1.5-4.8b": PipelinePreset(f"{_ORG}/SANA1.5_4.8B_1024px_diffusers", description="Sana-1.5 4.8B, 1024px"),
    "sana-sprint-0.6b": PipelinePreset(
        f"{_ORG}/Sana_Sprint_0.6B_1024px_diffusers",
        sampler=Sampler.SCM,
        steps=2,
        description="Sana-Sprint 0.6B, 1024px, 1-4 steps",
    ),
    "sana-sprint-1.6b": PipelinePreset(
        f"{_ORG}/Sana_Sprint_1.6B_1024px_diffusers",
        sampler=Sampler.SCM,
        steps=2,
        description="Sana-Sprint 1.6B, 1024px, 1-4 steps",
    ),
}

_SCHEDULER_SAMPLERS = {
    "DPMSolverMultistepScheduler": Sampler.FLOW_DPM_SOLVER,
    "FlowMatchEulerDiscreteScheduler": Sampler.FLOW_EULER,
    "SCMScheduler": Sampler.SCM,
}
_DEFAULT_STEPS = {Sampler.FLOW_DPM_SOLVER: 20, Sampler.FLOW_EULER: 28, Sampler.SCM: 2}
# What a pipeline folder needs: weights as safetensors, configs, the tokenizer (never the .bin duplicates).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*"]

StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device, preset: PipelinePreset | None = None) -> torch.dtype:
    """bf16 on a GPU (fp16 for the fp16-trained checkpoints), fp32 on the CPU."""
    if device.type == "cpu":
        return torch.float32
    return getattr(torch, preset.gpu_dtype) if preset else torch.bfloat16


class Pipeline:
    """`images = Pipeline.from_pretrained("sana-600m-1024")("a cat in a hat", seed=0)`."""

    def __init__(
        self,
        transformer: SanaTransformer,
        autoencoder: DCAE,
        text_encoder: TextEncoder,
        sampler: Sampler = Sampler.FLOW_DPM_SOLVER,
        flow_shift: float = 3.0,
        steps: int | None = None,
        guidance: float = 4.5,
        name: str = "sana",
        progress: bool = True,
        pag_blocks: Sequence[int] | None = None,
        fast: bool = True,
    ):
        if flow_shift <= 0:
            raise ConfigError(f"flow_shift must be > 0, got {flow_shift}")
        if sampler is Sampler.SCM and not transformer.config.guidance_embeds:
            raise ConfigError("the scm sampler needs a Sana-Sprint transformer (guidance embedding)")
        self.transformer, self.autoencoder, self.text_encoder = transformer, autoencoder, text_encoder
        self.sampler, self.flow_shift, self.guidance, self.name = sampler, flow_shift, guidance, name
        self.steps = steps or _DEFAULT_STEPS[sampler]
        self.progress = progress
        self.fast = fast  # CUDA graph replay on CUDA devices (same numerics); False: plain eager reference
        self.max_graphs = 4
        self._graphs: dict = {}
        self._lora_originals: dict[str, torch.Tensor] = {}  # weights as they were before load_lora
        depth = transformer.config.depth
        # Reference PAG layers: block 14 of the 28-block 600M, block 8 of the 20-block 1600M.
        self.pag_blocks = (
            tuple(pag_blocks) if pag_blocks is not None else ({28: (14,), 20: (8,)}.get(depth, (depth // 2,)))
        )

    # ---------------------------------------------------------------------------------------------------
    # Loading

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        revision: str | None = None,
        progress: bool = True,
        fast: bool = True,
    ) -> Pipeline:
        """Load a preset name, a Hugging Face repo id or a local diffusers-format pipeline folder."""
        from sana import hub

        name = str(name_or_path)
        preset = PIPELINE_PRESETS.get(name)
        if preset is not None and preset.local:
            folder = preset.folder()
            if not (folder / "model_index.json").is_file():
                raise SanaError(f"{name}: the shipped model is missing from this installation ({folder})")
        else:
            folder = hub.resolve(preset.repo if preset else name, revision=revision, allow_patterns=HUB_PATTERNS)
        if not folder.is_dir() or not (folder / "transformer").is_dir():
            raise SanaError(f"{name}: not a pipeline folder (expected transformer/, vae/, text_encoder/, tokenizer/)")
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or default_dtype(device, preset)
        sampler, flow_shift = _scheduler_settings(folder, preset)
        transformer = load_transformer(folder / "transformer", device=device, dtype=dtype)
        autoencoder = load_autoencoder(folder / "vae", device=device, dtype=dtype)
        text_encoder = TextEncoder.from_pretrained(folder, device=device, dtype=dtype)
        return cls(
            transformer,
            autoencoder,
            text_encoder,
            sampler=sampler,
            flow_shift=flow_shift,
            steps=preset.steps if preset else None,
            guidance=preset.guidance if preset else 4.5,
            name=name,
            progress=progress,
            fast=fast,
        )

    def load_lora(self, path: str | Path, scale: float = 1.0) -> list[str]:
        """Merge a PEFT / diffusers LoRA (file or folder) into the transformer: W += scale (alpha / r) B A.

        Cumulative: each call adds on top of the previous ones; `unload_lora` restores the original weights
        (kept on the first merge of each layer). Returns the diffusers modules it adapted.
        """
        from sana import lora

        updates = lora.read_lora(path, self.transformer)
        lora.merge_lora(self.transformer, updates, scale, self._lora_originals)
        return [u.source for u in updates]

    def unload_lora(self) -> None:
        """Restore the transformer weights as they were before the first `load_lora` (exactly)."""
        from sana import lora

        lora.restore_weights(self.transformer, self._lora_originals)

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def default_size(self) -> int:
        return self.transformer.config.sample_size * 32

    # ---------------------------------------------------------------------------------------------------
    # Generation

    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] = "",
        height: int | None = None,
        width: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        sampler: Sampler | str | None = None,
        num_images: int = 1,
        callback: StepCallback | None = None,
        progress: bool | None = None,
        chi: Sequence[str] | None = DEFAULT_CHI,
        use_resolution_binning: bool = True,
        pag_scale: float = 0.0,
    ) -> list[Image.Image]:
        """Generate `num_images` images per prompt; returns a list of PIL images (prompt-major order)."""
        height = height or self.default_size
        width = width or self.default_size
        resolution.check_size(height, width)
        latents = self.generate_latents(
            prompt,
            negative_prompt,
            height,
            width,
            steps,
            guidance,
            seed,
            generator,
            sampler,
            num_images,
            callback,
            progress,
            chi,
            use_resolution_binning,
        )
        return resolution.to_pil(self.decode(latents, height, width, use_resolution_binning))

    def generate_latents(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] = "",
        height: int | None = None,
        width: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        sampler: Sampler | str | None = None,
        num_images: int = 1,
        callback: StepCallback | None = None,
        progress: bool | None = None,
        chi: Sequence[str] | None = DEFAULT_CHI,
        use_resolution_binning: bool = True,
        pag_scale: float = 0.0,
    ) -> torch.Tensor:
        """The final latents (B * num_images, C, h, w) in fp32, before decoding.

        pag_scale > 0 adds perturbed-attention guidance on `self.pag_blocks` (batch [uncond, cond, perturbed]).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("no prompt given")
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        sampler = Sampler(sampler) if sampler is not None else self.sampler
        steps = steps if steps is not None else (self.steps if sampler is self.sampler else _DEFAULT_STEPS[sampler])
        guidance = self.guidance if guidance is None else guidance
        _check_call(steps, guidance, num_images, sampler, self.transformer)
        height, width = height or self.default_size, width or self.default_size
        if use_resolution_binning:
            table = resolution.table_for_sample_size(self.transformer.config.sample_size)
            height, width = resolution.bin_size(height, width, table)
        resolution.check_size(height, width, max_side=8192)
        if generator is None:
            generator = torch.Generator("cpu").manual_seed(seed if seed is not None else _random_seed())

        text, mask = self.text_encoder.encode(prompts, chi=chi)
        text, mask = _repeat(text, num_images), _repeat(mask, num_images)
        B = text.shape[0]
        f = self.autoencoder.config.spatial_compression
        shape = (B, self.transformer.config.in_channels, height // f, width // f)
        noise = sampling.randn(torch.Size(shape), generator, self.device)  # fp32, as diffusers' randn_tensor

        bar = _progress_bar(steps, self.progress if progress is None else progress)

        def on_step(i, x, x0):
            bar.update()
            if callback is not None:
                callback(i, x, x0)

        try:
            with torch.no_grad():
                if sampler is Sampler.SCM:
                    return self._sample_scm(noise, text, mask, steps, guidance, generator, on_step)
                cfg, pag = guidance > 1.0, pag_scale > 0
                cond_text, cond_mask = text, mask
                if cfg:
                    neg, neg_mask = self.text_encoder.encode_negative(negatives)
                    text = torch.cat([_repeat(neg, num_images), text])
                    mask = torch.cat([_repeat(neg_mask, num_images), mask])
                pag_from = text.shape[0] if pag else None
                if pag:  # the perturbed copy of the conditional rows goes last
                    text, mask = torch.cat([text, cond_text]), torch.cat([mask, cond_mask])
                solver = sampling.flow_dpm_solver if sampler is Sampler.FLOW_DPM_SOLVER else sampling.flow_euler
                sigmas = (sampling.flow_sigmas if solver is sampling.flow_dpm_solver else sampling.euler_sigmas)(
                    steps, self.flow_shift
                )
                model = self._flow_velocity(text, mask, solver, (text.shape[0], *noise.shape[1:]), pag_from)
                if pag:
                    velocity = sampling.perturbed_attention_guidance(model, pag_scale, guidance if cfg else None)
                elif cfg:
                    velocity = sampling.classifier_free_guidance(model, guidance)
                else:
                    velocity = model
                return solver(velocity, noise, sigmas, callback=on_step)
        finally:
            bar.close()

    def _model_fn(self, ctx, x_like: torch.Tensor, guidance=None, pag_blocks=(), pag_from=None):
        """call(x, t) -> transformer velocity for inputs shaped like x_like: a replayed CUDA graph when fast
        paths are on and the device is CUDA (the same kernels, no per-step launch overhead), else eager."""
        model = self.transformer
        if self.fast and x_like.device.type == "cuda":
            key = (
                tuple(x_like.shape),
                x_like.dtype,
                tuple(pag_blocks),
                pag_from,
                guidance is not None,
                ctx.bias is not None,
                tuple(ctx.kv[0][0].shape),
            )
            graphed = self._graphs.pop(key, None)
            if graphed is None:
                graphed = GraphedTransformer(model, x_like, ctx, guidance, pag_blocks, pag_from)
            else:
                graphed.set_text(ctx, guidance)
            self._graphs[key] = graphed  # most recently used last
            while len(self._graphs) > self.max_graphs:
                self._graphs.pop(next(iter(self._graphs)))
            return graphed.run

        def call(x: torch.Tensor, t: float) -> torch.Tensor:
            t_tensor = torch.full((x.shape[0],), t, dtype=torch.float64, device=x.device)  # no host sync
            return model(x, t_tensor, ctx, guidance=guidance, pag_blocks=pag_blocks, pag_from=pag_from)

        return call

    def _flow_velocity(self, text, mask, solver, batch_shape, pag_from=None) -> sampling.Velocity:
        """velocity(x, sigma) of the transformer, fed the timestep diffusers' scheduler feeds for `solver`."""
        model, dtype = self.transformer, self.transformer.dtype
        ctx = model.encode_text(text, mask)  # once, not at every step
        pag_blocks = self.pag_blocks if pag_from is not None else ()
        call = self._model_fn(
            ctx, torch.empty(batch_shape, dtype=dtype, device=self.device), None, pag_blocks, pag_from
        )

        def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
            # k/1000 in float64: the model multiplies by 1000 in float64 and recovers the integer timestep k.
            return call(x.to(dtype), sampling.model_timestep(sigma, solver) / 1000.0).float()

        return velocity

    def _sample_scm(self, noise, text, mask, steps, guidance, generator, on_step) -> torch.Tensor:
        model, dtype = self.transformer, self.transformer.dtype
        ctx = model.encode_text(text, mask)
        # diffusers casts the guidance to the text dtype before the model scales it.
        g = torch.full((noise.shape[0],), guidance, dtype=torch.float32, device=noise.device).to(dtype)
        call = self._model_fn(ctx, noise.to(dtype), g)

        def velocity(x: torch.Tensor, t_flow: float) -> torch.Tensor:
            # diffusers feeds the flow time as float32: round it the same way before the model's float64 product
            return call(x.to(dtype), float(torch.tensor(t_flow, dtype=torch.float32)))

        intermediate = sampling.SCM_INTERMEDIATE_T if steps == 2 else None
        timesteps = sampling.scm_timesteps(steps, intermediate=intermediate)
        return sampling.scm(velocity, noise, timesteps, generator=generator, callback=on_step)

    def decode(self, latents: torch.Tensor, height: int, width: int, resize: bool = True) -> torch.Tensor:
        """Latents -> images in [-1, 1] at (height, width): decode latent / scaling_factor, resize-and-crop."""
        ae = self.autoencoder
        with torch.no_grad():
            # Untiled when it fits in free memory, else the exact tiled decode (no seams; same result).
            images = decode_auto(ae, latents.to(device=ae.device, dtype=ae.dtype) / ae.scaling_factor)
        if resize and images.shape[-2:] != (height, width):
            images = resolution.resize_and_crop(images, height, width)
        return images


def _check_call(steps: int, guidance: float, num_images: int, sampler: Sampler, transformer) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if guidance < 0:
        raise ValueError(f"guidance must be >= 0, got {guidance}")
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if sampler is Sampler.SCM and not transformer.config.guidance_embeds:
        raise ValueError("the scm sampler needs a Sana-Sprint model")
    if sampler is not Sampler.SCM and transformer.config.guidance_embeds:
        raise ValueError("Sana-Sprint models sample with the scm sampler")
    if sampler is Sampler.SCM and steps > 4:
        raise ValueError(f"Sana-Sprint is distilled for 1-4 steps, got {steps}")


def _repeat(x: torch.Tensor, n: int) -> torch.Tensor:
    """Each row n times in a row (diffusers' num_images_per_prompt order)."""
    return x.repeat_interleave(n, dim=0) if n > 1 else x


def _random_seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sampling", unit="step", disable=not enabled, leave=False)


def _scheduler_settings(folder: Path, preset: PipelinePreset | None) -> tuple[Sampler, float]:
    """Sampler and flow shift from the folder's scheduler_config.json, else from the preset."""
    path = folder / "scheduler" / "scheduler_config.json"
    sampler = preset.sampler if preset else Sampler.FLOW_DPM_SOLVER
    shift = preset.flow_shift if preset else 3.0
    if path.exists():
        try:
            cfg = json.loads(path.read_text())
        except ValueError as e:
            raise SanaError(f"{path}: invalid JSON ({e})") from e
        cls_name = cfg.get("_class_name")
        if cls_name not in _SCHEDULER_SAMPLERS:
            raise SanaError(f"{path}: scheduler {cls_name!r} is not supported (known: {sorted(_SCHEDULER_SAMPLERS)})")
        sampler = _SCHEDULER_SAMPLERS[cls_name]
        shift = float(cfg.get("flow_shift", cfg.get("shift", shift)) or shift)
    return sampler, shift
