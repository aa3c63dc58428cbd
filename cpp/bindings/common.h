// What every binding file shares: the argument checks that turn a wrong size, pointer or code into a
// ValueError naming the function and the argument (bindings/module.cpp says why they exist), and the
// functions that add each part's entry points to the module.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "cpu/fixedpoint.h"
#include "cpu/kernels.h"

namespace svdq::bindings {

namespace py = pybind11;

// The entry points of each part, added to _C by module.cpp.
void add_cpu(py::module_& m);   // cpu.cpp: the CPU kernels, the CPU path, the load-time scan
void add_cuda(py::module_& m);  // cuda.cpp: the CUDA kernels (nothing without them)

[[noreturn]] inline void fail(const std::string& msg) { throw py::value_error(msg); }

inline std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + v[i];
  return s;
}

// A Python int holding an address. Negative or too-large values are a ValueError naming the
// argument, not pybind11's generic TypeError.
inline uintptr_t as_ptr(const char* fn, const char* name, const py::int_& v) {
  const unsigned long long p = PyLong_AsUnsignedLongLong(v.ptr());
  if (PyErr_Occurred()) {
    PyErr_Clear();
    fail(std::string(fn) + ": " + name + " must be a non-negative address (e.g. tensor.data_ptr()), got " +
         py::str(v).cast<std::string>());
  }
  if (p > std::numeric_limits<uintptr_t>::max()) fail(std::string(fn) + ": " + name + " is not an address");
  return static_cast<uintptr_t>(p);
}

inline void check_size(const char* fn, const char* name, int64_t v) {
  if (v < 0) fail(std::string(fn) + ": " + name + " must be >= 0, got " + std::to_string(v));
}

// a * b must fit in int64 (both already >= 0).
inline void check_product(const char* fn, const char* an, int64_t a, const char* bn, int64_t b) {
  if (b != 0 && a > std::numeric_limits<int64_t>::max() / b)
    fail(std::string(fn) + ": " + an + " * " + bn + " overflows (" + an + "=" + std::to_string(a) + ", " +
         bn + "=" + std::to_string(b) + ")");
}

// K must be whole INT4 groups (the CUDA kernels' group size is the same: cuda.cpp's static_assert).
inline void check_groups(const char* fn, int64_t K) {
  if (K % svdq::cpu::kGroupSize != 0)
    fail(std::string(fn) + ": K must be a multiple of " + std::to_string(svdq::cpu::kGroupSize) + ", got K=" +
         std::to_string(K));
}

inline void check_ptr(const char* fn, const char* name, uintptr_t p, int64_t numel) {
  if (p == 0 && numel > 0)
    fail(std::string(fn) + ": " + name + " is a null pointer but holds " + std::to_string(numel) +
         " elements");
}

inline void check_dtype(const char* fn, const char* name, int64_t code) {
  if (code < 0 || code > 2)
    fail(std::string(fn) + ": " + name + " must be 0 (float32), 1 (bfloat16) or 2 (float16), got " +
         std::to_string(code));
}

inline void check_threads(const char* fn, int64_t n) {
  if (n < 1 || n > 4096)
    fail(std::string(fn) + ": num_threads must be in [1, 4096], got " + std::to_string(n));
}

// fixed_point_add's arguments (the CPU and CUDA entry points): K within 2^24, offset within ±512, and the
// buffers of a packed K x K sum.
inline void check_fixed_point(const char* fn, int64_t K, int64_t offset, uintptr_t ints, uintptr_t item,
                              uintptr_t exponents) {
  check_size(fn, "K", K);
  if (K > (int64_t{1} << 24)) fail(std::string(fn) + ": K must be at most 2^24, got K=" + std::to_string(K));
  if (offset < -512 || offset > 512)
    fail(std::string(fn) + ": offset must be in [-512, 512], got " + std::to_string(offset));
  const int64_t n = svdq::cpu::packed_size(K);
  check_ptr(fn, "ints", ints, n);
  check_ptr(fn, "item", item, n);
  check_ptr(fn, "exponents", exponents, K);
}

}  // namespace svdq::bindings
