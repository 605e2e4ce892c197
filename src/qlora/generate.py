"""Text generation for the CLI: one prompt (streamed to the terminal) and an interactive chat.

Decoding is transformers' ``generate`` (greedy, or sampling with temperature / top-p). The
prompt ids come from `qlora.data.prompt`, the encoding training used (chat template or the
plain template, tokenized segment by segment without special tokens), so a fine-tuned model
is asked exactly as it was taught; ``raw`` sends the text as it is.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any, TextIO

import torch
from torch import nn

from qlora.config import GenerationConfig
from qlora.data.prompt import prompt_ids, text_ids
from qlora.nn import fast_decoding

__all__ = ["chat_loop", "generate_text", "prompt_tensor"]


def prompt_tensor(
    tokenizer: Any, messages: list[dict[str, str]], raw: bool = False
) -> torch.Tensor:
    """Token ids [1, T] asking for the reply to ``messages``, as training encoded prompts.

    With ``raw``, the messages' contents joined by newlines, as they are (no template).

    Raises:
        ValueError: the prompt has no tokens (an empty ``raw`` text).
    """
    if raw:
        ids = text_ids(tokenizer, "\n".join(m["content"] for m in messages))
    else:
        ids = prompt_ids(tokenizer, messages)
    if not ids:
        raise ValueError("the prompt is empty: give the text to continue")
    return torch.tensor([ids], dtype=torch.long)


def generate_text(
    model: nn.Module,
    tokenizer: Any,
    messages: list[dict[str, str]],
    *,
    max_new_tokens: int = GenerationConfig.max_new_tokens,
    temperature: float = GenerationConfig.temperature,
    top_p: float = GenerationConfig.top_p,
    raw: bool = False,
    stream: TextIO | None = None,
) -> str:
    """The model's reply to ``messages`` (greedy when temperature is 0), optionally streamed.

    Raises:
        ConfigError: a generation setting out of range (see `GenerationConfig`).
        ValueError: an empty raw prompt.
    """
    from transformers import TextStreamer

    # The settings are checked (ConfigError naming the bad one) before any work is done.
    GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    ids = prompt_tensor(tokenizer, messages, raw).to(next(model.parameters()).device)
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0}
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=top_p)
    if stream is not None:
        kwargs["streamer"] = _streamer(tokenizer, stream, TextStreamer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad(), fast_decoding():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=pad, **kwargs)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def _streamer(tokenizer: Any, stream: TextIO, base: type) -> Any:
    class Streamer(base):  # type: ignore[misc, valid-type]
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            stream.write(text + ("\n" if stream_end else ""))
            stream.flush()

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def chat_loop(
    model: nn.Module,
    tokenizer: Any,
    lines: Iterable[str],
    *,
    write: Callable[[str], Any] = sys.stdout.write,
    out: TextIO = sys.stdout,
    **generation: Any,
) -> list[dict[str, str]]:
    """An interactive chat: each line of ``lines`` is a user turn; ``/reset`` clears the
    history, ``/exit`` (or end of input) stops. Returns the conversation."""
    history: list[dict[str, str]] = []
    write("qlora chat: type a message; /reset clears the history, /exit quits\n> ")
    out.flush()
    for line in lines:
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            history.clear()
            write("(history cleared)\n> ")
            continue
        if not text:
            write("> ")
            continue
        history.append({"role": "user", "content": text})
        reply = generate_text(model, tokenizer, history, stream=out, **generation)
        history.append({"role": "assistant", "content": reply})
        write("> ")
        out.flush()
    return history
