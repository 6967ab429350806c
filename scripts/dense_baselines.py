"""Trivial baselines of the scenes benchmark, as JSON: what a model must beat to have learned anything.

For each task, two predictors fitted on the training split only and scored on the test split with
the same metrics as the models (:mod:`mtl.metrics.dense`):

- ``constant``: one value everywhere: the majority class, the mean depth, the mean normal
  (normalised), over the labelled training pixels;
- ``per_pixel``: one value per pixel position: the majority class, mean depth and mean normal of
  that position over the training scenes (it knows that floors are at the bottom of the image).

Usage::

    python scripts/dense_baselines.py                      # the data=scenes defaults
    python scripts/dense_baselines.py --n-train 1000 --n-test 200 --size 64 --out baselines.json
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import torch
import torch.nn.functional as F

from mtl.data.scenes import SCENE_CLASSES, render_scenes
from mtl.metrics.dense import DepthErrors, NormalErrors, SegmentationMetrics


def _scores(metric, pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    metric.update(pred, target)
    return {k: round(float(v), 4) for k, v in metric.compute().items()}


def baselines(train: dict, test: dict, num_classes: int = len(SCENE_CLASSES)) -> dict[str, dict[str, dict[str, float]]]:
    """``{task: {predictor: {metric: value}}}`` for rendered ``train`` and ``test`` splits."""
    seg_tr, seg_te = torch.from_numpy(train["segmentation"]), torch.from_numpy(test["segmentation"])
    dep_tr, dep_te = torch.from_numpy(train["depth"]), torch.from_numpy(test["depth"])
    nor_tr, nor_te = torch.from_numpy(train["normal"]), torch.from_numpy(test["normal"])
    n = seg_te.shape[0]

    labelled = seg_tr >= 0
    counts = torch.bincount(seg_tr[labelled], minlength=num_classes)
    per_pos = F.one_hot(seg_tr.clamp_min(0), num_classes).mul(labelled[..., None]).sum(0)  # [H, W, C]
    seg = {
        "constant": torch.full_like(seg_te, int(counts.argmax())),
        "per_pixel": per_pos.argmax(-1).expand_as(seg_te).clone(),
    }

    dmask = dep_tr > 0
    mean_depth = dep_tr[dmask].double().mean()
    pos_depth = (dep_tr.double() * dmask).sum(0) / dmask.sum(0).clamp_min(1)
    dep = {
        "constant": torch.full(dep_te.shape, float(mean_depth)),
        "per_pixel": pos_depth.float().expand_as(dep_te).clone(),
    }

    mean_normal = F.normalize(nor_tr.double().sum(dim=(0, 2, 3)), dim=0).float()
    pos_normal = F.normalize(nor_tr.double().sum(0), dim=0).float()  # [3, H, W]
    nor = {
        "constant": mean_normal[None, :, None, None].expand_as(nor_te).clone(),
        "per_pixel": pos_normal[None].expand(n, -1, -1, -1).clone(),
    }
    return {
        "segmentation": {k: _scores(SegmentationMetrics(num_classes, -1), p, seg_te) for k, p in seg.items()},
        "depth": {k: _scores(DepthErrors(), p, dep_te) for k, p in dep.items()},
        "normal": {k: _scores(NormalErrors(), p, nor_te) for k, p in nor.items()},
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--split-seeds", type=int, nargs=3, default=[0, 1, 2], help="train, val, test render seeds")
    parser.add_argument("--out", default=None, help="also write the JSON to this file")
    args = parser.parse_args(argv)
    train = render_scenes(args.n_train, size=args.size, seed=args.split_seeds[0])
    test = render_scenes(args.n_test, size=args.size, seed=args.split_seeds[2])
    result = {
        "data": {"n_train": args.n_train, "n_test": args.n_test, "size": args.size, "split_seeds": args.split_seeds},
        "test": baselines(train, test),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
