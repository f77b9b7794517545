// SwiGLU elementwise math, shared by the CPU (ops.cpp) and CUDA (swiglu.cu) kernels so
// both compute exactly the same expressions. acc_t is at::opmath_type of the input:
// float for bf16/fp16/fp32, double for fp64; the caller rounds the results once.
//
//   p  = silu(a) * u,                    silu(a) = a * sigmoid(a)
//   da = dp * u * silu'(a),              silu'(a) = sigmoid(a) * (1 + a * (1 - sigmoid(a)))
//   du = dp * silu(a)
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

namespace mecefo {

template <typename acc_t>
C10_HOST_DEVICE inline acc_t sigmoid(acc_t a) {
  // exp(-a) overflows to inf for very negative a, giving sigmoid = 0 and silu = -0: no NaN.
  return acc_t(1) / (acc_t(1) + std::exp(-a));
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t swiglu(acc_t a, acc_t u) {
  return a * sigmoid(a) * u;
}

template <typename acc_t>
struct SwigluGrads {
  acc_t da, du, p;
};

template <typename acc_t>
C10_HOST_DEVICE inline SwigluGrads<acc_t> swiglu_grads(acc_t dp, acc_t a, acc_t u) {
  const acc_t s = sigmoid(a);
  const acc_t silu = a * s;
  return {dp * u * (s * (acc_t(1) + a * (acc_t(1) - s))), dp * silu, silu * u};
}

}  // namespace mecefo
