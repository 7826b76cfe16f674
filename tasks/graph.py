"""``sbm-graph``: an attributed stochastic-block-model graph, one community per node.

FED-PUB's setting (Baek et al., "Personalized Subgraph Federated Learning",
ICML 2023, https://arxiv.org/abs/2206.10206) generated offline, since Cora and
the other Planetoid graphs cannot be downloaded here:

- ``networkx.random_partition_graph``: ``k = num-partitions`` communities of
  250 nodes, intra-community edge probability 0.05, inter-community 0.002;
- 7 classes; community ``c`` draws its labels from its own mix
  ``pi_c ~ Dir(dirichlet-alpha)`` (0.3 by default: communities differ);
- 64 features: ``x = mu_y + o_c + noise``, the class mean ``mu_y ~ N(0, I)``,
  a community offset ``o_c ~ N(0, I)`` and noise ``N(0, 3^2 I)``.

The partition is the subgraph one (``partitioner = "natural-id"``): client
``c`` holds community ``c`` and edges between communities are dropped, as
in the paper's disjoint setting. Each community is a separate graph for
message passing.

Rows are nodes, so the data pipeline, every algorithm and every loop work
unchanged (mini-batches, hold-outs, fine-tuning). A row carries what a
2-layer GCN needs to classify its node exactly, the node's one-hop
computation tree: ``SLOTS`` slots, slot 0 the node itself, then its
neighbours; slot ``s`` holds ``(A_vu, (A X)_u)`` with
``A = D^-1/2 (A + I) D^-1/2`` of the community's subgraph (padding: zeros).
Since the first GCN layer is linear before its ReLU, ``(A X)_u W1`` is its
output at ``u``, and the second layer sums the neighbours' hidden states
with the weights ``A_vu``: :class:`GCN` is Kipf and Welling's
``A relu(A X W1 + b1) W2 + b2`` row by row.

Why plain torch and not torch_geometric: PyG and its compiled companions
(torch_scatter/torch_sparse, which the official code needs) are hundreds of
MB of wheels pinned to a torch build, and on a CPU a 250-node subgraph is
faster as one dense batched product than as scatter kernels. Deviation:
dropout on the hidden states is drawn per row, where a full-graph step
shares one draw across the rows that read the same neighbour.

FED-PUB's proxy graph (:func:`proxy_rows`) is encoded the same way.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn
from torch.nn import functional

NAME = "sbm-graph"
COMMUNITY_SIZE = 250
P_IN = 0.05
P_OUT = 0.002
NUM_CLASSES = 7
FEATURES = 64
NOISE_STD = 3.0
SLOTS = 40
"""Slots per row: the node and up to 39 neighbours. At ``P_IN`` on 250 nodes
the degree is Binomial(249, 0.05) (mean 12.5); 39 or more has probability
below 1e-9 per node, and the generator refuses a graph that needs more."""
INPUT_SHAPE = (SLOTS, 1 + FEATURES)

PROXY_SIZE = 100
PROXY_P = 0.1
"""FED-PUB's proxy graph: ``n-proxy`` blocks of 100 nodes, p_in 0.1, no
edges between blocks (official code)."""


def sbm_graph(
    num_communities: int, label_alpha: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The attributed SBM: ``(features, labels, community, edges)``.

    Returns
    -------
    features : ndarray, float32, shape (N, 64)
    labels : ndarray, int64, shape (N,)
    community : ndarray, int64, shape (N,)
        Node ``i``'s block (nodes are numbered block after block).
    edges : ndarray, int64, shape (E, 2)
        Undirected edges ``(u, v)``, ``u < v``, sorted, between communities too.

    """
    import networkx as nx

    graph = nx.random_partition_graph(
        [COMMUNITY_SIZE] * num_communities, P_IN, P_OUT, seed=int(seed)
    )
    n = graph.number_of_nodes()
    community = np.repeat(np.arange(num_communities, dtype=np.int64), COMMUNITY_SIZE)
    rng = np.random.default_rng([int(seed), 19])
    class_means = rng.normal(0.0, 1.0, (NUM_CLASSES, FEATURES))
    offsets = rng.normal(0.0, 1.0, (num_communities, FEATURES))
    mixes = rng.dirichlet(np.full(NUM_CLASSES, float(label_alpha)), num_communities)
    labels = np.concatenate(
        [rng.choice(NUM_CLASSES, COMMUNITY_SIZE, p=mix) for mix in mixes]
    ).astype(np.int64)
    noise = rng.normal(0.0, NOISE_STD, (n, FEATURES))
    features = (class_means[labels] + offsets[community] + noise).astype(np.float32)
    edges = np.array(sorted(tuple(sorted(e)) for e in graph.edges()), dtype=np.int64)
    return features, labels, community, edges.reshape(-1, 2)


def normalized_adjacency(num_nodes: int, edges: np.ndarray) -> np.ndarray:
    """``D^-1/2 (A + I) D^-1/2`` (dense, float64) of an undirected edge list."""
    a = np.eye(num_nodes)
    if len(edges):
        a[edges[:, 0], edges[:, 1]] = 1.0
        a[edges[:, 1], edges[:, 0]] = 1.0
    scale = 1.0 / np.sqrt(a.sum(axis=1))
    return a * scale[:, None] * scale[None, :]


def computation_rows(
    features: np.ndarray, edges: np.ndarray, slots: int = SLOTS
) -> np.ndarray:
    """Every node's one-hop computation tree, shape ``(N, slots, 1 + F)``.

    Slot 0 is the node, then its neighbours in index order; a slot holds
    ``(A_vu, (A X)_u)``. ``edges`` index ``features``' rows (one graph).
    """
    n = len(features)
    norm = normalized_adjacency(n, edges)
    propagated = norm @ features.astype(np.float64)
    rows = np.zeros((n, slots, 1 + features.shape[1]), np.float32)
    for v in range(n):
        neighbours = np.flatnonzero(norm[v])
        order = np.concatenate([[v], neighbours[neighbours != v]])
        if len(order) > slots:
            raise ValueError(
                f"node {v} has {len(order) - 1} neighbours; a row holds {slots - 1}"
            )
        rows[v, : len(order), 0] = norm[v, order]
        rows[v, : len(order), 1:] = propagated[order]
    return rows


def sbm_rows(
    num_communities: int, label_alpha: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(rows, labels, community)``: the graph's nodes, each community apart."""
    features, labels, community, edges = sbm_graph(num_communities, label_alpha, seed)
    rows = np.zeros((len(features), *INPUT_SHAPE), np.float32)
    inside = community[edges[:, 0]] == community[edges[:, 1]]
    for c in range(num_communities):
        nodes = np.flatnonzero(community == c)
        own = edges[inside & (community[edges[:, 0]] == c)] - nodes[0]
        rows[nodes] = computation_rows(features[nodes], own)
    return rows, labels, community


@functools.lru_cache(maxsize=4)
def proxy_rows(num_blocks: int, num_features: int, seed: int) -> np.ndarray:
    """FED-PUB's shared random graph, encoded as :func:`computation_rows`.

    ``num_blocks`` blocks of 100 nodes, p_in 0.1, no edges between blocks,
    features ``N(0, 1)``: the same on every node for the same arguments.
    Remembered per process (0.4 s to build, asked for on every train
    message) and read-only.
    """
    import networkx as nx

    graph = nx.random_partition_graph(
        [PROXY_SIZE] * num_blocks, PROXY_P, 0.0, seed=int(seed)
    )
    edges = np.array(sorted(tuple(sorted(e)) for e in graph.edges()), dtype=np.int64)
    features = np.random.default_rng([int(seed), 7]).normal(
        0.0, 1.0, (graph.number_of_nodes(), num_features)
    )
    rows = computation_rows(features, edges.reshape(-1, 2))
    rows.flags.writeable = False
    return rows


class GCN(nn.Module):
    """Two GCN layers and a linear classifier over :func:`computation_rows`.

    ``relu(GCN1) -> dropout -> GCN2 -> relu -> dropout -> Linear`` (the
    official FED-PUB network, hidden size 128, dropout 0.5). ``conv1``,
    ``conv2`` and ``clsif`` are ``nn.Linear`` so any wrapper over linear
    layers (FED-PUB's masks) applies. GCN weights start Glorot-uniform, biases
    zero (PyG's ``GCNConv``).
    """

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        hidden: int = 128,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Linear(num_features, hidden)
        self.conv2 = nn.Linear(hidden, hidden)
        self.clsif = nn.Linear(hidden, num_classes)
        self.dropout = dropout
        for conv in (self.conv1, self.conv2):
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)

    def embed(self, rows: torch.Tensor) -> torch.Tensor:
        """The second GCN layer's output before its ReLU, one row per node."""
        weights, propagated = rows[..., :1], rows[..., 1:]
        hidden = functional.relu(self.conv1(propagated))
        hidden = functional.dropout(hidden, self.dropout, self.training)
        return self.conv2((weights * hidden).sum(dim=-2))

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        hidden = functional.relu(self.embed(rows))
        hidden = functional.dropout(hidden, self.dropout, self.training)
        return self.clsif(hidden)


def build_gcn(input_shape: tuple[int, ...], num_classes: int) -> GCN:
    """The GCN for rows of shape ``(slots, 1 + F)``."""
    if len(input_shape) != 2 or input_shape[1] < 2:
        raise ValueError(
            f"gcn needs graph rows (slots, 1 + features) such as dataset "
            f"'{NAME}' gives, got inputs of shape {input_shape}"
        )
    return GCN(input_shape[1] - 1, num_classes)
