"""``train`` and ``serve`` modes: a whole sequence-classification model with random weights, patched
with :func:`ptv2_kernels.patch_model` (``fused-*`` providers) or wrapped by PEFT prefix tuning
(``peft``: the concatenation through a ``DynamicCache`` that users run today, sdpa attention).

``train-step``: forward, backward and an AdamW step on the trainable parameters (prefix and head).
With ``--compile`` every provider also runs its model through ``torch.compile`` (inductor; the compile is
paid in the untimed first call), as ``<provider>+compile`` rows next to the eager ones.
``serve``: one inference forward; throughput is ``1000·B/ms`` sequences/s. Dropout is off in the
configs so every provider computes the same function: the fused models get PEFT's prefix values and
their loss (train) or logits (serve) are checked against PEFT's.

Whether PEFT runs the model is found by trying it with the installed packages
(:mod:`ptv2_kernels.peft_support`; the README states the outcomes per version range). Where PEFT refuses the
model, the concatenation reference is ``concat-sdpa``: the same patched model with every layer's prefix
attention swapped for :func:`ptv2_kernels.concat_prefix_attention` (prefix expanded over the batch and
concatenated, c2p + p2c materialised as transformers does, SDPA), and the ``peft`` provider is listed as skipped
with PEFT's reason (``results.json``/``results.md``: which reference ran and why). Those providers start from one
seeded random prefix.
"""

import contextlib

import torch

from .. import concat_prefix_attention
from ..patching import family_named
from ..peft_support import peft_prefix_tuning_refusal
from . import kernel, measure
from .configs import MODEL_CONFIGS, heads_and_dim

CONCAT = "concat-sdpa"
PROVIDERS = ("peft", CONCAT)
QUICK_LAYERS = 2


def _family(model_name: str):
    """The :class:`~ptv2_kernels.patching.base.ModelFamily` of ``model_name``'s embedded config."""
    return family_named(MODEL_CONFIGS[model_name]["model_type"])


def peft_refusal(model_name: str):
    """Why the installed PEFT cannot prefix-tune ``model_name``'s model type on the installed transformers (None
    if it can), found by trying it (:mod:`ptv2_kernels.peft_support`, once per process)."""
    return peft_prefix_tuning_refusal(MODEL_CONFIGS[model_name]["model_type"])


def reference_provider(model_name: str) -> str:
    """The concatenation baseline the model benches check and compare against: PEFT where it runs, else
    ``concat-sdpa`` (the patched model with concatenating attention)."""
    return CONCAT if peft_refusal(model_name) else "peft"


def _patch_model():
    """``ptv2_kernels.patch_model``, or None while this version of the package lacks it."""
    try:
        from .. import patch_model
    except ImportError:
        return None
    return patch_model


def skip_reason(provider: str, model_name: str, device: torch.device):
    """Why ``provider`` cannot run a model bench of ``model_name`` here (None if it can)."""
    if provider == "peft":
        refusal = peft_refusal(model_name)
        return None if refusal is None else f"{refusal}; the concatenation reference is {CONCAT} instead"
    if _patch_model() is None:
        return "needs ptv2_kernels.patch_model (SPEC §3), not in this version of the package"
    if provider == CONCAT:
        return None if reference_provider(model_name) == CONCAT else "PEFT is the concatenation baseline of this model"
    return kernel.skip_reason(provider, "kernel-fwd", device, relative=_family(model_name).disentangled)


def build_model(model_name: str, quick: bool, device, dtype):
    """The embedded config (``QUICK_LAYERS`` layers with ``quick``), dropout off, seeded random weights."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cfg = dict(MODEL_CONFIGS[model_name])
    model_type = cfg.pop("model_type")
    if quick:
        cfg["num_hidden_layers"] = QUICK_LAYERS
    config = AutoConfig.for_model(model_type, **cfg, num_labels=2, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)  # sdpa where transformers has it (not DeBERTa)
    return model.to(device, dtype)


def _peft(model, prefix_len: int):
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    return get_peft_model(model, PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=prefix_len))


def peft_prefix(peft_model) -> torch.Tensor:
    """PEFT's ``prompt_embeddings`` ``[P, 2·L·hidden]`` as the SPEC's compact ``[L, 2, H, P, D]`` buffer
    (PEFT views it as ``[P, 2L, H, D]``, layer l's keys at 2l and values at 2l + 1)."""
    weight = peft_model.prompt_encoder["default"].embedding.weight
    cfg = peft_model.config
    heads = cfg.num_attention_heads
    layers, dim = cfg.num_hidden_layers, cfg.hidden_size // heads
    return weight.detach().view(weight.shape[0], layers, 2, heads, dim).permute(1, 2, 3, 0, 4)


def make_batch(config, batch: int, seq: int, device, labels: bool):
    """Seeded token ids with the kernel mode's padding pattern (row b keeps ``N - (b % 4)·N/8`` tokens)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, config.vocab_size, (batch, seq), generator=gen)
    lengths = seq - (torch.arange(batch) % 4) * (seq // 8)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, config.pad_token_id or 0)
    out = {"input_ids": ids, "attention_mask": mask}
    if labels:
        out["labels"] = torch.arange(batch) % 2
    return {k: v.to(device) for k, v in out.items()}


def prepare(provider: str, model_name: str, prefix_len: int, quick: bool, device, dtype):
    """The model of ``provider``; patched ones get the prefix PEFT would start from (same seed), or where PEFT
    is not the reference one seeded random prefix."""
    model = build_model(model_name, quick, device, dtype)
    if reference_provider(model_name) == CONCAT:
        start = None
    else:
        reference = _peft(build_model(model_name, quick, device, dtype), prefix_len)
        if provider == "peft":
            return reference
        start = peft_prefix(reference)
    encoder = _patch_model()(model, prefix_len, backend=kernel.FUSED_BACKENDS.get(provider, "torch"))
    if start is None:
        start = torch.randn(encoder.prefix.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        encoder.prefix.copy_(start)
    return model


@contextlib.contextmanager
def _concatenated_attention():
    """Within: patched models attend by concatenation (``concat_prefix_attention``, SDPA) instead of the
    fused op; the ``concat-sdpa`` provider's timed calls run inside."""
    from ..patching import base

    def attend(q, k, v, prefix_k, prefix_v, *, backend, **kwargs):
        return concat_prefix_attention(q, k, v, prefix_k, prefix_v, impl="sdpa", **kwargs)

    fused, base.prefix_attention = base.prefix_attention, attend
    try:
        yield
    finally:
        base.prefix_attention = fused


def _concatenating(call):
    """``call`` run inside :func:`_concatenated_attention`."""
    def wrapped():
        with _concatenated_attention():
            return call()

    return wrapped


def make_call(model, mode: str, batch):
    """The timed call: a training step (returns the loss) or an inference forward (returns the logits)."""
    if mode == "serve":
        model.eval()

        def serve():
            with torch.inference_mode():
                return model(**batch).logits

        return serve
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step():
        out = model(**batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.loss.detach()

    return step


COMPILED = "+compile"  # suffix of the providers' compiled rows


def run(mode, model_name, sizes, dtype, device, providers, progress, quick, compiled=False):
    """Rows and skipped entries of ``mode`` ("train" or "serve") at the headline (N, P) of ``sizes``; with
    ``compiled`` each provider runs eager and under ``torch.compile``."""
    from .report import make_row

    bench = "train-step" if mode == "train" else "serve"
    reference_name = reference_provider(model_name)
    selected = [p for p in (*kernel.FUSED_BACKENDS, *PROVIDERS) if p in providers]
    reasons = {p: skip_reason(p, model_name, device) for p in selected}
    skipped = [{"bench": bench, "provider": p, "reason": reason} for p, reason in reasons.items() if reason]
    runnable = sorted((p for p in selected if not reasons[p]), key=lambda p: p != reference_name)
    variants = [(p, c) for p in runnable for c in ((False, True) if compiled else (False,))]
    progress.extend(len(variants))
    seq, prefix_len = sizes.seq_lens[0], sizes.prefix_lens[0]
    heads, dim = heads_and_dim(model_name)
    rows, reference = [], None
    for provider, compile_it in variants:
        name = provider + COMPILED * compile_it
        progress.step(f"{bench} {name} N={seq} P={prefix_len}")
        model = prepare(provider, model_name, prefix_len, quick, device, dtype)
        batch = make_batch(model.config, sizes.batch, seq, device, labels=mode == "train")
        call = make_call(torch.compile(model) if compile_it else model, mode, batch)
        if provider == CONCAT:
            call = _concatenating(call)
        first = call().float()  # before any optimizer step: comparable across providers
        ms = measure.time_ms(call, device, sizes.warmup, sizes.repeats)
        _, peak = measure.peak_mb(call, device)
        if name == reference_name:
            reference = first
        err = None if reference is None else float((first - reference).abs().max()) / max(float(reference.abs().max()), 1e-6)
        rows.append(make_row(bench, name, model_name, sizes.batch, heads, seq, prefix_len, dim, dtype,
                             ms=ms, peak_mb=peak, max_err=err))
        del model, call
    return rows, skipped
