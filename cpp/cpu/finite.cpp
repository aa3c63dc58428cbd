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

FiniteScanner::FiniteScanner(std::vector<const void*> data, std::vector<int64_t> numel, std::vector<DType> dtypes)
    : data_(std::move(data)), numel_(std::move(numel)), dtypes_(std::move(dtypes)), worker_([this] {
        for (size_t b = 0; b < data_.size(); ++b)
          if (numel_[b] > 0 && chunk_has_nonfinite(data_[b], dtypes_[b], 0, numel_[b]))
            bad_.push_back(static_cast<int64_t>(b));
      }) {}

FiniteScanner::~FiniteScanner() { finish(); }

std::vector<int64_t> FiniteScanner::finish() {
  if (worker_.joinable()) worker_.join();
  return bad_;
}

}  // namespace svdq::cpu
