// Per-element update math shared by the CPU and CUDA kernels.
//
// [note: update math]
// The arithmetic the optimizers' math policies share (policy.h [note: math
// policies]; each optimizer's own formulas are in optimizers/*.h): torch's
// single-tensor formulas, element by element, in torch's order, so that fp32
// results agree with torch.optim to rounding. T is the math type: float for
// fp32, bf16 and fp16 parameters, double for fp64.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace fusedclr {

// sqrt in the math type. A bare ::sqrt(float) resolves to the C double
// version on the host, which made the CPU loops compute in double (vsqrtpd,
// vdivsd) and ran ~1.6x slower than torch's float math.
C10_HOST_DEVICE inline float sqrt_t(float x) {
  return ::sqrtf(x);
}
C10_HOST_DEVICE inline double sqrt_t(double x) {
  return ::sqrt(x);
}

// [note: rounding as torch]
// Swapping the import must reproduce torch's trajectory, so every formula is
// evaluated in torch's fused kernels' order and the compiler may not contract a
// multiply and an add into one FMA (the CPU kernels build with
// -ffp-contract=off, the CUDA kernels with --fmad=false). torch's CPU kernels fuse exactly where their vector code
// calls fmadd: in lerp, in add with an alpha (`a.add(b, alpha=s)` is
// fma(b, s, a)) and in addcmul (`a.addcmul(t, t, value=s)` is fma(s * t, t, a));
// products and sums elsewhere (mul_, addcdiv, the bias corrections) round
// separately. Those fused steps are explicit here (mul_add), fused where the
// instruction set has FMA (FMA = true: the AVX2/AVX-512 loops, every GPU) and
// rounded twice where it has not, as torch's vectors do there. Measured with
// scripts/bitwise_vs_torch.py against torch's fused CPU optimizers.
C10_HOST_DEVICE inline float fma_t(float a, float b, float c) {
  return ::fmaf(a, b, c);
}
C10_HOST_DEVICE inline double fma_t(double a, double b, double c) {
  return ::fma(a, b, c);
}

template <bool FMA, typename T>
C10_HOST_DEVICE inline T mul_add(T a, T b, T c) {
  if constexpr (FMA) {
    return fma_t(a, b, c);
  } else {
    return a * b + c;
  }
}

// torch's lerp(start, end, weight): start + weight * (end - start) while
// |weight| < 0.5, else end - (1 - weight) * (end - start), each one fused
// multiply-add on FMA hardware [note: rounding as torch]. The weight is
// computed in double, as torch receives it as a Python float.
template <typename T>
struct LerpWeight {
  T coeff;     // weight, or weight - 1 when |weight| >= 0.5
  bool small;  // |weight| < 0.5: lerp from start, else back from end
};

template <typename T>
C10_HOST_DEVICE inline LerpWeight<T> lerp_weight(double weight) {
  LerpWeight<T> w;
  const T t = static_cast<T>(weight);
  w.small = (t < T(0) ? -t : t) < T(0.5);
  w.coeff = w.small ? t : t - T(1);
  return w;
}

// `c ? a : b` for a condition that is the same for every element. On the host
// it is a bit blend: a select in the loop body, next to a bf16 store's NaN test,
// left GCC's CPU loops scalar [note: vectorized conversions].
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T pick(bool c, T a, T b) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return c ? a : b;
#else
  using U = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  static_assert(sizeof(T) == sizeof(U), "pick: a 4- or 8-byte value");
  U ua, ub;
  std::memcpy(&ua, &a, sizeof(T));
  std::memcpy(&ub, &b, sizeof(T));
  const U mask = U(0) - static_cast<U>(c);
  const U r = (ua & mask) | (ub & ~mask);
  T out;
  std::memcpy(&out, &r, sizeof(T));
  return out;
#endif
}

template <bool FMA, typename T>
C10_HOST_DEVICE inline T lerp(T start, T end, const LerpWeight<T>& w) {
  return mul_add<FMA>(w.coeff, end - start, pick(w.small, start, end));
}

// x.mul_(a).addcmul_(y, y, value=b): fma(b * y, y, x * a), as torch's vector
// addcmul fuses [note: rounding as torch].
template <bool FMA, typename T>
C10_HOST_DEVICE inline T decay_add_square(T x, T a, T b, T y) {
  return mul_add<FMA>(b * y, y, x * a);
}

// torch.sign: -1, 0 or 1 (NaN stays NaN).
template <typename T>
C10_HOST_DEVICE inline T sign(T x) {
  return x > T(0) ? T(1) : (x < T(0) ? T(-1) : x);
}

}  // namespace fusedclr
