// Lookahead (Zhang et al. 2019, "Lookahead Optimizer: k steps forward, 1 step
// back") [note: math policies], run after the inner optimizer's step over the
// same segment table. Every k-th step of a segment (its own step counter,
// which the inner step advanced) the slow weights move towards the fast ones
// and the fast weights restart from them:
//   slow = slow + alpha * (fast - slow);  fast = slow
// Other steps skip the segment: nothing is read or written. Options: k,
// alpha. State: slow (the slow weights, in the math type).
#pragma once

#include <c10/util/Exception.h>

#include <fusedclr/policy.h>
#include <fusedclr/update.h>

namespace fusedclr {

struct Lookahead : PolicyBase {
  static constexpr int kStates = 1;
  static constexpr int kOptions = 2;
  static constexpr int kVariants = 1;
  static constexpr bool kUsesGrad = false;
  static constexpr bool kAdvancesSteps = false;

  static int variant(const double*, const bool*) {
    return 0;
  }
  static void check_options(const char* name, const double* opt) {
    TORCH_CHECK(opt[0] >= 1.0 && opt[0] == static_cast<double>(static_cast<int64_t>(opt[0])), "fusedclr: ", name,
                " synchronises every k >= 1 steps (an integer), got k=", opt[0]);
    TORCH_CHECK(opt[1] >= 0.0 && opt[1] <= 1.0, "fusedclr: ", name, "'s alpha must be in [0, 1], got ", opt[1]);
  }
  template <int V>
  static constexpr bool uses_state(int) {
    return true;
  }

  template <typename T>
  struct Scalars {
    T alpha;
    bool sync;
  };

  template <typename T>
  C10_HOST_DEVICE static Scalars<T> scalars(const double* opt, const GroupValues&, int64_t step, double) {
    const int64_t k = static_cast<int64_t>(opt[0]);
    Scalars<T> s;
    s.alpha = static_cast<T>(opt[1]);
    s.sync = k > 0 && step > 0 && step % k == 0;  // k < 1 is rejected on the host (check_options)
    return s;
  }

  template <typename K>
  C10_HOST_DEVICE static C10_ALWAYS_INLINE bool skip(const K& k) {
    return !k.sync;
  }

  template <int V, bool FMA, typename T>
  C10_HOST_DEVICE static C10_ALWAYS_INLINE void update(T& p, T, T (&s)[kStates], const Scalars<T>& k) {
    s[0] = mul_add<FMA>(k.alpha, p - s[0], s[0]);
    p = s[0];
  }
};

}  // namespace fusedclr
