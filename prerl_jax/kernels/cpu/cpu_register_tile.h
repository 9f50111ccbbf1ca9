// The register tile both prerl_jax kernels run their products on.
#ifndef PRERL_JAX_CPU_REGISTER_TILE_H_
#define PRERL_JAX_CPU_REGISTER_TILE_H_

#include <cstdint>
#include <cstring>

namespace prerl_jax {

// Unaligned loads and stores of one vector (memcpy compiles to one vector move).
template <typename Vec>
inline Vec LoadVector(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename Vec>
inline void StoreVector(float* p, Vec v) {
  std::memcpy(p, &v, sizeof(v));
}

struct NoStep {
  void operator()() const {}
};

// acc[r][v] = sum over k < K of a[r * lda + k] * b[k * ldb + v * lanes : ... + lanes], for Rows
// rows of a and V vectors of b (Vec a GCC/Clang vector of floats), then store(r, v, acc[r][v])
// for each (`store` takes the vector by value). The Rows x V accumulators stay in registers and
// each vector of b is loaded once for all the rows. (Taking an accumulator's or a loaded vector's
// address, as a by-reference store or a memcpy straight into the array did, made GCC keep them
// on the stack: 17% slower.) `each_step()` runs once per k, before its loads (the attention
// kernel issues its prefetches there).
template <typename Vec, int Rows, int V, typename Store, typename Step = NoStep>
inline void RegisterTile(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t K,
                         Store store, Step each_step = Step()) {
  constexpr int64_t kLanes = sizeof(Vec) / sizeof(float);
  Vec acc[Rows][V] = {};
  for (int64_t k = 0; k < K; ++k) {
    each_step();
    Vec w[V];
    for (int v = 0; v < V; ++v) w[v] = LoadVector<Vec>(b + k * ldb + v * kLanes);
    for (int r = 0; r < Rows; ++r) {
      const float x = a[r * lda + k];
      for (int v = 0; v < V; ++v) acc[r][v] += x * w[v];
    }
  }
  for (int r = 0; r < Rows; ++r) {
    for (int v = 0; v < V; ++v) store(r, v, acc[r][v]);
  }
}

}  // namespace prerl_jax

#endif  // PRERL_JAX_CPU_REGISTER_TILE_H_
