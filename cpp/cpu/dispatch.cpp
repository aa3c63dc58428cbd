// Run-time choice of the CPU path. Compiled with no ISA flags: this file runs on every CPU and
// must not contain a single instruction the oldest x86-64 (or the base Armv8-A, or any other target) lacks.
//
// x86: a path is usable when the CPU reports its instructions (cpuid) AND the OS saves the register
// state they need (XCR0 via xgetbv); a hypervisor or kernel can disable AVX/AVX-512 state even
// on hardware that has them, and using them then faults.
// AArch64: the kernel reports what user space may run (getauxval HWCAP/HWCAP2 on Linux and Android,
// sysctl hw.optional.arm.FEAT_* on macOS); the NEON registers are always saved.
//
// Adding a path (ggml-style feature bundles): write cpp/cpu/<name>.cpp in namespace
// svdq::cpu::<name>, give it its flags in CMakeLists.txt, declare it in kernels.h, and add one
// row to kIsas below. A path that does not override a kernel points its slot at generic::.

#include <atomic>
#include <cstdint>

#include "kernels.h"

#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64) || defined(_M_IX86)
#define SVDQ_X86 1
#if defined(_MSC_VER)
#include <intrin.h>
#else
#include <cpuid.h>
#endif
#endif
#if defined(SVDQ_X86) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#if defined(__aarch64__) || defined(_M_ARM64)
#define SVDQ_ARM64 1
#if defined(__linux__) || defined(__ANDROID__)
#include <sys/auxv.h>
#elif defined(__APPLE__)
#include <sys/sysctl.h>
#endif
#endif

namespace svdq::cpu {
namespace {

struct CpuFeatures {
  bool os_avx = false;     // XCR0: SSE and AVX state (bits 1, 2)
  bool os_avx512 = false;  // XCR0: plus opmask and ZMM state (bits 5, 6, 7)
  bool avx = false, fma = false, f16c = false, avx2 = false;
  bool avx512f = false, avx512dq = false, avx512bw = false, avx512vl = false, avx512vnni = false;
  bool avxvnni = false;
  bool dotprod = false, i8mm = false;  // AArch64: sdot/udot (Armv8.2-A), smmla (Armv8.6-A)
  bool avx512bf16 = false, amx_tile = false, amx_bf16 = false;
  bool os_amx = false;       // XCR0: tile configuration and tile data state (bits 17, 18)
  bool amx_granted = false;  // Linux let this process use the tile data (arch_prctl ARCH_REQ_XCOMP_PERM)
};

#if defined(SVDQ_X86)
void cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
#if defined(_MSC_VER)
  int v[4];
  __cpuidex(v, static_cast<int>(leaf), static_cast<int>(sub));
  for (int i = 0; i < 4; ++i) r[i] = static_cast<uint32_t>(v[i]);
#else
  __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]);
#endif
}

uint64_t xcr0() {
#if defined(_MSC_VER)
  return _xgetbv(0);
#else
  // Raw xgetbv: the _xgetbv intrinsic would need -mxsave on this file.
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
#endif
}
#endif

#if defined(SVDQ_ARM64) && defined(__APPLE__)
bool sysctl_flag(const char* name) {
  int v = 0;
  size_t size = sizeof v;
  return sysctlbyname(name, &v, &size, nullptr, 0) == 0 && v != 0;
}
#endif

CpuFeatures detect() {
  CpuFeatures f;
#if defined(SVDQ_ARM64) && (defined(__linux__) || defined(__ANDROID__))
  // The bit numbers of the Linux uapi (asm/hwcap.h), spelled out for older headers.
  constexpr unsigned long kHwcapAsimdDp = 1ul << 20, kHwcap2I8mm = 1ul << 13;
  f.dotprod = (getauxval(AT_HWCAP) & kHwcapAsimdDp) != 0;
  f.i8mm = (getauxval(AT_HWCAP2) & kHwcap2I8mm) != 0;
#elif defined(SVDQ_ARM64) && defined(__APPLE__)
  f.dotprod = sysctl_flag("hw.optional.arm.FEAT_DotProd");
  f.i8mm = sysctl_flag("hw.optional.arm.FEAT_I8MM");
#endif
#if defined(SVDQ_X86)
  uint32_t r[4];
  cpuid(0, 0, r);
  const uint32_t max_leaf = r[0];
  if (max_leaf < 1) return f;
  cpuid(1, 0, r);
  const bool osxsave = (r[2] >> 27) & 1;
  f.avx = (r[2] >> 28) & 1;
  f.fma = (r[2] >> 12) & 1;
  f.f16c = (r[2] >> 29) & 1;
  if (osxsave) {  // xgetbv faults unless the OS enabled XSAVE
    const uint64_t x = xcr0();
    f.os_avx = (x & 0x6) == 0x6;
    f.os_avx512 = (x & 0xe6) == 0xe6;
    f.os_amx = (x & 0x60000) == 0x60000;
  }
  if (max_leaf >= 7) {
    cpuid(7, 0, r);
    const uint32_t max_sub = r[0];
    f.avx2 = (r[1] >> 5) & 1;
    f.avx512f = (r[1] >> 16) & 1;
    f.avx512dq = (r[1] >> 17) & 1;
    f.avx512bw = (r[1] >> 30) & 1;
    f.avx512vl = (r[1] >> 31) & 1;
    f.avx512vnni = (r[2] >> 11) & 1;
    f.amx_bf16 = (r[3] >> 22) & 1;
    f.amx_tile = (r[3] >> 24) & 1;
    if (max_sub >= 1) {
      cpuid(7, 1, r);
      f.avxvnni = (r[0] >> 4) & 1;
      f.avx512bf16 = (r[0] >> 5) & 1;
    }
  }
#if defined(__linux__)
  // Linux (5.16+) hands out the 8 KiB tile data state per process on request; without it the first tile
  // instruction faults. ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18.
  if (f.amx_tile && f.os_amx) f.amx_granted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
#endif
#endif
  return f;
}

const CpuFeatures& features() {
  static const CpuFeatures f = detect();
  return f;
}

#if defined(SVDQ_HAVE_AVX512VNNI)
// What the avx512vnni path needs, and the avx512bf16 and amx paths on top of theirs.
bool runs_avx512vnni(const CpuFeatures& f) {
  return f.os_avx && f.os_avx512 && f.avx2 && f.fma && f.f16c && f.avx512f && f.avx512bw && f.avx512vl &&
         f.avx512dq && f.avx512vnni;
}
#endif

struct IsaEntry {
  const char* name;
  bool (*runs_on)(const CpuFeatures&);
  KernelTable table;
};

// From the most portable to the fastest: the default is the last row this CPU runs.
const IsaEntry kIsas[] = {
    {"generic",
     [](const CpuFeatures&) { return true; },
     {generic::quantize_act, generic::gemm_w4a4, generic::pack_tile, generic::linear_w4a16,
      generic::dequantize_w4a16, nullptr}},
#if defined(SVDQ_HAVE_AVX2)
    {"avx2",
     [](const CpuFeatures& f) { return f.os_avx && f.avx && f.avx2 && f.fma && f.f16c; },
     {avx2::quantize_act, avx2::gemm_w4a4, avx2::pack_tile, avx2::linear_w4a16, avx2::dequantize_w4a16,
      nullptr, nullptr, true, avx2::linear_w4a16_bf16}},
#endif
#if defined(SVDQ_HAVE_AVXVNNI)
    // The GEMM and the bf16 W4A16 GEMV with VEX vpdpbusd; quantize_act and the other W4A16 kernels stay AVX2.
    {"avxvnni",
     [](const CpuFeatures& f) { return f.os_avx && f.avx && f.avx2 && f.fma && f.f16c && f.avxvnni; },
     {avx2::quantize_act, avxvnni::gemm_w4a4, avxvnni::pack_tile, avx2::linear_w4a16, avx2::dequantize_w4a16,
      nullptr, nullptr, true, avxvnni::linear_w4a16_bf16, avxvnni::linear_w4a16_bf16_gemm}},
#endif
#if defined(SVDQ_HAVE_AVX512VNNI)
    // The GEMM, quantize_act and W4A16 on zmm registers (EVEX vpdpbusd; AVX512VL/DQ/BW for the ymm
    // parts they share).
    {"avx512vnni",
     runs_avx512vnni,
     {avx512::quantize_act, avx512vnni::gemm_w4a4, avx512vnni::pack_tile, avx512::linear_w4a16,
      avx512::dequantize_w4a16, nullptr, nullptr, true, avx512::linear_w4a16_bf16,
      avx512::linear_w4a16_bf16_gemm}},
#endif
#if defined(SVDQ_HAVE_AVX512BF16)
    // avx512vnni with the many-rows W4A16 linear on zmm vdpbf16ps (w4a16_dpbf16.cpp): AVX512-BF16 without AMX
    // (Zen 4 and 5, Cooper Lake), where torch's bf16 GEMM is fast and dequantized panels lose to it.
    {"avx512bf16",
     [](const CpuFeatures& f) { return runs_avx512vnni(f) && f.avx512bf16; },
     {avx512::quantize_act, avx512vnni::gemm_w4a4, avx512vnni::pack_tile, avx512::linear_w4a16,
      avx512::dequantize_w4a16, avx512bf16::linear_w4a16, nullptr, true, avx512::linear_w4a16_bf16,
      avx512::linear_w4a16_bf16_gemm}},
#endif
#if defined(SVDQ_HAVE_AMX)
    // avx512vnni with AMX-BF16 tiles where a bf16 layer gains from them: the W4A4 low-rank branch (the GEMM's
    // up projection, gemm_avx512amx.cpp; the whole linear's down projection, quantize_avx512amx.cpp) and the
    // many-rows W4A16 linear (w4a16_amx.cpp).
    {"amx",
     [](const CpuFeatures& f) {
       return runs_avx512vnni(f) && f.avx512bf16 && f.amx_tile && f.amx_bf16 && f.os_amx && f.amx_granted;
     },
     {avx512::quantize_act, avx512amx::gemm_w4a4, avx512amx::pack_tile, avx512::linear_w4a16,
      avx512::dequantize_w4a16, amx::linear_w4a16, avx512amx::quantize_act, true, avx512::linear_w4a16_bf16,
      avx512::linear_w4a16_bf16_gemm}},
#endif
#if defined(SVDQ_HAVE_DOTPROD)
    // The sdot GEMM and NEON quantize_act; pack_tile and W4A16 are generic's.
    {"dotprod",
     [](const CpuFeatures& f) { return f.dotprod; },
     {neon::quantize_act, dotprod::gemm_w4a4, generic::pack_tile, generic::linear_w4a16,
      generic::dequantize_w4a16, nullptr}},
#endif
#if defined(SVDQ_HAVE_I8MM)
    // The smmla GEMM (gemm_i8mm.cpp, which also uses sdot in its few-rows path).
    {"i8mm",
     [](const CpuFeatures& f) { return f.dotprod && f.i8mm; },
     {neon::quantize_act, i8mm::gemm_w4a4, generic::pack_tile, generic::linear_w4a16, generic::dequantize_w4a16,
      nullptr}},
#endif
};

const IsaEntry* best_entry() {
  const IsaEntry* best = &kIsas[0];
  for (const IsaEntry& e : kIsas)
    if (e.runs_on(features())) best = &e;
  return best;
}

std::atomic<const IsaEntry*>& current_entry() {
  static std::atomic<const IsaEntry*> current{best_entry()};
  return current;
}

}  // namespace

const KernelTable& kernels() { return current_entry().load(std::memory_order_acquire)->table; }

const char* current_isa() { return current_entry().load(std::memory_order_acquire)->name; }

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (const IsaEntry& e : kIsas)
    if (e.runs_on(features())) out.emplace_back(e.name);
  return out;
}

std::vector<std::string> known_isas() {
  std::vector<std::string> out;
  for (const IsaEntry& e : kIsas) out.emplace_back(e.name);
  return out;
}

bool set_isa(const std::string& name) {
  for (const IsaEntry& e : kIsas) {
    if (name == e.name) {
      if (!e.runs_on(features())) return false;
      current_entry().store(&e, std::memory_order_release);
      return true;
    }
  }
  return false;
}

}  // namespace svdq::cpu
