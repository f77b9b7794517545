// Argument checks shared by the CPU (ops.cpp) and CUDA (*.cu) implementations.
// Messages name the op, the argument and what was received, so a bad call fails
// with a sentence rather than a stride error deep inside a kernel.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace mecefo {

inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be a floating-point tensor, got dtype ", t.scalar_type());
}

inline void check_rmsnorm_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight) {
  check_floating(op, "x", x);
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [tokens, hidden], got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1), op,
              ": weight must have shape [", x.size(1), "] to match x ", x.sizes(), ", got ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight dtype ", weight.scalar_type(),
              " does not match x dtype ", x.scalar_type());
  TORCH_CHECK(weight.device() == x.device(), op, ": weight is on ", weight.device(), " but x is on ",
              x.device());
}

inline void check_same_shape(const char* op, const char* a_name, const at::Tensor& a, const char* b_name,
                             const at::Tensor& b) {
  TORCH_CHECK(a.sizes() == b.sizes(), op, ": ", a_name, " shape ", a.sizes(), " does not match ", b_name,
              " shape ", b.sizes());
  TORCH_CHECK(a.device() == b.device(), op, ": ", a_name, " is on ", a.device(), " but ", b_name,
              " is on ", b.device());
}

inline void check_rstd(const char* op, const at::Tensor& rstd, const at::Tensor& x) {
  const auto want = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(rstd.dim() == 1 && rstd.size(0) == x.size(0), op, ": rstd must have shape [", x.size(0),
              "], got ", rstd.sizes());
  TORCH_CHECK(rstd.scalar_type() == want, op, ": rstd must be ", want, " for x of dtype ",
              x.scalar_type(), ", got ", rstd.scalar_type());
}

// SwiGLU's elementwise operands: same shape, dtype and device as the gate pre-activation a.
inline void check_swiglu_operand(const char* op, const char* name, const at::Tensor& t, const at::Tensor& a) {
  check_floating(op, name, t);
  TORCH_CHECK(t.sizes() == a.sizes(), op, ": ", name, " shape ", t.sizes(), " does not match a shape ",
              a.sizes());
  TORCH_CHECK(t.scalar_type() == a.scalar_type(), op, ": ", name, " dtype ", t.scalar_type(),
              " does not match a dtype ", a.scalar_type());
  TORCH_CHECK(t.device() == a.device(), op, ": ", name, " is on ", t.device(), " but a is on ", a.device());
}

}  // namespace mecefo
