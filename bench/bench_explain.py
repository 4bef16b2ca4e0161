"""How often `qktrace.analyses.explain` confirms a mechanism on prompts nobody tuned it for, and how long it takes.

The prompts (`bench/heldout_prompts.jsonl`) were written by hand from the demo model's vocabulary: new
title/name pairs with a distractor, antonym pairs in English and French, multiple-choice questions with the
answer at A, B and C, and true/false minimal pairs of facts. None is used in the tests or the demo.

Reports: the model's accuracy (greedy top-1 = the answer); among the correctly answered prompts, the share
whose confirmed mechanism flips the answer or at least halves p(answer) somewhere on its curve (target: at
least 85%), the share whose mechanism is *specific* (beats its control of random active features,
`qktrace.analyses.null`), and where the answer goes (to the rival, to another token, nowhere); `explain`'s
time per prompt, its forward passes, and the extra time the controls cost (target: < 30% more per prompt);
the load average while it ran (the machine is shared: say so beside the numbers).

    python bench/bench_explain.py [--threads 2] [--limit N] [--every K] [--side auto] [--null-draws 8]
                                  [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

import qktrace
from qktrace.analyses.explain import ExplainSettings

PROMPTS = Path(__file__).with_name("heldout_prompts.jsonl")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit", type=int, default=None, help="only the first N prompts (a smoke run)")
    ap.add_argument("--every", type=int, default=1, help="only every k-th prompt (a timing sample of every family)")
    ap.add_argument("--side", default="auto", choices=("auto", "query", "key"))
    ap.add_argument("--null-draws", type=int, default=ExplainSettings().null_draws, help="controls per mechanism")
    ap.add_argument("--out", default=None, help="write every prompt's result as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()][:: args.every][: args.limit]
    tracer = qktrace.Tracer.load("demo")
    settings = ExplainSettings(null_draws=args.null_draws)
    load_before = os.getloadavg()[0]
    results = []
    start = time.perf_counter()
    for r in rows:
        m = qktrace.explain(tracer, r["prompt"], r["answer"], side=args.side, settings=settings)
        best = m.best
        results.append(
            {
                **r,
                "prediction": m.prediction,
                "correct": m.correct,
                "p_answer": m.p_answer,
                "rival": m.rival,
                "flips": m.flips,
                "halves": m.halves,
                "confirmed": m.confirmed,
                "specific": m.specific,
                "goes_to": m.goes_to,
                "goes_to_token": m.goes_to_token,
                "winner_specific": bool(m.nulls) and m.nulls[0].specific,
                "p_value": None if m.null is None else m.null.p_value,
                "null_flip_share": None if m.null is None else m.null.flip_share,
                "null_halve_share": None if m.null is None else m.null.halve_share,
                "n_nulls": len(m.nulls),
                "null_passes": sum(n.n_passes for n in m.nulls),
                "null_seconds": sum(n.seconds for n in m.nulls),
                "mechanism": None if best is None else best.name,
                "label": None if best is None else best.label,
                "effect": None if best is None else m.effect(best),
                "p_answer_min": None if best is None else min(p.p_answer for p in best.curve),
                "n_candidates": len(m.candidates),
                "any_candidate_confirms": any(
                    min(p.p_answer for p in c.curve) <= 0.5 * m.p_answer
                    or any(p.top_token != m.answer for p in c.curve)
                    for c in m.candidates
                ),
                "n_passes": m.n_passes,
                "seconds": m.seconds,
            }
        )
        x = results[-1]
        print(
            f"{r['family']:16s} {'ok ' if m.correct else 'ERR'} p={m.p_answer:.3f} "
            f"{'CONFIRMED' if m.confirmed else 'not confirmed':13s} flips={m.flips!s:5s} "
            f"{'SPECIFIC' if m.specific else 'not specific':12s} p={x['p_value'] or float('nan'):.3f} "
            f"to={m.goes_to or '-':7s} +{x['null_seconds']:.1f}s null "
            f"p_min={x['p_answer_min'] if x['p_answer_min'] is not None else float('nan'):.3f} "
            f"{m.seconds:5.1f}s {m.n_passes:3d} passes  {x['mechanism']} ({x['label']})",
            flush=True,
        )
    wall = time.perf_counter() - start
    load_after = os.getloadavg()[0]
    correct = [x for x in results if x["correct"]]
    confirmed = [x for x in correct if x["confirmed"]]
    secs = [x["seconds"] for x in results]
    null_secs = [x["null_seconds"] for x in results]
    specific = [x for x in correct if x["specific"]]
    summary = {
        "prompts": len(results),
        "accuracy": len(correct) / max(1, len(results)),
        "confirmed_of_correct": len(confirmed) / max(1, len(correct)),
        "n_correct": len(correct),
        "n_confirmed": len(confirmed),
        "specific_of_correct": len(specific) / max(1, len(correct)),
        "n_specific": len(specific),
        "winner_specific_of_correct": sum(x["winner_specific"] for x in correct) / max(1, len(correct)),
        "goes_to_of_correct": {
            where: sum(x["goes_to"] == where for x in correct) for where in ("rival", "other", "nowhere", "")
        },
        "to_rival_of_correct": sum(x["goes_to"] == "rival" for x in correct) / max(1, len(correct)),
        "null_extra_time_per_prompt_mean": statistics.mean(n / max(1e-9, t - n) for n, t in zip(null_secs, secs))
        if secs
        else None,
        "null_extra_time_total": sum(null_secs) / max(1e-9, sum(secs) - sum(null_secs)),
        "null_passes_per_prompt_mean": statistics.mean(x["null_passes"] for x in results) if results else None,
        "any_candidate_confirms_of_correct": sum(x["any_candidate_confirms"] for x in correct) / max(1, len(correct)),
        "per_family": {
            fam: f"{sum(x['confirmed'] for x in correct if x['family'] == fam)}/"
            f"{sum(1 for x in correct if x['family'] == fam)} confirmed, "
            f"{sum(x['specific'] for x in correct if x['family'] == fam)} specific"
            for fam in dict.fromkeys(x["family"] for x in results)
        },
        "seconds_per_prompt_median": statistics.median(secs) if secs else None,
        "seconds_per_prompt_mean": statistics.mean(secs) if secs else None,
        "passes_per_prompt_mean": statistics.mean(x["n_passes"] for x in results) if results else None,
        "wall_seconds": wall,
        "threads": args.threads,
        "load_average_1min": [load_before, load_after],
        "cpus": os.cpu_count(),
        "settings": {
            k: getattr(settings, k) for k in ("sites", "ablate", "candidates", "top_k", "scales", "null_draws")
        },
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": summary, "prompts": results}, indent=1))


if __name__ == "__main__":
    main()
