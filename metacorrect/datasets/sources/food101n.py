"""Food-101N (Lee et al. 2018, CleanNet) in its published layout.

ROOT/meta/imagelist.tsv        header, then `class/file.jpg` (~310k; the label is the folder name)
ROOT/meta/verified_train.tsv   header, then `class/file.jpg<TAB>{0,1}` (1: the folder label is right)
ROOT/meta/verified_val.tsv     same format
ROOT/images/<class>/<file>.jpg

Classes are the sorted folder names of imagelist.tsv (the official code uses filesystem glob order,
which differs between machines). Split protocol used here (documented in docs/data.md):
  test        = verified_val entries with flag 1 (their label is verified correct);
  val, clean  = `val_per_class` and `clean_per_class` images per class drawn (seeded) from the verified_train
                entries with flag 1;
  noisy_train = every other imagelist entry, except verified_val entries (kept out of training entirely);
                true_label = the label for verified-correct entries, -1 otherwise (flag 0 says the label
                is wrong but not what the right one is).
MSLG instead tests on verified_val flag 1 and draws its meta set from verified_train ignoring the flag.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from metacorrect.datasets.contract import DataError
from metacorrect.datasets.sources.base import FileList, FileSourceData
from metacorrect.datasets.sources.clothing1m import _check_size
from metacorrect.datasets.sources.listfiles import files_checksum, lines, require_file
from metacorrect.datasets.splits import split_pool


def load_food101n_source(root: str, image_size: int = 256, quality: int = 90) -> FileSourceData:
    base = Path(root).expanduser()
    if (base / "Food-101N_release" / "meta").is_dir():
        base = base / "Food-101N_release"
    if not base.is_dir():
        raise DataError(f"food101n: {base} is not a directory (pass --option root=PATH to Food-101N_release)")
    imagelist, vtrain, vval = (require_file(base / "meta" / name, "Food-101N list")
                               for name in ("imagelist.tsv", "verified_train.tsv", "verified_val.tsv"))
    _check_size(image_size, quality)
    keys = [_key(imagelist, number, text) for number, (text,) in lines(imagelist, 1, skip_header=True)]
    classes = sorted({k.split("/", 1)[0] for k in keys})
    if len(classes) < 2:
        raise DataError(f"{imagelist}: {len(classes)} class folder(s), expected at least 2")
    index = {c: i for i, c in enumerate(classes)}

    def verified(path: Path) -> dict[str, int]:
        out = {}
        for number, (text, flag) in lines(path, 2, skip_header=True, sep="\t"):
            key = _key(path, number, text)
            if key.split("/", 1)[0] not in index:
                raise DataError(f"{path}:{number}: class folder of {text!r} is not in imagelist.tsv")
            if flag not in ("0", "1"):
                raise DataError(f"{path}:{number}: verification flag {flag!r}, expected 0 or 1")
            out[key] = int(flag)
        return out

    def make_splits(clean_per_class: int, val_per_class: int, seed: int) -> dict[str, FileList]:
        train_flags, val_flags = verified(vtrain), verified(vval)

        def file_list(chosen: list[str], true_known: bool | np.ndarray) -> FileList:
            labels = np.array([index[k.split("/", 1)[0]] for k in chosen], np.int64)
            true = np.where(true_known, labels, -1).astype(np.int64)
            return FileList([f"images/{k}" for k in chosen], labels, true)

        test = [k for k, flag in val_flags.items() if flag == 1]
        good = np.array(sorted(k for k, flag in train_flags.items() if flag == 1))
        good_labels = np.array([index[k.split("/", 1)[0]] for k in good], np.int64)
        drawn = split_pool(good_labels, len(classes), clean_per_class, val_per_class, None, seed)
        taken = set(good[drawn["val"]]) | set(good[drawn["clean_train"]]) | set(val_flags)
        noisy = [k for k in keys if k not in taken]
        verified_right = np.array([train_flags.get(k) == 1 for k in noisy], bool)
        return {"noisy_train": file_list(noisy, verified_right), "clean_train": file_list(list(good[drawn["clean_train"]]), True),
                "val": file_list(list(good[drawn["val"]]), True), "test": file_list(test, True)}

    return FileSourceData(
        name="food101n", class_names=classes, root=base, make_splits=make_splits,
        protocol="test = verified_val flag 1; val and clean drawn per class from verified_train flag 1; "
                 "noisy_train = the rest of imagelist.tsv without verified_val",
        noise_description="real noisy labels (Food-101N folder labels); true labels known for verified-correct images",
        image_size=image_size, quality=quality, true_labels_unbiased=False,
        checksum=files_checksum([imagelist, vtrain, vval], f"{image_size}-{quality}"))


def _key(path: Path, number: int, text: str) -> str:
    key = text.strip().replace("\\", "/")
    key = key[len("images/"):] if key.startswith("images/") else key
    if "/" not in key:
        raise DataError(f"{path}:{number}: {text!r} is not CLASS/FILE")
    return key
