"""Transfer learning: what carries a model from one stage to the next.

``policies.py`` holds the fine-tuning policies (learning-rate multipliers per backbone block as a
function of the epoch) and ``finetuning.py`` applies one to a model (parameter groups, frozen
normalisation statistics); ``regularizers.py`` holds the math of L2-SP, BSS, DELTA and
distillation, and ``terms.py`` the objects a stage adds to its loss (:class:`TransferTerms`);
``alpha.py`` the source weight of a combined stage; ``loading.py`` loading pretrained weights with
a report; ``fusion.py`` ensembles and weight soups.
"""

from mtl.transfer.alpha import AlphaSchedule
from mtl.transfer.finetuning import FineTuning
from mtl.transfer.terms import BSS, DELTA, L2SP, Distillation, ForwardRecord, TransferTerm, TransferTerms

__all__ = [
    "AlphaSchedule", "BSS", "DELTA", "Distillation", "FineTuning", "ForwardRecord", "L2SP",
    "TransferTerm", "TransferTerms",
]
