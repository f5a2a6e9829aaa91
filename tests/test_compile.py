"""torch.compile: the registered op family (``ptv2_kernels/ops/library.py``) under opcheck, and patched models of
every family compiled with ``fullgraph=True`` (CPU inductor) against eager, in training with attention and
prefix dropout and in inference, dynamic sequence lengths without recompiles, and ``PrefixServer`` compiled.
Kept small: compile time is the cost."""

import copy

import pytest
import torch
import torch._dynamo.testing

from ptv2_kernels import DisentangledBias, patch_model, prefix_attention, prefix_attention_varlen
from ptv2_kernels.ops.common import Dropout, Options
from ptv2_kernels.ops.cpu_backend import cpu_kernel_status
from ptv2_kernels.ops.library import attend

from . import test_patch_bert as bert
from . import test_patch_deberta as deberta
from .test_prefix_attention import make_inputs

FAMILIES = {  # name -> (tiny model(**config overrides), random inputs(model, seq=N))
    "bert": (lambda **o: bert.tiny_model("bert", **o), bert.random_inputs),
    "roberta": (lambda **o: bert.tiny_model("roberta", **o), bert.random_inputs),
    "xlm-roberta": (lambda **o: bert.tiny_model("xlm-roberta", **o), bert.random_inputs),
    "electra": (lambda **o: bert.tiny_model("electra", **o), bert.random_inputs),
    "deberta": (lambda **o: deberta.tiny_model("v1", **o), deberta.random_inputs),
    "deberta-v2": (lambda **o: deberta.tiny_model("v2-share-buckets", **o), deberta.random_inputs),
}
OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")

cpu_kernel = pytest.mark.skipif(not cpu_kernel_status()[0], reason="the fused CPU kernel could not be built")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def relative_error(got, want):
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


# ----- the registered ops -------------------------------------------------------------------------------------

def op_cases():
    """(id, backend, args of ``attend`` after the backend): padded with mask and bank, dropout, bias, packed,
    DeBERTa's c2p/p2c; CPU kernel (``cpu``) and composition (``torch-ref``)."""
    tensors, mask, task_ids, _ = make_inputs(2, 2, 9, 3, 16, torch.float32, tasks=2, padded_rows=((1, 5),))
    q, k, v, pk, pv = [t.detach().requires_grad_() for t in tensors]
    plain = Options(0.25, Dropout())
    dropped = Options(0.25, Dropout(0.2, 0.3, seed=1234))
    bias = torch.randn(2, 2, 9, 9, requires_grad=True)
    rel = DisentangledBias.from_relative_positions(
        torch.arange(9)[:, None] - torch.arange(9)[None, :], 4,
        pos_key=torch.randn(2, 8, 16, requires_grad=True), pos_query=torch.randn(2, 8, 16, requires_grad=True))
    lengths = torch.tensor([0, 5, 9])
    packed = [torch.randn(9, 2, 16, requires_grad=True) for _ in range(3)]
    single = [t[:1].detach().requires_grad_() for t in (pk, pv)]
    cases = [
        ("bank-mask", (q, k, v, pk, pv, mask, task_ids, None, None, None, None, None, plain)),
        ("dropout", (q, k, v, pk, pv, mask, task_ids, None, None, None, None, None, dropped)),
        ("bias", (q, k, v, pk, pv, mask, task_ids, bias, None, None, None, None, plain)),
        ("packed", (*packed, *single, None, None, None, None, None, None, lengths, Options(0.25, Dropout(), max_seqlen=5))),
    ]
    out = [pytest.param(b, args, id=f"{b}-{name}", marks=cpu_kernel if b == "cpu" else ())
           for b in ("cpu", "torch-ref") for name, args in cases if not (b == "torch-ref" and name == "packed")]
    out.append(pytest.param("cpu", (q, k, v, *single, mask, None, None, *rel.tensors, None, plain), id="cpu-deberta",
                            marks=cpu_kernel))
    return out


@pytest.mark.parametrize("backend, args", op_cases())
def test_opcheck(backend, args):
    """Schema, fake tensors (shapes, dtypes, strides), autograd registration and AOT dispatch with dynamic shapes
    of ``ptv2::prefix_attention_fwd`` (and through its backward, ``ptv2::prefix_attention_bwd``)."""
    *tensors, options = args
    dropout = options.dropout
    op_args = (*tensors, torch.tensor(dropout.seed), backend, options.scale, dropout.p, dropout.prefix_p,
               options.deterministic, options.max_seqlen)
    torch.library.opcheck(torch.ops.ptv2.prefix_attention_fwd.default, op_args, test_utils=OPCHECK_TESTS)


def test_dropout_seed_op():
    """The seed op draws from the default generator (``torch.manual_seed`` governs it) and its fake is a
    0-dim int64 CPU tensor."""
    q = torch.randn(2)
    torch.manual_seed(7)
    first = torch.ops.ptv2.dropout_seed(q)
    torch.manual_seed(7)
    assert torch.ops.ptv2.dropout_seed(q) == first and first.dtype == torch.int64 and first.dim() == 0
    assert torch.ops.ptv2.dropout_seed(q) != first
    torch.library.opcheck(torch.ops.ptv2.dropout_seed.default, (q,), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend, layout", [pytest.param("torch", "padded", marks=cpu_kernel),
                                             pytest.param("torch", "packed", marks=cpu_kernel),
                                             ("torch-ref", "padded"), ("torch-ref", "packed")])
def test_op_compiles_exactly_with_dropout(backend, layout):
    """The public op, padded and packed, fullgraph under inductor with attention and prefix dropout: the seeds
    (so the masks) eager draws, and eager's outputs and gradients bit for bit."""
    tensors, mask, task_ids, d_out = make_inputs(2, 2, 9, 3, 16, torch.float32, tasks=2, padded_rows=((1, 5),))
    cu_seqlens = torch.tensor([0, 4, 9])
    if layout == "packed":
        tensors = [torch.randn(9, 2, 16) for _ in range(3)] + tensors[3:]
        d_out = torch.randn(9, 2, 16)

    def attention(q, k, v, pk, pv):
        common = dict(task_ids=task_ids, dropout_p=0.2, prefix_dropout_p=0.3, backend=backend)
        if layout == "packed":
            return prefix_attention_varlen(q, k, v, pk, pv, cu_seqlens=cu_seqlens, max_seqlen=5, **common)
        return prefix_attention(q, k, v, pk, pv, key_padding_mask=mask, **common)

    def run(fn):
        leaves = [t.detach().requires_grad_() for t in tensors]
        torch.manual_seed(11)
        out = fn(*leaves)
        out.backward(d_out)
        return [out] + [t.grad for t in leaves]

    for got, want in zip(run(torch.compile(attention, fullgraph=True)), run(attention)):
        assert torch.equal(got, want)  # the op runs as it is: the same seeds, masks and bits


# ----- patched models -----------------------------------------------------------------------------------------

def patched(family, backend="torch", dropout=0.1, num_tasks=1):
    """A 2-layer tiny model of ``family``, every layer patched (P=4), attention and prefix dropout ``dropout``;
    hidden dropout stays 0 (inductor draws it from its own generator, so it could not match eager)."""
    make, inputs = FAMILIES[family]
    model = make(attention_probs_dropout_prob=dropout)
    patch_model(model, 4, prefix_dropout=dropout, backend=backend, num_tasks=num_tasks)
    return model, inputs


def loss_and_logits(model, inputs, labels):
    logits = model(**inputs).logits
    return torch.nn.functional.cross_entropy(logits, labels), logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_model_compiles_in_training(family):
    """Compiled (fullgraph, inductor) vs eager training step with attention and prefix dropout at one seed:
    loss, logits and every trainable gradient (prefix, head) within 1e-5 relative; no graph break in the
    patched attention (``torch._dynamo.explain``)."""
    model, make_inputs_of = patched(family)
    model.train()
    inputs = make_inputs_of(model)
    labels = torch.tensor([0, 1, 1])
    explanation = torch._dynamo.explain(lambda: model(**inputs).logits)()
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(loss_and_logits, fullgraph=True)
    results = []
    for fn, m in ((compiled, compiled_model), (loss_and_logits, model)):
        torch.manual_seed(3)
        loss, logits = fn(m, inputs, labels)
        loss.backward()
        results.append((loss.detach(), logits.detach()))
    for g, w in zip(*results):
        assert relative_error(g, w) < 1e-5
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.startswith("prefix_encoder") for n, _ in trainable)
    for (name, p), q in zip(trainable, (q for q in compiled_model.parameters() if q.requires_grad)):
        assert relative_error(q.grad, p.grad) < 1e-5, name


@pytest.mark.parametrize("backend", [pytest.param("torch", marks=cpu_kernel), "torch-ref"])
def test_two_layers_in_training_are_exact_under_inductor(backend):
    """Issue 14's case: a patched 2-layer BERT in training under the default inductor backend drifted by 1% (the
    second layer: inductor's memory planner gave one buffer to two live values of the torch backend's traced
    log-sum-exp merge). As a registered op the attention is opaque to inductor."""
    model, make_inputs_of = patched("bert", backend=backend, dropout=0.0)
    model.train()
    inputs = make_inputs_of(model)
    compiled = torch.compile(copy.deepcopy(model))
    got, want = compiled(**inputs).logits, model(**inputs).logits
    assert relative_error(got, want) < 1e-6
    got.sum().backward()
    want.sum().backward()
    assert relative_error(compiled.prefix_encoder.prefix.grad, model.prefix_encoder.prefix.grad) < 1e-6


@pytest.mark.parametrize("family", ["bert", "deberta-v2"])
def test_dynamic_lengths_compile_once(family):
    """Three sequence lengths through one compiled model with a task bank (inference and training forward): one
    compilation per mode (``mark_dynamic`` on the length, as batches of a dataloader have), the eager results."""
    model, make_inputs_of = patched(family, dropout=0.0, num_tasks=2)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for training in (False, True):
        model.train(training)
        frames = []
        for seq in (5, 7, 9):
            inputs = make_inputs_of(model, seq=seq)
            for t in inputs.values():
                torch._dynamo.mark_dynamic(t, 1)
            inputs["task_ids"] = torch.tensor([1, 0, 1])
            with torch.set_grad_enabled(training):
                got, want = compiled(**inputs).logits, model(**inputs).logits
            assert relative_error(got, want) < 1e-6
            frames.append(counter.frame_count)
        assert frames[0] == frames[-1] > 0  # the first length compiled (the model and its hooks); the others reuse it


def test_prefix_server_compiled():
    """``PrefixServer(torch_compile=True)``: the eager server's outputs, padded and packed."""
    from ptv2_kernels.serving import PrefixServer, Request

    base = bert.tiny_model("bert")
    torch.manual_seed(0)
    prefix = torch.randn(2, 2, 2, 4, 16)
    requests = [Request("a", input_ids=[5, 6, 7, 8]), Request("b", input_ids=[9, 10, 11])]
    results = {}
    for packed in (False, True):
        for torch_compile in (False, True):
            server = PrefixServer(copy.deepcopy(base), 4, packed=packed, torch_compile=torch_compile)
            server.add_tasks({"a": (prefix, None), "b": (-prefix, None)})
            results[packed, torch_compile] = server.predict(requests)
            server.close()
        for eager, compiled in zip(results[packed, False], results[packed, True]):
            torch.testing.assert_close(torch.as_tensor(compiled.output), torch.as_tensor(eager.output),
                                       rtol=1e-5, atol=1e-6)


def test_attend_refuses_an_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        attend("flash", *([None] * 12), Options(1.0, Dropout()))
