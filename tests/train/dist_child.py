"""One rank of a distributed training test (or the world-1 reference), run as a subprocess:

    torchrun --standalone --nproc-per-node 2 -m tests.train.dist_child OUT --batch 2 ...
    python -m tests.train.dist_child OUT --batch 4 ...          (world 1, the same global batch)

A tiny random Llama (optionally quantized: nf4, nf2, int8), rank-4 adapters on every linear
layer, random token data of uneven lengths through the recipe's own `EpochBatches` (global
batches, each rank its slice). Each rank writes ``OUT/rank-<r>.json`` (its per-step history)
and ``OUT/rank-<r>.safetensors`` (its adapters). ``--kill-at-batch N``: rank ``--kill-rank``
SIGKILLs itself when it collates its N-th batch, as a user's kill -9 of one worker would.
``--parallel fsdp`` also records the rank's resident frozen bytes and, after training,
whether every layer's packed codes and scales, all-gathered, equal the bytes it started with.
``--load-from DIR`` loads a saved model with `load_model` instead (FSDP: each layer sharded
as it loads) and records the most of the model the rank held while loading.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from collections.abc import Sequence
from pathlib import Path

import torch

from qlora import LoraConfig, QuantConfig, add_lora, quantize_model
from qlora.config import TrainConfig
from qlora.data import BatchLoader
from qlora.data.encode import Example
from qlora.models import load_model
from qlora.models.safetensors_io import write_safetensors
from qlora.nn.qlinear import QuantLinear
from qlora.recipe import EpochBatches
from qlora.train.fsdp import (
    ShardWhileLoading,
    full_tensors,
    held_bytes,
    resident_base_bytes,
    shard_like,
)
from qlora.train.parallel import distributed_session
from qlora.train.trainer import train
from tests.tiny_models import tiny_llama

VOCAB = 96


def examples(n: int = 21, seed: int = 7) -> list[Example]:
    """Uneven lengths (padding differs by rank), the first 3 tokens of each unlabelled."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(6, 17, (1,), generator=gen))
        ids = torch.randint(0, VOCAB, (length,), generator=gen).tolist()
        out.append(Example(ids, [-100] * 3 + ids[3:], (length,)))
    return out


class _Counting(Sequence):
    """One epoch's batches that count their use, so that a rank can die at the right one."""

    def __init__(self, inner: Sequence, owner: KillingBatches) -> None:
        self.inner, self.owner = inner, owner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):  # type: ignore[no-untyped-def, override]
        owner = self.owner
        owner.served += 1
        if owner.place.rank == owner.kill_rank and owner.served == owner.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.inner[i]


class KillingBatches(EpochBatches):
    """`EpochBatches` whose rank ``kill_rank`` dies at its ``kill_at``-th collated batch."""

    kill_at: int | None = None
    kill_rank: int = 1
    served: int = 0

    def epoch(self, epoch: int) -> Sequence:
        return _Counting(super().epoch(epoch), self)


def _gathered_equal(model: torch.nn.Module, packed: dict[str, torch.Tensor]) -> bool:
    """All-gather each layer (FSDP2's ``unshard``) and compare its codes and scales bitwise."""
    equal = True
    for block in model.model.layers:
        block.unshard()
        for layer in block.modules():
            if isinstance(layer, QuantLinear):
                for key in QuantLinear.SHARDABLE:
                    full = getattr(layer, key, None)
                    if full is None:
                        continue
                    prefix = next(n for n, m in model.named_modules() if m is layer)
                    want = packed[f"{prefix}.{key}"]
                    same = full.dtype == want.dtype and torch.equal(
                        full.detach().view(torch.uint8), want.view(torch.uint8)
                    )
                    equal = equal and same
        block.reshard()
    return equal


def _built(args: argparse.Namespace, lora: LoraConfig) -> torch.nn.Module:
    """The tiny model built in memory, quantized, with adapters whose B is random."""
    if args.hidden > 64:  # where the decoder layers, not the embedding, hold the bytes
        sizes = {"hidden": args.hidden, "intermediate": 2 * args.hidden, "tied": True}
        model = tiny_llama(vocab=VOCAB, seed=0, **sizes).train()
    else:
        model = tiny_llama(vocab=VOCAB, seed=0).train()
    if args.quant != "none":
        # float32 compute: world 1 and world 2 must agree to float32 rounding, not bf16's
        model = quantize_model(model, QuantConfig(kind=args.quant, compute_dtype="float32"))
    torch.manual_seed(1)  # the adapters' initialization (B random: the gradients of A count)
    add_lora(model, lora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--batch", type=int, default=2, help="examples per rank per micro-batch")
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--quant", default="none", choices=["none", "nf4", "nf2", "int8"])
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--grad-ckpt", action="store_true")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-at-batch", type=int, default=None)
    parser.add_argument("--kill-rank", type=int, default=1)
    parser.add_argument("--eval", action="store_true", help="also evaluate on 5 examples")
    parser.add_argument("--parallel", default="auto", choices=["auto", "ddp", "fsdp"])
    parser.add_argument("--hidden", type=int, default=64, help="> 64: a wider, tied model")
    parser.add_argument(
        "--load-from",
        default=None,
        help="a saved model directory, loaded with load_model "
        "(fsdp: each layer sharded as it loads)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)

    with distributed_session(args.parallel, torch.device("cpu")) as place:
        lora = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear")
        sink, packed = None, {}
        if args.load_from:
            if place.mode == "fsdp":
                sink = ShardWhileLoading(lora, 1, place.world_size, place.device)
            quant = None if args.quant == "none" else args.quant
            model, _ = load_model(
                args.load_from, quant, tokenizer=False, progress=False, blocks=sink
            )
            model.train()
            if sink is not None:
                sink.finish(model)
            else:
                torch.manual_seed(1)
                add_lora(model, lora)
            generator = torch.Generator().manual_seed(2)  # B random, the same full tensors
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if "lora_B" in name:
                        full = torch.randn(param.shape, generator=generator) * 0.02
                        param.copy_(shard_like(full, param))
        else:
            model = _built(args, lora)
            packed = {  # the stored codes and scales as loaded, to compare after the gathers
                f"{name}.{key}": getattr(layer, key).clone()
                for name, layer in model.named_modules()
                if isinstance(layer, QuantLinear)
                for key in QuantLinear.SHARDABLE
                if getattr(layer, key, None) is not None
            }
        held_at_load = sink.peak_bytes if sink is not None else held_bytes(model)
        loader = BatchLoader(examples(), args.batch * place.world_size, 0, seed=3)
        data = KillingBatches(loader, place, args.batch)
        data.kill_at = args.kill_at_batch
        data.kill_rank = args.kill_rank
        eval_batches = None
        if args.eval:
            eval_batches = list(BatchLoader(examples(5, seed=11), 2, 0, shuffle=False))
        config = TrainConfig(
            parallel=args.parallel,
            output_dir=args.output_dir,
            batch_size=args.batch,
            grad_accum=args.accum,
            max_steps=args.steps,
            lr=2e-3,  # 10x the QLoRA recipe: Adam turns float-noise gradients into lr-sized steps
            warmup_steps=0,
            save_every=args.save_every,
            grad_ckpt=args.grad_ckpt,
            malloc_mmap_kb=0,
        )
        result = train(
            model, config, data, eval_batches, resume=args.resume, progress=False, place=place
        )
        out = Path(args.output_dir)
        trained = full_tensors(  # FSDP: the shards gathered (every rank takes part)
            {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        )
        trained = {n: t.contiguous() for n, t in trained.items()}
        write_safetensors(out / f"rank-{place.rank}.safetensors", trained, {})
        record = {
            "history": result.history,
            "eval_loss": result.eval_loss,
            "world": place.world_size,
            "resident_frozen_bytes": resident_base_bytes(model),
            "held_at_load": held_at_load,
        }
        if place.mode == "fsdp" and packed:
            record["packed_equal_after_gather"] = _gathered_equal(model, packed)
        (out / f"rank-{place.rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
