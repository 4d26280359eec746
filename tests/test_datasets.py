"""datasets: TensorDataset, make_loader (determinism, sharding), registry, and the real-dataset loaders
(on miniature files written here in each official format)."""
import gzip, io, os, pickle, struct, tarfile, warnings, zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from attnssl.core import ConfigError
from official_formats import pickle_batch, save_png, write_stl10, write_tiny_imagenet
from attnssl.datasets import (CIFAR10, CIFAR100, DATASET_STATS, STL10, CorruptImageError, FashionMNIST, ImageFolder,
                              LazyImageFolder, TensorDataset, TinyImageNet, collate_items, dataset_names, get_dataset,
                              make_loader, read_idx)

def _rand_images(n, h=8, w=8, seed=0):
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))

# ---------------------------------------------------------------- TensorDataset

def test_tensor_dataset_items_and_batches():
    imgs, masks = _rand_images(6), torch.randint(0, 2, (6, 1, 8, 8), dtype=torch.uint8)
    ds = TensorDataset(imgs, torch.tensor([0, 1, 2, -1, -1, 0]), masks, classes=["a", "b", "c"])
    assert ds.num_classes == 3 and ds.has_masks and len(ds) == 6 and ds.labels.dtype == torch.long
    it = ds[-1]
    assert it["index"] == 5 and it["label"] == 0 and torch.equal(it["mask"], masks[5])
    b = ds.get_batch(torch.tensor([4, 1]))
    assert b["image"].dtype == torch.uint8 and b["index"].dtype == torch.long and b["label"].tolist() == [-1, 1]
    assert torch.equal(b["mask"], masks[[4, 1]])
    # get_batch == collated items
    ref = collate_items([ds[4], ds[1]])
    for k in ref: assert torch.equal(ref[k], b[k])
    sub = ds.subset([5, 0])
    assert len(sub) == 2 and torch.equal(sub.images, imgs[[5, 0]]) and sub.classes == ds.classes
    with pytest.raises(IndexError): ds[6]

def test_tensor_dataset_stats_and_validation():
    imgs = torch.zeros(4, 3, 2, 2, dtype=torch.uint8); imgs[:, 1] = 255; imgs[:2, 2] = 255
    ds = TensorDataset(imgs)
    assert ds.mean == (0.0, 1.0, 0.5) and ds.std == (0.0, 0.0, 0.5) and ds.labels.tolist() == [-1] * 4
    assert TensorDataset(imgs, mean=(0.1, 0.2, 0.3), std=(1, 1, 1)).mean == (0.1, 0.2, 0.3)
    with pytest.raises(ConfigError, match="uint8"): TensorDataset(imgs.float())
    with pytest.raises(ConfigError, match="labels"): TensorDataset(imgs, torch.zeros(3))
    with pytest.raises(ConfigError, match="masks"): TensorDataset(imgs, masks=torch.zeros(4, 1, 3, 3, dtype=torch.uint8))
    for name, (m, s) in DATASET_STATS.items():
        assert len(m) == len(s) == 3 and all(0 < v < 1 for v in m + s), name

# ---------------------------------------------------------------- make_loader

def test_loader_order_is_function_of_seed_and_epoch():
    ds = TensorDataset(_rand_images(37))
    a, b = make_loader(ds, 5, seed=7), make_loader(ds, 5, seed=7)
    a.set_epoch(3); b.set_epoch(3)
    ia = [x["index"] for x in a]; ib = [x["index"] for x in b]
    assert len(ia) == len(a) == 7 and all(torch.equal(x, y) for x, y in zip(ia, ib))
    assert all(torch.equal(x["image"], ds.images[x["index"]]) for x in a)
    b.set_epoch(4)
    assert not torch.equal(torch.cat(ia), torch.cat([x["index"] for x in b]))
    c = make_loader(ds, 5, seed=8); c.set_epoch(3)
    assert not torch.equal(torch.cat(ia), torch.cat([x["index"] for x in c]))
    # a fresh loader resumed at epoch 3 sees the same batches (no hidden state)
    d = make_loader(ds, 5, seed=7); list(d); d.set_epoch(3)
    assert all(torch.equal(x["index"], y) for x, y in zip(d, ia))
    assert len(torch.cat(ia).unique()) == 35

def test_loader_no_shuffle_and_last_batch():
    ds = TensorDataset(_rand_images(7))
    ld = make_loader(ds, 3, shuffle=False, drop_last=False)
    assert len(ld) == 3 and [x["index"].tolist() for x in ld] == [[0, 1, 2], [3, 4, 5], [6]]
    assert len(make_loader(ds, 3, shuffle=False)) == 2
    with pytest.raises(ConfigError, match="batch_size"): make_loader(ds, 8)
    with pytest.raises(ConfigError, match="rank"): make_loader(ds, 2, rank=2, world_size=2)

@pytest.mark.parametrize("world_size", [2, 3])
def test_loader_sharding_disjoint_and_complete(world_size):
    n = 24
    ds = TensorDataset(_rand_images(n))
    for epoch in range(2):
        parts = []
        for r in range(world_size):
            ld = make_loader(ds, 2, seed=1, rank=r, world_size=world_size, drop_last=False); ld.set_epoch(epoch)
            parts.append(torch.cat([x["index"] for x in ld]))
        assert all(len(p) == n // world_size for p in parts)
        allidx = torch.cat(parts)
        assert len(allidx.unique()) == n and sorted(allidx.tolist()) == list(range(n))  # disjoint, union = all
    # uneven: padded so every rank gets the same number of batches
    ds = TensorDataset(_rand_images(10))
    lds = [make_loader(ds, 2, rank=r, world_size=3, drop_last=False) for r in range(3)]
    assert len({len(l) for l in lds}) == 1 and set(torch.cat([l.indices() for l in lds]).tolist()) == set(range(10))

class _ItemOnly(torch.utils.data.Dataset):
    "A file-backed-style dataset without get_batch."
    def __init__(self, n): self.images = _rand_images(n)
    def __len__(self): return len(self.images)
    def __getitem__(self, i): return {"image": self.images[i], "index": i, "label": i % 3}

def test_loader_dataloader_path_matches_tensor_path():
    items, tens = _ItemOnly(12), TensorDataset(_rand_images(12))
    la, lb = make_loader(items, 4, seed=2), make_loader(tens, 4, seed=2)
    for x, y in zip(la, lb):
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["image"], items.images[x["index"]])
        assert x["label"].dtype == torch.long and x["label"].tolist() == (x["index"] % 3).tolist()

# ---------------------------------------------------------------- registry

def test_registry_names_and_errors():
    names = dataset_names()
    for n in ["clutter", "stl10", "cifar10", "cifar100", "tiny-imagenet", "fashion-mnist", "imagefolder"]:
        assert n in names
    with pytest.raises(ConfigError) as e: get_dataset("imagenet-1k")
    assert "valid names" in str(e.value) and "stl10" in str(e.value)
    with pytest.raises(ConfigError, match="valid splits"): get_dataset("clutter", split="val")


# ---------------------------------------------------------------- STL-10 (official binary layout, written here)

def _write_stl10(root, **kw):
    "The official STL-10 binary layout (tests/official_formats.py), truth as torch tensors."
    return {k: (torch.from_numpy(x), torch.from_numpy(y)) for k, (x, y) in write_stl10(root, **kw).items()}

@pytest.fixture(scope="module")
def stl_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("stl")
    return root, _write_stl10(root)

def test_stl10_round_trip_labels_and_splits(stl_root):
    root, truth = stl_root
    tr = get_dataset("stl10", "train", root=root)
    assert torch.equal(tr.images, truth["train"][0])                  # pixel exact, orientation correct
    assert torch.equal(tr.labels, truth["train"][1])                  # 1-based -> 0-based
    assert tr.classes[0] == "airplane" and tr.num_classes == 10 and not tr.has_masks and tr.mean == DATASET_STATS["stl10"][0]
    te = STL10(root / "stl10_binary", "test")                        # pointing at the official folder works too
    assert len(te) == 6 and torch.equal(te.images, truth["test"][0]) and torch.equal(te.labels, truth["test"][1])
    un = STL10(root, "unlabeled")
    assert len(un) == 5 and (un.labels == -1).all() and torch.equal(un.images, truth["unlabeled"][0])
    both = STL10(root, "train+unlabeled")
    assert len(both) == 17 and torch.equal(both.images[12:], truth["unlabeled"][0]) and (both.labels[12:] == -1).all()
    assert torch.equal(both.labels[:12], truth["train"][1])

def test_stl10_folds(stl_root):
    root, truth = stl_root
    for k in (0, 9):
        f = get_dataset("stl10", "train", root=root, fold=k)
        idx = [(k + j) % 12 for j in range(4)]
        assert torch.equal(f.images, truth["train"][0][idx]) and torch.equal(f.labels, truth["train"][1][idx])
    with pytest.raises(ConfigError, match="split='train'"): STL10(root, "test", fold=0)
    with pytest.raises(ConfigError, match="0..9"): STL10(root, "train", fold=10)

def test_stl10_missing_root_and_corrupt(tmp_path):
    with pytest.raises(ConfigError) as e: get_dataset("stl10", root=tmp_path / "nowhere")
    msg = str(e.value)
    assert "stl10_binary/train_X.bin" in msg and "fold_indices.txt" in msg and "root=" in msg and "download=True" in msg
    d = tmp_path / "stl10_binary"; d.mkdir()
    (d / "train_X.bin").write_bytes(b"\0" * 1000)
    (d / "train_y.bin").write_bytes(b"\1")
    with pytest.raises(CorruptImageError, match="train_X.bin"): STL10(tmp_path)
    (d / "train_X.bin").write_bytes(b"\0" * 27648)
    (d / "train_y.bin").write_bytes(b"\x0b")                           # label 11: out of range
    with pytest.raises(CorruptImageError, match="train_y.bin"): STL10(tmp_path)

def test_archive_checksum_and_download(stl_root, tmp_path, monkeypatch):
    root, truth = stl_root
    arch = tmp_path / "src" / "stl10_binary.tar.gz"; arch.parent.mkdir()
    with tarfile.open(arch, "w:gz") as t: t.add(root / "stl10_binary", arcname="stl10_binary")
    staged = tmp_path / "staged"; staged.mkdir(); (staged / arch.name).write_bytes(arch.read_bytes())
    with pytest.raises(ConfigError, match="verify=False"): STL10(staged)   # not the official MD5
    assert torch.equal(STL10(staged, verify=False).images, truth["train"][0])
    # download=True: the fetch itself is replaced by a copy (no network in tests)
    import attnssl.datasets as D
    calls = []
    def fake_download(url, dest, filename):
        calls.append(url); (Path(dest) / filename).write_bytes(arch.read_bytes())
    monkeypatch.setattr(D, "_download", fake_download)
    fresh = tmp_path / "fresh"
    with pytest.raises(ConfigError, match="checksum"): STL10(fresh, download=True)
    (fresh / arch.name).unlink()
    ds = get_dataset("stl10", "test", root=fresh, download=True, verify=False)
    assert calls[-1] == D.STL10_URL and torch.equal(ds.images, truth["test"][0])

# ---------------------------------------------------------------- CIFAR-10/100 (python pickle batches)

_pickle_batch = pickle_batch

def test_cifar10_round_trip(tmp_path):
    d = tmp_path / "cifar-10-batches-py"; d.mkdir()
    imgs = _rand_images(5 * 4 + 3, 32, 32, seed=1); labels = torch.arange(23) % 10
    for b in range(5):
        sl = slice(4 * b, 4 * b + 4)
        _pickle_batch(d / f"data_batch_{b + 1}", data=imgs[sl].reshape(4, -1).numpy(), labels=labels[sl].tolist(),
                      batch_label=b"training batch", filenames=[b"x.png"] * 4)
    _pickle_batch(d / "test_batch", data=imgs[20:].reshape(3, -1).numpy(), labels=labels[20:].tolist())
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    _pickle_batch(d / "batches.meta", label_names=names, num_vis=3072)
    tr, te = get_dataset("cifar10", "train", root=tmp_path), get_dataset("cifar-10", "test", root=tmp_path)
    assert torch.equal(tr.images, imgs[:20]) and torch.equal(tr.labels, labels[:20])
    assert torch.equal(te.images, imgs[20:]) and tr.classes[1] == "automobile" and te.num_classes == 10
    (d / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(CorruptImageError, match="data_batch_3"): CIFAR10(tmp_path)
    with pytest.raises(ConfigError) as e: CIFAR10(tmp_path / "missing")
    assert "cifar-10-batches-py/data_batch_1" in str(e.value) and "download=True" in str(e.value)

def test_cifar100_fine_and_coarse(tmp_path):
    d = tmp_path / "cifar-100-python"; d.mkdir()
    imgs = _rand_images(7, 32, 32, seed=2); fine = [99, 0, 5, 42, 7, 1, 63]; coarse = [f % 20 for f in fine]
    _pickle_batch(d / "train", data=imgs.reshape(7, -1).numpy(), fine_labels=fine, coarse_labels=coarse)
    _pickle_batch(d / "test", data=imgs[:2].reshape(2, -1).numpy(), fine_labels=fine[:2], coarse_labels=coarse[:2])
    _pickle_batch(d / "meta", fine_label_names=[f"f{i}".encode() for i in range(100)],
                  coarse_label_names=[f"c{i}".encode() for i in range(20)])
    ds = get_dataset("cifar100", root=tmp_path)
    assert torch.equal(ds.images, imgs) and ds.labels.tolist() == fine and ds.num_classes == 100 and ds.classes[99] == "f99"
    assert CIFAR100(tmp_path, "train", label_type="coarse").labels.tolist() == coarse
    assert len(CIFAR100(tmp_path, "test")) == 2

# ---------------------------------------------------------------- Tiny ImageNet (files read in place)

_save_png = save_png

@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny"); write_tiny_imagenet(root)   # wnids unsorted on disk: classes are sorted
    return root

def test_tiny_imagenet_splits_and_val_annotations(tiny_root):
    d = tiny_root / "tiny-imagenet-200"
    tr = get_dataset("tiny-imagenet", "train", root=tiny_root)
    assert tr.classes == ["n0100", "n0200", "n0300"] and tr.class_words[0].startswith("goldfish")
    assert len(tr) == 6 and tr.labels.tolist() == [0, 0, 1, 1, 2, 2] and tr.num_skipped == 0
    ref = np.array(Image.open(d / "train" / "n0200" / "images" / "n0200_1.JPEG"))
    assert torch.equal(tr.images[3], torch.from_numpy(ref).permute(2, 0, 1))   # pixel exact, CHW
    va = TinyImageNet(tiny_root, "val")
    assert va.labels.tolist() == [1, 2, 0, 1]                                   # from val_annotations.txt
    ref = np.array(Image.open(d / "val" / "images" / "val_2.JPEG"))
    assert torch.equal(va.images[2], torch.from_numpy(ref).permute(2, 0, 1))
    te = TinyImageNet(tiny_root, "test")
    assert len(te) == 3 and (te.labels == -1).all() and te.num_classes == 3

def test_tiny_imagenet_corrupt_and_missing(tiny_root, tmp_path):
    import shutil
    root = tmp_path / "t"; shutil.copytree(tiny_root, root)
    bad = root / "tiny-imagenet-200" / "train" / "n0200" / "images" / "n0200_0.JPEG"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(CorruptImageError) as e: TinyImageNet(root, "train")
    assert "n0200_0.JPEG" in str(e.value) and "skip_corrupt=True" in str(e.value)
    with pytest.warns(UserWarning, match="skipped 1 corrupt"):
        ds = TinyImageNet(root, "train", skip_corrupt=True)
    assert len(ds) == 5 and ds.num_skipped == 1 and ds.skipped_files == [str(bad)] and ds.labels.tolist() == [0, 0, 1, 2, 2]
    (root / "tiny-imagenet-200" / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn7777\t0\t0\t1\t1\n")
    with pytest.raises(CorruptImageError, match="val_annotations.txt line 1"): TinyImageNet(root, "val")
    with pytest.raises(ConfigError) as e: TinyImageNet(tmp_path / "none")
    assert "val/val_annotations.txt" in str(e.value) and "download=True" in str(e.value)

# ---------------------------------------------------------------- Fashion-MNIST (IDX, gz or raw)

def _idx_bytes(arr):
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    return b"\0\0\x08" + bytes([arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()

def test_fashion_mnist_gz_and_raw(tmp_path):
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8), np.array([9, 0, 3, 3, 1], dtype=np.uint8)
    xt, yt = rng.integers(0, 256, (2, 28, 28), dtype=np.uint8), np.array([4, 5], dtype=np.uint8)
    d = tmp_path / "FashionMNIST" / "raw"; d.mkdir(parents=True)
    (d / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(x)))
    (d / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(y)))
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(xt))                  # raw, directly in root
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(yt))
    tr = get_dataset("fashion-mnist", "train", root=tmp_path)
    assert tr.images.shape == (5, 3, 28, 28) and all(torch.equal(tr.images[:, c], torch.from_numpy(x)) for c in range(3))
    assert tr.labels.tolist() == [9, 0, 3, 3, 1] and tr.classes[9] == "Ankle boot"
    te = FashionMNIST(tmp_path, "test")
    assert torch.equal(te.images[:, 1], torch.from_numpy(xt)) and te.labels.tolist() == [4, 5]
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(yt)[:-1])             # truncated
    with pytest.raises(CorruptImageError, match="t10k-labels-idx1-ubyte"): FashionMNIST(tmp_path, "test")
    with pytest.raises(ConfigError, match="t10k-images-idx3-ubyte.gz"): FashionMNIST(tmp_path / "no", "test")

# ---------------------------------------------------------------- ImageFolder

def test_image_folder_classes_resize_and_flat(tmp_path):
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    _save_png(tmp_path / "cls" / "zebra" / "a.png", a)
    _save_png(tmp_path / "cls" / "ant" / "sub" / "b.png", rng.integers(0, 256, (40, 20, 3), dtype=np.uint8))
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), "L").save(tmp_path / "cls" / "ant" / "c.jpg")
    (tmp_path / "cls" / "notes").mkdir(); (tmp_path / "cls" / "notes" / "readme.txt").write_text("no images here")
    ds = get_dataset("imagefolder", root=tmp_path / "cls", image_size=16)
    assert ds.classes == ["ant", "zebra"] and ds.labels.tolist() == [0, 0, 1] and ds.images.shape == (3, 3, 16, 16)
    assert torch.equal(ds.images[2], torch.from_numpy(a).permute(2, 0, 1))           # same size: untouched
    assert ds.files[0].endswith("c.jpg") and (ds.images[0, 0] == ds.images[0, 1]).all()  # grey -> 3 equal channels
    # flat folder -> unlabeled
    for k in range(3): _save_png(tmp_path / "flat" / f"{k}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    flat = ImageFolder(tmp_path / "flat", image_size=8)
    assert len(flat) == 3 and (flat.labels == -1).all() and flat.classes == [] and flat.num_classes == 0
    # split selects root/<split> when it exists
    _save_png(tmp_path / "splits" / "val" / "k" / "x.png", a)
    assert len(get_dataset("imagefolder", "val", root=tmp_path / "splits", image_size=8)) == 1
    with pytest.raises(ConfigError, match="root="): get_dataset("imagefolder", root=tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no images"): ImageFolder(tmp_path / "empty")

def test_image_folder_corrupt_and_lazy(tmp_path):
    rng = np.random.default_rng(3)
    for k in range(4): _save_png(tmp_path / ("a" if k < 2 else "b") / f"{k}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    (tmp_path / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(CorruptImageError, match="broken.png"): ImageFolder(tmp_path, image_size=8)
    with pytest.warns(UserWarning, match="skipped 1"):
        ds = get_dataset("imagefolder", root=tmp_path, image_size=8, skip_corrupt=True)
    assert len(ds) == 4 and ds.num_skipped == 1
    lazy = get_dataset("imagefolder", root=tmp_path, image_size=8, lazy=True)
    assert isinstance(lazy, LazyImageFolder) and len(lazy) == 5 and lazy.num_classes == 2
    with pytest.raises(CorruptImageError, match="broken.png"): lazy[4]
    good = LazyImageFolder(tmp_path / "a", image_size=8)       # flat folder of 2 images, through a DataLoader
    batches = list(make_loader(good, 2, seed=0))
    assert len(batches) == 1 and batches[0]["image"].shape == (2, 3, 8, 8) and (batches[0]["label"] == -1).all()
    assert torch.equal(batches[0]["image"][0], good[int(batches[0]["index"][0])]["image"])

def test_subset_keeps_boxes_and_to_device():
    from attnssl.synthetic import ClutterShapes
    ds = ClutterShapes("test", num_images=10, seed=0, cache=False)
    sub = ds.subset([4, 2])
    assert torch.equal(sub.boxes, ds.boxes[[4, 2]]) and torch.equal(sub.masks, ds.masks[[4, 2]]) and sub.mean == ds.mean
    moved = TensorDataset(ds.images.clone(), ds.labels.clone()).to("cpu")
    assert moved.get_batch(torch.tensor([1]))["image"].device.type == "cpu"

def test_decode_images_threads_same_result(tmp_path):
    from attnssl.datasets import decode_images
    rng = np.random.default_rng(5); paths = []
    for k in range(70):
        p = tmp_path / f"{k}.png"; _save_png(p, rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)); paths.append(p)
    (tmp_path / "bad.png").write_bytes(b"nope"); paths.insert(10, tmp_path / "bad.png")
    with pytest.warns(UserWarning):
        a, ka, sa = decode_images(paths, 6, skip_corrupt=True, num_threads=1)
    with pytest.warns(UserWarning):
        b, kb, sb = decode_images(paths, 6, skip_corrupt=True, num_threads=3)
    assert torch.equal(a, b) and ka == kb and len(ka) == 70 and 10 not in ka and sa == sb == [str(tmp_path / "bad.png")]
    with pytest.raises(CorruptImageError, match="bad.png"): decode_images(paths, 6, num_threads=3)
