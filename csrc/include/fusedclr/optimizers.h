// Every optimizer the kernels know, by the name the op takes [note: math
// policies]. Adding one: its policy header in optimizers/, one line here, and
// its row in fusedclr/optim/_spec.py (docs/adding-an-optimizer.md).
#pragma once

#include <c10/util/Exception.h>

#include <fusedclr/optimizers/adagrad.h>
#include <fusedclr/optimizers/adam.h>
#include <fusedclr/optimizers/lion.h>
#include <fusedclr/optimizers/lookahead.h>
#include <fusedclr/optimizers/nadam.h>
#include <fusedclr/optimizers/radam.h>
#include <fusedclr/optimizers/rmsprop.h>
#include <fusedclr/optimizers/sgd.h>

#include <string_view>

namespace fusedclr {

#define FUSEDCLR_FOR_EACH_OPTIMIZER(X) \
  X("sgd", Sgd)                        \
  X("adam", Adam)                      \
  X("rmsprop", Rmsprop)                \
  X("adagrad", Adagrad)                \
  X("radam", Radam)                    \
  X("nadam", Nadam)                    \
  X("lion", Lion)                      \
  X("lookahead", Lookahead)

// Runs fn(Policy{}) for the optimizer named `name`; an unknown name raises.
template <typename Fn>
void with_policy(std::string_view name, Fn&& fn) {
#define FUSEDCLR_POLICY_CASE(NAME, POLICY) \
  if (name == NAME) {                      \
    return fn(POLICY{});                   \
  }
  FUSEDCLR_FOR_EACH_OPTIMIZER(FUSEDCLR_POLICY_CASE)
#undef FUSEDCLR_POLICY_CASE
  TORCH_CHECK(false, "fusedclr: unknown optimizer '", name,
              "'; the kernels know sgd, adam, rmsprop, adagrad, radam, nadam, lion and lookahead");
}

}  // namespace fusedclr
