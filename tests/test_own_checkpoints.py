"""A user's own CLIP models, end to end: every checkpoint format in one experiment, zero-shot heads built from class
names and templates, image folders of 224 px JPEGs decoded on the actors, and one task scored on a class subset."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import yaml
from PIL import Image

from clip_fixtures import ARCH
from raymerge.results import ResultStore

REPO = Path(__file__).resolve().parents[1]
EUROSAT = ("AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture", "PermanentCrop",
           "Residential", "River", "SeaLake")


def _job():
    spec = importlib.util.spec_from_file_location("eval_job", REPO / "jobs" / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _folder(root: Path, classes: list[str], per_class: int, seed: int) -> Path:
    """An image folder of 224 px (and one 300×260) JPEGs with seeded colour blobs."""
    rng = np.random.default_rng(seed)
    for i, cls in enumerate(classes):
        (root / cls).mkdir(parents=True)
        for j in range(per_class):
            size = (300, 260) if i == j == 0 else (224, 224)
            pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{j}.jpg", quality=90)
    return root


@pytest.mark.slow
def test_an_experiment_of_every_format_runs_end_to_end(clip_pool, raymerge_cache, ray_local, tmp_path):
    files = clip_pool.files
    data = tmp_path / "data"
    svhn_subset = ["0", "3", "5"]  # SVHN's task_vectors head has 10 classes; this set is scored on three of them
    experiment = {
        "name": "own-checkpoints",
        "model_pool": {
            "architecture": ARCH,
            "base": str(files["task_vectors"]["base"]),             # a pickled task_vectors ImageEncoder
            "finetuned": {
                "MNIST": str(files["hf"]["MNIST"]),                 # a Hugging Face CLIPVisionModel directory
                "SVHN": str(files["tall_masks"]["SVHN"]),           # a TALL-masks state dict
                "EuroSAT": str(files["open_clip"]["EuroSAT"]),      # an open_clip training checkpoint
            },
        },
        "task_pool": {
            "MNIST": {"finetuned": "MNIST", "test": str(_folder(data / "mnist", ["zero", "one", "two"], 2, 0)),
                      "head": {"classes": ["zero", "one", "two"], "templates": "MNIST",
                               "weights": str(files["open_clip"]["base"])}},
            "SVHN": {"finetuned": "SVHN", "head": str(files["task_vectors"]["base"].parent / "head_SVHN.pt"),
                     "test": str(_folder(data / "svhn", svhn_subset, 3, 1)), "classes": [0, 3, 5]},
            "EuroSAT": {"finetuned": "EuroSAT", "test": str(_folder(data / "eurosat", list(EUROSAT), 1, 2)),
                        "head": {"classes": "EuroSAT", "templates": "EuroSAT", "weights": str(files["hf"]["base"])}},
        },
        "methods": {"zeroshot": {}, "finetuned": {}, "weight_average": {}, "task_arithmetic": {"lambdas": [0.3]}},
        "resources": {"num_actors": 2, "num_cpus_per_actor": 0.5, "batch_size": 4},
        "output_dir": str(tmp_path / "results"),
    }
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(experiment))
    assert _job().main(["--config", str(path), "--cache-dir", str(raymerge_cache)]) == 0
    rows = {(r["method"], r["task"]): r for r in ResultStore(tmp_path / "results").rows()}
    assert {m for m, _ in rows} == {"zeroshot", "finetuned", "weight_average", "task_arithmetic"}
    assert rows[("zeroshot", "SVHN")]["n"] == 9 and rows[("zeroshot", "EuroSAT")]["n"] == 10

    # θ0 on the SVHN subset, computed independently: open_clip's own model, transform and the head's three rows
    model = open_clip.create_model(ARCH)
    model.load_state_dict(clip_pool.clips["base"])
    model.eval()
    transform = open_clip.image_transform(model.visual.image_size, is_train=False)
    weight, bias, normalize = clip_pool.heads["SVHN"]
    rows_of = torch.tensor([int(c) for c in svhn_subset])
    images, labels = [], []
    for label, cls in enumerate(svhn_subset):
        for f in sorted((data / "svhn" / cls).iterdir()):
            images.append(transform(Image.open(f).convert("RGB")))
            labels.append(label)
    with torch.no_grad():
        features = model.encode_image(torch.stack(images))
        if normalize:
            features = features / features.norm(dim=-1, keepdim=True)
        logits = features @ weight[rows_of].T + bias[rows_of]
    expected = float(np.mean(logits.argmax(1).numpy() == np.array(labels)))
    assert rows[("zeroshot", "SVHN")]["accuracy"] == pytest.approx(expected, abs=1e-9)
