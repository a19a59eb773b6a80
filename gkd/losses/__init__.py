"""Token-level divergences for GKD, f-DISTILL, DistiLLM, AKL and ATKD.

`per_token(name, student_logits, teacher_logits, *, temperature=1.0, **params)`
-> float32 `[batch, length]`; `reduce(values, mask, mode)` -> scalar;
`Divergence` is the Gin-configurable bundle of both. `CrossTokenizerLoss`
(`cross_tokenizer.py`) distils from a teacher with another tokenizer.
"""

from gkd.losses.api import (Divergence, NAMES, REDUCTIONS, atkd_split, atkd_values, check_params,
                            per_token, reduce, reduction_weights, weighted_sum)
from gkd.losses.cross_tokenizer import CrossTokenizerLoss
from gkd.losses.divergences import (akl, atkd_parts, forward_kl, jsd, reverse_kl, skew_kl,
                                    skew_reverse_kl, tvd)

__all__ = [
    "CrossTokenizerLoss", "Divergence", "NAMES", "REDUCTIONS", "check_params", "per_token",
    "reduce", "reduction_weights", "weighted_sum", "atkd_split", "atkd_values", "akl", "atkd_parts", "forward_kl", "jsd", "reverse_kl", "skew_kl",
    "skew_reverse_kl", "tvd",
]
