"""Task checkpoints for :class:`~ptv2_kernels.serving.PrefixServer`: every format becomes a compact prefix
``[L', 2, H, P, D]`` (plus the task's head weights, when it has its own), checked against the server before
anything is loaded.

Formats:
- a :func:`ptv2_kernels.save_prefix` file of one task (plain or with projection: evaluated once);
- a bank directory written by :func:`save_bank`: ``tasks.json`` + one ``save_prefix`` file per task (+ a
  safetensors file of its head weights when it has its own);
- a PEFT 0.21 prefix-tuning adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``
  with ``prompt_embeddings`` ``[P, 2·L·hidden]`` and, for classification, ``base_model.classifier.*``);
  every family but DeBERTa (``ModelFamily.peft_format_covers``: PEFT refuses DeBERTa);
- a P-Tuning v2 reference (THUDM) checkpoint: the prefix encoder's state dict (``embedding.weight``
  ``[P, 2·L·hidden]``, or with projection ``embedding.weight`` ``[P, hidden]``, ``trans.0.*``, ``trans.2.*``), or
  the reference model's whole state dict (``prefix_encoder.*`` beside the frozen backbone ``bert.*`` /
  ``roberta.*`` / ``deberta.*`` and the trained head), imported whole: the prefix and the head (see
  :func:`read_thudm_state_dict`), after checking that its frozen backbone is the served model's.

Every failure raises :class:`~ptv2_kernels.errors.CheckpointError` naming the file (and the field), and loads
nothing: reading and every check happen before the server is touched.
"""

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from ..peft_adapter import ADAPTER_CONFIG, FEATURE_EXTRACTION, check_model_type, read_adapter, write_adapter
from ..errors import CheckpointError
from ..patching import FAMILIES
from ..patching.base import BASE_POOLER, CONTEXT_POOLER
from ..prefix_encoder import PrefixEncoder, load_prefix, prefix_from_flat, save_prefix
from .heads import SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION

BANK_INDEX = "tasks.json"
BANK_FORMAT = "ptv2-prefix-bank"
BANK_VERSION = 1
BANK_ENTRY_FIELDS = ("name", "prefix", "head")
PEFT_CONFIG = ADAPTER_CONFIG
PEFT_TASK_TYPES = {SEQUENCE_CLASSIFICATION: "SEQ_CLS", TOKEN_CLASSIFICATION: "TOKEN_CLS"}
THUDM_PLAIN_KEYS = {"embedding.weight"}
THUDM_PROJECTION_KEYS = {"embedding.weight", "trans.0.weight", "trans.0.bias", "trans.2.weight", "trans.2.bias"}


@dataclass
class TaskCheckpoint:
    """One task as read from disk: compact ``prefix`` ``[L', 2, H, P, D]`` and optional ``head`` weights (the
    state dict of ``server.head.module``: the ``classifier``, or DeBERTa's pooler + classifier)."""

    prefix: torch.Tensor
    head: Optional[Dict[str, torch.Tensor]] = None


def _mismatch(source, pairs: dict) -> None:
    """CheckpointError naming every ``name: (checkpoint, server)`` pair that differs."""
    different = {name: values for name, values in pairs.items() if values[0] != values[1]}
    if different:
        detail = ", ".join(f"{name} {ckpt!r} != {served!r}" for name, (ckpt, served) in different.items())
        raise CheckpointError(f"{source} does not match the server (checkpoint != server): {detail}")


def _check_full_depth(server, source) -> None:
    config = server.prefix_config
    _mismatch(source, {"prefixed layers": (list(range(config.num_hidden_layers)), list(config.layers))})


def _from_flat(server, flat: torch.Tensor, source) -> torch.Tensor:
    """Flat ``[P, 2·L·hidden]`` to compact, after checking its width against the server's model."""
    config = server.prefix_config
    if not isinstance(flat, torch.Tensor) or not flat.dtype.is_floating_point or flat.dim() != 2:
        raise CheckpointError(f"{source}: flat prefix must be a floating-point tensor [P, 2·L·hidden], got "
                              f"{getattr(flat, 'dtype', type(flat).__name__)} {tuple(getattr(flat, 'shape', ()))}")
    _mismatch(source, {"flat width 2·L·hidden": (flat.shape[1], 2 * config.num_hidden_layers * config.hidden_size),
                       "prefix_len": (flat.shape[0], config.prefix_len)})
    return prefix_from_flat(flat.float(), config.num_hidden_layers, config.num_heads).contiguous()


def _check_arguments(server, **paths) -> None:
    """TypeError naming the argument: ``server`` must be a PrefixServer, each of ``paths`` a path."""
    from .engine import PrefixServer

    if not isinstance(server, PrefixServer):
        raise TypeError(f"server must be a PrefixServer, got {type(server).__name__}")
    for name, value in paths.items():
        if not isinstance(value, (str, os.PathLike)):
            raise TypeError(f"{name} must be a path (str or os.PathLike), got {type(value).__name__}")


def _checked(server, checkpoint: TaskCheckpoint, source) -> TaskCheckpoint:
    """``checkpoint`` as the server's bank stores it, after every check of :meth:`PrefixServer.check_task`."""
    try:
        prefix, head = server.check_task(Path(str(source)).name, checkpoint.prefix, checkpoint.head)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{source}: {error}") from None
    return TaskCheckpoint(prefix, head)


# ---- save_prefix files and bank directories ------------------------------------------------------------
def read_prefix_file(server, path) -> TaskCheckpoint:
    """A one-task :func:`~ptv2_kernels.save_prefix` file, checked against the server's bank."""
    try:
        encoder = load_prefix(path)
    except Exception as error:  # noqa: BLE001  (corrupt file, missing keys, bad metadata)
        raise CheckpointError(f"cannot read the prefix file {path}: {error}") from None
    config, served = encoder.config, server.prefix_config
    fields = ("prefix_len", "num_heads", "head_dim", "num_hidden_layers", "layers", "model_type")
    _mismatch(path, {name: (getattr(config, name), getattr(served, name)) for name in fields
                     if name != "model_type" or config.model_type})
    if config.num_tasks != 1:
        raise CheckpointError(f"{path} holds a bank of {config.num_tasks} tasks; a task file holds one")
    with torch.no_grad():
        return TaskCheckpoint(encoder().float())


def save_bank(server, directory) -> None:
    """Write every task of ``server`` to ``directory``: ``tasks.json`` and per task a ``save_prefix``
    file (and its head weights, if it has its own)."""
    from safetensors.torch import save_file

    _check_arguments(server, directory=directory)
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


def _bank_entry(directory: Path, entry, where: str) -> tuple:
    """``(name, prefix path, head path or None)`` of one ``tasks.json`` entry; CheckpointError naming the field."""
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where} must be an object with fields {list(BANK_ENTRY_FIELDS)}, got "
                              f"{type(entry).__name__}")
    unknown = sorted(set(entry) - set(BANK_ENTRY_FIELDS))
    if unknown:
        raise CheckpointError(f"{where} has unknown fields {unknown}; an entry has {list(BANK_ENTRY_FIELDS)}")
    values = []
    for field in BANK_ENTRY_FIELDS:
        if field not in entry and field != "head":
            raise CheckpointError(f"{where} has no {field!r} field")
        value = entry.get(field)
        if (value is not None or field != "head") and (not isinstance(value, str) or not value):
            raise CheckpointError(f"{where}: {field!r} must be a non-empty string, got {value!r}")
        if field != "name" and value is not None:
            path = (directory / value).resolve()
            if directory.resolve() not in path.parents:
                raise CheckpointError(f"{where}: {field!r} must name a file inside the bank directory, got {value!r}")
            value = directory / value
        values.append(value)
    return tuple(values)


def read_bank(server, directory) -> Dict[str, TaskCheckpoint]:
    """Every task of a :func:`save_bank` directory, each file read and checked against the server (nothing is
    loaded); CheckpointError naming the file (and the entry and field of ``tasks.json``)."""
    _check_arguments(server, directory=directory)
    directory = Path(directory)
    index_path = directory / BANK_INDEX
    try:
        index = json.loads(index_path.read_text())
    except OSError as error:
        raise CheckpointError(f"{directory} is not a prefix bank directory: cannot read {BANK_INDEX} "
                              f"({error})") from None
    except ValueError as error:
        raise CheckpointError(f"{index_path} is not valid JSON: {error}") from None
    if not isinstance(index, dict) or index.get("format") != BANK_FORMAT or index.get("version") != BANK_VERSION:
        raise CheckpointError(f"{index_path} is not a {BANK_FORMAT} version {BANK_VERSION} index")
    entries = index.get("tasks")
    if not isinstance(entries, list):
        raise CheckpointError(f"{index_path}: 'tasks' must be a list of entries, got {type(entries).__name__}")
    tasks = {}
    for number, entry in enumerate(entries):
        name, prefix_path, head_path = _bank_entry(directory, entry, f"{index_path} tasks[{number}]")
        if name in tasks:
            raise CheckpointError(f"{index_path} lists task {name!r} twice")
        checkpoint = read_prefix_file(server, prefix_path)
        if head_path is not None:
            checkpoint.head = _load_state_file(head_path)
        tasks[name] = _checked(server, checkpoint, prefix_path if head_path is None else head_path)
    return tasks


# ---- PEFT adapters (the format lives in ptv2_kernels.peft_adapter) -------------------------------------------
def read_peft_adapter(server, directory) -> TaskCheckpoint:
    """A PEFT prefix-tuning adapter directory (``prompt_embeddings`` and classifier weights, if any), checked
    against the server: its family, depth, heads, width, P and kind of head."""
    served = server.prefix_config
    adapter = read_adapter(
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
    check_model_type(server.model.config.model_type, source)
    _check_full_depth(server, source)
    head = None if server.head.module_name is None else server.task_head(task) or server.head.module.state_dict()
    write_adapter(directory, server.task_prefix(task).float(),
                               task_type=PEFT_TASK_TYPES.get(server.head.kind, FEATURE_EXTRACTION),
                               head=head, name_or_path=server.model.__dict__.get("name_or_path"))


# ---- P-Tuning v2 reference (THUDM) state dicts --------------------------------------------------------
def read_thudm_state_dict(server, state: Union[dict, str, Path], *, head: bool = True) -> TaskCheckpoint:
    """A P-Tuning v2 reference checkpoint (a dict, or a ``.bin``/``.pt``/``.safetensors`` file).

    The prefix: the ``PrefixEncoder`` weights (keys may carry the reference model's ``prefix_encoder.`` prefix);
    with projection the MLP is evaluated once and only the compact buffer is kept. A whole reference model's
    state dict also holds the frozen backbone and the trained head; with ``head`` (default) the task is imported
    whole: BERT and token classification ``classifier.*``; RoBERTa sequence classification the reference's
    ``classifier`` on ``RobertaModel``'s pooled output, i.e. ``roberta.pooler.dense.*`` → ``classifier.dense.*`` and
    ``classifier.*`` → ``classifier.out_proj.*`` of transformers' head; DeBERTa sequence classification
    ``pooler.*`` and ``classifier.*``. Its backbone tensors must equal the served model's (the reference freezes
    them; a different base model would give wrong outputs silently)."""
    source = state if not isinstance(state, dict) else "THUDM state dict"
    if not isinstance(state, dict):
        state = _load_state_file(Path(state))
    whole = any(k.startswith("prefix_encoder.") for k in state)
    encoder_state = {k[len("prefix_encoder."):]: v for k, v in state.items() if k.startswith("prefix_encoder.")} \
        if whole else state
    keys = set(encoder_state)
    if keys == THUDM_PLAIN_KEYS:
        flat = encoder_state["embedding.weight"]
    elif keys == THUDM_PROJECTION_KEYS:
        embedding = encoder_state["embedding.weight"].float()
        _mismatch(source, {"embedding width (hidden)": (embedding.shape[-1], server.prefix_config.hidden_size)})
        try:
            hidden = torch.tanh(embedding @ encoder_state["trans.0.weight"].float().T
                                + encoder_state["trans.0.bias"].float())
            flat = hidden @ encoder_state["trans.2.weight"].float().T + encoder_state["trans.2.bias"].float()
        except RuntimeError as error:
            raise CheckpointError(f"{source}: the projection weights trans.0/trans.2 do not chain ({error})") from None
    else:
        wanted = THUDM_PROJECTION_KEYS if keys & {"trans.0.weight", "trans.2.weight"} else THUDM_PLAIN_KEYS
        raise CheckpointError(f"{source}: expected a P-Tuning v2 prefix encoder state dict with keys "
                              f"{sorted(THUDM_PLAIN_KEYS)} or {sorted(THUDM_PROJECTION_KEYS)}; missing "
                              f"{sorted(wanted - keys)}, unexpected {sorted(keys - wanted)}")
    _check_full_depth(server, source)
    prefix = _from_flat(server, flat, source)
    if not whole:
        return TaskCheckpoint(prefix)
    _check_thudm_backbone(server, state, source)
    return TaskCheckpoint(prefix, _thudm_head(server, state, source) if head else None)


def _check_thudm_backbone(server, state: dict, source) -> None:
    """CheckpointError if the reference checkpoint's frozen backbone is another model type or differs from the
    served model's weights (compared where a tensor of the same name and shape exists)."""
    family, model_type = server.head.family, server.model.config.model_type
    if family.reference_backbone is None:
        raise CheckpointError(f"{source} is a whole P-Tuning v2 reference model, but the reference has no "
                              f"{model_type} models; load the prefix encoder's state dict alone")
    prefix = family.reference_backbone + "."
    backbones = {f.reference_backbone + "." for f in FAMILIES.values() if f.reference_backbone}
    others = sorted(p for p in backbones if p != prefix and any(k.startswith(p) for k in state))
    if others:
        raise CheckpointError(f"{source} is a reference checkpoint of another model type ({others[0]}* keys); the "
                              f"server runs a {model_type!r} model ({prefix}* keys)")
    served = {prefix + k: v for k, v in server.model.base_model.state_dict().items()}
    differ = [k for k, v in state.items() if k in served and tuple(served[k].shape) == tuple(v.shape)
              and not torch.equal(v.to(served[k].device, served[k].dtype), served[k])]
    if differ:
        raise CheckpointError(f"{source}: its frozen backbone differs from the served model's in {len(differ)} "
                              f"tensors (first {differ[0]!r}): it was trained on another base model")


def _thudm_head(server, state: dict, source) -> Optional[Dict[str, torch.Tensor]]:
    """The task head of a whole reference state dict as ``server.head.module``'s state dict (None if it has none)."""
    classifier = {k[len("classifier."):]: v for k, v in state.items() if k.startswith("classifier.")}
    if not classifier:
        return None
    if server.head.module is None:
        raise CheckpointError(f"{source} holds a task head (classifier.*) but this server outputs "
                              f"{server.head.kind}s; load its prefix alone with head=False")
    family, model_type = server.head.family, server.model.config.model_type
    if server.head.kind != SEQUENCE_CLASSIFICATION or family.sequence_head == BASE_POOLER:
        return classifier  # BERT: the pooler is the frozen backbone's (checked equal)
    # the reference classifies the pooled output: RoBERTa's pooler is its backbone's, DeBERTa's the model's own
    owner = "" if family.sequence_head == CONTEXT_POOLER else f"{family.reference_backbone}."
    pooler_prefix = f"{owner}pooler.dense."
    pooler = {k[len(pooler_prefix):]: v for k, v in state.items() if k.startswith(pooler_prefix)}
    if set(pooler) != {"weight", "bias"}:
        raise CheckpointError(f"{source}: a {model_type} sequence-classification head needs {pooler_prefix}weight and "
                              f"{pooler_prefix}bias beside classifier.* (the reference classifies the pooled output)")
    if family.sequence_head == CONTEXT_POOLER:
        return {**{f"pooler.dense.{k}": v for k, v in pooler.items()},
                **{f"classifier.{k}": v for k, v in classifier.items()}}
    return {**{f"dense.{k}": v for k, v in pooler.items()}, **{f"out_proj.{k}": v for k, v in classifier.items()}}


def _load_state_file(path: Path) -> dict:
    """A state dict file (safetensors, or torch.save'd with tensors only); CheckpointError naming it."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001  (torch/safetensors raise many types for a corrupt file)
        raise CheckpointError(f"cannot read the state dict file {path}: {error}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{path} is not a state dict (a mapping of names to tensors), got {type(state).__name__}")
    return state


# ---- one entry point ------------------------------------------------------------------------------------
def _check_json_object(path: Path) -> None:
    """CheckpointError unless ``path`` holds a JSON object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {path} ({error})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got a JSON {type(value).__name__}")


def read_task(server, source, *, head: bool = True) -> TaskCheckpoint:
    """Read one task in any format above (detected from ``source``: a path or a state dict), checked against
    ``server`` (nothing is loaded). ``head``: also the task's own head weights when the checkpoint holds them
    (default; False: the prefix alone, the task then uses the model's head). CheckpointError naming the file."""
    _check_arguments(server)
    if not isinstance(head, bool):
        raise TypeError(f"head must be a bool, got {type(head).__name__} {head!r}")
    if not isinstance(source, (dict, str, os.PathLike)):
        raise TypeError(f"source must be a path or a state dict, got {type(source).__name__}")
    label = "THUDM state dict" if isinstance(source, dict) else Path(source)
    try:
        checkpoint = _read_task(server, source, head)
    except CheckpointError:
        raise
    except ValueError as error:  # the PEFT reader's mismatches, which name the directory
        raise CheckpointError(str(error)) from None
    if not head:
        checkpoint.head = None
    return _checked(server, checkpoint, label)


def _read_task(server, source, head: bool) -> TaskCheckpoint:
    if isinstance(source, dict):
        return read_thudm_state_dict(server, source, head=head)
    path = Path(source)
    if path.is_dir():
        if (path / PEFT_CONFIG).exists():
            _check_json_object(path / PEFT_CONFIG)
            return read_peft_adapter(server, path)
        if (path / BANK_INDEX).exists():
            raise CheckpointError(f"{path} is a bank of tasks; load it with load_bank")
        raise CheckpointError(f"{path} is a directory without {PEFT_CONFIG} or {BANK_INDEX}")
    if not path.exists():
        raise CheckpointError(f"no task checkpoint at {path}")
    if path.suffix == ".safetensors" and _has_prefix_metadata(path):
        return read_prefix_file(server, path)
    return read_thudm_state_dict(server, path, head=head)


def _has_prefix_metadata(path: Path) -> bool:
    from safetensors import safe_open

    from ..prefix_encoder import _METADATA_KEY

    try:
        with safe_open(str(path), framework="pt") as handle:
            return _METADATA_KEY in (handle.metadata() or {})
    except Exception as error:  # noqa: BLE001
        raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from None


def load_task(server, name: str, source, *, replace: bool = False, head: bool = True) -> None:
    """Read ``source`` (see :func:`read_task`) and serve it as task ``name``: all or nothing."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty string, got {type(name).__name__} {name!r}")
    checkpoint = read_task(server, source, head=head)
    server.add_task(name, checkpoint.prefix, checkpoint.head, replace=replace)


def load_bank(server, directory, *, replace: bool = False) -> list:
    """Serve every task of a :func:`save_bank` directory; all are read and checked before the first is
    added (:meth:`PrefixServer.add_tasks`), so a bad bank loads nothing. Returns the task names."""
    tasks = read_bank(server, directory)
    server.add_tasks({name: (c.prefix, c.head) for name, c in tasks.items()}, replace=replace)
    return list(tasks)
