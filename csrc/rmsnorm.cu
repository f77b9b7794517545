// RMSNorm forward/backward for CUDA tensors (schemas in ops.cpp).
//
// Forward: one block per token row; a block reduction gives rstd, a second sweep
// writes y.
//
// Backward: a grid-stride loop over rows, with as many blocks as fit on the GPU at once.
// Each thread owns a fixed set of 16-byte packs of a row (pack p = threadIdx.x + i * blockDim.x),
// the same for every row, so:
//  * its dweight columns are private to it: the block's dweight partial is accumulated in
//    shared memory without synchronisation and written to the global [blocks, d] buffer once,
//    at the end (summed over blocks afterwards in the accumulation type: deterministic, no
//    atomics). Accumulating in the global row itself cost a read-modify-write of d floats per
//    row, more traffic than the row's inputs and outputs together;
//  * w is loaded once per block, and a row's x and dy are read from memory once: the first
//    kCachedPacks packs per thread stay in registers between the sweep that reduces the row
//    and the one that writes dx (a whole row up to d = 8192 in bf16/fp16, 4096 in fp32 at
//    512 threads, with no spills: more cached packs spill); only the rest of a wider row is
//    read twice;
//  * loads and stores are 16 bytes wide when d and every pointer allow it (pack.cuh).
// When d accumulators do not fit in shared memory (fp32 partials past ~56K columns on H100,
// ~40K on A100), the partial accumulates in its global row instead: same ownership, no atomics.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "checks.h"
#include "pack.cuh"
#include "reduce.cuh"

namespace mecefo {
namespace {

constexpr int kFwdThreads = 256;

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

constexpr int kBwdMaxThreads = 512;
constexpr int kCachedPacks = 2;  // packs of x, dy and w per thread kept in registers

// dot(dy * w, xhat) over one pack, and dweight[k] += dy[k] * xhat[k] (dw[k * dw_stride]).
template <typename scalar_t, typename acc_t, int N>
__device__ __forceinline__ acc_t accumulate_pack(const Pack<scalar_t, N>& x, const Pack<scalar_t, N>& g,
                                                 const Pack<scalar_t, N>& w, acc_t inv, acc_t* dw,
                                                 int64_t dw_stride) {
  acc_t dot = 0;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const acc_t xhat = static_cast<acc_t>(x.v[k]) * inv;
    const acc_t gk = static_cast<acc_t>(g.v[k]);
    dot += gk * static_cast<acc_t>(w.v[k]) * xhat;
    dw[k * dw_stride] += gk * xhat;
  }
  return dot;
}

// dx = rstd * (dy * w - xhat * mean(dy * w * xhat)) over one pack.
template <typename scalar_t, typename acc_t, int N>
__device__ __forceinline__ Pack<scalar_t, N> input_grad_pack(const Pack<scalar_t, N>& x, const Pack<scalar_t, N>& g,
                                                             const Pack<scalar_t, N>& w, acc_t inv, acc_t mean) {
  Pack<scalar_t, N> dx;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const acc_t xhat = static_cast<acc_t>(x.v[k]) * inv;
    const acc_t gw = static_cast<acc_t>(g.v[k]) * static_cast<acc_t>(w.v[k]);
    dx.v[k] = static_cast<scalar_t>(inv * (gw - xhat * mean));
  }
  return dx;
}

template <typename scalar_t, typename acc_t, int N>
__global__ void __launch_bounds__(kBwdMaxThreads)
    rmsnorm_bwd_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                       const scalar_t* __restrict__ w, const acc_t* __restrict__ rstd, scalar_t* __restrict__ dx,
                       acc_t* __restrict__ dw_partial, int64_t rows, int64_t d, bool dw_in_shared) {
  using P = Pack<scalar_t, N>;
  __shared__ acc_t scratch[32];
  extern __shared__ __align__(16) unsigned char dynamic_smem[];
  const int64_t packs = d / N;
  const int64_t threads = blockDim.x;
  // Element k of pack p lives at dw[p * pack_stride + k * elem_stride]: element-major in shared
  // memory (consecutive threads hit consecutive banks), the natural layout in global memory.
  acc_t* dw = dw_in_shared ? reinterpret_cast<acc_t*>(dynamic_smem) : dw_partial + blockIdx.x * d;
  const int64_t pack_stride = dw_in_shared ? 1 : N;
  const int64_t elem_stride = dw_in_shared ? packs : 1;
  for (int64_t p = threadIdx.x; p < packs; p += threads) {
#pragma unroll
    for (int k = 0; k < N; ++k) dw[p * pack_stride + k * elem_stride] = acc_t(0);
  }
  const P* wp = reinterpret_cast<const P*>(w);
  P w_cached[kCachedPacks];
#pragma unroll
  for (int i = 0; i < kCachedPacks; ++i) {
    const int64_t p = threadIdx.x + i * threads;
    if (p < packs) w_cached[i] = wp[p];
  }
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const P* xp = reinterpret_cast<const P*>(x + row * d);
    const P* gp = reinterpret_cast<const P*>(dy + row * d);
    P* dxp = reinterpret_cast<P*>(dx + row * d);
    const acc_t inv = rstd[row];
    P x_cached[kCachedPacks], g_cached[kCachedPacks];
    acc_t dot = 0;
#pragma unroll
    for (int i = 0; i < kCachedPacks; ++i) {
      const int64_t p = threadIdx.x + i * threads;
      if (p < packs) {
        x_cached[i] = xp[p];
        g_cached[i] = gp[p];
        dot += accumulate_pack(x_cached[i], g_cached[i], w_cached[i], inv, dw + p * pack_stride, elem_stride);
      }
    }
    for (int64_t p = threadIdx.x + kCachedPacks * threads; p < packs; p += threads) {
      dot += accumulate_pack(xp[p], gp[p], wp[p], inv, dw + p * pack_stride, elem_stride);
    }
    const acc_t mean = block_sum(dot, scratch) / static_cast<acc_t>(d);
#pragma unroll
    for (int i = 0; i < kCachedPacks; ++i) {
      const int64_t p = threadIdx.x + i * threads;
      if (p < packs) dxp[p] = input_grad_pack(x_cached[i], g_cached[i], w_cached[i], inv, mean);
    }
    for (int64_t p = threadIdx.x + kCachedPacks * threads; p < packs; p += threads) {
      dxp[p] = input_grad_pack(xp[p], gp[p], wp[p], inv, mean);
    }
  }
  if (dw_in_shared) {  // each thread copies out the columns it owns: no barrier needed
    acc_t* out = dw_partial + blockIdx.x * d;
    for (int64_t p = threadIdx.x; p < packs; p += threads) {
#pragma unroll
      for (int k = 0; k < N; ++k) out[p * N + k] = dw[p + k * packs];
    }
  }
}

// Launches the backward with packs of N elements; returns dweight in the accumulation type.
template <typename scalar_t, int N>
at::Tensor rmsnorm_bwd_launch(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w,
                              const at::Tensor& rstd, at::Tensor& dx) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = x.size(0), d = x.size(1);
  const int threads = static_cast<int>(std::clamp<int64_t>((d / N + 31) / 32 * 32, 32, kBwdMaxThreads));
  const auto kernel = rmsnorm_bwd_kernel<scalar_t, acc_t, N>;
  int device = 0, sms = 0, smem_default = 0, smem_optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_default, cudaDevAttrMaxSharedMemoryPerBlock, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const size_t static_smem = 32 * sizeof(acc_t);
  const size_t dw_bytes = static_cast<size_t>(d) * sizeof(acc_t);
  const bool dw_in_shared = dw_bytes + static_smem <= static_cast<size_t>(smem_optin);
  const size_t smem = dw_in_shared ? dw_bytes : 0;
  if (smem + static_smem > static_cast<size_t>(smem_default)) {  // past 48 KB a kernel must opt in
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
  const int64_t blocks =
      std::max<int64_t>(1, std::min<int64_t>(rows, static_cast<int64_t>(std::max(per_sm, 1)) * sms));
  // every block zeroes and writes its whole row, also when it gets no rows (rows == 0)
  at::Tensor partial = at::empty({blocks, d}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  kernel<<<blocks, threads, smem, c10::cuda::getCurrentCUDAStream()>>>(
      dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
      rstd.const_data_ptr<acc_t>(), dx.mutable_data_ptr<scalar_t>(), partial.mutable_data_ptr<acc_t>(), rows, d,
      dw_in_shared);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partial.sum(0);
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
    rmsnorm_fwd_kernel<scalar_t, acc_t><<<rows, kFwdThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
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
  auto dx = at::empty_like(xc);
  at::Tensor dw;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "rmsnorm_bwd_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vectorised = xc.size(1) % kVec == 0 &&
                            vector_width<scalar_t>({dyc.const_data_ptr(), xc.const_data_ptr(), wc.const_data_ptr(),
                                                    dx.const_data_ptr()}) == kVec;
    const auto dw_acc = vectorised ? rmsnorm_bwd_launch<scalar_t, kVec>(dyc, xc, wc, rc, dx)
                                   : rmsnorm_bwd_launch<scalar_t, 1>(dyc, xc, wc, rc, dx);
    dw = dw_acc.to(weight.scalar_type());
  });
  return {dx, dw};
}

}  // namespace
}  // namespace mecefo

TORCH_LIBRARY_IMPL(mecefo, CUDA, m) {
  m.impl("rmsnorm_fwd", &mecefo::rmsnorm_fwd_cuda);
  m.impl("rmsnorm_bwd", &mecefo::rmsnorm_bwd_cuda);
}
