"""Serving throughput and latency: 8 concurrent requests on 8 different adapters, against the
same 8 requests one at a time and against 8 concurrent requests on one adapter (issue 16).

The workload: the default model (SmolLM2-135M-Instruct, nf4) and 8 rank-16 adapters on every
linear layer (``LoraConfig(r=16, dropout=0)``, A from seed i, every B drawn N(0, 0.01) from
seed i: B = 0 would be a no-op), saved with `qlora.save_adapter` into a temporary directory
and loaded by the engine at start. The engine is `qlora.serve.BatchingEngine`
(``--max-batch``, default 8; ``--engine sequential``: `qlora.serve.SequentialEngine`), served
by the real HTTP app (`qlora.serve.app.create_app`, uvicorn in a thread on
127.0.0.1:<free port>) and driven by an ``httpx`` async client in a child process
(``--in-process-client``: in the server's process, where parsing every SSE event takes the
GIL from the engine's decode loop). Every request is ``POST /v1/chat/completions`` with one
of 8 different chat questions, ``stream=true`` (to time the first token), ``temperature=0``
and ``ignore_eos=true`` (every request generates exactly ``--new-tokens``; the completion
tokens are read back from ``usage``). The arms:

    mixed          8 concurrent requests, request i on adapter i (one batch mixes 8 adapters)
    one-at-a-time  the same 8 requests, each sent after the previous one finished: what a
                   server that runs one adapter at a time does (llama.cpp, PEFT)
    single-adapter 8 concurrent requests, all on adapter 0

Each arm runs ``--repeats`` times (the arms interleaved, so drift on a shared machine touches
them alike) after one unmeasured 2-token round of each; the table gives the medians over the
repeats of: wall time (first request sent to last answer), aggregate completion tokens/s
(completion tokens / wall), per-request latency p50/p95 (each request's send to its last
byte) and time to first token p50/p95 (send to the first content chunk). A one-at-a-time
request's latency is its own; 8 clients arriving together at such a server would also wait
for those ahead of them, which the ratio lines show as "queued" latency (completion time since
the arm's start). The greedy answers of the mixed arm are compared with the same requests
served one at a time.

    python benchmarks/bench_serve.py [--new-tokens 64] [--repeats 3] [--threads N]
        [--max-batch 8] [--engine batching|sequential] [--in-process-client] [--quick]
        [--markdown F [--overwrite]]

``--threads`` (default: every core) sets torch's threads (and so the C kernels' OpenMP
threads). On a machine shared with other jobs ``--threads 1`` is steadier. ``--quick`` is a
smoke run: 8 new tokens, 1 repeat. Prints the CPU, the table, the ratios the issue's targets
are about (mixed / one-at-a-time throughput >= 3x; mixed / single-adapter >= 0.8x) and one
JSON line. Exits 0 whatever the numbers (a benchmark measures).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from chat_workload import LORA_B_STD, LORA_R, QUESTIONS, SYSTEM

MODEL = "smollm2-135m"
BASE = "smollm2-135m-nf4"
ADAPTERS = tuple(f"adapter-{i}" for i in range(8))
ARMS = ("mixed", "one-at-a-time", "single-adapter")
WARMUP_TOKENS = 2
REQUEST_TIMEOUT_S = 600.0

# -- the adapters and the server ------------------------------------------------------------


def make_adapters(directory: Path) -> dict[str, str]:
    """Saves the 8 adapters (rank 16, all linear layers, B ~ N(0, 0.01)) under ``directory``;
    returns name -> path. Built on a model of their own, so the served one starts clean."""
    import torch

    import qlora

    model, _ = qlora.load_model(MODEL, "nf4", tokenizer=False, progress=False)
    paths = {}
    for seed, name in enumerate(ADAPTERS):
        torch.manual_seed(seed)  # A's kaiming init
        qlora.add_lora(model, qlora.LoraConfig(r=LORA_R, dropout=0.0), adapter_name=name)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for key, weight in model.named_parameters():
                if f".lora_B.{name}." in key:  # [out, r]
                    weight.copy_(torch.randn(weight.shape, generator=generator) * LORA_B_STD)
        paths[name] = str(qlora.save_adapter(model, directory / name, adapter=name))
    return paths


def make_engine(
    kind: str, model: Any, tokenizer: Any, adapters: dict[str, str], max_batch: int
) -> Any:
    """``kind`` "batching" (`BatchingEngine`) or "sequential" (`SequentialEngine`)."""
    from qlora.serve import BatchingEngine, SequentialEngine

    if kind == "batching":
        return BatchingEngine(model, tokenizer, BASE, adapters=adapters, max_batch=max_batch)
    return SequentialEngine(model, tokenizer, BASE, adapters=adapters)


def serving(app: Any) -> contextlib.AbstractContextManager[str]:
    """Serves ``app`` with uvicorn in a thread on 127.0.0.1:<free port>; yields the base URL."""
    from qlora.serve.app import serve_in_thread

    return serve_in_thread(app)


# -- the client -----------------------------------------------------------------------------


async def one_request(http: Any, model: str, question: str, new_tokens: int) -> dict[str, Any]:
    """One streamed greedy chat request read to its end: times (perf_counter seconds), text,
    and the usage counts."""
    body = {
        "model": model,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": question},
        ],
        "max_tokens": new_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first, parts, usage = None, [], None
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{model}: HTTP {response.status_code}: {await response.aread()}")
        async for line in response.aiter_lines():
            payload = line.removeprefix("data: ")
            if not line or payload == "[DONE]":
                continue
            chunk = json.loads(payload)
            if "error" in chunk:
                raise RuntimeError(f"{model}: error event {chunk['error']}")
            for choice in chunk["choices"]:
                if choice["delta"].get("content"):
                    first = first or time.perf_counter()
                    parts.append(choice["delta"]["content"])
            usage = chunk.get("usage") or usage
    end = time.perf_counter()
    if usage is None:
        raise RuntimeError(f"{model}: the stream carried no usage chunk")
    return {
        "start": start,
        "first": first if first is not None else end,
        "end": end,
        "text": "".join(parts),
        "completion_tokens": usage["completion_tokens"],
    }


def plan(arm: str) -> list[tuple[str, str]]:
    """(model, question) of the arm's 8 requests."""
    if arm == "single-adapter":
        return [(ADAPTERS[0], q) for q in QUESTIONS]
    return list(zip(ADAPTERS, QUESTIONS, strict=True))


async def run_arm(url: str, arm: str, new_tokens: int) -> dict[str, Any]:
    """One run of ``arm``: its 8 requests, concurrent or one after another."""
    import httpx

    limits = httpx.Limits(max_connections=len(QUESTIONS))
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S, limits=limits) as http:
        start = time.perf_counter()
        if arm == "one-at-a-time":
            results = [await one_request(http, m, q, new_tokens) for m, q in plan(arm)]
        else:
            jobs = [one_request(http, m, q, new_tokens) for m, q in plan(arm)]
            results = await asyncio.gather(*jobs)
        wall = time.perf_counter() - start
    return summarize(results, wall, start)


def quantile(values: list[float], q: int) -> float:
    """The q-th percentile (linear between the samples: 8 samples have no exact p95)."""
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def summarize(results: list[dict[str, Any]], wall: float, start: float) -> dict[str, Any]:
    latency = [r["end"] - r["start"] for r in results]
    ttft = [r["first"] - r["start"] for r in results]
    queued = [r["end"] - start for r in results]  # as if all 8 had arrived at the start
    tokens = sum(r["completion_tokens"] for r in results)
    return {
        "wall_s": wall,
        "completion_tokens": tokens,
        "tok_s": tokens / wall,
        "latency_p50_s": quantile(latency, 50),
        "latency_p95_s": quantile(latency, 95),
        "ttft_p50_s": quantile(ttft, 50),
        "ttft_p95_s": quantile(ttft, 95),
        "queued_p50_s": quantile(queued, 50),
        "queued_p95_s": quantile(queued, 95),
        "texts": [r["text"] for r in results],
    }


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each number's median over the repeats; the texts of the last run."""
    out = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "texts"}
    tok_s_runs = [r["tok_s"] for r in runs]  # in repeat order, for the paired ratios
    return {**out, "repeats": len(runs), "tok_s_runs": tok_s_runs, "texts": runs[-1]["texts"]}


async def measure(url: str, new_tokens: int, repeats: int) -> dict[str, dict[str, Any]]:
    for arm in ARMS:  # warm-up: first-call costs (allocations, lazy imports), unmeasured
        await run_arm(url, arm, WARMUP_TOKENS)
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    for repeat in range(repeats):
        for arm in ARMS:  # interleaved: drift on a shared box touches every arm alike
            runs[arm].append(await run_arm(url, arm, new_tokens))
            r = runs[arm][-1]
            print(
                f"  repeat {repeat + 1}/{repeats} {arm}: {r['wall_s']:.2f} s, "
                f"{r['tok_s']:.1f} tok/s",
                file=sys.stderr,
            )
    return {arm: medians(r) for arm, r in runs.items()}


# -- the report -----------------------------------------------------------------------------


def header(args: argparse.Namespace, engine: str, threads: int) -> str:
    from qlora.kernels import describe

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores (load average {os.getloadavg()[0]:.1f}), cpu features "
        f"{describe()['cpu features']}, torch threads {threads}; {MODEL} nf4, "
        f"{len(ADAPTERS)} rank-{LORA_R} adapters on all linear layers; engine {engine}; "
        f"{len(QUESTIONS)} streamed greedy chat requests x {args.new_tokens} new tokens "
        f"(ignore_eos), median of {args.repeats} repeat(s)"
    )


def table(arms: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| arm | wall s | completion tok | tok/s | latency p50 s | latency p95 s "
        "| TTFT p50 s | TTFT p95 s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arm, r in arms.items():
        lines.append(
            f"| {arm} | {r['wall_s']:.2f} | {r['completion_tokens']:.0f} | {r['tok_s']:.1f} "
            f"| {r['latency_p50_s']:.2f} | {r['latency_p95_s']:.2f} "
            f"| {r['ttft_p50_s']:.3f} | {r['ttft_p95_s']:.3f} |"
        )
    return "\n".join(lines)


def paired_ratio(arms: dict[str, dict[str, Any]], top: str, bottom: str) -> tuple[float, ...]:
    """(median, min, max) over the repeats of top / bottom throughput, each repeat's arms
    measured back to back (steadier on a shared machine than a ratio of medians)."""
    ratios = [
        a / b for a, b in zip(arms[top]["tok_s_runs"], arms[bottom]["tok_s_runs"], strict=True)
    ]
    return statistics.median(ratios), min(ratios), max(ratios)


def ratio_lines(arms: dict[str, dict[str, Any]]) -> list[str]:
    mixed, seq = arms["mixed"], arms["one-at-a-time"]
    same = sum(a == b for a, b in zip(mixed["texts"], seq["texts"], strict=True))
    lines = []
    for bottom, target in (("one-at-a-time", ">= 3x"), ("single-adapter", ">= 0.8x")):
        median, low, high = paired_ratio(arms, "mixed", bottom)
        lines.append(
            f"mixed / {bottom} throughput: {median:.2f}x (target {target}; per repeat "
            f"{low:.2f}..{high:.2f}x)"
        )
    return [
        *lines,
        f"latency if all 8 arrive together: mixed p50/p95 {mixed['latency_p50_s']:.2f}/"
        f"{mixed['latency_p95_s']:.2f} s; one-at-a-time queued p50/p95 "
        f"{seq['queued_p50_s']:.2f}/{seq['queued_p95_s']:.2f} s",
        f"greedy answers, mixed batch vs the same requests one at a time: {same}/"
        f"{len(QUESTIONS)} equal",
    ]


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import qlora
    from qlora.serve.app import create_app

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        print("saving the adapters ...", file=sys.stderr)
        adapters = make_adapters(Path(tmp))
        model, tokenizer = qlora.load_model(MODEL, "nf4", progress=False)
        engine = make_engine(args.engine, model, tokenizer, adapters, args.max_batch)
        name = type(engine).__name__
        if name != "SequentialEngine":
            name += f"(max_batch={args.max_batch})"
        print(f"serving with {name} ...", file=sys.stderr)
        try:
            with serving(create_app(engine)) as url:
                if args.in_process_client:
                    arms = asyncio.run(measure(url, args.new_tokens, args.repeats))
                else:
                    arms = client_process(url, args.new_tokens, args.repeats)
        finally:
            engine.close()
    return {"engine": name, "threads": torch.get_num_threads(), "arms": arms}


def client_process(url: str, new_tokens: int, repeats: int) -> dict[str, dict[str, Any]]:
    """`measure` in a child process: a client in the server's process would take the GIL
    from the engine's Python decode loop for every SSE event it parses."""
    command = [sys.executable, __file__, "--client-of", url, "--new-tokens", str(new_tokens)]
    command += ["--repeats", str(repeats)]
    proc = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:  # its traceback went to stderr, shown as it ran
        raise SystemExit(f"the client process failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--max-batch", type=int, default=8, help="the batching engine's rows")
    parser.add_argument(
        "--engine",
        choices=("batching", "sequential"),
        default="batching",
        help="sequential: every arm one request at a time inside the server (a baseline)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 new tokens, 1 repeat")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --markdown")
    parser.add_argument(
        "--in-process-client",
        action="store_true",
        help="run the client in the server's process (it then competes for the GIL)",
    )
    parser.add_argument("--client-of", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client_of:  # the child of `client_process`: measure, print the arms as JSON
        print(json.dumps(asyncio.run(measure(args.client_of, args.new_tokens, args.repeats))))
        return
    if args.markdown:
        from qlora.files import DestinationError, check_file_destination

        try:  # before the run, not after minutes of it
            check_file_destination(args.markdown, overwrite=args.overwrite)
        except DestinationError as err:
            raise SystemExit(f"--markdown: {err}") from None
    if args.quick:
        args.new_tokens, args.repeats = 8, 1
    if args.new_tokens < 2 or args.repeats < 1 or args.threads < 1 or args.max_batch < 1:
        raise SystemExit("--new-tokens >= 2, --repeats >= 1, --threads >= 1, --max-batch >= 1")
    out = run(args)
    head = header(args, out["engine"], out["threads"])
    body = table(out["arms"])
    ratios = ratio_lines(out["arms"])
    print(head)
    print(body)
    print("\n".join(ratios))
    arms = {a: {k: v for k, v in r.items() if k != "texts"} for a, r in out["arms"].items()}
    print(json.dumps({"header": head, "engine": out["engine"], "arms": arms, "ratios": ratios}))
    if args.markdown:
        from qlora.files import atomic_write

        text = head + "\n\n" + body + "\n\n" + "\n".join(f"- {x}" for x in ratios) + "\n"
        atomic_write(args.markdown, text)


if __name__ == "__main__":
    main()
