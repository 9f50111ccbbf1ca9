// The float vectors both attention kernels compute with, and their lane-wise helpers.
#ifndef PRERL_JAX_CPU_ATTENTION_LANES_H_
#define PRERL_JAX_CPU_ATTENTION_LANES_H_

#include <algorithm>
#include <cstdint>
#include <limits>

#include "cpu_register_tile.h"
#include "cpu_vector_exp.h"

namespace prerl_jax::lanes {

// A SIMD register of floats, as a GCC/Clang vector extension: eight lanes with AVX (the library
// is built with -march=native where the compiler takes it), four otherwise (SSE, NEON).
#if defined(__AVX__)
constexpr int64_t kLanes = 8;
#else
constexpr int64_t kLanes = 4;
#endif
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
// As many int32 lanes: comparison results (all bits set where true) and exponent bits.
typedef int32_t Mask __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline Vec Load(const float* p) { return LoadVector<Vec>(p); }

inline void Store(float* p, Vec v) { StoreVector(p, v); }

inline Vec Select(const Mask& where, const Vec& a, const Vec& b) {
  return SelectLanes<Vec, Mask>(where, a, b);
}

// Maximum and sum of x[0:C] a vector at a time: written out, because a plain reduction
// loop does not vectorize without -ffast-math, which these kernels must not use (it would fold
// prerl_jax::Exp's rounding away).
inline float Maximum(const float* x, int64_t C) {
  float result = -std::numeric_limits<float>::infinity();
  int64_t c = 0;
  if (C >= kLanes) {
    Vec lanes = Load(x);
    for (c = kLanes; c + kLanes <= C; c += kLanes) {
      const Vec v = Load(x + c);
      lanes = Select(v > lanes, v, lanes);
    }
    for (int64_t i = 0; i < kLanes; ++i) result = std::max(result, lanes[i]);
  }
  for (; c < C; ++c) result = std::max(result, x[c]);
  return result;
}

inline float Sum(const float* x, int64_t C) {
  Vec lanes = {};
  int64_t c = 0;
  for (; c + kLanes <= C; c += kLanes) lanes += Load(x + c);
  float result = 0.0f;
  for (int64_t i = 0; i < kLanes; ++i) result += lanes[i];
  for (; c < C; ++c) result += x[c];
  return result;
}

// out[h * stride] for h < H = x[0:H] rotated by the angles of cos and sin [H / 2], in Hugging
// Face's rotate_half layout, with the same products and sums as prerl_jax/models/rope.py's
// apply_rotation.
inline void Rotate(const float* x, const float* cos, const float* sin, int64_t H, float* out,
                   int64_t stride) {
  const int64_t half = H / 2;
  for (int64_t j = 0; j < half; ++j) {
    out[j * stride] = x[j] * cos[j] - x[j + half] * sin[j];
    out[(j + half) * stride] = x[j + half] * cos[j] + x[j] * sin[j];
  }
}

}  // namespace prerl_jax::lanes

#endif  // PRERL_JAX_CPU_ATTENTION_LANES_H_
