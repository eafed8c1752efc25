// RMSprop (centered, momentum), as torch.optim.RMSprop [note: math policies].
// Options: alpha, eps, weight_decay. States: square_avg, grad_avg (centered
// only), momentum_buffer (only when the group has momentum or a schedule
// cycles it). The group momentum may come from a schedule; a step whose
// momentum is 0 runs without the buffer, as torch's `if momentum > 0`.
#pragma once

#include <fusedclr/policy.h>
#include <fusedclr/update.h>

namespace fusedclr {

struct Rmsprop : PolicyBase {
  static constexpr int kStates = 3;
  static constexpr int kOptions = 3;
  enum : int { kWd = 1, kCentered = 2, kBuf = 4 };
  static constexpr int kVariants = 8;

  static int variant(const double* opt, const bool* has_state) {
    return (opt[2] != 0.0 ? kWd : 0) | (has_state[1] ? kCentered : 0) | (has_state[2] ? kBuf : 0);
  }
  template <int V>
  static constexpr bool uses_state(int s) {
    return s == 0 || (s == 1 && (V & kCentered) != 0) || (s == 2 && (V & kBuf) != 0);
  }

  template <typename T>
  struct Scalars {
    T lr;
    T alpha;
    T one_minus_alpha;
    LerpWeight<T> alpha_weight;  // grad_avg.lerp_(grad, 1 - alpha)
    T eps;
    T weight_decay;
    T momentum;
    bool use_momentum;
  };

  template <typename T>
  C10_HOST_DEVICE static Scalars<T> scalars(const double* opt, const GroupValues& gv, int64_t, double) {
    Scalars<T> k;
    k.lr = static_cast<T>(gv.lr);
    k.alpha = static_cast<T>(opt[0]);
    k.one_minus_alpha = static_cast<T>(1.0 - opt[0]);
    k.alpha_weight = lerp_weight<T>(1.0 - opt[0]);
    k.eps = static_cast<T>(opt[1]);
    k.weight_decay = static_cast<T>(opt[2]);
    k.momentum = static_cast<T>(gv.momentum);
    k.use_momentum = gv.momentum > 0.0;
    return k;
  }

  template <int V, typename K, typename Fn>
  C10_HOST_DEVICE static C10_ALWAYS_INLINE void refine(const K& k, Fn&& fn) {
    if constexpr ((V & kBuf) != 0) {
      if (!k.use_momentum) {
        fn(Variant<V & ~kBuf>{});
        return;
      }
    }
    fn(Variant<V>{});
  }

  template <int V, bool FMA, typename T>
  C10_HOST_DEVICE static C10_ALWAYS_INLINE void update(T& p, T g, T (&s)[kStates], const Scalars<T>& k) {
    if constexpr ((V & kWd) != 0) {
      g = mul_add<FMA>(p, k.weight_decay, g);  // grad.add(param, alpha=weight_decay)
    }
    s[0] = decay_add_square<FMA>(s[0], k.alpha, k.one_minus_alpha, g);  // square_avg
    T avg;
    if constexpr ((V & kCentered) != 0) {
      s[1] = lerp<FMA>(s[1], g, k.alpha_weight);
      avg = sqrt_t(mul_add<FMA>(-s[1], s[1], s[0]));  // square_avg.addcmul(grad_avg, grad_avg, value=-1)
    } else {
      avg = sqrt_t(s[0]);
    }
    avg = avg + k.eps;
    if constexpr ((V & kBuf) != 0) {
      s[2] = s[2] * k.momentum + g / avg;  // buf.mul_(momentum).addcdiv_(grad, avg)
      p = mul_add<FMA>(s[2], -k.lr, p);    // param.add_(buf, alpha=-lr)
    } else {
      p = p + -k.lr * g / avg;  // param.addcdiv_(grad, avg, value=-lr)
    }
  }
};

}  // namespace fusedclr
