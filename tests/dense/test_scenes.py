"""The procedural dense benchmark: determinism, shapes, ranges, geometry and unlabelled pixels."""

from __future__ import annotations

import numpy as np
import pytest

from mtl.data.scenes import SCENE_CLASSES, render_scenes

N = 24


@pytest.fixture(scope="module")
def scenes():
    return render_scenes(N, seed=3)


def _labelled(s):
    return s["segmentation"] >= 0


def test_same_seed_same_scenes_other_seed_other_scenes(scenes):
    again = render_scenes(N, seed=3)
    for key in scenes:
        assert np.array_equal(scenes[key], again[key]), key
    other = render_scenes(N, seed=4)
    assert not np.array_equal(scenes["image"], other["image"])


def test_scene_i_depends_only_on_seed_and_i(scenes):
    prefix = render_scenes(5, seed=3)
    for key in scenes:
        assert np.array_equal(scenes[key][:5], prefix[key]), key


def test_shapes_dtypes_and_ranges(scenes):
    assert scenes["image"].shape == (N, 3, 64, 64) and scenes["image"].dtype == np.float32
    assert scenes["segmentation"].shape == (N, 64, 64) and scenes["segmentation"].dtype == np.int64
    assert scenes["depth"].shape == (N, 64, 64) and scenes["depth"].dtype == np.float32
    assert scenes["normal"].shape == (N, 3, 64, 64) and scenes["normal"].dtype == np.float32
    assert 0.0 <= scenes["image"].min() and scenes["image"].max() <= 1.0
    labels = scenes["segmentation"]
    assert set(np.unique(labels)) <= set(range(-1, len(SCENE_CLASSES)))
    for key in scenes:
        assert np.isfinite(scenes[key]).all(), key
    small = render_scenes(2, size=16)
    assert small["image"].shape == (2, 3, 16, 16) and small["normal"].shape == (2, 3, 16, 16)


def test_geometry_on_labelled_pixels(scenes):
    labelled = _labelled(scenes)
    norms = np.linalg.norm(scenes["normal"], axis=1)
    assert np.allclose(norms[labelled], 1.0, atol=1e-4)
    assert (scenes["depth"][labelled] > 0).all()
    # normals face the camera: n . (u tan, v tan, 1) < 0 for the ray through each pixel, where
    # tan = tan(hfov / 2) is in [tan 27.5, tan 35] degrees; n . ray is linear in tan, so it must be
    # negative at one end of that interval at least
    pix = (np.arange(64) + 0.5) / 64 * 2 - 1
    v, u = np.meshgrid(pix, pix, indexing="ij")
    facing = []
    for half_fov in (27.5, 35.0):
        tan = np.tan(np.deg2rad(half_fov))
        ray = np.stack([u * tan, v * tan, np.ones_like(u)])  # [3, H, W]
        facing.append((scenes["normal"] * ray[None]).sum(axis=1))
    assert (np.minimum(*facing)[labelled] < 1e-4).all()


def test_floor_normals_point_up_in_the_camera_frame(scenes):
    floor = scenes["segmentation"] == SCENE_CLASSES.index("floor")
    # camera y points down and the camera pitches at most 25 degrees: the floor's normal has y < 0
    assert (scenes["normal"][:, 1][floor] < -0.8).all()


def test_every_class_appears_in_a_small_batch(scenes):
    counts = np.bincount(scenes["segmentation"][_labelled(scenes)], minlength=len(SCENE_CLASSES))
    assert (counts > 0).all(), dict(zip(SCENE_CLASSES, counts))


def test_unlabelled_pixels_agree_across_tasks(scenes):
    unlabelled = ~_labelled(scenes)
    assert 0.0 < unlabelled.mean() < 0.1
    assert (scenes["depth"][unlabelled] == 0).all()
    assert (scenes["normal"].transpose(0, 2, 3, 1)[unlabelled] == 0).all()
    assert (scenes["depth"][~unlabelled] != 0).all()
    no_holes = render_scenes(3, hole_fraction=0.0, max_holes=0)
    assert (no_holes["segmentation"] >= 0).all()


def test_scenes_vary(scenes):
    labels = scenes["segmentation"]
    object_pixels = np.isin(labels, [3, 4, 5]).mean(axis=(1, 2))
    assert object_pixels.std() > 0.01  # different numbers and sizes of objects
    assert len({tuple(np.unique(l[l >= 3])) for l in labels}) > 2  # different object kinds
    means = scenes["image"].mean(axis=(2, 3))
    assert means.std(axis=0).min() > 0.02  # colours and lighting vary


def test_colour_alone_does_not_give_the_class(scenes):
    # nearest class-mean colour, fitted on these very pixels, stays far from perfect
    rgb = scenes["image"].transpose(0, 2, 3, 1)[_labelled(scenes)]
    labels = scenes["segmentation"][_labelled(scenes)]
    means = np.stack([rgb[labels == c].mean(axis=0) for c in range(len(SCENE_CLASSES))])
    guess = np.argmin(((rgb[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    assert (guess == labels).mean() < 0.6


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="max_objects"):
        render_scenes(2, max_objects=0)
    with pytest.raises(ValueError, match="hole_fraction"):
        render_scenes(2, hole_fraction=1.5)
