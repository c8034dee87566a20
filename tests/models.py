"""A tiny Llama-named model for load_into tests (linear-only blocks, so TP parity is simple)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distload.synthetic import LlamaShape


class Block(nn.Module):
    def __init__(self, s: LlamaShape) -> None:
        super().__init__()
        kv = s.hidden // s.heads * s.kv_heads
        self.input_layernorm = nn.Module()
        self.input_layernorm.weight = nn.Parameter(torch.ones(s.hidden))
        self.post_attention_layernorm = nn.Module()
        self.post_attention_layernorm.weight = nn.Parameter(torch.ones(s.hidden))
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(s.hidden, s.hidden, bias=False)
        self.self_attn.k_proj = nn.Linear(s.hidden, kv, bias=False)
        self.self_attn.v_proj = nn.Linear(s.hidden, kv, bias=False)
        self.self_attn.o_proj = nn.Linear(s.hidden, s.hidden, bias=False)
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(s.hidden, s.intermediate, bias=False)
        self.mlp.up_proj = nn.Linear(s.hidden, s.intermediate, bias=False)
        self.mlp.down_proj = nn.Linear(s.intermediate, s.hidden, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h * self.input_layernorm.weight
        h = h + self.self_attn.o_proj(self.self_attn.q_proj(x))
        x = h * self.post_attention_layernorm.weight
        return h + self.mlp.down_proj(F.silu(self.mlp.gate_proj(x)) * self.mlp.up_proj(x))


class TinyLlama(nn.Module):
    def __init__(self, s: LlamaShape, *, tied: bool = False) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(s.vocab, s.hidden)
        self.model.layers = nn.ModuleList(Block(s) for _ in range(s.layers))
        self.model.norm = nn.Module()
        self.model.norm.weight = nn.Parameter(torch.ones(s.hidden))
        self.lm_head = nn.Linear(s.hidden, s.vocab, bias=False)
        if tied:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.model.embed_tokens(ids).float()
        for layer in self.model.layers:
            h = layer(h.to(layer.self_attn.q_proj.weight.dtype)).float()
        return self.lm_head((h * self.model.norm.weight.float()).to(self.lm_head.weight.dtype))
