"""BatchDecoder against transformers' full forward on tiny models: prefill and step logits,
rows joining and leaving, mixed adapters in one batch, and its errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qlora.models.batch_decode import BatchDecoder, adapter_weights, batch_decode_unsupported
from qlora.nn import lora_layers, set_adapter
from qlora.nn.lora import merge_adapter
from tests.conftest import requires_cuda
from tests.tiny_models import tiny_causal_lm, tiny_llama, with_two_adapters

transformers = pytest.importorskip("transformers")

VOCAB = 128
TOL = 1e-5


def _models() -> dict[str, nn.Module]:
    return {"llama-gqa": tiny_llama(seed=0), "qwen2-bias": tiny_causal_lm("Qwen2", vocab=VOCAB)}


@pytest.fixture(params=["llama-gqa", "qwen2-bias"])
def model(request: pytest.FixtureRequest) -> nn.Module:
    return _models()[request.param]


def _ids(length: int, seed: int) -> list[int]:
    return torch.randint(
        0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)
    ).tolist()


@torch.no_grad()
def _last_logits(model: nn.Module, ids: list[int]) -> torch.Tensor:
    """transformers' full forward over ``ids``: the last position's logits [V]."""
    return model(input_ids=torch.tensor([ids])).logits[0, -1].float()


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> None:
    assert float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


def test_qwen2_has_attention_biases(model: nn.Module) -> None:
    assert batch_decode_unsupported(model) is None
    if model.config.model_type == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None


def test_prefill_and_steps_equal_the_full_forward(model: nn.Module) -> None:
    decoder = BatchDecoder(model, max_batch=3)
    sequences = [_ids(n, seed) for seed, n in enumerate((5, 11, 1))]
    for row, ids in enumerate(sequences):
        _close(decoder.prefill(ids), _last_logits(model, ids))
        assert decoder.length(row) == len(ids)
    for _ in range(4):
        logits = decoder.step([int(torch.argmax(_last_logits(model, s))) for s in sequences])
        assert logits.shape == (3, VOCAB) and logits.dtype == torch.float32
        for row, ids in enumerate(sequences):
            ids.append(int(torch.argmax(_last_logits(model, ids))))
            _close(logits[row], _last_logits(model, ids))
            assert decoder.length(row) == len(ids)


def test_rows_join_and_leave_with_a_swap(model: nn.Module) -> None:
    decoder = BatchDecoder(model, max_batch=3)
    sequences = [_ids(n, 10 + n) for n in (4, 9, 6)]
    for ids in sequences:
        decoder.prefill(ids)

    def step() -> None:
        tokens = [int(torch.argmax(_last_logits(model, s))) for s in sequences]
        logits = decoder.step(tokens)
        for row, (ids, token) in enumerate(zip(sequences, tokens, strict=True)):
            ids.append(token)
            _close(logits[row], _last_logits(model, ids))

    step()
    decoder.release(0)  # the last row takes index 0
    sequences[0] = sequences.pop()
    assert decoder.rows == 2 and decoder.length(0) == len(sequences[0])
    step()
    joining = _ids(3, 99)
    _close(decoder.prefill(joining), _last_logits(model, joining))
    sequences.append(joining)
    step()
    step()
    decoder.release(2)  # the last row itself: no swap
    sequences.pop()
    step()


def test_mixed_adapters_in_one_batch_equal_each_row_alone(model: nn.Module) -> None:
    model = with_two_adapters(model)
    weights = {name: adapter_weights(model, name) for name in ("a", "b")}
    rows: list[tuple[str | None, list[int]]] = [
        (None, _ids(5, 1)), ("a", _ids(7, 2)), ("b", _ids(3, 3)), ("a", _ids(9, 4)),
    ]  # fmt: skip
    adapters = [None if name is None else weights[name] for name, _ in rows]
    batch = BatchDecoder(model, max_batch=4)
    alone = [BatchDecoder(model, max_batch=1) for _ in rows]
    batched = [batch.prefill(ids, a) for (_, ids), a in zip(rows, adapters, strict=True)]
    single = [
        d.prefill(ids, a) for d, (_, ids), a in zip(alone, rows, adapters, strict=True)
    ]  # one decoder per row: nothing else in its batch
    for _ in range(5):
        for b, s in zip(batched, single, strict=True):
            _close(b, s)
            assert int(torch.argmax(b)) == int(torch.argmax(s))
        tokens = [int(torch.argmax(s)) for s in single]
        for (_, ids), token in zip(rows, tokens, strict=True):
            ids.append(token)
        batched = list(batch.step(tokens))
        single = [d.step([t])[0] for d, t in zip(alone, tokens, strict=True)]
    # And each row equals the model's own LoRALinear forward with its adapter active.
    for (name, ids), logits in zip(rows, single, strict=True):
        set_adapter(model, name if name is not None else [])
        _close(logits, _last_logits(model, ids), 1e-4)


def test_prompt_beyond_the_context_is_a_value_error() -> None:
    model = tiny_llama(seed=0, max_position_embeddings=16)
    decoder = BatchDecoder(model, max_batch=2)
    with pytest.raises(ValueError, match="beyond the model's context of 16"):
        decoder.prefill(_ids(17, 0))
    assert decoder.rows == 0  # the failed prompt took no row
    with pytest.raises(ValueError, match="empty"):
        decoder.prefill([])
    decoder.prefill(_ids(16, 0))
    with pytest.raises(ValueError, match="context"):
        decoder.step([1])


def test_full_batch_is_a_runtime_error() -> None:
    decoder = BatchDecoder(tiny_llama(seed=0), max_batch=2)
    decoder.prefill([1, 2])
    decoder.prefill([3])
    with pytest.raises(RuntimeError, match="in use"):
        decoder.prefill([4])
    assert decoder.rows == 2


def test_merged_adapter_is_a_value_error() -> None:
    model = with_two_adapters(tiny_llama(seed=0))
    set_adapter(model, "a")
    merge_adapter(next(layer for _, layer in lora_layers(model)))
    with pytest.raises(ValueError, match="merged"):
        BatchDecoder(model)


def test_unsupported_model_is_a_value_error() -> None:
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=VOCAB)
    model = transformers.GPT2LMHeadModel(config).eval()
    assert "gpt2" in str(batch_decode_unsupported(model))
    with pytest.raises(ValueError, match="cannot run this model"):
        BatchDecoder(model)


def test_bf16_model_runs() -> None:
    model = tiny_llama(seed=0).to(torch.bfloat16)
    decoder = BatchDecoder(model, max_batch=2)
    ids = _ids(6, 5)
    first = decoder.prefill(ids)
    decoder.prefill(_ids(3, 6))
    assert first.dtype == torch.float32 and torch.isfinite(first).all()
    _close(first, _last_logits(model, ids), 0.05)
    token = int(torch.argmax(first))
    logits = decoder.step([token, 1])
    assert logits.shape == (2, VOCAB) and torch.isfinite(logits).all()
    _close(logits[0], _last_logits(model, [*ids, token]), 0.05)


@pytest.mark.gpu
@requires_cuda
def test_mixed_adapters_on_cuda_equal_the_lora_forward() -> None:
    """On a CUDA model (index tensors on its device; the CPU kernels stay out of the way)."""
    model = with_two_adapters(tiny_llama(seed=0, max_position_embeddings=128)).cuda()
    weights = {name: adapter_weights(model, name) for name in ("a", "b")}
    rows = [(None, _ids(5, 1)), ("a", _ids(7, 2)), ("b", _ids(3, 3))]
    batch = BatchDecoder(model, max_batch=3)
    for name, ids in rows:
        batch.prefill(ids, None if name is None else weights[name])
    tokens = [1, 2, 3]
    logits = batch.step(tokens)
    for (name, ids), row, token in zip(rows, logits, tokens, strict=True):
        set_adapter(model, name if name is not None else [])
        with torch.no_grad():
            expected = model(torch.tensor([[*ids, token]], device="cuda")).logits[0, -1]
        _close(row.cpu(), expected.float().cpu(), 1e-4)
