// MeCeFO's low-rank weight gradient through ATen GEMMs, shared by the CPU (ops.cpp) and
// CUDA (lowrank.cu) registrations.
//
// For y = x W^T (W [out, in], x [T, in], dy [T, out]) and an orthonormal basis V [in, r]:
//
//   xv = x V              [T, r]     lowrank_project
//   g  = dy^T xv          [out, r]   } lowrank_weight_grad
//   dW = g V^T            [out, in]  }
//
// a chain of skinny GEMMs that never forms dy^T x. Every product takes its operands in the
// activation dtype (V is rounded to it, as a bf16 nn.Linear would hold it), accumulates in
// at::opmath_type (fp32, fp64 for fp64) and rounds its result once to the activation dtype
// (the last one to out_dtype): the precision of cuBLAS's own bf16 weight gradient.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>

#include "checks.h"

namespace mecefo {

// a [m, k] @ b [k, n] (same dtype) accumulated in opmath, rounded to out_dtype. On CUDA,
// cuBLAS takes bf16/fp16 operands directly with fp32 accumulation (no fp32 copies of the
// [T, d] operands); on CPU the operands are widened first, which is the same arithmetic.
inline at::Tensor mm_accumulate(const at::Tensor& a, const at::Tensor& b, at::ScalarType out_dtype) {
  const auto dtype = a.scalar_type();
  const bool reduced = dtype == at::kBFloat16 || dtype == at::kHalf;
  if (!reduced) return at::mm(a, b).to(out_dtype);
  if (a.is_cuda()) {
    if (out_dtype == dtype) return at::mm(a, b);  // cuBLAS: fp32 compute, one rounding
    return at::mm(a, b, at::kFloat).to(out_dtype);
  }
  return at::mm(a.to(at::kFloat), b.to(at::kFloat)).to(out_dtype);
}

inline void check_lowrank_basis(const char* op, const at::Tensor& basis, int64_t in_features,
                                const char* ref_name, const at::Tensor& ref) {
  check_floating(op, "basis", basis);
  TORCH_CHECK(basis.dim() == 2 && basis.size(0) == in_features, op, ": basis must have shape [",
              in_features, ", rank], got ", basis.sizes());
  TORCH_CHECK(basis.device() == ref.device(), op, ": basis is on ", basis.device(), " but ", ref_name,
              " is on ", ref.device());
}

// x [T, in], basis [in, r] -> x V [T, r] in x's dtype.
inline at::Tensor lowrank_project_aten(const at::Tensor& x, const at::Tensor& basis) {
  const char* op = "lowrank_project";
  check_floating(op, "x", x);
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [tokens, in_features], got shape ", x.sizes());
  check_lowrank_basis(op, basis, x.size(1), "x", x);
  return mm_accumulate(x, basis.to(x.scalar_type()), x.scalar_type());
}

// dy [T, out], xv [T, r], basis [in, r] -> (dy^T xv) V^T [out, in] in out_dtype.
inline at::Tensor lowrank_weight_grad_aten(const at::Tensor& dy, const at::Tensor& xv, const at::Tensor& basis,
                                           at::ScalarType out_dtype) {
  const char* op = "lowrank_weight_grad";
  check_floating(op, "dy", dy);
  TORCH_CHECK(dy.dim() == 2, op, ": dy must be 2-D [tokens, out_features], got shape ", dy.sizes());
  TORCH_CHECK(basis.dim() == 2, op, ": basis must be 2-D [in_features, rank], got shape ", basis.sizes());
  TORCH_CHECK(xv.dim() == 2 && xv.size(0) == dy.size(0) && xv.size(1) == basis.size(1), op,
              ": xv must have shape [", dy.size(0), ", ", basis.size(1), "] (tokens of dy, rank of basis), got ",
              xv.sizes());
  TORCH_CHECK(xv.scalar_type() == dy.scalar_type(), op, ": xv dtype ", xv.scalar_type(),
              " does not match dy dtype ", dy.scalar_type());
  check_lowrank_basis(op, basis, basis.size(0), "dy", dy);
  TORCH_CHECK(xv.device() == dy.device(), op, ": xv is on ", xv.device(), " but dy is on ", dy.device());
  TORCH_CHECK(at::isFloatingType(out_dtype), op, ": out_dtype must be floating, got ", out_dtype);
  const auto act = dy.scalar_type();
  const at::Tensor g = mm_accumulate(dy.t(), xv, act);  // [out, r]
  return mm_accumulate(g, basis.to(act).t(), out_dtype);
}

}  // namespace mecefo
