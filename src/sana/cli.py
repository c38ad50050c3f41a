"""The `sana` command: a thin layer over the library. Errors a user can cause are one line on stderr."""

from __future__ import annotations

import argparse
import os
import sys

from sana import __version__
from sana.cli_args import add_device_options, dtype_of
from sana.errors import SanaError

EXIT_USAGE = 2
# The default model of `sana generate`. sana-tiny-shapes (shipped in the package, offline) takes over once its
# weights are trained and committed (src/sana/assets/sana-tiny-shapes; see configs/shapes/).
DEFAULT_MODEL = "sana-600m-1024"


def _cmd_convert(args: argparse.Namespace) -> int:
    from sana.weights.load import AUTOENCODER, TRANSFORMER, convert

    kind = {"auto": None, "transformer": TRANSFORMER, "autoencoder": AUTOENCODER}[args.kind]
    config = args.preset
    if config is not None and kind is None:
        raise SanaError("--preset needs --kind transformer or --kind autoencoder")
    out = convert(args.src, args.dst, to=args.to, kind=kind, config=config)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _parse_size(text: str) -> tuple[int, int]:
    """WIDTHxHEIGHT (or one number for a square) -> (height, width)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, e.g. 1024x768, got {text!r}") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, e.g. 1024x768, got {text!r}")
    width, height = parts
    return height, width


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = [args.prompt] if args.prompt else []
    if args.prompts_file:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                prompts += [line.strip() for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise SanaError(f"cannot read prompts file {args.prompts_file}: {e}") from e
    if not prompts:
        raise SanaError("no prompt: give one as an argument or --prompts-file FILE (one prompt a line)")
    return prompts


def _check_generate_args(args: argparse.Namespace) -> None:
    from sana import resolution

    if args.size is not None:
        try:
            resolution.check_size(*args.size)
        except ValueError as e:
            raise SanaError(str(e)) from e
    if args.steps is not None and args.steps < 1:
        raise SanaError(f"--steps must be >= 1, got {args.steps}")
    if args.guidance is not None and args.guidance < 0:
        raise SanaError(f"--guidance must be >= 0, got {args.guidance}")
    if args.pag_scale < 0:
        raise SanaError(f"--pag-scale must be >= 0, got {args.pag_scale}")
    if args.num_images < 1:
        raise SanaError(f"--num-images must be >= 1, got {args.num_images}")


def _cmd_generate(args: argparse.Namespace) -> int:
    import time

    import torch

    from sana import outputs
    from sana.pipeline import Pipeline

    prompts = _read_prompts(args)
    _check_generate_args(args)
    try:
        paths = outputs.numbered_paths(args.output, len(prompts) * args.num_images, args.overwrite)
    except ValueError as e:
        raise SanaError(str(e)) from e
    dtype = dtype_of(args.dtype)
    if args.model is None:
        args.model = DEFAULT_MODEL
    if args.model == "sana-tiny-shapes":
        print(
            "model: sana-tiny-shapes, our small model of coloured shapes shipped with sana (offline). For the "
            "released Sana models add --model sana-600m-1024 (or sana-1600m-1024, sana-sprint-0.6b, ...: "
            "downloaded from the Hugging Face Hub).",
            file=sys.stderr,
        )
    pipe = Pipeline.from_pretrained(
        args.model,
        device=args.device,
        dtype=dtype,
        revision=args.revision,
        progress=not args.no_progress,
        fast=not args.reference,
    )
    height, width = args.size or (pipe.default_size, pipe.default_size)
    seed = args.seed if args.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
    k = 0
    for i, prompt in enumerate(prompts):
        start = time.perf_counter()
        try:
            images = pipe(
                prompt,
                negative_prompt=args.negative,
                height=height,
                width=width,
                steps=args.steps,
                guidance=args.guidance,
                seed=seed + i,
                sampler=args.sampler,
                num_images=args.num_images,
            )
        except ValueError as e:
            raise SanaError(str(e)) from e
        seconds = time.perf_counter() - start
        for j, image in enumerate(images):
            params = dict(
                prompt=prompt,
                negative_prompt=args.negative,
                steps=args.steps or pipe.steps,
                sampler=(args.sampler or pipe.sampler.value),
                guidance=pipe.guidance if args.guidance is None else args.guidance,
                seed=seed + i,
                batch_index=j,
                num_images=args.num_images,
                width=width,
                height=height,
                model=args.model,
                dtype=str(pipe.dtype).removeprefix("torch."),
                device=str(pipe.device),
                pag_scale=args.pag_scale,
            )
            outputs.save_png(image, paths[k], params)
            print(f"wrote {paths[k]} ({width}x{height}, {seconds / len(images):.2f} s/image)", file=sys.stderr)
            k += 1
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (exit 2), like every other error a user can cause."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _cmd_assemble(args: argparse.Namespace) -> int:
    import torch

    from sana.assemble import assemble_pipeline

    out = assemble_pipeline(
        args.transformer,
        args.autoencoder,
        args.text_encoder,
        args.out,
        flow_shift=args.flow_shift,
        dtype=getattr(torch, args.dtype),
        overwrite=args.overwrite,
    )
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 2**20:.1f} MiB)", file=sys.stderr)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from sana.train import load_config, train

    cfg = load_config(args.config, args.set or [])
    summary = train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return 0
    print(
        f"trained to step {summary['step']} (last loss {summary['last_loss']:.4f}); checkpoint {summary['checkpoint']}"
        + (f"; exported {summary['export']}" if summary.get("export") else ""),
        file=sys.stderr,
    )
    if "holdout_psnr_db" in summary:
        print(f"held-out reconstruction PSNR {summary['holdout_psnr_db']:.2f} dB", file=sys.stderr)
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    from sana.train import load_config
    from sana.train.cache import build_cache_from_config

    cfg = load_config(args.config, args.set or [])
    info = build_cache_from_config(
        cfg, args.out, shard_size=args.shard_size, batch_size=args.batch_size, progress=not args.no_progress
    )
    print(f"cache in {args.out}: {info}", file=sys.stderr)
    return 0


def _cmd_data_shapes(args: argparse.Namespace) -> int:
    from sana.shapes import SceneConfig, generate_dataset, holdout_from_list

    config = SceneConfig(holdout=holdout_from_list(args.holdout or []))
    r = generate_dataset(
        args.out, args.n, args.size, args.seed, args.workers, progress=not args.no_progress, config=config
    )
    print(f"{args.out}: wrote {r.written}, kept {r.skipped} ({r.images_per_second:.0f} images/s)", file=sys.stderr)
    return 0


def _cmd_eval_shapes(args: argparse.Namespace) -> int:
    import json

    from sana.shapes import dataset_seen_pairs, self_check
    from sana.shapes.evaluate import evaluate, pipeline_generate_fn

    if args.self_check:
        report = self_check(args.n, args.seed, args.size)
    else:
        from sana.pipeline import Pipeline

        dtype = dtype_of(args.dtype)
        pipe = Pipeline.from_pretrained(args.model, device=args.device, dtype=dtype, progress=False)
        seen = dataset_seen_pairs(args.train_dir) if args.train_dir else None
        fn = pipeline_generate_fn(pipe, args.size, args.steps, args.guidance)
        report = evaluate(fn, args.n, args.seed, seen_pairs=seen, image_dir=args.images, progress=True)
    print(report.summary())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_dict(), f, indent=2)
    return 1 if args.self_check and report.overall < 0.98 else 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from sana import bench

    bench.main(args.models, args.json, compile_diffusers=not args.no_compile)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sana",
        description="Sana text-to-image: generate, convert, train and serve.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sana {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "convert",
        help="rewrite a transformer or DC-AE checkpoint in another layout",
        description="Convert a checkpoint between layouts: native (one .safetensors with its config), diffusers "
        "(a folder) and original (NVlabs/efficientvit keys; .pth or .safetensors).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("src", help="diffusers folder, original .pth/.safetensors, or native .safetensors")
    p.add_argument("dst", help="output: a .safetensors file (native/original), a .pth (original) or a folder")
    p.add_argument("--to", choices=("native", "diffusers", "original"), default="native", help="output layout")
    p.add_argument(
        "--kind", choices=("auto", "transformer", "autoencoder"), default="auto", help="what the checkpoint holds"
    )
    p.add_argument(
        "--preset", default=None, help="architecture preset to use instead of inferring it (e.g. sana-1600m-1024)"
    )
    p.set_defaults(func=_cmd_convert)

    from sana.pipeline import PIPELINE_PRESETS, Sampler

    presets = ", ".join(PIPELINE_PRESETS)
    g = sub.add_parser(
        "generate",
        help="generate images from text",
        description=f"Generate images from a prompt. Models: a preset ({presets}), a Hugging Face repo id or "
        "a local diffusers-format pipeline folder. PNGs carry the generation parameters as text chunks.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g.add_argument("prompt", nargs="?", default=None, help="the prompt (or use --prompts-file)")
    g.add_argument("-o", "--output", default="out.png", help="output PNG; several images are numbered beside it")
    g.add_argument(
        "--model",
        default=None,
        help=f"preset name, Hub repo id or local pipeline folder (default: {DEFAULT_MODEL}, shipped with sana)",
    )
    g.add_argument(
        "--size",
        type=_parse_size,
        default=None,
        metavar="WxH",
        help="image size, multiples of 32 up to 4096 (default: the model's native size)",
    )
    g.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    g.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's, 4.5)")
    g.add_argument("--seed", type=int, default=None, help="random seed (default: random, written to the PNG)")
    g.add_argument("--negative", default="", help="negative prompt")
    g.add_argument("--sampler", choices=[s.value for s in Sampler], default=None, help="sampler (default: the model's)")
    g.add_argument("--num-images", type=int, default=1, help="images per prompt")
    g.add_argument(
        "--pag-scale",
        type=float,
        default=0.0,
        help="perturbed-attention guidance scale (0 = off; the reference app uses 2.0)",
    )
    g.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) to pin")
    g.add_argument("--prompts-file", default=None, help="a text file with one prompt a line")
    add_device_options(g)
    g.add_argument("--overwrite", action="store_true", help="overwrite existing files instead of numbering anew")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument(
        "--reference", action="store_true", help="plain eager PyTorch (no CUDA graphs): to compare with the fast path"
    )
    g.set_defaults(func=_cmd_generate)

    asm = sub.add_parser(
        "assemble",
        help="write a pipeline folder from a trained transformer, DC-AE and text encoder",
        description="Assemble a diffusers-layout pipeline folder (what --model takes) from the exports of three "
        "`sana train` runs (their final/ folders) or any transformer / DC-AE / Gemma-2 checkpoints.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    asm.add_argument("out", help="the pipeline folder to write")
    asm.add_argument("--transformer", required=True, help="transformer checkpoint (or a run's final/ folder)")
    asm.add_argument("--autoencoder", required=True, help="DC-AE checkpoint (or a run's final/ folder holding vae/)")
    asm.add_argument("--text-encoder", required=True, help="folder with tokenizer/ and text_encoder/")
    asm.add_argument("--flow-shift", type=float, default=3.0, help="flow shift the model was trained with")
    asm.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16", help="weights' dtype")
    asm.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    asm.set_defaults(func=_cmd_assemble)

    tr = sub.add_parser(
        "train",
        help="train or fine-tune a Sana transformer from a TOML config",
        description="Flow-matching training from a TOML config (see configs/train/). Resumes from the last checkpoint "
        "in output_dir; SIGTERM saves before exit. Multi-GPU launch through torchrun is not available yet.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    tr.add_argument("config", help="TOML config file, e.g. configs/train/tiny.toml")
    tr.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set optim.lr=1e-4 --set schedule.max_steps=100",
    )
    tr.set_defaults(func=_cmd_train)

    ca = sub.add_parser(
        "cache",
        help="precompute DC-AE latents and text embeddings of an image folder for training",
        description="Encode the images and captions of data.path once (sharded safetensors, resumable); train from it "
        "with --set data.source=cache --set data.path=OUT.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ca.add_argument("config", help="TOML training config naming the data folder and the encoders")
    ca.add_argument("out", help="output folder of the cache")
    ca.add_argument("--shard-size", type=int, default=1000, help="samples per shard file")
    ca.add_argument("--batch-size", type=int, default=8, help="encoding batch size")
    ca.add_argument("--no-progress", action="store_true", help="no progress bar")
    ca.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")
    ca.set_defaults(func=_cmd_cache)

    b = sub.add_parser(
        "bench",
        help="time our transformer against diffusers on this GPU",
        description="Transformer forward at 1024x1024, batch 2 (one CFG step), bf16, random weights of the released "
        "configs: ours eager and CUDA-graphed, diffusers eager and torch.compile'd, in one process. Prints ms, "
        "TFLOP/s, %% of the measured bf16 matmul rate and peak memory.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    b.add_argument("--models", nargs="+", default=["sana-600m-1024", "sana-1600m-1024"], help="transformer presets")
    b.add_argument("--json", default="bench.json", help="where to write the results")
    b.add_argument("--no-compile", action="store_true", help="skip diffusers + torch.compile (slow to compile)")
    b.set_defaults(func=_cmd_bench)

    data = sub.add_parser("data", help="make datasets").add_subparsers(dest="data_command", metavar="DATASET")
    ds = data.add_parser(
        "shapes",
        help="a procedural world of coloured shapes with several captions per image",
        description="Deterministic scenes of 1-4 shapes (circle, square, triangle, star, hexagon, ring; 8 colours) "
        "with captions for objects, counts, colours and spatial relations, in the trainer's image-folder format.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ds.add_argument("--out", required=True, help="output folder (resumable: existing images are kept)")
    ds.add_argument("--n", type=int, default=1000, help="number of images")
    ds.add_argument("--size", type=int, default=256, help="image side in pixels")
    ds.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    ds.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    ds.add_argument(
        "--holdout",
        nargs="*",
        default=None,
        metavar="PAIR",
        help="colour-shape pairs never drawn, e.g. 'red star' 'blue ring'",
    )
    ds.add_argument("--no-progress", action="store_true", help="no progress bar")
    ds.set_defaults(func=_cmd_data_shapes)

    ev = sub.add_parser("eval", help="evaluate a model").add_subparsers(dest="eval_command", metavar="BENCHMARK")
    es = ev.add_parser(
        "shapes",
        help="ShapesEval: GenEval's six categories scored by classical image analysis",
        description="Generate images for prompts from a seed disjoint from training and score them (single object, "
        "two objects, counting, colours, position, colour attribution). --self-check scores the generator's own "
        "ground-truth images instead (must be >= 0.98).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    es.add_argument("--model", default=DEFAULT_MODEL, help="preset, Hub repo id or local pipeline folder")
    es.add_argument("--n", type=int, default=600, help="number of prompts")
    es.add_argument("--seed", type=int, default=0, help="prompt seed")
    es.add_argument("--size", type=int, default=256, help="image size")
    es.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    es.add_argument("--guidance", type=float, default=None, help="guidance (default: the model's)")
    es.add_argument("--train-dir", default=None, help="training folder: report prompts with unseen colour-shape pairs")
    es.add_argument("--images", default=None, help="folder to keep the generated images")
    es.add_argument("--json", default=None, help="write the report as JSON")
    add_device_options(es)
    es.add_argument("--self-check", action="store_true", help="score ground-truth images (checks the scorer)")
    es.set_defaults(func=_cmd_eval_shapes)

    from sana.serve.cli import add_serve_command

    add_serve_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors: argparse prints one line and exits 2
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.func(args)
    except SanaError as e:
        print(f"sana {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"sana {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
