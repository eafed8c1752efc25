// Runtime flag -> compile-time constant, as flash-attention does. Shared by the
// CPU and CUDA kernels; template only on flags that matter in the inner loop,
// since each one doubles the instantiated kernels.
#pragma once

#define FUSEDCLR_BOOL_SWITCH(COND, NAME, ...) \
  [&] {                                       \
    if (COND) {                               \
      constexpr bool NAME = true;             \
      return __VA_ARGS__();                   \
    } else {                                  \
      constexpr bool NAME = false;            \
      return __VA_ARGS__();                   \
    }                                         \
  }()
