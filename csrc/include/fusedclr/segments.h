// The segment table: where a bucket's parameters and gradients live.
//
// [note: segment table]
// A bucket's optimizer states (exp_avg, ..., the fp32 master) are flat buffers
// the optimizer owns; its parameters and gradients stay wherever the model,
// autograd, DDP or FSDP2 put them. The table has one int64 row per segment (a
// parameter, or the real view of a complex one):
//
//   PARAM   address of the parameter's first element (its storage order)
//   GRAD    address of the gradient's first element, or 0: no gradient this
//           step, so the segment is inactive (its step count does not advance
//           and nothing of it changes, as torch skips a parameter whose grad
//           is None). An empty gradient, whose data pointer may be null, is
//           entered as 1: it has no element to dereference.
//   OFFSET  where the segment starts in the flat state buffers (a multiple of
//           the bucket's alignment, so states start 64-byte aligned for fp32)
//   NUMEL   its number of (real) elements
//
// Parameters and gradients are dense and share their strides (the host checks
// it), so element k of a segment is memory element k of both and state element
// OFFSET + k. The chunk table's (segment, begin, end) rows are in state
// coordinates, within [OFFSET, OFFSET + NUMEL). A kernel turns a row into
// pointers with segment_base(): the parameter's address shifted back by OFFSET
// elements, so that `base + i` for a state index i addresses the parameter's
// element i - OFFSET, and every loop indexes parameters, gradients and states
// with the same i. The table lives on the bucket's device, so the walk has no
// kernel-argument limit and a step is one launch whatever the number of tensors.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace fusedclr {
namespace seg {

constexpr int PARAM = 0;
constexpr int GRAD = 1;
constexpr int OFFSET = 2;
constexpr int NUMEL = 3;
constexpr int WORDS = 4;

// Pointer to element `i` (a state index) of the array at address `addr` whose
// segment starts at state offset `offset` [note: segment table]. Integer
// arithmetic, since the shifted base may point before the array.
template <typename X>
C10_HOST_DEVICE C10_ALWAYS_INLINE X* segment_base(int64_t addr, int64_t offset) {
  return reinterpret_cast<X*>(static_cast<uintptr_t>(addr) - static_cast<uintptr_t>(offset) * sizeof(X));
}

C10_HOST_DEVICE C10_ALWAYS_INLINE bool active(const int64_t* table, int64_t segment) {
  return table[segment * WORDS + GRAD] != 0;
}

}  // namespace seg
}  // namespace fusedclr
