"""Dataset readers (on small files written here in the exact standard formats) and batches."""
from __future__ import annotations

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from opsearch import registry
from opsearch.errors import UserError
from opsearch.trainers import data

import resources


# ---------------------------------------------------------------------------------------------
# digits, synthetic, the registry

def test_digits_split_is_stratified_deterministic_and_normalised():
    d = data.load("digits", image_size=None)
    assert d.x_train.shape[1:] == (1, 8, 8) and d.num_classes == 10
    held = data.load("digits", split="heldout")
    assert len(d.y_train) + len(d.y_val) == len(held.y_train) == 1797 - len(held.y_val)
    assert abs(len(held.y_val) / 1797 - 0.2) < 0.01 and abs(len(d.y_val) / 1438 - 0.2) < 0.01
    # every class in the same proportion on both sides
    train_counts = torch.bincount(d.y_train, minlength=10).float()
    val_counts = torch.bincount(d.y_val, minlength=10).float()
    assert torch.allclose(val_counts / (train_counts + val_counts), torch.full((10,), 0.2), atol=0.02)
    assert abs(float(d.x_train.mean())) < 1e-4 and abs(float(d.x_train.std()) - 1) < 1e-3
    again = data.load("digits", image_size=None)
    assert torch.equal(d.x_val, again.x_val) and torch.equal(d.y_train, again.y_train)


def test_digits_heldout_split_is_disjoint_from_the_search_splits():
    from sklearn.datasets import load_digits

    y = load_digits().target
    rest, held = data._heldout_split(y, "search", data.HELDOUT_FRACTION)
    assert not set(rest) & set(held) and len(rest) + len(held) == 1797
    assert len(data.load("digits", heldout_fraction=0).y_val) == 359  # nothing kept back
    with pytest.raises(UserError, match="split must be"):
        data.load("digits", split="test")


def test_digits_upsampling():
    d = data.load("digits", image_size=16)
    assert d.x_train.shape[1:] == (1, 16, 16) and d.image_size == (16, 16)


def test_unknown_dataset_lists_known_ones():
    with pytest.raises(UserError, match="known: .*digits"):
        data.load("mnits")


def test_bad_dataset_option_is_a_user_error():
    with pytest.raises(UserError, match="unknown option 'colour'; known: .*image_size"):
        data.load("digits", colour=True)


def test_registered_datasets():
    assert {"digits", "fashion_mnist", "fashion_small", "cifar10", "synthetic"} <= set(registry.datasets.names())


# ---------------------------------------------------------------------------------------------
# BatchStream

def _stream(**kw):
    x = torch.arange(100, dtype=torch.float32).view(100, 1, 1, 1)
    y = torch.arange(100)
    base = dict(seed=3, start_step=0, num_steps=12)
    base.update(kw)
    return data.BatchStream(x, y, 16, **base)


def test_batches_are_a_function_of_seed_and_step():
    straight = [y for _, y in _stream()]
    assert len(straight) == 12 and all(len(y) == 16 for y in straight)
    resumed = [y for _, y in _stream(num_steps=5)] + [y for _, y in _stream(start_step=5, num_steps=7)]
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))
    other_seed = [y for _, y in _stream(seed=4)]
    assert not all(torch.equal(a, b) for a, b in zip(straight, other_seed))


def test_grouped_batches_are_the_same_batches_stacked():
    straight = [y for _, y in _stream(start_step=3, num_steps=9)]
    grouped = list(_stream(start_step=3, num_steps=9).grouped(4))
    assert len(grouped) == len(_stream(num_steps=9).grouped(4)) == 3  # 4 + 4 + 1 steps
    assert [ys.shape[0] for _, ys in grouped] == [4, 4, 1]
    assert all(xs.shape[1:] == (16, 1, 1, 1) for xs, _ in grouped)
    assert all(torch.equal(a, b) for a, b in zip(straight, [y for _, ys in grouped for y in ys]))


def test_an_epoch_has_no_repeats():
    first_epoch = torch.cat([y for _, y in _stream(num_steps=6)])  # 100 // 16 = 6 batches
    assert len(first_epoch.unique()) == 96


def test_ranks_split_the_global_batch():
    full = _stream().indices(3)
    r0, r1 = _stream(rank=0, world_size=2).indices(3), _stream(rank=1, world_size=2).indices(3)
    assert sorted(torch.cat([r0, r1]).tolist()) == sorted(full.tolist())
    assert len(r0) == len(r1) == 8


def test_batch_larger_than_dataset_is_a_user_error():
    with pytest.raises(UserError, match="larger than the training set"):
        data.BatchStream(torch.zeros(4, 1, 1, 1), torch.zeros(4, dtype=torch.long), 8, seed=0, num_steps=1)


# ---------------------------------------------------------------------------------------------
# IDX (Fashion-MNIST): files written here byte by byte in the standard layout

def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", s) for s in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_fashion(directory, n_train=40, n_test=20, gz=True):
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for stem, array in arrays.items():
        payload = _idx_bytes(array)
        if gz:
            with gzip.open(directory / (stem + ".gz"), "wb") as f:
                f.write(payload)
        else:
            (directory / stem).write_bytes(payload)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_gz_and_raw(tmp_path, gz):
    arrays = _write_fashion(tmp_path, gz=gz)
    suffix = ".gz" if gz else ""
    images = data.read_idx(tmp_path / ("train-images-idx3-ubyte" + suffix))
    assert np.array_equal(images, arrays["train-images-idx3-ubyte"])
    labels = data.read_idx(tmp_path / ("t10k-labels-idx1-ubyte" + suffix))
    assert np.array_equal(labels, arrays["t10k-labels-idx1-ubyte"])


def test_fashion_mnist_from_a_directory(tmp_path):
    arrays = _write_fashion(tmp_path)
    d = data.load("fashion_mnist", data_dir=str(tmp_path), validation="test")
    assert d.x_train.shape == (40, 1, 28, 28) and d.x_val.shape == (20, 1, 28, 28)
    assert torch.equal(d.y_val, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"].astype(np.int64)))
    heldout = data.load("fashion_mnist", data_dir=str(tmp_path), split="heldout")  # re-ranking
    assert torch.equal(heldout.y_val, d.y_val) and len(heldout.y_train) == 40
    held = data.load("fashion_mnist", data_dir=str(tmp_path), val_fraction=0.25, image_size=14)
    assert len(held.y_val) == 10 and len(held.y_train) == 30 and held.image_size == (14, 14)


def test_fashion_mnist_bad_directory_names_the_files(tmp_path):
    with pytest.raises(UserError, match="train-images-idx3-ubyte.*t10k-labels-idx1-ubyte"):
        data.load("fashion_mnist", data_dir=str(tmp_path))


def test_truncated_idx_file_is_a_user_error(tmp_path):
    payload = _idx_bytes(np.zeros((3, 28, 28), dtype=np.uint8))
    (tmp_path / "bad").write_bytes(payload[:-5])
    with pytest.raises(UserError, match="header says"):
        data.read_idx(tmp_path / "bad")
    (tmp_path / "bad2").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(UserError, match="not an IDX file"):
        data.read_idx(tmp_path / "bad2")


def test_debian_fashion_mnist_is_found_without_a_directory():
    resources.fashion_mnist_dir()  # skips, or fails under CI, when the package is missing
    d = data.load("fashion_mnist", validation="test", train_size=500, val_size=200)
    assert d.x_train.shape == (500, 1, 28, 28) and len(d.y_val) == 200


# ---------------------------------------------------------------------------------------------
# fashion_small: Fashion-MNIST test images shipped with the package

def test_fashion_small_ships_offline_balanced_and_small():
    assert data.FASHION_SMALL_FILE.stat().st_size < 2_000_000
    d = data.load("fashion_small")
    assert d.x_train.shape == (4000, 1, 14, 14) and d.x_val.shape == (500, 1, 14, 14)
    assert np.bincount(d.y_train.numpy(), minlength=10).tolist() == [400] * 10
    assert np.bincount(d.y_val.numpy(), minlength=10).tolist() == [50] * 10
    # the held-out half: same training images, validation images the search never sees
    held = data.load("fashion_small", split="heldout")
    assert torch.equal(held.x_train, d.x_train) and held.x_val.shape == (500, 1, 14, 14)
    seen = {bytes(v.numpy().tobytes()) for v in d.x_val}
    assert not any(bytes(v.numpy().tobytes()) in seen for v in held.x_val)
    assert abs(float(d.x_train.mean())) < 1e-4 and abs(float(d.x_train.std()) - 1) < 1e-3
    assert data.load("fashion_small", image_size=8).image_size == (8, 8)
    assert len(data.load("fashion_small", train_size=1000).y_train) == 1000


def test_fashion_small_missing_file_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_SMALL_FILE", tmp_path / "absent.npz")
    with pytest.raises(UserError, match="fashion_small"):
        data.load("fashion_small")


def test_build_fashion_small_takes_test_images_per_class(tmp_path):
    arrays = _write_fashion(tmp_path, n_test=60)
    # constant images: image k of the test set is all k, so a pick is traceable after resizing
    images = np.repeat(np.arange(60, dtype=np.uint8)[:, None, None], 28, 1).repeat(28, 2)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    data.write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    out = data.build_fashion_small(tmp_path / "small.npz", data_dir=str(tmp_path), size=7, per_class=(3, 2))
    again = data.build_fashion_small(tmp_path / "again.npz", data_dir=str(tmp_path), size=7, per_class=(3, 2))
    with np.load(out) as f, np.load(again) as g:
        assert all(np.array_equal(f[k], g[k]) for k in f.files)  # deterministic
        assert f["x_train"].shape == (30, 1, 7, 7) and f["x_val"].shape == (20, 1, 7, 7)
        picked = np.concatenate([f["x_train"][:, 0, 0, 0], f["x_val"][:, 0, 0, 0]])
        labels = np.concatenate([f["y_train"], f["y_val"]])
        assert len(set(picked.tolist())) == 50  # no image twice, train and validation disjoint
        assert np.array_equal(labels, arrays["t10k-labels-idx1-ubyte"][picked])


@pytest.mark.skipif(not os.path.isfile("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz"),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_shipped_fashion_small_is_rebuilt_exactly_from_the_test_set(tmp_path):
    rebuilt = data.build_fashion_small(tmp_path / "small.npz")
    with np.load(rebuilt) as f, np.load(data.FASHION_SMALL_FILE) as g:
        assert sorted(f.files) == sorted(g.files)
        assert all(np.array_equal(f[k], g[k]) for k in f.files)


# ---------------------------------------------------------------------------------------------
# CIFAR-10 python batches: dicts pickled with bytes keys, as the official files are

def _write_cifar(root, per_batch=20):
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in np.arange(per_batch) % 10],
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"filenames": [f"img{i}.png".encode() for i in range(per_batch)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return folder


def test_cifar10_from_a_directory(tmp_path):
    folder = _write_cifar(tmp_path)
    images, labels = data.read_cifar_batch(folder / "data_batch_2")
    assert images.shape == (20, 3, 32, 32) and images.dtype == np.uint8 and labels.tolist()[:3] == [0, 1, 2]
    d = data.load("cifar10", data_dir=str(tmp_path), validation="test")
    assert d.x_train.shape == (100, 3, 32, 32) and d.x_val.shape == (20, 3, 32, 32) and d.in_channels == 3
    # per-channel standardisation
    assert torch.allclose(d.x_train.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    also = data.load("cifar10", data_dir=str(folder), image_size=16)  # the batches folder itself
    assert also.image_size == (16, 16) and len(also.y_val) == 10


def test_cifar10_bad_directory_names_the_files(tmp_path):
    with pytest.raises(UserError, match="data_batch_1.*test_batch"):
        data.load("cifar10", data_dir=str(tmp_path))


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_reader_refuses_code_in_a_pickle(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "data_batch_1"
    with open(path, "wb") as f:
        pickle.dump({b"data": _Exploit(marker), b"labels": [0]}, f, protocol=2)
    with pytest.raises(UserError, match="refusing to load global"):
        data.read_cifar_batch(path)
    assert not marker.exists()


def test_cifar10_without_a_directory_says_how_to_give_it_in_one_line(monkeypatch):
    """The hint names what the command line accepts: --data-dir, or the download option, which
    is a real option of the evaluator (not Python's download=True)."""
    from opsearch.config import build_config
    from opsearch.evaluation import make_eval_config

    monkeypatch.delenv("OPSEARCH_DATA_DIR", raising=False)
    with pytest.raises(UserError) as info:
        data.load("cifar10")
    message = str(info.value)
    assert "\n" not in message and "no data directory given" in message and "--data-dir DIR" in message
    option = data.DOWNLOAD_HINT.split()[1]  # "-O evaluator.download=true (...)": the option itself
    assert option == "evaluator.download=true" and option in message
    config = build_config(None, {"dataset": "cifar10"}, [option])
    assert make_eval_config(config).download is True
