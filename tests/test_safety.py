"""The prompt safety check: ShieldGemma-style P(Yes) on a tiny random Gemma-2 causal LM, and the word list."""

import math

import pytest
import torch
from transformers import Gemma2ForCausalLM

from sana.errors import SanaError
from sana.safety import (
    REPLACEMENT_PROMPT,
    TEMPLATE,
    SafetyError,
    SafetyMode,
    ShieldGemma,
    WordList,
    build_checker,
)
from test_text_encoder import _gemma_config, _train_tokenizer


def tiny_tokenizer():
    tokenizer = _train_tokenizer()
    tokenizer.add_tokens(["Yes", "No"])  # ShieldGemma's answer tokens, whole
    return tokenizer


def tiny_lm(vocab_size: int, seed: int = 0) -> Gemma2ForCausalLM:
    torch.manual_seed(seed)
    config = _gemma_config(vocab_size)
    config.tie_word_embeddings = False
    config.final_logit_softcapping = None  # so that a bias on the head gives P(Yes) exactly
    return Gemma2ForCausalLM(config).eval()


def force_p_yes(checker: ShieldGemma, p_yes: float) -> None:
    """Make P(Yes) exactly p_yes for every input: equal Yes/No rows of the LM head, the log-odds as a bias."""
    model = checker.model
    old = model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    yes, no = checker.answer_ids
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.weight[yes] = old.weight[no]
        head.bias.zero_()
        head.bias[yes] = math.log(p_yes / (1 - p_yes))
    model.lm_head = head


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def checker(tokenizer):
    return ShieldGemma(tokenizer, tiny_lm(len(tokenizer)))


def test_score_is_p_yes_at_the_last_position_of_the_policy_prompt(checker, tokenizer):
    prompt = "a red fox in the snow"
    text = TEMPLATE.format(prompt=prompt, policy=checker.policy)
    assert prompt in text and checker.policy in text and text.rstrip().endswith("correctly.")
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        logits = checker.model(**ids).logits[0, -1]
    yes, no = tokenizer.get_vocab()["Yes"], tokenizer.get_vocab()["No"]
    expected = torch.softmax(torch.stack([logits[yes], logits[no]]), 0)[0].item()
    assert checker.score(prompt) == pytest.approx(expected, abs=1e-6)
    assert checker.score("a bowl of ramen") != pytest.approx(expected, abs=1e-6), "the prompt must matter"
    assert 0.0 < expected < 1.0


@pytest.mark.parametrize("p_yes, flagged", [(0.9, True), (0.25, True), (0.15, False), (0.01, False)])
def test_p_yes_above_the_threshold_replaces_the_prompt(checker, p_yes, flagged):
    force_p_yes(checker, p_yes)
    verdict = checker.check("a bowl of ramen")
    assert verdict.score == pytest.approx(p_yes, abs=1e-5)
    assert verdict.flagged is flagged
    assert verdict.prompt == (REPLACEMENT_PROMPT if flagged else "a bowl of ramen")
    assert REPLACEMENT_PROMPT == "A red heart."


def test_threshold_is_configurable_and_checked(tokenizer):
    lenient = ShieldGemma(tokenizer, tiny_lm(len(tokenizer)), threshold=0.95)
    force_p_yes(lenient, 0.9)
    assert not lenient.check("x").flagged
    with pytest.raises(SafetyError, match="threshold"):
        ShieldGemma(tokenizer, tiny_lm(len(tokenizer)), threshold=1.5)


def test_from_pretrained_loads_a_folder(tmp_path, tokenizer, checker):
    tokenizer.save_pretrained(tmp_path)
    checker.model.save_pretrained(tmp_path)
    loaded = ShieldGemma.from_pretrained(tmp_path, device="cpu")
    assert loaded.answer_ids == checker.answer_ids
    assert loaded.score("a red fox") == pytest.approx(checker.score("a red fox"), abs=1e-6)
    via_mode = build_checker("model", model=tmp_path, device="cpu", threshold=0.5)
    assert isinstance(via_mode, ShieldGemma) and via_mode.threshold == 0.5


def test_a_tokenizer_without_yes_no_tokens_is_refused():
    tokenizer = _train_tokenizer()
    assert "Yes" not in tokenizer.get_vocab()
    with pytest.raises(SafetyError, match="'Yes'"):
        ShieldGemma(tokenizer, tiny_lm(len(tokenizer)))


def test_missing_model_is_one_clear_error(tmp_path):
    with pytest.raises(SanaError) as info:
        ShieldGemma.from_pretrained(tmp_path / "no_such_model")
    assert "no_such_model" in str(info.value) and "\n" not in str(info.value)


def test_word_list_matches_whole_words_case_insensitively(tmp_path):
    words = WordList(["knife", "blood bath", "c++"])
    assert words.check("A sharp KNIFE.").flagged
    assert words.check("a Blood Bath at noon").flagged
    assert words.check("learning C++ today").flagged
    for safe in ("two knifes", "penknife", "bloodbath", "blood", "c+", "a cat"):
        verdict = words.check(safe)
        assert not verdict.flagged and verdict.prompt == safe, safe
    flagged = words.check("knife")
    assert flagged.prompt == REPLACEMENT_PROMPT and flagged.score is None

    path = tmp_path / "words.txt"
    path.write_text("# comment\n\nGore\n", encoding="utf-8")
    from_file = build_checker(SafetyMode.WORDS, words=path)
    assert from_file.check("gore").flagged and not from_file.check("# comment").flagged


def test_build_checker_modes(tmp_path):
    assert build_checker("off") is None
    assert isinstance(build_checker("words", words=["x"]), WordList)
    with pytest.raises(SafetyError, match="unknown safety mode"):
        build_checker("maybe")
    with pytest.raises(SafetyError, match="word list"):
        build_checker("words")
    with pytest.raises(SafetyError, match="empty"):
        WordList(["", "  "])
    with pytest.raises(SafetyError, match="cannot read"):
        WordList.from_file(tmp_path / "missing.txt")
