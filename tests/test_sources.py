"""Real data set sources in their published layouts, written tiny by the tests: CIFAR-10/100 pickles,
CIFAR-10N's label file, Clothing1M and Food-101N folders of real JPEGs. Presets, malformed inputs,
skipped images, `--limit`, and a killed-then-resumed Ray prepare."""
from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metacorrect.cli import main
from metacorrect.datasets import codec
from metacorrect.datasets.contract import SPLITS, DataError, read_meta
from metacorrect.datasets.presets import mlc_flip_map, resolve_preset
from metacorrect.datasets.prepare import prepare
from metacorrect.datasets.shards import read_split_table
from procs import kill_when

ROOT = Path(__file__).resolve().parents[1]
CLOTHING_CLASSES = 14


# ---------------------------------------------------------------- writers of the published layouts
def _pickle(path: Path, obj: dict) -> None:
    with path.open("wb") as f:
        pickle.dump(obj, f)


def write_cifar10(root: Path, per_batch: int = 40, seed: int = 0) -> dict[str, np.ndarray]:
    """cifar-10-batches-py/ with data_batch_1..5, test_batch, batches.meta; returns the pixels and labels."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _pickle(folder / "batches.meta", {b"label_names": [n.encode() for n in names], b"num_vis": 3072})
    out = {"train_x": [], "train_y": []}
    for i in range(1, 7):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in np.arange(per_batch) % 10]
        name = f"data_batch_{i}" if i <= 5 else "test_batch"
        _pickle(folder / name, {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                                b"filenames": [b"x.png"] * per_batch})
        if i <= 5:
            out["train_x"].append(data)
            out["train_y"].append(labels)
        else:
            out["test_x"], out["test_y"] = data, np.array(labels)
    out["train_x"] = np.concatenate(out["train_x"])
    out["train_y"] = np.concatenate(out["train_y"])
    out["names"] = names
    return out


def write_cifar100(root: Path, per_class: int = 4) -> np.ndarray:
    """cifar-100-python/ with train, test, meta (fine and coarse labels); returns coarse_of_class."""
    rng = np.random.default_rng(1)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    coarse_of_class = rng.permutation(np.repeat(np.arange(20), 5))
    _pickle(folder / "meta", {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                              b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]})
    for name, n in (("train", per_class), ("test", 1)):
        fine = np.repeat(np.arange(100), n)
        _pickle(folder / name, {b"data": rng.integers(0, 256, (len(fine), 3072), dtype=np.uint8),
                                b"fine_labels": fine.tolist(), b"coarse_labels": coarse_of_class[fine].tolist()})
    return coarse_of_class


def jpeg(rng: np.random.Generator, w: int, h: int, value: int | None = None) -> bytes:
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8) if value is None else np.full((h, w, 3), value, np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_clothing1m(root: Path, per_class: int = 3, lists_without_prefix: bool = False) -> dict[str, list]:
    """ROOT/images/<a>/<bc>/<name>.jpg, the two kv label files and the four key lists. Split sizes per class:
    noisy_train per_class, clean_train/val/test 1 each; two noisy images also have a clean label."""
    rng = np.random.default_rng(2)
    keys: dict[str, list] = {s: [] for s in ("noisy_train", "clean_train", "clean_val", "clean_test")}
    noisy_kv, clean_kv = [], []
    n = 0
    for c in range(CLOTHING_CLASSES):
        for split, count in (("noisy_train", per_class), ("clean_train", 1), ("clean_val", 1), ("clean_test", 1)):
            for _ in range(count):
                key = f"images/{n % 10}/{n % 100:02d}/{n}.jpg"
                path = root / key
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(jpeg(rng, 20 + n % 7, 14 + n % 5, value=(c * 17) % 256))
                if split == "noisy_train":
                    noisy_kv.append(f"{key} {(c + 1) % CLOTHING_CLASSES if n % 3 == 0 else c}")
                    if n < 2 * (per_class + 3):  # a couple of noisy images with a clean annotation
                        clean_kv.append(f"{key} {c}")
                else:
                    clean_kv.append(f"{key} {c}")
                keys[split].append(key)
                n += 1
    (root / "noisy_label_kv.txt").write_text("\n".join(noisy_kv) + "\n")
    (root / "clean_label_kv.txt").write_text("\n".join(clean_kv) + "\n")
    for split, items in keys.items():
        lines = [k[len("images/"):] if lists_without_prefix else k for k in items]
        (root / f"{split}_key_list.txt").write_text("\n".join(lines) + "\n")
    return keys


def write_food101n(root: Path, classes=("ramen", "apple_pie", "sushi"), per_class: int = 8) -> Path:
    """Food-101N_release/ with meta/imagelist.tsv, verified_train.tsv, verified_val.tsv and images/<class>/."""
    rng = np.random.default_rng(3)
    base = root / "Food-101N_release"
    (base / "meta").mkdir(parents=True)
    imagelist, vtrain, vval = ["class_name/key"], ["class_name/key\tverification_label"], \
        ["class_name/key\tverification_label"]
    for c in classes:
        (base / "images" / c).mkdir(parents=True)
        for i in range(per_class):
            key = f"{c}/{i:04d}.jpg"
            (base / "images" / key).write_bytes(jpeg(rng, 24, 18))
            imagelist.append(key)
            if i < 4:
                vtrain.append(f"{key}\t{0 if i == 3 else 1}")  # 3 verified right, 1 verified wrong
            elif i < 6:
                vval.append(f"{key}\t{1 if i == 4 else 0}")
    (base / "meta" / "imagelist.tsv").write_text("\n".join(imagelist) + "\n")
    (base / "meta" / "verified_train.tsv").write_text("\n".join(vtrain) + "\n")
    (base / "meta" / "verified_val.tsv").write_text("\n".join(vval) + "\n")
    return base


def rows(directory: Path, split: str) -> dict[str, np.ndarray]:
    meta = read_meta(directory)
    table = read_split_table(directory, split)
    return {"id": table["id"].to_numpy(), "label": table["label"].to_numpy().astype(np.int64),
            "true_label": table["true_label"].to_numpy().astype(np.int64),
            "images": codec.decode_images(table["image"].to_pylist(), meta.encoding, tuple(meta.image_shape))}


# ---------------------------------------------------------------- CIFAR
def test_cifar10_pickles_prepare(tmp_path: Path) -> None:
    raw = write_cifar10(tmp_path / "src")
    out = tmp_path / "c10"
    meta = prepare("cifar10", out, noise="symmetric:0.5", clean_per_class=2, val_per_class=3,
                   options={"root": str(tmp_path / "src")}, progress=False)
    assert meta.class_names == raw["names"] and meta.image_shape == [32, 32, 3] and meta.encoding == "raw"
    assert meta.counts == {"noisy_train": 200 - 50, "clean_train": 20, "val": 30, "test": 40}
    # Every stored image is one of the pickled images, channel-major rows turned into HWC, with its label.
    train_images = raw["train_x"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    index = {img.tobytes(): i for i, img in enumerate(train_images)}
    seen = []
    for split in ("noisy_train", "clean_train", "val"):
        r = rows(out, split)
        np.testing.assert_array_equal(r["id"], np.arange(len(r["id"])))
        src_idx = np.array([index[img.tobytes()] for img in r["images"]])
        np.testing.assert_array_equal(r["true_label"], raw["train_y"][src_idx])
        if split != "noisy_train":
            np.testing.assert_array_equal(r["label"], r["true_label"])
        seen.extend(src_idx)
    assert sorted(seen) == list(range(200))  # disjoint splits covering the pool
    test = rows(out, "test")
    np.testing.assert_array_equal(test["images"], raw["test_x"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(test["label"], raw["test_y"])
    noisy = rows(out, "noisy_train")
    assert 0.3 < np.mean(noisy["label"] != noisy["true_label"]) < 0.7


def test_cifar100_coarse_labels_drive_pair_noise(tmp_path: Path) -> None:
    coarse = write_cifar100(tmp_path / "src")
    out = tmp_path / "c100"
    meta = prepare("cifar100", out, noise="pair:1.0:cifar100", clean_per_class=1, val_per_class=1,
                   options={"root": str(tmp_path / "src" / "cifar-100-python")}, progress=False)
    assert meta.num_classes == 100 and meta.class_names[7] == "fine7"
    assert meta.counts == {"noisy_train": 200, "clean_train": 100, "val": 100, "test": 100}
    r = rows(out, "noisy_train")
    assert (r["label"] != r["true_label"]).all()
    np.testing.assert_array_equal(coarse[r["label"]], coarse[r["true_label"]])  # next class in the superclass


def test_cifar10n_human_labels(tmp_path: Path) -> None:
    import torch

    raw = write_cifar10(tmp_path / "src")
    rng = np.random.default_rng(4)
    clean = raw["train_y"].astype(np.int64)
    worse = np.where(rng.random(len(clean)) < 0.4, (clean + 3) % 10, clean)
    table = {"clean_label": clean, "worse_label": worse, "aggre_label": clean.copy(),
             "random_label1": clean.copy(), "random_label2": clean.copy(), "random_label3": clean.copy()}
    torch.save(table, tmp_path / "CIFAR-10_human.pt")
    out = tmp_path / "c10n"
    meta = prepare("cifar10n", out, clean_per_class=2, val_per_class=2, progress=False,
                   options={"root": str(tmp_path / "src"), "labels": str(tmp_path / "CIFAR-10_human.pt"),
                            "label_set": "worst"})
    r = rows(out, "noisy_train")
    index = {img.tobytes(): i for i, img in enumerate(raw["train_x"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))}
    src_idx = np.array([index[img.tobytes()] for img in r["images"]])
    np.testing.assert_array_equal(r["label"], worse[src_idx])  # the human label of that very image
    np.testing.assert_array_equal(r["true_label"], clean[src_idx])
    assert meta.actual_noise_rate == pytest.approx(np.mean(worse[src_idx] != clean[src_idx]), abs=1e-6)
    assert meta.noise == "none" and "real noisy labels" in meta.noise_description
    with pytest.raises(DataError, match="real noisy labels"):
        prepare("cifar10n", tmp_path / "x", noise="symmetric:0.2", progress=False,
                options={"root": str(tmp_path / "src"), "labels": str(tmp_path / "CIFAR-10_human.pt")})
    # A label file for other images (clean labels not aligned) is refused, naming the file.
    torch.save({**table, "clean_label": np.roll(clean, 1)}, tmp_path / "other.pt")
    with pytest.raises(DataError, match=r"other\.pt: clean_label differs"):
        prepare("cifar10n", tmp_path / "x", progress=False,
                options={"root": str(tmp_path / "src"), "labels": str(tmp_path / "other.pt")})
    assert not (tmp_path / "x").exists()


def test_cifar_malformed_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_cifar10(tmp_path / "src")
    folder = tmp_path / "src" / "cifar-10-batches-py"
    opts = {"root": str(tmp_path / "src")}
    out = tmp_path / "out"
    good = (folder / "data_batch_3").read_bytes()
    (folder / "data_batch_3").write_bytes(good[: len(good) // 2])  # truncated pickle
    with pytest.raises(DataError, match=r"data_batch_3: not a CIFAR python pickle"):
        prepare("cifar10", out, options=opts, clean_per_class=1, val_per_class=1, progress=False)
    _pickle(folder / "data_batch_3", {b"labels": [0], b"something": 1})  # a pickle, but not a batch
    with pytest.raises(DataError, match=r"data_batch_3: no data entry"):
        prepare("cifar10", out, options=opts, clean_per_class=1, val_per_class=1, progress=False)
    batch = pickle.loads(good, encoding="bytes")
    batch[b"labels"][5] = 10
    _pickle(folder / "data_batch_3", batch)
    with pytest.raises(DataError, match=r"data_batch_3: labels\[5\] = 10, outside \[0, 10\)"):
        prepare("cifar10", out, options=opts, clean_per_class=1, val_per_class=1, progress=False)
    (folder / "data_batch_3").unlink()
    assert main(["data", "prepare", "cifar10", "--option", f"root={tmp_path / 'src'}", "--out", str(out),
                 "--quiet"]) == 2
    assert capsys.readouterr().err == f"error: {folder / 'data_batch_3'}: missing\n"
    with pytest.raises(DataError, match=r"needs --option root="):
        prepare("cifar10", out, progress=False)
    assert not out.exists()


# ---------------------------------------------------------------- presets
def test_presets_reproduce_paper_protocols(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert resolve_preset("mlc-uniform:0.4", "cifar10").__dict__ == \
        {"noise": "symmetric:0.4:uniform", "clean_per_class": 100, "val_per_class": 100}
    assert resolve_preset("emlc-sym:80%", "cifar100").clean_per_class == 10
    assert resolve_preset("emlc-asym", "cifar10").noise == "pair:0.4:cifar10"
    assert resolve_preset("emlc-asym", "cifar100").noise == "pair:0.4:cifar100"
    assert resolve_preset("ieg-1:0.8", "cifar100").clean_per_class == 1
    assert resolve_preset("ieg-10:0.8", "cifar10").clean_per_class == 10
    assert resolve_preset("mwnet-a:0.6", "cifar10").noise == "symmetric:0.6:uniform"
    # MLC's flip map: np.random.seed(1), one random other class per row.
    flip = dict(tuple(map(int, p.split(">"))) for p in mlc_flip_map(10).split(";"))
    assert all(flip[i] != i for i in range(10)) and len(flip) == 10
    assert resolve_preset("mlc-flip:0.4", "cifar10").noise == f"pair:0.4:map={mlc_flip_map(10)}"
    for bad, message in (("nope:0.4", "unknown"), ("mlc-uniform", "give the noise rate"),
                         ("mlc-uniform:1.5", "outside"), ("mlc-uniform:x", "not a number")):
        with pytest.raises(DataError, match=message):
            resolve_preset(bad, "cifar10")
    with pytest.raises(DataError, match="not source 'digits'"):
        resolve_preset("mlc-uniform:0.4", "digits")

    write_cifar10(tmp_path / "src", per_batch=210)  # 105 per class: IEG keeps 100 val per class
    out = tmp_path / "ieg"
    assert main(["data", "prepare", "cifar10", "--preset", "ieg-1:0.5", "--option", f"root={tmp_path / 'src'}",
                 "--out", str(out), "--quiet"]) == 0
    meta = read_meta(out)
    assert meta.counts["clean_train"] == 10 and meta.counts["val"] == 1000
    assert meta.noise == "symmetric:0.5:uniform"
    assert main(["data", "prepare", "cifar10", "--preset", "ieg-1:0.5", "--noise", "none", "--option",
                 f"root={tmp_path / 'src'}", "--out", str(tmp_path / "y"), "--quiet"]) == 2
    assert "sets --noise; give one or the other" in capsys.readouterr().err


def test_limit_takes_a_subset(tmp_path: Path) -> None:
    write_cifar10(tmp_path / "src")
    meta = prepare("cifar10", tmp_path / "c10", clean_per_class=1, val_per_class=1, limit=50,
                   options={"root": str(tmp_path / "src")}, progress=False)
    assert meta.counts == {"noisy_train": 30, "clean_train": 10, "val": 10, "test": 40}
    assert meta.prepare_args["limit"] == 50
    with pytest.raises(DataError, match="limit: must be >= 1"):
        prepare("cifar10", tmp_path / "c", limit=0, options={"root": str(tmp_path / "src")}, progress=False)


# ---------------------------------------------------------------- image folders on Ray
def test_clothing1m_layout_with_missing_and_corrupt_images(tmp_path: Path, ray_cluster) -> None:
    keys = write_clothing1m(tmp_path / "c1m", lists_without_prefix=True)
    # One listed image missing on disk, one truncated JPEG: both skipped, counted and listed.
    missing, truncated = keys["noisy_train"][4], keys["clean_val"][2]
    (tmp_path / "c1m" / missing).unlink()
    data = (tmp_path / "c1m" / truncated).read_bytes()
    (tmp_path / "c1m" / truncated).write_bytes(data[: len(data) // 2])
    out = tmp_path / "prepared"
    meta = prepare("clothing1m", out, options={"root": str(tmp_path / "c1m"), "image_size": 16},
                   shard_bytes=1, progress=False)
    assert meta.num_classes == 14 and meta.class_names[0] == "T-Shirt" and meta.image_shape == [16, 16, 3]
    assert meta.encoding == "jpeg" and meta.noise == "none"
    assert meta.counts == {"noisy_train": 3 * 14 - 1, "clean_train": 14, "val": 13, "test": 14}
    assert meta.skipped == {"missing": 1, "corrupt": 1}
    listed = (out / "skipped.tsv").read_text()
    assert f"noisy_train\t{missing}\tmissing" in listed and f"val\t{truncated}\tcorrupt" in listed
    for split in SPLITS:
        r = rows(out, split)
        np.testing.assert_array_equal(r["id"], np.arange(meta.counts[split]))  # dense despite the skips
        if split != "noisy_train":
            np.testing.assert_array_equal(r["label"], r["true_label"])
    # Images are flat grey per class (value 17*c): decoded pixels identify the class of every row.
    test = rows(out, "test")
    np.testing.assert_allclose(test["images"].reshape(14, -1).mean(1), (np.arange(14) * 17) % 256, atol=3)
    # Noisy images 0,1,2 (class 0) and 6,7,8 (class 1) have clean labels; 7 is the missing one; 0 and 6 flipped.
    noisy = rows(out, "noisy_train")
    assert (noisy["true_label"] >= 0).sum() == 5 and meta.actual_noise_rate == pytest.approx(0.4)
    np.testing.assert_allclose(np.array(meta.empirical_transition)[0], np.eye(14)[0] * 2 / 3 + np.eye(14)[1] / 3,
                               atol=1e-6)


def test_clothing1m_bad_lists_name_file_and_line(tmp_path: Path, ray_cluster) -> None:
    write_clothing1m(tmp_path / "c1m", per_class=1)
    kv = tmp_path / "c1m" / "noisy_label_kv.txt"
    good = kv.read_text()
    lines = good.splitlines()
    line = 2
    lines[line - 1] = lines[line - 1].rsplit(" ", 1)[0] + " 14"
    kv.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"noisy_label_kv.txt:{line}: label 14 outside \[0, 14\)"):
        prepare("clothing1m", tmp_path / "out", options={"root": str(tmp_path / "c1m")}, progress=False)
    kv.write_text("\n".join(good.splitlines()[1:]) + "\n")  # first noisy image loses its label
    with pytest.raises(DataError, match=r"noisy_train_key_list.txt:1: .* has no label in noisy_label_kv.txt"):
        prepare("clothing1m", tmp_path / "out", options={"root": str(tmp_path / "c1m")}, progress=False)
    (tmp_path / "c1m" / "clean_test_key_list.txt").unlink()
    with pytest.raises(DataError, match=r"clean_test_key_list.txt: missing"):
        prepare("clothing1m", tmp_path / "out", options={"root": str(tmp_path / "c1m")}, progress=False)
    assert not (tmp_path / "out").exists()


def test_food101n_layout_and_split_protocol(tmp_path: Path, ray_cluster) -> None:
    write_food101n(tmp_path)
    out = tmp_path / "food"
    meta = prepare("food101n", out, clean_per_class=1, val_per_class=1, seed=0,
                   options={"root": str(tmp_path), "image_size": 16}, progress=False)
    assert meta.class_names == ["apple_pie", "ramen", "sushi"]  # sorted, not file order
    # test = verified_val flag 1 (1 per class); val/clean from verified_train flag 1 (3 per class);
    # noisy = the other 8 - 2 (verified_val) - 2 (val + clean) = 4 per class.
    assert meta.counts == {"noisy_train": 12, "clean_train": 3, "val": 3, "test": 3}
    assert meta.actual_noise_rate is None  # true labels are known only where verified right
    noisy = rows(out, "noisy_train")
    assert sorted(noisy["true_label"][noisy["true_label"] >= 0].tolist()) == [0, 1, 2]  # 1 verified-right left
    for split in ("clean_train", "val", "test"):
        r = rows(out, split)
        np.testing.assert_array_equal(np.sort(r["label"]), [0, 1, 2])
        np.testing.assert_array_equal(r["label"], r["true_label"])
    assert meta.prepare_args["protocol"].startswith("test = verified_val flag 1")
    bad = tmp_path / "Food-101N_release" / "meta" / "verified_val.tsv"
    bad.write_text(bad.read_text().replace("\t0", "\t2", 1))
    with pytest.raises(DataError, match=r"verified_val.tsv:\d+: verification flag '2'"):
        prepare("food101n", tmp_path / "x", options={"root": str(tmp_path)}, progress=False)


def test_killed_ray_prepare_resumes_to_the_same_shards(tmp_path: Path, ray_cluster) -> None:
    write_clothing1m(tmp_path / "c1m", per_class=40)
    reference = prepare("clothing1m", tmp_path / "reference", options={"root": str(tmp_path / "c1m"),
                                                                       "image_size": 16},
                        shard_bytes=1, progress=False, limit=400)
    out = tmp_path / "resumed"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    # Killing needs shard files on disk and a prepare not yet done: tiny shards, one task at a time.
    script = ("import sys; from metacorrect.datasets.prepare import prepare; "
              f"prepare('clothing1m', {str(out)!r}, options={{'root': {str(tmp_path / 'c1m')!r}, 'image_size': 16}}, "
              "shard_bytes=1, progress=False, limit=400, workers=1)")
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE)
    work = tmp_path / ".work-resumed"
    killed = kill_when(proc, lambda: len(list(work.glob("*/part-*.parquet"))) >= 3, timeout=60)
    assert killed, f"prepare ended before it could be killed: {proc.stderr.read()[-2000:]}"
    done = len(list(work.glob("*/part-*.parquet")))
    total = sum(1 for _ in range(0, 400, 16)) + 3  # noisy_train shards + one shard per clean split
    assert 3 <= done < total and not out.exists()
    with pytest.raises(DataError):
        read_meta(out)
    meta = prepare("clothing1m", out, options={"root": str(tmp_path / "c1m"), "image_size": 16},
                   shard_bytes=1, progress=False, limit=400)
    assert meta.counts == reference.counts and not work.exists()
    for split in SPLITS:
        assert read_split_table(out, split).equals(read_split_table(tmp_path / "reference", split)), split
    assert main(["data", "inspect", str(out)]) == 0
