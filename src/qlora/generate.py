"""Text generation for the CLI: one prompt (streamed to the terminal) and an interactive chat.

Decoding is transformers' ``generate`` (greedy, or sampling with temperature / top-p);
prompts go through the tokenizer's chat template unless ``raw`` is set.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any, TextIO

import torch
from torch import nn

__all__ = ["chat_loop", "generate_text", "render_prompt"]


def render_prompt(
    tokenizer: Any, messages: list[dict[str, str]], raw: bool = False
) -> torch.Tensor:
    """Token ids [1, T] for ``messages`` with the chat template (plain text when raw/none)."""
    if not raw and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt"
        )
        return ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    text = "\n".join(m["content"] for m in messages)
    return tokenizer(text, return_tensors="pt").input_ids


def generate_text(
    model: nn.Module,
    tokenizer: Any,
    messages: list[dict[str, str]],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    raw: bool = False,
    stream: TextIO | None = None,
) -> str:
    """The model's reply to ``messages`` (greedy when temperature is 0), optionally streamed."""
    from transformers import TextStreamer

    ids = render_prompt(tokenizer, messages, raw).to(next(model.parameters()).device)
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0}
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=top_p)
    if stream is not None:
        kwargs["streamer"] = _streamer(tokenizer, stream, TextStreamer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
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
