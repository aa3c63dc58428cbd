// Native test driver: every CPU path this machine runs against the generic path, bit for bit, with no Python
// (so it runs under qemu-user on a cross-compiled build: tests/test_arm_cross.py). The generic path is itself
// tested against reference.py (tests/test_native_cpu.py, tests/test_gemm_cpu.py).
//
//   isa_check            compare every supported path with generic; exit 1 on the first difference
//   isa_check --list     print the supported paths (the run-time detection) and exit
//
// Compared: quantize_act's q_x, s_x and lora_act (the Arm paths keep generic's order of roundings, so
// lora_act is exact too), and gemm_w4a4's y (float32 and the input dtype) on generic's quantized inputs.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/scalar.h"

using namespace svdq::cpu;

namespace {

struct Rng {  // splitmix64: the same inputs on every machine
  uint64_t s;
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  float uniform(float lo, float hi) { return lo + (hi - lo) * static_cast<float>(next() >> 40) / 16777216.0f; }
};

// n values of `dt` (as bytes) from float32 values.
std::vector<uint8_t> encode(const std::vector<float>& v, DType dt) {
  const size_t es = dt == DType::kFloat32 ? 4 : 2;
  std::vector<uint8_t> out(v.size() * es + 16);
  for (size_t i = 0; i < v.size(); ++i) {
    if (dt == DType::kFloat32) {
      std::memcpy(out.data() + 4 * i, &v[i], 4);
    } else {
      const uint16_t h = dt == DType::kBFloat16 ? f32_to_bf16(v[i]) : f32_to_f16(v[i]);
      std::memcpy(out.data() + 2 * i, &h, 2);
    }
  }
  return out;
}

std::vector<float> randoms(Rng& rng, size_t n, float lo, float hi) {
  std::vector<float> v(n);
  for (float& x : v) x = rng.uniform(lo, hi);
  return v;
}

struct Case {
  int64_t M, N, K, R;
  DType dt;
  int threads;
  bool bias;
  bool specials;  // zero groups, outliers, a NaN and an infinity in x
};

const char* dtype_name(DType d) {
  return d == DType::kFloat32 ? "float32" : (d == DType::kBFloat16 ? "bfloat16" : "float16");
}

// Byte-compares `what`; prints the first difference.
bool same(const char* isa, const Case& c, const char* what, const void* a, const void* b, size_t bytes) {
  if (bytes == 0 || std::memcmp(a, b, bytes) == 0) return true;
  size_t i = 0;
  while (static_cast<const uint8_t*>(a)[i] == static_cast<const uint8_t*>(b)[i]) ++i;
  std::printf("MISMATCH %s %s: M=%lld N=%lld K=%lld R=%lld %s threads=%d bias=%d specials=%d, first at byte %zu\n",
              isa, what, (long long)c.M, (long long)c.N, (long long)c.K, (long long)c.R, dtype_name(c.dt), c.threads,
              c.bias, c.specials, i);
  return false;
}

struct Outputs {
  std::vector<uint8_t> q;
  std::vector<float> s, act;
  std::vector<uint8_t> y32, y16;
};

bool check(const std::string& isa, const Case& c, uint64_t seed) {
  Rng rng{seed};
  const int64_t M = c.M, N = c.N, K = c.K, R = c.R, G = K / kGroupSize;
  std::vector<float> x = randoms(rng, M * K, -4.0f, 4.0f);
  if (c.specials && M > 0) {
    for (int64_t k = 0; k < kGroupSize; ++k) x[k] = 0.0f;  // an all-zero group: scale 0
    x[(M - 1) * K + K - 1] = 300.0f;                         // an outlier
    if (M > 1) x[K + 5] = std::nanf("");
    if (M > 2) x[2 * K + 70 % K] = std::numeric_limits<float>::infinity();
  }
  const auto xb = encode(x, c.dt), smooth = encode(randoms(rng, K, 0.25f, 2.0f), c.dt);
  const auto ld = encode(randoms(rng, K * R, -0.5f, 0.5f), c.dt);
  std::vector<uint8_t> qw(N * K / 2 + 1);
  for (auto& b : qw) b = static_cast<uint8_t>(rng.next());
  const auto ws = encode(randoms(rng, N * G, -0.02f, 0.05f), c.dt), lu = encode(randoms(rng, N * R, -1.0f, 1.0f), c.dt);
  const auto bias = encode(randoms(rng, N, -1.0f, 1.0f), c.dt);

  Outputs out[2];
  for (int p = 0; p < 2; ++p) {
    set_isa(p == 0 ? "generic" : isa);
    Outputs& o = out[p];
    o.q.assign(M * K / 2 + 1, 0xAB);
    o.s.assign(M * G + 1, -1.0f);
    o.act.assign(M * R + 1, -1.0f);
    kernels().quantize_act(xb.data(), smooth.data(), R ? ld.data() : nullptr, o.q.data(), o.s.data(),
                           R ? o.act.data() : nullptr, M, K, R, c.dt, c.threads);
    // The GEMM always runs on generic's quantized activations, so it is compared on its own.
    const Outputs& in = out[0];
    for (int yd = 0; yd < 2; ++yd) {
      const DType ydt = yd == 0 ? DType::kFloat32 : c.dt;
      std::vector<uint8_t>& y = yd == 0 ? o.y32 : o.y16;
      y.assign(M * N * (ydt == DType::kFloat32 ? 4 : 2) + 1, 0xCD);
      GemmArgs a{in.q.data(), in.s.data(), R ? in.act.data() : nullptr, qw.data(), ws.data(),
                 R ? lu.data() : nullptr, c.bias ? bias.data() : nullptr, static_cast<int>(c.dt), y.data(),
                 static_cast<int>(ydt), M, N, K, R, c.threads};
      kernels().gemm_w4a4(a);
    }
  }
  const char* name = isa.c_str();
  return same(name, c, "q_x", out[0].q.data(), out[1].q.data(), out[0].q.size()) &&
         same(name, c, "s_x", out[0].s.data(), out[1].s.data(), out[0].s.size() * 4) &&
         same(name, c, "lora_act", out[0].act.data(), out[1].act.data(), out[0].act.size() * 4) &&
         same(name, c, "y float32", out[0].y32.data(), out[1].y32.data(), out[0].y32.size()) &&
         same(name, c, "y dtype", out[0].y16.data(), out[1].y16.data(), out[0].y16.size());
}

std::vector<Case> cases() {
  // (M, N, K): M = 0, 1, odd, the few-rows limit and just past it, many row blocks; N below, at and past
  // 16-column tiles and 4-column direct blocks; K from one group to 12,288.
  const int64_t shapes[][3] = {{0, 17, 64},  {1, 45, 192}, {1, 3, 12288}, {3, 33, 128}, {7, 16, 64},
                               {8, 20, 320}, {9, 47, 256}, {13, 1, 64},   {37, 35, 512}, {70, 18, 12288},
                               {130, 50, 128}};
  const DType dts[] = {DType::kFloat32, DType::kBFloat16, DType::kFloat16};
  const int64_t ranks[] = {0, 1, 32};
  std::vector<Case> out;
  int i = 0;
  for (const auto& s : shapes)
    for (DType dt : dts)
      for (int64_t r : ranks) {
        ++i;
        out.push_back(Case{s[0], s[1], s[2], r, dt, 1 + (i % 3), (i % 4) != 0, (i % 2) == 0});
      }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::string> isas = supported_isas();
  if (argc > 1 && std::string(argv[1]) == "--list") {
    for (const auto& s : isas) std::printf("%s\n", s.c_str());
    return 0;
  }
  int checked = 0;
  for (const auto& isa : isas) {
    if (isa == "generic") continue;
    // The path's peak loop (bench_linear_cpu.py's %) runs and counts its ops: 12 instructions x 2 threads.
    double peak = -1.0, expected = 0.0;
#if defined(SVDQ_HAVE_DOTPROD)
    if (isa == "dotprod") peak = dotprod::int8_peak_ops(2, 1200), expected = 32.0 * 1200 * 2;
#endif
#if defined(SVDQ_HAVE_I8MM)
    if (isa == "i8mm") peak = i8mm::int8_peak_ops(2, 1200), expected = 64.0 * 1200 * 2;
#endif
    if (peak != expected) {
      std::printf("MISMATCH %s int8_peak_ops: %g ops, expected %g\n", isa.c_str(), peak, expected);
      return 1;
    }
    uint64_t seed = 1;
    for (const Case& c : cases())
      if (!check(isa, c, seed++)) return 1;
    std::printf("OK %s: %zu cases bit-identical to generic\n", isa.c_str(), cases().size());
    ++checked;
  }
  std::printf("checked %d paths\n", checked);
  return 0;
}
