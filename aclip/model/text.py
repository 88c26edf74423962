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

    def forward(self, x_BLD: Tensor, attn_mask_B1LL: Tensor | None = None) -> Tensor:
        """[B, L, D] -> [B, L, D]; position t attends to positions <= t only, or, given a
        boolean ``attn_mask_B1LL`` (True = may attend; causal already), to what it allows."""
        b, length, d = x_BLD.shape
        qkv = self.qkv(x_BLD).view(b, length, 3, self.heads, d // self.heads)
        q_BHLd, k_BHLd, v_BHLd = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if attn_mask_B1LL is None:
            out_BHLd = F.scaled_dot_product_attention(q_BHLd, k_BHLd, v_BHLd, is_causal=True)
        else:
            out_BHLd = F.scaled_dot_product_attention(
                q_BHLd, k_BHLd, v_BHLd, attn_mask=attn_mask_B1LL
            )
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

    def forward(self, x_BLD: Tensor, attn_mask_B1LL: Tensor | None = None) -> Tensor:
        """[B, L, D] -> [B, L, D] (``attn_mask_B1LL``: see :class:`CausalSelfAttention`)."""
        x_BLD = x_BLD + self.attn(self.ln1(x_BLD), attn_mask_B1LL)
        return x_BLD + self.fc2(self.act(self.fc1(self.ln2(x_BLD))))


class TextTransformer(nn.Module):
    """CLIP's text encoder: token + learned position embedding, causal blocks, final LayerNorm,
    features at the EOT token (it has the largest id in CLIP's vocabulary, so argmax finds it).

    ``token_drop`` > 0 (training mode only): each token between SOT and EOT is hidden from
    every other position with that probability (drawn from torch's RNG per sample), so a
    caption is sometimes seen without some of its words, e.g. without the attribute that
    alone would tell the batch's images apart. Positions are kept; eval mode never drops.
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
        token_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= token_drop < 1.0:
            raise ValueError(f"token_drop must be in [0, 1), got {token_drop}")
        self.token_drop = token_drop
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
        mask_B1LL = self.drop_mask(tokens_BL) if self.training and self.token_drop > 0 else None
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                x_BLD = checkpoint(block, x_BLD, mask_B1LL, use_reentrant=False)
            else:
                x_BLD = block(x_BLD, mask_B1LL)
        return self.ln_final(x_BLD)

    def drop_mask(self, tokens_BL: Tensor) -> Tensor:
        """Causal attention mask [B, 1, L, L] (True = may attend) hiding each token strictly
        between SOT (position 0) and EOT with probability ``token_drop``; every position
        still attends to itself."""
        b, length = tokens_BL.shape
        device = tokens_BL.device
        pos_L = torch.arange(length, device=device)
        eot_B1 = tokens_BL.argmax(dim=-1, keepdim=True)
        droppable_BL = (pos_L > 0) & (pos_L < eot_B1)
        dropped_BL = droppable_BL & (torch.rand(b, length, device=device) < self.token_drop)
        causal_LL = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        mask_BLL = causal_LL & ~dropped_BL[:, None, :]
        mask_BLL |= torch.eye(length, dtype=torch.bool, device=device)
        return mask_BLL[:, None]

    def forward(self, tokens_BL: Tensor) -> Tensor:
        """Features at each row's EOT token: [B, width]."""
        hidden_BLD = self.forward_tokens(tokens_BL)
        eot_B = tokens_BL.argmax(dim=-1)
        return hidden_BLD[torch.arange(hidden_BLD.shape[0], device=hidden_BLD.device), eot_B]
