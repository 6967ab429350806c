"""DenseNpyDataset on tiny NYUv2-like and Cityscapes-like folders of random .npy files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mtl.data.dense_npy import DenseNpyDataset, horizontal_flip, random_scale_crop

NYU_TASKS = ("segmentation", "depth", "normal")


def _write_split(root: Path, split: str, n: int, size, num_classes: int, normal: bool, seed: int):
    """LibMTL's layout: channels-last float image, float label with -1, depth [H, W, 1], normal."""
    rng = np.random.default_rng(seed)
    h, w = size
    for name in ("image", "label", "depth") + (("normal",) if normal else ()):
        (root / split / name).mkdir(parents=True)
    for i in range(n):
        label = rng.integers(-1, num_classes, size=(h, w)).astype(np.float64)
        depth = rng.uniform(0.5, 10.0, size=(h, w, 1)).astype(np.float32)
        depth[label == -1] = 0.0
        np.save(root / split / "image" / f"{i}.npy", rng.random((h, w, 3)))
        np.save(root / split / "label" / f"{i}.npy", label)
        np.save(root / split / "depth" / f"{i}.npy", depth)
        if normal:
            nrm = rng.normal(size=(h, w, 3))
            nrm /= np.linalg.norm(nrm, axis=-1, keepdims=True)
            nrm[label == -1] = 0.0
            np.save(root / split / "normal" / f"{i}.npy", nrm.astype(np.float32))


@pytest.fixture
def nyu(tmp_path):
    root = tmp_path / "nyuv2"
    _write_split(root, "train", 3, (12, 16), 13, normal=True, seed=0)
    _write_split(root, "val", 2, (12, 16), 13, normal=True, seed=1)
    return root


@pytest.fixture
def cityscapes(tmp_path):
    root = tmp_path / "cityscapes"
    _write_split(root, "train", 2, (8, 16), 7, normal=False, seed=2)
    _write_split(root, "val", 2, (8, 16), 7, normal=False, seed=3)
    return root


def test_nyuv2_like_examples(nyu):
    ds = DenseNpyDataset(nyu, "train", NYU_TASKS)
    assert len(ds) == 3 and ds.image_size == (12, 16)
    image, labels = ds[1]
    assert image.shape == (3, 12, 16) and image.dtype == torch.float32
    assert set(labels) == set(NYU_TASKS)
    assert labels["segmentation"].shape == (12, 16) and labels["segmentation"].dtype == torch.int64
    assert labels["depth"].shape == (1, 12, 16) and labels["depth"].dtype == torch.float32
    assert labels["normal"].shape == (3, 12, 16) and labels["normal"].dtype == torch.float32
    raw = np.load(nyu / "train" / "image" / "1.npy")
    assert torch.allclose(image, torch.from_numpy(raw).permute(2, 0, 1).float())
    raw_label = np.load(nyu / "train" / "label" / "1.npy")
    assert torch.equal(labels["segmentation"], torch.from_numpy(raw_label).long())
    assert (labels["segmentation"] == -1).any()
    assert len(DenseNpyDataset(nyu, "val", NYU_TASKS)) == 2


def test_cityscapes_like_examples_and_task_subsets(cityscapes):
    ds = DenseNpyDataset(cityscapes, "val", ("segmentation", "depth"))
    image, labels = ds[0]
    assert image.shape == (3, 8, 16) and set(labels) == {"segmentation", "depth"}
    assert labels["depth"].shape == (1, 8, 16)
    only_depth = DenseNpyDataset(cityscapes, "train", ("depth",))
    assert set(only_depth[1][1]) == {"depth"}


def test_works_with_a_dataloader(nyu):
    loader = torch.utils.data.DataLoader(DenseNpyDataset(nyu, "train", NYU_TASKS), batch_size=2)
    image, labels = next(iter(loader))
    assert image.shape == (2, 3, 12, 16) and labels["normal"].shape == (2, 3, 12, 16)


def test_missing_task_folder_is_named(cityscapes):
    with pytest.raises(FileNotFoundError, match="normal.*provides are \\['segmentation', 'depth'\\]"):
        DenseNpyDataset(cityscapes, "train", NYU_TASKS)


def test_missing_split_folder_is_named(nyu):
    with pytest.raises(FileNotFoundError, match="test.*split='val'"):
        DenseNpyDataset(nyu, "test")


def test_unknown_task_is_named(nyu):
    with pytest.raises(ValueError, match="edges"):
        DenseNpyDataset(nyu, "train", ("edges",))


def test_mismatched_file_counts_are_named(nyu):
    (nyu / "train" / "depth" / "2.npy").unlink()
    with pytest.raises(ValueError, match="depth has 2 files .* has 3.*missing 2.npy"):
        DenseNpyDataset(nyu, "train", NYU_TASKS)
    # a dataset that does not read depth does not care
    assert len(DenseNpyDataset(nyu, "train", ("segmentation", "normal"))) == 3


def test_wrongly_shaped_files_are_named(nyu):
    np.save(nyu / "train" / "image" / "0.npy", np.zeros((3, 12, 16)))  # channels first
    with pytest.raises(ValueError, match="image/0.npy has shape \\(3, 12, 16\\).*\\[H, W, 3\\]"):
        DenseNpyDataset(nyu, "train", NYU_TASKS)
    np.save(nyu / "val" / "normal" / "1.npy", np.zeros((12, 15, 3)))  # found when loaded
    ds = DenseNpyDataset(nyu, "val", NYU_TASKS)
    message = "normal/1.npy has shape \\(12, 15, 3\\), expected \\[12, 16, 3\\]"
    with pytest.raises(ValueError, match=message):
        ds[1]


def test_badly_named_files_are_reported(nyu):
    np.save(nyu / "val" / "image" / "extra_copy.npy", np.zeros((12, 16, 3)))
    with pytest.raises(ValueError, match="extra_copy.npy"):
        DenseNpyDataset(nyu, "val")


def test_flip_mirrors_everything_and_negates_normal_x():
    image = torch.arange(3 * 3 * 4, dtype=torch.float32).reshape(3, 3, 4)
    normal = torch.randn(3, 3, 4)
    labels = {
        "segmentation": torch.arange(12).reshape(3, 4),
        "depth": torch.rand(1, 3, 4),
        "normal": normal,
    }
    flipped_image, flipped = horizontal_flip(image, labels)
    assert torch.equal(flipped_image[:, :, 0], image[:, :, -1])
    assert torch.equal(flipped["segmentation"][:, 0], labels["segmentation"][:, -1])
    assert torch.equal(flipped["depth"][..., 0], labels["depth"][..., -1])
    assert torch.equal(flipped["normal"][0, :, 0], -normal[0, :, -1])
    assert torch.equal(flipped["normal"][1:, :, 0], normal[1:, :, -1])
    assert torch.equal(labels["normal"], normal)  # the input is left alone


def test_scale_crop_zooms_in_and_divides_depth():
    image = torch.rand(3, 12, 16)
    depth = torch.full((1, 12, 16), 6.0)
    labels = {
        "segmentation": torch.randint(-1, 3, (12, 16)),
        "depth": depth,
        "normal": torch.nn.functional.normalize(torch.randn(3, 12, 16), dim=0),
    }
    g = torch.Generator().manual_seed(0)
    out_image, out = random_scale_crop(image, labels, scales=(1.5,), generator=g)
    assert out_image.shape == (3, 12, 16) and out["segmentation"].dtype == torch.int64
    assert torch.allclose(out["depth"], torch.full((1, 12, 16), 4.0))
    assert set(out["segmentation"].unique().tolist()) <= {-1, 0, 1, 2}
    norms = torch.linalg.vector_norm(out["normal"], dim=0)
    assert torch.allclose(norms[norms > 0], torch.ones(()), atol=1e-5)
    same_image, same = random_scale_crop(image, labels, scales=(1.0,), generator=g)
    assert same_image is image and same["depth"] is depth


def test_augmented_examples_keep_shapes_and_vary(nyu):
    g = torch.Generator().manual_seed(0)
    ds = DenseNpyDataset(nyu, "train", NYU_TASKS, augment=True, generator=g)
    plain = DenseNpyDataset(nyu, "train", NYU_TASKS)
    images = [ds[0][0] for _ in range(8)]
    assert all(x.shape == (3, 12, 16) for x in images)
    assert any(not torch.equal(x, plain[0][0]) for x in images)
    image, labels = ds[2]
    assert labels["segmentation"].shape == (12, 16) and labels["depth"].shape == (1, 12, 16)
