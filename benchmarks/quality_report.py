"""The quality experiment's report: tables, a plot and a reading, all computed from results.

`write_report` turns the per-run results of `benchmarks/quality.py` into a Markdown file and a
PNG beside it. Every number and every comparative sentence is derived here from those
results (nothing is typed in by hand), so re-running the script rewrites the report
consistently; the fixed paragraphs only explain mechanisms that do not depend on the numbers.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from quality_arm import ARMS, LORA

from qlora.files import atomic_open, atomic_write

TOLERANCE = 0.02  # the acceptance: NF4+DQ held-out loss within 2% of LoRA on a float32 base
# Smallest relative difference called a difference when the seeds give no larger spread.
NOISE_FLOOR = 0.005


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else float("nan")


def _loftq_iters(results: list[dict[str, Any]]) -> str:
    iters = sorted({r["loftq_iters"] for r in results if r.get("loftq_iters")})
    return ", ".join(map(str, iters)) or "-"


def _group(results: list[dict[str, Any]]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """task -> arm -> runs (seeds), arms in the canonical order."""
    grouped: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(dict)
    for result in sorted(results, key=lambda r: (list(ARMS).index(r["arm"]), r["seed"])):
        grouped[result["task"]].setdefault(result["arm"], []).append(result)
    return grouped


def _stats(runs: list[dict[str, Any]], key: str) -> tuple[float, float, int]:
    values = [r[key] for r in runs if r.get(key) is not None]
    return _mean(values), _sd(values), len(values)


def _spreads(arms: dict[str, list[dict[str, Any]]]) -> list[float]:
    """Relative seed-to-seed sd of the final held-out loss, for arms with several seeds."""
    out = []
    for runs in arms.values():
        mean, sd, n = _stats(runs, "eval_loss_after")
        if n > 1:
            out.append(sd / mean)
    return out


def _pm(mean: float, sd: float, n: int, fmt: str = ".4f") -> str:
    if n > 1:
        return f"{mean:{fmt}} ± {sd:{fmt}} (n={n})"
    return f"{mean:{fmt}}"


def _pct(value: float) -> str:
    return f"{value:+.1%}"


def _table(task: str, arms: dict[str, list[dict[str, Any]]]) -> list[str]:
    reference = _stats(arms["lora-fp32"], "eval_loss_after")[0] if "lora-fp32" in arms else None
    generated = any("accuracy_after" in r for runs in arms.values() for r in runs)
    head = (
        "| arm | base bits/param | trainable params | peak RSS MiB | held-out loss before "
        "| held-out loss after | perplexity after | vs LoRA-fp32 |"
    )
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|"
    if generated:
        head += " exact match before | exact match after |"
        rule += "---:|---:|"
    head += " train s |"
    rule += "---:|"
    lines = [head, rule]
    for name, runs in arms.items():
        after, sd, n = _stats(runs, "eval_loss_after")
        before = _mean([r["eval_loss_before"] for r in runs])
        versus = _pct(after / reference - 1) if reference else "-"
        row = (
            f"| {name} | {runs[0]['base_bits_per_param']:.2f} | {runs[0]['trainable_params']:,} "
            f"| {max(r['peak_rss_mib'] for r in runs):.0f} | {before:.4f} | {_pm(after, sd, n)} "
            f"| {math.exp(after):.4g} | {versus} |"
        )
        if generated:
            acc_before = _mean([r["accuracy_before"] for r in runs])
            acc, acc_sd, acc_n = _stats(runs, "accuracy_after")
            row += f" {acc_before:.0%} | {_pm(100 * acc, 100 * acc_sd, acc_n, '.0f')}% |"
        row += f" {_mean([r['train_seconds'] for r in runs]):.0f} |"
        lines.append(row)
    return lines


def _plot(grouped: dict[str, dict[str, list[dict[str, Any]]]], path: Path) -> None:
    """Held-out loss over steps, one panel per task, one line per arm (mean over seeds).

    Arms that end far above the rest (a broken 2-bit base: tens of nats) would squash every
    other line into one, so the y-range follows the arms within 2x of LoRA-fp32's starting
    loss and the others are named in the legend as off scale (their numbers are in the tables).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(grouped)
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.6), squeeze=False)
    styles = {"full": ":", "lora": "-"}
    for ax, task in zip(axes[0], tasks, strict=True):
        arms = grouped[task]
        anchor = arms.get("lora-fp32") or next(iter(arms.values()))
        ceiling = 2 * anchor[0]["curve"][0][1]
        shown: list[float] = []
        for name, runs in arms.items():
            steps = [point[0] for point in runs[0]["curve"]]
            per_step = [[r["curve"][i][1] for r in runs] for i in range(len(steps))]
            mean = [_mean(v) for v in per_step]
            arm = ARMS[name]
            style = "--" if arm.init == "loftq" else styles[arm.method]
            off_scale = min(mean) > ceiling
            label = f"{name} (off scale: {mean[0]:.1f} -> {mean[-1]:.1f})" if off_scale else name
            (line,) = ax.plot(steps, mean, style, marker="o", markersize=3, label=label)
            if off_scale:
                continue
            shown += [v for values in per_step for v in values]
            if len(runs) > 1:
                ax.fill_between(
                    steps,
                    [min(v) for v in per_step],
                    [max(v) for v in per_step],
                    color=line.get_color(),
                    alpha=0.15,
                )
        if shown:
            low, high = min(shown), max(shown)
            margin = 0.05 * (high - low or 1.0)
            ax.set_ylim(low - margin, high + margin)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("held-out loss (nats per response token)")
        ax.set_title(f"{task}: held-out loss per arm (band: seed min-max)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)


def _closed_text(closed: float | None) -> str:
    if closed is None:
        return "."
    if closed > 1:
        return ": LoftQ ends below LoRA-fp32 (more than closes the gap)."
    if closed < 0:
        return ": LoftQ widens the gap to LoRA-fp32."
    return f": LoftQ closes {closed:.0%} of the gap to LoRA-fp32."


# Two-sided 95% points of Student's t by degrees of freedom (1-30); 1.96 beyond.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


def _paired(
    arms: dict[str, list[dict[str, Any]]], base: str, other: str, key: str = "eval_loss_after"
) -> tuple[int, float, float, float] | None:
    """``other`` against ``base`` over the seeds both ran: (n, mean relative change, its
    standard error, half-width of its 95% interval), the change per seed being
    (other - base) / mean(base). Pairing by seed removes what the two arms share (adapter
    init, dropout masks, data order); None with fewer than two common seeds."""
    by_seed = {name: {r["seed"]: r[key] for r in arms.get(name, [])} for name in (base, other)}
    seeds = sorted(set(by_seed[base]) & set(by_seed[other]))
    if len(seeds) < 2:
        return None
    scale = _mean([by_seed[base][s] for s in seeds])
    changes = [(by_seed[other][s] - by_seed[base][s]) / scale for s in seeds]
    error = _sd(changes) / math.sqrt(len(seeds))
    t95 = _T95[len(seeds) - 2] if len(seeds) - 1 <= len(_T95) else 1.96
    return len(seeds), _mean(changes), error, t95 * error


def _paired_text(n: int, change: float, error: float, half: float, tolerance: float) -> str:
    """What a paired comparison says against ``tolerance``, the interval included."""
    low, high = change - half, change + half
    head = (
        f"paired over {n} seeds {change:+.2%} ± {error:.2%} (s.e.), 95% interval "
        f"[{low:+.2%}, {high:+.2%}]: "
    )
    if -tolerance <= low and high <= tolerance:
        return head + f"within {tolerance:.0%} (the whole interval)."
    if low > tolerance or high < -tolerance:
        return head + f"outside {tolerance:.0%} (the whole interval)."
    if abs(change) <= tolerance:
        return head + (
            f"within {tolerance:.0%} in the mean, but the interval is wider than ±{tolerance:.0%}"
            " (more seeds would narrow it)."
        )
    if low <= 0 <= high:
        return head + (
            f"outside {tolerance:.0%} in the mean, but not distinguishable from no change (the "
            "interval holds 0)."
        )
    return head + f"outside {tolerance:.0%} in the mean; the interval excludes no change."


# The bf16-compute arms and their float32 twins: "qlora-nf4-dq{suffix}" and
# "qlora-nf4-dq-bf16{suffix}", with what the suffix changes.
BF16_PAIRS = {"": "", "-lr0.3": " at 0.3x the learning rate"}


def _bf16_line(
    arms: dict[str, list[dict[str, Any]]], task: str, suffix: str, summary: dict[str, Any]
) -> str | None:
    """The bf16-vs-float32-compute sentence for one pair of arms (None if either is absent);
    adds its numbers to ``summary``."""
    base, other = f"qlora-nf4-dq{suffix}", f"qlora-nf4-dq-bf16{suffix}"
    if base not in arms or other not in arms:
        return None
    fp32, bf16 = _after(arms, base), _after(arms, other)
    change = bf16 / fp32 - 1
    key = f"{task}_bf16_vs_fp32_compute{suffix.replace('-', '_').replace('.', '')}"
    summary[key] = round(change, 5)
    spread = [
        sd for sd in (_stats(arms[a], "eval_loss_after")[1] for a in (base, other)) if sd == sd
    ]
    noise = f" Seed-to-seed spread (sd): up to {max(spread):.4f}." if spread else ""
    paired = _paired(arms, base, other)
    if paired is None:
        verdict = f"{'within' if abs(change) <= 0.01 else 'outside'} 1%."
    else:
        verdict = _paired_text(*paired, tolerance=0.01)
        summary[f"{key}_paired"] = [round(v, 5) for v in paired[1:]]
    return (
        f"- bfloat16 vs float32 compute (NF4 + DQ{BF16_PAIRS[suffix]}): held-out loss "
        f"{bf16:.4f} vs {fp32:.4f} (**{_pct(change)}**); {verdict}{noise}"
    )


def _after(arms: dict[str, list[dict[str, Any]]], name: str, key: str = "eval_loss_after"):
    return _stats(arms[name], key)[0] if name in arms else None


def _reading(grouped: dict[str, dict[str, list[dict[str, Any]]]]) -> tuple[list[str], dict]:
    """Sentences computed from the numbers, and the summary the JSON line carries."""
    lines: list[str] = []
    summary: dict[str, Any] = {}
    for task, arms in grouped.items():
        lines.append(f"**{task}**")
        lora, nf4 = _after(arms, "lora-fp32"), _after(arms, "qlora-nf4-dq")
        if lora is not None and nf4 is not None:
            gap = nf4 / lora - 1
            lora_before = _mean([r["eval_loss_before"] for r in arms["lora-fp32"]])
            nf4_before = _mean([r["eval_loss_before"] for r in arms["qlora-nf4-dq"]])
            gap_before = nf4_before / lora_before - 1
            spread = [
                s
                for s in (
                    _stats(arms[a], "eval_loss_after")[1] for a in ("lora-fp32", "qlora-nf4-dq")
                )
                if s == s
            ]
            verdict = "within" if abs(gap) <= TOLERANCE else "outside"
            summary[f"{task}_nf4_vs_lora"] = round(gap, 5)
            summary[f"{task}_nf4_vs_lora_before"] = round(gap_before, 5)
            text = (
                f"- NF4 + DQ vs LoRA on a float32 base: held-out loss {nf4:.4f} vs {lora:.4f}, "
                f"**{_pct(gap)}**, {verdict} the {TOLERANCE:.0%} tolerance. Before training the "
                f"quantized base alone costs {_pct(gap_before)} ({nf4_before:.4f} vs "
                f"{lora_before:.4f}); training "
            )
            if gap_before <= 0:
                text += "started from no gap."
            elif gap < gap_before:
                text += f"closed {1 - gap / gap_before:.0%} of that gap."
            else:
                text += "did not close it (the gap is as large or larger after training)."
            if spread:
                text += f" Seed-to-seed spread (sd): up to {max(spread):.4f}."
            lines.append(text)
            loftq = _after(arms, "loftq-nf4-dq")
            if loftq is not None:
                lines.append(
                    f"- LoftQ on NF4 + DQ: {loftq:.4f} ({_pct(loftq / lora - 1)} vs LoRA-fp32; "
                    f"plain NF4 {_pct(gap)})."
                )
        full = _after(arms, "full-fp32")
        if full is not None and lora is not None:
            lines.append(
                f"- Full fine-tuning vs LoRA (float32): {full:.4f} vs {lora:.4f} "
                f"({_pct(full / lora - 1)})."
            )
        for suffix in BF16_PAIRS:
            line = _bf16_line(arms, task, suffix, summary)
            if line is not None:
                lines.append(line)
        fp4 = _after(arms, "qlora-fp4")
        if fp4 is not None and nf4 is not None:
            noise = max([NOISE_FLOOR, *_spreads(arms)])
            if abs(fp4 / nf4 - 1) <= noise:
                verdict = f"no clear difference (within {noise:.1%})."
            elif fp4 > nf4:
                verdict = "NF4 is better, as in the paper."
            else:
                verdict = "FP4 is better here, unlike the paper."
            lines.append(
                f"- FP4 vs NF4 (both + DQ): {fp4:.4f} vs {nf4:.4f} ({_pct(fp4 / nf4 - 1)}); "
                + verdict
            )
        for kind in ("fp4", "nf2"):
            plain, loftq = _after(arms, f"qlora-{kind}"), _after(arms, f"loftq-{kind}")
            if plain is None or loftq is None:
                continue
            plain_before = _mean([r["eval_loss_before"] for r in arms[f"qlora-{kind}"]])
            loftq_before = _mean([r["eval_loss_before"] for r in arms[f"loftq-{kind}"]])
            reference = f" (LoRA-fp32: {lora:.4f})" if lora is not None else ""
            gap_closed = (
                (plain - loftq) / (plain - lora) if lora is not None and plain > lora else None
            )
            lines.append(
                f"- LoftQ on {kind.upper()}: held-out loss before training {loftq_before:.4f} vs "
                f"{plain_before:.4f} with B = 0; after {loftq:.4f} vs {plain:.4f} "
                f"({_pct(loftq / plain - 1)}){reference}" + _closed_text(gap_closed)
            )
            summary[f"{task}_loftq_{kind}_closed"] = (
                round(gap_closed, 4) if gap_closed is not None else None
            )
        order = sorted(arms, key=lambda a: _stats(arms[a], "eval_loss_after")[0])
        lines.append(f"- Order by held-out loss after training (best first): {', '.join(order)}.")
        summary[f"{task}_order"] = order
        if any("accuracy_after" in r for runs in arms.values() for r in runs):
            by_acc = sorted(arms, key=lambda a: -_stats(arms[a], "accuracy_after")[0])
            accs = ", ".join(f"{a} {_stats(arms[a], 'accuracy_after')[0]:.0%}" for a in by_acc)
            lines.append(f"- Exact match after training (best first): {accs}.")
            summary[f"{task}_accuracy"] = {
                a: round(_stats(arms[a], "accuracy_after")[0], 4) for a in arms
            }
        lines.append("")
    return lines, summary


def write_report(
    results: list[dict[str, Any]], path: Path, quick: bool = False, data: Path | None = None
) -> dict[str, Any]:
    """Write the Markdown report and its plot; returns the summary numbers."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grouped = _group(results)
    plot = path.with_name(path.stem + "_eval_loss.png")
    _plot(grouped, plot)
    reading, summary = _reading(grouped)
    total = sum(r["seconds"] for r in results)
    budgets = {task: next(iter(arms.values()))[0]["budget"] for task, arms in grouped.items()}
    threads = results[0].get("threads")
    lines = [
        "# Quality: does QLoRA match LoRA and full fine-tuning? (small-scale reproduction)",
        "",
        "Produced by `python benchmarks/quality.py"
        + (" --quick" if quick else "")
        + "` (this file and the plot are rewritten by every run; do not edit by hand). "
        f"{len(results)} runs, {total / 60:.1f} min of run time on {platform.machine()} "
        f"({os.cpu_count()} cores, {threads} torch threads), {time.strftime('%Y-%m-%d')}.",
        "",
        "The claim tested (QLoRA paper, Tables 3-4): fine-tuning over a 4-bit NormalFloat base "
        "with double quantization matches 16-bit LoRA, which matches full fine-tuning; FP4 "
        "falls behind (MMLU 5-shot mean over LLaMA 7B-65B: BF16 53.0, FP4 52.2, NF4+DQ 53.1). "
        "Here: SmolLM2-135M-Instruct (the default model), every arm with the same examples in "
        "the same order, steps, schedule and seeds.",
        "",
        "## Setup",
        "",
        f"- Adapters: LoRA r={LORA['r']}, alpha={LORA['alpha']:g}, dropout {LORA['dropout']} "
        "on every Linear layer but the output head; AdamW, constant learning rate after a "
        "linear warmup (QLoRA's schedule), gradient clipping 0.3. Full fine-tuning trains "
        "every weight (embeddings tied to the head) with a 10x lower learning rate.",
        "- Quantized bases: blocksize 64, double quantization, float32 compute (the "
        "`-bf16` arms: the frozen base's matmuls and the output head in bfloat16, "
        "`quant.compute_dtype`; everything else float32; `-lr0.3` arms: 0.3x the adapter "
        "learning rate)."
        + (
            f" LoftQ arms: `lora.init: loftq` with {_loftq_iters(results)} alternating "
            "quantize / rank-16 SVD rounds (`qlora.nn.loftq`)."
            if any(r.get("loftq_iters") for r in results)
            else ""
        ),
        f"- alpaca: `{data.name if data else '?'}` (Stanford Alpaca subset, CC BY-NC 4.0; read "
        "by path, not shipped); a fixed seeded 5% split is held out and its first records "
        "are scored; loss on the responses only.",
        "- reverse: the project's generated word-reversal task (`qlora.data.tasks`): reverse "
        "four common words; greedy decoding, exact match.",
        "- Peak RSS: the arm's whole process (imports, loading, LoftQ, training, evaluation).",
        "",
        "| task | steps | batch | lr (adapters / full) | warmup | held-out examples "
        "| eval every | max length |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for task, b in budgets.items():
        lines.append(
            f"| {task} | {b['steps']} | {b['batch_size']} | {b['lr_lora']:g} / {b['lr_full']:g} "
            f"| {b['warmup_steps']} | {b['n_eval']} | {b['eval_every']} | {b['max_seq_len']} |"
        )
    lines += ["", "## Results", ""]
    for task, arms in grouped.items():
        lines += [f"### {task}", "", *_table(task, arms), ""]
    lines += [
        f"![held-out loss per arm over steps]({plot.name})",
        "",
        "## Reading (computed from the numbers above)",
        "",
        *reading,
        "## What the numbers can and cannot say",
        "",
        "- Scale: the paper's claim is about 7B-65B models fine-tuned for thousands of steps; "
        "this is a 135M model and a CPU-sized budget. Small models have fewer redundant "
        "weights, so the same 4-bit rounding error costs them relatively more loss, and a "
        "short run gives the adapters little time to absorb it. A gap here is therefore an "
        "upper bound on what the same recipe costs at the paper's scale, not a refutation.",
        "- The float32 base is the default model as shipped: its GGUF file stores Q4_1 "
        "weights, so the 'float32' arms start from already-rounded weights and the quantized "
        "arms round them a second time on a different grid. What each format costs the base "
        "alone, before any fine-tuning (perplexity, KL, top-1 agreement), is measured in "
        "[quant_quality.md](quant_quality.md).",
        "- A rank-16 adapter can absorb only the largest directions of the quantization error "
        "(the error of a blockwise quantizer is close to noise, with a flat spectrum, so "
        "its best rank-16 fit captures only a small part of it: LoftQ makes this visible); "
        "the rest must be "
        "compensated by learning the task around it, which takes more steps than this "
        "budget gives.",
        "- Held-out loss is measured on a fixed set the same for every arm, so arm-to-arm "
        "differences are not sampling noise of the eval set; the seed spread (where n > 1) "
        "is the run-to-run noise (adapter init, dropout, data order).",
        "- Full fine-tuning's learning rate is the usual 10x-below-LoRA choice, not tuned "
        "per arm; neither are the others (one shared recipe, as in the paper's comparisons).",
        "",
    ]
    atomic_write(path, "\n".join(lines))
    summary["run_minutes"] = round(total / 60, 2)
    return summary
