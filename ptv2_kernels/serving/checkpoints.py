"""Task checkpoints for :class:`~ptv2_kernels.serving.PrefixServer`: every format becomes a compact prefix
``[L', 2, H, P, D]`` (plus optional head weights), checked against the server before anything is loaded.

Formats:
- a :func:`ptv2_kernels.save_prefix` file of one task (plain or with projection: evaluated once);
- a bank directory written by :func:`save_bank`: ``tasks.json`` + one ``save_prefix`` file per task (+ a
  safetensors file of its head weights when it has its own);
- a PEFT 0.21 prefix-tuning adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``
  with ``prompt_embeddings`` ``[P, 2·L·hidden]`` and, for classification, ``base_model.classifier.*``);
  BERT/RoBERTa only: PEFT refuses DeBERTa (no ``past_key_values``);
- a P-Tuning v2 reference (THUDM) prefix-encoder state dict: ``embedding.weight`` ``[P, 2·L·hidden]``, or
  with projection ``embedding.weight`` ``[P, hidden]``, ``trans.0.*``, ``trans.2.*`` (keys may carry the
  reference model's ``prefix_encoder.`` prefix; other keys of a whole model state dict are ignored).
"""

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from ..prefix_encoder import PrefixEncoder, load_prefix, prefix_from_flat, prefix_to_flat, save_prefix
from .heads import SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION

BANK_INDEX = "tasks.json"
BANK_FORMAT = "ptv2-prefix-bank"
BANK_VERSION = 1
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_TASK_TYPES = {SEQUENCE_CLASSIFICATION: "SEQ_CLS", TOKEN_CLASSIFICATION: "TOKEN_CLS"}
PEFT_MODEL_TYPES = ("bert", "roberta")
THUDM_PLAIN_KEYS = {"embedding.weight"}
THUDM_PROJECTION_KEYS = {"embedding.weight", "trans.0.weight", "trans.0.bias", "trans.2.weight", "trans.2.bias"}


@dataclass
class TaskCheckpoint:
    """One task as read from disk: compact ``prefix`` ``[L', 2, H, P, D]`` (float32) and optional ``head``
    weights (the state dict of ``server.head.module``: the ``classifier``, or DeBERTa's pooler + classifier)."""

    prefix: torch.Tensor
    head: Optional[Dict[str, torch.Tensor]] = None


def _mismatch(source, pairs: dict) -> None:
    """ValueError naming every ``name: (checkpoint, server)`` pair that differs."""
    different = {name: values for name, values in pairs.items() if values[0] != values[1]}
    if different:
        detail = ", ".join(f"{name} {ckpt!r} != {served!r}" for name, (ckpt, served) in different.items())
        raise ValueError(f"{source} does not match the server (checkpoint != server): {detail}")


def _check_full_depth(server, source) -> None:
    config = server.prefix_config
    _mismatch(source, {"prefixed layers": (list(range(config.num_hidden_layers)), list(config.layers))})


def _from_flat(server, flat: torch.Tensor, source) -> torch.Tensor:
    """Flat ``[P, 2·L·hidden]`` to compact, after checking its width against the server's model."""
    config = server.prefix_config
    if flat.dim() != 2:
        raise ValueError(f"{source}: flat prefix must be [P, 2·L·hidden], got shape {tuple(flat.shape)}")
    _mismatch(source, {"flat width 2·L·hidden": (flat.shape[1], 2 * config.num_hidden_layers * config.hidden_size),
                       "prefix_len": (flat.shape[0], config.prefix_len)})
    return prefix_from_flat(flat.float(), config.num_hidden_layers, config.num_heads).contiguous()


# ---- save_prefix files and bank directories ------------------------------------------------------------
def read_prefix_file(server, path) -> TaskCheckpoint:
    """A one-task :func:`~ptv2_kernels.save_prefix` file, checked against the server's bank."""
    try:
        encoder = load_prefix(path)
    except Exception as error:  # noqa: BLE001  (corrupt file, missing keys, bad metadata)
        raise ValueError(f"cannot read the prefix file {path}: {error}") from None
    config, served = encoder.config, server.prefix_config
    fields = ("prefix_len", "num_heads", "head_dim", "num_hidden_layers", "layers", "model_type")
    _mismatch(path, {name: (getattr(config, name), getattr(served, name)) for name in fields
                     if name != "model_type" or config.model_type})
    if config.num_tasks != 1:
        raise ValueError(f"{path} holds a bank of {config.num_tasks} tasks; a task file holds one")
    with torch.no_grad():
        return TaskCheckpoint(encoder().float())


def save_bank(server, directory) -> None:
    """Write every task of ``server`` to ``directory``: ``tasks.json`` and per task a ``save_prefix``
    file (and its head weights, if it has its own)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = dataclasses.replace(server.prefix_config, num_tasks=1)
    entries = []
    for index, name in enumerate(server.tasks()):
        stem = f"task-{index:03d}"
        encoder = PrefixEncoder(config)
        with torch.no_grad():
            encoder.prefix.copy_(server.task_prefix(name))
        save_prefix(encoder, directory / f"{stem}.safetensors")
        head = server.task_head(name)
        if head is not None:
            save_file({k: v.detach().float().cpu().contiguous() for k, v in head.items()},
                      str(directory / f"{stem}.head.safetensors"))
        entries.append({"name": name, "prefix": f"{stem}.safetensors",
                        "head": None if head is None else f"{stem}.head.safetensors"})
    index = {"format": BANK_FORMAT, "version": BANK_VERSION, "tasks": entries}
    (directory / BANK_INDEX).write_text(json.dumps(index, indent=2))


def read_bank(server, directory) -> Dict[str, TaskCheckpoint]:
    """Every task of a :func:`save_bank` directory, checked against the server (nothing is loaded)."""
    directory = Path(directory)
    try:
        index = json.loads((directory / BANK_INDEX).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{directory} is not a prefix bank directory: cannot read {BANK_INDEX} ({error})") from None
    if not isinstance(index, dict) or index.get("format") != BANK_FORMAT or index.get("version") != BANK_VERSION:
        raise ValueError(f"{directory / BANK_INDEX} is not a {BANK_FORMAT} version {BANK_VERSION} index")
    tasks = {}
    for entry in index.get("tasks", []):
        name = entry["name"]
        if name in tasks:
            raise ValueError(f"{directory / BANK_INDEX} lists task {name!r} twice")
        checkpoint = read_prefix_file(server, directory / entry["prefix"])
        if entry.get("head"):
            checkpoint.head = _load_state_file(directory / entry["head"])
        tasks[name] = checkpoint
    return tasks


# ---- PEFT adapters --------------------------------------------------------------------------------------
def _check_peft_model(server, source) -> None:
    model_type = server.model.config.model_type
    if model_type not in PEFT_MODEL_TYPES:
        raise ValueError(f"{source}: PEFT prefix tuning runs {PEFT_MODEL_TYPES} models only (PEFT refuses "
                         f"{model_type!r}); use a save_prefix file, a bank or a P-Tuning v2 state dict")


def read_peft_adapter(server, directory) -> TaskCheckpoint:
    """A PEFT prefix-tuning adapter directory (``prompt_embeddings`` and classifier weights, if any)."""
    directory = Path(directory)
    _check_peft_model(server, directory)
    try:
        config = json.loads((directory / PEFT_CONFIG).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{directory} is not a PEFT adapter: cannot read {PEFT_CONFIG} ({error})") from None
    if config.get("peft_type") != "PREFIX_TUNING":
        raise ValueError(f"{directory} is a PEFT {config.get('peft_type')} adapter, not PREFIX_TUNING")
    served, kind = server.prefix_config, server.head.kind
    task_type = config.get("task_type")
    if task_type not in (None, "FEATURE_EXTRACTION", *PEFT_TASK_TYPES.values()):
        raise ValueError(f"{directory}: PEFT task_type {task_type!r} is not served (SEQ_CLS, TOKEN_CLS, "
                         "FEATURE_EXTRACTION)")
    pairs = {"num_layers": (config.get("num_layers"), served.num_hidden_layers),
             "num_attention_heads": (config.get("num_attention_heads"), served.num_heads),
             "token_dim": (config.get("token_dim"), served.hidden_size),
             "num_virtual_tokens": (config.get("num_virtual_tokens"), served.prefix_len),
             "num_transformer_submodules": (config.get("num_transformer_submodules", 1), 1)}
    if task_type in PEFT_TASK_TYPES.values():  # a classification adapter needs the same kind of head
        pairs["task_type"] = (task_type, PEFT_TASK_TYPES.get(kind))
    _mismatch(directory, pairs)
    _check_full_depth(server, directory)
    weights = _load_state_file(directory / PEFT_WEIGHTS)
    if "prompt_embeddings" not in weights:
        raise ValueError(f"{directory / PEFT_WEIGHTS} has no 'prompt_embeddings' (keys: {sorted(weights)})")
    head_prefix = f"base_model.{server.head.module_name}."
    head = {k[len(head_prefix):]: v for k, v in weights.items()
            if server.head.module_name and k.startswith(head_prefix)}
    unexpected = sorted(set(weights) - {"prompt_embeddings"} - {head_prefix + k for k in head})
    if unexpected:
        raise ValueError(f"{directory / PEFT_WEIGHTS} has keys this server cannot use: {unexpected}")
    return TaskCheckpoint(_from_flat(server, weights["prompt_embeddings"], directory), head or None)


def write_peft_adapter(server, task: str, directory) -> None:
    """Export ``task`` as a PEFT 0.21 prefix-tuning adapter that ``PeftModel.from_pretrained`` loads on the
    server's (unpatched) model with identical outputs. Classification models get the task's effective
    classifier (its own or the model's) in ``modules_to_save``."""
    from safetensors.torch import save_file

    served = server.prefix_config
    _check_peft_model(server, f"PEFT export of task {task!r}")
    _check_full_depth(server, f"PEFT export of task {task!r}")
    weights = {"prompt_embeddings": prefix_to_flat(server.task_prefix(task).float())}
    head_name = server.head.module_name
    if head_name is not None:
        head = server.task_head(task) or server.head.module.state_dict()
        weights.update({f"base_model.{head_name}.{k}": v for k, v in head.items()})
    config = {
        "peft_type": "PREFIX_TUNING", "task_type": PEFT_TASK_TYPES.get(server.head.kind, "FEATURE_EXTRACTION"),
        "num_virtual_tokens": served.prefix_len, "num_layers": served.num_hidden_layers,
        "num_attention_heads": served.num_heads, "token_dim": served.hidden_size,
        "encoder_hidden_size": served.hidden_size, "num_transformer_submodules": 1, "prefix_projection": False,
        "inference_mode": True, "modules_to_save": None if head_name is None else [head_name],
        "base_model_name_or_path": getattr(server.model.config, "_name_or_path", None) or None, "revision": None,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in weights.items()}, str(directory / PEFT_WEIGHTS))
    (directory / PEFT_CONFIG).write_text(json.dumps(config, indent=2))


# ---- P-Tuning v2 reference (THUDM) state dicts --------------------------------------------------------
def read_thudm_state_dict(server, state: Union[dict, str, Path]) -> TaskCheckpoint:
    """The reference's ``PrefixEncoder`` weights (a dict, or a ``.safetensors``/``.bin``/``.pt`` file);
    with projection the MLP is evaluated once and only the compact buffer is kept."""
    source = state if not isinstance(state, dict) else "THUDM state dict"
    if not isinstance(state, dict):
        state = _load_state_file(Path(state))
    if any(k.startswith("prefix_encoder.") for k in state):
        state = {k[len("prefix_encoder."):]: v for k, v in state.items() if k.startswith("prefix_encoder.")}
    keys = set(state)
    if keys == THUDM_PLAIN_KEYS:
        flat = state["embedding.weight"]
    elif keys == THUDM_PROJECTION_KEYS:
        embedding = state["embedding.weight"].float()
        _mismatch(source, {"embedding width (hidden)": (embedding.shape[-1], server.prefix_config.hidden_size)})
        try:
            hidden = torch.tanh(embedding @ state["trans.0.weight"].float().T + state["trans.0.bias"].float())
            flat = hidden @ state["trans.2.weight"].float().T + state["trans.2.bias"].float()
        except RuntimeError as error:
            raise ValueError(f"{source}: the projection weights trans.0/trans.2 do not chain ({error})") from None
    else:
        wanted = THUDM_PROJECTION_KEYS if keys & {"trans.0.weight", "trans.2.weight"} else THUDM_PLAIN_KEYS
        raise ValueError(f"{source}: expected a P-Tuning v2 prefix encoder state dict with keys "
                         f"{sorted(THUDM_PLAIN_KEYS)} or {sorted(THUDM_PROJECTION_KEYS)}; missing "
                         f"{sorted(wanted - keys)}, unexpected {sorted(keys - wanted)}")
    _check_full_depth(server, source)
    return TaskCheckpoint(_from_flat(server, flat, source))


def _load_state_file(path: Path) -> dict:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001  (torch/safetensors raise many types for a corrupt file)
        raise ValueError(f"cannot read the state dict file {path}: {error}") from None


# ---- one entry point ------------------------------------------------------------------------------------
def read_task(server, source) -> TaskCheckpoint:
    """Read one task in any format above (detected from ``source``), checked against ``server``."""
    if isinstance(source, dict):
        return read_thudm_state_dict(server, source)
    path = Path(source)
    if path.is_dir():
        if (path / PEFT_CONFIG).exists():
            return read_peft_adapter(server, path)
        if (path / BANK_INDEX).exists():
            raise ValueError(f"{path} is a bank of tasks; load it with load_bank")
        raise ValueError(f"{path} is a directory without {PEFT_CONFIG} or {BANK_INDEX}")
    if not path.exists():
        raise FileNotFoundError(f"no task checkpoint at {path}")
    if path.suffix == ".safetensors" and _has_prefix_metadata(path):
        return read_prefix_file(server, path)
    return read_thudm_state_dict(server, path)


def _has_prefix_metadata(path: Path) -> bool:
    from safetensors import safe_open

    from ..prefix_encoder import _METADATA_KEY

    try:
        with safe_open(str(path), framework="pt") as handle:
            return _METADATA_KEY in (handle.metadata() or {})
    except Exception as error:  # noqa: BLE001
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from None


def load_task(server, name: str, source, *, replace: bool = False) -> None:
    """Read ``source`` (see :func:`read_task`) and serve it as task ``name``."""
    checkpoint = read_task(server, source)
    server.add_task(name, checkpoint.prefix, checkpoint.head, replace=replace)


def load_bank(server, directory, *, replace: bool = False) -> list:
    """Serve every task of a :func:`save_bank` directory; all are read and checked before the first is
    added (:meth:`PrefixServer.add_tasks`), so a bad bank loads nothing. Returns the task names."""
    tasks = read_bank(server, directory)
    server.add_tasks({name: (c.prefix, c.head) for name, c in tasks.items()}, replace=replace)
    return list(tasks)
