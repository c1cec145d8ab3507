"""Benchmark: evaluation under bf16 autocast against fp32 — accuracy and predictions of the same candidates.

Measured on the embedded zoo (tiny ViTs, 4 layers of width 64, on 16 × 16 digit images) on this machine's CPU, NOT
CLIP on a GPU: the same experiment run twice through :func:`raymerge.pipeline.run_experiment` (2 actors × 0.5 CPU,
batch 32, fresh logit cache and results store each), once with ``resources.precision: fp32`` and once with ``bf16``
(the encoder and heads under ``torch.autocast`` in bfloat16; weights and merges stay float32). Candidates:

- robust setting (ID test set and its 9 shifted sets): θ0, each fine-tuned model, their weight average, and DaWin
  (Beta mixture, K = 3, with the offset);
- multi-task setting (8 tasks' test sets): θ0, each fine-tuned model on its own task, weight averaging, task
  arithmetic (λ = 0.3), TIES and DaWin (mean coefficients).

``--quick`` evaluates θ0 and one merge of the multi-task setting only (each run starts its own actors, most of
a run's time here).

Per candidate: its accuracy under each precision (mean over its sets), the difference in percentage points (bf16 −
fp32; the largest on one set too), and the fraction of its samples whose prediction changed, from the per-sample
predictions the results store keeps.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bench.common import Context, progress, row

TITLE = "Evaluation precision: bf16 autocast vs fp32 (zoo, CPU)"
BENCHMARK = "bf16 vs fp32: accuracy and changed predictions (zoo, CPU)"
METHODS = {
    "robust": {"zeroshot": {}, "finetuned": {}, "weight_average": {}, "dawin": {"k": 3, "offset": True}},
    "multitask": {"zeroshot": {}, "finetuned": {}, "weight_average": {}, "task_arithmetic": {"lambdas": [0.3]},
                  "ties": {}, "dawin": {"lam0": 0.3}},
}
QUICK_METHODS = {"multitask": {"zeroshot": {}, "task_arithmetic": {"lambdas": [0.3]}}}
PRECISIONS = ("fp32", "bf16")


def _label(setting: str, method: str, params: dict) -> str:
    """A candidate's name in the table; the multi-task fine-tuned models (each on its own task) form one row."""
    if method == "finetuned":
        return f"finetuned ({params['model']})" if setting == "robust" else "finetuned (each on its own task)"
    if method == "task_arithmetic":
        return f"task_arithmetic (λ = {params['lambdas'][0]})"
    if method == "dawin":
        return "dawin (Beta, K = 3, offset)" if setting == "robust" else "dawin (mean)"
    return method


def _evaluate(ctx: Context, setting: str, precision: str) -> dict[tuple[str, str, str], dict]:
    """Rows of one run by (label, task, split): accuracy, n, seconds, predictions."""
    from raymerge import config
    from raymerge.pipeline import run_experiment

    out = ctx.scratch(f"precision-{setting}-{precision}")
    exp = config.load(Path(config.__file__).parent / "experiments" / f"{setting}.yaml", [
        f"zoo={ctx.manifest()}", f"output_dir={out / 'results'}",
        f"methods={json.dumps((QUICK_METHODS if ctx.quick else METHODS)[setting])}",
        f"resources.precision={precision}"])
    store = run_experiment(exp, cache_dir=out / "cache")
    rows = {}
    for r in store.rows():
        params = json.loads(r["params"])
        key = (_label(setting, r["method"], params), r["task"], r["split"])
        rows[key] = {"accuracy": r["accuracy"], "n": r["n"], "seconds": r["seconds"], "candidate": r["params"],
                     "prediction": store.samples(r["key"]).column("prediction").to_numpy()}
    return rows


def run(ctx: Context) -> list[dict]:
    results = {}
    settings = list(QUICK_METHODS if ctx.quick else METHODS)
    for setting in settings:
        for precision in PRECISIONS:
            progress(f"precision: {setting} setting, resources.precision {precision}")
            results[(setting, precision)] = _evaluate(ctx, setting, precision)
    rows, every = [], []
    for setting in settings:
        fp32, bf16 = results[(setting, "fp32")], results[(setting, "bf16")]
        if set(fp32) != set(bf16):
            raise RuntimeError(f"{setting}: the fp32 and bf16 runs evaluated different rows")
        for name in dict.fromkeys(label for label, _, _ in fp32):
            sets = [key for key in fp32 if key[0] == name]
            acc = {p: np.array([r[key]["accuracy"] for key in sets]) for p, r in (("fp32", fp32), ("bf16", bf16))}
            diff = 100 * (acc["bf16"] - acc["fp32"])
            changed = sum(int(np.sum(fp32[key]["prediction"] != bf16[key]["prediction"])) for key in sets)
            n = sum(fp32[key]["n"] for key in sets)
            # one candidate's rows share its seconds (measured_s / baseline_s; on this CPU, nothing to quote for a GPU)
            seconds = {p: sum({r[key]["candidate"]: r[key]["seconds"] for key in sets}.values())
                       for p, r in (("fp32", fp32), ("bf16", bf16))}
            worst = sets[int(np.argmax(np.abs(diff)))]
            every.append((diff, changed, n, f"{setting}: {name}"))
            rows.append(row(
                BENCHMARK, f"{setting}: {name}", seconds["bf16"], seconds["fp32"],
                "the same candidate's accuracy in fp32 (same sets, same pool)",
                float(acc["bf16"].mean() / acc["fp32"].mean()), "0 pp, no prediction changed",
                f"{len(sets)} set(s), {n:,} samples; accuracy fp32 {100 * acc['fp32'].mean():.2f}%, bf16 "
                f"{100 * acc['bf16'].mean():.2f}% (mean over its sets); "
                + (f"largest difference on {worst[1]}/{worst[2]}: {diff[sets.index(worst)]:+.2f} pp"
                   if np.abs(diff).max() > 0 else "the same accuracy on every set")
                + f"; {changed} prediction(s) changed",
                value=100 * acc["bf16"].mean(), baseline_value=100 * acc["fp32"].mean(), unit="% accuracy",
                ratio_means="bf16 accuracy / fp32 accuracy",
                gap=f"{diff.mean():+.2f} pp (largest |Δ| on one set {np.abs(diff).max():.2f} pp); "
                    f"{changed / n:.2%} of predictions changed",
                accuracy_diff_pp=float(diff.mean()), max_abs_diff_pp=float(np.abs(diff).max()),
                changed_fraction=changed / n, changed=changed, samples=n,
                smallest_set=min(fp32[key]["n"] for key in sets)))
    diffs = np.concatenate([d for d, *_ in every])
    changed, n = sum(c for _, c, _, _ in every), sum(k for _, _, k, _ in every)
    acc32, acc16 = (float(np.mean([r[key] for r in rows])) for key in ("baseline_value", "value"))
    rows.append(row(
        BENCHMARK, "all candidates", sum(r["measured_s"] for r in rows), sum(r["baseline_s"] for r in rows),
        "fp32 (every candidate above, mean of their accuracies)", acc16 / acc32, "0 pp, no prediction changed",
        f"{len(diffs)} (candidate, set) pairs, {n:,} predictions; mean |Δ| {np.abs(diffs).mean():.3f} pp; the tiny "
        "ViTs and 16 × 16 digits of the zoo on this CPU, not CLIP on a GPU: measure it there before quoting it for CLIP",
        value=acc16, baseline_value=acc32, unit="% accuracy", ratio_means="bf16 accuracy / fp32 accuracy",
        gap=f"{changed / n:.2%} of predictions changed; accuracy differences {diffs.min():+.2f} to {diffs.max():+.2f} "
            "pp", accuracy_diff_pp=float(diffs.mean()), max_abs_diff_pp=float(np.abs(diffs).max()),
        mean_abs_diff_pp=float(np.abs(diffs).mean()), changed_fraction=changed / n, changed=changed, samples=n,
        smallest_set=min(r["smallest_set"] for r in rows)))
    return rows


def meaning(rows: list[dict]) -> str:
    total = rows[-1]
    worst = max(rows[:-1], key=lambda r: r["max_abs_diff_pp"])
    most = max(rows[:-1], key=lambda r: r["changed_fraction"])
    reordered = []
    for setting in METHODS:
        mine = [r for r in rows[:-1] if r["case"].startswith(f"{setting}: ")]
        if sorted(mine, key=lambda r: -r["baseline_value"]) != sorted(mine, key=lambda r: -r["value"]):
            reordered.append(setting)
    order = (f"the candidates' order by accuracy differs in the {' and '.join(reordered)} setting(s)" if reordered
             else "the candidates' order by accuracy is the same in both precisions")
    return (f"On the digits zoo, evaluated on this machine's CPU (tiny ViTs on 16 × 16 images, not CLIP on a GPU), "
            f"bf16 autocast changed {total['changed_fraction']:.2%} of all predictions against fp32 "
            f"({total['changed']:.0f} of {total['samples']:,.0f}; at most {most['changed_fraction']:.2%} for one "
            f"candidate, {most['case']}), and accuracies by {total['mean_abs_diff_pp']:.2f} pp on average in either "
            f"direction (per candidate and set; signed mean {total['accuracy_diff_pp']:+.2f} pp), "
            f"{worst['max_abs_diff_pp']:.2f} pp at most ({worst['case']}), where one prediction of a set of "
            f"{total['smallest_set']:.0f} images is {100 / total['smallest_set']:.2f} pp; {order}. Merges run in float32 either way; only the forward pass is in bfloat16, which keeps 8 "
            "significant bits (up to ~0.4% error per rounded value), so a prediction changes only where its top two "
            "logits are about that close. The same comparison for CLIP ViT-B/32 on a GPU is still to be measured "
            "(issue 16: whenever a GPU machine is available).")
