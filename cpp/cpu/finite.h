// The load-time integrity scan on a background thread (finite.cpp). Its own header, not kernels.h: it pulls in
// <thread>, which the per-ISA kernel files (compiled with their own -m flags) must not instantiate.
#pragma once

#include <cstdint>
#include <thread>
#include <vector>

#include "kernels.h"

namespace svdq::cpu {

// first_nonfinite's scan of every buffer, started on one background thread by the constructor, so that it
// overlaps what the caller does meanwhile (the loader reading a checkpoint whose buffers these are). The
// buffers must stay valid until finish() returns. Not copyable; the destructor waits for the thread.
class FiniteScanner {
 public:
  FiniteScanner(std::vector<const void*> data, std::vector<int64_t> numel, std::vector<DType> dtypes);
  ~FiniteScanner();
  FiniteScanner(const FiniteScanner&) = delete;
  FiniteScanner& operator=(const FiniteScanner&) = delete;
  // Waits for the scan; the indices (ascending) of the buffers holding NaN or ±inf. Later calls return the same.
  std::vector<int64_t> finish();

 private:
  std::vector<const void*> data_;
  std::vector<int64_t> numel_;
  std::vector<DType> dtypes_;
  std::vector<int64_t> bad_;  // the thread's until it is joined
  std::thread worker_;        // last: started once the members above exist
};

}  // namespace svdq::cpu
