"""The simulator's deterministic tokens: tests call `expected_text` to know what it will stream.

Every fifth token (starting with the second) is a special one, so even a short
answer carries multi-byte UTF-8 and characters that JSON must escape.
"""
from __future__ import annotations

import random
from collections.abc import Iterable

from protocol.models import canonical_model

SPECIAL_EVERY = 5
SPECIAL_OFFSET = 1

WORDS = (
    "the", "a", "model", "token", "stream", "answer", "quick", "brown", "fox", "jumps",
    "over", "lazy", "dog", "server", "agent", "queue", "latency", "simple", "river",
    "mountain", "light", "signal", "between", "every", "small", "window", "across",
    "orchestra", "llama", "because", "during", "ordered", "gentle", "packet", "number",
)

SPECIAL_TOKENS = (
    " 🦙",  # U+1F999: a 4-byte UTF-8 sequence
    " 👩\u200d💻",  # ZWJ sequence: one glyph, three code points
    " 日本語",
    " cafe\u0301",  # combining acute accent after a plain "e"
    ' "quoted"',
    " C:\\path",
    "\n",
    " 你好，世界",
    " naïve 😀",
    "\t→",
)


def chat_prompt(messages: Iterable[dict]) -> str:
    """The prompt a chat's tokens depend on: its messages' contents, one per line."""
    return "\n".join(str(message.get("content") or "") for message in messages)


def generate_tokens(seed: int, tokens: int, model: str = "sim", prompt: str = "") -> list[str]:
    """The `tokens` tokens the simulator streams; a shorter count gives a prefix of a longer one."""
    rng = random.Random(f"{seed}|{canonical_model(model)}|{prompt}")
    special_start = rng.randrange(len(SPECIAL_TOKENS))
    out = []
    for i in range(tokens):
        if i % SPECIAL_EVERY == SPECIAL_OFFSET:
            out.append(SPECIAL_TOKENS[(special_start + i // SPECIAL_EVERY) % len(SPECIAL_TOKENS)])
            continue
        word = rng.choice(WORDS)
        out.append(" " + (word.capitalize() if i == 0 else word))
    return out


def expected_text(seed: int, tokens: int, model: str = "sim", prompt: str = "") -> str:
    """The whole answer the simulator gives for these inputs (for chat, `prompt=chat_prompt(messages)`)."""
    return "".join(generate_tokens(seed, tokens, model, prompt))
