import torch

from sit_core import ReverseTokenSlimming, TokenSlimming


def test_tsm_outputs_are_convex_combinations_of_inputs():
    # Feeding the identity as the token matrix makes the output equal to the aggregation
    # weights themselves: every output row must be non-negative and sum to 1.
    torch.manual_seed(0)
    n, n_out = 16, 5
    tsm = TokenSlimming(dim=n, in_tokens=n, out_tokens=n_out)
    with torch.no_grad():
        tsm.score[1].weight.normal_(std=1.0)  # far from the near-uniform init, so the test means something
        tsm.score[3].weight.normal_(std=1.0)
    eye = torch.eye(n).unsqueeze(0)  # (1, N, C=N)
    out = tsm(eye)  # (1, N', N)
    assert out.shape == (1, n_out, n)
    assert (out >= 0).all()
    torch.testing.assert_close(out.sum(-1), torch.ones(1, n_out))
    torch.testing.assert_close(out, tsm.weights(eye).transpose(1, 2))
    assert out.std() > 0.01  # not the uniform average


def test_tsm_softmax_runs_over_input_tokens():
    tsm = TokenSlimming(dim=8, in_tokens=10, out_tokens=4)
    w = tsm.weights(torch.randn(3, 10, 8))
    torch.testing.assert_close(w.sum(dim=1), torch.ones(3, 4))  # per output slot, over inputs


def test_tsm_is_static_shape_matmuls_only():
    tsm = TokenSlimming(dim=8, in_tokens=10, out_tokens=4)
    graph = torch.fx.symbolic_trace(tsm).graph
    ops = {str(n.target) for n in graph.nodes}
    assert not any(name in op for op in ops for name in ("sort", "topk", "gather", "argsort"))


def test_rtsm_maps_back_to_full_token_count_with_spec_layers():
    r = ReverseTokenSlimming(dim=12, in_tokens=5, out_tokens=20)
    assert r(torch.randn(2, 5, 12)).shape == (2, 20, 12)
    assert r.token_mlp.fc1.in_features == 5 and r.token_mlp.fc1.out_features == 4 * 20
    assert r.token_mlp.fc2.out_features == 20
    assert r.channel_mlp.fc1.out_features == 4 * 12


def test_tsm_and_rtsm_init_like_the_official_code():
    """Linear weights trunc_normal(std 0.02) (timm cuts at +-2, i.e. +-100 std: effectively normal), biases zero."""
    torch.manual_seed(0)
    for module in (TokenSlimming(dim=256, in_tokens=196, out_tokens=98), ReverseTokenSlimming(dim=256, in_tokens=98, out_tokens=196)):
        linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
        assert len(linears) == (2 if isinstance(module, TokenSlimming) else 4)
        for lin in linears:
            assert abs(lin.weight.std().item() - 0.02) < 0.002
            assert torch.count_nonzero(lin.bias) == 0
    assert TokenSlimming(dim=8, in_tokens=4, out_tokens=2).scale.item() == 1.0
