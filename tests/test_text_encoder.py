"""TextEncoder against diffusers 0.42.1 SanaPipeline.encode_prompt, on a tiny random Gemma-2 and a tokenizer
trained here (no Hub access).

The tokenizer mimics Gemma's in what Sana relies on: pad 0, eos 1, bos 2, BOS prepended by the post-processor,
and a space attached to the following word, so the CHI's trailing space is its own token when the CHI is
encoded alone and merges into the prompt's first word when the prompt follows (the "- 2" in max_length_all).
It is byte-level, so Chinese, accents and emoji tokenize without unknown tokens.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma2Model, PreTrainedTokenizerFast

from sana.errors import ConfigError, SanaError
from sana.models.text_encoder import DEFAULT_CHI, TextEncoder

PAD, EOS, BOS = 0, 1, 2

PROMPTS = {
    "short": "A cat sleeping",
    "medium": "  A Busy City STREET at dusk, glowing street lamps and a double-decker bus  ",
    "long": " ".join(["a small fluffy white cat curled up on a warm sunny windowsill"] * 40),  # > 300 tokens
    "chinese": "一只猫在窗台上睡觉，阳光温暖",
    "accents": "Café crème brûlée à la française, Ærøskøbing",
    "emoji": "🐱🚀 a rocket cat over a 🌈 rainbow",
}


def _train_tokenizer() -> PreTrainedTokenizerFast:
    corpus = list(DEFAULT_CHI) * 4 + list(PROMPTS.values()) + ["a red fox in the snow", "a bowl of ramen"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],  # ids 0..3, as in Gemma
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", BOS)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def _gemma_config(vocab_size: int) -> Gemma2Config:
    return Gemma2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=1024,
        sliding_window=128,  # smaller than the CHI sequence, so the sliding layer's masking matters
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=BOS,
        attn_implementation="eager",
    )


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return _train_tokenizer()


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory, tokenizer):
    """A diffusers-layout folder with tokenizer/ and text_encoder/ (fp32 random weights)."""
    torch.manual_seed(0)
    model = Gemma2Model(_gemma_config(len(tokenizer))).eval()
    root = tmp_path_factory.mktemp("sana_pipeline")
    tokenizer.save_pretrained(root / "tokenizer")
    model.save_pretrained(root / "text_encoder")
    return root


@pytest.fixture(scope="module")
def encoder(pipeline_dir) -> TextEncoder:
    return TextEncoder.from_pretrained(pipeline_dir)


@pytest.fixture(scope="module")
def reference(encoder):
    """diffusers' SanaPipeline around the same tokenizer and model (transformer, vae, scheduler unused)."""
    from diffusers import SanaPipeline

    return SanaPipeline(
        tokenizer=encoder.tokenizer, text_encoder=encoder.model, vae=None, transformer=None, scheduler=None
    )


def _reference_encode(pipe, prompts, negative, chi):
    """(pos, pos_mask, neg, neg_mask) from diffusers, with CFG on so the negative branch runs too."""
    with torch.no_grad():
        return pipe.encode_prompt(
            prompts,
            do_classifier_free_guidance=True,
            negative_prompt=negative,
            device=torch.device("cpu"),
            complex_human_instruction=None if chi is None else list(chi),
        )


def _assert_same(ours, theirs):
    embeds, mask = ours
    ref_embeds, ref_mask = theirs
    assert embeds.shape == ref_embeds.shape and embeds.dtype == ref_embeds.dtype
    assert mask.dtype == ref_mask.dtype
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(embeds, ref_embeds, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------
def test_default_chi_matches_diffusers():
    from diffusers import SanaPipeline

    default = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
    assert DEFAULT_CHI == tuple(default)
    assert DEFAULT_CHI[-1] == "User Prompt: "


def test_tokenizer_mimics_gemma(encoder):
    tok = encoder.tokenizer
    assert tok.padding_side == "right"
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (PAD, EOS, BOS)
    chi = "\n".join(DEFAULT_CHI)
    ids_chi = tok.encode(chi)
    ids_all = tok.encode(chi + "a cat")
    assert ids_chi[0] == BOS and ids_all[0] == BOS
    # The CHI's trailing space merges into the prompt's first word, as with Gemma's SentencePiece.
    assert ids_all[: len(ids_chi) - 1] == ids_chi[:-1] and ids_all[len(ids_chi) - 1] != ids_chi[-1]
    for text in (PROMPTS["chinese"], PROMPTS["emoji"], PROMPTS["accents"]):
        assert tok.unk_token_id not in tok.encode(text)
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == text


@pytest.mark.parametrize("chi", [DEFAULT_CHI, None], ids=["chi", "no_chi"])
def test_parity_with_diffusers(encoder, reference, chi):
    prompts = list(PROMPTS.values())
    negatives = ["", "blurry, low quality", "", "模糊", "", "😞 ugly"]
    encoder.clear_cache()
    pos, pos_mask, neg, neg_mask = _reference_encode(reference, prompts, negatives, chi)
    _assert_same(encoder.encode(prompts, chi=chi), (pos, pos_mask))
    _assert_same(encoder.encode_negative(negatives), (neg, neg_mask))
    assert pos.shape == (len(prompts), 300, 32)
    # The long prompt is truncated: every kept position is a real token. Short ones end in padding.
    long_row = list(PROMPTS).index("long")
    assert bool(pos_mask[long_row].all())
    assert int(pos_mask[0].sum()) < 20


@pytest.mark.parametrize("prompt", list(PROMPTS.values()), ids=list(PROMPTS))
def test_parity_single_prompt_with_chi(encoder, reference, prompt):
    encoder.clear_cache()
    pos, pos_mask, _, _ = _reference_encode(reference, [prompt], "", DEFAULT_CHI)
    _assert_same(encoder.encode([prompt]), (pos, pos_mask))


def test_null_embedding(encoder, reference):
    _, _, neg, neg_mask = _reference_encode(reference, ["a cat"], "", DEFAULT_CHI)
    embeds, mask = encoder.null_embedding()
    _assert_same((embeds, mask), (neg, neg_mask))
    assert mask.tolist() == [[1] + [0] * 299]
    # Without CHI, the positive path is the negative path.
    _assert_same(encoder.encode([""], chi=None), (neg, neg_mask))


def test_chi_with_empty_prompt(encoder, reference):
    encoder.clear_cache()
    pos, pos_mask, _, _ = _reference_encode(reference, [""], "", DEFAULT_CHI)
    _assert_same(encoder.encode([""]), (pos, pos_mask))
    assert pos_mask.tolist() == [[1, 1] + [0] * 298]  # BOS + the CHI's trailing-space token


def test_custom_max_length(pipeline_dir, reference):
    enc = TextEncoder.from_pretrained(pipeline_dir, max_length=40)
    prompts = [PROMPTS["short"], PROMPTS["long"]]
    with torch.no_grad():
        pos, pos_mask, neg, neg_mask = reference.encode_prompt(
            prompts,
            negative_prompt="",
            device=torch.device("cpu"),
            max_sequence_length=40,
            complex_human_instruction=list(DEFAULT_CHI),
        )
    _assert_same(enc.encode(prompts), (pos, pos_mask))
    _assert_same(enc.encode_negative(["", ""]), (neg, neg_mask))
    assert pos.shape == (2, 40, 32)


def test_bf16_outputs_in_model_dtype(pipeline_dir):
    from diffusers import SanaPipeline

    enc = TextEncoder.from_pretrained(pipeline_dir, dtype=torch.bfloat16, device="cpu")
    assert enc.dtype == torch.bfloat16 and enc.device == torch.device("cpu")
    pipe = SanaPipeline(tokenizer=enc.tokenizer, text_encoder=enc.model, vae=None, transformer=None, scheduler=None)
    prompts = [PROMPTS["short"], PROMPTS["emoji"]]
    pos, pos_mask, neg, neg_mask = _reference_encode(pipe, prompts, "", DEFAULT_CHI)
    embeds, mask = enc.encode(prompts)
    assert embeds.dtype == torch.bfloat16 and mask.dtype == torch.int64
    _assert_same((embeds, mask), (pos, pos_mask))
    _assert_same(enc.encode_negative(["", ""]), (neg, neg_mask))


# ------------------------------------------------------------------------------------------------------------
class _CallCounter:
    def __init__(self, model: torch.nn.Module):
        self.batch_sizes: list[int] = []
        self._handle = model.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.batch_sizes.append(int(output.last_hidden_state.shape[0]))

    def remove(self):
        self._handle.remove()


def test_cache_hits_and_mixed_batches(pipeline_dir):
    enc = TextEncoder.from_pretrained(pipeline_dir)
    fresh = TextEncoder.from_pretrained(pipeline_dir, cache_size=0)
    counter = _CallCounter(enc.model)
    try:
        first = enc.encode([PROMPTS["short"]])
        again = enc.encode([PROMPTS["short"]])
        assert counter.batch_sizes == [1]
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
        # Same text after lowercase + strip: a hit too.
        enc.encode(["  a CAT sleeping "])
        assert counter.batch_sizes == [1]
        # A mix of cached and new prompts, with a duplicate: only the two new ones run, in one batch.
        mixed = [PROMPTS["chinese"], PROMPTS["short"], PROMPTS["emoji"], PROMPTS["chinese"]]
        out = enc.encode(mixed)
        assert counter.batch_sizes == [1, 2]
        _assert_same(out, fresh.encode(mixed))
        # Positive (CHI) and negative encodings of one text are different entries.
        neg = enc.encode_negative([PROMPTS["short"]])
        assert counter.batch_sizes == [1, 2, 1]
        _assert_same(neg, fresh.encode_negative([PROMPTS["short"]]))
        assert not torch.allclose(neg[0], first[0])
        # After clear_cache everything runs again.
        enc.clear_cache()
        enc.encode([PROMPTS["short"]])
        assert counter.batch_sizes == [1, 2, 1, 1]
    finally:
        counter.remove()


def test_cache_is_bounded_lru(pipeline_dir):
    enc = TextEncoder.from_pretrained(pipeline_dir, cache_size=2)
    counter = _CallCounter(enc.model)
    try:
        for p in ("a", "b", "a", "c"):  # "b" is the least recently used when "c" arrives
            enc.encode_negative([p])
        assert counter.batch_sizes == [1, 1, 1]
        enc.encode_negative(["a"])
        assert counter.batch_sizes == [1, 1, 1]
        enc.encode_negative(["b"])
        assert counter.batch_sizes == [1, 1, 1, 1]
    finally:
        counter.remove()


def test_cache_off_runs_every_time(pipeline_dir):
    enc = TextEncoder.from_pretrained(pipeline_dir, cache_size=0)
    counter = _CallCounter(enc.model)
    try:
        enc.encode_negative(["x"])
        enc.encode_negative(["x"])
        assert counter.batch_sizes == [1, 1]
    finally:
        counter.remove()


def test_outputs_do_not_require_grad(encoder):
    embeds, mask = encoder.encode([PROMPTS["short"]])
    assert not embeds.requires_grad and not embeds.is_inference()
    # Usable as the input of a module that trains.
    layer = torch.nn.Linear(32, 4)
    layer(embeds).sum().backward()
    assert layer.weight.grad is not None


# ------------------------------------------------------------------------------------------------------------
def test_causal_lm_folder_loads_its_decoder(tmp_path, tokenizer):
    """A plain Gemma folder (no subfolders) holding Gemma2ForCausalLM loads as the bare decoder."""
    torch.manual_seed(1)
    lm = Gemma2ForCausalLM(_gemma_config(len(tokenizer))).eval()
    tokenizer.save_pretrained(tmp_path)
    lm.save_pretrained(tmp_path)
    enc = TextEncoder.from_pretrained(tmp_path)
    assert isinstance(enc.model, Gemma2Model)
    direct = TextEncoder(tokenizer, lm.model)
    _assert_same(enc.encode([PROMPTS["medium"]]), direct.encode([PROMPTS["medium"]]))


def test_missing_folder_is_one_clear_error(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(SanaError, match="text encoder folder not found.*no_such_model.*diffusers layout"):
        TextEncoder.from_pretrained(missing)


def test_folder_without_tokenizer_or_model(tmp_path, pipeline_dir):
    with pytest.raises(SanaError, match="no tokenizer in"):
        TextEncoder.from_pretrained(tmp_path)
    (tmp_path / "tokenizer").symlink_to(pipeline_dir / "tokenizer")
    (tmp_path / "text_encoder").mkdir()
    with pytest.raises(SanaError, match="no text encoder in .*config.json"):
        TextEncoder.from_pretrained(tmp_path)


def test_broken_checkpoint_is_wrapped(tmp_path, pipeline_dir):
    (tmp_path / "tokenizer").symlink_to(pipeline_dir / "tokenizer")
    (tmp_path / "text_encoder").mkdir()
    (tmp_path / "text_encoder" / "config.json").write_text('{"model_type": "gemma2"}')  # no weights
    with pytest.raises(SanaError, match="cannot load the text encoder"):
        TextEncoder.from_pretrained(tmp_path)


def test_bad_arguments(encoder, tokenizer):
    with pytest.raises(TypeError, match="sequence of lines"):
        encoder.encode(["a cat"], chi="User Prompt: ")
    with pytest.raises(ValueError, match="no prompts"):
        encoder.encode([])
    with pytest.raises(TypeError, match="prompts must be strings"):
        encoder.encode(["a cat", None])
    with pytest.raises(ConfigError, match="max_length"):
        TextEncoder(tokenizer, encoder.model, max_length=1)
    with pytest.raises(ConfigError, match="cache_size"):
        TextEncoder(tokenizer, encoder.model, cache_size=-1)
    # A single string is one prompt, not a list of characters.
    assert encoder.encode("a cat")[0].shape == (1, 300, 32)


def test_to_casts_and_drops_the_cache(pipeline_dir):
    enc = TextEncoder.from_pretrained(pipeline_dir)
    enc.encode_negative(["a cat"])
    enc.to(dtype=torch.float64)
    counter = _CallCounter(enc.model)
    try:
        embeds, _ = enc.encode_negative(["a cat"])
        assert counter.batch_sizes == [1] and embeds.dtype == torch.float64
    finally:
        counter.remove()
