"""Clothing1M (Xiao et al. 2015) in its published layout.

ROOT/images/<a>/<bc>/<name>.jpg
ROOT/noisy_label_kv.txt  clean_label_kv.txt          "images/0/00/x.jpg 3" per line
ROOT/noisy_train_key_list.txt  clean_train_key_list.txt  clean_val_key_list.txt  clean_test_key_list.txt
ROOT/category_names_eng.txt (optional; the 14 class names)

Splits are the published ones: noisy_train (noisy labels; true labels where the image also has a clean
annotation), clean_train (the meta set), clean_val -> val, clean_test -> test. Keys are matched with or
without the `images/` prefix (MLC keeps it, EMLC strips it); images are looked up under ROOT/images/.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from metacorrect.datasets.contract import DataError
from metacorrect.datasets.sources.base import FileList, FileSourceData
from metacorrect.datasets.sources.listfiles import files_checksum, lines, parse_label, require_file

CLASSES = ["T-Shirt", "Shirt", "Knitwear", "Chiffon", "Sweater", "Hoodie", "Windbreaker", "Jacket", "Downcoat",
           "Suit", "Shawl", "Dress", "Vest", "Underwear"]
LISTS = {"noisy_train": "noisy_train_key_list.txt", "clean_train": "clean_train_key_list.txt",
         "val": "clean_val_key_list.txt", "test": "clean_test_key_list.txt"}
LABEL_FILES = ("noisy_label_kv.txt", "clean_label_kv.txt")


def key_of(text: str) -> str:
    """Canonical key: the path below images/, whatever prefix the list file uses."""
    key = text.strip().replace("\\", "/")
    while key.startswith("./"):
        key = key[2:]
    return key[len("images/"):] if key.startswith("images/") else key


def load_clothing1m_source(root: str, image_size: int = 256, quality: int = 90) -> FileSourceData:
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(f"clothing1m: {base} is not a directory (pass --option root=PATH to the Clothing1M folder)")
    files = [require_file(base / name, "Clothing1M label file") for name in LABEL_FILES]
    files += [require_file(base / name, "Clothing1M key list") for name in LISTS.values()]
    names = CLASSES
    if (base / "category_names_eng.txt").is_file():
        names = [n.strip() for n in (base / "category_names_eng.txt").read_text().splitlines() if n.strip()]
        if len(names) != len(CLASSES):
            raise DataError(f"{base / 'category_names_eng.txt'}: {len(names)} names, expected {len(CLASSES)}")
    _check_size(image_size, quality)

    def make_splits(clean_per_class: int, val_per_class: int, seed: int) -> dict[str, FileList]:
        noisy = _label_table(base / "noisy_label_kv.txt")
        clean = _label_table(base / "clean_label_kv.txt")
        out = {}
        for split, name in LISTS.items():
            path = base / name
            keys, labels, true = [], [], []
            table = noisy if split == "noisy_train" else clean
            table_name = "noisy_label_kv.txt" if split == "noisy_train" else "clean_label_kv.txt"
            for number, (text,) in lines(path, 1):
                key = key_of(text)
                if key not in table:
                    raise DataError(f"{path}:{number}: {text} has no label in {table_name}")
                keys.append(key)
                labels.append(table[key])
                true.append(clean.get(key, -1))
            out[split] = FileList([f"images/{k}" for k in keys], np.array(labels, np.int64), np.array(true, np.int64))
        return out

    return FileSourceData(
        name="clothing1m", class_names=names, root=base, make_splits=make_splits,
        protocol="published splits: noisy_train_key_list (noisy labels), clean_train/val/test_key_list "
                 "(clean labels); --clean-per-class and --val-per-class do not apply",
        noise_description="real noisy labels (Clothing1M noisy_label_kv.txt); true labels where clean_label_kv.txt has one",
        image_size=image_size, quality=quality, checksum=files_checksum(files, f"{image_size}-{quality}"))


def _label_table(path: Path) -> dict[str, int]:
    return {key_of(key): parse_label(path, number, label, len(CLASSES)) for number, (key, label) in lines(path, 2)}


def _check_size(image_size: int, quality: int) -> None:
    if not isinstance(image_size, int) or image_size < 8:
        raise DataError(f"image_size: must be an integer >= 8, got {image_size!r}")
    if not isinstance(quality, int) or not 1 <= quality <= 100:
        raise DataError(f"quality: must be an integer in [1, 100], got {quality!r}")
