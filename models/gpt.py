"""A GPT language model in the style of nanoGPT, written so torch.fx traces it.

Pre-norm blocks, learned positions, causal self-attention, GELU MLP, optional tied
embedding / LM head, and the cross-entropy loss inside ``forward(idx, targets)``.

Factories (``models/gpt.py:NAME``): ``gpt_mini`` (tests and the demo), ``gpt_small``
(GPT-2 124M), ``gpt3_175b`` (GPT-3 175B; compile it on the meta device only).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ppcompile import ModelSpec


@dataclass(frozen=True)
class GPTConfig:
    block_size: int = 1024  # longest sequence; the causal mask is this big
    vocab_size: int = 50257  # GPT-2's BPE vocabulary
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block
    n_embd: int = 768  # model width d
    tie_weights: bool = True  # share the token embedding with the LM head
    micro_batch: int = 1  # rows in one example micro-batch
    seq_len: int = 1024  # tokens per row in the example micro-batch


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        mask = torch.tril(torch.ones(config.block_size, config.block_size))
        self.register_buffer("bias", mask.view(1, 1, config.block_size, config.block_size), persistent=False)

    def forward(self, x):
        B, T, C = x.size()  # (B, T, C)
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, T)
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = att @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))  # (B, T, C)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets):
        T = idx.size(1)
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)  # (B, T, C)
        x = self.transformer.ln_f(x)  # (B, T, C)
        logits = self.lm_head(x)  # (B, T, vocab)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def markov_tokens(
    vocab_size: int, seq_len: int, batch_size: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """An endless learnable task that ships with the model: token sequences from a fixed Markov chain
    in which every token has two equally likely successors. A model that learns the chain reaches
    a loss of ln 2 = 0.69 from ln(vocab) at random init, so training visibly works."""
    chain = torch.Generator().manual_seed(20241122)  # the chain is part of the task, not of the run
    successors = torch.randint(0, vocab_size, (vocab_size, 2), generator=chain)
    rng = torch.Generator().manual_seed(seed)
    while True:
        tokens = torch.empty(batch_size, seq_len + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, vocab_size, (batch_size,), generator=rng)
        choices = torch.randint(0, 2, (batch_size, seq_len), generator=rng)
        for t in range(seq_len):
            tokens[:, t + 1] = successors[tokens[:, t], choices[:, t]]
        yield tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()  # idx (B, T), targets (B, T)


def make_spec(config: GPTConfig) -> ModelSpec:
    """The model plus one micro-batch of random tokens, on the current default device."""
    model = GPT(config)
    shape = (config.micro_batch, config.seq_len)
    idx = torch.randint(0, config.vocab_size, shape)
    targets = torch.randint(0, config.vocab_size, shape)
    dims = {"idx": {0: "b", 1: "s"}, "targets": {0: "b", 1: "s"}}
    data = functools.partial(markov_tokens, config.vocab_size, config.seq_len)
    return ModelSpec(model, (idx, targets), dims=dims, data=data)


def gpt_mini() -> ModelSpec:
    """Four tiny blocks: fast enough for every test and the CPU demo."""
    return make_spec(
        GPTConfig(block_size=32, vocab_size=128, n_layer=4, n_head=4, n_embd=64, micro_batch=4, seq_len=32)
    )


def gpt_small() -> ModelSpec:
    """GPT-2 124M: 12 layers, d=768, 12 heads, vocab 50257, tied embedding and head."""
    return make_spec(GPTConfig())


def gpt3_175b() -> ModelSpec:
    """GPT-3 175B: 96 layers, d=12288, 96 heads, sequence 2048. Compile on the meta device."""
    return make_spec(
        GPTConfig(block_size=2048, n_layer=96, n_head=96, n_embd=12288, micro_batch=1, seq_len=2048)
    )
