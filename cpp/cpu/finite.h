// The load-time integrity scan on a background thread (finite.cpp). Its own header, not kernels.h: it pulls in
// <thread>, which the per-ISA kernel files (compiled with their own -m flags) must not instantiate.
#pragma once

#include <atomic>
#include <cstdint>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "kernels.h"

namespace svdq::cpu {

// first_nonfinite's test of byte ranges of a file, run on one background thread started by the constructor, so
// that it overlaps what the caller does meanwhile (a loader assigning the tensors of the checkpoint it scans).
// The thread reads the file (std::ifstream: large reads go straight to the buffer) into a buffer that stays in
// its core's L2, not through a mapping: a fresh mapping's page faults contend with the loader's own (measured:
// bench_load_checks.py). Not copyable;
// the destructor stops the thread at its next block and waits for it (a loader that fails early does not wait
// for the scan of a large checkpoint).
class FiniteScanner {
 public:
  // Opens `path` and checks every range (offsets[b]: byte offset, numel[b] elements of dtypes[b]) against its
  // size; throws std::invalid_argument naming the file or the range. The file is read by the thread.
  FiniteScanner(const std::string& path, std::vector<int64_t> offsets, std::vector<int64_t> numel,
                std::vector<DType> dtypes);
  ~FiniteScanner();
  FiniteScanner(const FiniteScanner&) = delete;
  FiniteScanner& operator=(const FiniteScanner&) = delete;
  // Waits for the scan; the indices (ascending) of the ranges holding NaN or ±inf. Throws std::runtime_error
  // naming the file if it could not be read (it shrank, an I/O error). Later calls return the same.
  std::vector<int64_t> finish();

 private:
  void scan();

  std::string path_;
  std::ifstream file_;  // opened by the constructor, read only by the thread
  std::vector<int64_t> offsets_, numel_;
  std::vector<DType> dtypes_;
  std::vector<int64_t> bad_;  // the thread's until it is joined
  std::string error_;         // likewise: why the file could not be read, empty if it was
  std::atomic<bool> cancel_{false};  // set by the destructor: the thread stops at its next block
  std::thread worker_;        // last: started once the members above exist
};

}  // namespace svdq::cpu
