// Per-element update math shared by the CPU and CUDA kernels.
//
// [note: update math]
// These functions are torch.optim's single-tensor formulas, element by element,
// in the order torch applies them (maximize, then weight decay, then moments),
// so that fp32 results agree with torch.optim to rounding. Loads, stores, the
// segment walk and the per-segment scalars (bias corrections) live in the
// kernels; only arithmetic lives here. T is the math type: float for fp32,
// bf16 and fp16 parameters, double for fp64.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

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

// Scalars of one Adam/AdamW step for one segment, in the math type.
template <typename T>
struct AdamScalars {
  T lr;
  T beta2;
  T one_minus_beta1;  // computed in double, as torch passes 1 - beta1 as a Python float
  T one_minus_beta2;
  T eps;
  T weight_decay;
  T decay;          // 1 - lr * weight_decay (decoupled only)
  T step_size;      // lr / (1 - beta1^step)
  T bc2_sqrt;       // sqrt(1 - beta2^step)
  T grad_mul;       // sign / grad_scale: -1 when maximizing, 1/scale under a GradScaler
};

template <typename T>
C10_HOST_DEVICE inline AdamScalars<T> adam_scalars(double lr, double beta1, double beta2, double eps,
                                                   double weight_decay, int64_t step, double grad_scale,
                                                   bool maximize) {
  const double s = static_cast<double>(step);
  AdamScalars<T> k;
  k.lr = static_cast<T>(lr);
  k.beta2 = static_cast<T>(beta2);
  k.one_minus_beta1 = static_cast<T>(1.0 - beta1);
  k.one_minus_beta2 = static_cast<T>(1.0 - beta2);
  k.eps = static_cast<T>(eps);
  k.weight_decay = static_cast<T>(weight_decay);
  k.decay = static_cast<T>(1.0 - lr * weight_decay);
  k.step_size = static_cast<T>(lr / (1.0 - ::pow(beta1, s)));
  k.bc2_sqrt = static_cast<T>(::sqrt(1.0 - ::pow(beta2, s)));
  k.grad_mul = static_cast<T>((maximize ? -1.0 : 1.0) / grad_scale);
  return k;
}

// One Adam/AdamW element. HAS_WD / DECOUPLED / AMSGRAD are compile-time so the
// CPU loop vectorizes without branches.
template <bool HAS_WD, bool DECOUPLED, bool AMSGRAD, typename T>
C10_HOST_DEVICE inline void adam_update(T& p, T g, T& m, T& v, T& vmax, const AdamScalars<T>& k) {
  // A multiply, not a divide: GradScaler's scales are powers of two, so
  // g * (1/scale) == g / scale exactly, and the Adam loop saves one division.
  g = g * k.grad_mul;
  if (HAS_WD) {
    if (DECOUPLED) {
      p = p * k.decay;
    } else {
      g = g + k.weight_decay * p;
    }
  }
  // exp_avg.lerp_(grad, 1 - beta1)
  m = m + k.one_minus_beta1 * (g - m);
  v = k.beta2 * v + k.one_minus_beta2 * g * g;
  T second = v;
  if (AMSGRAD) {
    vmax = vmax > v ? vmax : v;
    second = vmax;
  }
  const T denom = sqrt_t(second) / k.bc2_sqrt + k.eps;
  p = p - k.step_size * m / denom;
}

template <typename T>
struct SgdScalars {
  T lr;
  T momentum;
  T one_minus_dampening;  // computed in double, as torch does
  T weight_decay;
  T grad_mul;  // sign / grad_scale
  bool first;  // the segment's first step with momentum: buffer = grad
};

template <typename T>
C10_HOST_DEVICE inline SgdScalars<T> sgd_scalars(double lr, double momentum, double dampening,
                                                 double weight_decay, int64_t step, double grad_scale,
                                                 bool maximize) {
  SgdScalars<T> k;
  k.lr = static_cast<T>(lr);
  k.momentum = static_cast<T>(momentum);
  k.one_minus_dampening = static_cast<T>(1.0 - dampening);
  k.weight_decay = static_cast<T>(weight_decay);
  k.grad_mul = static_cast<T>((maximize ? -1.0 : 1.0) / grad_scale);
  k.first = step <= 1;
  return k;
}

// One SGD element. USE_MOMENTUM selects the momentum-buffer path.
template <bool HAS_WD, bool USE_MOMENTUM, bool NESTEROV, typename T>
C10_HOST_DEVICE inline void sgd_update(T& p, T g, T& buf, const SgdScalars<T>& k) {
  g = g * k.grad_mul;
  if (HAS_WD) {
    g = g + k.weight_decay * p;
  }
  if (USE_MOMENTUM) {
    buf = k.first ? g : buf * k.momentum + k.one_minus_dampening * g;
    g = NESTEROV ? g + k.momentum * buf : buf;
  }
  p = p - k.lr * g;
}

}  // namespace fusedclr
