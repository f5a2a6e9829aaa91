"""Attention and prefix dropout: forward and backward use the same masks (checked against the float64
reference fed the masks the contract defines), the kept fraction is 1 - p, and seeds, rows and the
key/value streams get different masks."""

import pytest
import torch

from ptv2_kernels import prefix_attention
from ptv2_kernels.ops.common import Dropout, Options
from ptv2_kernels.ops.library import attend

from .reference import dropout_masks_v2, reference_attention
from .test_prefix_attention import DEVICE, make_inputs, real_rows, run_with_grads

BACKENDS = {  # (apply(q, k, v, prefix_k, prefix_v, mask, task_ids, options), the masks it must use)
    "triton": (lambda *t: attend("triton", *t[:7], None, None, None, None, None, t[7]), dropout_masks_v2),
    "torch": (lambda *t: attend("cpu", *t[:7], None, None, None, None, None, t[7]), dropout_masks_v2),
    "torch-ref": (lambda *t: attend("torch-ref", *t[:7], None, None, None, None, None, t[7]), dropout_masks_v2),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p,prefix_p,num_prefix,tasks,dim", [
    (0.3, 0.0, 11, None, 32),
    (0.0, 0.4, 11, None, 32),
    (0.2, 0.25, 40, 3, 32),
    (0.5, 0.0, 0, None, 32),
    (0.1, 0.4, 11, None, 48),  # two bitmask words per prefix row, the second one partly past D
], ids=["attention", "prefix", "both-bank", "P=0", "both-D48"])
def test_backward_sees_the_forward_masks(backend, p, prefix_p, num_prefix, tasks, dim):
    function, masks = BACKENDS[backend]
    batch, heads, seq, seed = 3, 2, 37, 987654321987
    tensors, mask, task_ids, d_out = make_inputs(batch, heads, seq, num_prefix, dim, torch.float32, tasks=tasks,
                                                 padded_rows=((1, 20),))
    prefix = [t if tasks else t.unsqueeze(0) for t in tensors[3:]]
    options = Options(scale=dim**-0.5, dropout=Dropout(p, prefix_p, seed))
    got = run_with_grads(lambda *t: function(*t, mask, task_ids, options), tensors[:3] + prefix, d_out,
                         packed=True)
    attn_keep, keep_k, keep_v = masks(seed, batch, heads, seq, num_prefix, dim, p, prefix_p)
    ref = run_with_grads(reference_attention, [t.double() for t in tensors], d_out.double(), mask=mask,
                         task_ids=task_ids, attn_keep=attn_keep, keep_k=keep_k, keep_v=keep_v, p=p, prefix_p=prefix_p)
    for name, g, r in zip(["out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"], got, ref):
        g = g.double().reshape(r.shape)
        if name == "out":
            g, r = real_rows(g, mask), real_rows(r, mask)
        torch.testing.assert_close(g, r, rtol=1e-4, atol=2e-5, msg=name)


def test_kept_fraction_and_independence():
    seed, p = 42, 0.1
    attn, keep_k, keep_v = dropout_masks_v2(seed, 4, 3, 64, 32, 64, p, p)
    for keep in (attn, keep_k, keep_v):
        n = keep.numel()
        assert abs(keep.float().mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
    assert not torch.equal(keep_k, keep_v)
    assert not torch.equal(keep_k[0], keep_k[1]), "each batch row needs its own prefix mask"
    assert not torch.equal(attn[0, 0], attn[0, 1])
    other, _, _ = dropout_masks_v2(seed + 1, 4, 3, 64, 32, 64, p, p)
    assert (other != attn).float().mean() > 0.1


@pytest.mark.parametrize("backend", ["torch", "torch-ref", "triton"])
def test_public_api_seeding(backend):
    tensors, mask, task_ids, _ = make_inputs(2, 2, 19, 7, 16, torch.float32, padded_rows=((0, 9),))
    kwargs = dict(key_padding_mask=mask, dropout_p=0.2, prefix_dropout_p=0.3, backend=backend)
    torch.manual_seed(3)
    first = prefix_attention(*tensors, **kwargs)
    torch.manual_seed(3)
    second = prefix_attention(*tensors, **kwargs)
    third = prefix_attention(*tensors, **kwargs)
    plain = prefix_attention(*tensors, key_padding_mask=mask, backend=backend)
    assert torch.equal(first, second)
    assert not torch.equal(first, third)
    assert not torch.allclose(first, plain)
