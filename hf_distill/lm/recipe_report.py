"""The report of the causal-LM recipe (``recipes/causal_lm.py``): paired comparisons and the teacher gap,
goals, ``results.json`` / ``results.md`` / ``results.png`` and the students' model cards."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..plots import plot_loss_terms, save_figure

__all__ = ["DATA_FREE_DIR", "PAIRS", "lm_comparisons", "lm_goals", "lm_results_markdown", "plot_lm_results",
           "write_lm_results", "write_lm_student_cards"]

TEACHER, DISTILLED, BASELINE, DATA_FREE = "teacher", "distilled student", "baseline student", "data-free student"
#: the data-free student's folder in the run's output folder
DATA_FREE_DIR = "student_data_free"
#: (key in ``comparisons``, model a, model b): the paired differences a - b the report gives when both were run
PAIRS = (("distilled_minus_baseline", DISTILLED, BASELINE), ("distilled_minus_teacher", DISTILLED, TEACHER),
         ("data_free_minus_distilled", DATA_FREE, DISTILLED), ("data_free_minus_baseline", DATA_FREE, BASELINE))


def lm_comparisons(scores: Mapping[str, Any], recipe, *, seed: int = 0) -> dict:
    """Paired bootstrap differences (:data:`PAIRS`: distilled - baseline, distilled - teacher, and with a
    data-free student data-free - distilled and data-free - baseline) over the held-out units, and the share of
    the teacher gap each student closes (log space: per-token cross-entropy)."""
    from hf_distill.lm.evaluation import gap_closed, paired_difference

    out = {}
    for key, a, b in PAIRS:
        if a in scores and b in scores:
            out[key] = paired_difference(scores[a], scores[b], n_resamples=recipe.bootstrap_resamples, seed=seed)
    if BASELINE in scores:
        ppl = {name: s.perplexity for name, s in scores.items()}
        for key, student in (("gap_closed", DISTILLED), ("gap_closed_data_free", DATA_FREE)):
            if student in ppl and ppl[BASELINE] != ppl[TEACHER]:
                out[key] = {
                    "log_space": gap_closed(ppl[TEACHER], ppl[student], ppl[BASELINE], space="log"),
                    "perplexity_space": gap_closed(ppl[TEACHER], ppl[student], ppl[BASELINE], space="ppl"),
                    "definition": f"(log ppl_baseline - log ppl_{student.split()[0]}) / "
                                  "(log ppl_baseline - log ppl_teacher)"}
    return out


def lm_goals(recipe, results: Mapping[str, Any], total_seconds: float | None) -> list[dict]:
    """Each goal "met" only when its measurement shows it (an interval that excludes 0), "missed" when it clearly
    fails, "not shown" otherwise."""
    goals = []
    for key, student in (("distilled_minus_baseline", DISTILLED), ("data_free_minus_baseline", DATA_FREE)):
        comp = results["comparisons"].get(key)
        if comp:
            status = "met" if comp["high"] < 0 else "missed" if comp["low"] > 0 else "not shown"
            goals.append({"goal": f"{student} has a lower held-out perplexity than the cross-entropy baseline",
                          "status": status, "met": status == "met", "measured": f"{comp['diff']:+.2f} "
                          f"[{comp['low']:+.2f}, {comp['high']:+.2f}] (paired bootstrap)"})
    if recipe.goal_minutes and total_seconds is not None:
        met = total_seconds <= 60 * recipe.goal_minutes
        goals.append({"goal": f"whole run <= {recipe.goal_minutes:g} min", "status": "met" if met else "missed",
                      "met": met, "measured": f"{total_seconds / 60:.1f} min"})
    return goals


def _interval(value: float, ci, digits: int = 2) -> str:
    return f"{value:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def lm_results_markdown(results: Mapping[str, Any]) -> str:
    """The results as Markdown: the models, the comparisons, the data and training, stage times and goals."""
    rows = results["models"]
    conf = round(100 * rows[0].get("confidence", 0.95))
    speed = results["speed"]
    lines = [(f"| model | layers | params | held-out perplexity [{conf}% CI] | bits per byte [{conf}% CI] | "
              "tokens/s | vs teacher |"), "| --- | ---: | ---: | --- | --- | ---: | ---: |"]
    for r in rows:
        bpb = _interval(r["bits_per_byte"], r["bits_per_byte_ci"], 3) if "bits_per_byte" in r else "-"
        lines.append(f"| {r['name']} | {r['layers']} | {r['params'] / 1e6:.1f}M | "
                     f"{_interval(r['perplexity'], r['perplexity_ci'])} | {bpb} | {r['tokens_per_second']:,.0f} | "
                     f"{r['speedup']:.2f}x |")
    notes = []
    comp = results["comparisons"]
    titles = {"distilled_minus_baseline": "Distilled minus baseline",
              "data_free_minus_distilled": "Data-free minus distilled (real data)",
              "data_free_minus_baseline": "Data-free minus baseline"}
    for key, title in titles.items():
        if key in comp:
            c = comp[key]
            notes.append(f"{title} perplexity: {c['diff']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}] (per-token "
                         f"cross-entropy {c['nll_diff']:+.4f} nats [{c['nll_diff_ci'][0]:+.4f}, "
                         f"{c['nll_diff_ci'][1]:+.4f}]; paired bootstrap over {c['n_units']} held-out units, {conf}%).")
    for key, who in (("gap_closed", "distilled"), ("gap_closed_data_free", "data-free")):
        if key in comp:
            g = comp[key]
            notes.append(f"Teacher gap closed ({who}): {100 * g['log_space']:.1f}% in log space ({g['definition']}); "
                         f"{100 * g['perplexity_space']:.1f}% on perplexity itself.")
    data, training = results["data"], results["training"]
    notes.append(f"Data: {data['source']} ({data['format']}), {data['n_train_documents']} training documents -> "
                 f"{data['n_train_rows']} rows ({data['train_tokens']:,} tokens); {data['n_eval_documents']} held-out "
                 f"documents (split by document) -> {data['n_eval_rows']} evaluation windows of <= "
                 f"{data['block_size']} tokens" + (f", the first {data['max_eval_tokens_per_document']} tokens of each"
                                                   if data.get("max_eval_tokens_per_document") else "") + ".")
    notes.append(f"Training: {training['steps']} steps, batch {training['batch_size']} x accumulation "
                 f"{training['gradient_accumulation_steps']}, learning rate {training['learning_rate']:g}, seed "
                 f"{training['seed']}; distilled: {json.dumps(training['distillation'])} + cross-entropy x "
                 f"{training['task_weight']:g}, T = {training['temperature']:g}, teacher outputs "
                 f"{training['teacher_outputs']}" + (f" (top-{training['store_k']} + tail)" if training['store_k']
                                                     else "") + "; baseline: cross-entropy only, same initial "
                 "student, rows, order and steps.")
    synthesis = results.get("synthesis")
    if synthesis:
        notes.append(f"Data-free student: the same initial student, loss, steps and seed, on {synthesis['n_blocks']} "
                     f"blocks of the teacher's own texts and no training document: {synthesis['n_kept']} of "
                     f"{synthesis['n_texts']} texts kept ({synthesis['text_tokens']:,} tokens, "
                     f"{synthesis['mean_tokens_per_text']:g} a text) sampled from {synthesis['prompts']} prompts"
                     f"{' in the chat template' if synthesis['chat'] else ''} at temperature "
                     f"{synthesis['temperature']:g}, top-p {synthesis['top_p']:g}, at most "
                     f"{synthesis['max_new_tokens']} new tokens (stored in {synthesis['folder']}). First texts: "
                     + "; ".join(f"{e['prompt']!r} -> {e['text'][:120]!r}" for e in synthesis["examples"]) + ".")
    notes.append(f"tokens/s: forward passes on one batch of {speed['batch_size']} x {speed['seq_len']} held-out "
                 f"tokens, {speed['threads']} CPU thread{'s' if speed['threads'] != 1 else ''}, median of "
                 f"{speed['repeats']} after {speed['warmup']} warm-up, the models interleaved, in this run.")
    text = "\n".join(lines) + "\n\n" + "\n\n".join(notes) + "\n"
    text += "\n| stage | wall time |\n| --- | ---: |\n"
    for name, info in results.get("stages", {}).items():
        note = f" ({info['note']})" if info.get("note") else ""
        text += f"| {name}{note} | {info['seconds']:.0f} s |\n"
    goals = results.get("goals")
    if goals:
        labels = {"met": "met", "not shown": "not shown", "missed": "MISSED"}
        text += "\n" + "\n".join(f"- {labels[g['status']]}: {g['goal']} (measured: {g['measured']})"
                                 for g in goals) + "\n"
    return text


def write_lm_results(results: dict, recipe, out: Path) -> dict:
    """Add the goals (with the run's total time) and write ``results.json`` and ``results.md``."""
    total = results["stages"].get("total (incl. imports)", {}).get("seconds")
    results["goals"] = lm_goals(recipe, results, total)
    out.mkdir(parents=True, exist_ok=True)
    text = lm_results_markdown(results)
    paths = {"json": out / "results.json", "markdown": out / "results.md"}
    paths["json"].write_text(json.dumps(results, indent=2, default=_plain) + "\n")
    paths["markdown"].write_text(text)
    return {**paths, "text": text}


def _plain(value):
    """numpy scalars and arrays, paths: as JSON numbers, lists and strings."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def plot_lm_results(results: Mapping[str, Any], histories: Mapping[str, list], path: Path) -> Path:
    """PNG: held-out perplexity (95% interval) against tokens/s, and every logged loss term over the steps."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ppl, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.8))
    for i, r in enumerate(results["models"]):
        lo, hi = r["perplexity_ci"]
        ax_ppl.errorbar(r["tokens_per_second"], r["perplexity"], yerr=[[r["perplexity"] - lo], [hi - r["perplexity"]]],
                        fmt="osD^v"[i % 5], capsize=4, color=f"C{i}", markersize=7,
                        label=f"{r['name']} ({r['layers']} layers): {r['perplexity']:.1f}")
    speed = results["speed"]
    ax_ppl.set_xlabel(f"tokens/s (forward, batch {speed['batch_size']} x {speed['seq_len']}, {speed['threads']} thread)")
    ax_ppl.set_ylabel("held-out perplexity, 95% bootstrap interval")
    ax_ppl.set_yscale("log")
    ax_ppl.set_title("perplexity vs speed")
    ax_ppl.grid(alpha=0.3)
    ax_ppl.legend(fontsize=8)
    plot_loss_terms(ax_loss, histories, x="step", first_color=1)
    return save_figure(fig, path)


def write_lm_student_cards(args, results: Mapping[str, Any], out: Path) -> str | None:
    """A model card (held-out perplexity and bits per byte in its metadata) in each student folder;
    ``--push_to_hub`` uploads the distilled student. Returns the upload's commit URL (None without the flag)."""
    from hf_distill.hub import (
        distillation_metadata,
        eval_results_from_metrics,
        push_student,
        write_model_card,
    )
    from hf_distill.tasks.classification_recipe import BASELINE_DIR, DISTILLED_DIR

    rows = {r["name"]: r for r in results["models"]}
    data, training = results["data"], results["training"]
    for name, folder in ((DISTILLED, out / DISTILLED_DIR), (DATA_FREE, out / DATA_FREE_DIR),
                         (BASELINE, out / BASELINE_DIR)):
        if name not in rows:
            continue
        row, distilled = rows[name], name != BASELINE
        meta = distillation_metadata(
            teacher=results["teacher"], student_params=row["params"],
            dataset="the teacher's own generations (no training data)" if name == DATA_FREE else data["source"],
            teacher_params=rows[TEACHER]["params"], args=args if distilled else None,
            layer_map=results["student_layers"],
            extra={"objective": json.dumps(training["distillation"]) if distilled else
                   "cross-entropy baseline (no teacher targets)", "teacher_outputs": training["teacher_outputs"],
                   "block_size": data["block_size"]})
        table = {"held-out perplexity": row["perplexity"],
                 "held-out perplexity 95% CI": f"[{row['perplexity_ci'][0]:.2f}, {row['perplexity_ci'][1]:.2f}]",
                 "teacher held-out perplexity": rows[TEACHER]["perplexity"],
                 "held-out tokens": row["n_tokens"], "tokens/s vs teacher (this run)": f"{row['speedup']:.2f}x"}
        metrics = {"perplexity": row["perplexity"]}
        if "bits_per_byte" in row:
            table["bits per byte"] = metrics["bits_per_byte"] = row["bits_per_byte"]
        evals = eval_results_from_metrics(metrics, task_type="text-generation", dataset_type="custom",
                                          dataset_name=data["source"], dataset_split="held-out",
                                          names={"bits_per_byte": "bits per byte"})
        write_model_card(folder, meta, results=table, eval_results=evals, pipeline_tag="text-generation",
                         datasets=[], model_name=(args.hub_model_id if name == DISTILLED else None) or folder.name)
    return push_student(out / DISTILLED_DIR, args, default_repo=f"{out.name}-{DISTILLED_DIR}")
