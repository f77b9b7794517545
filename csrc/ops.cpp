// Operator schemas of the `mecefo` namespace and their CPU implementations.
//
// Every op here is a small, fused primitive; the autograd Functions in
// mecefo_kernels/ops/ compose them. The same schemas get CUDA implementations in
// the csrc/*.cu files (TORCH_LIBRARY_IMPL(mecefo, CUDA, ...)), and fake (meta)
// implementations in Python (mecefo_kernels/ops/*.py) so that torch.compile can
// trace through them.
//
// Conventions shared by every op:
//   * token-major 2-D inputs [T, d] whose last dimension is contiguous;
//   * per-token statistics and reductions accumulate in at::opmath_type<scalar_t>
//     (float for bf16/fp16/fp32, double for fp64) and are returned in that type;
//   * outputs have the dtype of the activation input.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "checks.h"
#include "lowrank.h"
#include "swiglu_math.h"

namespace mecefo {
namespace {

// ---------------------------------------------------------------- RMSNorm
// y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps), per token row.

std::tuple<at::Tensor, at::Tensor> rmsnorm_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                   double eps) {
  check_rmsnorm_inputs("rmsnorm_fwd", x, weight);
  const auto xc = x.contiguous();
  const auto wc = weight.contiguous();
  const int64_t rows = xc.size(0), d = xc.size(1);
  auto y = at::empty_like(xc);
  at::Tensor rstd;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "rmsnorm_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    rstd = at::empty({rows}, xc.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* wp = wc.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    acc_t* rp = rstd.mutable_data_ptr<acc_t>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* xr = xp + r * d;
        acc_t ss = 0;
        for (int64_t j = 0; j < d; ++j) {
          const acc_t v = static_cast<acc_t>(xr[j]);
          ss += v * v;
        }
        const acc_t inv = acc_t(1) / std::sqrt(ss / static_cast<acc_t>(d) + static_cast<acc_t>(eps));
        rp[r] = inv;
        scalar_t* yr = yp + r * d;
        for (int64_t j = 0; j < d; ++j) {
          // Round the normalised value to the input dtype before the weight multiply, as
          // HF's LlamaRMSNorm does, so normal mode matches the unpatched model.
          const scalar_t xhat = static_cast<scalar_t>(static_cast<acc_t>(xr[j]) * inv);
          yr[j] = static_cast<scalar_t>(static_cast<acc_t>(wp[j]) * static_cast<acc_t>(xhat));
        }
      }
    });
  });
  return {y, rstd};
}

// dx = rstd * (dy*w - xhat * mean(dy*w*xhat)),  dw = sum_tokens dy * xhat.
std::tuple<at::Tensor, at::Tensor> rmsnorm_bwd_cpu(const at::Tensor& dy, const at::Tensor& x,
                                                   const at::Tensor& weight, const at::Tensor& rstd) {
  check_rmsnorm_inputs("rmsnorm_bwd", x, weight);
  check_same_shape("rmsnorm_bwd", "dy", dy, "x", x);
  check_rstd("rmsnorm_bwd", rstd, x);
  const auto xc = x.contiguous();
  const auto dyc = dy.contiguous().to(x.scalar_type());
  const auto wc = weight.contiguous();
  const auto rc = rstd.contiguous();
  const int64_t rows = xc.size(0), d = xc.size(1);
  auto dx = at::empty_like(xc);
  at::Tensor dw;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "rmsnorm_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    // One dw partial per worker thread, summed at the end in acc_t: no atomics, and
    // the result does not depend on how rows were split.
    const int64_t workers = at::get_num_threads();
    auto partial = at::zeros({workers, d}, xc.options().dtype(acc_dtype));
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* gp = dyc.const_data_ptr<scalar_t>();
    const scalar_t* wp = wc.const_data_ptr<scalar_t>();
    const acc_t* rp = rc.const_data_ptr<acc_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    acc_t* pp = partial.mutable_data_ptr<acc_t>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      acc_t* dwr = pp + at::get_thread_num() * d;
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* xr = xp + r * d;
        const scalar_t* gr = gp + r * d;
        const acc_t inv = rp[r];
        acc_t dot = 0;
        for (int64_t j = 0; j < d; ++j) {
          const acc_t xhat = static_cast<acc_t>(xr[j]) * inv;
          const acc_t g = static_cast<acc_t>(gr[j]);
          dot += g * static_cast<acc_t>(wp[j]) * xhat;
          dwr[j] += g * xhat;
        }
        const acc_t mean = dot / static_cast<acc_t>(d);
        scalar_t* dxr = dxp + r * d;
        for (int64_t j = 0; j < d; ++j) {
          const acc_t xhat = static_cast<acc_t>(xr[j]) * inv;
          const acc_t gw = static_cast<acc_t>(gr[j]) * static_cast<acc_t>(wp[j]);
          dxr[j] = static_cast<scalar_t>(inv * (gw - xhat * mean));
        }
      }
    });
    dw = partial.sum(0).to(weight.scalar_type());
  });
  return {dx, dw};
}

// ---------------------------------------------------------------- SwiGLU
// p = silu(a) * u and its backward, elementwise over any shape (math in swiglu_math.h).

constexpr int64_t kElementwiseGrain = 32768;

// sigmoid(a) in the accumulation type, from ATen's vectorised kernel (see swiglu_math.h).
at::Tensor sigmoid_acc(const at::Tensor& a) {
  return at::sigmoid(a.to(a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
}

at::Tensor swiglu_fwd_cpu(const at::Tensor& a, const at::Tensor& u) {
  check_floating("swiglu_fwd", "a", a);
  check_swiglu_operand("swiglu_fwd", "u", u, a);
  const auto ac = a.contiguous();
  const auto uc = u.contiguous();
  const auto sig = sigmoid_acc(ac);
  auto p = at::empty_like(ac);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, ac.scalar_type(), "swiglu_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* ap = ac.const_data_ptr<scalar_t>();
    const scalar_t* up = uc.const_data_ptr<scalar_t>();
    const acc_t* sp = sig.const_data_ptr<acc_t>();
    scalar_t* pp = p.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, ac.numel(), kElementwiseGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        pp[i] = static_cast<scalar_t>(swiglu(static_cast<acc_t>(ap[i]), sp[i], static_cast<acc_t>(up[i])));
      }
    });
  });
  return p;
}

// -> (da, du, p); p is recomputed here because the down projection's weight gradient needs
// it and a, u are already loaded.
std::tuple<at::Tensor, at::Tensor, at::Tensor> swiglu_bwd_cpu(const at::Tensor& dp, const at::Tensor& a,
                                                              const at::Tensor& u) {
  check_floating("swiglu_bwd", "a", a);
  check_swiglu_operand("swiglu_bwd", "u", u, a);
  check_swiglu_operand("swiglu_bwd", "dp", dp, a);
  const auto ac = a.contiguous();
  const auto uc = u.contiguous();
  const auto gc = dp.contiguous();
  const auto sig = sigmoid_acc(ac);
  auto da = at::empty_like(ac);
  auto du = at::empty_like(ac);
  auto p = at::empty_like(ac);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, ac.scalar_type(), "swiglu_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* ap = ac.const_data_ptr<scalar_t>();
    const scalar_t* up = uc.const_data_ptr<scalar_t>();
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    const acc_t* sp = sig.const_data_ptr<acc_t>();
    scalar_t* dap = da.mutable_data_ptr<scalar_t>();
    scalar_t* dup = du.mutable_data_ptr<scalar_t>();
    scalar_t* pp = p.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, ac.numel(), kElementwiseGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const auto r = swiglu_grads(static_cast<acc_t>(gp[i]), static_cast<acc_t>(ap[i]), sp[i],
                                    static_cast<acc_t>(up[i]));
        dap[i] = static_cast<scalar_t>(r.da);
        dup[i] = static_cast<scalar_t>(r.du);
        pp[i] = static_cast<scalar_t>(r.p);
      }
    });
  });
  return {da, du, p};
}

}  // namespace
}  // namespace mecefo

TORCH_LIBRARY(mecefo, m) {
  m.def("rmsnorm_fwd(Tensor x, Tensor weight, float eps) -> (Tensor y, Tensor rstd)");
  m.def("rmsnorm_bwd(Tensor dy, Tensor x, Tensor weight, Tensor rstd) -> (Tensor dx, Tensor dweight)");
  m.def("swiglu_fwd(Tensor a, Tensor u) -> Tensor p");
  m.def("swiglu_bwd(Tensor dp, Tensor a, Tensor u) -> (Tensor da, Tensor du, Tensor p)");
  m.def("lowrank_project(Tensor x, Tensor basis) -> Tensor xv");
  m.def("lowrank_weight_grad(Tensor dy, Tensor xv, Tensor basis, ScalarType out_dtype) -> Tensor dweight");
}

TORCH_LIBRARY_IMPL(mecefo, CPU, m) {
  m.impl("rmsnorm_fwd", &mecefo::rmsnorm_fwd_cpu);
  m.impl("rmsnorm_bwd", &mecefo::rmsnorm_bwd_cpu);
  m.impl("swiglu_fwd", &mecefo::swiglu_fwd_cpu);
  m.impl("swiglu_bwd", &mecefo::swiglu_bwd_cpu);
  m.impl("lowrank_project", &mecefo::lowrank_project_aten);
  m.impl("lowrank_weight_grad", &mecefo::lowrank_weight_grad_aten);
}
