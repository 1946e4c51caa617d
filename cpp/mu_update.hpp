#pragma once
/// The element-wise multiplicative-update formulas, written once for both backends.
/// Guards follow scikit-learn: a zero denominator becomes float32 machine epsilon, W H entries
/// below it are raised to it before dividing (KL), and zero column sums of W become 1 (KL).
#include "hostdevice.hpp"

namespace dffkit {

/// float32 machine epsilon, the guard scikit-learn uses for every dtype (EPSILON in _nmf.py).
constexpr double kEpsilon = 1.1920928955078125e-07;
/// float64 machine epsilon: with KL, H entries below it are set to 0 after each update.
constexpr double kEpsilon64 = 2.220446049250313e-16;

/// New value of one factor entry: f * num / den, den = base + l1 + l2 * f + extra.
/// base is (W G_H)[i,j] (Frobenius) or the column/row sum (KL); extra is the group term.
template <class T>
DFFKIT_HD T mu_step(T f, T num, T base, T l1, T l2, T extra) {
  T den = base;
  if (l1 > T(0)) den += l1;
  if (l2 > T(0)) den = den + l2 * f;
  if (extra > T(0)) den = den + extra;
  if (den == T(0)) den = T(kEpsilon);
  return f * (num / den);
}

/// X / max(WH, eps): the ratio R of the KL updates.
template <class T>
DFFKIT_HD T kl_ratio(T x, T wh) {
  if (wh < T(kEpsilon)) wh = T(kEpsilon);
  return x / wh;
}

/// KL: H entries below float64 eps become 0 after each H update (scikit-learn does this).
template <class T>
DFFKIT_HD T kl_clamp_h(T h) {
  return h < T(kEpsilon64) ? T(0) : h;
}

/// The group term lam * w / max(norm, tiny) of the group-sparse W update.
template <class T>
DFFKIT_HD T group_term(T w, double lam, double norm, double tiny) {
  return T(lam * double(w) / (norm > tiny ? norm : tiny));
}

}  // namespace dffkit
