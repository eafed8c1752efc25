// NAdam (momentum_decay, L2 or decoupled weight decay), as torch.optim.NAdam
// [note: math policies]. Options: beta2, eps, weight_decay, decoupled,
// momentum_decay. States: exp_avg, exp_avg_sq, and per segment the running
// product of the momentum coefficients, mu_product (the per-segment scalar):
// it depends on every past beta1, which a schedule may cycle, so it is kept,
// not recomputed. torch keeps it as a float32 tensor (the default scalar
// dtype); it is rounded to float32 after each product as there.
#pragma once

#include <fusedclr/optimizers/adam.h>
#include <fusedclr/policy.h>
#include <fusedclr/update.h>

#include <cmath>

namespace fusedclr {

struct Nadam : PolicyBase {
  static constexpr int kStates = 2;
  static constexpr int kOptions = 5;
  static constexpr bool kSegmentScalar = true;
  enum : int { kWd = 1, kDecoupled = 2 };
  static constexpr int kVariants = 4;

  static int variant(const double* opt, const bool*) {
    const bool wd = opt[2] != 0.0;
    return (wd ? kWd : 0) | (wd && opt[3] != 0.0 ? kDecoupled : 0);
  }
  template <int V>
  static constexpr bool uses_state(int) {
    return true;
  }

  // mu_t = beta1 * (1 - 0.5 * 0.96^(t * momentum_decay))
  C10_HOST_DEVICE static C10_ALWAYS_INLINE double mu(double beta1, int64_t step, double momentum_decay) {
    return beta1 * (1.0 - 0.5 * ::pow(0.96, static_cast<double>(step) * momentum_decay));
  }

  // mu_product *= mu_step, in float32 as torch's state tensor holds it.
  C10_HOST_DEVICE static C10_ALWAYS_INLINE void advance(double& mu_product, int64_t step, const double* opt,
                                                        const GroupValues& gv) {
    const float mu_step = static_cast<float>(mu(gv.momentum, step, opt[4]));
    mu_product = static_cast<double>(static_cast<float>(mu_product) * mu_step);
  }

  template <typename T>
  struct Scalars {
    AdamMoments<T> moments;
    T eps;
    T bias_correction2;
    T grad_coeff;     // -lr * (1 - mu) / (1 - mu_product)
    T exp_avg_coeff;  // -lr * mu_next / (1 - mu_product * mu_next)
  };

  template <typename T>
  C10_HOST_DEVICE static Scalars<T> scalars(const double* opt, const GroupValues& gv, int64_t step,
                                            double mu_product) {
    const double beta1 = gv.momentum, beta2 = opt[0];
    const double mu_t = mu(beta1, step, opt[4]);
    const double mu_next = mu(beta1, step + 1, opt[4]);
    Scalars<T> k;
    k.moments = adam_moments<T>(gv.lr, beta1, beta2, opt[2]);
    k.eps = static_cast<T>(opt[1]);
    k.bias_correction2 = static_cast<T>(1.0 - ::pow(beta2, static_cast<double>(step)));
    k.grad_coeff = static_cast<T>(-gv.lr * (1.0 - mu_t) / (1.0 - mu_product));
    k.exp_avg_coeff = static_cast<T>(-gv.lr * mu_next / (1.0 - mu_product * mu_next));
    return k;
  }

  template <int V, bool FMA, typename T>
  C10_HOST_DEVICE static C10_ALWAYS_INLINE void update(T& p, T g, T (&s)[kStates], const Scalars<T>& k) {
    adam_moments_update<(V & kWd) != 0, (V & kDecoupled) != 0, FMA>(p, g, s[0], s[1], k.moments);
    const T denom = sqrt_t(s[1] / k.bias_correction2) + k.eps;
    p = p + k.grad_coeff * g / denom;     // param.addcdiv_(grad, denom, value=...)
    p = p + k.exp_avg_coeff * s[0] / denom;  // param.addcdiv_(exp_avg, denom, value=...)
  }
};

}  // namespace fusedclr
