"""The generation prompt as token ids, exactly as training encoded it.

A fine-tuned model only ever saw prompts in one form: the conversation rendered by
`qlora.data.render` (the chat template, or the plain template for base models), cut into
segments, each tokenized on its own without special tokens, EOS after every earlier reply
(`qlora.data.encode`). Generation, chat, evaluation and the server must give it the same ids,
so they all ask this module, and this module asks the training encoder itself: the prompt is
training's encoding of the conversation followed by an empty reply, cut where the reply starts.
No second rendering or tokenization rule exists that could drift from training's.
"""

from __future__ import annotations

import sys
from typing import Any

from qlora.data.encode import IGNORE_INDEX, encode_record
from qlora.data.records import DataError
from qlora.data.render import Message

__all__ = ["prompt_ids", "text_ids"]


def prompt_ids(tokenizer: Any, messages: list[Message]) -> list[int]:
    """Token ids [T] that ask the model for the next assistant reply to ``messages``.

    Identical to the ids training puts before that reply (`encode_record` of the same
    conversation with the reply appended, up to its first labeled token). A trailing assistant
    message is dropped, as `render_prompt` drops it.

    Raises:
        DataError: no user turn, a template that is not prefix-stable, a tokenizer without EOS.
    """
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not any(m["role"] == "user" for m in messages):
        raise DataError("a prompt needs at least one user message")
    reply: Message = {"role": "assistant", "content": ""}
    record = {"messages": [*messages, reply]}
    # No truncation: the caller decides what to do with a prompt longer than the context.
    [example] = encode_record(tokenizer, record, "chat", max_seq_len=sys.maxsize)
    # The reply is the last run of labeled tokens (it always has one: its EOS).
    labels = example.labels
    start = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return example.input_ids[:start]


def text_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` as it is, the way training tokenizes a ``text`` record (no
    special tokens: no BOS; the EOS training appends is not part of a prompt)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
