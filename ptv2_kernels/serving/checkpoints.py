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

from .. import peft_adapter
from ..prefix_encoder import PrefixEncoder, load_prefix, prefix_from_flat, save_prefix
from .heads import SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION

BANK_INDEX = "tasks.json"
BANK_FORMAT = "ptv2-prefix-bank"
BANK_VERSION = 1
PEFT_CONFIG = peft_adapter.ADAPTER_CONFIG
PEFT_TASK_TYPES = {SEQUENCE_CLASSIFICATION: "SEQ_CLS", TOKEN_CLASSIFICATION: "TOKEN_CLS"}
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


# ---- PEFT adapters (the format lives in ptv2_kernels.peft_adapter) -------------------------------------------
def read_peft_adapter(server, directory) -> TaskCheckpoint:
    """A PEFT prefix-tuning adapter directory (``prompt_embeddings`` and classifier weights, if any), checked
    against the server: BERT/RoBERTa, its depth, heads, width, P and kind of head."""
    served = server.prefix_config
    adapter = peft_adapter.read_adapter(
        directory, model_type=server.model.config.model_type, num_layers=served.num_hidden_layers,
        num_heads=served.num_heads, hidden_size=served.hidden_size, prefix_len=served.prefix_len,
        task_type=PEFT_TASK_TYPES.get(server.head.kind), head_name=server.head.module_name)
    _check_full_depth(server, directory)
    return TaskCheckpoint(adapter.prefix, adapter.head)


def write_peft_adapter(server, task: str, directory) -> None:
    """Export ``task`` as a PEFT 0.21 prefix-tuning adapter that ``PeftModel.from_pretrained`` loads on the
    server's (unpatched) model with identical outputs. Classification models get the task's effective
    classifier (its own or the model's) in ``modules_to_save``."""
    source = f"PEFT export of task {task!r}"
    peft_adapter.check_model_type(server.model.config.model_type, source)
    _check_full_depth(server, source)
    head = None if server.head.module_name is None else server.task_head(task) or server.head.module.state_dict()
    peft_adapter.write_adapter(directory, server.task_prefix(task).float(),
                               task_type=PEFT_TASK_TYPES.get(server.head.kind, peft_adapter.FEATURE_EXTRACTION),
                               head=head, name_or_path=server.model.__dict__.get("name_or_path"))


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
