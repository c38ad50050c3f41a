"""Gemma-2 text encoder with Sana's complex human instruction (CHI) and token selection.

Follows diffusers 0.42.1 `SanaPipeline.encode_prompt` / `_get_gemma_prompt_embeds` (reference: sana.md
section 3, diffusers-sana.md section 3.1). The decoder itself is transformers' `Gemma2Model`; this file only
prepares the text, selects the tokens and caches the results.

Differences from the original NVlabs code, where we follow diffusers:
- the first CHI line quotes 'Enhanced prompt' with single quotes (NVlabs' yaml: double quotes), which changes
  the tokens, so embeddings of the two differ slightly;
- prompts are lowercased and stripped before encoding (diffusers' `clean_caption=False` path);
- the negative / null branch comes with its own mask (`encode_negative`); NVlabs attends it with the positive
  prompt's mask. Which mask the sampler uses is the pipeline's choice, not this file's.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from sana.errors import ConfigError, SanaError

# The default complex human instruction, byte for byte as diffusers 0.42.1 `SanaPipeline.__call__`'s default
# (joined with "\n"; the last line ends with a space and the prompt follows it with no separator).
DEFAULT_CHI: tuple[str, ...] = (
    (
        "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions "
        "suitable for image generation. Evaluate the level of detail in the user prompt:"
    ),
    (
        "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and "
        "spatial relationships to create vivid and concrete scenes."
    ),
    ("- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating."),
    "Here are examples of how to transform or refine prompts:",
    (
        "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, "
        "sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers."
    ),
    (
        "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring "
        "glowing street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus "
        "passing by towering glass skyscrapers."
    ),
    (
        "Please generate only the enhanced description for the prompt below and avoid including any "
        "additional commentary or evaluations:"
    ),
    "User Prompt: ",
)

DEFAULT_MAX_LENGTH = 300
DEFAULT_CACHE_SIZE = 64
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")

# Cache key: (preprocessed prompt, joined CHI or None). A negative prompt is a prompt without CHI: with no
# CHI the positive path tokenizes to max_length and its selection is the identity, so both share entries.
_CacheKey = tuple[str, str | None]


def preprocess_prompt(prompt: str) -> str:
    """diffusers' `_text_preprocessing` with `clean_caption=False`: lowercase, then strip."""
    return prompt.lower().strip()


class TextEncoder:
    """Prompts -> (embeds (B, L, D), mask (B, L)) with L = max_length, through a Gemma-2 decoder.

    `tokenizer` is a transformers tokenizer that prepends BOS (Gemma's does); `model` is a decoder such as
    `Gemma2Model` whose output has `last_hidden_state` (B, N, D). Outputs are in the model's dtype, on its
    device. Encodings of single prompts are kept in a bounded LRU cache; call `clear_cache()` after changing
    the model's weights in place. The constructor puts the model in eval mode and sets the tokenizer's
    padding side to "right" (as diffusers does).
    """

    def __init__(
        self,
        tokenizer,
        model: nn.Module,
        *,
        max_length: int = DEFAULT_MAX_LENGTH,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        if max_length < 2:
            raise ConfigError(f"max_length must be at least 2 (BOS + one token), got {max_length}")
        if cache_size < 0:
            raise ConfigError(f"cache_size must be >= 0 (0 turns the cache off), got {cache_size}")
        if getattr(tokenizer, "pad_token_id", None) is None:
            raise ConfigError("the tokenizer has no pad token; Sana pads every prompt to max_length")
        # Sana keeps BOS + the last (max_length - 1) positions: padding must be on the right.
        tokenizer.padding_side = "right"
        self.tokenizer = tokenizer
        self.model = model.eval()
        self.max_length = max_length
        self.cache_size = cache_size
        self._cache: OrderedDict[_CacheKey, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._n_chi_tokens: dict[str, int] = {}

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str | os.PathLike,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        subfolder_tokenizer: str = "tokenizer",
        subfolder_model: str = "text_encoder",
        *,
        max_length: int = DEFAULT_MAX_LENGTH,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> TextEncoder:
        """Load a tokenizer and a Gemma-2 decoder with transformers' AutoTokenizer / AutoModel.

        `path_or_repo` is a local folder or a Hugging Face repo id, either in the diffusers pipeline layout
        (tokenizer/ and text_encoder/ subfolders) or a plain model folder (a local folder without the
        subfolders is read from its root). A causal-LM checkpoint (Gemma2ForCausalLM) loads as its decoder.
        dtype None keeps the checkpoint's dtype.
        """
        from transformers import AutoModel, AutoTokenizer

        source = str(path_or_repo)
        local = Path(source).expanduser()
        if local.is_dir():
            source = str(local)
            sub_tok = subfolder_tokenizer if (local / subfolder_tokenizer).is_dir() else ""
            sub_model = subfolder_model if (local / subfolder_model).is_dir() else ""
            if not any((local / sub_tok / name).is_file() for name in _TOKENIZER_FILES):
                raise SanaError(
                    f"no tokenizer in {local / sub_tok} (none of {', '.join(_TOKENIZER_FILES)}). Pass a "
                    f"folder in the diffusers layout ({subfolder_tokenizer}/ and {subfolder_model}/ inside "
                    "it) or a Gemma-2 model folder."
                )
            if not (local / sub_model / "config.json").is_file():
                raise SanaError(
                    f"no text encoder in {local / sub_model} (config.json missing). Pass a folder in "
                    f"the diffusers layout ({subfolder_tokenizer}/ and {subfolder_model}/ inside it) or a "
                    "Gemma-2 model folder."
                )
        elif _looks_like_path(source):
            raise SanaError(
                f"text encoder folder not found: {source!r}. Pass a folder in the diffusers layout "
                f"({subfolder_tokenizer}/ and {subfolder_model}/ inside it), a Gemma-2 model folder, or a "
                "Hugging Face repo id."
            )
        else:
            sub_tok, sub_model = subfolder_tokenizer, subfolder_model

        def where(sub: str) -> str:
            return f"{source!r}" + (f" (subfolder {sub!r})" if sub else "")

        hint = (
            "Check the path, or download the model first (e.g. `hf download <repo> --local-dir <folder>`) "
            "and pass the local folder; offline, a repo id only works if it is in the Hugging Face cache. "
            "For a plain Gemma repo without subfolders pass subfolder_tokenizer='' and subfolder_model=''."
        )
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, subfolder=sub_tok)
        except (OSError, ValueError, KeyError) as e:
            raise SanaError(f"cannot load the tokenizer from {where(sub_tok)}: {e}. {hint}") from e
        try:
            model = AutoModel.from_pretrained(source, subfolder=sub_model, dtype=dtype if dtype is not None else "auto")
        except (OSError, ValueError, KeyError) as e:
            raise SanaError(f"cannot load the text encoder from {where(sub_model)}: {e}. {hint}") from e
        if hasattr(model, "lm_head"):
            # NVlabs loads AutoModelForCausalLM and keeps `.get_decoder()` (Gemma2Model, no LM head).
            model = model.get_decoder()
        if device is not None:
            model = model.to(device)
        return cls(tokenizer, model, max_length=max_length, cache_size=cache_size)

    # ----------------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def hidden_size(self) -> int:
        """D, the width of the embeddings (2304 for Gemma-2-2B)."""
        return int(self.model.config.hidden_size)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextEncoder:
        """Move / cast the model in place and drop the cache (its tensors live on the old device/dtype)."""
        self.model.to(device=device, dtype=dtype)
        self.clear_cache()
        return self

    def clear_cache(self) -> None:
        self._cache.clear()

    # ----------------------------------------------------------------------------------------------------
    def encode(
        self, prompts: str | Sequence[str], chi: Sequence[str] | None = DEFAULT_CHI
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Positive prompts -> (embeds (B, L, D), mask (B, L) int64), as diffusers' `encode_prompt` does.

        With a CHI: text = chi + prompt, tokenized to n_chi + L - 2 tokens and kept at BOS + the last L - 1
        positions (Sana paper section 3.1). With chi None or empty: the prompt alone, L tokens.
        """
        chi_text = _join_chi(chi)
        return self._encode_batch(_as_prompt_list(prompts), chi_text)

    def encode_negative(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Negative prompts -> (embeds (B, L, D), mask (B, L)): no CHI, L tokens, no selection.

        `encode_negative([""])` is the classifier-free-guidance null embedding: BOS then L - 1 pads, mask
        [1, 0, ..., 0].
        """
        return self._encode_batch(_as_prompt_list(prompts), None)

    def null_embedding(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The CFG null embedding: `encode_negative([""])`, (1, L, D) and (1, L)."""
        return self.encode_negative([""])

    # ----------------------------------------------------------------------------------------------------
    def _encode_batch(self, prompts: list[str], chi_text: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [preprocess_prompt(p) for p in prompts]
        keys = [(t, chi_text) for t in texts]
        found: dict[_CacheKey, tuple[torch.Tensor, torch.Tensor]] = {}
        for key in keys:
            if key in self._cache:
                self._cache.move_to_end(key)
                found[key] = self._cache[key]
        missing = list(dict.fromkeys(k for k in keys if k not in found))  # unique, in order
        if missing:
            embeds, mask = self._run([t for t, _ in missing], chi_text)
            for i, key in enumerate(missing):
                # Clone so that a cached row does not keep the whole batch's storage alive.
                found[key] = (embeds[i].clone(), mask[i].clone())
                self._remember(key, found[key])
        embeds = torch.stack([found[k][0] for k in keys])  # (B, L, D)
        mask = torch.stack([found[k][1] for k in keys])  # (B, L)
        return embeds, mask

    def _remember(self, key: _CacheKey, value: tuple[torch.Tensor, torch.Tensor]) -> None:
        if self.cache_size == 0:
            return
        self._cache[key] = value
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _n_chi(self, chi_text: str) -> int:
        """Number of tokens of the CHI alone, BOS included (diffusers: len(tokenizer.encode(chi)))."""
        if chi_text not in self._n_chi_tokens:
            self._n_chi_tokens[chi_text] = len(self.tokenizer.encode(chi_text))
        return self._n_chi_tokens[chi_text]

    # No grad rather than inference_mode: inference tensors cannot be saved for backward, and training
    # feeds these embeddings into a transformer that needs gradients.
    @torch.no_grad()
    def _run(self, texts: list[str], chi_text: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Preprocessed texts -> (embeds (B, L, D), mask (B, L)), the uncached path."""
        L = self.max_length
        if chi_text is None:
            n_all = L
        else:
            texts = [chi_text + t for t in texts]  # no separator: the CHI ends with "User Prompt: "
            # "- 2": the BOS and the CHI's trailing-space token, which merges into the prompt's first word.
            n_all = self._n_chi(chi_text) + L - 2
        tokens = self.tokenizer(
            texts,
            padding="max_length",
            max_length=n_all,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        device = self.device
        ids = tokens.input_ids.to(device)  # (B, N), N = n_all
        mask = tokens.attention_mask.to(device)  # (B, N) int64, 1 = real token
        out = self.model(input_ids=ids, attention_mask=mask, use_cache=False)
        embeds = out.last_hidden_state.to(self.dtype)  # (B, N, D)
        if chi_text is not None:
            # BOS + the last L - 1 positions: the prompt's tokens (and right padding), attended to the CHI.
            select = torch.tensor([0, *range(-L + 1, 0)], device=device)
            embeds, mask = embeds[:, select], mask[:, select]  # (B, L, D), (B, L)
        return embeds, mask


def _join_chi(chi: Sequence[str] | None) -> str | None:
    """The CHI lines joined with "\\n", or None for no CHI (None or empty, as diffusers' `not chi`)."""
    if chi is None:
        return None
    if isinstance(chi, str):
        raise TypeError("chi must be a sequence of lines (e.g. DEFAULT_CHI), not a single string")
    if len(chi) == 0:
        return None
    if not all(isinstance(line, str) for line in chi):
        raise TypeError(f"chi must be a sequence of str, got {[type(line).__name__ for line in chi]}")
    return "\n".join(chi)


def _as_prompt_list(prompts: str | Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given: pass a non-empty list of strings")
    bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompts must be strings, got {bad}")
    return prompts


def _looks_like_path(source: str) -> bool:
    """True when `source` cannot be a Hugging Face repo id ("name" or "owner/name") and so names a folder."""
    if source.startswith((".", "/", "~")) or "\\" in source or ":" in source:
        return True
    return source.count("/") > 1
