"""Text generation: one prompt (streamed to the terminal), an interactive chat, and many
prompts at once (the demo's evaluation).

Decoding runs on `qlora.models.batch_decode.BatchDecoder` (a KV-cached loop written for
decoding: one base matmul per projection for every running prompt, the adapter's low-rank
part on top) when it supports the model in its current adapter state (`decode_plan`), and
on transformers' ``generate`` otherwise: architectures the batch decoder does not run (GPT-2,
sliding windows ...), several active adapters, adapters merged into the weights, an adapter
active on some layers only. Both paths decode greedily (temperature 0) or sample (temperature
then top-p), stop on the same ids (`stop_ids`), and are run with the model in eval mode. The
prompt ids come from `qlora.data.prompt`, the encoding training used (chat template or the
plain template, tokenized segment by segment without special tokens), so a fine-tuned model
is asked exactly as it was taught; ``raw`` sends the text as it is.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TextIO

import torch
from torch import nn

from qlora.config import GenerationConfig
from qlora.data.prompt import prompt_ids, text_ids
from qlora.data.tasks import GreedyDecode
from qlora.models.batch_decode import (
    AdapterWeights,
    BatchDecoder,
    adapter_weights,
    batch_decode_unsupported,
)
from qlora.models.sampling import sample_next
from qlora.nn import fast_decoding
from qlora.nn.inject import lora_layers

__all__ = [
    "DecodePlan",
    "chat_loop",
    "decode_plan",
    "generate_ids",
    "generate_text",
    "greedy_decoder",
    "prompt_tensor",
    "stop_ids",
]

# (prompt index, new token id): called for every new token, the stop id included.
OnToken = Callable[[int, int], None]


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


def stop_ids(model: nn.Module, tokenizer: Any) -> frozenset[int]:
    """The ids that end a reply: the tokenizer's EOS (what training appended after every
    reply) and the model's generation config's (what ``generate`` stops on). The same rule
    as `qlora.serve.decode.eos_ids` (a layer above this one)."""
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured is not None:
        ids.update(int(i) for i in configured)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


# -- which decoder -------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodePlan:
    """How `generate_ids` decodes a model in its current adapter state.

    Attributes:
        reason: why transformers' ``generate`` is used (one line), or None for BatchDecoder.
        adapter: the LoRA adapter every BatchDecoder row adds (None: the base alone).
    """

    reason: str | None
    adapter: AdapterWeights | None = None


def decode_plan(model: nn.Module) -> DecodePlan:
    """BatchDecoder with the one adapter the model's forward adds now, or why not.

    The batch decoder adds one adapter per row, so it reproduces the model's forward when
    every `LoRALinear` adds nothing (no adapters, all disabled) or the same single adapter
    on every layer that has it; several active adapters, merged adapters, or an adapter
    active on some layers only go to transformers' ``generate``.
    """
    reason = batch_decode_unsupported(model)
    if reason is not None:
        return DecodePlan(reason)
    layers = [layer for _, layer in lora_layers(model)]
    if any(layer.merged_adapters for layer in layers):
        return DecodePlan("adapters are merged into the weights")
    # What each layer's forward adds: its active adapters, none while disabled.
    adding = [[] if layer.disabled else [n for n in layer.active_adapters if n in layer.lora_A]
              for layer in layers]  # fmt: skip
    names = {name for names in adding for name in names}
    if not names:
        return DecodePlan(None)
    if len(names) > 1:
        return DecodePlan(f"several adapters are active ({', '.join(sorted(names))})")
    [name] = names
    if any(name in layer.lora_magnitude_vector for layer in layers):
        return DecodePlan(f"adapter {name!r} is DoRA (the batch decoder adds plain LoRA)")
    pairs = zip(layers, adding, strict=True)
    if any(name in layer.lora_A and name not in added for layer, added in pairs):
        return DecodePlan(f"adapter {name!r} is active on some of its layers only")
    return DecodePlan(None, adapter_weights(model, name))


# -- decoding ------------------------------------------------------------------------------


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Generation never applies dropout (the batch decoder has none): eval mode meanwhile."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def generate_ids(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop: Collection[int],
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_batch: int = 8,
    on_token: OnToken | None = None,
) -> list[list[int]]:
    """The new token ids after each prompt (token ids), in order: up to ``max_new_tokens``,
    ending at the first id of ``stop`` (included) or at the model's context.

    BatchDecoder (when `decode_plan` allows) runs up to ``max_batch`` prompts at once, a new
    one joining as soon as a row finishes; otherwise transformers' ``generate`` runs each
    prompt alone. Sampling draws from a generator seeded from torch's global RNG, so
    ``torch.manual_seed`` makes it reproducible.

    Raises:
        ValueError: max_new_tokens below 1, an empty prompt, or a prompt beyond the model's
            context (batch decoder).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    plan = decode_plan(model)
    with _eval_mode(model):
        if plan.reason is not None:
            return [
                _generate_one(model, i, p, max_new_tokens, stop, temperature, top_p, on_token)
                for i, p in enumerate(prompts)
            ]
        return _decode_batch(
            model, plan.adapter, prompts, max_new_tokens, stop, temperature, top_p,
            max_batch, on_token,
        )  # fmt: skip


def greedy_decoder(model: nn.Module, max_batch: int = 8) -> GreedyDecode:
    """Greedy `generate_ids` on ``model`` as the ``decode`` of `qlora.data.tasks.score` (the
    demo's evaluation): the batch decoder runs ``max_batch`` prompts at once when it can. The
    adapter state is read at each call (``disable_adapters`` around a call is honoured)."""

    def decode(
        prompts: Sequence[list[int]], max_new_tokens: int, stop: Collection[int]
    ) -> list[list[int]]:
        return generate_ids(
            model, prompts, max_new_tokens=max_new_tokens, stop=stop, max_batch=max_batch
        )

    return decode


def _decode_batch(
    model: nn.Module,
    adapter: AdapterWeights | None,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop: Collection[int],
    temperature: float,
    top_p: float,
    max_batch: int,
    on_token: OnToken | None,
) -> list[list[int]]:
    """Continuous batching on a BatchDecoder: rows join (prefill) and leave between steps."""
    if not prompts:
        return []
    decoder = BatchDecoder(model, max_batch=max(1, min(max_batch, len(prompts))))
    # Prepared once: rows holding the same prepared adapter share its low-rank matmuls (raw
    # weights would be laid out again per prompt and count as a different adapter per row).
    prepared = None if adapter is None else decoder.prepare(adapter)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    generator.manual_seed(int(torch.randint(0, 2**62, (1,))))
    context = decoder.cache.max_length
    outputs: list[list[int]] = [[] for _ in prompts]
    waiting = deque(range(len(prompts)))
    owner: list[int] = []  # row -> prompt index (mirrors the decoder's swap-remove)
    feed: list[int] = []  # row -> the token its next step feeds

    def take(row: int, logits: torch.Tensor) -> None:
        """Samples row's next token; releases the row when its prompt is done."""
        index = owner[row]
        token = sample_next(logits, temperature, top_p, generator)
        outputs[index].append(token)
        if on_token is not None:
            on_token(index, token)
        feed[row] = token
        done = token in stop or len(outputs[index]) >= max_new_tokens
        if done or decoder.length(row) >= context:  # no column left for the next token
            decoder.release(row)
            owner[row], feed[row] = owner[-1], feed[-1]
            owner.pop()
            feed.pop()

    while waiting or owner:
        while waiting and decoder.rows < decoder.max_batch:
            index = waiting.popleft()
            logits = decoder.prefill(list(prompts[index]), prepared)  # [V]
            owner.append(index)
            feed.append(-1)
            take(decoder.rows - 1, logits)
        if owner:
            logits = decoder.step(feed)  # [rows, V]
            # From the last row down: a release moves the last row, already taken, into it.
            for row in reversed(range(len(owner))):
                take(row, logits[row])
    return outputs


def _generate_one(
    model: nn.Module,
    index: int,
    prompt: Sequence[int],
    max_new_tokens: int,
    stop: Collection[int],
    temperature: float,
    top_p: float,
    on_token: OnToken | None,
) -> list[int]:
    """One prompt through transformers' ``generate`` (the fallback), under fast_decoding."""
    if not prompt:
        raise ValueError("the prompt is empty")
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)  # [1, T]
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": temperature > 0}
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=top_p)
    if stop:
        kwargs["eos_token_id"] = sorted(stop)
        kwargs["pad_token_id"] = min(stop)
    if on_token is not None:
        kwargs["streamer"] = _token_streamer(lambda token: on_token(index, token))
    with torch.no_grad(), fast_decoding():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)  # [1, T + n]
    return [int(t) for t in out[0, ids.shape[1] :]]


def _token_streamer(emit: Callable[[int], None]) -> Any:
    """A transformers streamer that hands each new token to ``emit`` (the first ``put`` is
    the prompt)."""
    from transformers.generation.streamers import BaseStreamer

    class Streamer(BaseStreamer):
        def __init__(self) -> None:
            self.prompt_seen = False

        def put(self, value: torch.Tensor) -> None:
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            for token in value.reshape(-1).tolist():
                emit(int(token))

        def end(self) -> None:
            pass

    return Streamer()


class _TextStream:
    """Token ids -> text written to ``out`` as it becomes final: never half a UTF-8
    character (a byte-level token may end inside one; its text ends in U+FFFD until the
    rest arrives). The same rule as `qlora.serve.decode.TextAssembler`, without stops."""

    def __init__(self, tokenizer: Any, out: TextIO) -> None:
        self._tokenizer = tokenizer
        self._out = out
        self._ids: list[int] = []
        self._sent = 0

    def add(self, token: int) -> None:
        self._ids.append(token)
        # The whole reply is decoded each time: spaces and merges come out as in the final
        # text (tokenizers that strip a leading space); replies are short enough.
        text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self._write(text)

    def finish(self) -> None:
        self._write(self._tokenizer.decode(self._ids, skip_special_tokens=True) + "\n")

    def _write(self, text: str) -> None:
        if len(text) > self._sent:
            self._out.write(text[self._sent :])
            self._out.flush()
            self._sent = len(text)


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
    """The model's reply to ``messages`` (greedy when temperature is 0), optionally streamed
    token by token to ``stream`` (with a final newline).

    Decoded by `generate_ids`: the batch decoder when `decode_plan` allows (the model's
    active adapter honoured), else transformers' ``generate``. Stops at `stop_ids`.

    Raises:
        ConfigError: a generation setting out of range (see `GenerationConfig`).
        ValueError: an empty raw prompt, or a prompt beyond the model's context.
    """
    # The settings are checked (ConfigError naming the bad one) before any work is done.
    GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    ids = prompt_tensor(tokenizer, messages, raw)[0].tolist()
    text = _TextStream(tokenizer, stream) if stream is not None else None
    [tokens] = generate_ids(
        model,
        [ids],
        max_new_tokens=max_new_tokens,
        stop=stop_ids(model, tokenizer),
        temperature=temperature,
        top_p=top_p,
        max_batch=1,
        on_token=None if text is None else lambda _, token: text.add(token),
    )
    if text is not None:
        text.finish()
    return tokenizer.decode(tokens, skip_special_tokens=True)


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
