// Schedule descriptor and its evaluator, shared by the CPU and CUDA kernels.
//
// [note: schedule descriptor]
// A schedule is a flat float64 array (a tensor on the parameters' device) that
// the update kernels evaluate at the schedule's own int64 step counter `t`.
// The same layout is built by fusedclr/lr_scheduler.py and evaluated in Python
// by fusedclr/reference.py (schedule_value); the two evaluators must agree.
//
//   d[0]              number of stages S (0: no schedule, use the group values)
//   d[1]              how stages combine: SEQUENCE (0) or PRODUCT (1), see below
//   d[2..3]           reserved (0)
//   stage i           STAGE_WORDS doubles at HEADER_WORDS + i * STAGE_WORDS:
//     [0] kind        one of Kind below
//     [1] t_begin     first global step of this stage (stage 0 begins at 0);
//                     the stage sees the local step t - t_begin
//     [2..13]         P0..P11, the kind's parameters (see Kind)
//     [14] has_mom    1 if this stage also schedules momentum / beta1
//     [15] reserved
//   tail              variable-length data (MultiStepLR milestones) that stages
//                     point into by absolute index
//
// SEQUENCE (SequentialLR): the last stage whose t_begin <= t is active.
// PRODUCT (several schedulers stepping one optimizer, which torch composes by
// multiplying): every stage is evaluated at t - t_begin and the lrs multiply;
// the first stage carries the base lr, the others are factors (P0 = 1). Only
// lr-only kinds are composed this way, so a product schedules no momentum.
//
// Every value is computed in double, as torch's schedulers compute in Python
// floats, so host and device agree with torch to ~1 ulp of double.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace fusedclr {
namespace sched {

constexpr int HEADER_WORDS = 4;
constexpr int H_COMBINE = 1;
constexpr int STAGE_WORDS = 16;
constexpr int S_KIND = 0;
constexpr int S_T_BEGIN = 1;
constexpr int S_P0 = 2;
constexpr int S_HAS_MOM = 14;

enum Kind : int {
  CONSTANT = 0,     // P0 lr
  STEP = 1,         // P0 base, P1 gamma, P2 step_size
  MULTISTEP = 2,    // P0 base, P1 gamma, P2 tail index, P3 count (sorted, repeats kept)
  EXPONENTIAL = 3,  // P0 base, P1 gamma
  LINEAR = 4,       // P0 base, P1 start_factor, P2 end_factor, P3 total_iters
  CONSTANT_FACTOR = 5,  // ConstantLR: P0 base, P1 factor, P2 total_iters
  COSINE = 6,       // P0 base, P1 eta_min, P2 T_max
  COSINE_RESTARTS = 7,  // P0 base, P1 eta_min, P2 T_0, P3 T_mult, P4 cycle_decay,
                        // P5 warmup_steps, P6 warmup_start_lr
  CYCLIC = 8,       // P0 base_lr, P1 max_lr, P2 total_size, P3 step_ratio,
                    // P4 mode (0 triangular, 1 triangular2, 2 exp_range), P5 gamma,
                    // P6 base_momentum, P7 max_momentum
  ONE_CYCLE = 9,    // P0 initial_lr, P1 max_lr, P2 min_lr, P3 base_momentum,
                    // P4 max_momentum, P5 phases (2|3), P6..P8 phase end steps,
                    // P9 anneal (0 cos, 1 linear)
  POLYNOMIAL = 10,  // P0 base, P1 total_iters (> 0), P2 power (>= 0)
};

enum Combine : int { SEQUENCE = 0, PRODUCT = 1 };

enum CyclicMode : int { TRIANGULAR = 0, TRIANGULAR2 = 1, EXP_RANGE = 2 };
enum Anneal : int { ANNEAL_COS = 0, ANNEAL_LINEAR = 1 };

constexpr double kPi = 3.14159265358979323846;

// What a schedule yields at one step. has_lr / has_momentum are false where the
// descriptor leaves that value to the param group (no schedule, or a stage
// that schedules only the lr).
struct Value {
  double lr;
  double momentum;
  bool has_lr;
  bool has_momentum;
};

C10_HOST_DEVICE inline double anneal(int how, double start, double end, double pct) {
  if (how == ANNEAL_LINEAR) {
    return (end - start) * pct + start;
  }
  return end + (start - end) / 2.0 * (::cos(kPi * pct) + 1.0);
}

C10_HOST_DEVICE inline Value stage_value(const double* st, const double* d, int64_t t) {
  const double* p = st + S_P0;
  const int kind = static_cast<int>(st[S_KIND]);
  const double td = static_cast<double>(t);
  // Only the cyclical families schedule momentum; the flag alone is not enough
  // (mirrors reference._stage_value).
  Value v{0.0, 0.0, true, st[S_HAS_MOM] != 0.0 && (kind == CYCLIC || kind == ONE_CYCLE)};
  switch (kind) {
    case CONSTANT:
      v.lr = p[0];
      break;
    case STEP:
      // Integer division keeps steps beyond 2^53 in the right period.
      v.lr = p[0] * ::pow(p[1], static_cast<double>(t / static_cast<int64_t>(p[2])));
      break;
    case MULTISTEP: {
      const double* ms = d + static_cast<int64_t>(p[2]);
      const int64_t n = static_cast<int64_t>(p[3]);
      int64_t passed = 0;
      for (int64_t i = 0; i < n; ++i) {
        passed += (ms[i] <= td) ? 1 : 0;
      }
      v.lr = p[0] * ::pow(p[1], static_cast<double>(passed));
      break;
    }
    case EXPONENTIAL:
      v.lr = p[0] * ::pow(p[1], td);
      break;
    case LINEAR: {
      const double total = p[3];
      const double done = td < total ? td : total;
      v.lr = p[0] * (p[1] + (p[2] - p[1]) * done / total);
      break;
    }
    case CONSTANT_FACTOR:
      v.lr = p[0] * (td < p[2] ? p[1] : 1.0);
      break;
    case COSINE:
      v.lr = p[1] + (p[0] - p[1]) * (1.0 + ::cos(kPi * td / p[2])) / 2.0;
      break;
    case POLYNOMIAL: {
      const double done = td < p[1] ? td : p[1];
      v.lr = p[0] * ::pow(1.0 - done / p[1], p[2]);
      break;
    }
    case COSINE_RESTARTS: {
      const int64_t warm = static_cast<int64_t>(p[5]);
      if (t < warm) {
        v.lr = p[6] + (p[0] - p[6]) * td / static_cast<double>(warm);
        break;
      }
      int64_t tc = t - warm;
      int64_t ti = static_cast<int64_t>(p[2]);
      const int64_t mult = static_cast<int64_t>(p[3]);
      int64_t cycle = 0;
      if (mult == 1) {
        cycle = tc / ti;
        tc = tc % ti;
      } else {
        // At most ~63 iterations before ti overflows int64; torch advances the
        // same integers one restart at a time.
        while (tc >= ti) {
          tc -= ti;
          ti *= mult;
          ++cycle;
        }
      }
      const double peak = p[0] * ::pow(p[4], static_cast<double>(cycle));
      v.lr = p[1] + (peak - p[1]) *
                        (1.0 + ::cos(kPi * static_cast<double>(tc) / static_cast<double>(ti))) / 2.0;
      break;
    }
    case CYCLIC: {
      const double total = p[2];
      const double ratio = p[3];
      const double cycle = ::floor(1.0 + td / total);
      const double x = 1.0 + td / total - cycle;
      const double scale_factor = x <= ratio ? x / ratio : (x - 1.0) / (ratio - 1.0);
      const int mode = static_cast<int>(p[4]);
      double scale = 1.0;
      if (mode == TRIANGULAR2) {
        // 2^-(cycle - 1), exact as torch's 1 / 2.0 ** (cycle - 1). It underflows to 0
        // after ~1075 cycles (where torch's Python float power overflows and raises).
        const double halvings = cycle - 1.0;
        scale = halvings > 2000.0 ? 0.0 : ::ldexp(1.0, -static_cast<int>(halvings));
      } else if (mode == EXP_RANGE) {
        scale = ::pow(p[5], td);
      }
      v.lr = p[0] + (p[1] - p[0]) * scale_factor * scale;
      v.momentum = p[7] - (p[7] - p[6]) * scale_factor * scale;
      break;
    }
    case ONE_CYCLE: {
      // Phase table in torch's order: (lr from, lr to, momentum from, momentum to).
      const double init = p[0], peak = p[1], low = p[2], mbase = p[3], mmax = p[4];
      const int phases = static_cast<int>(p[5]);
      const int how = static_cast<int>(p[9]);
      double lr_from[3], lr_to[3], m_from[3], m_to[3];
      if (phases == 3) {
        lr_from[0] = init; lr_to[0] = peak; m_from[0] = mmax;  m_to[0] = mbase;
        lr_from[1] = peak; lr_to[1] = init; m_from[1] = mbase; m_to[1] = mmax;
        lr_from[2] = init; lr_to[2] = low;  m_from[2] = mmax;  m_to[2] = mmax;
      } else {
        lr_from[0] = init; lr_to[0] = peak; m_from[0] = mmax;  m_to[0] = mbase;
        lr_from[1] = peak; lr_to[1] = low;  m_from[1] = mbase; m_to[1] = mmax;
      }
      double start = 0.0;
      for (int i = 0; i < phases; ++i) {
        const double end = p[6 + i];
        if (td <= end || i == phases - 1) {
          const double pct = (td - start) / (end - start);
          v.lr = anneal(how, lr_from[i], lr_to[i], pct);
          v.momentum = anneal(how, m_from[i], m_to[i], pct);
          break;
        }
        start = end;
      }
      break;
    }
    default:
      v.has_lr = false;
      v.has_momentum = false;
      break;
  }
  return v;
}

// Evaluates descriptor d at global step t. With no stages, both values are left
// to the param group (has_lr == has_momentum == false).
C10_HOST_DEVICE inline Value evaluate(const double* d, int64_t t) {
  const int n = static_cast<int>(d[0]);
  if (n <= 0) {
    return Value{0.0, 0.0, false, false};
  }
  if (static_cast<int>(d[H_COMBINE]) == PRODUCT) {
    Value v{1.0, 0.0, true, false};
    for (int i = 0; i < n; ++i) {
      const double* st = d + HEADER_WORDS + i * STAGE_WORDS;
      const Value s = stage_value(st, d, t - static_cast<int64_t>(st[S_T_BEGIN]));
      v.lr *= s.lr;
      v.has_lr = v.has_lr && s.has_lr;
    }
    return v;
  }
  int idx = 0;
  for (int i = 1; i < n; ++i) {
    if (static_cast<double>(t) >= d[HEADER_WORDS + i * STAGE_WORDS + S_T_BEGIN]) {
      idx = i;
    }
  }
  const double* st = d + HEADER_WORDS + idx * STAGE_WORDS;
  return stage_value(st, d, t - static_cast<int64_t>(st[S_T_BEGIN]));
}

}  // namespace sched
}  // namespace fusedclr
