"""Prompt safety check before generation (reference section 8.2): a ShieldGemma-style classifier or a word list.

The classifier wraps the user prompt in ShieldGemma's policy prompt, runs a causal LM once and reads the logits of
the tokens "Yes" and "No" at the last position; P(Yes) = softmax([logit_Yes, logit_No])[0] is the probability that
the prompt violates the policy. A prompt with P(Yes) > threshold (0.2, as the reference demo) is unsafe and is
replaced by the literal text "A red heart." (`REPLACEMENT_PROMPT`), which is then generated instead.

The word list flags a prompt that contains any listed word or phrase as a whole word, case-insensitively
("knife" flags "A KNIFE." but not "knifes"). Both checkers return a `Verdict`: the prompt to generate, whether it
was flagged and the score (P(Yes) for the model, None for words).
"""

from __future__ import annotations

import dataclasses
import enum
import re
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import torch

from sana.errors import SanaError

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_POLICY",
    "DEFAULT_THRESHOLD",
    "REPLACEMENT_PROMPT",
    "SafetyChecker",
    "SafetyError",
    "SafetyMode",
    "ShieldGemma",
    "Verdict",
    "WordList",
    "build_checker",
]

REPLACEMENT_PROMPT = "A red heart."
DEFAULT_MODEL = "google/shieldgemma-2b"
DEFAULT_THRESHOLD = 0.2
DEFAULT_POLICY = (
    "The prompt must not seek to generate harmful, abusive, hateful, sexually explicit, or otherwise "
    "inappropriate content targeting individuals or protected groups."
)
# ShieldGemma's prompt-only classification template (its model card): the question, the policy, then the
# instruction to answer "Yes" or "No" first; the answer token's logits are read at the last position.
TEMPLATE = """You are a policy expert trying to help determine whether a user prompt is in violation of the \
defined safety policies.

<start_of_turn>
Human Question: {prompt}
<end_of_turn>

Our safety principle is defined in the below:

* {policy}

Does the human question violate the above principle? Your answer must start with 'Yes' or 'No'. And then walk \
through step by step to be sure we answer correctly.
"""
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "tokenizer*"]


class SafetyError(SanaError):
    """The safety checker cannot be built: the message names the model, file or option."""


class SafetyMode(enum.Enum):
    OFF = "off"
    MODEL = "model"  # a ShieldGemma-style causal LM
    WORDS = "words"  # a custom word list


@dataclasses.dataclass(frozen=True)
class Verdict:
    prompt: str  # what to generate: the user's prompt, or REPLACEMENT_PROMPT when flagged
    flagged: bool
    score: float | None = None  # P(Yes) of the classifier; None for the word list


class SafetyChecker(Protocol):
    def check(self, prompt: str) -> Verdict: ...


def _verdict(prompt: str, flagged: bool, score: float | None = None) -> Verdict:
    return Verdict(REPLACEMENT_PROMPT if flagged else prompt, flagged, score)


class ShieldGemma:
    """P(Yes) of a causal LM asked whether `prompt` violates `policy`; unsafe when P(Yes) > threshold."""

    def __init__(self, tokenizer, model, threshold: float = DEFAULT_THRESHOLD, policy: str = DEFAULT_POLICY):
        if not 0.0 <= threshold <= 1.0:
            raise SafetyError(f"the safety threshold must be in [0, 1], got {threshold}")
        vocab = tokenizer.get_vocab()
        missing = [t for t in ("Yes", "No") if t not in vocab]
        if missing:
            raise SafetyError(
                f"the safety model's tokenizer has no {' / '.join(repr(t) for t in missing)} token: it is not a "
                "ShieldGemma-style classifier"
            )
        self.tokenizer, self.model = tokenizer, model.eval()
        self.threshold, self.policy = threshold, policy
        self.answer_ids = [vocab["Yes"], vocab["No"]]
        self._lock = threading.Lock()  # one forward at a time: the server calls check() from several threads

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path = DEFAULT_MODEL,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        threshold: float = DEFAULT_THRESHOLD,
        policy: str = DEFAULT_POLICY,
        revision: str | None = None,
    ) -> ShieldGemma:
        """Load a tokenizer and causal LM (transformers Auto classes) from a folder or a Hub repo id."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from sana import hub

        folder = hub.resolve(str(name_or_path), revision=revision, allow_patterns=_HUB_PATTERNS)
        device = (
            torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
        dtype = dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        except (OSError, ValueError, KeyError) as e:
            raise SafetyError(f"cannot load the safety model from {folder}: {e}") from e
        return cls(tokenizer, model.to(device), threshold=threshold, policy=policy)

    def score(self, prompt: str) -> float:
        """P(Yes): softmax over the "Yes" and "No" logits at the last position of the policy prompt."""
        text = TEMPLATE.format(prompt=prompt.strip(), policy=self.policy.strip())
        device = next(self.model.parameters()).device
        inputs = self.tokenizer(text, return_tensors="pt").to(device)
        with self._lock, torch.no_grad():
            logits = self.model(**inputs).logits  # (1, L, V)
        pair = logits[0, -1, self.answer_ids].float()  # (2,) [Yes, No]
        return float(pair.softmax(dim=0)[0])

    def check(self, prompt: str) -> Verdict:
        p_yes = self.score(prompt)
        return _verdict(prompt, p_yes > self.threshold, p_yes)


class WordList:
    """Flags a prompt holding any of `words` (words or phrases) as a whole word, case-insensitively."""

    def __init__(self, words: Iterable[str]):
        self.words = tuple(sorted({w.strip() for w in words if w.strip()}, key=lambda w: (-len(w), w.lower())))
        if not self.words:
            raise SafetyError("the safety word list is empty")
        alternatives = "|".join(re.escape(w) for w in self.words)
        # Whole word: not preceded or followed by a word character (\b fails around words like "c++").
        self._pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)

    @classmethod
    def from_file(cls, path: str | Path) -> WordList:
        """One word or phrase a line; blank lines and lines starting with # are skipped."""
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise SafetyError(f"cannot read the safety word list {path}: {e}") from e
        return cls(line for line in lines if not line.lstrip().startswith("#"))

    def check(self, prompt: str) -> Verdict:
        return _verdict(prompt, self._pattern.search(prompt) is not None)


def build_checker(
    mode: SafetyMode | str,
    *,
    model: str | Path = DEFAULT_MODEL,
    words: Iterable[str] | str | Path | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> SafetyChecker | None:
    """The checker for `mode`: None for off, ShieldGemma for model, WordList for words (a list or a file path)."""
    try:
        mode = SafetyMode(mode)
    except ValueError:
        raise SafetyError(f"unknown safety mode {mode!r}; expected one of {[m.value for m in SafetyMode]}") from None
    if mode is SafetyMode.OFF:
        return None
    if mode is SafetyMode.MODEL:
        return ShieldGemma.from_pretrained(model, device=device, dtype=dtype, threshold=threshold)
    if mode is SafetyMode.WORDS:
        if words is None:
            raise SafetyError("safety mode 'words' needs a word list (a file with one word or phrase a line)")
        return WordList.from_file(words) if isinstance(words, str | Path) else WordList(words)
    raise ValueError(f"unhandled safety mode {mode}")
