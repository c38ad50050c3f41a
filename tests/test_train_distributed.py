"""Distributed training on the CPU (gloo, 2 processes): DDP and FSDP2 make the updates of one process with the same
global batch (losses, weights, EMA, export, validation images), LoRA under DDP too; kill-and-resume reproduces the
uninterrupted run under both; a 2-process checkpoint resumes under FSDP2 and on one process; SIGTERM on one rank
stops both at the same update; FSDP2 computes in bf16 when asked; only rank 0 writes files; and
`torchrun -m sana train` runs end to end.

The two processes are spawned once for the module and run every scenario in one process group; the tests then
check what they returned and wrote. Comparisons are in fp32 (FSDP2 with param_dtype = "fp32" unless said).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from sana.errors import ConfigError
from sana.train.checkpoint import list_checkpoints, load_checkpoint
from sana.train.config import (
    CheckpointConfig,
    DataConfig,
    DataSource,
    DistributedConfig,
    DType,
    LogBackend,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    Strategy,
    TrainConfig,
    load_config,
)
from sana.train.distributed import setup
from sana.train.loop import StepCallback, train
from sana.weights.load import load_transformer
from train_tiny import TINY_ARCH, save_tiny_autoencoder, save_tiny_text_encoder, tiny_config

WORLD = 2
STEPS = 4
ACCUM = 2  # per process; the one-process reference accumulates WORLD x ACCUM micro-batches of the same size
RTOL = 1e-5

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


class Killed(Exception):
    """Stands for the processes dying after an update: no final save happens."""


def _kill_at(n: int):
    def on_step(step, loss):
        if step == n:
            raise Killed

    return on_step


def _sigterm_at(n: int):
    """SIGTERM to this process after update n (the test sends it to rank 0 only)."""

    def on_step(step, loss):
        if step == n:
            os.kill(os.getpid(), signal.SIGTERM)

    return on_step


ARCH = dataclasses.replace(TINY_ARCH, qk_norm=True)  # FSDP2 then shards each block's kv and k_norm as one unit
VALIDATION = LoggingConfig(
    every_steps=1,
    backend=LogBackend.JSONL,
    progress=False,
    validation_every=2,
    validation_prompts=("a cat", "a red fox in the snow"),
    validation_steps=2,
)


def _config(out: Path, strategy: Strategy, grad_accum: int = ACCUM, **changes) -> TrainConfig:
    """The tiny model on 16 synthetic samples, 2 per micro-batch: an update takes 4 of the 8 batches of an epoch,
    so 4 updates cross an epoch boundary. CAME's eps1 is raised from 1e-30 to 1e-12: with 1e-30 it divides
    gradients that are zero in exact arithmetic (the keys' bias: softmax ignores it) but rounding noise in fp32 by
    their own magnitude, so the two summation orders of one and two processes would move them by +-lr."""
    cfg = tiny_config(
        out,
        model=ModelConfig(arch=ARCH),
        data=DataConfig(source=DataSource.SYNTHETIC, resolution=256, batch_size=2, num_workers=0, synthetic_samples=16),
        optim=OptimConfig(lr=1e-3, eps=(1e-12, 1e-16), grad_clip=1.0, grad_accum=grad_accum, ema_decay=0.9),
        schedule=ScheduleConfig(max_steps=STEPS, warmup_steps=1),
        checkpoint=CheckpointConfig(every_steps=2, keep_last=0),
        logging=LoggingConfig(every_steps=1, backend=LogBackend.JSONL, progress=False),
        distributed=DistributedConfig(strategy=strategy, param_dtype=DType.FP32),
    )
    return dataclasses.replace(cfg, **changes)


def _with_validation(cfg: TrainConfig, encoders: Path) -> TrainConfig:
    """Validation images (EMA weights) every 2 updates, from the tiny DC-AE and text encoder under `encoders`."""
    model = dataclasses.replace(
        cfg.model, autoencoder=str(encoders / "ae.safetensors"), text_encoder=str(encoders / "te"), chi=False
    )
    return dataclasses.replace(cfg, model=model, logging=VALIDATION)


def _lora(cfg: TrainConfig) -> TrainConfig:
    model = dataclasses.replace(cfg.model, lora_rank=2, lora_targets=("attn.qkv", "cross_attn.kv"))
    return dataclasses.replace(cfg, model=model, schedule=ScheduleConfig(max_steps=2, warmup_steps=0))


def _scenarios(root: Path, rank: int) -> dict[str, tuple[TrainConfig, StepCallback | None]]:
    """name -> (config, on_step of this rank); run in this order by every process."""
    runs, encoders = root / "runs", root / "encoders"
    fsdp2 = _with_validation(_config(runs / "fsdp2", Strategy.FSDP2), encoders)
    fsdp2 = dataclasses.replace(fsdp2, model=dataclasses.replace(fsdp2.model, gradient_checkpointing=True))
    from_ddp = CheckpointConfig(every_steps=0, resume=str(runs / "ddp" / "checkpoints" / "step-00000002"))
    bf16 = DistributedConfig(strategy=Strategy.FSDP2, param_dtype=DType.BF16, reduce_dtype=DType.FP32)
    return {
        "ddp": (_with_validation(_config(runs / "ddp", Strategy.DDP), encoders), None),
        "fsdp2": (fsdp2, None),
        "ddp_killed": (_config(runs / "ddp_resume", Strategy.DDP), _kill_at(3)),
        "ddp_resumed": (_config(runs / "ddp_resume", Strategy.DDP), None),
        "fsdp2_killed": (_config(runs / "fsdp2_resume", Strategy.FSDP2), _kill_at(3)),
        "fsdp2_resumed": (_config(runs / "fsdp2_resume", Strategy.FSDP2), None),
        "fsdp2_from_ddp": (_config(runs / "fsdp2_from_ddp", Strategy.FSDP2, checkpoint=from_ddp), None),
        "ddp_lora": (_lora(_config(runs / "ddp_lora", Strategy.DDP)), None),
        "ddp_sigterm": (_config(runs / "ddp_sigterm", Strategy.DDP), _sigterm_at(1) if rank == 0 else None),
        "fsdp2_bf16": (_config(runs / "fsdp2_bf16", Strategy.FSDP2, distributed=bf16), None),
    }


def _write_events(root: str, writes: list):
    """An audit hook that notes every file system change under `root` (files opened for writing, folders made,
    renames, removals) made from Python."""
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    events = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.truncate", "shutil.rmtree", "shutil.move"}

    def under_root(path) -> bool:
        try:
            return os.path.abspath(os.fsdecode(path)).startswith(root)
        except TypeError:  # a file descriptor
            return False

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = any(c in (mode or "") for c in "wax+") or (mode is None and flags & write_flags)
            if writing and under_root(path):
                writes.append((event, os.fsdecode(path)))
        elif event in events:
            targets = args[:2] if event in ("os.rename", "shutil.move") else args[:1]  # renames: source, destination
            writes.extend((event, os.fsdecode(path)) for path in targets if under_root(path))

    return hook


def _worker(rank: int, port: int, root: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    torch.set_num_threads(1)
    runs = str(Path(root) / "runs")
    writes: list = []
    sys.addaudithook(_write_events(runs, writes))
    results = {}
    for name, (cfg, on_step) in _scenarios(Path(root), rank).items():
        try:
            summary = train(cfg, on_step=on_step)
        except Killed:
            summary = {"killed": True}
        results[name] = summary
    results["writes"] = writes
    dist.destroy_process_group()
    (Path(root) / f"rank{rank}.json").write_text(json.dumps(results))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The summaries of every scenario on both ranks, and the one-process reference runs."""
    root = tmp_path_factory.mktemp("distributed")
    save_tiny_autoencoder(root / "encoders" / "ae.safetensors")
    save_tiny_text_encoder(root / "encoders" / "te")
    mp.start_processes(_worker, args=(_free_port(), str(root)), nprocs=WORLD, start_method="spawn")
    results = [json.loads((root / f"rank{r}.json").read_text()) for r in range(WORLD)]
    one = _config(root / "runs" / "one", Strategy.NONE, grad_accum=WORLD * ACCUM)
    from_ddp = CheckpointConfig(every_steps=0, resume=str(root / "runs" / "ddp" / "checkpoints" / "step-00000002"))
    reference = {
        "one": train(_with_validation(one, root / "encoders")),
        "one_lora": train(_lora(dataclasses.replace(one, output_dir=str(root / "runs" / "one_lora")))),
        "one_from_ddp": train(
            dataclasses.replace(one, output_dir=str(root / "runs" / "one_from_ddp"), checkpoint=from_ddp)
        ),
    }
    return root / "runs", results, reference


def _assert_same_weights(a: Path, b: Path, rtol: float = RTOL, atol: float = 1e-6) -> None:
    sa, sb = load_checkpoint(a), load_checkpoint(b)
    assert sa.step == sb.step
    assert sorted(sa.model) == sorted(sb.model) and sorted(sa.ema) == sorted(sb.ema)
    for key in sa.model:
        torch.testing.assert_close(sa.model[key], sb.model[key], rtol=rtol, atol=atol, msg=key)
        torch.testing.assert_close(sa.ema[key], sb.ema[key], rtol=rtol, atol=atol, msg=key)


def _same_images(a: list[str], b: list[str]) -> None:
    assert [Path(p).relative_to(Path(p).parents[2]) for p in a] == [Path(p).relative_to(Path(p).parents[2]) for p in b]
    for x, y in zip(a, b, strict=True):
        with Image.open(x) as ix, Image.open(y) as iy:
            diff = np.abs(np.asarray(ix, dtype=np.int16) - np.asarray(iy, dtype=np.int16))
        assert diff.max() <= 1, (x, diff.max())  # weights equal to ~1e-7: a pixel may round the other way


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_make_the_updates_of_one(runs, strategy):
    root, results, reference = runs
    ours, one = [r[strategy] for r in results], reference["one"]
    assert [s["strategy"] for s in ours] == [strategy, strategy] and [s["rank"] for s in ours] == [0, 1]
    assert ours[0]["step"] == STEPS and len(one["losses"]) == STEPS
    # The logged loss is the mean over both processes: the same on both, and the one process's.
    assert ours[0]["losses"] == ours[1]["losses"]
    assert ours[0]["losses"] == pytest.approx(one["losses"], rel=RTOL)
    assert ours[0]["images_seen"] == one["images_seen"] == STEPS * WORLD * ACCUM * 2
    # The weights and the EMA after the last update (checkpoint of rank 0: full tensors in the usual layout).
    _assert_same_weights(
        root / strategy / "checkpoints" / "step-00000004", root / "one" / "checkpoints" / "step-00000004"
    )
    # The exported EMA weights, and the validation images (EMA weights; rendering must leave training as it was).
    exported, expected = load_transformer(ours[0]["export"]).state_dict(), load_transformer(one["export"]).state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(exported[key], value, rtol=RTOL, atol=1e-6, msg=key)
    assert len(ours[0]["samples"]) == 4 and ours[1]["samples"] == []
    _same_images(ours[0]["samples"], one["samples"])


def test_lora_under_ddp_makes_the_updates_of_one_process(runs):
    root, results, reference = runs
    assert results[0]["ddp_lora"]["losses"] == pytest.approx(reference["one_lora"]["losses"], rel=RTOL)
    a, b = root / "ddp_lora" / "checkpoints" / "step-00000002", root / "one_lora" / "checkpoints" / "step-00000002"
    assert all("parametrizations.weight.0." in key for key in load_checkpoint(a).model)  # the adapters only
    _assert_same_weights(a, b)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_kill_and_resume_reproduces_the_uninterrupted_run(runs, strategy):
    root, results, _ = runs
    for r in results:
        assert r[f"{strategy}_killed"] == {"killed": True}  # died after update 3; the last checkpoint is update 2
        resumed = r[f"{strategy}_resumed"]
        assert resumed["start_step"] == 2 and resumed["resumed_from"].endswith("step-00000002")
        assert resumed["losses"] == pytest.approx(r[strategy]["losses"][2:], rel=1e-6)
    a, b = (
        root / strategy / "checkpoints" / "step-00000004",
        root / f"{strategy}_resume" / "checkpoints" / "step-00000004",
    )
    _assert_same_weights(a, b, rtol=1e-6, atol=1e-7)
    assert load_checkpoint(a).info == load_checkpoint(b).info  # data positions of both ranks, counters


def test_a_ddp_checkpoint_resumes_under_fsdp2_and_on_one_process(runs):
    root, results, reference = runs
    info = load_checkpoint(root / "ddp" / "checkpoints" / "step-00000002").info
    assert info["world_size"] == WORLD and info["data"] == [[0, 4], [0, 4]]  # each rank took 2 x 2 of its 4 batches
    ddp_end = root / "ddp" / "checkpoints" / "step-00000004"
    for cont, name in ((results[0]["fsdp2_from_ddp"], "fsdp2_from_ddp"), (reference["one_from_ddp"], "one_from_ddp")):
        assert cont["start_step"] == 2 and cont["losses"] == pytest.approx(results[0]["ddp"]["losses"][2:], rel=RTOL)
        _assert_same_weights(ddp_end, root / name / "checkpoints" / "step-00000004")


def test_sigterm_on_one_rank_stops_both_at_the_same_update(runs):
    root, results, _ = runs
    for r in results:  # rank 0 got the signal after update 1; rank 1 never did
        stopped = r["ddp_sigterm"]
        assert stopped["stopped_by_signal"] and stopped["step"] == 1 and stopped["export"] is None
    assert [p.name for p in list_checkpoints(root / "ddp_sigterm" / "checkpoints")] == ["step-00000001"]


def test_fsdp2_computes_in_bf16_and_keeps_fp32_weights(runs):
    root, results, _ = runs
    fp32, bf16 = results[0]["fsdp2"]["losses"], results[0]["fsdp2_bf16"]["losses"]
    assert bf16 == pytest.approx(fp32, rel=1e-2) and bf16 != pytest.approx(fp32, rel=1e-5)  # rounded, not fp32
    state = load_checkpoint(root / "fsdp2_bf16" / "checkpoints" / "step-00000004")
    assert {t.dtype for t in state.model.values()} == {t.dtype for t in state.ema.values()} == {torch.float32}


def test_only_rank_0_writes_files(runs):
    root, results, _ = runs
    assert results[1]["writes"] == []  # rank 1 opened nothing for writing, made and moved nothing
    written = {Path(path).name for _, path in results[0]["writes"]}
    assert {"log.jsonl", "config.json", "checkpoints", "final"} <= written  # what the hook sees of rank 0
    for name in ("ddp", "fsdp2"):
        lines = [json.loads(x) for x in (root / name / "log.jsonl").read_text().splitlines()]
        assert [x["step"] for x in lines] == list(range(1, STEPS + 1))  # one line per update, not one per rank
        assert [x["loss"] for x in lines] == pytest.approx(results[0][name]["losses"], rel=1e-12)
        assert [p.name for p in list_checkpoints(root / name / "checkpoints")] == ["step-00000002", "step-00000004"]
        assert (root / name / "final" / "transformer.safetensors").is_file()
        assert results[1][name]["export"] == results[0][name]["export"]


def test_strategy_resolution_and_launch_errors():
    off = DistributedConfig()
    ctx = setup(off, "cpu", env={})
    assert ctx.strategy is Strategy.NONE and ctx.world_size == 1 and ctx.is_main and not ctx.owns_group
    with pytest.raises(ConfigError, match="needs processes started by torchrun"):
        setup(DistributedConfig(strategy=Strategy.FSDP2), "cpu", env={})
    with pytest.raises(ConfigError, match='"none", but 2 processes'):
        setup(DistributedConfig(strategy=Strategy.NONE), "cpu", env={"WORLD_SIZE": "2", "RANK": "1"})
    with pytest.raises(ConfigError, match="cuda:LOCAL_RANK"):
        setup(DistributedConfig(strategy=Strategy.DDP), "cuda:1", env={"WORLD_SIZE": "2", "RANK": "1"})
    with pytest.raises(ConfigError, match="LoRA"):
        _config(Path("x"), Strategy.FSDP2, model=ModelConfig(arch=TINY_ARCH, lora_rank=2))


def test_torchrun_cli_trains_with_ddp(tmp_path):
    """`torchrun --standalone --nproc-per-node 2 -m sana train` (the environment path of `setup`), against one process
    with the same global batch."""
    config = Path(__file__).parent.parent / "configs" / "train" / "tiny.toml"
    sets = ["schedule.max_steps=2", "schedule.warmup_steps=1", "checkpoint.every_steps=0", "logging.every_steps=1"]
    sets += ["logging.progress=false", "data.batch_size=2", "optim.eps=[1e-12, 1e-16]"]
    args = [f"--set={s}" for s in sets]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent.parent / "src")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD)]
    command += ["-m", "sana", "train", str(config), f"--set=output_dir={tmp_path / 'ddp'}", *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("trained to step 2") == 1  # rank 0 reports, the others stay quiet
    logged = [json.loads(x)["loss"] for x in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    one = [f"output_dir={tmp_path / 'one'}", *sets, f"optim.grad_accum={WORLD}", "distributed.strategy=none"]
    assert logged == pytest.approx(train(load_config(config, one))["losses"], rel=RTOL)
