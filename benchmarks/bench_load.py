"""Quantize-on-load of a Llama-2-7B-shaped checkpoint: peak memory and time, ours vs the peer.

The checkpoint (random bf16 values, exact Llama-2-7B tensor shapes, 3 safetensors shards,
13.5 GB) is written once by `synthetic_checkpoint.py` and read once before the runs so each
loader starts from a warm page cache. Each loader runs in its own
subprocess so that its peak resident memory (VmHWM, loading included, imports included, as
a user would see it) is its own:

* ours: ``qlora.load_model(dir, quant="nf4", double_quant=True, dtype=bfloat16)``
* ours, fp32 extras: the same with embeddings/norms/head in float32 (the CPU training setup)
* peer: transformers ``from_pretrained(dir, quantization_config=BitsAndBytesConfig(
  load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
  bnb_4bit_compute_dtype=bfloat16), dtype=bfloat16, device_map="cpu")``

Each child also prints a hash of one layer's packed NF4 bytes and scales: ours and the
peer's must agree (the same bytes from the same checkpoint). Prints a table, the ratios and
one JSON line. Target on the 2-core CPU box: our peak RSS <= 5.0 GB.

    python benchmarks/bench_load.py [--size 7b|13b|tiny] [--skip-peer]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# The peer's child imports qlora too, for this reader: qlora's own modules add ~3 MB to its
# peak, next to gigabytes (transformers and torch, which both children import, dominate).
from qlora.procinfo import peak_rss_bytes, rss_bytes

GB = 1e9


def _layer_hash(packed, absmax) -> str:
    digest = hashlib.sha256(packed.contiguous().view(-1).numpy().tobytes())
    digest.update(absmax.contiguous().view(-1).numpy().tobytes())
    return digest.hexdigest()[:16]


def run_child(which: str, directory: str) -> dict:
    import torch

    baseline = rss_bytes()
    start = time.perf_counter()
    if which.startswith("ours"):
        from qlora.models import load_model

        dtype = torch.float32 if which == "ours-fp32" else torch.bfloat16
        model, _ = load_model(directory, quant="nf4", dtype=dtype, tokenizer=False)
        layer = model.model.layers[0].self_attn.q_proj
        check = _layer_hash(layer.weight, layer.weight_absmax)
    else:
        import warnings

        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(
                directory, quantization_config=config, dtype=torch.bfloat16, device_map="cpu"
            )
        weight = model.model.layers[0].self_attn.q_proj.weight
        check = _layer_hash(weight.data, weight.quant_state.absmax)
    seconds = time.perf_counter() - start
    return {
        "which": which,
        "seconds": seconds,
        "peak_rss": peak_rss_bytes(),
        "final_rss": rss_bytes(),
        "baseline_rss": baseline,
        "layer0_q_proj_hash": check,
    }


def warm_page_cache(directory: Path) -> None:
    """Read the shards once so that every loader starts from the same warm page cache
    (otherwise the first one would also be measuring the disk)."""
    from tqdm.auto import tqdm

    files = sorted(directory.glob("*.safetensors"))
    with tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True,
              desc="warming the page cache") as bar:  # fmt: skip
        for path in files:
            with open(path, "rb", buffering=0) as f:
                while chunk := f.read(64 << 20):
                    bar.update(len(chunk))


def spawn(which: str, directory: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", which, "--dir", str(directory)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    if proc.returncode != 0:
        return {"which": which, "error": f"exit code {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="7b", choices=["7b", "13b", "tiny"])
    parser.add_argument("--dir", help="an existing checkpoint directory to load instead")
    parser.add_argument("--skip-peer", action="store_true", help="skip transformers + bnb")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child, args.dir)))
        return

    sys.path.insert(0, str(Path(__file__).parent))
    from synthetic_checkpoint import synthetic_checkpoint

    directory = Path(args.dir) if args.dir else synthetic_checkpoint(args.size)
    size = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    print(f"checkpoint {directory} ({size / GB:.2f} GB bf16), cpu threads {os.cpu_count()}")
    warm_page_cache(directory)
    runs = ["ours", "ours-fp32"] + ([] if args.skip_peer else ["peer"])
    results = {}
    for which in runs:
        print(f"-- {which} --", flush=True)
        results[which] = spawn(which, directory)
    print()
    print(
        "| loader | load time (s) | peak RSS (GB) | RSS after load (GB) | RSS after imports (GB) |"
    )
    print("|---|---|---|---|---|")
    names = {
        "ours": "qlora load_model nf4+DQ (bf16 embeddings/head)",
        "ours-fp32": "qlora load_model nf4+DQ (fp32 embeddings/head)",
        "peer": "transformers + bitsandbytes 4-bit nf4+DQ",
    }
    for which, r in results.items():
        if "error" in r:
            print(f"| {names[which]} | failed: {r['error']} | | | |")
            continue
        print(
            f"| {names[which]} | {r['seconds']:.1f} | {r['peak_rss'] / GB:.2f} | "
            f"{r['final_rss'] / GB:.2f} | {r['baseline_rss'] / GB:.2f} |"
        )
    summary: dict[str, object] = {"bench": "load", "size": args.size, "checkpoint_gb": size / GB}
    ours = results["ours"]
    if "error" not in ours:
        summary["ours_peak_rss_gb"] = ours["peak_rss"] / GB
        summary["ours_seconds"] = ours["seconds"]
        summary["target_peak_rss_le_5gb"] = ours["peak_rss"] / GB <= 5.0
    peer = results.get("peer")
    if peer and "error" not in peer and "error" not in ours:
        summary["peer_peak_rss_gb"] = peer["peak_rss"] / GB
        summary["peer_seconds"] = peer["seconds"]
        summary["peak_rss_ratio_ours_over_peer"] = ours["peak_rss"] / peer["peak_rss"]
        summary["time_ratio_peer_over_ours"] = peer["seconds"] / ours["seconds"]
        summary["same_nf4_bytes_as_peer"] = ours["layer0_q_proj_hash"] == peer["layer0_q_proj_hash"]
        print(
            f"\npeak RSS ours/peer = {summary['peak_rss_ratio_ours_over_peer']:.2f}, "
            f"load time peer/ours = {summary['time_ratio_peer_over_ours']:.2f}x, "
            f"layer-0 q_proj NF4 bytes identical: {summary['same_nf4_bytes_as_peer']}"
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
