"""Checkpoint, head and dataset loaders, and the bad inputs each must reject with a clear message."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import ARCH, random_dataset, random_encoder
from raymerge import models
from raymerge.data import DatasetError, ImageDataset, Sharder, decode, load_dataset, shard_indices, write_parquet


def test_safetensors_roundtrip_and_prefixes(tmp_path):
    sd = random_encoder(0)
    models.save_state_dict_file(sd, tmp_path / "a.safetensors")
    loaded = models.load_encoder_weights(ARCH, tmp_path / "a.safetensors")
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)
    # a whole open_clip CLIP checkpoint stores the encoder under visual.; task_vectors under model.visual.
    for prefix in ("visual.", "model.visual."):
        wrapped = {f"{prefix}{k}": v for k, v in sd.items()} | {"text.token_embedding.weight": torch.zeros(2, 2)}
        torch.save(wrapped, tmp_path / "b.pt")
        loaded = models.load_encoder_weights(ARCH, tmp_path / "b.pt")
        assert set(loaded) == set(sd)


def test_missing_and_corrupt_checkpoint(tmp_path):
    with pytest.raises(models.CheckpointError, match="nope.safetensors does not exist"):
        models.load_state_dict_file(tmp_path / "nope.safetensors")
    good = tmp_path / "good.safetensors"
    models.save_state_dict_file(random_encoder(0), good)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(models.CheckpointError, match="bad.safetensors cannot be read"):
        models.load_state_dict_file(bad)


def test_pickled_module_is_refused_not_unpickled(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), path)  # what task_vectors' torch.save(image_encoder) produces
    with pytest.raises(models.CheckpointError, match="module.pt cannot be read safely"):
        models.load_state_dict_file(path)
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"weight": torch.zeros(1)}, protocol=2) + b"garbage")
    with pytest.raises(models.CheckpointError, match="evil.pt"):
        models.load_state_dict_file(evil)


def test_checkpoint_of_another_architecture(tmp_path):
    other = models.build_encoder("ViT-B-32").state_dict()
    small = {k: v for k, v in other.items() if not k.startswith("transformer.resblocks.1")}
    models.save_state_dict_file(small, tmp_path / "b32.safetensors")
    with pytest.raises(models.CheckpointError, match=r"b32.safetensors.*(shape|missing key)"):
        models.load_encoder_weights(ARCH, tmp_path / "b32.safetensors")


def test_unknown_model_name():
    with pytest.raises(models.ModelError, match="unknown model name 'ViT-Q-99'"):
        models.build_encoder("ViT-Q-99")


def test_head_roundtrip_and_dimension_check(tmp_path):
    head = models.Head(torch.randn(3, 64), torch.randn(3), ("a", "b", "c"), normalize=False)
    models.save_head(head, tmp_path / "h.safetensors")
    loaded = models.load_head(tmp_path / "h.safetensors")
    assert loaded.class_names == ("a", "b", "c") and loaded.normalize is False
    assert torch.equal(loaded.weight, head.weight) and torch.equal(loaded.bias, head.bias)
    wide = models.Head(torch.randn(3, 32), None, ("a", "b", "c"))
    with pytest.raises(models.ModelError, match="expects 32-d features but raymerge-tiny-vit outputs 64-d"):
        models.check_head(wide, ARCH, "wide.safetensors")


def test_head_logits_match_formula():
    w, b = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    x = torch.randn(5, 8, dtype=torch.float64)
    head = models.Head(w, b, tuple("abcd"), normalize=True)
    expected = (x / torch.sqrt((x**2).sum(1, keepdim=True))) @ w.T + b
    assert torch.allclose(head.logits(x), expected, atol=1e-12)


def test_parquet_roundtrip_sharded(tmp_path):
    ds = random_dataset(0, 50, 4)
    write_parquet(ds, tmp_path / "d", shard_rows=16)
    assert len(list((tmp_path / "d").glob("*.parquet"))) == 4
    back = load_dataset(tmp_path / "d")
    assert np.array_equal(back.images, ds.images) and np.array_equal(back.labels, ds.labels)
    assert back.class_names == ds.class_names and back.hash == ds.hash


def test_encoded_image_parquet_and_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8)
    blobs = []
    for im in imgs:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    table = pa.table({"image": blobs, "label": [0, 1, 0, 1, 0, 1]})
    pq.write_table(table.replace_schema_metadata({"raymerge.class_names": '["cat", "dog"]'}), tmp_path / "enc.parquet")
    ds = load_dataset(tmp_path / "enc.parquet")
    assert ds.images is None and ds.encoded == tuple(blobs) and ds.class_names == ("cat", "dog")  # kept encoded
    assert np.array_equal(np.stack([np.asarray(decode(b, "x")) for b in ds.encoded]), imgs)
    for i, im in enumerate(imgs):
        (tmp_path / "folder" / ("cat", "dog")[i % 2]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(tmp_path / "folder" / ("cat", "dog")[i % 2] / f"{i}.png")
    folder = load_dataset(tmp_path / "folder")
    assert folder.class_names == ("cat", "dog") and len(folder) == 6
    decoded = np.stack([np.asarray(decode(b, n)) for b, n in zip(folder.encoded, folder.names)])
    assert np.array_equal(decoded[folder.labels == 0], imgs[0::2])
    assert write_parquet(folder, tmp_path / "again") is None and load_dataset(tmp_path / "again").encoded == folder.encoded


def test_empty_dataset_and_labels_out_of_range(tmp_path):
    empty = ImageDataset("e", np.zeros((0, 16, 16), np.uint8), np.zeros(0, np.int64), ("a",))
    write_parquet(empty, tmp_path / "empty")
    with pytest.raises(DatasetError, match="empty is empty"):
        load_dataset(tmp_path / "empty")
    ds = random_dataset(0, 20, 12)
    with pytest.raises(DatasetError, match=r"label 1[01] at row \d+ is out of range for head h.safetensors with 10 classes"):
        ds.check_labels(10, "h.safetensors")


def test_shard_indices_cover_and_align():
    for n, shards, align in ((1000, 3, 64), (10, 4, 1), (5, 3, 64), (0, 2, 8)):
        parts = shard_indices(n, shards, align)
        assert len(parts) == shards
        assert np.array_equal(np.concatenate(parts), np.arange(n))
        assert all(len(p) == 0 or p[0] % align == 0 for p in parts)


def test_shard_indices_put_the_extra_blocks_where_asked():
    # 3 batches over 5 shards, extras on shards 0, 3, 4: [0, 64) on 0, [64, 128) on 3, [128, 150) on 4; 1, 2 empty
    parts = shard_indices(150, 5, 64, extra_on=[4, 0, 3])
    assert [p.tolist() for p in parts] == [list(range(64)), [], [], list(range(64, 128)), list(range(128, 150))]
    for wrong in ([0, 1], [0, 0, 1], [0, 1, 5], [-1, 0, 1]):  # too few, a shard twice, out of range
        with pytest.raises(ValueError, match="3 extra blocks"):
            shard_indices(150, 5, 64, extra_on=wrong)

    # consecutive datasets continue where the last one stopped: 3 batches on shards 0-2, 4 on 3, 4, 0, 1, 2 on 2, 3
    sharder = Sharder(5, 64)
    parts = sharder({"a": 150, "b": 256, "c": 100})
    assert {k: [i for i, p in enumerate(v) if len(p)] for k, v in parts.items()} == {
        "a": [0, 1, 2], "b": [0, 1, 3, 4], "c": [2, 3]} and sharder.start == 4
    # 7 batches over 5 shards: one each, and the 2 left over on the next actors (4, then 0); the next set starts on 1
    assert [len(p) // 64 for p in sharder({"d": 7 * 64})["d"]] == [2, 1, 1, 1, 2] and sharder.start == 1


def _extra_cost(extra: np.ndarray, together: np.ndarray) -> int:
    """Sum over groups of their busiest shard's extra blocks, summed by hand over the group's datasets."""
    return sum(max(sum(int(n) * int(extra[d, s]) for d, n in enumerate(row)) for s in range(extra.shape[1]))
               for row in together)


def test_spread_extra_blocks_finds_the_best_placement_of_small_cases():
    import itertools

    from raymerge.data import spread_extra_blocks

    rng = np.random.default_rng(0)
    shards, datasets = 4, 4
    together = np.array([[d in g for d in range(datasets)] for k in (2, 3, 4)
                         for g in itertools.combinations(range(datasets), k)], dtype=np.int64)  # every subset
    for case in range(5):
        counts = rng.integers(1, shards, size=datasets)  # extra blocks of each dataset: 1 to 3 of the 4 shards
        start = np.zeros((datasets, shards), dtype=bool)
        for d, r in enumerate(counts):
            start[d, :r] = True  # all piled on the first shards
        # the optimum by enumerating every placement
        choices = [list(itertools.combinations(range(shards), r)) for r in counts]
        best = min(_extra_cost(np.array([[s in c for s in range(shards)] for c in combo]), together)
                   for combo in itertools.product(*choices))
        spread = spread_extra_blocks(start, together)
        assert spread.sum(axis=1).tolist() == counts.tolist(), case  # each dataset keeps its extra blocks
        assert _extra_cost(spread, together) == best < _extra_cost(start, together), case


def test_a_sharder_given_groups_balances_each_group():
    # 5 datasets of 5 samples over 4 shards, 1 extra each: in turn on shards 0, 1, 2, 3, 0, so "a" and "e" both
    # have theirs on shard 0; evaluated together, one of them moves
    sizes = dict.fromkeys("abcde", 5)
    alone = Sharder(4)(sizes)
    assert [len(p) for p in alone["a"]] == [len(p) for p in alone["e"]] == [2, 1, 1, 1]
    parts = Sharder(4)(sizes, [["a", "e"], ["b", "c"]])
    busiest = [max(len(x) + len(y) for x, y in zip(parts[g], parts[h])) for g, h in ("ae", "bc")]
    assert busiest == [3, 3]  # 10 samples over 4 shards: at best 3, 3, 2, 2
    for name, shards in parts.items():  # still a cover of the set in batch order
        assert np.array_equal(np.concatenate(shards), np.arange(5)), name


def test_preprocess_normalizes_known_pixels():
    img = np.full((1, 16, 16), 255, np.uint8)
    x = models.preprocess(img, 16)
    expected = (1.0 - np.array(models.DEFAULT_MEAN)) / np.array(models.DEFAULT_STD)
    assert x.shape == (1, 3, 16, 16)
    assert np.allclose(x[0, :, 0, 0].numpy(), expected, atol=1e-6)


def test_a_set_scored_on_a_class_subset_of_its_head():
    from raymerge.pipeline import scored_on

    torch.manual_seed(0)
    head = models.Head(torch.randn(5, 64), torch.randn(5), ("ant", "bee", "cat", "dog", "eel"))
    # an image folder of three of the head's classes: its labels index its own sorted class names
    ds = ImageDataset("r", np.zeros((4, 16, 16), np.uint8), np.array([0, 1, 2, 1]), ("bee", "dog", "eel"))
    sub, scored = scored_on(head, ds, ["dog", "bee", "eel"], "h.safetensors")
    assert sub.class_names == ("dog", "bee", "eel")
    assert torch.equal(sub.weight, head.weight[[3, 1, 4]]) and torch.equal(sub.bias, head.bias[[3, 1, 4]])
    assert scored.labels.tolist() == [1, 0, 2, 0] and scored.class_names == sub.class_names  # matched by name
    # indices into the head, and a set that names no class of it: labels are positions
    numbered = ImageDataset("n", ds.images, np.array([2, 0, 1, 1]), ("0", "1", "2"))
    sub, scored = scored_on(head, numbered, [4, 0, 2], "h.safetensors")
    assert sub.class_names == ("eel", "ant", "cat") and scored.labels.tolist() == [2, 0, 1, 1]
    with pytest.raises(models.ModelError, match=r"classes 'fox', 7 are not classes of head h.safetensors \(5 classes\)"):
        scored_on(head, ds, ["fox", "bee", 7], "h.safetensors")
    with pytest.raises(DatasetError, match=r"classes \['eel'\] are not among the 2 classes of head h.safetensors"):
        scored_on(head, ds, ["bee", "dog"], "h.safetensors")
    with pytest.raises(models.ModelError, match="repeat a class"):
        scored_on(head, ds, ["bee", "bee", "dog"], "h.safetensors")
    # the whole head: a set that names the head's classes in another order (an image folder sorts them) is matched
    # by name, never by position
    whole, scored = scored_on(head, ds, None, "h.safetensors")
    assert whole is head and scored.labels.tolist() == [1, 3, 4, 3]
    shuffled = ImageDataset("s", ds.images, np.array([0, 1, 2, 3]), ("eel", "dog", "cat", "bee", "ant"))
    assert scored_on(head, shuffled, None, "h.safetensors")[1].labels.tolist() == [4, 3, 2, 1]
    odd = ImageDataset("o", ds.images, np.array([0, 1, 0, 1]), ("bee", "fox"))
    with pytest.raises(DatasetError, match=r"classes \['fox'\] are not among the 5 classes .* restrict the head"):
        scored_on(head, odd, None, "h.safetensors")
    twice = models.Head(torch.randn(3, 64), None, ("missile", "ant", "missile"))
    with pytest.raises(models.ModelError, match=r"classes 'missile' name several rows .*: give their row indices"):
        twice.subset(["missile", "ant"], "imagenet.safetensors")
