"""Data-parallel training of a patched model on two gloo ranks on the CPU: DDP and FSDP2
(``torch.distributed.fsdp.fully_shard``). Each rank takes half the batch; the gradients the wrapper leaves on the
prefix and the head equal those of one process on the whole batch (the loss is a mean over equal halves). FSDP2 is
also run with a prompt depth (``layers=[1]``: a prefix of one layer, dim 0 smaller than the ranks, sharded
unevenly) and with a bank besides (``num_tasks=2``, ``task_ids``): the prefix parameter is sharded over the ranks
(dim 0) and gathered for the forward like any other. One spawn runs every case."""

import ptv2_kernels  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported on a CPU machine)

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ptv2_kernels import patch_model

from .test_patch_bert import random_inputs, tiny_model

WORLD = 2
BATCH = 4  # two rows per rank
CASES = {"ddp": {}, "fsdp2": {}, "fsdp2-depth": {"layers": [1]}, "fsdp2-bank-depth": {"num_tasks": 2, "layers": [1]}}
TOL = dict(rtol=1e-5, atol=1e-6)


def build(case: str):
    """The seeded patched model, its trainable parameters by name, and the whole batch (labels, task_ids)."""
    options = CASES[case]
    model = tiny_model("bert").train()
    encoder = patch_model(model, 3, prefix_dropout=0.0, **options)
    torch.manual_seed(1)
    with torch.no_grad():
        encoder.prefix.normal_(std=0.5)
    inputs = random_inputs(model, batch=BATCH)
    inputs["labels"] = torch.arange(BATCH) % 2
    if options.get("num_tasks"):
        inputs["task_ids"] = torch.tensor([0, 1, 1, 0])
    return model, inputs


def gradients(model) -> dict:
    """Every trainable parameter's gradient, whole (FSDP2 leaves shards: gathered)."""
    return {name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
            for name, p in model.named_parameters() if p.requires_grad}


def wrap(case: str, model):
    if case == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.bert.encoder.layer:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)  # the root holds the prefix encoder and the head


def _worker(rank: int, store: str, out: str):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for case in CASES:
            model, inputs = build(case)
            wrapped = wrap(case, model)
            rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
            wrapped(**{name: value[rows] for name, value in inputs.items()}).loss.backward()
            results[case] = gradients(model)
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_gradients(tmp_path_factory):
    directory = tmp_path_factory.mktemp("scale_out")
    mp.spawn(_worker, args=(str(directory / "store"), str(directory)), nprocs=WORLD, join=True)
    return [torch.load(directory / f"rank{rank}.pt") for rank in range(WORLD)]


@pytest.mark.parametrize("case", list(CASES))
def test_data_parallel_gradients_equal_the_whole_batch(case, distributed_gradients):
    model, inputs = build(case)
    model(**inputs).loss.backward()
    expected = gradients(model)
    assert set(expected) == {"prefix_encoder.prefix", "classifier.weight", "classifier.bias"}
    assert expected["prefix_encoder.prefix"].abs().sum() > 0
    for rank in range(WORLD):
        got = distributed_gradients[rank][case]
        assert set(got) == set(expected)
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], **TOL, msg=f"{case}, rank {rank}: {name}")
