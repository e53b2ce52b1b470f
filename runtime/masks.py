"""What torch.nn's transformer containers decide once per call, for stages that run their layers.

ppcompile traces ``nn.TransformerEncoder`` and ``nn.TransformerDecoder`` as the loop over their
layers that their forward is, so a cut may fall between two layers. Given a mask and no
``is_causal``, the container first tests whether the mask is the causal one (a causal mask lets
attention take its causal kernel); the traced loop makes that test before each layer, on the
mask the layer receives, so no Python bool has to cross a cut between stages.
"""

from __future__ import annotations

import torch
from torch.nn.modules import transformer


def is_causal_mask(mask: torch.Tensor, x: torch.Tensor, batch_first: bool) -> bool:
    """Whether ``mask`` is the causal mask of ``x``'s sequence, as torch's container decides it.

    >>> x = torch.zeros(2, 3, 4)
    >>> is_causal_mask(torch.nn.Transformer.generate_square_subsequent_mask(3), x, batch_first=True)
    True
    >>> is_causal_mask(torch.zeros(3, 3), x, batch_first=True)
    False
    """
    # Looked up on the module at each call: the compiler swaps it while sizing on meta tensors.
    return transformer._detect_is_causal_mask(mask, None, transformer._get_seq_len(x, batch_first))
