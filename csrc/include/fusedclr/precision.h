// How an update writes low-precision parameters: the precision opt-ins shared
// by the CPU and CUDA kernels (fusedclr/reference.py holds the Python twin).
//
// [note: precision opt-ins]
// bf16 and fp16 parameters are updated in fp32 and rounded once per step when
// stored. Three opt-ins change what is kept and how it is rounded:
//
// * bf16 states (bf16 parameters only): exp_avg, exp_avg_sq, max_exp_avg_sq
//   and momentum_buffer live in bf16; the math stays fp32 and each state is
//   rounded to nearest even once per step (14 B/param Adam, DESIGN.md §4).
// * master weights (bf16 or fp16 parameters): an fp32 flat buffer
//   `master_param` holds the parameters at full precision. The update reads
//   the master, writes it back and stores the parameter as the master rounded
//   to nearest even, so updates smaller than half a bf16 ulp still accumulate.
//   A parameter that no longer equals its rounded master was written outside
//   the optimizer (a model.load_state_dict, an init, a manual edit): that value
//   wins and the master restarts from it (master_or_param). The check costs
//   nothing in memory traffic, since the parameter is read anyway.
// * stochastic rounding (bf16 parameters, without master weights): the
//   parameter is stored rounded up with probability equal to the distance to
//   the bf16 value below, in units of its ulp, so the rounding error is zero
//   in expectation and small updates are not lost on average. The 16 random
//   bits of element i come from a counter-based hash of (seed, the segment's
//   step count, i): no RNG state, the same bits on every backend and in a run
//   resumed from a checkpoint, and no two steps or elements share a draw
//   unless their 32-bit hashes collide.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <fusedclr/update.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace fusedclr {

// How the update stores the parameter (a template parameter of the kernels).
enum class ParamWrite : int {
  kRound = 0,       // round the math value to the parameter dtype (nearest even)
  kMaster = 1,      // read/write the fp32 master, store its rounding
  kStochastic = 2,  // bf16 only: stochastic rounding with hashed bits
};

template <ParamWrite W>
using WriteMode = std::integral_constant<ParamWrite, W>;

// The allowed modes of parameter type P, kRound first; anything else is
// rejected on the host (check_precision in the kernels' validation), so the
// switch below never instantiates a meaningless kernel.
template <typename P>
constexpr bool is_low_precision() {
  return sizeof(P) == 2;
}

// Runs fn(WriteMode<W>{}) for the mode the arguments select. Only bf16 gets a
// stochastic kernel and only bf16/fp16 a master kernel.
template <typename P, typename Fn>
decltype(auto) switch_write(bool master, bool stochastic, Fn&& fn) {
  if constexpr (is_low_precision<P>()) {
    if (master) {
      return fn(WriteMode<ParamWrite::kMaster>{});
    }
    if constexpr (std::is_same_v<P, c10::BFloat16>) {
      if (stochastic) {
        return fn(WriteMode<ParamWrite::kStochastic>{});
      }
    }
  }
  return fn(WriteMode<ParamWrite::kRound>{});
}

// [note: vectorized conversions]
// Conversions between the storage types and the math type, as static_cast
// does them (c10's rounding to nearest-even), written so that GCC vectorizes
// the CPU loops around them. c10's own host conversions hold branches: bf16's
// `if (isnan)`, next to the loop's other tests, left the loops scalar (bf16
// AdamW at 3.7 ns per element against fp32's 0.6), and fp16's both ways left
// every fp16 loop scalar on CPUs without AVX-512 (10-20x fp32's step time on an
// AVX2 EPYC). Here the NaN and subnormal cases are picks (update.h): bf16 with
// c10's bits (NaN to 0x7FC0); fp16 with the bit-level method c10 uses without
// F16C (subnormals through a magic-number float, NaN to 0x7E00), equal to it
// for every half and every float tried (tests/test_cpu_vectorized.py). The device
// casts as usual.
C10_HOST_DEVICE C10_ALWAYS_INLINE float float_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

C10_HOST_DEVICE C10_ALWAYS_INLINE uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// fp16 bits -> float, exactly: a normal half's exponent and mantissa moved into
// place and rebiased by a power-of-two scale (infinities and NaNs included); a
// subnormal's mantissa read as a float with a fixed exponent, less that bias.
C10_HOST_DEVICE C10_ALWAYS_INLINE float half_bits_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t unsigned2 = w + w;  // the sign shifted out
  const float normal = float_from_bits((unsigned2 >> 4) + (UINT32_C(0xE0) << 23)) * 0x1.0p-112f;
  const float subnormal = float_from_bits((unsigned2 >> 17) | (UINT32_C(126) << 23)) - 0.5f;
  return float_from_bits((w & UINT32_C(0x80000000)) |
                         pick(unsigned2 < (UINT32_C(1) << 27), bits_of(subnormal), bits_of(normal)));
}

// float -> fp16 bits, to nearest-even: |x| scaled up and back down (overflow to
// infinity, and the rounding done by the float adder against a power of two
// whose exponent puts the half's last mantissa bit at the float's last bit).
C10_HOST_DEVICE C10_ALWAYS_INLINE uint16_t float_to_half_bits(float x) {
  const uint32_t w = bits_of(x);
  const uint32_t unsigned2 = w + w;
  float base = (float_from_bits(w & UINT32_C(0x7FFFFFFF)) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t bias = std::max(unsigned2 & UINT32_C(0xFF000000), UINT32_C(0x71000000));
  base = float_from_bits((bias >> 1) + UINT32_C(0x07800000)) + base;
  const uint32_t b = bits_of(base);
  const uint32_t magnitude = ((b >> 13) & UINT32_C(0x7C00)) + (b & UINT32_C(0x0FFF));
  return static_cast<uint16_t>(((w & UINT32_C(0x80000000)) >> 16) |
                               pick(unsigned2 > UINT32_C(0xFF000000), UINT32_C(0x7E00), magnitude));
}

// A storage value as the math type T.
template <typename T, typename P>
C10_HOST_DEVICE C10_ALWAYS_INLINE T from_storage(P x) {
#if !defined(__CUDA_ARCH__) && !defined(__HIP_DEVICE_COMPILE__)
  if constexpr (std::is_same_v<P, c10::Half>) {
    return static_cast<T>(half_bits_to_float(x.x));
  }
#endif
  return static_cast<T>(x);
}

// A math-type value rounded to nearest-even into P, as static_cast<P> does.
template <typename P, typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE P to_storage(T x) {
#if !defined(__CUDA_ARCH__) && !defined(__HIP_DEVICE_COMPILE__)
  if constexpr (std::is_same_v<P, c10::BFloat16>) {
    const float f = static_cast<float>(x);
    const uint32_t bits = bits_of(f);
    const uint32_t rounded = (bits + UINT32_C(0x7FFF) + ((bits >> 16) & 1u)) >> 16;
    return c10::BFloat16(static_cast<uint16_t>(pick(f != f, UINT32_C(0x7FC0), rounded)),
                         c10::BFloat16::from_bits());
  } else if constexpr (std::is_same_v<P, c10::Half>) {
    return c10::Half(float_to_half_bits(static_cast<float>(x)), c10::Half::from_bits());
  }
#endif
  return static_cast<P>(x);
}

// The value an update starts from under master weights: the master while the
// parameter still holds its rounding, otherwise the parameter (written outside
// the optimizer) [note: precision opt-ins].
template <typename P>
C10_HOST_DEVICE C10_ALWAYS_INLINE float master_or_param(float master, P param) {
  const float stored = from_storage<float>(param);
  return from_storage<float>(to_storage<P>(master)) == stored ? master : stored;
}

// 32-bit integer finalizer with low bias (the "lowbias32" constants).
C10_HOST_DEVICE C10_ALWAYS_INLINE uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// Per (seed, step) key of the stochastic-rounding hash; once per chunk.
C10_HOST_DEVICE C10_ALWAYS_INLINE uint32_t rounding_key(int64_t seed, int64_t step) {
  return mix32(static_cast<uint32_t>(seed) ^ mix32(static_cast<uint32_t>(step) * 0x9E3779B9u));
}

// fp32 -> bf16 bits, rounded stochastically with the hash of (key, index).
// Adding 16 uniform bits below the bf16 mantissa and truncating rounds up with
// probability (x - down) / ulp. NaN keeps round-to-nearest's quiet NaN; an
// infinity stays infinite (its low bits are zero, the sum never carries).
C10_HOST_DEVICE C10_ALWAYS_INLINE c10::BFloat16 round_stochastic(float x, uint32_t key, int64_t index) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const uint32_t noise = mix32(key ^ static_cast<uint32_t>(index)) >> 16;
  const uint16_t up = static_cast<uint16_t>((bits + noise) >> 16);
  return x != x ? c10::BFloat16(x) : c10::BFloat16(up, c10::BFloat16::from_bits());
}


// The math-type value an update starts from (`master`: the element of
// master_param, read only under kMaster).
template <ParamWrite W, typename T, typename P>
C10_HOST_DEVICE C10_ALWAYS_INLINE T read_param(P param, float master) {
  if constexpr (W == ParamWrite::kMaster) {
    return master_or_param(master, param);
  } else {
    return from_storage<T>(param);
  }
}

// The parameter value to store for the updated math value `x` of element
// `index`; under kMaster also writes the master.
template <ParamWrite W, typename P, typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE P write_param(T x, float& master, uint32_t key, int64_t index) {
  if constexpr (W == ParamWrite::kMaster) {
    master = x;
    return to_storage<P>(x);
  } else if constexpr (W == ParamWrite::kStochastic) {
    return round_stochastic(x, key, index);
  } else {
    return to_storage<P>(x);
  }
}

}  // namespace fusedclr
