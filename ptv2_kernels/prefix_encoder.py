"""The learned prefix of a P-Tuning v2 model (SPEC §2) as one compact buffer, and its file format.

Layouts:
- compact (what :class:`PrefixEncoder` returns and the kernels read): ``[L', 2, H, P, D]``, index 0 keys,
  1 values, one row per prefixed layer; a bank of ``T`` tasks adds a leading dimension.
- flat (the P-Tuning v2 reference's ``Embedding(P, 2·L·hidden)`` and PEFT's ``prompt_embeddings``):
  ``[P, 2·L·H·D]`` whose last dimension is ordered ``(layer, key/value, head, dim)``.
"""

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError

_METADATA_KEY = "ptv2_prefix_config"
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class PrefixConfig:
    """Everything needed to rebuild a :class:`PrefixEncoder` and to check it fits a model.

    ``layers`` are the model's layer indices that carry a prefix (sorted); row ``i`` of the compact
    buffer belongs to layer ``layers[i]``. ``num_hidden_layers`` is the model's depth.
    """

    prefix_len: int
    num_heads: int
    head_dim: int
    num_hidden_layers: int
    layers: tuple
    num_tasks: int = 1
    prefix_projection: bool = False
    prefix_hidden_size: int = 512
    prefix_dropout: float = 0.0
    model_type: str = ""

    def __post_init__(self):
        """TypeError for a value of the wrong type, ValueError for one out of range; each names its field."""
        for name in ("prefix_len", "num_heads", "head_dim", "num_hidden_layers", "num_tasks", "prefix_hidden_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be a positive int, got {value!r} ({type(value).__name__})")
            if value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(self.layers, (str, bytes)) or not hasattr(self.layers, "__iter__"):
            raise TypeError(f"layers must be a sequence of int layer indices, got {self.layers!r}")
        layers = tuple(self.layers)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise TypeError(f"layers must hold int layer indices, got {list(layers)!r}")
        if not layers or list(layers) != sorted(set(layers)) or not all(0 <= i < self.num_hidden_layers for i in layers):
            raise ValueError(f"layers must be distinct sorted layer indices in [0, {self.num_hidden_layers}), "
                             f"got {list(layers)}")
        object.__setattr__(self, "layers", layers)
        for name in ("prefix_projection",):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.prefix_dropout, (int, float)) or isinstance(self.prefix_dropout, bool):
            raise TypeError(f"prefix_dropout must be a float in [0, 1), got {self.prefix_dropout!r}")
        if not 0.0 <= self.prefix_dropout < 1.0:
            raise ValueError(f"prefix_dropout must be a float in [0, 1), got {self.prefix_dropout!r}")
        if not isinstance(self.model_type, str):
            raise TypeError(f"model_type must be a str, got {self.model_type!r}")

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def shape(self) -> tuple:
        """Shape of the compact prefix: ``[L', 2, H, P, D]``, or ``[T, L', 2, H, P, D]`` for a bank."""
        single = (len(self.layers), 2, self.num_heads, self.prefix_len, self.head_dim)
        return single if self.num_tasks == 1 else (self.num_tasks,) + single

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "layers": list(self.layers)}

    @classmethod
    def from_dict(cls, values: dict) -> "PrefixConfig":
        return cls(**values)


def prefix_from_flat(flat: torch.Tensor, num_layers: int, num_heads: int) -> torch.Tensor:
    """Flat ``[..., P, 2·L·H·D]`` (reference / PEFT layout) to compact ``[..., L, 2, H, P, D]`` (a view)."""
    width = flat.shape[-1]
    if width % (2 * num_layers * num_heads):
        raise ValueError(f"flat prefix width {width} must be a multiple of 2 * num_layers * num_heads = "
                         f"{2 * num_layers * num_heads}")
    return flat.unflatten(-1, (num_layers, 2, num_heads, -1)).movedim(-5, -2)


def prefix_to_flat(prefix: torch.Tensor) -> torch.Tensor:
    """Compact ``[..., L, 2, H, P, D]`` to the flat ``[..., P, 2·L·H·D]`` layout (PEFT's ``prompt_embeddings``)."""
    return prefix.movedim(-2, -5).flatten(-4)


class PrefixEncoder(nn.Module):
    """The compact prefix of every prefixed layer, evaluated once per model forward.

    Plain (default): ``self.prefix``, an ``nn.Parameter`` of shape ``config.shape``, init N(0, 0.02): one
    free value per (layer, key/value, head, position, dim), the reference's ``Embedding(P, 2·L·hidden)``.
    ``prefix_projection=True``: the reference's reparameterization ``Embedding(P, hidden) → Linear(hidden,
    prefix_hidden_size) → Tanh → Linear(prefix_hidden_size, 2·L'·hidden)``; a bank gives each task its own
    ``P`` embedding rows and shares the MLP. ``config.prefix_dropout`` is applied by the attention kernel
    per batch row, never here.
    """

    def __init__(self, config: PrefixConfig):
        super().__init__()
        if not isinstance(config, PrefixConfig):
            raise TypeError(f"config must be a PrefixConfig, got {type(config).__name__}")
        self.config = config
        if config.prefix_projection:
            hidden = config.hidden_size
            self.embedding = nn.Embedding(config.num_tasks * config.prefix_len, hidden)
            self.mlp = nn.Sequential(
                nn.Linear(hidden, config.prefix_hidden_size),
                nn.Tanh(),
                nn.Linear(config.prefix_hidden_size, 2 * len(config.layers) * hidden),
            )
            for weight in (self.embedding.weight, self.mlp[0].weight, self.mlp[2].weight):
                nn.init.normal_(weight, std=0.02)
            nn.init.zeros_(self.mlp[0].bias)
            nn.init.zeros_(self.mlp[2].bias)
        else:
            self.prefix = nn.Parameter(torch.empty(config.shape).normal_(std=0.02))

    def forward(self) -> torch.Tensor:
        """The compact prefix ``[L', 2, H, P, D]`` (or ``[T, L', 2, H, P, D]``) in the parameters' dtype."""
        if not self.config.prefix_projection:
            return self.prefix
        config = self.config
        flat = self.mlp(self.embedding.weight).view(config.num_tasks, config.prefix_len, -1)
        prefix = prefix_from_flat(flat, len(config.layers), config.num_heads)
        return prefix[0] if config.num_tasks == 1 else prefix

    def extra_repr(self) -> str:
        config = self.config
        return (f"prefix_len={config.prefix_len}, layers={list(config.layers)}, heads={config.num_heads}, "
                f"head_dim={config.head_dim}, num_tasks={config.num_tasks}, "
                f"projection={config.prefix_projection}, dropout={config.prefix_dropout}")


def save_prefix(encoder: PrefixEncoder, path) -> None:
    """Write ``encoder``'s weights and :class:`PrefixConfig` to one safetensors file at ``path``."""
    from safetensors.torch import save_file

    if not isinstance(encoder, PrefixEncoder):
        raise TypeError(f"encoder must be a PrefixEncoder (what patch_model returns), got {type(encoder).__name__}")
    tensors = {name: t.detach().contiguous().cpu() for name, t in encoder.state_dict().items()}
    metadata = {_METADATA_KEY: json.dumps({"format_version": _FORMAT_VERSION, **encoder.config.to_dict()})}
    save_file(tensors, str(path), metadata=metadata)


def expected_state(config: PrefixConfig) -> dict:
    """``{name: shape}`` of the state dict of a :class:`PrefixEncoder` of ``config`` (built on the meta device)."""
    with torch.device("meta"):
        return {name: tuple(t.shape) for name, t in PrefixEncoder(config).state_dict().items()}


def read_prefix_file(path) -> tuple:
    """``(PrefixConfig, {name: tensor})`` of a :func:`save_prefix` file, everything checked before it is returned:
    a readable safetensors file, valid metadata of this format version, and tensors whose names, shapes and
    (floating) dtypes are those of an encoder of the saved config. ``CheckpointError`` naming the file otherwise
    (``FileNotFoundError`` if there is none)."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise FileNotFoundError(f"no prefix file at {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:  # noqa: BLE001  (safetensors raises its own error types for a corrupt file)
        raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from None
    if _METADATA_KEY not in metadata:
        raise CheckpointError(f"{path} is not a prefix file written by save_prefix (no {_METADATA_KEY!r} metadata)")
    try:
        values = json.loads(metadata[_METADATA_KEY])
    except ValueError as error:
        raise CheckpointError(f"{path}: its {_METADATA_KEY!r} metadata is not valid JSON ({error})") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"{path}: its {_METADATA_KEY!r} metadata must be a JSON object, got "
                              f"{type(values).__name__}")
    version = values.pop("format_version", None)
    if version != _FORMAT_VERSION:
        raise CheckpointError(f"{path} has prefix format version {version!r}, this version reads {_FORMAT_VERSION}")
    fields = {f.name for f in dataclasses.fields(PrefixConfig)}
    if set(values) != fields:
        raise CheckpointError(f"{path}: its {_METADATA_KEY!r} metadata lacks {sorted(fields - set(values))} and has "
                              f"unknown fields {sorted(set(values) - fields)}")
    try:
        config = PrefixConfig.from_dict(values)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: its {_METADATA_KEY!r} metadata is not a valid PrefixConfig ({error})") from None
    expected = expected_state(config)
    if set(tensors) != set(expected):
        raise CheckpointError(f"{path}: tensors {sorted(tensors)} do not match its config, which needs "
                              f"{sorted(expected)}")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != expected[name] or not tensor.dtype.is_floating_point:
            raise CheckpointError(f"{path}: tensor {name!r} is {tensor.dtype} {list(tensor.shape)}, its config needs a "
                                  f"floating-point {list(expected[name])}")
    return config, tensors


def load_prefix(path) -> PrefixEncoder:
    """The standalone :class:`PrefixEncoder` of a :func:`save_prefix` file (checked by :func:`read_prefix_file`).
    ``ptv2_kernels.load_prefix(path, model)`` also patches a model with it."""
    config, tensors = read_prefix_file(path)
    encoder = PrefixEncoder(config)
    encoder.load_state_dict(tensors)
    return encoder
