"""Self-supervised heads on the vision tower's pooled output: SimCLR and BYOL MLPs."""

from __future__ import annotations

from torch import nn


def mlp(in_dim: int, hidden_dims: list[int], out_dim: int) -> nn.Sequential:
    """Linear -> BatchNorm1d -> ReLU for each hidden width, then a final Linear (no BN after).

    The Linear layers before a BatchNorm have no bias: BN removes it, so its true gradient is zero
    and Adam would turn the rounding noise in that gradient into full-size random steps (which
    then leak into the EMA teacher through the BN running mean).
    """
    layers: list[nn.Module] = []
    dim = in_dim
    for hidden in hidden_dims:
        layers += [
            nn.Linear(dim, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
        ]
        dim = hidden
    layers.append(nn.Linear(dim, out_dim))
    return nn.Sequential(*layers)


def simclr_head(in_dim: int, hidden: int = 4096, out: int = 256) -> nn.Sequential:
    """SimCLR projection head: in -> hidden -> hidden -> out (SLIP / A-CLIP: 4096-4096-256)."""
    return mlp(in_dim, [hidden, hidden], out)


def byol_projector(in_dim: int, hidden: int = 4096, out: int = 256) -> nn.Sequential:
    """BYOL projector: in -> hidden -> out (4096-256)."""
    return mlp(in_dim, [hidden], out)


def byol_predictor(dim: int = 256, hidden: int = 4096) -> nn.Sequential:
    """BYOL predictor: dim -> hidden -> dim (4096-256)."""
    return mlp(dim, [hidden], dim)
