"""BatchingEngine: continuous batching of requests for any mix of adapters on one base.

One worker thread owns a `BatchDecoder` and loops:

1. **admit**: while the batch has free rows and requests wait, take the oldest waiting request
   (skipping those whose client left), prefill its prompt with its adapter into a new row,
   and send its first token;
2. **step**: drop the rows whose client left, feed every row its last token in ONE decoder
   step (the base matmuls once for the batch; each adapter's low-rank update on its own
   rows), and send each row's next token; finished rows free their slot at once.

So a request joins the running batch at the next step instead of waiting for the batch to
drain (iteration-level scheduling, as Orca / vLLM do), and requests for different adapters
share every base matmul (as S-LoRA / Punica do on GPUs).

Adapters are tensors held by the engine (`qlora.adapters.read_adapter`), not modules on the
model: loading one reads and checks its files on another thread while the batch keeps
running, then publishes it under its name in one assignment; unloading removes the name,
and rows already running with it finish with the tensors they started with. Adapters that
came on the model (LoRALinear layers) are served by name too.

Greedy answers equal the same request served alone: each row's arithmetic is the same whatever
else is in the batch, up to float32 summation order in the batched matmuls (tested on the
default model: identical tokens).
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qlora.adapters import read_adapter
from qlora.models.batch_decode import BatchDecoder, PreparedAdapter, adapter_weights
from qlora.models.sampling import sample_next
from qlora.nn.inject import lora_layers
from qlora.serve.engine import (
    EngineBase,
    GenerationRequest,
    Push,
    Reply,
    adapter_load_error,
    request_generator,
)
from qlora.serve.errors import AdapterLoadError, UnknownModelError

__all__ = ["DEFAULT_MAX_BATCH", "BatchingEngine"]

DEFAULT_MAX_BATCH = 8
_CLOSE_WAIT_S = 10.0


@dataclass
class _Job:
    """A request on its way: waiting, then a row of the batch."""

    request: GenerationRequest
    push: Push
    cancel: threading.Event
    reply: Reply
    generator: torch.Generator
    adapter: PreparedAdapter | None = None
    last_token: int = -1
    done: bool = field(default=False)


class BatchingEngine(EngineBase):
    """Serves concurrent requests in one continuously refilled batch (see the module doc).

    Args:
        model: a causal LM the batch decoder runs (`qlora.models.batch_decode`); adapters
            already on it are served under their names.
        tokenizer: its tokenizer (prompts are encoded as training encoded them).
        base_name: the name requests use for the base model without adapters.
        adapters: adapter name -> PEFT directory, loaded now.
        max_batch: most requests decoded together; more wait for a free row.

    Raises:
        ValueError: the batch decoder cannot run ``model`` (use `SequentialEngine`).
        AdapterLoadError: an adapter name is taken or its files do not load.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        base_name: str,
        adapters: Mapping[str, str] | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        super().__init__(model, tokenizer, base_name)
        self.decoder = BatchDecoder(model, max_batch)
        self.max_batch = max_batch
        self._weights: dict[str, PreparedAdapter] = {}
        on_model = {name for _, layer in lora_layers(model) for name in layer.adapter_names}
        for name in sorted(on_model):
            self._weights[name] = self.decoder.prepare(adapter_weights(model, name))
            self._adapters[name] = None
        self._loading: set[str] = set()
        for name, path in (adapters or {}).items():
            self._reserve(name)
            self._publish(name, str(path), self._read(name, str(path)))
        self._waiting: collections.deque[_Job] = collections.deque()
        self._rows: list[_Job] = []  # row i of the decoder is self._rows[i]
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="qlora-batch", daemon=True)
        self._thread.start()

    # -- requests --------------------------------------------------------------------------

    def _start(self, request: GenerationRequest, push: Push, cancel: threading.Event) -> None:
        job = _Job(request, push, cancel, self._reply(request), request_generator(request))
        with self._wake:
            if self._closed:
                push(RuntimeError("the server is shutting down"))
                return
            self._waiting.append(job)
            self._wake.notify()

    def _cancelled(self) -> None:
        with self._wake:  # a waiting worker re-checks (the row is dropped at its next step)
            self._wake.notify()

    def _loop(self) -> None:
        """The worker: admit waiting requests into free rows, step the batch, repeat."""
        while True:
            with self._wake:
                while not self._closed and not self._waiting and not self._rows:
                    self._wake.wait()
                if self._closed:
                    break
                admitted: list[_Job] = []
                while self._waiting and len(self._rows) + len(admitted) < self.max_batch:
                    admitted.append(self._waiting.popleft())
            try:
                for job in admitted:
                    self._admit(job)
                if self._rows:
                    self._step()
            except Exception as err:  # a bug: fail the running requests, keep serving
                for row in reversed(range(len(self._rows))):
                    self._rows[row].push(err)
                self._rows.clear()
                self.decoder = BatchDecoder(self.model, self.max_batch)
        for job in [*self._rows, *self._waiting]:
            job.push(RuntimeError("the server is shutting down"))

    def _admit(self, job: _Job) -> None:
        """Prefills ``job`` into a new row and sends its first token (or its error)."""
        if job.cancel.is_set():  # its client left while it waited
            self._count_cancelled(0)
            return
        try:
            job.adapter = self._adapter_of(job.request.model)
            logits = self.decoder.prefill(job.request.prompt, job.adapter)  # [V]
        except Exception as err:  # handed to the waiting request, raised there
            job.push(err)
            return
        self._rows.append(job)
        self._emit(job, logits)
        if job.done:
            self._release(len(self._rows) - 1)

    def _adapter_of(self, name: str) -> PreparedAdapter | None:
        """The weights a request for ``name`` runs with (None: the base alone)."""
        if name == self.base_name:
            return None
        weights = self._weights.get(name)  # one read: an unload cannot slip in between
        if weights is None:  # unloaded while the request waited
            raise UnknownModelError(f"model {name!r} was unloaded before the request ran")
        return weights

    def _step(self) -> None:
        """Drops rows whose client left, then one decoder step for every other row."""
        for row in reversed(range(len(self._rows))):
            job = self._rows[row]
            if job.cancel.is_set():
                self._count_cancelled(job.reply.tokens)
                self._release(row)
        if not self._rows:
            return
        self.stats.steps += 1
        self.stats.peak_batch = max(self.stats.peak_batch, len(self._rows))
        try:
            logits = self.decoder.step([job.last_token for job in self._rows])  # [n, V]
        except Exception as err:  # e.g. out of memory: every running request gets it
            for row in reversed(range(len(self._rows))):
                self._rows[row].push(err)
                self._release(row)
            return
        for job, row_logits in zip(self._rows, logits, strict=True):
            self._emit(job, row_logits)
        for row in reversed(range(len(self._rows))):
            if self._rows[row].done:
                self._release(row)

    def _emit(self, job: _Job, logits: torch.Tensor) -> None:
        """Samples ``job``'s next token from logits [V] and sends what it completes."""
        request = job.request
        token = sample_next(logits, request.temperature, request.top_p, job.generator)
        job.last_token = token
        piece = job.reply.add(token)
        if piece is not None:
            job.push(piece)
        if job.reply.finished:
            job.done = True
            self.stats.finished += 1

    def _release(self, row: int) -> None:
        """Frees decoder row ``row``, mirroring its swap-remove in ``self._rows``."""
        self.decoder.release(row)
        last = self._rows.pop()
        if row < len(self._rows):
            self._rows[row] = last

    # -- adapters --------------------------------------------------------------------------

    async def load_adapter(self, name: str, path: str) -> None:
        """Loads the PEFT adapter at ``path`` as ``name``; running requests keep going.

        Raises:
            AdapterLoadError: the name is taken or invalid, or the files are missing or do not
                fit the model (nothing is loaded).
        """
        self._reserve(name)
        try:
            weights = await asyncio.to_thread(self._read, name, path)
        except BaseException:
            self._loading.discard(name)
            raise
        self._publish(name, path, weights)

    def _reserve(self, name: str) -> None:
        """Claims ``name`` for a load in progress (two loads of one name: the second is 400)."""
        self._check_free(name)
        if name in self._loading:
            raise AdapterLoadError(f"lora_name {name!r} is being loaded already")
        if not name or "." in name:
            raise AdapterLoadError(f"lora_name must be non-empty and without '.', got {name!r}")
        self._loading.add(name)

    def _read(self, name: str, path: str) -> PreparedAdapter:
        try:
            return self.decoder.prepare(read_adapter(self.model, path))
        except (OSError, ValueError) as err:
            raise adapter_load_error(name, path, err) from None

    def _publish(self, name: str, path: str, weights: PreparedAdapter) -> None:
        self._weights[name] = weights
        self._adapters[name] = path  # requests may name it from now on
        self._loading.discard(name)

    async def unload_adapter(self, name: str) -> None:
        """Unloads adapter ``name``: new requests cannot name it; running ones finish with it.

        Raises:
            UnknownModelError: no adapter of that name is loaded.
        """
        self._check_loaded(name)
        del self._adapters[name]
        self._weights.pop(name, None)
        for _, layer in lora_layers(self.model):  # one that came on the model: free it there
            if name in layer.lora_A:
                layer.delete_adapter(name)

    def close(self) -> None:
        """Stops the worker after its current step; requests still running get an error."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(_CLOSE_WAIT_S)
