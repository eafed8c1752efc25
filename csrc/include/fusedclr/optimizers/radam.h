// RAdam (L2 or decoupled weight decay), as torch.optim.RAdam [note: math
// policies]. Options: beta2, eps, weight_decay, decoupled. States: exp_avg,
// exp_avg_sq. beta1 is the group momentum (a schedule may cycle it). Whether
// the variance is rectified (rho_t > 5) depends on the segment's step, so it
// is a variant that refine() picks per segment: a branch in the inner loop kept
// the CPU loop from vectorizing (3x slower than Adam once rectified).
#pragma once

#include <fusedclr/policy.h>
#include <fusedclr/update.h>

#include <cmath>

namespace fusedclr {

struct Radam : PolicyBase {
  static constexpr int kStates = 2;
  static constexpr int kOptions = 4;
  enum : int { kWd = 1, kDecoupled = 2, kRectified = 4 };
  static constexpr int kVariants = 4;  // kRectified is added per segment by refine()

  static int variant(const double* opt, const bool*) {
    const bool wd = opt[2] != 0.0;
    return (wd ? kWd : 0) | (wd && opt[3] != 0.0 ? kDecoupled : 0);
  }
  template <int V>
  static constexpr bool uses_state(int) {
    return true;
  }

  template <typename T>
  struct Scalars {
    LerpWeight<T> beta1_weight;
    T beta2;
    T one_minus_beta2;
    T eps;
    T weight_decay;
    T decay;  // 1 - lr * weight_decay (decoupled only)
    T bias_correction1;
    T lr;
    T bc2_sqrt;  // sqrt(1 - beta2^step)
    T rect;      // the variance rectification term
    bool rectified;  // rho_t > 5
  };

  template <typename T>
  C10_HOST_DEVICE static Scalars<T> scalars(const double* opt, const GroupValues& gv, int64_t step, double) {
    const double beta1 = gv.momentum, beta2 = opt[0], s = static_cast<double>(step);
    const double bc2 = 1.0 - ::pow(beta2, s);
    const double rho_inf = 2.0 / (1.0 - beta2) - 1.0;
    const double rho_t = rho_inf - 2.0 * s * ::pow(beta2, s) / bc2;
    Scalars<T> k;
    k.beta1_weight = lerp_weight<T>(1.0 - beta1);
    k.beta2 = static_cast<T>(beta2);
    k.one_minus_beta2 = static_cast<T>(1.0 - beta2);
    k.eps = static_cast<T>(opt[1]);
    k.weight_decay = static_cast<T>(opt[2]);
    k.decay = static_cast<T>(1.0 - gv.lr * opt[2]);
    k.bias_correction1 = static_cast<T>(1.0 - ::pow(beta1, s));
    k.lr = static_cast<T>(gv.lr);
    k.bc2_sqrt = static_cast<T>(::sqrt(bc2));
    k.rectified = rho_t > 5.0;
    const double rect_sq = (rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t);
    k.rect = k.rectified ? static_cast<T>(::sqrt(rect_sq)) : T(0);
    return k;
  }

  template <int V, typename K, typename Fn>
  C10_HOST_DEVICE static C10_ALWAYS_INLINE void refine(const K& k, Fn&& fn) {
    if (k.rectified) {
      fn(Variant<V | kRectified>{});
    } else {
      fn(Variant<V & ~kRectified>{});
    }
  }

  template <int V, bool FMA, typename T>
  C10_HOST_DEVICE static C10_ALWAYS_INLINE void update(T& p, T g, T (&s)[kStates], const Scalars<T>& k) {
    if constexpr ((V & kWd) != 0) {
      if constexpr ((V & kDecoupled) != 0) {
        p = p * k.decay;
      } else {
        g = mul_add<FMA>(p, k.weight_decay, g);
      }
    }
    s[0] = lerp<FMA>(s[0], g, k.beta1_weight);
    s[1] = decay_add_square<FMA>(s[1], k.beta2, k.one_minus_beta2, g);
    const T step = s[0] / k.bias_correction1 * k.lr;  // bias_corrected_exp_avg * lr
    if constexpr ((V & kRectified) != 0) {
      // * (sqrt(bc2) / (exp_avg_sq.sqrt() + eps)) * rect
      p = p - step * (k.bc2_sqrt / (sqrt_t(s[1]) + k.eps)) * k.rect;
    } else {
      p = p - step;
    }
  }
};

}  // namespace fusedclr
