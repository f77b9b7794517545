// Vectorised global memory access shared by the CUDA kernels: N consecutive elements moved
// as one 16-byte load or store when every pointer involved allows it.
#pragma once

#include <cstdint>
#include <initializer_list>

namespace mecefo {

template <typename scalar_t, int N>
struct alignas(sizeof(scalar_t) * N) Pack {
  scalar_t v[N];
};

// Elements per 16-byte vector when every pointer is 16-byte aligned, else 1.
template <typename scalar_t>
int vector_width(std::initializer_list<const void*> pointers) {
  for (const void* ptr : pointers) {
    if (reinterpret_cast<std::uintptr_t>(ptr) % 16 != 0) return 1;
  }
  return 16 / sizeof(scalar_t);
}

}  // namespace mecefo
