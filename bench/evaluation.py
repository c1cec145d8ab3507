"""Benchmark: sharded evaluation throughput, Ray actors against a plain single-process PyTorch loop.

Same model, same preprocessed images, same batch size, same weights: the loop is ``load_weights_in_place`` then
``predict_logits`` in the driver with torch set to 1 or 2 intra-op threads; the pool is
:class:`raymerge.workers.WorkerPool` with 1 or 2 actors of ``num_cpus_per_actor=1`` (one torch thread each), whose
shards were prepared beforehand (``pool.prepare()``), evaluated with ``pool.evaluate`` on weights already in the
object store. Every timed pass switches between two weight sets, so every pass (loop or actor) loads weights.
Loop and pool passes alternate while the pool is up, so each ratio compares measurements taken side by side.

Models: the zoo's tiny ViT on every robust test set concatenated (4,500 16×16 images on the embedded zoo) and
ViT-B/32 (``build_encoder("ViT-B-32")``, random weights, 224×224 random images; only 64 images, batch 16, best of
2 passes per configuration: ~5–20 images/s on these cores, and a 2-thread pass under load can take minutes;
skipped by ``--quick``).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from bench.common import Context, best, progress, row, spread

TITLE = "Sharded evaluation: Ray actors vs a single-process PyTorch loop"


def _local_pass(encoder, head, images: torch.Tensor, weights, batch: int, threads: int) -> float:
    from raymerge import models

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        models.load_weights_in_place(encoder, weights)
        models.predict_logits(encoder, head, images, batch)
        return time.perf_counter() - start
    finally:
        torch.set_num_threads(previous)


def _pool_pass(pool, key: str) -> float:
    start = time.perf_counter()
    pool.evaluate(key, "head", "data")
    return time.perf_counter() - start


def _measure(arch: str, dataset, head, weights: list, batch: int, repeats: int, label: str,
             actor_counts: tuple[int, ...] = (1, 2)) -> dict:
    """Seconds per pass for loop-1-thread, pool-1-actor, loop-2-threads, pool-2-actors; and the driver's put cost."""
    from raymerge import models
    from raymerge.workers import Resources, WorkerPool

    encoder = models.build_encoder(arch)
    images = models.preprocess(dataset.images, models.image_size(arch))
    times: dict[str, list[float]] = {}
    put_s = []
    for actors in actor_counts:
        times[f"loop{actors}"], times[f"pool{actors}"] = [], []
        progress(f"evaluation {label}: {actors} actor(s) against the {actors}-thread loop, {repeats} repeat(s)")
        pool = WorkerPool(arch, Resources(num_actors=actors, num_cpus_per_actor=1.0, batch_size=batch))
        try:
            pool.add_head("head", head)
            pool.add_dataset("data", dataset)
            pool.prepare()
            keys = []
            for w in weights:
                t = time.perf_counter()
                keys.append(pool.put_weights(w))
                put_s.append(time.perf_counter() - t)
            # warm-up: first batches through both paths (allocator, kernel selection, weights' first load)
            first = np.concatenate([part[:batch] for part in pool.shards["data"]])
            pool.evaluate(keys[-1], "head", "data", rows=first)
            _local_pass(encoder, head, images[:batch], weights[-1], batch, actors)
            for i in range(repeats):  # alternate weight sets: every pass loads weights
                times[f"loop{actors}"].append(_local_pass(encoder, head, images, weights[i % len(weights)], batch, actors))
                times[f"pool{actors}"].append(_pool_pass(pool, keys[i % len(keys)]))
        finally:
            pool.shutdown()
    return {"times": times, "put_s": put_s, "n": len(dataset)}


def _rows(model: str, m: dict, batch: int, repeats: int) -> list[dict]:
    n = m["n"]
    t = {k: best(v) for k, v in m["times"].items()}
    rate = {k: n / v for k, v in t.items()}
    spreads = "; ".join(f"{k}: {spread(v)} s" for k, v in m["times"].items())
    setup = f"{n} images, batch {batch}, best of {repeats} per configuration (all passes {spreads})"
    pairs = [
        ("1 actor vs 1-thread loop", "pool1", "loop1", 1.0, "1.0× (an actor is the same loop in another process)"),
        ("2 actors vs 2-thread loop", "pool2", "loop2", 1.0, "1.0× (2 single-thread shards ≈ one 2-thread loop)"),
        ("2 actors vs 1 actor", "pool2", "pool1", 2.0, "2.0× (two cores)"),
        ("2-thread vs 1-thread loop", "loop2", "loop1", 2.0, "2.0× (torch intra-op threads, no Ray)"),
    ]
    labels = {"pool1": "WorkerPool, 1 actor", "pool2": "WorkerPool, 2 actors",
              "loop1": "single-process loop, torch 1 thread", "loop2": "single-process loop, torch 2 threads"}
    rows = []
    for case, measured, baseline, ideal, ideal_text in pairs:
        if measured not in t or baseline not in t:
            continue
        ratio = rate[measured] / rate[baseline]
        rows.append(row(
            "Sharded evaluation throughput", f"{model}: {case}", t[measured], t[baseline], labels[baseline], ratio,
            ideal_text, setup,
            value=rate[measured], baseline_value=rate[baseline], unit="images/s",
            ratio_means="measured images/s / baseline images/s", gap=f"{ratio / ideal:.0%} of ideal",
            ideal_value=ideal))
    return rows


def _zoo_dataset(ctx: Context):
    import yaml

    from raymerge import models
    from raymerge.data import ImageDataset, load_dataset

    manifest = ctx.manifest()
    setting = yaml.safe_load(manifest.read_text())["settings"]["robust"]
    root = manifest.parent
    (task,) = setting["task_pool"].values()
    paths = [task["test"], *task["shifts"].values()]
    sets = [load_dataset(root / p) for p in paths]
    data = ImageDataset("all", np.concatenate([s.images for s in sets]), np.concatenate([s.labels for s in sets]),
                        sets[0].class_names)
    pool = setting["model_pool"]
    arch = pool["architecture"]
    weights = [models.load_encoder_weights(arch, root / pool["base"]),
               models.load_encoder_weights(arch, root / next(iter(pool["finetuned"].values())))]
    return arch, data, models.load_head(root / task["head"]), weights


def run(ctx: Context) -> list[dict]:
    from raymerge import models
    from raymerge.data import ImageDataset
    from raymerge.statedict import to_numpy

    rows = []
    repeats = 1 if ctx.quick else 3
    arch, data, head, weights = _zoo_dataset(ctx)
    batch = 32
    weights = [to_numpy(w) for w in weights]
    # --quick: only the 2-actor pool (each pool start costs every actor a torch import)
    m = _measure(arch, data, head, weights, batch, repeats, "tiny ViT", (2,) if ctx.quick else (1, 2))
    rows += _rows("tiny ViT (zoo)", m, batch, repeats)

    if ctx.quick:  # ViT-B/32 on 2 cores costs most of a minute even at 16 images: the smoke run skips it
        progress("evaluation: --quick skips ViT-B/32; the put-cost row uses the tiny ViT")
        m_put, label, put_scale = m, "tiny ViT (quick; ViT-B/32 skipped)", 87_849_216 / sum(v.size for v in weights[0].values())
    else:
        n, batch, arch = 64, 16, "ViT-B-32"
        progress(f"evaluation ViT-B/32: building the model and {n} random 224×224 images")
        torch.manual_seed(0)
        base = {k: v.detach().clone() for k, v in models.build_encoder(arch).state_dict().items()}
        other = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in base.items()}
        rng = np.random.default_rng(0)
        data = ImageDataset("random", rng.integers(0, 256, (n, 224, 224, 3), dtype=np.uint8),
                            rng.integers(0, 10, n).astype(np.int64), tuple(str(i) for i in range(10)))
        head = models.Head(torch.randn(10, models.embed_dim(arch)), None, tuple(str(i) for i in range(10)))
        m_put = _measure(arch, data, head, [to_numpy(base), to_numpy(other)], batch, 2, "ViT-B/32")
        rows += _rows("ViT-B/32", m_put, batch, 2)
        label, put_scale = "ViT-B/32: state_dict_hash + ray.put of 350 MB", 1.0
    pass2 = best(m_put["times"]["pool2"])
    put = best(m_put["put_s"])
    rows.append(row(
        "Sharded evaluation: driver cost per weight set", label,
        put, pass2, "one 2-actor pass over the images above", put / pass2,
        "≪ 1 pass (hashed and put once per merged model)",
        f"WorkerPool.put_weights (Run pays it for every new weight set it is handed): best of {len(m_put['put_s'])} "
        f"({spread(m_put['put_s'])} s); on GPUs a pass over a test set takes seconds, so this driver-side cost per "
        "merged model becomes a visible share",
        ratio_means="put seconds / pass seconds", gap=f"{put / pass2:.2f} passes", ideal_value=0.0))
    put = put * put_scale
    ctx.shared["vitb32_put_s"] = put
    capacity = ctx.shared.get("capacity", [None])[0]
    for r in rows:
        if capacity is not None:
            r["machine_capacity"] = float(capacity)
    return rows


def meaning(rows: list[dict]) -> str:
    def pick(suffix: str) -> list[dict]:
        return [r for r in rows if r["case"].endswith(suffix)]

    def ratios(rs: list[dict]) -> str:
        return ", ".join(f"{r['ratio']:.2f}× ({r['case'].split(':')[0]})" for r in rs)

    text = ""
    if pick("1 actor vs 1-thread loop"):
        text += (f"One actor runs at {ratios(pick('1 actor vs 1-thread loop'))} the rate of the same loop in the driver: "
                 "that is what Ray itself costs (weights by reference, shards prepared ahead). ")
    if pick("2 actors vs 2-thread loop"):
        text += f"Two actors against a 2-thread loop: {ratios(pick('2 actors vs 2-thread loop'))}. "
    scaling, threads = pick("2 actors vs 1 actor"), pick("2-thread vs 1-thread loop")
    if scaling:
        text += f"Going from 1 to 2 actors gives {ratios(scaling)}"
        if threads:
            text += f", from 1 to 2 torch threads {ratios(threads)}"
        if "machine_capacity" in scaling[0]:
            text += f", while two plain processes got {scaling[0]['machine_capacity']:.2f}× at the start of the run"
        text += ". "
    return text + ("Anything that needs the second core moves with other users' load from minute to minute on this "
                   "shared machine, and torch's intra-op threads suffer most when one core is taken (they wait for "
                   "each other); single-thread actors, one per core, degrade more gracefully.")
