// The Python face of the compiled library: `import mecefo_kernels._C` loads the
// shared object, whose static initialisers register the `mecefo::` ops with the
// dispatcher. The module itself only reports how it was built. (The CMake build
// leaves this file out and produces a plain library for torch.ops.load_library.)
#include <Python.h>

#ifdef MECEFO_WITH_CUDA
#include <cuda.h>
#endif

static struct PyModuleDef mecefo_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                             "mecefo_kernels compiled ops (registered as torch.ops.mecefo.*)",
                                             -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&mecefo_c_module);
  if (m == nullptr) return nullptr;
#ifdef MECEFO_WITH_CUDA
  PyModule_AddIntConstant(m, "with_cuda", 1);
  PyModule_AddIntConstant(m, "cuda_version", CUDA_VERSION);
#else
  PyModule_AddIntConstant(m, "with_cuda", 0);
  PyModule_AddIntConstant(m, "cuda_version", 0);
#endif
  return m;
}
