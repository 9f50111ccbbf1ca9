// A lane-wise exp for the prerl_jax kernels (std::exp is a scalar libm call).
#ifndef PRERL_JAX_CPU_VECTOR_EXP_H_
#define PRERL_JAX_CPU_VECTOR_EXP_H_

namespace prerl_jax {

// a where `where` is true (all bits set), else b.
template <typename Vec, typename Mask>
inline Vec SelectLanes(Mask where, Vec a, Vec b) {
  return (Vec)((where & (Mask)a) | (~where & (Mask)b));
}

// exp(x) lane-wise, within 2 ulp of std::exp (Cephes' expf) for x in [-87, 88], and exp(-87) or
// exp(88) outside it (-inf and inf included). Vec is a GCC/Clang vector of floats and Mask the
// int32 vector of as many lanes.
template <typename Vec, typename Mask>
inline Vec Exp(Vec x) {
  const Vec lowest = Vec{} - 87.0f, highest = Vec{} + 88.0f;
  x = SelectLanes<Vec, Mask>(x < lowest, lowest, x);
  x = SelectLanes<Vec, Mask>(x > highest, highest, x);
  const Vec n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  const Vec r = x - n * 0.693359375f + n * 2.12194440e-4f;       // x - n ln 2 in two parts
  Vec p = Vec{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * (Vec)((__builtin_convertvector(n, Mask) + 127) << 23);  // p * 2^n
}

}  // namespace prerl_jax

#endif  // PRERL_JAX_CPU_VECTOR_EXP_H_
