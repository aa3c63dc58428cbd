// The load-time integrity scan (docs/design.md §5): which of a list of float buffers holds NaN or ±inf.
//
// A float is NaN or infinite exactly when its exponent bits are all ones, so the scan tests the raw bits
// (one AND and one compare per element, no conversion of 16-bit floats). The loop OR-reduces a flag with
// no early exit, so the compiler vectorizes it with the baseline ISA (no flags needed, nothing depends on
// the build host), and it runs at memory speed. Buffers are cut into chunks shared out over the threads,
// because a load's tensors range from a few hundred bytes (a bias) to tens of MiB (a large layer's scales).

#include "finite.h"

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <memory>
#include <stdexcept>
#include <utility>
#include <vector>

#include "kernels.h"

namespace svdq::cpu {
namespace {

template <typename T>
bool any_all_ones(const void* data, int64_t begin, int64_t end, T mask) {
  const T* p = static_cast<const T*>(data);
  T hit = 0;
  for (int64_t i = begin; i < end; ++i) hit |= static_cast<T>((p[i] & mask) == mask);
  return hit != 0;
}

bool chunk_has_nonfinite(const void* data, DType dtype, int64_t begin, int64_t end) {
  switch (dtype) {
    case DType::kFloat32:
      return any_all_ones<uint32_t>(data, begin, end, 0x7F800000u);
    case DType::kBFloat16:
      return any_all_ones<uint16_t>(data, begin, end, static_cast<uint16_t>(0x7F80));
    case DType::kFloat16:
      return any_all_ones<uint16_t>(data, begin, end, static_cast<uint16_t>(0x7C00));
  }
  return false;
}

}  // namespace

int64_t first_nonfinite(const std::vector<const void*>& data, const std::vector<int64_t>& numel,
                        const std::vector<DType>& dtypes, int num_threads) {
  constexpr int64_t kChunk = int64_t{1} << 18;  // elements: a few hundred KiB, many per thread on a big load
  struct Chunk {
    int64_t buffer, begin, end;
  };
  std::vector<Chunk> chunks;
  for (int64_t b = 0; b < static_cast<int64_t>(data.size()); ++b)
    for (int64_t s = 0; s < numel[b]; s += kChunk) chunks.push_back({b, s, std::min(numel[b], s + kChunk)});
  std::vector<uint8_t> bad(data.size(), 0);
  const int64_t n = static_cast<int64_t>(chunks.size());
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, n)));
#pragma omp parallel for num_threads(nt) schedule(dynamic, 4) if (nt > 1)
  for (int64_t c = 0; c < n; ++c) {
    const Chunk& k = chunks[c];
    if (chunk_has_nonfinite(data[k.buffer], dtypes[k.buffer], k.begin, k.end)) bad[k.buffer] = 1;
  }
  for (int64_t b = 0; b < static_cast<int64_t>(bad.size()); ++b)
    if (bad[b]) return b;
  return -1;
}

FiniteScanner::FiniteScanner(const std::string& path, std::vector<int64_t> offsets, std::vector<int64_t> numel,
                             std::vector<DType> dtypes)
    : path_(path), offsets_(std::move(offsets)), numel_(std::move(numel)), dtypes_(std::move(dtypes)) {
  if (offsets_.size() != numel_.size() || offsets_.size() != dtypes_.size())
    throw std::invalid_argument("FiniteScanner: offsets, numel and dtypes must have the same length");
  file_.open(path_, std::ios::binary);
  file_.seekg(0, std::ios::end);
  const int64_t size = file_ ? static_cast<int64_t>(file_.tellg()) : -1;
  if (size < 0) throw std::invalid_argument("FiniteScanner: cannot open " + path_);
  for (size_t b = 0; b < offsets_.size(); ++b) {
    const int64_t es = dtype_size(dtypes_[b]), o = offsets_[b], n = numel_[b];
    if (o < 0 || n < 0 || o % es != 0 || o > size || n > (size - o) / es)
      throw std::invalid_argument("FiniteScanner: range " + std::to_string(b) + " (" + std::to_string(n) +
                                  " elements of " + std::to_string(es) + " bytes at byte " + std::to_string(o) +
                                  ") is not an aligned part of " + path_ + " (" + std::to_string(size) + " bytes)");
  }
  worker_ = std::thread([this] { scan(); });
}

void FiniteScanner::scan() {
  // A multiple of every element size, small enough to stay in L2 between the read and the test.
  constexpr int64_t kBlock = int64_t{1} << 18;
  std::unique_ptr<char[]> block(new char[kBlock]);
  for (size_t b = 0; b < offsets_.size(); ++b) {
    const int64_t es = dtype_size(dtypes_[b]), total = numel_[b] * es;
    bool hit = false;
    if (total > 0) file_.seekg(offsets_[b]);
    for (int64_t done = 0; done < total && !hit; done += kBlock) {
      if (cancel_.load(std::memory_order_relaxed)) return;
      const int64_t want = std::min(kBlock, total - done);
      if (!file_.read(block.get(), want)) {  // the file shrank since the constructor, or an I/O error
        error_ = "FiniteScanner: cannot read " + path_ + " at byte " + std::to_string(offsets_[b] + done);
        return;
      }
      hit = chunk_has_nonfinite(block.get(), dtypes_[b], 0, want / es);
    }
    if (hit) bad_.push_back(static_cast<int64_t>(b));
  }
}

FiniteScanner::~FiniteScanner() {
  cancel_.store(true, std::memory_order_relaxed);
  if (worker_.joinable()) worker_.join();
}

std::vector<int64_t> FiniteScanner::finish() {
  if (worker_.joinable()) worker_.join();
  if (!error_.empty()) throw std::runtime_error(error_);
  return bad_;
}

}  // namespace svdq::cpu
