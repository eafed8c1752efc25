// RAdam (L2 or decoupled weight decay), as torch.optim.RAdam [note: math
// policies]. Options: beta2, eps, weight_decay, decoupled. States: exp_avg,
// exp_avg_sq. beta1 is the group momentum (a schedule may cycle it). Whether
// the variance is rectified (rho_t > 5) depends on the segment's step, so it
// is a variant that refine() picks per segment: a branch in the inner loop kept
// the CPU loop from vectorizing (3x slower than Adam once rectified).
#pragma once

#include <fusedclr/optimizers/adam.h>
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
    AdamMoments<T> moments;
    T eps;
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
    k.moments = adam_moments<T>(gv.lr, beta1, beta2, opt[2]);
    k.eps = static_cast<T>(opt[1]);
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
    adam_moments_update<(V & kWd) != 0, (V & kDecoupled) != 0, FMA>(p, g, s[0], s[1], k.moments);
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
