"""Launch decisions shared by the Triton launchers: which device, how many warps and programs,
how tiles are multiplied (and when cuBLAS multiplies instead), autotune keys, split-K."""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..interpreter import triton_interpreting

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def device_guard(t: torch.Tensor):
    """Context manager making t's GPU the current device for a launch. Triton launches on the
    *current* device and its current stream, so without it a tensor on cuda:1 while cuda:0 is
    current (HF device_map="auto", one process driving several GPUs) would run in the wrong
    context. A no-op for CPU tensors (the interpreter)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 for CPU tensors (the interpreter runs one
    program at a time, so there is nothing to fill)."""
    if device.type != "cuda":
        return 1
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def persistent_programs(device: torch.device, work_items: int, per_sm: int = 4) -> int:
    """Number of programs for a grid-stride kernel: a few per SM on a GPU, few on the
    interpreter (each interpreted program costs milliseconds, so fewer is faster)."""
    cap = sm_count(device) * per_sm if device.type == "cuda" else 4
    return max(1, min(work_items, cap))


class RowLaunch(NamedTuple):
    block: int  # elements of a row held by one program (a power of two >= the row)
    num_warps: int


# A program keeps a whole row in registers, several values per element (x, dy, w, the dweight
# accumulator in the backward): at most 16 elements per thread keeps that under ~128 registers,
# with no spills at d = 4096 and 8192 in bf16, fp16 and fp32 on sm_80 and sm_90 (4 warps spilled
# 600 B per thread at d = 8192 in bf16, 6.6 KB in fp32; tests/packaging/triton_aot.py reports it).
_ROW_ELEMENTS_PER_THREAD = 16
_ROW_LIMIT = 65536


def row_launch(n: int) -> RowLaunch:
    """Block and warps for kernels that hold one row of n elements per program: the smallest
    power of two >= n, and warps that grow with it (4 up to 2048 elements, 32 from 16384),
    as Liger-Kernel does. A clear error past the single-block limit."""
    block = triton.next_power_of_2(max(n, 1))
    if block > _ROW_LIMIT:
        raise ValueError(f"row length {n} exceeds the Triton kernels' single-block limit {_ROW_LIMIT}")
    warps = min(32, max(4, block // (32 * _ROW_ELEMENTS_PER_THREAD)))
    return RowLaunch(block, warps)


def check_dtype(op: str, t: torch.Tensor) -> None:
    if t.dtype not in TRITON_DTYPES:
        raise TypeError(f"{op}: the triton backend supports float16, bfloat16 and float32, got {t.dtype} "
                        "(use backend='torch' or 'cpu'/'cuda' for float64)")


def autotune_configs(gpu: list[triton.Config], interpreter: triton.Config) -> list[triton.Config]:
    """The configs to autotune over: the GPU list natively, the single `interpreter` config under
    TRITON_INTERPRET=1 (the interpreter cannot time configs, and big blocks mean few programs)."""
    return [interpreter] if triton_interpreting() else gpu


def block_k_for_operand_size(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Autotune early_config_prune for GEMM configs written for 2-byte operands: with 4-byte
    ones (fp32, multiplied as TF32) BLOCK_K is halved, so that a pipeline stage holds the same
    bytes of shared memory. At full size the fp32 stages of the fused SwiGLU GEMMs (three
    operand tiles) need up to 320 KB, past sm_80's 163 KB and sm_90's 227 KB per block."""
    operand = next(v for v in named_args.values() if isinstance(v, torch.Tensor))
    if operand.element_size() <= 2:
        return configs
    halved = {}
    for config in configs:
        meta = dict(config.kwargs, BLOCK_K=config.kwargs["BLOCK_K"] // 2)
        key = (tuple(sorted(meta.items())), config.num_warps, config.num_stages)
        halved.setdefault(key, triton.Config(meta, num_warps=config.num_warps, num_stages=config.num_stages))
    return list(halved.values())


def size_bucket(n: int) -> int:
    """Autotune key for a size that changes from call to call (the token count): its power-of-two
    bucket. Keying on the exact size re-tunes for every new batch shape; leaving it out reuses
    whatever a tiny warm-up batch chose for every size."""
    return triton.next_power_of_2(max(n, 1))


def elementwise_block() -> int:
    """Elements per program of the flat elementwise kernels: 1024 (8 per thread at 4 warps, so
    16-byte accesses for bf16) on a GPU, large on the interpreter where programs are slow."""
    return 16384 if triton_interpreting() else 1024


# ------------------------------------------------------------------ fp32 GEMMs: TF32 or cuBLAS


def tf32_allowed() -> bool:
    """Whether torch lets float32 matmuls use TF32 tensor cores. The source of truth is
    ``torch.backends.cuda.matmul.fp32_precision`` ("tf32" | "ieee" | "none" = inherit
    ``torch.backends.fp32_precision``), which the legacy switches also set:
    ``torch.backends.cuda.matmul.allow_tf32 = True`` and
    ``torch.set_float32_matmul_precision("high" | "medium")`` make it "tf32". (Reading
    ``allow_tf32`` itself raises once both APIs have been used.) Older torch: ``allow_tf32``."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:
        return bool(matmul.allow_tf32)
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "ieee")
    return precision == "tf32"


def triton_gemm(dtype: torch.dtype) -> bool:
    """Whether the GEMMs of a launcher run in Triton for operands of `dtype`.

    bf16 / fp16: always (tensor cores, fp32 accumulation). fp32: only when TF32 is allowed
    (tf32_allowed), as TF32 tensor-core products, which is what torch.mm does then too.
    Exact fp32 goes to cuBLAS (torch.mm): Triton's "ieee" dot multiplies on FMA units with
    tensor-core-sized register tiles (2-3 KB of spills per thread, configs past shared memory),
    where cuBLAS's SGEMM is the kernel tuned for the job; the GEMM-with-epilogue kernels then run
    as cuBLAS GEMMs plus the Triton elementwise SwiGLU kernels (the fusion saves only elementwise
    traffic, small next to an FMA-bound GEMM). The same rule holds under the interpreter, so the tests reach
    both paths (TF32 on and off)."""
    return dtype != torch.float32 or tf32_allowed()


def dot_mode(dtype: torch.dtype) -> str:
    """How `mma` multiplies tiles of `dtype`: tensor-core products accumulated in fp32 ("tf32";
    for bf16/fp16 operands the name is ignored), exact fp32 products ("ieee") for fp32 when TF32
    is not allowed (launchers route that case to cuBLAS, see triton_gemm), and "upcast" for bf16
    under the interpreter, whose tl.dot multiplies bf16 tiles as raw uint16 bits (bf16 -> fp32
    is exact, so the products are the same)."""
    if dtype == torch.bfloat16 and triton_interpreting():
        return "upcast"
    if dtype == torch.float32 and not tf32_allowed():
        return "ieee"
    return "tf32"


@triton.jit
def mma(a, b, acc, DOT_MODE: tl.constexpr):
    """acc + a @ b in fp32 (see dot_mode)."""
    if DOT_MODE == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_MODE)


@triton.jit
def tile_dot(A, B, offs_m, offs_n, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, DOT_MODE: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """A [M, K] @ B [K, N] for the [BLOCK_M, BLOCK_N] tile at offs_m x offs_n, any strides, in fp32.
    A and B have the same dtype (launchers cast a float32 basis once per call, not per tile)."""
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)  # k x stride stays in 64 bits for transposed views
    a_ptrs = A + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = B + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    m_mask = offs_m[:, None] < M
    n_mask = offs_n[None, :] < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=m_mask & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & n_mask, other=0.0)
        acc = mma(a, b, acc, DOT_MODE)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program over an [M, N] output, GROUP_M row tiles at a time so
    that programs running together share their A rows and B columns in L2."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    return pid_m, pid_n


def tile_grid(M: int, N: int, splits: int = 1):
    """Launch grid for kernels that use grouped_tile (axis 1: the split-K index)."""
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), splits)


# ------------------------------------------------------------------ split-K

# Each split reduces at least this many K elements (so a split still streams several tiles),
# and its K range is a multiple of every config's BLOCK_K.
_SPLIT_MIN_K = 512
_SPLIT_ALIGN = 128
# The largest output tile of the GEMM configs: splitting is sized so that even it fills the GPU.
_SPLIT_TILE = 128


class SplitK(NamedTuple):
    splits: int
    k_per_split: int


def split_k(m: int, n: int, k: int, programs: int) -> SplitK:
    """How to split the reduction of an [m, n] = [m, k] @ [k, n] product so that about `programs`
    programs run: only when the output has fewer tiles than that and k is long. That is
    MeCeFO's g = dy^T (x V): m = out features, n = the rank, k = the tokens; at LLaMA-7B
    (m = 4096 or 11008, n = 128) that is 32 or 86 output tiles of 128 x 128 for 132 SMs, each
    looping over all tokens. Each split reduces its own K range into an fp32 partial; the partials are summed
    in a fixed order afterwards (deterministic, unlike atomics)."""
    tiles = max(1, triton.cdiv(m, _SPLIT_TILE) * triton.cdiv(n, _SPLIT_TILE))
    splits = min(triton.cdiv(programs, tiles), k // _SPLIT_MIN_K)
    if splits <= 1:
        return SplitK(1, k)
    per = triton.cdiv(triton.cdiv(k, splits), _SPLIT_ALIGN) * _SPLIT_ALIGN
    return SplitK(triton.cdiv(k, per), per)


def gemm_programs(device: torch.device) -> int:
    """Programs a GEMM should launch to fill the device: two per SM (one on the interpreter)."""
    return 2 * sm_count(device) if device.type == "cuda" else 1
