"""Adapter precision: file size and logit drift of bfloat16 / float16 / int8 adapters vs float32.

The default model (SmolLM2-135M) in nf4 with an r=16 all-linear adapter, either with random B
(std ``--b-std``, A as initialised: a large adapter, the harder case for rounding) or after
``--steps`` real training steps on a few texts. The adapter is saved at each precision
(`qlora.save_adapter(..., dtype=)`), loaded back onto the same base (`qlora.load_adapter`),
and its logits on held-out texts are compared with the float32 adapter's (the peer in this
script): max |Δlogit|, mean KL(float32 ‖ dtype) per token, top-1 agreement. The last row, the
base without the adapter, shows how much the adapter itself moves the logits.

    python benchmarks/adapter_dtype.py [--steps 0] [--b-std 0.02] [--seed 0]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

HELD_OUT = [
    "The committee postponed its decision until the engineers had measured the bridge again.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "She packed two maps, a compass and enough bread for three days in the hills.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n",
    "In 1969 the first humans walked on the Moon while millions watched on television.",
    "Water boils at a lower temperature on a mountain because the air pressure is lower.",
]
TRAIN_TEXTS = [
    "Question: What is the capital of France? Answer: The capital of France is Paris.",
    "Question: How many legs does a spider have? Answer: A spider has eight legs.",
    "Question: What colour is the sky on a clear day? Answer: It is blue.",
    "Question: Who wrote Hamlet? Answer: William Shakespeare wrote Hamlet.",
]
DTYPES = ("float32", "bfloat16", "float16", "int8")


def _ids(tokenizer: object, texts: list[str]) -> list[torch.Tensor]:
    return [tokenizer(t, return_tensors="pt").input_ids for t in texts]  # type: ignore[operator]


def _randomize(model: torch.nn.Module, std: float, seed: int) -> None:
    """B ~ N(0, std^2) (zero after init), A as `add_lora` initialised it."""
    from qlora.nn import lora_layers

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            weight = layer.lora_B["default"].weight  # [out, r]
            weight.copy_(torch.randn(weight.shape, generator=generator) * std)


def _train(model: torch.nn.Module, batches: list[torch.Tensor], steps: int) -> None:
    """A few plain AdamW steps on the training texts (lr 1e-3), one text per step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    model.train()
    for step in range(steps):
        ids = batches[step % len(batches)]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@torch.no_grad()
def _logits(model: torch.nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    """[tokens, vocab] float32 logits of every held-out position, concatenated."""
    return torch.cat([model(input_ids=ids).logits[0].float() for ids in batches])


def _compare(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float, float]:
    """(max |Δlogit|, mean KL(reference ‖ other) in nats per token, top-1 agreement)."""
    log_p = torch.log_softmax(reference.double(), dim=-1)
    log_q = torch.log_softmax(other.double(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    agree = (reference.argmax(-1) == other.argmax(-1)).double().mean()
    return float((reference - other).abs().max()), float(kl), float(agree)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=0, help="0: random B instead of training")
    parser.add_argument("--b-std", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import qlora
    from qlora.config import LoraConfig
    from qlora.nn import add_lora, disable_adapters, set_adapter

    torch.manual_seed(args.seed)
    model, tok = qlora.load_model(args.model, quant="nf4", progress=False)
    model.eval()
    add_lora(model, LoraConfig(r=16, alpha=32.0, dropout=0.0, target_modules="all-linear"))
    if args.steps:
        _train(model, _ids(tok, TRAIN_TEXTS), args.steps)
        how = f"{args.steps} AdamW steps (lr 1e-3)"
    else:
        _randomize(model, args.b_std, args.seed)
        how = f"random B (std {args.b_std})"
    held_out = _ids(tok, HELD_OUT)
    tokens = sum(ids.shape[1] for ids in held_out)
    print(f"{args.model} nf4 + LoRA r=16 all-linear, {how}; {tokens} held-out tokens")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in DTYPES:
            directory = Path(tmp) / dtype
            start = time.perf_counter()
            qlora.save_adapter(model, directory, dtype=dtype)  # type: ignore[arg-type]
            seconds = time.perf_counter() - start
            size = (directory / "adapter_model.safetensors").stat().st_size
            qlora.load_adapter(model, directory, name=dtype.replace("float", "f"))
            rows.append((dtype, size, seconds))
        logits = {}
        for dtype, _, _ in rows:
            set_adapter(model, dtype.replace("float", "f"))
            logits[dtype] = _logits(model, held_out)
        with disable_adapters(model):
            base = _logits(model, held_out)

    reference = logits["float32"]
    fp32_size = rows[0][1]
    print(
        f"{'adapter':<10} {'bytes':>10} {'vs fp32':>8} {'save s':>7} {'max|dlogit|':>12} "
        f"{'mean KL':>10} {'top-1':>7}"
    )
    for dtype, size, seconds in rows:
        drift, kl, agree = _compare(reference, logits[dtype])
        print(
            f"{dtype:<10} {size:>10} {size / fp32_size:>8.3f} {seconds:>7.2f} {drift:>12.4g} "
            f"{kl:>10.3g} {agree:>7.2%}"
        )
    drift, kl, agree = _compare(reference, base)
    print(f"{'(no adapter)':<10} {'':>10} {'':>8} {'':>7} {drift:>12.4g} {kl:>10.3g} {agree:>7.2%}")


if __name__ == "__main__":
    main()
