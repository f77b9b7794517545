// RMSNorm forward/backward for CUDA tensors (schemas in ops.cpp).
//
// Forward: one block per token row; a block reduction gives rstd, a second sweep
// writes y. Backward: a grid-stride loop over rows; each block keeps its own dweight
// partial row in a global [blocks, d] buffer that only it touches (no atomics),
// summed over blocks at the end in the accumulation type.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "checks.h"
#include "reduce.cuh"

namespace mecefo {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t, typename acc_t>
__global__ void rmsnorm_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                                   scalar_t* __restrict__ y, acc_t* __restrict__ rstd, int64_t d,
                                   acc_t eps) {
  __shared__ acc_t scratch[32];
  const int64_t row = blockIdx.x;
  const scalar_t* xr = x + row * d;
  acc_t ss = 0;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    const acc_t v = static_cast<acc_t>(xr[j]);
    ss += v * v;
  }
  ss = block_sum(ss, scratch);
  const acc_t inv = acc_t(1) / sqrt(ss / static_cast<acc_t>(d) + eps);
  if (threadIdx.x == 0) rstd[row] = inv;
  scalar_t* yr = y + row * d;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    // Round xhat to the input dtype before the weight multiply (HF LlamaRMSNorm order).
    const scalar_t xhat = static_cast<scalar_t>(static_cast<acc_t>(xr[j]) * inv);
    yr[j] = static_cast<scalar_t>(static_cast<acc_t>(w[j]) * static_cast<acc_t>(xhat));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void rmsnorm_bwd_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                   const scalar_t* __restrict__ w, const acc_t* __restrict__ rstd,
                                   scalar_t* __restrict__ dx, acc_t* __restrict__ dw_partial,
                                   int64_t rows, int64_t d) {
  __shared__ acc_t scratch[32];
  acc_t* dwp = dw_partial + static_cast<int64_t>(blockIdx.x) * d;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const scalar_t* xr = x + row * d;
    const scalar_t* gr = dy + row * d;
    const acc_t inv = rstd[row];
    acc_t dot = 0;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
      const acc_t xhat = static_cast<acc_t>(xr[j]) * inv;
      const acc_t g = static_cast<acc_t>(gr[j]);
      dot += g * static_cast<acc_t>(w[j]) * xhat;
      dwp[j] += g * xhat;  // column j of this block's partial is owned by this thread
    }
    const acc_t mean = block_sum(dot, scratch) / static_cast<acc_t>(d);
    scalar_t* dxr = dx + row * d;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
      const acc_t xhat = static_cast<acc_t>(xr[j]) * inv;
      const acc_t gw = static_cast<acc_t>(gr[j]) * static_cast<acc_t>(w[j]);
      dxr[j] = static_cast<scalar_t>(inv * (gw - xhat * mean));
    }
  }
}

std::tuple<at::Tensor, at::Tensor> rmsnorm_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                    double eps) {
  check_rmsnorm_inputs("rmsnorm_fwd", x, weight);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto xc = x.contiguous();
  const auto wc = weight.contiguous();
  const int64_t rows = xc.size(0), d = xc.size(1);
  auto y = at::empty_like(xc);
  at::Tensor rstd;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "rmsnorm_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    rstd = at::empty({rows}, xc.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    if (rows == 0) return;
    rmsnorm_fwd_kernel<scalar_t, acc_t><<<rows, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        xc.const_data_ptr<scalar_t>(), wc.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
        rstd.mutable_data_ptr<acc_t>(), d, static_cast<acc_t>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rmsnorm_bwd_cuda(const at::Tensor& dy, const at::Tensor& x,
                                                    const at::Tensor& weight, const at::Tensor& rstd) {
  check_rmsnorm_inputs("rmsnorm_bwd", x, weight);
  check_same_shape("rmsnorm_bwd", "dy", dy, "x", x);
  check_rstd("rmsnorm_bwd", rstd, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto xc = x.contiguous();
  const auto dyc = dy.contiguous().to(x.scalar_type());
  const auto wc = weight.contiguous();
  const auto rc = rstd.contiguous();
  const int64_t rows = xc.size(0), d = xc.size(1);
  auto dx = at::empty_like(xc);
  at::Tensor dw;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "rmsnorm_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(rows, 1024));
    auto partial = at::zeros({blocks, d}, xc.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    if (rows > 0) {
      rmsnorm_bwd_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          dyc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), wc.const_data_ptr<scalar_t>(),
          rc.const_data_ptr<acc_t>(), dx.mutable_data_ptr<scalar_t>(), partial.mutable_data_ptr<acc_t>(),
          rows, d);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    dw = partial.sum(0).to(weight.scalar_type());
  });
  return {dx, dw};
}

}  // namespace
}  // namespace mecefo

TORCH_LIBRARY_IMPL(mecefo, CUDA, m) {
  m.impl("rmsnorm_fwd", &mecefo::rmsnorm_fwd_cuda);
  m.impl("rmsnorm_bwd", &mecefo::rmsnorm_bwd_cuda);
}
