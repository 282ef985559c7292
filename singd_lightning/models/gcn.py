"""Graph convolutional network (Kipf & Welling, "Semi-Supervised Classification with
Graph Convolutional Networks", ICLR 2017) for full-batch node classification.

A layer computes ``Â H W + b`` with the normalised adjacency ``Â = D^-1/2 (A + I)
D^-1/2`` (a sparse tensor, built by the data module). We propagate first and then
apply an ``nn.Linear`` (``(Â H) W + b``, the same product as the paper's ``Â (H W)``
plus its bias after propagation): so each layer's weight and bias are one
``nn.Linear`` that SINGD preconditions, and the statistics it collects are those of
the layer's actual input ``Â H``. The paper's model: two layers, 16 hidden units,
ReLU, dropout 0.5 before each layer.

The input is the tuple ``(features, adjacency)``: node features ``(N, F)`` and the
sparse ``(N, N)`` adjacency; the output is one row of logits per node ``(N, C)``.
The propagation runs in float32 (sparse products do not all support the reduced
precisions), and its result returns to the features' dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def propagate(adjacency: Tensor, h: Tensor) -> Tensor:
    """``adjacency @ h`` in float32 (sparse or dense ``adjacency``), in ``h``'s dtype."""
    adjacency = adjacency.to(device=h.device, dtype=torch.float32)
    out = torch.sparse.mm(adjacency, h.float()) if adjacency.is_sparse else adjacency @ h.float()
    return out.to(h.dtype)


class GCN(nn.Module):
    """Multi-layer GCN: ``dropout -> Â H -> Linear`` per layer, ReLU between layers.

    Args:
        num_classes: Number of output logits per node.
        in_chans: Number of input features per node.
        hidden_dims: Widths of the hidden layers (the paper: one of 16).
        dropout: Dropout probability before every layer (the paper: 0.5).

    Raises:
        ValueError: A width is not a positive integer or ``dropout`` is not in [0, 1).
    """

    def __init__(
        self, num_classes: int = 7, in_chans: int = 1433, hidden_dims: Sequence[int] = (16,), dropout: float = 0.5
    ) -> None:
        widths = [in_chans, *hidden_dims, num_classes]
        if any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(
                f"num_classes, in_chans and hidden_dims must be integers >= 1, got {num_classes!r}, "
                f"{in_chans!r}, {list(hidden_dims)!r}."
            )
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}.")
        super().__init__()
        self.num_classes = num_classes
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.dropout = nn.Dropout(dropout)
        for layer in self.layers:  # Glorot, as in the paper
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, graph: tuple[Tensor, Tensor]) -> Tensor:
        """Logits ``(N, num_classes)`` of the nodes of ``graph = (features, adjacency)``."""
        if not isinstance(graph, (tuple, list)) or len(graph) != 2:
            raise TypeError(
                "GCN takes the tuple (features, adjacency) of a whole graph (data=cora), "
                f"got {type(graph).__name__}."
            )
        h, adjacency = graph
        for i, layer in enumerate(self.layers):
            if i > 0:
                h = torch.relu(h)
            h = layer(propagate(adjacency, self.dropout(h)))
        return h


def gcn(num_classes: int = 7, in_chans: int = 1433, **kwargs) -> GCN:
    """The paper's two-layer GCN (16 hidden units, dropout 0.5; 23k parameters on Cora)."""
    return GCN(num_classes=num_classes, in_chans=in_chans, **kwargs)


__all__ = ["GCN", "gcn", "propagate"]
