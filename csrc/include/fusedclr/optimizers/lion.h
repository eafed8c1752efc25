// Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms")
// [note: math policies]: the update is the sign of an interpolation of the
// momentum and the gradient, with decoupled weight decay:
//   c = beta1 * m + (1 - beta1) * g        (m.lerp(g, 1 - beta1))
//   p = p * (1 - lr * weight_decay) - lr * sign(c)
//   m = beta2 * m + (1 - beta2) * g        (m.lerp(g, 1 - beta2))
// Options: beta2, weight_decay. State: exp_avg. beta1 is the group momentum,
// so a schedule may cycle it. sign(0) is 0, as torch.sign.
#pragma once

#include <fusedclr/policy.h>
#include <fusedclr/update.h>

namespace fusedclr {

struct Lion : PolicyBase {
  static constexpr int kStates = 1;
  static constexpr int kOptions = 2;
  enum : int { kWd = 1 };
  static constexpr int kVariants = 2;

  static int variant(const double* opt, const bool*) {
    return opt[1] != 0.0 ? kWd : 0;
  }
  template <int V>
  static constexpr bool uses_state(int) {
    return true;
  }

  template <typename T>
  struct Scalars {
    LerpWeight<T> beta1_weight;
    LerpWeight<T> beta2_weight;
    T lr;
    T decay;  // 1 - lr * weight_decay
  };

  template <typename T>
  C10_HOST_DEVICE static Scalars<T> scalars(const double* opt, const GroupValues& gv, int64_t, double) {
    Scalars<T> k;
    k.beta1_weight = lerp_weight<T>(1.0 - gv.momentum);
    k.beta2_weight = lerp_weight<T>(1.0 - opt[0]);
    k.lr = static_cast<T>(gv.lr);
    k.decay = static_cast<T>(1.0 - gv.lr * opt[1]);
    return k;
  }

  template <int V, bool FMA, typename T>
  C10_HOST_DEVICE static C10_ALWAYS_INLINE void update(T& p, T g, T (&s)[kStates], const Scalars<T>& k) {
    const T c = lerp<FMA>(s[0], g, k.beta1_weight);
    if constexpr ((V & kWd) != 0) {
      p = p * k.decay;
    }
    p = mul_add<FMA>(sign(c), -k.lr, p);
    s[0] = lerp<FMA>(s[0], g, k.beta2_weight);
  }
};

}  // namespace fusedclr
