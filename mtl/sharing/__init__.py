"""Structure sharing: how the backbone's computation is shared among tasks.

One architecture per file: ``hard`` (one backbone for every task), ``cross_stitch`` (a column per
task mixed by learned units), ``mtan`` (task attention over the stages), ``mmoe`` (MMoE and the
one-gate OMoE), ``ple`` (CGC and PLE), ``dselect_k``, ``ltb`` (Learning to Branch: a tree of
branches chosen by Gumbel-softmax); ``experts.py`` holds what the mixtures of
experts share and ``base.py`` the interface (:class:`Sharing`: features per task, the shared
representation, ``shared_parameters`` and ``regularization``).

Dense tasks (heads that read a feature map, ``map_tasks``): ``hard``, ``cross_stitch`` and ``mtan``
serve them with the last stage's feature map (hard sharing's representation is then that map);
the mixtures of experts (``mmoe``, ``omoe``, ``cgc``, ``ple``, ``dselect_k``) mix pooled vectors,
their papers define no experts over feature maps, and they refuse dense tasks with a clear error.
"""

from mtl.sharing.base import SharedFeatures, Sharing
from mtl.sharing.cross_stitch import CrossStitch
from mtl.sharing.hard import HardSharing
from mtl.sharing.ltb import LTB
from mtl.sharing.dselect_k import DSelectK
from mtl.sharing.mmoe import MMoE, OMoE
from mtl.sharing.ple import CGC, PLE
from mtl.sharing.mtan import MTAN

__all__ = [
    "CGC",
    "CrossStitch",
    "DSelectK",
    "HardSharing",
    "LTB",
    "MMoE",
    "MTAN",
    "OMoE",
    "PLE",
    "SharedFeatures",
    "Sharing",
]
