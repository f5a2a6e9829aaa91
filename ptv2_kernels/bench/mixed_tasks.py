"""Mixed-task serving rows of ``ptv2-bench --mode serve`` (bench ``serve``, same batch and inputs as its
single-task ``fused-*`` and ``peft`` rows; :mod:`ptv2_kernels.bench.cli` adds them to the serve mode).

Providers (``T`` = ``NUM_TASKS`` task prefixes, row ``b`` of the batch belongs to task ``b % T``):
- ``mixed16-<fused>``: one patched model with a bank of T prefixes, the whole batch in one forward
  (``task_ids``); compare with ``<fused>`` (one task, same batch) for the SPEC §4 ≥ 0.9× target.
- ``peft-loop16``: the PEFT way, T adapters on one ``PeftModel``, one forward per task over its rows
  (``set_adapter``), the reference of the ``mixed16`` rows' ``max_err``.
- ``server-padded16`` / ``server-packed16``: :class:`PrefixServer.predict` on the batch's rows at their real
  lengths (token ids, no tokenizer): length-sorted batches, padded or packed (no padding tokens).
"""

import torch

from ..serving.engine import PrefixServer, Request
from ..patching import family_named
from . import kernel, measure, model
from .configs import MODEL_CONFIGS, heads_and_dim
from .report import make_row

NUM_TASKS = 16


def _config(model_name: str, quick: bool):
    """The transformers config ``model.build_model`` builds (depth, widths, vocabulary), without weights."""
    from transformers import AutoConfig

    values = dict(MODEL_CONFIGS[model_name])
    if quick:
        values["num_hidden_layers"] = model.QUICK_LAYERS
    return AutoConfig.for_model(values.pop("model_type"), **values)


def _task_prefixes(config, prefix_len: int, device) -> torch.Tensor:
    """Seeded flat prefixes ``[T, P, 2·L·hidden]`` (PEFT's ``prompt_embeddings`` layout)."""
    generator = torch.Generator().manual_seed(1)
    width = 2 * config.num_hidden_layers * config.hidden_size
    return torch.randn(NUM_TASKS, prefix_len, width, generator=generator).mul_(0.5).to(device)


def _compact(flat: torch.Tensor, config) -> torch.Tensor:
    from ..prefix_encoder import prefix_from_flat

    return prefix_from_flat(flat, config.num_hidden_layers, config.num_attention_heads)


def _mixed_call(model_name, prefix_len, quick, device, dtype, backend, flat, batch, task_ids):
    net = model.build_model(model_name, quick, device, dtype)
    encoder = model._patch_model()(net, prefix_len, num_tasks=NUM_TASKS, backend=backend)
    with torch.no_grad():
        encoder.prefix.copy_(_compact(flat, net.config))
    return model.make_call(net, "serve", {**batch, "task_ids": task_ids})


def _peft_loop_call(model_name, prefix_len, quick, device, dtype, flat, batch, task_ids):
    """T adapters on one PeftModel; one forward per task over its rows, logits put back in batch order."""
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    config = PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=prefix_len)
    net = get_peft_model(model.build_model(model_name, quick, device, dtype), config, adapter_name="task0")
    for t in range(1, NUM_TASKS):
        net.add_adapter(f"task{t}", config)
    with torch.no_grad():
        for t in range(NUM_TASKS):
            net.prompt_encoder[f"task{t}"].embedding.weight.copy_(flat[t])
    net.eval()
    groups = [(t, (task_ids == t).nonzero().squeeze(1)) for t in range(NUM_TASKS) if (task_ids == t).any()]

    def serve():
        with torch.inference_mode():
            logits = None
            for t, rows in groups:
                net.set_adapter(f"task{t}")
                out = net(**{k: v[rows] for k, v in batch.items()}).logits
                logits = out.new_empty(task_ids.shape[0], out.shape[-1]) if logits is None else logits
                logits[rows] = out
            return logits

    return serve


def _server_call(model_name, prefix_len, quick, device, dtype, backend, flat, batch, task_ids, packed):
    net = model.build_model(model_name, quick, device, dtype)
    server = PrefixServer(net, prefix_len, max_tasks=NUM_TASKS, packed=packed, backend=backend,
                          max_batch_tokens=batch["attention_mask"].numel(), max_batch_size=task_ids.shape[0])
    server.add_tasks({f"task{t}": (_compact(flat[t], net.config), None) for t in range(NUM_TASKS)})
    requests = [Request(f"task{int(t)}", input_ids=ids[mask.bool()].tolist())
                for ids, mask, t in zip(batch["input_ids"].cpu(), batch["attention_mask"].cpu(), task_ids.cpu())]

    def serve():
        return torch.stack([r.output for r in server.predict(requests)])

    return serve


def run(model_name, sizes, dtype, device, providers, progress, quick):
    """Rows and skipped entries of the mixed-task providers at the headline (N, P) of ``sizes``."""
    fused = [p for p in kernel.FUSED_BACKENDS if p in providers and not model.skip_reason(p, model_name, device)]
    want_peft = "peft" in providers and not model.skip_reason("peft", model_name, device)
    skipped = [{"bench": "serve", "provider": f"mixed{NUM_TASKS}-{p}", "reason": reason}
               for p in kernel.FUSED_BACKENDS if p in providers
               for reason in [model.skip_reason(p, model_name, device)] if reason]
    if not fused and not want_peft:
        return [], skipped
    seq, prefix_len = sizes.seq_lens[0], sizes.prefix_lens[0]
    heads, dim = heads_and_dim(model_name)
    config = _config(model_name, quick)
    batch = model.make_batch(config, sizes.batch, seq, device, labels=False)
    task_ids = (torch.arange(sizes.batch) % NUM_TASKS).to(device)
    flat = _task_prefixes(config, prefix_len, device).to(dtype)
    calls = {}
    if want_peft:
        calls[f"peft-loop{NUM_TASKS}"] = lambda: _peft_loop_call(model_name, prefix_len, quick, device, dtype, flat,
                                                                  batch, task_ids)
    for provider in fused:
        backend = kernel.FUSED_BACKENDS[provider]
        calls[f"mixed{NUM_TASKS}-{provider}"] = lambda b=backend: _mixed_call(
            model_name, prefix_len, quick, device, dtype, b, flat, batch, task_ids)
    if fused:
        backend = kernel.FUSED_BACKENDS[fused[0]]
        packings = (False, True) if family_named(config.model_type).serves_packed else (False,)
        for packed in packings:
            name = f"server-{'packed' if packed else 'padded'}{NUM_TASKS}"
            calls[name] = lambda b=backend, p=packed: _server_call(model_name, prefix_len, quick, device, dtype, b,
                                                                   flat, batch, task_ids, p)
    progress.extend(len(calls))
    rows, reference = [], None
    for provider, build in calls.items():
        progress.step(f"serve {provider} N={seq} P={prefix_len}")
        call = build()
        first = call().float()
        ms = measure.time_ms(call, device, sizes.warmup, sizes.repeats)
        _, peak = measure.peak_mb(call, device)
        reference = first if reference is None else reference
        err = float((first - reference).abs().max()) / max(float(reference.abs().max()), 1e-6)
        rows.append(make_row("serve", provider, model_name, sizes.batch, heads, seq, prefix_len, dim, dtype,
                             ms=ms, peak_mb=peak, max_err=err))
        del call
    return rows, skipped
