"""Records -> chat messages -> text segments, each marked prompt or response.

Training must see exactly what generation will see. At inference the prompt is rendered with
the tokenizer's chat template (``add_generation_prompt=True``) and the model continues it, so
here every conversation is cut into segments at the same places:

    [prompt_0][response_0][prompt_1][response_1]...

where ``prompt_k`` is the text the template adds between the previous response and the
start of assistant turn k (including the generation prompt, e.g. ``<|im_start|>assistant\\n``)
and ``response_k`` is what it adds for the assistant message itself (content and end-of-turn
markers). The cut points come from rendering growing prefixes of the conversation and
checking that each rendering is a string prefix of the next; templates that rewrite earlier
turns (e.g. strip reasoning from old assistant messages) break that and are refused with a
clear error rather than trained on silently mismatched text.

Without a chat template (base models), `PLAIN_TEMPLATE` is used: a documented, plain-text
format with the same segment structure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qlora.data.records import DataError, Format

__all__ = [
    "PLAIN_TEMPLATE",
    "Message",
    "Segment",
    "has_chat_template",
    "record_messages",
    "render",
    "render_prompt",
    "segments",
]

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}

PLAIN_TEMPLATE = """\
The plain template (used when the tokenizer has no chat template): turns joined by a blank
line, each a header line and the content,

    ### System:\\n{content}        (only if there is a system message)
    \\n\\n### User:\\n{content}
    \\n\\n### Assistant:\\n{content}<eos>

The generation prompt ends with "### Assistant:\\n"; the response is the content followed by
the tokenizer's EOS token (added in token space, so it works for any tokenizer).
"""

_PLAIN_HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}


@dataclass(frozen=True)
class Segment:
    """A piece of rendered text; ``response`` pieces carry the loss, prompt pieces do not."""

    text: str
    response: bool


def record_messages(record: dict[str, Any], fmt: Format) -> list[Message]:
    """The chat messages for an alpaca or chat record.

    Alpaca becomes a user message ``instruction`` (+ ``"\\n\\n" + input`` when the input is
    non-empty) and an assistant message ``output``; an optional ``system`` key leads.
    """
    if fmt == "chat":
        return [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    if fmt == "alpaca":
        user = record["instruction"]
        extra = record.get("input") or ""
        if extra.strip():
            user = f"{user}\n\n{extra}"
        messages: list[Message] = []
        if record.get("system"):
            messages.append({"role": "system", "content": record["system"]})
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": record["output"]})
        return messages
    raise DataError(f"{fmt!r} records have no chat messages")


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render_plain(messages: list[Message], add_generation_prompt: bool) -> str:
    # The separator goes *before* a turn, so a rendering ends right after the last content and
    # the response segment is the bare content; its EOS is added in token space (encode.py).
    parts = [_PLAIN_HEADERS[m["role"]] + m["content"] for m in messages]
    if add_generation_prompt:
        parts.append(_PLAIN_HEADERS["assistant"])
    return "\n\n".join(parts)


def render(tokenizer: Any, messages: list[Message], add_generation_prompt: bool = False) -> str:
    """The conversation as text: the tokenizer's chat template, or the plain template."""
    if not has_chat_template(tokenizer):
        return _render_plain(messages, add_generation_prompt)
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    if not isinstance(text, str):  # pragma: no cover - batched input is never passed here
        raise DataError(f"chat template returned {type(text).__name__}, expected a string")
    return text


def render_prompt(tokenizer: Any, messages: list[Message]) -> str:
    """The generation prompt for ``messages`` (everything before the assistant's answer).

    The text; for the token ids a model is given, use `qlora.data.prompt.prompt_ids`, which
    tokenizes exactly as training did (segment by segment, EOS after earlier replies).
    """
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return render(tokenizer, messages, add_generation_prompt=True)


def _check_prefix(before: str, after: str, what: str) -> None:
    if not after.startswith(before):
        raise DataError(
            f"the chat template is not prefix-stable ({what} changes the text rendered for "
            f"earlier turns), so prompt and response cannot be separated exactly; use a "
            f"template that renders each turn independently, or the 'text' format"
        )


def segments(tokenizer: Any, messages: list[Message]) -> list[Segment]:
    """Cut a rendered conversation into prompt and response segments (see module docstring).

    Joining the texts gives exactly ``render(tokenizer, messages)`` (with the plain template,
    minus the EOS tokens, which are added in token space). Messages after the last assistant
    turn are dropped: they carry no loss. The first assistant turn must follow a user turn
    (`validate_record` guarantees it), so every response has a prompt before it.
    """
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    if last < 1:
        raise DataError("a conversation needs a user turn followed by an assistant turn")
    messages = messages[: last + 1]
    out: list[Segment] = []
    done = ""  # the text already emitted as segments
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:k], add_generation_prompt=True)
        full = render(tokenizer, messages[: k + 1])
        _check_prefix(done, before, f"the generation prompt before message {k}")
        _check_prefix(before, full, f"assistant message {k}")
        out.append(Segment(before[len(done) :], response=False))
        out.append(Segment(full[len(before) :], response=True))
        done = full
    return out
