"""`task = "text_encoder"`: a small Gemma-2 decoder and its tokenizer, trained as a causal LM on the captions.

    1. the tokenizer: byte-level BPE (the `tokenizers` library) trained on every caption of the image folder and on
       the Complex Human Instruction, with Gemma's special tokens and ids (<pad> 0, <eos> 1, <bos> 2, <unk> 3) and
       BOS prepended, wrapped as a transformers PreTrainedTokenizerFast;
    2. the model: transformers' Gemma2ForCausalLM from [model.text_arch], next-token cross-entropy on sequences
       "<bos> caption <eos>", a fraction `data.chi_probability` of them prefixed with the CHI exactly as
       `TextEncoder` prefixes prompts (so the decoder sees at training what it will encode);
    3. the export: OUTPUT_DIR/final/tokenizer/ and OUTPUT_DIR/final/text_encoder/ (the Gemma2Model decoder), the
       layout `TextEncoder.from_pretrained` and a diffusers pipeline folder use.

The tokenizer is trained once, before the first step, and saved in OUTPUT_DIR/tokenizer/ (a resumed run reads it).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sana.errors import ConfigError
from sana.models.text_encoder import DEFAULT_CHI, preprocess_prompt
from sana.train.config import TextArchConfig, TrainConfig
from sana.train.data import DataError, scan_folder
from sana.train.fit import StepData, fit, step_rng
from sana.train.model import resolve_device

log = logging.getLogger("sana.train")

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")  # ids 0..3, as Gemma's
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2
_STREAM = 0x746578  # "tex": the captions drawn for each step


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer of `vocab_size` tokens trained on `texts`, as a PreTrainedTokenizerFast that
    prepends <bos> (like Gemma's) and pads with <pad> (id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS_ID)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="right",
    )


def gemma_config(arch: TextArchConfig, vocab_size: int):
    """transformers' Gemma2Config for `arch` (Gemma-2's soft-capping and alternating sliding window kept)."""
    from transformers import Gemma2Config

    return Gemma2Config(
        vocab_size=vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_kv_heads,
        head_dim=arch.head_dim,
        max_position_embeddings=arch.max_position_embeddings,
        sliding_window=min(4096, arch.max_position_embeddings),
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=BOS_ID,
        tie_word_embeddings=True,
        attn_implementation="eager",
    )


def caption_corpus(path: str | Path) -> list[str]:
    """Every caption of the image folder at `path`, preprocessed as TextEncoder preprocesses prompts, unique."""
    records, report = scan_folder(path)
    if report.skipped:
        log.warning("skipped %d file(s) of %s: %s", report.skipped, path, report.describe())
    texts = {preprocess_prompt(c) for r in records for c in r.captions.values()}
    if not texts:
        raise DataError(f"{path}: no captions found")
    return sorted(texts)


class CaptionBatches:
    """Micro-batch (step, k) = token ids (B, T) and labels (B, T) (-100 on padding) of captions drawn uniformly
    from the corpus by step_rng(seed, step, k); with probability chi_probability a caption is prefixed with the
    CHI as TextEncoder does it ("\\n".join(CHI) + caption, no separator)."""

    def __init__(self, corpus: list[str], tokenizer, batch_size: int, length: int, chi_probability: float, seed: int):
        self.corpus, self.tokenizer = corpus, tokenizer
        self.batch_size, self.length, self.chi_probability, self.seed = batch_size, length, chi_probability, seed
        self.chi = "\n".join(DEFAULT_CHI)

    def __call__(self, step: int, k: int) -> dict[str, torch.Tensor]:
        rng = step_rng(self.seed, step, k, _STREAM)
        picks = rng.integers(len(self.corpus), size=self.batch_size)
        with_chi = rng.random(self.batch_size) < self.chi_probability
        texts = [(self.chi if c else "") + self.corpus[i] for i, c in zip(picks, with_chi, strict=True)]
        ids = [self.tokenizer(t).input_ids[-(self.length - 1) :] + [EOS_ID] for t in texts]  # keep the caption end
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), PAD_ID, dtype=torch.long)
        labels = torch.full((len(ids), width), -100, dtype=torch.long)
        for row, x in enumerate(ids):
            input_ids[row, : len(x)] = torch.tensor(x)
            labels[row, : len(x)] = torch.tensor(x)
        return {"input_ids": input_ids, "labels": labels}


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the real tokens."""
    device = next(model.parameters()).device
    ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
    logits = model(input_ids=ids, attention_mask=(labels != -100).long(), use_cache=False).logits.float()
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def train_text_encoder(cfg: TrainConfig) -> dict[str, Any]:
    """Train the tokenizer (once) and the Gemma-2 decoder as `cfg` says; export to OUTPUT_DIR/final."""
    from transformers import Gemma2ForCausalLM, PreTrainedTokenizerFast

    arch = cfg.model.text_arch
    if arch is None:
        raise ConfigError('task "text_encoder" needs a [model.text_arch] table')
    device = resolve_device(cfg.device)
    out = Path(cfg.output_dir)
    corpus = caption_corpus(cfg.data.path)
    tok_dir = out / "tokenizer"
    if (tok_dir / "tokenizer.json").is_file():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    else:
        log.info("training a %d-token BPE tokenizer on %d captions", arch.vocab_size, len(corpus))
        tokenizer = train_tokenizer(corpus + ["\n".join(DEFAULT_CHI)] * 8, arch.vocab_size)
        tmp = out / "tokenizer.tmp"
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(tok_dir, ignore_errors=True)  # an incomplete one (no tokenizer.json)
        tmp.replace(tok_dir)
    torch.manual_seed(cfg.seed)
    model = Gemma2ForCausalLM(gemma_config(arch, len(tokenizer))).to(device)
    data = StepData(
        CaptionBatches(
            corpus, tokenizer, cfg.data.batch_size, cfg.data.text_length, cfg.data.chi_probability, cfg.seed
        ),
        cfg.optim.grad_accum,
    )

    def export(trained: nn.Module, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(folder / "tokenizer")
        trained.get_decoder().save_pretrained(folder / "text_encoder", safe_serialization=True)
        return folder

    summary = fit(cfg, model, data, lm_loss, export, device, lambda b: int(b["input_ids"].shape[0]))
    summary["captions"] = len(corpus)
    summary["parameters"] = sum(p.numel() for p in model.get_decoder().parameters())
    return summary
