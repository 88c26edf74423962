"""CLIP text tower: causal pre-LN transformer over BPE tokens, pooled at the EOT token."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

TEXT_ACTS = ("gelu", "quick_gelu")


def quick_gelu(x: Tensor) -> Tensor:
    """OpenAI CLIP's GELU approximation x * sigmoid(1.702 x) (as open_clip's ``QuickGELU``)."""
    return x * torch.sigmoid(1.702 * x)


def text_activation(name: str) -> Callable[[Tensor], Tensor]:
    """The MLP activation named ``name``: ``gelu`` (exact, erf) or ``quick_gelu`` (OpenAI)."""
    if name == "gelu":
        return F.gelu
    if name == "quick_gelu":
        return quick_gelu
    raise ValueError(f"text activation must be one of {', '.join(TEXT_ACTS)} (got {name!r})")


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with a causal mask, through fused SDPA."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x_BLD: Tensor) -> Tensor:
        """[B, L, D] -> [B, L, D]; position t attends to positions <= t only."""
        b, length, d = x_BLD.shape
        qkv = self.qkv(x_BLD).view(b, length, 3, self.heads, d // self.heads)
        q_BHLd, k_BHLd, v_BHLd = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out_BHLd = F.scaled_dot_product_attention(q_BHLd, k_BHLd, v_BHLd, is_causal=True)
        return self.proj(out_BHLd.transpose(1, 2).reshape(b, length, d))


class TextBlock(nn.Module):
    """Pre-LN residual block: x + attn(ln1(x)), then x + mlp(ln2(x)); the MLP's activation is
    GELU or, for OpenAI's weights, QuickGELU (``act``)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, act: str = "gelu") -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.act = text_activation(act)
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x_BLD: Tensor) -> Tensor:
        """[B, L, D] -> [B, L, D]."""
        x_BLD = x_BLD + self.attn(self.ln1(x_BLD))
        return x_BLD + self.fc2(self.act(self.fc1(self.ln2(x_BLD))))


class TextTransformer(nn.Module):
    """CLIP's text encoder: token + learned position embedding, causal blocks, final LayerNorm,
    features at the EOT token (it has the largest id in CLIP's vocabulary, so argmax finds it).
    """

    def __init__(
        self,
        context_length: int = 77,
        vocab_size: int = 49408,
        width: int = 512,
        layers: int = 12,
        heads: int = 8,
        mlp_ratio: float = 4.0,
        act: str = "gelu",
    ) -> None:
        super().__init__()
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.width = width
        self.layers = layers
        self.act = act
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.blocks = nn.ModuleList(TextBlock(width, heads, mlp_ratio, act) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        self.grad_checkpointing = False
        self.init_parameters()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.grad_checkpointing = enable

    def init_parameters(self) -> None:
        """CLIP init: embeddings N(0, 0.02) / N(0, 0.01); output projections scaled by depth."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        attn_std = self.width**-0.5
        proj_std = attn_std * (2 * self.layers) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=attn_std)
            nn.init.zeros_(block.attn.qkv.bias)
            nn.init.normal_(block.attn.proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.proj.bias)
            nn.init.normal_(block.fc1.weight, std=fc_std)
            nn.init.normal_(block.fc2.weight, std=proj_std)

    def forward_tokens(self, tokens_BL: Tensor) -> Tensor:
        """Hidden states after the final LayerNorm: [B, L, width]."""
        length = tokens_BL.shape[1]
        if length > self.context_length:
            raise ValueError(f"{length} tokens exceed the context length {self.context_length}")
        x_BLD = self.token_embedding(tokens_BL) + self.positional_embedding[:length]
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            x_BLD = checkpoint(block, x_BLD, use_reentrant=False) if recompute else block(x_BLD)
        return self.ln_final(x_BLD)

    def forward(self, tokens_BL: Tensor) -> Tensor:
        """Features at each row's EOT token: [B, width]."""
        hidden_BLD = self.forward_tokens(tokens_BL)
        eot_B = tokens_BL.argmax(dim=-1)
        return hidden_BLD[torch.arange(hidden_BLD.shape[0], device=hidden_BLD.device), eot_B]
