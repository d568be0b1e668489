"""A deterministic stand-in for Llama-3's tokenizer that needs no downloaded files.

The simulator only needs three properties of a real tokenizer: the same text always gives
the same ids (so prompts that share a text prefix share a token prefix, which is what
prefix caching and prefix-aware routing feed on), about one token per four characters of
ordinary text, and Llama-3's id layout for the special tokens. A vocabulary of generated
pseudo-words gives all three, plus a property real BPE lacks and benchmarks want:
``encode(decode(ids)) == ids`` for any word ids, so a prompt of exactly N tokens can be
built from N random ids.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Sequence

import xxhash

VOCAB_SIZE = 128256
NUM_WORD_TOKENS = 128000  # ids 0..127999 are words; 128000..128255 are special tokens
BOS_TOKEN_ID = 128000
EOS_TOKEN_ID = 128009  # <|eot_id|>: the end of an assistant turn, what chat generation stops on

# Llama-3.1's named special tokens; every other id up to 128255 is a reserved token.
_NAMED_SPECIAL_TOKENS = {
    128000: "<|begin_of_text|>",
    128001: "<|end_of_text|>",
    128004: "<|finetune_right_pad_id|>",
    128006: "<|start_header_id|>",
    128007: "<|end_header_id|>",
    128008: "<|eom_id|>",
    128009: "<|eot_id|>",
    128010: "<|python_tag|>",
}

_WORD_SEED = 0x5EED
_ONSETS = ("b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "ch", "sh", "th")
_VOWELS = ("a", "e", "i", "o", "u")
_MAX_CHUNK_CHARS = 4  # out-of-vocabulary pieces cost one token per four characters, like BPE on English

_SPECIAL_SPLIT = re.compile(r"(<\|[A-Za-z0-9_]+\|>)")
# GPT-2 style pre-tokenisation: a word with its leading space, a punctuation run, or
# whitespace that leaves its last space to the following word.
_PIECE = re.compile(r"\s?\w+|\s?[^\w\s]+|\s+(?!\S)|\s+")
# A space between a non-space and a word character always starts a piece, and no piece
# reaches across it, so text cut there encodes to the same ids in parts as whole.
_SPAN_BOUNDARY = re.compile(r"(?<=\S) (?=\w)")
_SPAN_CHARS = 1024  # long text is encoded in memoised spans of about this many characters
_SPAN_CACHE_SIZE = 8192


def _special_tokens() -> dict[int, str]:
    specials: dict[int, str] = {}
    reserved = 0
    for token_id in range(NUM_WORD_TOKENS, VOCAB_SIZE):
        name = _NAMED_SPECIAL_TOKENS.get(token_id)
        if name is None:
            name = f"<|reserved_special_token_{reserved}|>"
            reserved += 1
        specials[token_id] = name
    return specials


def _generate_words() -> list[str]:
    """128,000 distinct pseudo-words, each with a leading space.

    Every word is a run of consonant-onset + single-vowel syllables, so a word parses into
    syllables in exactly one way and distinct syllable tuples are distinct strings; that
    makes uniqueness free. A fixed-seed shuffle mixes the lengths across the id range.
    """
    syllables = [onset + vowel for onset in _ONSETS for vowel in _VOWELS]
    short = syllables + [a + b for a in syllables for b in syllables]
    rng = random.Random(_WORD_SEED)
    n = len(syllables)
    picks = rng.sample(range(n**3), NUM_WORD_TOKENS - len(short))
    long = [syllables[i // (n * n)] + syllables[(i // n) % n] + syllables[i % n] for i in picks]
    words = short + long
    rng.shuffle(words)
    return [" " + word for word in words]


class Tokenizer:
    """Llama-3-shaped tokenizer over a generated vocabulary.

    Text is split into special tokens and GPT-style pieces; a piece that is a vocabulary
    word maps to its id, anything else is cut into chunks of up to four characters, each
    mapped to a word id by a stable hash. Decoding therefore reproduces vocabulary words
    exactly and turns hashed chunks into (deterministic) other words.
    """

    vocab_size: int = VOCAB_SIZE
    bos_token_id: int = BOS_TOKEN_ID
    eos_token_id: int = EOS_TOKEN_ID

    def __init__(self) -> None:
        specials = _special_tokens()
        words = _generate_words()
        self._word_to_id: dict[str, int] = {word: token_id for token_id, word in enumerate(words)}
        self._pieces: list[str] = words + [specials[i] for i in range(NUM_WORD_TOKENS, VOCAB_SIZE)]
        self._special_to_id: dict[str, int] = {name: token_id for token_id, name in specials.items()}
        self._encode_span = functools.lru_cache(maxsize=_SPAN_CACHE_SIZE)(self._encode_span_uncached)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; special-token strings in it become their ids, as in HF."""
        ids = [BOS_TOKEN_ID] if add_special_tokens else []
        specials = self._special_to_id
        for index, segment in enumerate(_SPECIAL_SPLIT.split(text)):
            if index % 2:
                special_id = specials.get(segment)
                if special_id is not None:
                    ids.append(special_id)
                    continue
            if segment:
                self._encode_plain(segment, ids)
        return ids

    def _encode_plain(self, text: str, out: list[int]) -> None:
        """Encode special-free text.

        Long prompts mostly repeat text already seen (a shared system prompt, a chat's
        history), and both the gateway and the engine encode every one of them on the
        request's path. So long text is cut at piece boundaries into spans of about
        ``_SPAN_CHARS`` characters and each span's ids are memoised: a repeated prefix costs
        a string hash per span instead of a regex pass and a lookup per token.
        """
        if len(text) < 2 * _SPAN_CHARS:
            out.extend(self._encode_span_uncached(text))
            return
        start = 0
        while start < len(text):
            boundary = _SPAN_BOUNDARY.search(text, start + _SPAN_CHARS)
            end = boundary.start() if boundary is not None else len(text)
            out.extend(self._encode_span(text[start:end]))
            start = end

    def _encode_span_uncached(self, text: str) -> list[int]:
        """Ids of one span; memoised lists are shared, so callers copy them, never mutate."""
        ids: list[int] = []
        lookup = self._word_to_id.get
        for piece in _PIECE.findall(text):
            token_id = lookup(piece)
            if token_id is None:
                ids.extend(_chunk_ids(piece))
            else:
                ids.append(token_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        if min(ids) < 0 or max(ids) >= VOCAB_SIZE:
            raise ValueError(f"token ids must lie in [0, {VOCAB_SIZE})")
        pieces = self._pieces
        return "".join([pieces[token_id] for token_id in ids])

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Llama-3's chat format, as vLLM renders it before encoding without extra specials.

        Content is not trimmed (Llama-3's template trims it): the text of a generated
        reply decodes with a leading space, and keeping it lets the reply re-encode to the
        very ids that were generated, so the next turn's prefix-cache hit reaches through
        the reply as it does with a real BPE tokenizer.
        """
        parts = ["<|begin_of_text|>"]
        for message in messages:
            parts.append(f"<|start_header_id|>{message['role']}<|end_header_id|>\n\n")
            parts.append(_content_text(message.get("content")))
            parts.append("<|eot_id|>")
        if add_generation_prompt:
            parts.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
        return "".join(parts)


def _content_text(content: str | list[dict] | None) -> str:
    """OpenAI message content as text: text parts joined by newlines (vLLM's "string" format)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(part.get("text", "") for part in content if part.get("type") == "text")


@functools.lru_cache(maxsize=65536)
def _chunk_ids(piece: str) -> tuple[int, ...]:
    return tuple(
        xxhash.xxh3_64_intdigest(piece[start : start + _MAX_CHUNK_CHARS].encode()) % NUM_WORD_TOKENS
        for start in range(0, len(piece), _MAX_CHUNK_CHARS)
    )


@functools.cache
def get_tokenizer() -> Tokenizer:
    """The process-wide tokenizer; building the vocabulary takes a noticeable fraction of a second."""
    return Tokenizer()
