"""The stand-in tokenizer: determinism, exact round trips over word ids, Llama-3 specials."""

from __future__ import annotations

import random

import pytest

from engines.core.tokenizer import NUM_WORD_TOKENS, Tokenizer, get_tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return get_tokenizer()


def test_singleton_and_llama3_ids(tokenizer: Tokenizer) -> None:
    assert get_tokenizer() is tokenizer
    assert tokenizer.vocab_size == 128256
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (128000, 128009)
    assert tokenizer.decode([128000, 128001, 128006, 128007, 128009]) == (
        "<|begin_of_text|><|end_of_text|><|start_header_id|><|end_header_id|><|eot_id|>"
    )


@pytest.mark.parametrize("seed", range(5))
def test_decode_then_encode_returns_the_same_word_ids(tokenizer: Tokenizer, seed: int) -> None:
    ids = random.Random(seed).choices(range(NUM_WORD_TOKENS), k=3000)
    assert tokenizer.encode(tokenizer.decode(ids)) == ids


def test_every_word_id_round_trips_alone(tokenizer: Tokenizer) -> None:
    text = tokenizer.decode(range(NUM_WORD_TOKENS))
    assert tokenizer.encode(text) == list(range(NUM_WORD_TOKENS))


def test_encoding_is_deterministic_across_instances(tokenizer: Tokenizer) -> None:
    text = "Hello, world! Shared system prompts make prefix caching pay off.\n\nDo they?"
    ids = tokenizer.encode(text)
    assert Tokenizer().encode(text) == ids
    assert all(0 <= token_id < NUM_WORD_TOKENS for token_id in ids)
    # Roughly one token per four characters of English, like a real BPE tokenizer.
    assert len(text) / 6 < len(ids) < len(text) / 2


def test_shared_text_prefix_gives_shared_token_prefix(tokenizer: Tokenizer) -> None:
    system = "You are a careful assistant. Answer briefly and cite sources. " * 20
    first = tokenizer.encode(system + "What is the capital of France?")
    second = tokenizer.encode(system + "Summarise this article for me.")
    prefix = tokenizer.encode(system.rstrip())
    assert first[: len(prefix)] == second[: len(prefix)] == prefix


def test_special_tokens_in_text_and_bos(tokenizer: Tokenizer) -> None:
    assert tokenizer.encode("hi", add_special_tokens=True)[0] == 128000
    assert tokenizer.encode("hi")[0] != 128000
    assert tokenizer.encode("a<|eot_id|>b")[1] == 128009
    unknown = tokenizer.encode("<|not_special|>")
    assert all(token_id < NUM_WORD_TOKENS for token_id in unknown)


def test_chat_template_is_llama3_and_ignores_non_text_parts(tokenizer: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Look:"}, {"type": "image_url"}, {"type": "text", "text": "ok?"}],
        },
    ]
    text = tokenizer.apply_chat_template(messages)
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nLook:\nok?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert not tokenizer.apply_chat_template(messages, add_generation_prompt=False).endswith("\n\n")
    ids = tokenizer.encode(text)
    assert ids[0] == 128000 and ids.count(128009) == 2 and ids[-2] == 128007


def test_generated_reply_reencodes_to_its_ids_in_the_next_turn(tokenizer: Tokenizer) -> None:
    messages = [{"role": "user", "content": "Tell me a story."}]
    prompt = tokenizer.encode(tokenizer.apply_chat_template(messages))
    reply = random.Random(7).choices(range(NUM_WORD_TOKENS), k=200)
    follow_up = messages + [
        {"role": "assistant", "content": tokenizer.decode(reply)},
        {"role": "user", "content": "Another one."},
    ]
    next_prompt = tokenizer.encode(tokenizer.apply_chat_template(follow_up))
    assert next_prompt[: len(prompt) + len(reply)] == prompt + reply


def test_decode_rejects_out_of_range_ids(tokenizer: Tokenizer) -> None:
    assert tokenizer.decode([]) == ""
    with pytest.raises(ValueError):
        tokenizer.decode([128256])
    with pytest.raises(ValueError):
        tokenizer.decode([-1])


@pytest.mark.parametrize("seed", range(3))
def test_long_text_encoded_in_memoised_spans_equals_one_pass(tokenizer: Tokenizer, seed: int) -> None:
    """Span cuts never change the ids, whatever the whitespace and punctuation at the cut."""
    rng = random.Random(seed)
    alphabet = [" ", "  ", "\n", "\t", "a", "zo", ".", ",", "!!", "é", "_", "9", " x", " \n ", "—"]
    for _ in range(300):
        text = tokenizer.decode(rng.choices(range(NUM_WORD_TOKENS), k=rng.randrange(1, 900)))
        text += "".join(rng.choices(alphabet, k=rng.randrange(1, 1500)))
        one_pass = tokenizer._encode_span_uncached(text)
        assert tokenizer.encode(text) == one_pass
        assert tokenizer.encode(text) == one_pass  # again, from the memoised spans
