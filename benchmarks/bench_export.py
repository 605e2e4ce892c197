"""Merged GGUF export: wall time and peak memory, ours against transformers' own route.

Each measured export runs in its own subprocess, so its peak resident set (``VmHWM``, read
through `qlora.procinfo`: interpreter, imports, loading and export included) is its alone:

* ours: ``qlora.load_model(src, "nf4")`` + ``qlora.add_lora`` (r=16, alpha=32, all-linear,
  B drawn N(0, 0.01) so the merge is not a no-op) + ``qlora.export_gguf(model, out,
  tokenizer, type=T, fidelity=False)``: one ``.gguf`` file, adapter folded in.
* peer (transformers' route): ``AutoModelForCausalLM.from_pretrained`` (16-bit; the
  default model's converted directory is float32) + PEFT ``get_peft_model`` (the same LoRA)
  + ``merge_and_unload()`` + ``save_pretrained`` (safetensors, f16). Turning that directory
  into a GGUF needs llama.cpp's ``convert_hf_to_gguf.py``; with ``--convert-script`` (or when
  the llama-cpp-python sdist is found in pip's cache) it is run too, otherwise the table says
  the peer stops at the f16 HF directory.
* llama.cpp's quantizer (``llama_cpp.llama_model_quantize``, the ``llama-quantize`` of the
  installed llama-cpp-python) on our f16 GGUF -> q4_0 / q8_0: the last step of the usual
  route (merge, convert to f16, quantize), timed by itself.

Default model: ``smollm2-135m``, every type repeated ``--repeats`` times (medians). With
``--7b``: the Llama-2-7B-shaped synthetic checkpoint of ``synthetic_checkpoint.py``
(written on first use, ~13.5 GB, a few minutes), once per ``--7b-types``, with a synthetic
32000-token byte-level BPE tokenizer (the checkpoint has none; the tokenizer's metadata is
<1% of the file). The 7B peer loads the whole bf16 model (~14 GB+ of RAM): only with
``--peer-7b``. Target: 7B merged q4_0 in <= 10 minutes at <= 6 GB peak RSS.

    python benchmarks/bench_export.py [--repeats 3] [--7b] [--7b-types q4_0,f16] [--peer-7b]

The CPUs may be shared with other jobs: timings are noisy; peaks are not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Imported by every child too, before torch: reading a number must not cost memory.
from qlora.procinfo import peak_rss_bytes, rss_bytes

GB = 1e9
TARGET_7B_SECONDS = 600.0
TARGET_7B_PEAK_GB = 6.0
LORA_R, LORA_ALPHA, LORA_B_STD = 16, 32.0, 0.01
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# -- the children ---------------------------------------------------------------------------


def synthetic_tokenizer(vocab_size: int, seed: int = 0) -> Any:
    """A byte-level BPE tokenizer of exactly ``vocab_size`` tokens (ChatML specials first).

    Merges pair random earlier tokens, so the vocabulary and merge list have a real
    tokenizer's sizes (Llama-2: 32000 tokens) without training on any text.
    """
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(tokens)}
    pieces = [t for t in tokens if t not in specials]
    merges: list[tuple[str, str]] = []
    rng = random.Random(seed)
    while len(vocab) < vocab_size:
        a, b = rng.choice(pieces), rng.choice(pieces)
        if len(a) + len(b) > 8 or a + b in vocab:
            continue
        vocab[a + b] = len(vocab)
        pieces.append(a + b)
        merges.append((a, b))
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return fast


def _randomize_b(named_b: Any) -> None:
    """Draw every LoRA B from N(0, LORA_B_STD): B = 0 would make the merge a no-op."""
    import torch

    generator = torch.Generator().manual_seed(0)
    for weight in named_b:  # [out, r]
        weight.data.copy_(torch.randn(weight.shape, generator=generator) * LORA_B_STD)


class _Timer:
    """Seconds spent inside wrapped functions (profiling the export's phases in place)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, owner: Any, attr: str, key: str) -> None:
        inner = getattr(owner, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start

        setattr(owner, attr, timed)


def _cpu_seconds() -> float:
    """User + system CPU time of this process: a fairer clock than wall on a shared box."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child_ours(src: str, qtype: str, out: str, synthetic: bool) -> dict:
    start = time.perf_counter()
    import gguf
    import torch

    import qlora
    from qlora.export import gguf_model

    baseline = rss_bytes()
    model, tokenizer = qlora.load_model(src, "nf4", tokenizer=not synthetic, progress=False)
    if synthetic:
        tokenizer = synthetic_tokenizer(int(model.config.vocab_size))
    loaded, load_cpu = time.perf_counter(), _cpu_seconds()
    load_peak = peak_rss_bytes()
    torch.manual_seed(0)
    qlora.add_lora(model, qlora.LoraConfig(r=LORA_R, alpha=LORA_ALPHA, dropout=0.0))
    _randomize_b(
        m.lora_B["default"].weight for m in model.modules() if isinstance(m, qlora.LoRALinear)
    )
    # Where the export's time goes: building each tensor (dequantize + merge + permute) and
    # quantizing it are both inside _array; writing is the rest.
    timer = _Timer()
    timer.wrap(gguf_model, "_array", "tensors")
    timer.wrap(gguf.quants, "quantize", "quantize")
    exported = time.perf_counter()
    qlora.export_gguf(model, out, tokenizer, type=qtype, fidelity=False, progress=False)
    end = time.perf_counter()
    tensors, quantize = timer.seconds.get("tensors", 0.0), timer.seconds.get("quantize", 0.0)
    return {
        "load_s": loaded - start,  # imports included: what a user waits for
        "lora_s": exported - loaded,
        "export_s": end - exported,
        "make_s": tensors - quantize,  # dequantize + merge + permute, per tensor
        "quantize_s": quantize,
        "write_s": (end - exported) - tensors,  # metadata, tokenizer, bytes to disk
        "total_s": end - start,
        "load_cpu_s": load_cpu,
        "cpu_s": _cpu_seconds(),
        "peak_rss": peak_rss_bytes(),
        "load_peak_rss": load_peak,
        "baseline_rss": baseline,
        "out_bytes": Path(out).stat().st_size,
    }


def child_peer(src: str, out: str, big: bool, convert: str | None, convert_type: str) -> dict:
    start = time.perf_counter()
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    baseline = rss_bytes()
    # The 7B is stored bf16 (16 GB+ in float32 would not fit next to the others' jobs);
    # the default model's converted directory is float32.
    dtype = torch.bfloat16 if big else torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, device_map="cpu")
    loaded = time.perf_counter()
    load_peak = peak_rss_bytes()
    torch.manual_seed(0)
    config = LoraConfig(r=LORA_R, lora_alpha=int(LORA_ALPHA), target_modules=ALL_LINEAR)
    model = get_peft_model(model, config)
    _randomize_b(p for n, p in model.named_parameters() if "lora_B" in n)
    merged_at = time.perf_counter()
    merged = model.merge_and_unload().to(torch.float16)
    hf_dir = Path(out)
    merged.save_pretrained(hf_dir, safe_serialization=True)
    saved = time.perf_counter()
    del model, merged
    result = {
        "cpu_s": _cpu_seconds(),
        "load_s": loaded - start,
        "lora_s": merged_at - loaded,
        "export_s": saved - merged_at,  # merge_and_unload + f16 + save_pretrained
        "total_s": saved - start,
        "peak_rss": peak_rss_bytes(),
        "load_peak_rss": load_peak,
        "baseline_rss": baseline,
        "out_bytes": sum(p.stat().st_size for p in hf_dir.glob("*.safetensors")),
    }
    if convert:  # llama.cpp's converter runs in its own process: its own peak
        gguf_out = hf_dir / f"model-{convert_type}.gguf"
        cmd = [sys.executable, convert, str(hf_dir), "--outfile", str(gguf_out)]
        cmd += ["--outtype", convert_type]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        result["convert_s"] = time.perf_counter() - t
        result["convert_rc"] = proc.returncode
        result["convert_tail"] = proc.stderr[-400:]
        if proc.returncode == 0:
            result["gguf_bytes"] = gguf_out.stat().st_size
    return result


def child_llama_quantize(src: str, qtype: str, out: str) -> dict:
    """llama.cpp's own quantizer (llama-quantize) on an f16 GGUF."""
    start = time.perf_counter()
    import llama_cpp

    baseline = rss_bytes()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}.get(
        qtype, llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    )
    params.nthread = os.cpu_count() or 1
    began = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(src.encode(), out.encode(), params)
    end = time.perf_counter()
    return {
        "load_s": began - start,
        "export_s": end - began,
        "total_s": end - start,
        "cpu_s": _cpu_seconds(),
        "rc": int(rc),
        "peak_rss": peak_rss_bytes(),
        "baseline_rss": baseline,
        "out_bytes": Path(out).stat().st_size if rc == 0 else 0,
    }


# -- the parent -----------------------------------------------------------------------------


def spawn(args: list[str], timeout: float) -> dict:
    """Run one child; its last stdout line is its JSON result."""
    cmd = [sys.executable, __file__, *args]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over the {timeout:.0f} s limit"}
    if proc.returncode != 0:
        return {"error": f"exit code {proc.returncode}"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - start  # interpreter start included
    return result


def median_of(runs: list[dict]) -> dict:
    """Field-wise median of numeric fields over the runs that succeeded."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1]
    out = dict(ok[-1])
    for key, value in ok[-1].items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = statistics.median(r[key] for r in ok)
    out["repeats"] = len(ok)
    return out


def cpu_line() -> str:
    model, flags = platform.processor() or "?", ""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            info = f.read()
        for line in info.splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                have = line.split(":", 1)[1].split()
                flags = " ".join(x for x in ("avx2", "fma", "f16c", "avx512f") if x in have)
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} threads, flags: {flags or '?'}"


def find_convert_script() -> str | None:
    """llama.cpp's convert_hf_to_gguf.py if it is on this machine (pip cache, /tmp)."""
    for root in (Path.home() / ".cache" / "pip", Path("/tmp")):
        for path in root.glob("**/convert_hf_to_gguf.py") if root.is_dir() else []:
            return str(path)
    return None


def row(label: str, r: dict) -> str:
    if "error" in r:
        return f"| {label} | failed: {r['error']} | | | | | | |"
    size = r.get("out_bytes", 0) / 2**20
    return (
        f"| {label} | {r.get('load_s', 0):.1f} | {r.get('export_s', 0):.1f} | "
        f"{r['total_s']:.1f} | {r.get('cpu_s', 0):.1f} | {r['peak_rss'] / GB:.2f} | "
        f"{size:,.0f} MiB | "
        f"{r.get('repeats', 1)} |"
    )


def breakdown(label: str, r: dict) -> str:
    if "error" in r or "make_s" not in r:
        return ""
    return (
        f"  {label}: dequantize+merge {r['make_s']:.1f} s, quantize {r['quantize_s']:.1f} s, "
        f"write {r['write_s']:.1f} s, add_lora {r['lora_s']:.1f} s; "
        f"peak after load {r['load_peak_rss'] / GB:.2f} GB"
    )


def run_model(
    label: str, src: str, types: list[str], repeats: int, peer: bool, big: bool, a: Any
) -> dict:
    results: dict[str, dict] = {}
    limit = 3600.0 if big else 900.0
    with tempfile.TemporaryDirectory(prefix="bench-export-", dir=a.tmp) as tmp:
        for qtype in types:
            runs = []
            for k in range(repeats):
                out = str(Path(tmp) / f"ours-{qtype}-{k}.gguf")
                print(f"-- {label} ours {qtype} ({k + 1}/{repeats})", flush=True)
                cmd = ["--child", "ours", "--src", src, "--type", qtype, "--out", out]
                runs.append(spawn(cmd + (["--synthetic"] if big else []), limit))
                if qtype != "f16" or k < repeats - 1:
                    Path(out).unlink(missing_ok=True)
            results[f"ours {qtype}"] = median_of(runs)
        f16 = Path(tmp) / f"ours-f16-{repeats - 1}.gguf"
        wanted = [t for t in types if t in ("q4_0", "q8_0") and not a.skip_llama_quantize]
        for qtype in wanted if f16.is_file() else []:
            print(f"-- {label} llama.cpp quantize f16 -> {qtype}", flush=True)
            out = str(Path(tmp) / f"llama-{qtype}.gguf")
            cmd = ["--child", "llama-quantize", "--src", str(f16), "--type", qtype, "--out", out]
            results[f"llama.cpp quantize {qtype}"] = median_of(
                [spawn(cmd, limit) for _ in range(1 if big else repeats)]
            )
            Path(out).unlink(missing_ok=True)
        if peer:
            runs = []
            for k in range(1 if big else repeats):
                print(f"-- {label} peer ({k + 1})", flush=True)
                out = str(Path(tmp) / f"peer-{k}")
                cmd = ["--child", "peer", "--src", src, "--out", out]
                cmd += (["--big"] if big else []) + (["--convert", a.convert] if a.convert else [])
                runs.append(spawn(cmd, limit))
            results["peer"] = median_of(runs)
    return results


def report(label: str, results: dict, convert: str | None) -> None:
    print(f"\n### {label}\n")
    print("| arm | load (s) | export (s) | total (s) | CPU (s) | peak RSS (GB) | output | runs |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for arm, r in results.items():
        name = arm
        if arm == "peer":
            name = "peer: transformers + PEFT merge_and_unload + save_pretrained (f16)"
        elif arm.startswith("llama.cpp"):
            name = f"{arm} (from our f16 GGUF; 'load' = import)"
        print(row(name, r))
    for arm, r in results.items():
        if line := breakdown(arm, r):
            print(line)
    peer = results.get("peer")
    if peer and "error" not in peer:
        if convert and "convert_s" in peer:
            print(f"  peer + convert_hf_to_gguf.py: {peer['convert_s']:.1f} s more")
        else:
            print(
                "  the peer stops at an f16 HF directory: llama.cpp's convert_hf_to_gguf.py "
                "is not on this machine (pass --convert-script), so its convert step is "
                "not counted"
            )
        for arm, r in results.items():
            if arm.startswith("ours") and "error" not in r:
                print(
                    f"  {arm} / peer: time {r['total_s'] / peer['total_s']:.2f}, "
                    f"peak RSS {r['peak_rss'] / peer['peak_rss']:.2f}"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="the default-model arm")
    parser.add_argument("--types", default="f16,q8_0,q4_0")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-default", action="store_true", help="only the 7B arm")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument(
        "--skip-llama-quantize", action="store_true", help="skip llama.cpp's quantizer arm"
    )
    parser.add_argument("--7b", dest="big", action="store_true", help="the 7B-shaped arm")
    parser.add_argument("--7b-types", dest="big_types", default="q4_0")
    parser.add_argument("--peer-7b", action="store_true", help="the 7B peer (needs ~14 GB+)")
    parser.add_argument("--convert-script", dest="convert", help="llama.cpp convert_hf_to_gguf")
    parser.add_argument("--tmp", help="where outputs go (deleted after); default: system tmp")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--src", help=argparse.SUPPRESS)
    parser.add_argument("--type", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--synthetic", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--big", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--convert", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.child == "ours":
        print(json.dumps(child_ours(a.src, a.type, a.out, a.synthetic)))
        return
    if a.child == "peer":
        print(json.dumps(child_peer(a.src, a.out, a.big, a.convert, "f16")))
        return
    if a.child == "llama-quantize":
        print(json.dumps(child_llama_quantize(a.src, a.type, a.out)))
        return
    a.convert = a.convert or find_convert_script()
    print(f"cpu: {cpu_line()}")
    print("the CPUs may be shared with other jobs: times are noisy, peaks are not")
    print(f"llama.cpp convert_hf_to_gguf.py: {a.convert or 'not found on this machine'}")
    summary: dict[str, Any] = {"bench": "export", "cpu": cpu_line()}
    if not a.skip_default:
        from qlora.models.registry import gguf_to_hf, registered_path

        gguf_file = registered_path(a.model)
        src = str(gguf_to_hf(gguf_file)) if gguf_file else a.model
        types = a.types.split(",")
        results = run_model(a.model, src, types, a.repeats, not a.skip_peer, False, a)
        report(f"{a.model} ({src})", results, a.convert)
        summary["default"] = results
    if a.big:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from synthetic_checkpoint import synthetic_checkpoint

        t = time.perf_counter()
        print("7B: the synthetic checkpoint is written once (~13.5 GB, a few minutes)")
        directory = synthetic_checkpoint("7b")
        print(f"7B checkpoint {directory} ready in {time.perf_counter() - t:.0f} s")
        if not a.peer_7b:
            print("7B peer skipped: it loads the whole bf16 model (~14 GB+); --peer-7b runs it")
        results = run_model("7b", str(directory), a.big_types.split(","), 1, a.peer_7b, True, a)
        report(f"Llama-2-7B shapes ({directory})", results, a.convert)
        summary["7b"] = results
        ours = results.get("ours q4_0")
        if ours and "error" not in ours:
            summary["7b_q4_0_target_met"] = (
                ours["total_s"] <= TARGET_7B_SECONDS and ours["peak_rss"] / GB <= TARGET_7B_PEAK_GB
            )
            print(
                f"\n7B q4_0: {ours['total_s']:.0f} s (target <= {TARGET_7B_SECONDS:.0f}), "
                f"peak {ours['peak_rss'] / GB:.2f} GB (target <= {TARGET_7B_PEAK_GB:.0f}): "
                + ("MET" if summary["7b_q4_0_target_met"] else "NOT MET")
            )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
