"""Tests for the data contract, splits, sources, prepare, inspect and the `data` CLI (no Ray)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.datasets import load_digits

from metacorrect.cli import main
from metacorrect.datasets import codec
from metacorrect.datasets.contract import SCHEMA, SPLITS, DataError, read_meta, split_files
from metacorrect.datasets.inspect import inspect_dataset
from metacorrect.datasets.prepare import prepare
from metacorrect.datasets.shards import ShardWriter, atomic_directory, read_split_table
from metacorrect.datasets.splits import split_pool
from procs import kill_when

ROOT = Path(__file__).resolve().parents[1]
N_DIGITS = 1797
TINY_SYNTHETIC = {"n": 6000, "num_classes": 4, "image_size": 4, "channels": 1}  # cheap rows, several chunks


# ---------------------------------------------------------------- helpers / fixtures
def digits_source() -> tuple[np.ndarray, np.ndarray]:
    """The sklearn digits as the package should store them: 0..16 stretched to 0..255, (N, 8, 8, 1) uint8."""
    bunch = load_digits()
    pixels = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[..., None]
    return pixels, bunch.target.astype(np.int64)


def split_arrays(directory: Path, split: str) -> dict[str, np.ndarray]:
    meta = read_meta(directory)
    table = read_split_table(directory, split)
    return {
        "id": table["id"].to_numpy(),
        "images": codec.decode_images(table["image"].to_pylist(), meta.encoding, tuple(meta.image_shape)),
        "label": table["label"].to_numpy().astype(np.int64),
        "true_label": table["true_label"].to_numpy().astype(np.int64),
    }


def all_tables(directory: Path) -> dict[str, pa.Table]:
    return {s: read_split_table(directory, s) for s in SPLITS}


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "digits-sym60"
    prepare("digits", out, noise="symmetric:0.6", clean_per_class=10, seed=0, progress=False)
    return out


# ---------------------------------------------------------------- prepare digits: the contract
def test_digits_meta_counts_and_schema(digits_dir: Path) -> None:
    meta = read_meta(digits_dir)
    assert meta.source == "digits" and meta.num_classes == 10 and meta.class_names == [str(d) for d in range(10)]
    assert meta.image_shape == [8, 8, 1] and meta.encoding == "raw"
    assert set(meta.counts) == set(SPLITS)
    assert sum(meta.counts.values()) == N_DIGITS
    assert meta.counts["clean_train"] == 100 and meta.counts["val"] == 200
    assert meta.noise == "symmetric:0.6" and meta.seed == 0
    assert len(meta.pixel_mean) == 1 and 0 < meta.pixel_mean[0] < 1 and 0 < meta.pixel_std[0] < 1
    t = np.array(meta.transition)
    np.testing.assert_allclose(t.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.diag(t), 0.4, atol=1e-6)
    for split in SPLITS:
        files = split_files(digits_dir, split)
        assert files, split
        for f in files:
            assert pq.read_schema(f).remove_metadata() == SCHEMA, (split, f)
        table = read_split_table(digits_dir, split)
        assert table.schema.remove_metadata() == SCHEMA
        assert table.num_rows == meta.counts[split]
        np.testing.assert_array_equal(table["id"].to_numpy(), np.arange(table.num_rows))


def test_digits_noise_rate_matches_shards(digits_dir: Path) -> None:
    meta = read_meta(digits_dir)
    noisy = split_arrays(digits_dir, "noisy_train")
    measured = float(np.mean(noisy["label"] != noisy["true_label"]))
    assert abs(meta.actual_noise_rate - 0.6) <= 0.05
    assert meta.actual_noise_rate == pytest.approx(measured, abs=1e-6)
    # symmetric *flip* noise never keeps the class of a corrupted label, and labels stay in range
    assert noisy["label"].min() >= 0 and noisy["label"].max() < 10
    emp = np.array(meta.empirical_transition)
    np.testing.assert_allclose(1 - np.mean(np.diag(emp)), measured, atol=0.05)
    for split in ("clean_train", "val", "test"):
        arr = split_arrays(digits_dir, split)
        np.testing.assert_array_equal(arr["label"], arr["true_label"], err_msg=split)
    clean = split_arrays(digits_dir, "clean_train")
    np.testing.assert_array_equal(np.bincount(clean["label"], minlength=10), np.full(10, 10))
    val = split_arrays(digits_dir, "val")
    np.testing.assert_array_equal(np.bincount(val["label"], minlength=10), np.full(10, 20))


def test_digits_images_are_the_sklearn_pixels(digits_dir: Path) -> None:
    pixels, targets = digits_source()
    source_index: dict[bytes, set[int]] = {}
    for img, y in zip(pixels, targets):
        source_index.setdefault(img.tobytes(), set()).add(int(y))
    for split in SPLITS:
        arr = split_arrays(digits_dir, split)
        assert arr["images"].dtype == np.uint8 and arr["images"].shape[1:] == (8, 8, 1)
        for i in np.linspace(0, len(arr["id"]) - 1, 15).astype(int):
            key = arr["images"][i].tobytes()
            assert key in source_index, (split, i)
            assert int(arr["true_label"][i]) in source_index[key], (split, i)
        assert arr["images"].max() == 255  # stretched, not the raw 0..16 values


def test_splits_partition_the_source_pool(digits_dir: Path) -> None:
    """Multiset of (image, true label) over all splits == that of the 1797 source images.

    Counting (not set membership) keeps sklearn's few duplicate images from hiding a row used twice.
    """
    pixels, targets = digits_source()
    source = Counter((img.tobytes(), int(y)) for img, y in zip(pixels, targets))
    per_split = {}
    for split in SPLITS:
        arr = split_arrays(digits_dir, split)
        per_split[split] = Counter((img.tobytes(), int(y)) for img, y in zip(arr["images"], arr["true_label"]))
    union = sum(per_split.values(), Counter())
    assert union == source
    # Pairwise: an item never appears in two splits more often than the source holds it.
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                for key in per_split[a].keys() & per_split[b].keys():
                    assert per_split[a][key] + per_split[b][key] <= source[key], (a, b)


def test_split_pool_direct() -> None:
    _, labels = digits_source()
    idx = split_pool(labels, 10, clean_per_class=10, val_per_class=20, test_fraction=0.2, seed=3)
    assert set(idx) == {"test", "val", "clean_train", "noisy_train"}
    everything = np.concatenate(list(idx.values()))
    assert len(everything) == len(labels) and len(np.unique(everything)) == len(labels)  # disjoint, complete
    for name, part in idx.items():
        assert np.all(np.diff(part) > 0), name  # sorted, no repeats
    counts_per_class = np.bincount(labels, minlength=10)
    np.testing.assert_array_equal(np.bincount(labels[idx["clean_train"]], minlength=10), np.full(10, 10))
    np.testing.assert_array_equal(np.bincount(labels[idx["val"]], minlength=10), np.full(10, 20))
    expected_test = np.array([int(round(0.2 * n)) for n in counts_per_class])
    np.testing.assert_array_equal(np.bincount(labels[idx["test"]], minlength=10), expected_test)
    np.testing.assert_array_equal(np.bincount(labels[idx["noisy_train"]], minlength=10),
                                  counts_per_class - expected_test - 30)
    # Seeded: same seed same split, different seed different split.
    again = split_pool(labels, 10, 10, 20, 0.2, seed=3)
    assert all(np.array_equal(idx[k], again[k]) for k in idx)
    other = split_pool(labels, 10, 10, 20, 0.2, seed=4)
    assert not np.array_equal(idx["clean_train"], other["clean_train"])
    # No test split requested (source has its own).
    no_test = split_pool(labels, 10, 10, 20, None, seed=3)
    assert set(no_test) == {"val", "clean_train", "noisy_train"}
    assert sum(len(v) for v in no_test.values()) == len(labels)
    with pytest.raises(DataError, match="class 0 has"):
        split_pool(labels, 10, clean_per_class=200, val_per_class=0, test_fraction=None, seed=0)


def test_same_seed_identical_different_seed_differs(tmp_path: Path, digits_dir: Path) -> None:
    again = tmp_path / "again"
    meta = prepare("digits", again, noise="symmetric:0.6", clean_per_class=10, seed=0, progress=False)
    first, second = all_tables(digits_dir), all_tables(again)
    for split in SPLITS:
        assert first[split].equals(second[split]), split
    assert meta.actual_noise_rate == read_meta(digits_dir).actual_noise_rate
    assert meta.pixel_mean == read_meta(digits_dir).pixel_mean

    other = tmp_path / "seed1"
    prepare("digits", other, noise="symmetric:0.6", clean_per_class=10, seed=1, progress=False)
    third = all_tables(other)
    assert not third["noisy_train"].equals(first["noisy_train"])
    # The noisy labels themselves differ, not just the row order: compare label per (image, true label).
    def labels_by_image(t: pa.Table) -> Counter:
        return Counter(zip(t["image"].to_pylist(), t["label"].to_pylist()))
    assert labels_by_image(third["noisy_train"]) != labels_by_image(first["noisy_train"])


# ---------------------------------------------------------------- shards and atomic directories
def test_shard_writer_rolls_and_round_trips(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 400, size=300)
    images = [rng.integers(0, 256, size=int(n), dtype=np.uint8).tobytes() for n in lengths]
    labels = rng.integers(0, 10, size=300)
    true_labels = rng.integers(-1, 10, size=300)
    split_dir = tmp_path / "ds" / "noisy_train"
    with ShardWriter(split_dir, max_bytes=4000) as writer:
        for lo in range(0, 300, 25):
            sl = slice(lo, lo + 25)
            writer.write(np.arange(lo, min(lo + 25, 300)), images[sl], labels[sl], true_labels[sl])
        writer.write(np.arange(0), [], np.arange(0), np.arange(0))  # empty writes are no-ops
    assert writer.rows == 300
    files = split_files(tmp_path / "ds", "noisy_train")
    assert len(files) >= 3 and files == [str(p) for p in writer.files]
    assert [Path(f).name for f in files] == [f"part-{i:05d}.parquet" for i in range(len(files))]
    for f in files:
        assert pq.read_schema(f).remove_metadata() == SCHEMA
    table = read_split_table(tmp_path / "ds", "noisy_train")
    np.testing.assert_array_equal(table["id"].to_numpy(), np.arange(300))
    assert table["image"].to_pylist() == images
    np.testing.assert_array_equal(table["label"].to_numpy(), labels)
    np.testing.assert_array_equal(table["true_label"].to_numpy(), true_labels)
    assert table["label"].type == pa.int16() and table["true_label"].type == pa.int16()
    only = read_split_table(tmp_path / "ds", "noisy_train", columns=["label"])
    assert only.column_names == ["label"]
    # A split without shards reads as an empty table of the contract's schema.
    assert read_split_table(tmp_path / "ds", "val").schema == SCHEMA
    assert read_split_table(tmp_path / "ds", "val").num_rows == 0


def test_atomic_directory(tmp_path: Path) -> None:
    final = tmp_path / "data"

    class Boom(RuntimeError):
        pass

    with pytest.raises(Boom):
        with atomic_directory(final) as tmp:
            (tmp / "half.parquet").write_bytes(b"x")
            assert tmp.exists() and tmp != final
            raise Boom()
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []  # no .tmp-* left behind

    with atomic_directory(final) as tmp:
        (tmp / "meta.json").write_text("{}")
        assert not final.exists()  # appears only when the block completes
    assert (final / "meta.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["data"]

    with pytest.raises(DataError, match="already exists"):
        with atomic_directory(final):
            pass
    assert (final / "meta.json").read_text() == "{}"  # untouched

    with atomic_directory(final, overwrite=True) as tmp:
        (tmp / "new").write_text("n")
    assert sorted(p.name for p in final.iterdir()) == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["data"]

    # A failure while overwriting keeps the old contents.
    with pytest.raises(Boom):
        with atomic_directory(final, overwrite=True):
            raise Boom()
    assert sorted(p.name for p in final.iterdir()) == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_failed_prepare_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "syn"
    with pytest.raises(DataError, match="n=5, num_classes=10"):
        prepare("synthetic", out, options={"n": 5, "num_classes": 10}, progress=False)
    with pytest.raises(DataError, match="bad option"):
        prepare("synthetic", out, options={"no_such_option": 1}, progress=False)
    with pytest.raises(DataError, match="unknown source 'nope'"):
        prepare("nope", out, progress=False)
    with pytest.raises(DataError, match="fewer than"):
        prepare("digits", out, clean_per_class=500, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_read_meta_requires_meta_json(tmp_path: Path, digits_dir: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        read_meta(tmp_path / "absent")
    half = tmp_path / "half"
    (half / "noisy_train").mkdir(parents=True)
    with pytest.raises(DataError, match="meta.json") as info:
        read_meta(half)
    assert str(half) in str(info.value)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="not a metacorrect meta.json"):
        read_meta(broken)


def test_killed_prepare_leaves_no_dataset(tmp_path: Path) -> None:
    exe = ROOT / ".venv" / "bin" / "metacorrect"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "metacorrect"]
    out = tmp_path / "big"
    # Large enough that writing shards takes seconds; small enough to reach the write phase quickly.
    proc = subprocess.Popen(cmd + ["data", "prepare", "synthetic", "--out", str(out), "--option", "n=12000",
                                   "--option", "image_size=32", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if not kill_when(proc, lambda: bool(list(tmp_path.glob(".tmp-big-*/*/part-*.parquet"))), timeout=25):
        assert proc.returncode == 0, f"prepare failed or never started writing shards: {proc.stderr.read()}"
        assert read_meta(out).counts["noisy_train"] > 0  # finished (very fast machine): then it is complete
        return
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    with pytest.raises(DataError):
        read_meta(out)
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert all(name.startswith(".tmp-big-") for name in leftovers), leftovers
    # The stale temp directory does not block a new prepare at the same path.
    meta = prepare("synthetic", out, options={"n": 200, "num_classes": 4, "image_size": 8},
                   clean_per_class=5, val_per_class=5, progress=False)
    assert read_meta(out).counts == meta.counts


# ---------------------------------------------------------------- sources and noise
def test_synthetic_source_is_reproducible_and_learnable(tmp_path: Path) -> None:
    opts = {"n": 2000, "num_classes": 5, "image_size": 16}
    a, b = tmp_path / "a", tmp_path / "b"
    meta = prepare("synthetic", a, options=opts, progress=False)
    prepare("synthetic", b, options=dict(opts), progress=False)
    assert meta.num_classes == 5 and meta.image_shape == [16, 16, 3] and meta.encoding == "raw"
    assert sum(meta.counts.values()) == 2000
    assert meta.prepare_args["options"] == opts
    for split in SPLITS:
        assert read_split_table(a, split).equals(read_split_table(b, split)), split

    train = split_arrays(a, "noisy_train")
    test = split_arrays(a, "test")
    x = train["images"].reshape(len(train["id"]), -1).astype(np.float64)
    y = train["true_label"]
    assert sorted(np.unique(y)) == list(range(5))
    # Mean pixel distance: within a class smaller than between classes.
    rng = np.random.default_rng(0)
    pick = rng.choice(len(y), size=400, replace=False)
    xs, ys = x[pick], y[pick]
    sq = (xs ** 2).sum(axis=1)
    d = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * xs @ xs.T, 0) / xs.shape[1])  # RMS pixel distance
    same = ys[:, None] == ys[None, :]
    off_diag = ~np.eye(len(ys), dtype=bool)
    within, between = d[same & off_diag].mean(), d[~same].mean()
    assert within < 0.97 * between, (within, between)  # pixel noise (std 40) dominates, prototypes differ
    # Learnable: a nearest-centroid classifier fitted on training images labels the test split well.
    centroids = np.stack([x[y == c].mean(axis=0) for c in range(5)])
    xt = test["images"].reshape(len(test["id"]), -1).astype(np.float64)
    pred = np.argmin(((xt[:, None, :] - centroids[None]) ** 2).sum(axis=2), axis=1)
    assert np.mean(pred == test["true_label"]) > 0.9

    # A different source seed gives different images.
    c = tmp_path / "c"
    prepare("synthetic", c, options=opts | {"seed": 1}, progress=False)
    assert not read_split_table(c, "test").equals(read_split_table(a, "test"))


def test_pair_exact_noise_on_digits(tmp_path: Path) -> None:
    meta = prepare("digits", tmp_path / "pair", noise="pair:0.4:exact", seed=0, progress=False)
    noisy = split_arrays(tmp_path / "pair", "noisy_train")
    n = len(noisy["id"])
    flipped = noisy["label"] != noisy["true_label"]
    assert flipped.sum() == round(0.4 * n)
    np.testing.assert_array_equal(noisy["label"][flipped], (noisy["true_label"][flipped] + 1) % 10)
    assert meta.actual_noise_rate == pytest.approx(round(0.4 * n) / n, abs=1e-6)
    assert meta.noise == "pair:0.4:exact"
    t = np.array(meta.transition)
    assert t[3, 4] == pytest.approx(0.4) and t[3, 3] == pytest.approx(0.6) and t[9, 0] == pytest.approx(0.4)


def test_instance_noise_on_digits(tmp_path: Path) -> None:
    meta = prepare("digits", tmp_path / "inst", noise="instance:0.3", seed=0, progress=False)
    noisy = split_arrays(tmp_path / "inst", "noisy_train")
    measured = float(np.mean(noisy["label"] != noisy["true_label"]))
    assert abs(measured - 0.3) <= 0.1
    assert meta.actual_noise_rate == pytest.approx(measured, abs=1e-6)
    assert noisy["label"].min() >= 0 and noisy["label"].max() < 10
    # Instance noise has no model T: the recorded one is the measured one.
    np.testing.assert_allclose(meta.transition, meta.empirical_transition, atol=1e-6)
    # Seeded and feature-dependent: repeating gives the same labels.
    prepare("digits", tmp_path / "inst2", noise="instance:0.3", seed=0, progress=False)
    assert read_split_table(tmp_path / "inst", "noisy_train").equals(
        read_split_table(tmp_path / "inst2", "noisy_train"))


# ---------------------------------------------------------------- inspect
def test_inspect_reports_counts_and_noise(digits_dir: Path) -> None:
    meta = read_meta(digits_dir)
    text = inspect_dataset(digits_dir)
    lines = text.splitlines()
    for split in SPLITS:
        row = [line for line in lines if line.split() and line.split()[0] == split]
        assert len(row) == 1, split
        assert int(row[0].split()[1]) == meta.counts[split]
    noisy_row = next(line for line in lines if line.startswith("noisy_train"))
    assert noisy_row.split()[-1] == f"{meta.actual_noise_rate:.3f}"
    clean_row = next(line for line in lines if line.startswith("clean_train"))
    assert clean_row.split()[-1] == "0.000"
    assert "noise transition matrix T[true, noisy]" in text
    assert "measured on noisy_train:" in text
    assert "symmetric:0.6" in text


def test_inspect_detects_tampering(tmp_path: Path) -> None:
    # Single-shard split: removing its only shard is caught by read_meta itself.
    one = tmp_path / "one"
    prepare("digits", one, noise="symmetric:0.6", seed=0, progress=False)
    (Path(split_files(one, "val")[0])).unlink()
    with pytest.raises(DataError) as info:
        read_meta(one)
    assert str(one / "val") in str(info.value)
    with pytest.raises(DataError, match="no parquet shards"):
        inspect_dataset(one)

    # Multi-shard split: meta.json still matches a shard list, but the row count does not.
    many = tmp_path / "many"
    prepare("synthetic", many, options=TINY_SYNTHETIC, shard_bytes=1, progress=False)
    files = split_files(many, "noisy_train")
    assert len(files) > 1
    read_meta(many)
    Path(files[-1]).unlink()
    with pytest.raises(DataError, match="shards hold") as info:
        inspect_dataset(many)
    assert str(many / "noisy_train") in str(info.value)


def test_small_shards_hold_the_same_rows(tmp_path: Path) -> None:
    # Shards roll between prepare's 2048-row chunks, so a split needs > 2048 rows to span several files.
    one, many = tmp_path / "one", tmp_path / "many"
    meta = prepare("synthetic", one, options=TINY_SYNTHETIC, noise="symmetric:0.3", progress=False)
    prepare("synthetic", many, options=TINY_SYNTHETIC, noise="symmetric:0.3", shard_bytes=1, progress=False)
    assert meta.counts["noisy_train"] > 2 * 2048
    assert len(split_files(one, "noisy_train")) == 1
    assert len(split_files(many, "noisy_train")) == 3
    for split in SPLITS:
        a, b = read_split_table(one, split), read_split_table(many, split)
        assert a.equals(b), split
        np.testing.assert_array_equal(b["id"].to_numpy(), np.arange(meta.counts[split]))
    read_meta(many)
    assert inspect_dataset(many).count("noisy_train") >= 1


def test_stream_decodes_grouped_row_groups_in_one_stage_and_blocks_of_block_rows(tmp_path: Path,
                                                                                 ray_cluster) -> None:
    """The decode stage is the only stage (a separate re-blocking stage held a CPU slot of its own and made the
    decode run one task at a time); each task decodes several row groups; blocks hold `block_rows` rows."""
    import math
    import re

    from metacorrect.datasets import stream

    out = tmp_path / "syn"
    meta = prepare("synthetic", out, options={"n": 40000, "num_classes": 4, "image_size": 4, "channels": 1},
                   progress=False)
    rows = meta.counts["noisy_train"]
    units = stream.row_groups(split_files(out, "noisy_train"))
    assert len(units) >= 16  # enough row groups for the "at least 8 tasks" rule to allow groups of 2+
    block_rows = min(1024, rows // 32)
    for concurrency in (None, 2):  # a capped concurrency is where a re-blocking stage stopped being fused
        ds = stream.open_split(out, "noisy_train", meta, shuffle_files=True,
                               decode_concurrency=concurrency).materialize()
        stats = ds.stats()
        assert "Repartition" not in stats, stats
        tasks = int(re.search(r"MapBatches\(read_and_decode\): (\d+) tasks executed", stats).group(1))
        assert tasks == math.ceil(len(units) / (len(units) // 8)), stats
        sizes = [len(b["id"]) for b in ds.iter_batches(batch_size=None, batch_format="numpy")]
        # Most blocks hold exactly `block_rows`; a row group's short tail may ride with the next group's first
        # block (same task) or end the task on its own.
        assert sum(sizes) == rows and int(np.median(sizes)) == block_rows and max(sizes) < 2 * block_rows, sizes
        ids = np.concatenate([b["id"] for b in ds.iter_batches(batch_size=None, batch_format="numpy")])
        np.testing.assert_array_equal(np.sort(ids), np.arange(rows))


# ---------------------------------------------------------------- CLI
def test_cli_data_prepare_and_inspect(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      digits_dir: Path) -> None:
    out = tmp_path / "cli-digits"
    argv = ["data", "prepare", "digits", "--noise", "symmetric:0.6", "--clean-per-class", "10",
            "--seed", "0", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out == ""  # --quiet
    meta = read_meta(out)
    assert meta.counts == read_meta(digits_dir).counts
    assert read_split_table(out, "noisy_train").equals(read_split_table(digits_dir, "noisy_train"))

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "already exists" in err and str(out) in err
    assert read_meta(out).counts == meta.counts  # untouched

    assert main(argv + ["--overwrite"]) == 0
    capsys.readouterr()
    assert read_split_table(out, "noisy_train").equals(read_split_table(digits_dir, "noisy_train"))

    assert main(["data", "inspect", str(out)]) == 0
    text = capsys.readouterr().out
    for split in SPLITS:
        assert any(line.split()[:2] == [split, str(meta.counts[split])] for line in text.splitlines() if line.strip())


def test_cli_data_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "x"
    assert main(["data", "prepare", "digits", "--noise", "bogus", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "error: noise 'bogus': unknown kind 'bogus'" in err
    assert main(["data", "prepare", "synthetic", "--option", "n", "--out", str(out), "--quiet"]) == 2
    assert "--option 'n': expected KEY=VALUE" in capsys.readouterr().err
    assert main(["data", "prepare", "synthetic", "--option", "n=5", "--out", str(out), "--quiet"]) == 2
    assert "synthetic: need num_classes >= 2 and n >= num_classes" in capsys.readouterr().err
    assert not out.exists()
    assert main(["data", "inspect", str(tmp_path / "missing")]) == 2
    assert "data set directory not found" in capsys.readouterr().err


def test_cli_prepare_synthetic_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "syn"
    rc = main(["data", "prepare", "synthetic", "--option", "n=300", "--option", "num_classes=3",
               "--option", "image_size=8", "--clean-per-class", "4", "--val-per-class", "6",
               "--test-fraction", "0.25", "--out", str(out), "--quiet"])
    assert rc == 0
    meta = read_meta(out)
    assert meta.num_classes == 3 and meta.image_shape == [8, 8, 3]
    assert meta.counts["clean_train"] == 12 and meta.counts["val"] == 18
    assert meta.counts["test"] == 75 and sum(meta.counts.values()) == 300
    assert meta.prepare_args["options"] == {"n": 300, "num_classes": 3, "image_size": 8}
    assert meta.actual_noise_rate == 0.0 and meta.noise == "none"
    assert os.listdir(tmp_path) == ["syn"]
