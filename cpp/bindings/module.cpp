// diffusers_svdquant._C: the one native module.
//
// The boundary carries no PyTorch types: tensors arrive as data pointers (Python ints, e.g.
// `t.data_ptr()`) plus sizes, and ops.py owns dtype/shape/contiguity checks on the torch side.
// Everything a kernel relies on is validated here again, because a wrong size or a null pointer
// would otherwise be a segfault in the user's process instead of a ValueError.
//
// The module is assembled from its parts: cpu.cpp (CPU kernels and paths, the load-time scans) and cuda.cpp
// (the CUDA kernels, when built), sharing the argument checks of common.h.

#include <pybind11/pybind11.h>

#include "bindings/common.h"
#include "cpu/kernels.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "SVDQuant W4A4 native kernels (raw pointers + sizes; no PyTorch types).";
  // The INT4 group size the kernels are built for (reference.GROUP_SIZE on the Python side).
  m.attr("GROUP_SIZE") = py::int_(svdq::cpu::kGroupSize);

  svdq::bindings::add_cpu(m);
  m.def(
      "has_cuda",
      [] {
#if defined(SVDQ_HAVE_CUDA_KERNELS)
        return true;
#else
        return false;
#endif
      },
      "Whether CUDA kernels were compiled into this build.");
  svdq::bindings::add_cuda(m);
}
