"""A causal language model built from torch.nn's own transformer, as many users write one.

``nn.TransformerEncoder`` over ``nn.TransformerEncoderLayer`` with a causal mask made in forward:
fx keeps torch.nn modules whole, but ppcompile traces the container as the loop over its layers,
so the partitioner can cut between any two of them.

    ppcompile compile models/encoder.py:encoder_mini --stages 4 -o build/encoder
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ppcompile import ModelSpec


@dataclass(frozen=True)
class EncoderConfig:
    vocab_size: int = 128
    seq_len: int = 32
    n_layer: int = 8
    n_head: int = 4
    n_embd: int = 64
    micro_batch: int = 4


class EncoderLM(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        d = config.n_embd
        self.tokens = nn.Embedding(config.vocab_size, d)
        self.positions = nn.Embedding(config.seq_len, d)
        layer = nn.TransformerEncoderLayer(
            d, config.n_head, 4 * d, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(
            layer, config.n_layer, norm=nn.LayerNorm(d), enable_nested_tensor=False
        )
        self.head = nn.Linear(d, config.vocab_size, bias=False)

    def forward(self, idx, targets):
        t = idx.size(1)
        x = self.tokens(idx) + self.positions(torch.arange(t, device=idx.device))  # (B, T, C)
        causal = nn.Transformer.generate_square_subsequent_mask(t, device=idx.device)  # (T, T)
        h = self.encoder(x, mask=causal)  # (B, T, C)
        return F.cross_entropy(self.head(h).flatten(0, 1), targets.flatten())


def permuted_tokens(
    vocab_size: int, seq_len: int, batch_size: int, seed: int
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Random tokens, each to be mapped to its image under one fixed permutation of the vocabulary:
    a task the model can learn, so a run's loss falls."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.randperm(vocab_size, generator=torch.Generator().manual_seed(0))
    while True:
        idx = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
        yield idx, image[idx]


def make_spec(config: EncoderConfig) -> ModelSpec:
    """The model plus one micro-batch of random tokens."""
    shape = (config.micro_batch, config.seq_len)
    idx, targets = torch.randint(0, config.vocab_size, shape), torch.randint(0, config.vocab_size, shape)
    dims = {"idx": {0: "b", 1: "s"}, "targets": {0: "b", 1: "s"}}
    data = functools.partial(permuted_tokens, config.vocab_size, config.seq_len)
    return ModelSpec(EncoderLM(config), (idx, targets), dims=dims, data=data)


def encoder_mini() -> ModelSpec:
    """Eight small layers, gpt_mini's width: a CPU-sized model."""
    return make_spec(EncoderConfig())
