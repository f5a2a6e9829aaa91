"""The Triton kernels compile with the real Triton compiler (not the interpreter) for sm_80 and sm_90,
no GPU needed: this catches what the interpreter accepts but the compiler rejects (types, constexpr
branches, shared memory). Runs in a subprocess with TRITON_INTERPRET=0."""

import os
import subprocess
import sys
import textwrap

import pytest

COMPILE_SCRIPT = textwrap.dedent('''
    import sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from ptv2_kernels.kernels import prefix_attention_triton as kernels

    FLOAT_ARGS = {"scale", "scale_log2", "drop_scale", "prefix_scale"}
    INT_ARGS = {"B", "H", "N", "P", "D", "R", "PREFIX_BLOCKS"}
    INDEX_POINTERS = {"TaskIds": "*i64", "Mask": "*u8", "Lse": "*fp32", "Delta": "*fp32", "DPK": "*fp32",
                      "DPV": "*fp32", "RelIndex": "*i32", "DPosK": "*fp32", "DPosQ": "*fp32"}

    def compile_kernel(fn, dtype, arch, num_warps=4, **constexprs):
        signature = {}
        for name in fn.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name in INDEX_POINTERS:
                signature[name] = INDEX_POINTERS[name]
            elif name[0].isupper() and name not in INT_ARGS:
                signature[name] = "*" + dtype
            elif name in FLOAT_ARGS:
                signature[name] = "fp32"
            else:
                signature[name] = "i64" if name == "seed" else "i32"
        src = ASTSource(fn=fn, signature=signature,
                        constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
        limit = 227 * 1024 if arch >= 90 else 163 * 1024
        assert compiled.metadata.shared <= limit, (fn.__name__, compiled.metadata.shared)
        print(fn.__name__, dtype, arch, "warps", num_warps, "shared", compiled.metadata.shared, flush=True)

    tiles = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=64)
    everything = dict(HAS_MASK=True, HAS_TASKS=True, HAS_BIAS=True, HAS_C2P=True, HAS_P2C=True, VARLEN=False,
                      ATTN_DROPOUT=True, PREFIX_DROPOUT=True, **tiles)
    nothing = dict(HAS_MASK=False, HAS_TASKS=False, HAS_BIAS=False, HAS_C2P=False, HAS_P2C=False, VARLEN=False,
                   ATTN_DROPOUT=False, PREFIX_DROPOUT=False, **tiles)
    deberta = dict(nothing, HAS_MASK=True, HAS_C2P=True, HAS_P2C=True)
    packed = dict(nothing, HAS_TASKS=True, VARLEN=True, ATTN_DROPOUT=True)
    arch = int(sys.argv[1])
    compile_kernel(kernels.prefix_attention_fwd_kernel, "bf16", arch, DOT_FP32=False, **everything)
    if arch >= 90:
        compile_kernel(kernels.prefix_attention_fwd_kernel, "fp32", arch, DOT_FP32=True, **nothing)
        compile_kernel(kernels.prefix_attention_fwd_kernel, "fp16", arch, DOT_FP32=False, **packed)
        compile_kernel(kernels.prefix_attention_bwd_preprocess_kernel, "bf16", arch, VARLEN=True, BLOCK_M=64,
                       BLOCK_D=64)
        compile_kernel(kernels.prefix_attention_bwd_dq_kernel, "bf16", arch, DOT_FP32=False, C2P_GRAD=True,
                       **everything)
        compile_kernel(kernels.prefix_attention_bwd_dkdv_kernel, "bf16", arch, DOT_FP32=False, DETERMINISTIC=False,
                       BIAS_GRAD=True, P2C_GRAD=True, **everything)
        compile_kernel(kernels.prefix_attention_bwd_dkdv_kernel, "fp16", arch, DOT_FP32=False, DETERMINISTIC=True,
                       BIAS_GRAD=False, P2C_GRAD=False, **packed)
        compile_kernel(kernels.prefix_attention_fwd_kernel, "bf16", arch, DOT_FP32=False, num_warps=8, **deberta)
        for grad in (True, False):  # trained / frozen relative embeddings
            compile_kernel(kernels.prefix_attention_bwd_dq_kernel, "bf16", arch, DOT_FP32=False, num_warps=8,
                           C2P_GRAD=grad, **deberta)
            compile_kernel(kernels.prefix_attention_bwd_dkdv_kernel, "bf16", arch, DOT_FP32=False, DETERMINISTIC=False,
                           BIAS_GRAD=False, num_warps=8, P2C_GRAD=grad, **deberta)
''')


@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_for_gpu(arch):
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    result = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT, str(arch)], env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
