// SwiGLU forward/backward elementwise kernels for CUDA tensors (schemas in ops.cpp).
//
// One pass each: forward reads a, u and writes p; backward reads dp, a, u and writes
// da, du and p (the down projection's weight gradient needs p, and recomputing it here
// is free). The math is swiglu_math.h, shared with the CPU kernels, in fp32 (fp64 for
// fp64) with one rounding per output. Memory-bound, so each thread moves 16 bytes per
// operand per step when every pointer is 16-byte aligned (a grid-stride loop over
// vectors, then a scalar tail), and one element at a time otherwise.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "checks.h"
#include "pack.cuh"
#include "swiglu_math.h"

namespace mecefo {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;

int64_t blocks_for(int64_t work) {
  return std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, kMaxBlocks));
}

template <typename scalar_t, int N>
__global__ void swiglu_fwd_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ u,
                                  scalar_t* __restrict__ p, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, N>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t packs = n / N;
  for (int64_t i = first; i < packs; i += stride) {
    const P av = reinterpret_cast<const P*>(a)[i];
    const P uv = reinterpret_cast<const P*>(u)[i];
    P pv;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const acc_t a_k = static_cast<acc_t>(av.v[k]);
      pv.v[k] = static_cast<scalar_t>(swiglu(a_k, sigmoid(a_k), static_cast<acc_t>(uv.v[k])));
    }
    reinterpret_cast<P*>(p)[i] = pv;
  }
  for (int64_t i = packs * N + first; i < n; i += stride) {
    const acc_t a_i = static_cast<acc_t>(a[i]);
    p[i] = static_cast<scalar_t>(swiglu(a_i, sigmoid(a_i), static_cast<acc_t>(u[i])));
  }
}

template <typename scalar_t, int N>
__global__ void swiglu_bwd_kernel(const scalar_t* __restrict__ dp, const scalar_t* __restrict__ a,
                                  const scalar_t* __restrict__ u, scalar_t* __restrict__ da,
                                  scalar_t* __restrict__ du, scalar_t* __restrict__ p, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, N>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t packs = n / N;
  for (int64_t i = first; i < packs; i += stride) {
    const P gv = reinterpret_cast<const P*>(dp)[i];
    const P av = reinterpret_cast<const P*>(a)[i];
    const P uv = reinterpret_cast<const P*>(u)[i];
    P dav, duv, pv;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const acc_t a_k = static_cast<acc_t>(av.v[k]);
      const auto r = swiglu_grads(static_cast<acc_t>(gv.v[k]), a_k, sigmoid(a_k), static_cast<acc_t>(uv.v[k]));
      dav.v[k] = static_cast<scalar_t>(r.da);
      duv.v[k] = static_cast<scalar_t>(r.du);
      pv.v[k] = static_cast<scalar_t>(r.p);
    }
    reinterpret_cast<P*>(da)[i] = dav;
    reinterpret_cast<P*>(du)[i] = duv;
    reinterpret_cast<P*>(p)[i] = pv;
  }
  for (int64_t i = packs * N + first; i < n; i += stride) {
    const acc_t a_i = static_cast<acc_t>(a[i]);
    const auto r = swiglu_grads(static_cast<acc_t>(dp[i]), a_i, sigmoid(a_i), static_cast<acc_t>(u[i]));
    da[i] = static_cast<scalar_t>(r.da);
    du[i] = static_cast<scalar_t>(r.du);
    p[i] = static_cast<scalar_t>(r.p);
  }
}

at::Tensor swiglu_fwd_cuda(const at::Tensor& a, const at::Tensor& u) {
  check_floating("swiglu_fwd", "a", a);
  check_swiglu_operand("swiglu_fwd", "u", u, a);
  const c10::cuda::CUDAGuard guard(a.device());
  const auto ac = a.contiguous();
  const auto uc = u.contiguous();
  auto p = at::empty_like(ac);
  const int64_t n = ac.numel();
  if (n == 0) return p;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, ac.scalar_type(), "swiglu_fwd_cuda", [&] {
    const scalar_t* ap = ac.const_data_ptr<scalar_t>();
    const scalar_t* up = uc.const_data_ptr<scalar_t>();
    scalar_t* pp = p.mutable_data_ptr<scalar_t>();
    const auto stream = c10::cuda::getCurrentCUDAStream();
    constexpr int kVec = 16 / sizeof(scalar_t);
    if (vector_width<scalar_t>({ap, up, pp}) == kVec) {
      swiglu_fwd_kernel<scalar_t, kVec><<<blocks_for(n / kVec), kThreads, 0, stream>>>(ap, up, pp, n);
    } else {
      swiglu_fwd_kernel<scalar_t, 1><<<blocks_for(n), kThreads, 0, stream>>>(ap, up, pp, n);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> swiglu_bwd_cuda(const at::Tensor& dp, const at::Tensor& a,
                                                               const at::Tensor& u) {
  check_floating("swiglu_bwd", "a", a);
  check_swiglu_operand("swiglu_bwd", "u", u, a);
  check_swiglu_operand("swiglu_bwd", "dp", dp, a);
  const c10::cuda::CUDAGuard guard(a.device());
  const auto ac = a.contiguous();
  const auto uc = u.contiguous();
  const auto gc = dp.contiguous();
  auto da = at::empty_like(ac);
  auto du = at::empty_like(ac);
  auto p = at::empty_like(ac);
  const int64_t n = ac.numel();
  if (n == 0) return {da, du, p};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, ac.scalar_type(), "swiglu_bwd_cuda", [&] {
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    const scalar_t* ap = ac.const_data_ptr<scalar_t>();
    const scalar_t* up = uc.const_data_ptr<scalar_t>();
    scalar_t* dap = da.mutable_data_ptr<scalar_t>();
    scalar_t* dup = du.mutable_data_ptr<scalar_t>();
    scalar_t* pp = p.mutable_data_ptr<scalar_t>();
    const auto stream = c10::cuda::getCurrentCUDAStream();
    constexpr int kVec = 16 / sizeof(scalar_t);
    if (vector_width<scalar_t>({gp, ap, up, dap, dup, pp}) == kVec) {
      swiglu_bwd_kernel<scalar_t, kVec><<<blocks_for(n / kVec), kThreads, 0, stream>>>(gp, ap, up, dap, dup, pp, n);
    } else {
      swiglu_bwd_kernel<scalar_t, 1><<<blocks_for(n), kThreads, 0, stream>>>(gp, ap, up, dap, dup, pp, n);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {da, du, p};
}

}  // namespace
}  // namespace mecefo

TORCH_LIBRARY_IMPL(mecefo, CUDA, m) {
  m.impl("swiglu_fwd", &mecefo::swiglu_fwd_cuda);
  m.impl("swiglu_bwd", &mecefo::swiglu_bwd_cuda);
}
