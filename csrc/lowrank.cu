// MeCeFO's low-rank weight-gradient chain for CUDA tensors (schemas in ops.cpp).
//
// The chain is three skinny GEMMs (lowrank.h); on CUDA each is one cuBLAS call that takes
// bf16/fp16 operands as they are, accumulates in fp32 and rounds in its own epilogue, so
// no fp32 copy of a [tokens, features] operand is ever made and nothing is left to fuse.
// The implementation is the one the CPU registration uses, so both share their math.
#include <torch/library.h>

#include "lowrank.h"

TORCH_LIBRARY_IMPL(mecefo, CUDA, m) {
  m.impl("lowrank_project", &mecefo::lowrank_project_aten);
  m.impl("lowrank_weight_grad", &mecefo::lowrank_weight_grad_aten);
}
