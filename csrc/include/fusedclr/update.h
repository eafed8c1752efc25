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

// [note: rounding as torch]
// Swapping the import must reproduce torch's trajectory, so every formula is
// evaluated in torch's fused kernels' order and the compiler may not contract a
// multiply and an add into one FMA (the CPU kernels build with
// -ffp-contract=off). torch's CPU kernels fuse exactly where their vector code
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

// Scalars of one Adam/AdamW step for one segment, in the math type.
template <typename T>
struct AdamScalars {
  T lr;
  T beta2;
  T one_minus_beta1;  // computed in double, as torch passes 1 - beta1 as a Python float
  T lerp_coeff;       // torch's lerp: the weight, or weight - 1 when |weight| >= 0.5
  bool lerp_small;    // |weight| < 0.5: lerp from exp_avg, else back from the grad
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
  k.lerp_small = (k.one_minus_beta1 < T(0) ? -k.one_minus_beta1 : k.one_minus_beta1) < T(0.5);
  k.lerp_coeff = k.lerp_small ? k.one_minus_beta1 : k.one_minus_beta1 - T(1);
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
template <bool HAS_WD, bool DECOUPLED, bool AMSGRAD, bool FMA, typename T>
C10_HOST_DEVICE inline void adam_update(T& p, T g, T& m, T& v, T& vmax, const AdamScalars<T>& k) {
  // A multiply, not a divide: GradScaler's scales are powers of two, so
  // g * (1/scale) == g / scale exactly, and the Adam loop saves one division.
  g = g * k.grad_mul;
  if (HAS_WD) {
    if (DECOUPLED) {
      p = p * k.decay;
    } else {
      g = mul_add<FMA>(p, k.weight_decay, g);  // grad.add(param, alpha=weight_decay)
    }
  }
  // exp_avg.lerp_(grad, 1 - beta1), as torch's lerp [note: rounding as torch]
  m = mul_add<FMA>(k.lerp_coeff, g - m, k.lerp_small ? m : g);
  v = mul_add<FMA>(k.one_minus_beta2 * g, g, v * k.beta2);  // mul_(beta2).addcmul_(grad, grad, 1 - beta2)
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
template <bool HAS_WD, bool USE_MOMENTUM, bool NESTEROV, bool FMA, typename T>
C10_HOST_DEVICE inline void sgd_update(T& p, T g, T& buf, const SgdScalars<T>& k) {
  g = g * k.grad_mul;
  if (HAS_WD) {
    g = mul_add<FMA>(p, k.weight_decay, g);  // grad.add(param, alpha=weight_decay)
  }
  if (USE_MOMENTUM) {
    // buf.mul_(momentum).add_(grad, alpha=1 - dampening); grad.add(buf, alpha=momentum)
    buf = k.first ? g : mul_add<FMA>(g, k.one_minus_dampening, buf * k.momentum);
    g = NESTEROV ? mul_add<FMA>(buf, k.momentum, g) : buf;
  }
  p = mul_add<FMA>(g, -k.lr, p);  // param.add_(grad, alpha=-lr)
}

}  // namespace fusedclr
