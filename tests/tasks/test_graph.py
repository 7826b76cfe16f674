"""sbm-graph: the generator, the row encoding, the plain-torch GCN, the masks."""

import numpy as np
import pytest
import torch

from bouquet.tasks import DataSpec, build_model, dataset_info, graph, load_client_data
from bouquet.tasks.masked import MaskedLinear, masked_layers


def test_the_generator_is_deterministic_with_communities_and_their_density():
    # Prepare / Execute
    x, y, community, edges = graph.sbm_graph(3, 0.3, seed=5)
    again = graph.sbm_graph(3, 0.3, seed=5)
    other = graph.sbm_graph(3, 0.3, seed=6)
    # Assert: same seed, same graph; another seed, another graph
    for a, b in zip((x, y, community, edges), again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(edges, other[3])
    n = 3 * graph.COMMUNITY_SIZE
    assert x.shape == (n, graph.FEATURES) and x.dtype == np.float32
    assert np.array_equal(np.bincount(community), [graph.COMMUNITY_SIZE] * 3)
    assert 0 <= y.min() and y.max() < graph.NUM_CLASSES
    # Edge density inside and between communities: p_in 0.05, p_out 0.002
    inside = community[edges[:, 0]] == community[edges[:, 1]]
    pairs_in = 3 * graph.COMMUNITY_SIZE * (graph.COMMUNITY_SIZE - 1) / 2
    pairs_out = 3 * graph.COMMUNITY_SIZE**2
    assert inside.sum() / pairs_in == pytest.approx(graph.P_IN, rel=0.1)
    assert (~inside).sum() / pairs_out == pytest.approx(graph.P_OUT, rel=0.3)
    # Dir(0.3) label mixes: communities' label histograms differ
    hist = np.stack([np.bincount(y[community == c], minlength=7) for c in range(3)])
    assert np.abs(hist[0] - hist[1]).sum() > 50


def test_a_row_is_the_node_and_its_neighbours_with_normalised_weights():
    # Path 0 - 1 - 2: degrees with self-loops (2, 3, 2)
    x = np.array([[1.0], [2.0], [4.0]])
    edges = np.array([[0, 1], [1, 2]])
    rows = graph.computation_rows(x, edges, slots=3)
    a = graph.normalized_adjacency(3, edges)
    np.testing.assert_allclose(a[0, :2], [1 / 2, 1 / np.sqrt(6)])
    # node 1: itself, then 0 and 2
    np.testing.assert_allclose(rows[1, :, 0], [1 / 3, 1 / np.sqrt(6), 1 / np.sqrt(6)])
    np.testing.assert_allclose(rows[1, :, 1], (a @ x)[[1, 0, 2], 0], rtol=1e-6)
    # node 0 has one neighbour: the third slot is padding
    np.testing.assert_array_equal(rows[0, 2], [0.0, 0.0])
    with pytest.raises(ValueError, match="neighbours"):
        graph.computation_rows(x, edges, slots=2)


def test_the_gcn_on_three_nodes_is_the_dense_formula():
    # Prepare: a triangle-less path, 2 features, hidden 4, 3 classes
    x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    edges = np.array([[0, 1], [1, 2]])
    rows = torch.tensor(graph.computation_rows(x, edges, slots=3), dtype=torch.float32)
    torch.manual_seed(0)
    model = graph.GCN(2, 3, hidden=4).eval()
    a = torch.tensor(graph.normalized_adjacency(3, edges), dtype=torch.float32)
    xt = torch.tensor(x, dtype=torch.float32)
    # Execute
    logits = model(rows)
    # Assert: Kipf & Welling, A relu(A X W1 + b1) W2 + b2, then relu, Linear
    h = torch.relu(a @ xt @ model.conv1.weight.T + model.conv1.bias)
    z = a @ h @ model.conv2.weight.T + model.conv2.bias
    want = torch.relu(z) @ model.clsif.weight.T + model.clsif.bias
    torch.testing.assert_close(model.embed(rows), z)
    torch.testing.assert_close(logits, want)


def test_the_proxy_graph_is_the_same_everywhere():
    a = graph.proxy_rows(2, 3, seed=1)
    np.testing.assert_array_equal(a, graph.proxy_rows(2, 3, seed=1))
    assert a.shape == (200, graph.SLOTS, 4)
    assert not np.array_equal(a, graph.proxy_rows(2, 3, seed=2))


def test_masked_linear_prunes_small_mask_entries_in_eval_only():
    layer = MaskedLinear(torch.nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[2.0, 3.0]]))
        layer.mask.copy_(torch.tensor([[0.5, 1e-4]]))
        layer.prune_below.fill_(1e-3)
    x = torch.tensor([[1.0, 1.0]])
    assert layer(x).item() == pytest.approx(1.0 + 3e-4)  # train: dense mask
    assert layer.eval()(x).item() == pytest.approx(1.0)  # eval: 1e-4 pruned


def test_sbm_graph_loads_one_community_per_node_for_any_model(tmp_path, monkeypatch):
    monkeypatch.setenv("BOUQUET_CACHE_DIR", str(tmp_path))
    spec = DataSpec(dataset="sbm-graph", partitioner="natural-id", num_partitions=2)
    info = dataset_info(spec)
    assert info.input_shape == graph.INPUT_SHAPE and info.num_classes == 7
    data = load_client_data(spec, 1)
    # 250 nodes, 20% held out centrally, 20% of the rest the node's test split
    assert len(data.train_y) + len(data.test_y) == 200
    assert tuple(data.train_x.shape[1:]) == graph.INPUT_SHAPE
    for name in ("gcn", "mlp"):
        model = build_model(name, info, wrapper="masked")
        assert len(masked_layers(model)) == 3
        assert model(data.train_x[:4]).shape == (4, 7)
    with pytest.raises(ValueError, match="graph rows"):
        build_model("gcn", dataset_info(DataSpec()))
