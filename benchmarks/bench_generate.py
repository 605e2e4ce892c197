"""Decode speed: batch-1 and batch-8 greedy generation, ours against transformers + bitsandbytes
and llama.cpp (issue 16's baseline).

The workload: the default model (SmolLM2-135M-Instruct), a fixed chat prompt rendered by the
chat template through `qlora.generate.prompt_tensor` (the encoding training uses; ~32 tokens:
a one-line system message and a short question), ``--new-tokens`` (default 128) new tokens,
greedy. EOS never ends a sequence early: ``min_new_tokens = max_new_tokens`` for
``generate``; llama-cpp-python's ``Llama.generate`` does not stop on EOS by itself. Batch 8 is
8 *different* questions padded on the left (their lengths differ by a few tokens); batch 1 is
the first of them. The arms, each in its own fresh subprocess:

    ours-nf4 / ours-int8 / ours-fp32   qlora.load_model(quant=nf4 (double quant) | int8 | None)
                   decoded by ``qlora.models.batch_decode.BatchDecoder`` (what
                   `qlora.generate.generate_text` runs): batch 8 is 8 rows of different
                   prompt lengths (no padding), each prefilled alone, then one step per token
                   for all rows; EOS is masked (as ``min_new_tokens`` does for ``generate``).
                   Each ours arm also runs ``model.generate`` inside ``qlora.nn.fast_decoding``
                   (the previous path) on the same prompts, left-padded: an extra line.
                   ours-nf4 also times ``generate_text`` itself once (batch 1, EOS allowed)
    ...-lora       the same with an unmerged adapter: qlora.add_lora(LoraConfig(r=16,
                   dropout=0)) with every B drawn N(0, 0.01) (B = 0 would be a no-op); the
                   batch decoder's rows carry it as ``adapter_weights(model, "default")``
    hf-fp32        transformers' AutoModelForCausalLM, float32, on the converted directory
                   ours loads: the greedy reference for ours-fp32
    bnb-nf4-fp32 / bnb-nf4-bf16   transformers + BitsAndBytesConfig(nf4, double quant,
                   compute dtype float32 | bfloat16)
    llamacpp-q4_1  llama-cpp-python on the default model's own Q4_1 GGUF, n_threads = torch's
                   thread count; batch 1 through ``Llama.generate`` (top_k=1, temp 0);
                   batch 8 as ONE multi-sequence ``llama_batch`` through llama.cpp's C API
                   (``llama_decode``, one seq_id per prompt, argmax of each row's logits: the
                   high-level API batches only embeddings), and also as 8 sequential
                   ``Llama.generate`` requests (a ratio line; what a one-at-a-time server does)
    ours-gguf      (only when named) quant="gguf": the GGUF's own Q4_1 blocks as our base

Each child reports, per batch size: time to first token (the ``generate`` call, or the first
prefill, to the first new token of every row: prefill + first step), decode tokens/s per
sequence (new tokens after the first, over the time after the first) and aggregate
(x batch), the greedy tokens; and the process's
peak RSS (``VmHWM``: imports, load and both batches). One unmeasured 2-token generation warms
each batch size first. ``--profile ARM`` instead runs ARM for 16 tokens (batch 1) under
torch.profiler and splits the decode time: dequantize, matmuls, attention, other torch ops,
Python / framework overhead.

    python benchmarks/bench_generate.py [--new-tokens 128] [--batches 1,8]
        [--arms ours-nf4,llamacpp-q4_1] [--threads N] [--profile ours-nf4] [--markdown F]

``--threads`` (default: every core) sets torch's, the C kernels' (OpenMP) and llama.cpp's
threads. On a machine shared with other jobs, use ``--threads 1``: OpenMP's spinning barriers
with a descheduled partner thread made ours-nf4 decode ~8x slower at 2 threads than at 1 on
a loaded 2-core box (one parallel region per layer per token). The profile's 16 tokens
include the prompt's prefill.

Prints the CPU, a table, the ratios the issue's targets are about, BatchDecoder against
``generate()`` for each ours arm, greedy equality of ours-fp32 against hf-fp32 and of each
ours arm's BatchDecoder against its own ``generate()``, and one JSON line. Exits 0 whatever
the numbers (a benchmark measures). On a shared machine timings are noisy; peaks are not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from chat_workload import LORA_B_STD, LORA_R, QUESTIONS, SYSTEM

MODEL = "smollm2-135m"
ARMS = (
    "ours-nf4",
    "ours-nf4-lora",
    "ours-int8",
    "ours-int8-lora",
    "ours-fp32",
    "ours-fp32-lora",
    "hf-fp32",
    "bnb-nf4-fp32",
    "bnb-nf4-bf16",
    "llamacpp-q4_1",
)
EXTRA_ARMS = ("ours-gguf", "ours-gguf-lora")
PROFILE_TOKENS = 16


# -- the children ---------------------------------------------------------------------------


def _prompts(tokenizer: Any) -> list[list[int]]:
    """The 8 prompts' token ids, as `qlora.generate` encodes a chat prompt."""
    from qlora.generate import prompt_tensor

    return [
        prompt_tensor(
            tokenizer, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
        )[0].tolist()
        for q in QUESTIONS
    ]


def _left_padded(prompts: list[list[int]], pad: int) -> tuple[Any, Any]:
    """ids [B, T] and attention mask [B, T], padded on the left to the longest prompt."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    return ids, mask


def _randomize_b(model: Any) -> None:
    """Draw every LoRA B from N(0, LORA_B_STD) so the adapter changes the output."""
    import torch

    generator = torch.Generator().manual_seed(0)
    for name, weight in model.named_parameters():
        if "lora_B" in name:  # [out, r]
            weight.data.copy_(torch.randn(weight.shape, generator=generator) * LORA_B_STD)


def _load(arm: str) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) for a transformers-style arm."""
    import torch

    if arm.startswith("ours"):
        import qlora

        kind = arm.split("-")[1]
        quant = {"nf4": "nf4", "int8": "int8", "fp32": None, "gguf": "gguf"}[kind]
        source = MODEL
        if kind == "gguf":
            from qlora.models.registry import registered_path

            source = str(registered_path(MODEL))
        model, tokenizer = qlora.load_model(
            source, quant, double_quant=True if quant in ("nf4", "int8") else None, progress=False
        )
        if arm.endswith("-lora"):
            torch.manual_seed(0)
            qlora.add_lora(model, qlora.LoraConfig(r=LORA_R, dropout=0.0))
            _randomize_b(model)
        return model.eval(), tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from qlora.models import resolve_checkpoint

    directory = resolve_checkpoint(MODEL)  # the same safetensors ours loads
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if arm.startswith("bnb"):
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if arm.endswith("bf16") else torch.float32,
        )
    model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    return model.eval(), AutoTokenizer.from_pretrained(directory)


class _Clock:
    """A transformers streamer that only timestamps: put() is called once with the prompt,
    then once per decoding step with that step's tokens [B]."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _hf_generate(model: Any, ids: Any, mask: Any, pad: int, new: int) -> dict[str, Any]:
    import torch
    from transformers.generation.streamers import BaseStreamer

    from qlora.nn import fast_decoding  # what generate_text runs in (no-op for other models)

    clock = type("Clock", (_Clock, BaseStreamer), {})()
    with torch.no_grad(), fast_decoding():
        start = time.perf_counter()
        out = model.generate(
            ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=new,
            min_new_tokens=new,  # EOS never ends a sequence early
            pad_token_id=pad,
            streamer=clock,
        )
        end = time.perf_counter()
    first = clock.times[1]  # times[0]: the prompt handed to the streamer
    steps = len(clock.times) - 2
    return {
        "ttft_s": first - start,
        "decode_s": end - first,
        "decode_tok_s": steps / (clock.times[-1] - first) if steps else float("nan"),
        "new_tokens": out.shape[1] - ids.shape[1],
        "tokens": out[:, ids.shape[1] :].tolist(),
    }


def _argmax(logits: Any, banned: list[int]) -> list[int]:
    """Greedy tokens of logits [B, V] with the ``banned`` ids (EOS) never chosen."""
    logits[:, banned] = float("-inf")
    return logits.argmax(dim=-1).tolist()


def _ours_decode(
    model: Any, prompts: list[list[int]], new: int, adapter: Any, banned: list[int]
) -> dict[str, Any]:
    """``new`` greedy tokens for every prompt on a BatchDecoder (one row per prompt)."""
    import torch

    from qlora.models.batch_decode import BatchDecoder

    decoder = BatchDecoder(model, max_batch=len(prompts))
    # Prepared once, as a server does per adapter: every row shares it (one adapter group).
    adapter = None if adapter is None else decoder.prepare(adapter)
    with torch.inference_mode():  # the decoder's logits are inference tensors
        start = time.perf_counter()
        logits = torch.stack([decoder.prefill(p, adapter) for p in prompts])  # [B, V]
        tokens = [[t] for t in _argmax(logits, banned)]  # [B][1]
        first = time.perf_counter()
        for _ in range(new - 1):
            logits = decoder.step([seq[-1] for seq in tokens])  # [B, V]
            for seq, t in zip(tokens, _argmax(logits, banned), strict=True):
                seq.append(t)
        end = time.perf_counter()
    return {
        "ttft_s": first - start,
        "decode_s": end - first,
        "decode_tok_s": (new - 1) / (end - first),
        "new_tokens": new,
        "tokens": tokens,
    }


def _ours_decoder_args(model: Any, tokenizer: Any, arm: str) -> tuple[Any, list[int]]:
    """(the row adapter, the EOS ids to mask) of an ours arm."""
    from qlora.generate import stop_ids
    from qlora.models.batch_decode import adapter_weights

    adapter = adapter_weights(model, "default") if arm.endswith("-lora") else None
    return adapter, sorted(stop_ids(model, tokenizer))


OVERHEAD_ROUNDS, OVERHEAD_STEPS = 15, 4


def _adapter_overhead(model: Any, prompts: list[list[int]], adapter: Any, batch: int) -> dict:
    """A decode step with the adapter on every row against the same step without it, both in
    this process, interleaved round by round (OVERHEAD_ROUNDS x OVERHEAD_STEPS steps each),
    medians: the adapter's own cost, with less of the machine's noise than two processes'
    totals."""
    import statistics

    import torch

    from qlora.models.batch_decode import BatchDecoder

    decoders = {}
    with torch.inference_mode():
        for name, weights in (("base", None), ("adapter", adapter)):
            decoder = BatchDecoder(model, max_batch=batch)
            prepared = None if weights is None else decoder.prepare(weights)
            for prompt in prompts[:batch]:
                decoder.prefill(prompt, prepared)
            decoders[name] = decoder
        times: dict[str, list[float]] = {name: [] for name in decoders}
        for _ in range(OVERHEAD_ROUNDS):
            for name, decoder in decoders.items():
                start = time.perf_counter()
                for _ in range(OVERHEAD_STEPS):
                    decoder.step([1] * batch)
                times[name].append((time.perf_counter() - start) / OVERHEAD_STEPS)
    step = {name: statistics.median(t) for name, t in times.items()}
    return {
        "step_ms": {name: t * 1e3 for name, t in step.items()},
        "overhead": step["adapter"] / step["base"] - 1,
    }


def _hf_arm(arm: str, args: argparse.Namespace) -> dict[str, Any]:
    model, tokenizer = _load(arm)
    prompts = _prompts(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    result: dict[str, Any] = {"prompt_tokens": [len(p) for p in prompts]}
    ours = arm.startswith("ours")
    for batch in args.batches:
        ids, mask = _left_padded(prompts[:batch], pad)
        _hf_generate(model, ids, mask, pad, 2)  # warm-up, unmeasured
        run = _hf_generate(model, ids, mask, pad, args.new_tokens)
        run["aggregate_tok_s"] = run["decode_tok_s"] * batch
        if ours:  # generate() is the extra line; the batch decoder is the arm's number
            result.setdefault("generate", {})[f"b{batch}"] = run
            adapter, banned = _ours_decoder_args(model, tokenizer, arm)
            _ours_decode(model, prompts[:batch], 2, adapter, banned)  # warm-up
            run = _ours_decode(model, prompts[:batch], args.new_tokens, adapter, banned)
            run["aggregate_tok_s"] = run["decode_tok_s"] * batch
            if adapter is not None:
                run["adapter_overhead"] = _adapter_overhead(model, prompts, adapter, batch)
        result[f"b{batch}"] = run
    if arm == "ours-nf4":
        result["public"] = _public_path(model, tokenizer, args.new_tokens)
    return result


def _public_path(model: Any, tokenizer: Any, new: int) -> dict[str, Any]:
    """`qlora.generate.generate_text` once, batch 1 (it lets EOS end the reply)."""
    import io

    from qlora.generate import generate_text

    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[0]}]
    start = time.perf_counter()
    reply = generate_text(model, tokenizer, messages, max_new_tokens=new, stream=io.StringIO())
    wall = time.perf_counter() - start
    tokens = len(tokenizer(reply, add_special_tokens=False)["input_ids"])  # ~ tokens produced
    return {"wall_s": wall, "reply_tokens": tokens, "tok_s": tokens / wall}


def _llamacpp_run(llm: Any, prompt: list[int], new: int) -> dict[str, Any]:
    llm.reset()  # no KV-cache prefix reuse between requests: every prompt is evaluated
    start = time.perf_counter()
    times, tokens = [], []
    for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        times.append(time.perf_counter())
        tokens.append(token)
        if len(tokens) == new:
            break
    return {"ttft_s": times[0] - start, "decode_s": times[-1] - times[0], "tokens": tokens}


def _llamacpp_arm(args: argparse.Namespace) -> dict[str, Any]:
    import llama_cpp  # ImportError: the parent reports the arm as skipped
    from transformers import AutoTokenizer

    from qlora.models import resolve_checkpoint
    from qlora.models.registry import registered_path

    # The same prompt ids as every other arm: the GGUF carries the same vocabulary.
    prompts = _prompts(AutoTokenizer.from_pretrained(resolve_checkpoint(MODEL)))
    llm = llama_cpp.Llama(
        model_path=str(registered_path(MODEL)),
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_ctx=256,
        verbose=False,
    )
    _llamacpp_run(llm, prompts[0], 2)  # warm-up
    result: dict[str, Any] = {"prompt_tokens": [len(p) for p in prompts]}
    for batch in args.batches:
        if batch > 1:
            result[f"b{batch}"] = _llamacpp_batched(
                llm, prompts[:batch], args.new_tokens, args.threads
            )
        runs = [_llamacpp_run(llm, p, args.new_tokens) for p in prompts[:batch]]
        steps = sum(len(r["tokens"]) - 1 for r in runs)
        decode = sum(r["decode_s"] for r in runs)
        # Sequential requests: per-sequence speed is the aggregate; TTFT is each request's own
        # (a queued request would also wait for those before it).
        result[f"b{batch}-sequential" if batch > 1 else f"b{batch}"] = {
            "ttft_s": sum(r["ttft_s"] for r in runs) / batch,
            "decode_s": decode,
            "decode_tok_s": steps / decode,
            "aggregate_tok_s": steps / decode,
            "new_tokens": len(runs[0]["tokens"]),
            "tokens": [r["tokens"] for r in runs],
        }
    return result


def _llamacpp_batched(llm: Any, prompts: list[list[int]], new: int, threads: int) -> dict:
    """Greedy decode of the prompts as one multi-sequence batch through llama.cpp's C API
    (``llama_batch`` with one seq_id per prompt): the high-level API batches only embeddings.
    """
    import ctypes

    import llama_cpp
    import numpy as np

    # Llama's own context settings (flash attention off, rope from the model...), so the
    # batch differs from the arm's single requests only in batching.
    params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
    params.n_ctx = 256 * len(prompts)  # a non-unified KV cache gives each sequence n_ctx / n
    params.n_batch = params.n_ubatch = 512
    params.n_seq_max = len(prompts)
    params.n_threads = params.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
    batch = llama_cpp.llama_batch_init(512, 0, len(prompts))
    n_vocab = llm.n_vocab()

    def decode(items: list[tuple[int, int, int, bool]]) -> list[int]:
        """items: (token, position, sequence, wants logits) -> argmax per wanted row."""
        batch.n_tokens = len(items)
        for j, (token, pos, seq, logits) in enumerate(items):
            batch.token[j], batch.pos[j], batch.n_seq_id[j] = token, pos, 1
            batch.seq_id[j][0], batch.logits[j] = seq, logits
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        rows = [j for j, item in enumerate(items) if item[3]]
        return [
            int(
                np.ctypeslib.as_array(
                    ctypes.cast(
                        llama_cpp.llama_get_logits_ith(ctx, j), ctypes.POINTER(ctypes.c_float)
                    ),
                    shape=(n_vocab,),
                ).argmax()
            )
            for j in rows
        ]

    try:
        start = time.perf_counter()
        items = [(t, i, s, i == len(p) - 1) for s, p in enumerate(prompts) for i, t in enumerate(p)]
        tokens = [[t] for t in decode(items)]  # [B][1]
        first = time.perf_counter()
        for step in range(1, new):
            items = [
                (seq[-1], len(p) + step - 1, s, True)
                for s, (p, seq) in enumerate(zip(prompts, tokens, strict=True))
            ]
            for seq, t in zip(tokens, decode(items), strict=True):
                seq.append(t)
        end = time.perf_counter()
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
    return {
        "ttft_s": first - start,
        "decode_s": end - first,
        "decode_tok_s": (new - 1) / (end - first),
        "aggregate_tok_s": (new - 1) * len(prompts) / (end - first),
        "new_tokens": new,
        "tokens": tokens,
    }


def child(arm: str, args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    import torch

    from qlora.procinfo import peak_rss_bytes

    torch.set_num_threads(args.threads)
    result = _llamacpp_arm(args) if arm.startswith("llamacpp") else _hf_arm(arm, args)
    return {
        "arm": arm,
        "peak_mib": peak_rss_bytes() / 2**20,
        "threads": torch.get_num_threads(),
        "wall_s": time.perf_counter() - start,
        **result,
    }


# -- the profile ----------------------------------------------------------------------------


def _annotate(owner: Any, attr: str, label: str) -> None:
    """Wrap owner.attr in a torch.profiler label (in this process only)."""
    import torch

    inner = getattr(owner, attr)

    def labelled(*a: Any, **k: Any) -> Any:
        with torch.profiler.record_function(label):
            return inner(*a, **k)

    setattr(owner, attr, labelled)


def profile(arm: str, args: argparse.Namespace) -> dict[str, Any]:
    """ARM's batch-1 decode of PROFILE_TOKENS tokens split by where the time goes."""
    import torch
    from torch.profiler import ProfilerActivity

    import qlora.nn.qlinear as qlinear

    torch.set_num_threads(args.threads)
    model, tokenizer = _load(arm)
    prompt = _prompts(tokenizer)[:1]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask = _left_padded(prompt, pad)

    def run(new: int) -> dict[str, Any]:
        """The arm's decoder: the batch decoder for ours, ``generate`` for hf-fp32."""
        if arm.startswith("ours"):
            return _ours_decode(model, prompt, new, *_ours_decoder_args(model, tokenizer, arm))
        return _hf_generate(model, ids, mask, pad, new)

    run(2)
    plain = run(PROFILE_TOKENS)  # without the profiler's cost
    # The C dequantize kernel is no torch op: label the call that runs it (and DQ's absmax).
    _annotate(qlinear, "dequantize_for_matmul", "qlora::dequantize")
    _annotate(model.lm_head, "forward", "lm_head")
    with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        run(PROFILE_TOKENS)
        wall = time.perf_counter() - start
    events = {e.key: e for e in prof.key_averages()}

    def total(key: str) -> float:
        return events[key].cpu_time_total / 1e6 if key in events else 0.0

    def self_time(key: str) -> float:
        return events[key].self_cpu_time_total / 1e6 if key in events else 0.0

    torch_self = (
        sum(e.self_cpu_time_total for k, e in events.items() if k.startswith("aten::")) / 1e6
    )
    dequant = total("qlora::dequantize")
    matmul = sum(self_time(k) for k in ("aten::mm", "aten::addmm", "aten::bmm"))
    # The attention op's total holds its children's self times (aten ops, in torch_self too).
    attention = total("aten::scaled_dot_product_attention")
    dequant_ops = dequant - self_time("qlora::dequantize")  # torch ops inside: DQ absmax
    other = torch_self - matmul - dequant_ops - attention
    split = {
        "wall_s": wall,
        "wall_unprofiled_s": plain["ttft_s"] + plain["decode_s"],
        "dequantize_s": dequant,
        "matmul_s": matmul,
        "lm_head_total_s": total("lm_head"),
        "attention_s": attention,
        "other_torch_ops_s": other,
        "python_overhead_s": wall - dequant - matmul - attention - other,
    }
    top = sorted(events.values(), key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    return {
        "arm": arm,
        "tokens": PROFILE_TOKENS,
        "split": split,
        "top_self": [(e.key, e.count, e.self_cpu_time_total / 1e6) for e in top],
    }


# -- the parent -----------------------------------------------------------------------------


def _run_child(arm: str, args: argparse.Namespace, extra: list[str]) -> dict[str, Any] | str:
    """The child's JSON, or a one-line reason the arm was skipped."""
    command = [
        sys.executable,
        __file__,
        *extra,
        "--new-tokens",
        str(args.new_tokens),
        "--batches",
        ",".join(map(str, args.batches)),
        "--threads",
        str(args.threads),
    ]
    proc = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        if arm.startswith("llamacpp") and any("No module named 'llama_cpp'" in t for t in tail):
            return "llama-cpp-python is not installed (pip install llama-cpp-python): skipped"
        return f"failed: {' | '.join(tail)}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _table(rows: list[dict[str, Any]], batches: list[int]) -> str:
    head = "| arm | prompt tok |"
    rule = "|---|---:|"
    for b in batches:
        head += f" b{b} TTFT ms | b{b} tok/s/seq |" + (f" b{b} tok/s total |" if b > 1 else "")
        rule += "---:|---:|" + ("---:|" if b > 1 else "")
    lines = [head + " peak RSS MiB |", rule + "---:|"]
    for r in rows:
        line = f"| {r['arm']} | {r['prompt_tokens'][0]} |"
        for b in batches:
            run = r[f"b{b}"]
            line += f" {run['ttft_s'] * 1e3:.0f} | {run['decode_tok_s']:.1f} |"
            if b > 1:
                line += f" {run['aggregate_tok_s']:.1f} |"
        lines.append(line + f" {r['peak_mib']:.0f} |")
    return "\n".join(lines)


def _ratio_lines(rows: list[dict[str, Any]], batches: list[int]) -> list[str]:
    by = {r["arm"]: r for r in rows}
    lines = []
    speed = {b: {a: r[f"b{b}"]["aggregate_tok_s"] for a, r in by.items()} for b in batches}
    bnb = [a for a in ("bnb-nf4-fp32", "bnb-nf4-bf16") if a in by]
    best_bnb = max(bnb, key=lambda a: speed[batches[0]][a]) if bnb else None
    for b in batches:
        s = speed[b]
        for ours in ("ours-nf4", "ours-int8", "ours-fp32"):
            if ours not in by:
                continue
            if "llamacpp-q4_1" in by:
                target = " (target >= 0.5x, aim 1x)" if ours == "ours-nf4" and b == 1 else ""
                how = "" if b == 1 else " (one llama_batch)"
                lines.append(
                    f"batch {b}: {ours} / llama.cpp Q4_1{how} decode tok/s "
                    f"{s[ours] / s['llamacpp-q4_1']:.2f}x{target}"
                )
            if b > 1 and "llamacpp-q4_1" in by:
                seq = by["llamacpp-q4_1"][f"b{b}-sequential"]["aggregate_tok_s"]
                lines.append(
                    f"batch {b}: {ours} / llama.cpp Q4_1 as {b} sequential requests: aggregate "
                    f"tok/s {s[ours] / seq:.2f}x"
                )
            if best_bnb:
                target = " (target >= 2x)" if ours == "ours-nf4" and b == 1 else ""
                lines.append(
                    f"batch {b}: {ours} / {best_bnb} (the faster bnb) decode tok/s "
                    f"{s[ours] / s[best_bnb]:.2f}x{target}"
                )
            if f"{ours}-lora" in by:
                slow = s[ours] / s[f"{ours}-lora"] - 1
                lines.append(
                    f"batch {b}: {ours} + unmerged r={LORA_R} adapter adds {slow:+.1%} to decode "
                    f"time (two processes)"
                )
            overhead = by.get(f"{ours}-lora", {}).get(f"b{b}", {}).get("adapter_overhead")
            if overhead:
                ms = overhead["step_ms"]
                lines.append(
                    f"batch {b}: {ours} step {ms['base']:.2f} ms, with the r={LORA_R} adapter on "
                    f"every row {ms['adapter']:.2f} ms: {overhead['overhead']:+.1%} (one process, "
                    "interleaved medians; target <= +10%)"
                )
    for arm, r in by.items():
        for b in batches if "generate" in r else ():
            ours, gen = r[f"b{b}"]["decode_tok_s"], r["generate"][f"b{b}"]["decode_tok_s"]
            ttft = r[f"b{b}"]["ttft_s"] * 1e3, r["generate"][f"b{b}"]["ttft_s"] * 1e3
            lines.append(
                f"batch {b}: {arm} BatchDecoder {ours:.1f} tok/s/seq vs generate() under "
                f"fast_decoding {gen:.1f} ({ours / gen:.2f}x); TTFT {ttft[0]:.0f} vs "
                f"{ttft[1]:.0f} ms"
            )
    if len(bnb) == 2:
        b0 = batches[0]
        lines.append(
            f"bitsandbytes compute dtype on this CPU, batch {b0}: bf16 "
            f"{speed[b0]['bnb-nf4-bf16']:.1f} vs fp32 {speed[b0]['bnb-nf4-fp32']:.1f} tok/s"
        )
    if "ours-nf4" in by and best_bnb:
        lines.append(
            f"peak RSS: ours-nf4 / {best_bnb} "
            f"{by['ours-nf4']['peak_mib'] / by[best_bnb]['peak_mib']:.2f}x (target <= 1x)"
        )
    if "ours-nf4" in by and "public" in by["ours-nf4"]:
        p = by["ours-nf4"]["public"]
        lines.append(
            f"ours-nf4 through qlora.generate.generate_text (batch 1, EOS allowed): "
            f"{p['reply_tokens']} tokens in {p['wall_s']:.2f} s = {p['tok_s']:.1f} tok/s "
            "(prefill included)"
        )
    return lines


def _greedy_lines(rows: list[dict[str, Any]], batches: list[int]) -> list[str]:
    by = {r["arm"]: r for r in rows}
    lines = []
    pairs = [("ours-fp32", "hf-fp32", b, b) for b in batches]
    pairs += [("ours-nf4", "bnb-nf4-fp32", b, b) for b in batches]
    # llama.cpp's multi-sequence batch against the same prompts one at a time
    pairs += [("llamacpp-q4_1", "llamacpp-q4_1", b, f"{b}-sequential") for b in batches if b > 1]
    # each ours arm's batch decoder against its own generate() (left-padded at batch > 1)
    pairs += [
        (arm, arm, b, f"{b}-generate") for arm in by if "generate" in by[arm] for b in batches
    ]
    for ours, ref, b, rb in pairs:
        if ours in by and ref in by:
            a = by[ours][f"b{b}"]["tokens"]
            if rb == f"{b}-generate":
                r = by[ref]["generate"][f"b{b}"]["tokens"]
            else:
                r = by[ref][f"b{rb}"]["tokens"]
            same = sum(x == y for x, y in zip(a, r, strict=True))
            first = [
                next((i for i, (x, y) in enumerate(zip(p, q, strict=True)) if x != y), None)
                for p, q in zip(a, r, strict=True)
            ]
            verdict = (
                "MATCH" if same == len(a) else f"MISMATCH (first differing step per row: {first})"
            )
            how = {b: "", f"{b}-generate": " generate()"}.get(rb, " sequential")
            lines.append(
                f"greedy batch {b}: {ours} vs {ref}{how}: "
                f"{same}/{len(a)} sequences equal: {verdict}"
            )
    return lines


def _header(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    from qlora.kernels import describe

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            model = next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0]
    prompt = rows[0]["prompt_tokens"][0] if rows else "?"
    return (
        f"{model}, {os.cpu_count()} cores (load average {load:.1f}: shared), cpu features "
        f"{describe()['cpu features']}, {args.threads} threads per arm; "
        f"{args.new_tokens} new tokens greedy, batch-1 prompt {prompt} tokens"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes (<= 8)")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--profile", metavar="ARM", help="profile ARM's decode instead")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    parser.add_argument("--child", choices=ARMS + EXTRA_ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--child-profile", choices=ARMS + EXTRA_ARMS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.batches = [int(b) for b in args.batches.split(",") if b]
    if not args.batches or not all(1 <= b <= len(QUESTIONS) for b in args.batches):
        raise SystemExit(f"--batches: sizes between 1 and {len(QUESTIONS)}, e.g. 1,8")
    if args.new_tokens < 2:
        raise SystemExit("--new-tokens: at least 2 (a first token and one decode step)")
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    if args.child_profile:
        print(json.dumps(profile(args.child_profile, args)))
        return
    if args.profile:
        if args.profile not in ARMS + EXTRA_ARMS or args.profile.startswith(("llamacpp", "bnb")):
            raise SystemExit(f"--profile: one of ours-*/hf-fp32, got {args.profile!r}")
        out = _run_child(args.profile, args, ["--child-profile", args.profile])
        if isinstance(out, str):
            raise SystemExit(f"profile {args.profile}: {out}")
        split = out["split"]
        print(f"{args.profile}, batch 1, {PROFILE_TOKENS} new tokens under torch.profiler:")
        for key, value in split.items():
            share = f" ({value / split['wall_s']:.0%})" if not key.startswith("wall") else ""
            print(f"  {key:22s} {value:7.3f} s{share}")
        print(
            "  top self CPU:",
            *(f"{k} x{n}: {s:.3f} s" for k, n, s in out["top_self"]),
            sep="\n    ",
        )
        print(json.dumps(out))
        return
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS + EXTRA_ARMS]
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; choose from {', '.join(ARMS + EXTRA_ARMS)}")
    rows, skipped = [], []
    for arm in arms:
        print(f"running {arm} ...", file=sys.stderr)
        out = _run_child(arm, args, ["--child", arm])
        if isinstance(out, str):
            print(f"  {arm}: {out}", file=sys.stderr)
            skipped.append(f"{arm}: {out}")
            continue
        rows.append(out)
        b = args.batches[0]
        print(
            f"  batch {b}: TTFT {out[f'b{b}']['ttft_s'] * 1e3:.0f} ms, "
            f"{out[f'b{b}']['decode_tok_s']:.1f} tok/s; peak {out['peak_mib']:.0f} MiB; "
            f"{out['wall_s']:.0f} s",
            file=sys.stderr,
        )
    header = _header(rows, args)
    table = _table(rows, args.batches)
    ratios = _ratio_lines(rows, args.batches) + _greedy_lines(rows, args.batches) + skipped
    print(header)
    print(table)
    print("\n".join(ratios))
    print(json.dumps({"header": header, "rows": rows, "ratios": ratios}))
    if args.markdown:
        from qlora.files import atomic_write

        atomic_write(
            args.markdown,
            header + "\n\n" + table + "\n\n" + "\n".join(f"- {x}" for x in ratios) + "\n",
        )


if __name__ == "__main__":
    main()
