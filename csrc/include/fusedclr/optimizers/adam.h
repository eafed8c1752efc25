// Adam and AdamW (amsgrad, L2 or decoupled weight decay), as torch.optim.Adam
// and AdamW [note: math policies]. Options: beta2, eps, weight_decay,
// decoupled. States: exp_avg, exp_avg_sq, max_exp_avg_sq (amsgrad only).
// beta1 is the group momentum, so a schedule may cycle it.
#pragma once

#include <fusedclr/policy.h>
#include <fusedclr/update.h>

#include <cmath>

namespace fusedclr {

// What the Adam family (Adam/AdamW, RAdam, NAdam) shares: the weight decay
// (L2 or decoupled) and the two moments, in torch's order, and their scalars.
template <typename T>
struct AdamMoments {
  LerpWeight<T> beta1_weight;  // 1 - beta1, in double as torch passes it
  T beta2;
  T one_minus_beta2;
  T weight_decay;
  T decay;  // 1 - lr * weight_decay (decoupled only)
};

template <typename T>
C10_HOST_DEVICE inline AdamMoments<T> adam_moments(double lr, double beta1, double beta2, double weight_decay) {
  AdamMoments<T> k;
  k.beta1_weight = lerp_weight<T>(1.0 - beta1);
  k.beta2 = static_cast<T>(beta2);
  k.one_minus_beta2 = static_cast<T>(1.0 - beta2);
  k.weight_decay = static_cast<T>(weight_decay);
  k.decay = static_cast<T>(1.0 - lr * weight_decay);
  return k;
}

// Weight decay (WD: on; DECOUPLED: param.mul_(1 - lr * wd), else
// grad.add(param, alpha=wd)), then exp_avg.lerp_(grad, 1 - beta1) and
// exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2).
template <bool WD, bool DECOUPLED, bool FMA, typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE void adam_moments_update(T& p, T& g, T& m, T& v, const AdamMoments<T>& k) {
  if constexpr (WD) {
    if constexpr (DECOUPLED) {
      p = p * k.decay;
    } else {
      g = mul_add<FMA>(p, k.weight_decay, g);
    }
  }
  m = lerp<FMA>(m, g, k.beta1_weight);
  v = decay_add_square<FMA>(v, k.beta2, k.one_minus_beta2, g);
}

struct Adam : PolicyBase {
  static constexpr int kStates = 3;
  static constexpr int kOptions = 4;
  enum : int { kWd = 1, kDecoupled = 2, kAmsgrad = 4 };
  static constexpr int kVariants = 8;

  // Decoupled without weight decay is plain Adam: one variant for both.
  static int variant(const double* opt, const bool* has_state) {
    const bool wd = opt[2] != 0.0;
    return (wd ? kWd : 0) | (wd && opt[3] != 0.0 ? kDecoupled : 0) | (has_state[2] ? kAmsgrad : 0);
  }
  template <int V>
  static constexpr bool uses_state(int s) {
    return s < 2 || (V & kAmsgrad) != 0;
  }

  template <typename T>
  struct Scalars {
    AdamMoments<T> moments;
    T eps;
    T step_size;  // lr / (1 - beta1^step)
    T bc2_sqrt;   // sqrt(1 - beta2^step)
  };

  template <typename T>
  C10_HOST_DEVICE static Scalars<T> scalars(const double* opt, const GroupValues& gv, int64_t step, double) {
    const double beta1 = gv.momentum, beta2 = opt[0], s = static_cast<double>(step);
    Scalars<T> k;
    k.moments = adam_moments<T>(gv.lr, beta1, beta2, opt[2]);
    k.eps = static_cast<T>(opt[1]);
    k.step_size = static_cast<T>(gv.lr / (1.0 - ::pow(beta1, s)));
    k.bc2_sqrt = static_cast<T>(::sqrt(1.0 - ::pow(beta2, s)));
    return k;
  }

  template <int V, bool FMA, typename T>
  C10_HOST_DEVICE static C10_ALWAYS_INLINE void update(T& p, T g, T (&s)[kStates], const Scalars<T>& k) {
    adam_moments_update<(V & kWd) != 0, (V & kDecoupled) != 0, FMA>(p, g, s[0], s[1], k.moments);
    T second = s[1];
    if constexpr ((V & kAmsgrad) != 0) {
      s[2] = s[2] > s[1] ? s[2] : s[1];
      second = s[2];
    }
    const T denom = sqrt_t(second) / k.bc2_sqrt + k.eps;
    p = p - k.step_size * s[0] / denom;  // param.addcdiv_(exp_avg, denom, value=-step_size)
  }
};

}  // namespace fusedclr
