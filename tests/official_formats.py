"""Small files in the official on-disk formats of STL-10, CIFAR-10/100, Tiny ImageNet and an image folder.
No dataset can be downloaded in tests: the loaders and the `paper` dry run read these instead."""
import pickle
from pathlib import Path
import numpy as np
from PIL import Image

STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]

def random_images(n, h, w, seed=0):
    "uint8 images (n, 3, h, w)."
    return np.random.default_rng(seed).integers(0, 256, (n, 3, h, w), dtype=np.uint8)

def write_stl10(root, n_train=12, n_test=6, n_unl=5):
    """stl10_binary/*.bin: uint8, each image as 3 planes stored column-major; labels 1..10 one byte each.
    Returns {split: (images (n,3,96,96) uint8, 0-based labels)}."""
    d = Path(root)/"stl10_binary"; d.mkdir(parents=True)
    out = {}
    for split, n in [("train", n_train), ("test", n_test), ("unlabeled", n_unl)]:
        imgs = random_images(n, 96, 96, seed=len(split))
        (d/f"{split}_X.bin").write_bytes(imgs.transpose(0, 1, 3, 2).tobytes())   # (C,W,H) = column-major
        labels = (np.arange(n)*3) % 10
        if split != "unlabeled": (d/f"{split}_y.bin").write_bytes((labels + 1).astype(np.uint8).tobytes())
        out[split] = (imgs, labels)
    folds = [" ".join(str((k + j) % n_train) for j in range(4)) for k in range(10)]
    (d/"fold_indices.txt").write_text("\n".join(folds) + "\n")
    (d/"class_names.txt").write_text("\n".join(STL10_CLASSES) + "\n")
    return out

def pickle_batch(path, **entries):
    "The official CIFAR files are Python 2 pickles: keys are byte strings once loaded with encoding='bytes'."
    with open(path, "wb") as f: pickle.dump({k.encode(): v for k, v in entries.items()}, f, protocol=2)

def write_cifar10(root, n_per_batch=4, n_test=10):
    "cifar-10-batches-py: five training batches, a test batch and batches.meta (labels cycle through 0..9)."
    d = Path(root)/"cifar-10-batches-py"; d.mkdir(parents=True)
    n = 5*n_per_batch
    imgs, labels = random_images(n + n_test, 32, 32, seed=1), [i % 10 for i in range(n + n_test)]
    for b in range(5):
        sl = slice(n_per_batch*b, n_per_batch*(b + 1))
        pickle_batch(d/f"data_batch_{b + 1}", data=imgs[sl].reshape(n_per_batch, -1), labels=labels[sl],
                     batch_label=b"training batch", filenames=[b"x.png"]*n_per_batch)
    pickle_batch(d/"test_batch", data=imgs[n:].reshape(n_test, -1), labels=labels[n:])
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    pickle_batch(d/"batches.meta", label_names=names, num_vis=3072)
    return imgs, labels

def save_png(path, arr):
    "Lossless content under any extension (PIL reads by content, not by name)."
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG")

def write_tiny_imagenet(root, wnids=("n0300", "n0100", "n0200"), n_train=2, n_val=4, n_test=3, seed=0):
    """tiny-imagenet-200: wnids.txt, words.txt, train/<wnid>/images, val/images + val_annotations.txt, test/images.
    Returns the validation images and wnids in file order."""
    d = Path(root)/"tiny-imagenet-200"; d.mkdir(parents=True)
    (d/"wnids.txt").write_text("\n".join(wnids) + "\n")
    (d/"words.txt").write_text("n0100\tgoldfish, Carassius auratus\nn0200\tcat\nn0300\tdog\nn9999\tother\n")
    rng, val, ann = np.random.default_rng(seed), [], []
    for w in wnids:
        for k in range(n_train): save_png(d/"train"/w/"images"/f"{w}_{k}.JPEG", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        (d/"train"/w/f"{w}_boxes.txt").write_text(f"{w}_0.JPEG\t0\t0\t10\t10\n")
    for k in range(n_val):
        w = sorted(wnids)[(k + 1) % len(wnids)]
        a = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8); save_png(d/"val"/"images"/f"val_{k}.JPEG", a)
        val.append((a, w)); ann.append(f"val_{k}.JPEG\t{w}\t1\t2\t30\t40")
    (d/"val"/"val_annotations.txt").write_text("\n".join(ann) + "\n")
    for k in range(n_test): save_png(d/"test"/"images"/f"test_{k}.JPEG", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    return val

def write_image_folder(root, classes=("cat", "dog"), n_per_class=6, size=(40, 48), splits=("train", "test"), seed=0):
    "<root>/<split>/<class>/*.png of one size (the loader resizes to the run's image size)."
    rng = np.random.default_rng(seed)
    for split in splits:
        for c in classes:
            for k in range(n_per_class):
                save_png(Path(root)/split/c/f"{c}_{k}.png", rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    return Path(root)
