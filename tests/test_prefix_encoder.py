"""PrefixEncoder and its file format: shapes, init, the reparameterization, flat layout, state_dict and
safetensors round trips, bad configurations."""

import pytest
import torch

from ptv2_kernels import PrefixConfig, PrefixEncoder, load_prefix, save_prefix
from ptv2_kernels.prefix_encoder import prefix_from_flat, prefix_to_flat


def make_config(**overrides):
    values = dict(prefix_len=5, num_heads=2, head_dim=8, num_hidden_layers=3, layers=(0, 2))
    values.update(overrides)
    return PrefixConfig(**values)


@pytest.mark.parametrize("num_tasks", [1, 3])
@pytest.mark.parametrize("projection", [False, True])
def test_shapes(num_tasks, projection):
    encoder = PrefixEncoder(make_config(num_tasks=num_tasks, prefix_projection=projection, prefix_hidden_size=12))
    single = (2, 2, 2, 5, 8)
    expected = single if num_tasks == 1 else (num_tasks,) + single
    assert encoder().shape == expected == encoder.config.shape
    if not projection:
        assert encoder() is encoder.prefix and isinstance(encoder.prefix, torch.nn.Parameter)


def test_plain_init_is_normal_002():
    torch.manual_seed(0)
    prefix = PrefixEncoder(make_config(prefix_len=64, head_dim=64)).prefix
    assert abs(prefix.std().item() - 0.02) < 1e-3 and abs(prefix.mean().item()) < 1e-3


def test_projection_is_the_reference_mlp():
    """Embedding(P, hidden) → Linear → Tanh → Linear(…, 2·L'·hidden), reshaped as the reference splits its
    past_key_values: view(P, 2L, H, D).permute(2, 0, 3, 1, 4) → pairs (key, value) per layer."""
    config = make_config(prefix_projection=True, prefix_hidden_size=12)
    encoder = PrefixEncoder(config)
    assert torch.count_nonzero(encoder.mlp[0].bias) == 0 and torch.count_nonzero(encoder.mlp[2].bias) == 0
    with torch.no_grad():
        for p in encoder.parameters():
            p.normal_()
    flat = encoder.mlp[2](torch.tanh(encoder.mlp[0](encoder.embedding.weight)))
    reference = flat.view(5, 4, 2, 8).permute(1, 2, 0, 3).unflatten(0, (2, 2))  # [L', 2, H, P, D]
    torch.testing.assert_close(encoder(), reference)
    encoder().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())


def test_bank_projection_gives_each_task_its_embedding_rows():
    encoder = PrefixEncoder(make_config(prefix_projection=True, prefix_hidden_size=12, num_tasks=2))
    bank = encoder()
    with torch.no_grad():
        encoder.embedding.weight[5:].normal_()
    changed = encoder()
    assert torch.equal(changed[0], bank[0]) and not torch.equal(changed[1], bank[1])


def test_flat_roundtrip():
    compact = torch.randn(3, 2, 4, 5, 8)
    flat = prefix_to_flat(compact)
    assert flat.shape == (5, 3 * 2 * 4 * 8)
    assert torch.equal(prefix_from_flat(flat, 3, 4), compact)
    with pytest.raises(ValueError, match="multiple of"):
        prefix_from_flat(torch.randn(5, 30), 3, 4)


@pytest.mark.parametrize("projection", [False, True])
def test_state_dict_and_file_roundtrip(tmp_path, projection):
    config = make_config(prefix_projection=projection, prefix_hidden_size=12, num_tasks=2, prefix_dropout=0.1,
                         model_type="bert")
    encoder = PrefixEncoder(config)
    copy = PrefixEncoder(config)
    copy.load_state_dict(encoder.state_dict())
    assert torch.equal(copy(), encoder())
    path = tmp_path / "prefix.safetensors"
    save_prefix(encoder, path)
    loaded = load_prefix(path)
    assert loaded.config == config
    assert torch.equal(loaded(), encoder())


def test_file_errors(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not a prefix file"):
        load_prefix(path)
    with pytest.raises(TypeError, match="PrefixEncoder"):
        save_prefix(torch.nn.Linear(2, 2), tmp_path / "x.safetensors")


@pytest.mark.parametrize("overrides,exception,error", [
    ({"prefix_len": 0}, ValueError, "prefix_len"), ({"num_heads": 2.0}, TypeError, "num_heads"),
    ({"num_tasks": True}, TypeError, "num_tasks"), ({"layers": ()}, ValueError, "layers"),
    ({"layers": (2, 0)}, ValueError, "layers"), ({"layers": (0, 3)}, ValueError, "layers"),
    ({"layers": (0.0, 1)}, TypeError, "layers"), ({"prefix_dropout": -0.1}, ValueError, "prefix_dropout"),
    ({"prefix_dropout": "0.1"}, TypeError, "prefix_dropout"),
    ({"prefix_projection": 1}, TypeError, "prefix_projection"),
])
def test_bad_config(overrides, exception, error):
    with pytest.raises(exception, match=error):
        make_config(**overrides)
    with pytest.raises(TypeError, match="PrefixConfig"):
        PrefixEncoder({"prefix_len": 5})
