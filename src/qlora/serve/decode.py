"""One request's decoding, token by token: the loop the sequential engine runs.

`token_stream` is a plain KV-cached loop over the model's forward (prefill once, then one token
per step), so the server can check for a cancelled request between tokens and stream each
token as it comes. Greedy decoding gives transformers' ``generate`` tokens (tested against
`qlora.generate.generate_text`); sampling applies temperature then top-p, as ``generate``
does, from the request's own seeded generator. `TextAssembler` turns the tokens into text
pieces: incremental detokenization (no half UTF-8 characters) and stop strings (text that
could still become a stop string is held back, and the stop string itself is never sent).

Not done here (the next step, issue 16): batching several requests into one forward, a static
KV cache and preallocated buffers, and the fast k-bit decode kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from qlora.generate import stop_ids
from qlora.models.sampling import sample_next
from qlora.nn import fast_decoding

__all__ = ["TextAssembler", "eos_ids", "sample_next", "token_stream"]


def eos_ids(model: nn.Module, tokenizer: Any) -> frozenset[int]:
    """The ids that end a reply: `qlora.generate.stop_ids` (the tokenizer's EOS and the
    model's generation config's)."""
    return stop_ids(model, tokenizer)


def token_stream(
    model: nn.Module,
    prompt: list[int],
    *,
    max_tokens: int,
    temperature: float,
    top_p: float,
    generator: torch.Generator,
    stop_ids: frozenset[int],
    cancelled: Callable[[], bool],
) -> Iterator[int]:
    """Yields up to ``max_tokens`` new token ids after ``prompt``; a stop id is yielded and
    ends the stream; ``cancelled()`` is checked before every forward."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], dtype=torch.long, device=device)  # [1, T]
    cache = None
    with torch.inference_mode(), fast_decoding():
        for _ in range(max_tokens):
            if cancelled():
                return
            # logits_to_keep=1: the prompt's other positions need no output head.
            out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
            cache = out.cache
            token = sample_next(out.logits[0, -1].float(), temperature, top_p, generator)
            yield token
            if token in stop_ids:
                return
            ids = torch.tensor([[token]], dtype=torch.long, device=device)  # [1, 1]


class TextAssembler:
    """Generated ids -> text pieces that never split a character and never show a stop string.

    Feed each new id to `add`, which returns the text that is now safe to send; `finish` sends
    the rest. ``stopped`` turns true when a stop string appeared: the text is cut before it.
    """

    def __init__(self, tokenizer: Any, stops: tuple[str, ...] = ()) -> None:
        self._tokenizer = tokenizer
        self._stops = stops
        # Text that could still grow into a stop string stays back: its longest proper prefix.
        self._hold = max((len(s) - 1 for s in stops), default=0)
        self._ids: list[int] = []
        self._text = ""
        self._sent = 0
        self.stopped = False

    def add(self, token: int) -> str:
        """The text that became final with ``token`` (may be empty)."""
        self._ids.append(token)
        # Decoding the whole reply each time keeps spaces and merges right (tokenizers that
        # strip a leading space); replies are short enough for that to be cheap.
        self._text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        cut = self._first_stop()
        if cut is not None:
            self._text = self._text[:cut]
            self.stopped = True
            return self._take(len(self._text))
        if self._text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for the rest
            return ""
        return self._take(len(self._text) - self._hold)

    def finish(self) -> str:
        """Whatever text is still held back."""
        return self._take(len(self._text))

    def _first_stop(self) -> int | None:
        # Sent text holds no stop string's start: any such stop would have ended within the
        # held-back tail and been found on an earlier token.
        found = [i for s in self._stops if (i := self._text.find(s, self._sent)) >= 0]
        return min(found) if found else None

    def _take(self, end: int) -> str:
        if end <= self._sent:
            return ""
        piece = self._text[self._sent : end]
        self._sent = end
        return piece
