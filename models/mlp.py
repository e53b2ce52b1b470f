"""A deep MLP whose residual connections skip several layers at once.

Layer ``i`` adds the output of layer ``i - skip`` (a long skip, not the usual one-layer
residual), so once the model is cut into stages a tensor made on one stage is consumed
two or more stages later. The loss (mean squared error) is inside ``forward``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ppcompile import ModelSpec


@dataclass(frozen=True)
class MLPConfig:
    n_in: int = 32  # input features
    width: int = 64  # hidden width
    n_layer: int = 12  # hidden layers
    skip: int = 4  # layer i also adds the output of layer i - skip
    n_out: int = 8  # regression targets
    micro_batch: int = 8  # rows in one example micro-batch


class SkipMLP(nn.Module):
    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = config
        self.inp = nn.Linear(config.n_in, config.width)
        self.layers = nn.ModuleList([nn.Linear(config.width, config.width) for _ in range(config.n_layer)])
        self.norm = nn.LayerNorm(config.width)
        self.out = nn.Linear(config.width, config.n_out)

    def forward(self, x, y):
        h = self.inp(x)  # (B, width)
        outputs = [h]
        for i, layer in enumerate(self.layers):
            h = torch.relu(layer(h))  # (B, width)
            if i + 1 >= self.config.skip:
                h = h + outputs[i + 1 - self.config.skip]  # long skip: (B, width)
            outputs.append(h)
        pred = self.out(self.norm(h))  # (B, n_out)
        return F.mse_loss(pred, y)


def make_spec(config: MLPConfig) -> ModelSpec:
    model = SkipMLP(config)
    x = torch.randn(config.micro_batch, config.n_in)
    y = torch.randn(config.micro_batch, config.n_out)
    return ModelSpec(model, (x, y))


def mlp() -> ModelSpec:
    """Twelve layers of width 64, each adding the output of the layer four back."""
    return make_spec(MLPConfig())


def mlp_deep() -> ModelSpec:
    """Twenty-four layers whose skips span eight layers: skips cross several stages."""
    return make_spec(MLPConfig(n_layer=24, skip=8, width=128))
