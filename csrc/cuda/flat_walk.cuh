// Private helpers of the CUDA kernels (csrc/cuda/optim_cuda.cu): the walk over
// the chunk table, 128-bit loads and stores, and the runtime-bool switch.
// Arithmetic lives in csrc/include/fusedclr/update.h; nothing here knows an
// optimizer.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>
#include <type_traits>

#include <fusedclr/switch.h>

namespace fusedclr {
namespace cuda {

constexpr int kWarp = 32;
constexpr int kThreads = 256;  // per block; kernels declare __launch_bounds__(kThreads)
constexpr int kWarpsPerBlock = kThreads / kWarp;
constexpr int kPackBytes = 16;  // one 128-bit load or store

// Elements per thread per iteration of the vectorized loop: one 128-bit pack
// of the narrowest array, so the wider arrays take two (bf16 param, fp32 state).
template <typename P, typename S>
constexpr int vec_width() {
  return kPackBytes / (sizeof(P) < sizeof(S) ? sizeof(P) : sizeof(S));
}

template <typename X>
struct alignas(kPackBytes) Pack {
  X v[kPackBytes / sizeof(X)];
};

C10_DEVICE inline bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) % kPackBytes) == 0;
}

// N elements of src -> math type T. VECTORIZED: src is 16-byte aligned and N
// fills whole packs.
template <int N, bool VECTORIZED, typename X, typename T>
C10_DEVICE C10_ALWAYS_INLINE void load(const X* src, T (&dst)[N]) {
  if constexpr (VECTORIZED) {
    constexpr int kPer = kPackBytes / sizeof(X);
    static_assert(N % kPer == 0, "a vectorized access covers whole packs");
#pragma unroll
    for (int q = 0; q < N / kPer; ++q) {
      const Pack<X> w = reinterpret_cast<const Pack<X>*>(src)[q];
#pragma unroll
      for (int e = 0; e < kPer; ++e) {
        dst[q * kPer + e] = static_cast<T>(w.v[e]);
      }
    }
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) {
      dst[e] = static_cast<T>(src[e]);
    }
  }
}

template <int N, bool VECTORIZED, typename X, typename T>
C10_DEVICE C10_ALWAYS_INLINE void store(X* dst, const T (&src)[N]) {
  if constexpr (VECTORIZED) {
    constexpr int kPer = kPackBytes / sizeof(X);
    static_assert(N % kPer == 0, "a vectorized access covers whole packs");
#pragma unroll
    for (int q = 0; q < N / kPer; ++q) {
      Pack<X> w;
#pragma unroll
      for (int e = 0; e < kPer; ++e) {
        w.v[e] = static_cast<X>(src[q * kPer + e]);
      }
      reinterpret_cast<Pack<X>*>(dst)[q] = w;
    }
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) {
      dst[e] = static_cast<X>(src[e]);
    }
  }
}

template <int N>
using Width = std::integral_constant<int, N>;

// One warp walks elements [lo, hi): VEC elements per lane per iteration while
// `aligned` (every array's pointer at lo is 16-byte aligned), then the tail
// one element per lane. fn(index, Width<N>, std::bool_constant<VECTORIZED>).
template <int VEC, typename Fn>
C10_DEVICE C10_ALWAYS_INLINE void walk_range(int64_t lo, int64_t hi, bool aligned, Fn&& fn) {
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  int64_t tail = lo;
  if (aligned) {
    const int64_t vec_hi = lo + (hi - lo) / VEC * VEC;
    for (int64_t i = lo + lane * VEC; i < vec_hi; i += kWarp * VEC) {
      fn(i, Width<VEC>{}, std::true_type{});
    }
    tail = vec_hi;
  }
  for (int64_t i = tail + lane; i < hi; i += kWarp) {
    fn(i, Width<1>{}, std::false_type{});
  }
}

}  // namespace cuda
}  // namespace fusedclr
