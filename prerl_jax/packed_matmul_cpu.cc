// A matmul with pre-packed weights, as one XLA:CPU FFI call: the decode step's layer products.
//
// out [M, N] = x [M, K] @ w [K, N], where w arrives packed as panels [P, K, R] (P = ceil(N / R),
// panel p holding columns p*R .. p*R + R - 1, zero past N): see prerl_jax/cpu_matmul.py, which
// packs the weights once per sampler call. Each panel is one task over XLA's intra-op threads;
// a task runs a 4-row x R-column register tile down all K, four rows at a time, reading its
// panel contiguously.
//
// Why a kernel: at the decode batch (64 rows) XLA:CPU's dots pack the weight on every call and
// ran at 24-58 GFLOP/s where this runs at 65-74 (one 2-core host, README Performance).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>

#include "cpu_kernel_pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 8;
constexpr int64_t kVectors = 3;             // Vectors per tile row.
constexpr int64_t kPanel = kLanes * kVectors;  // R: columns per panel.
constexpr int64_t kTileRows = 4;
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// out[r, :R] = sum_k x[r, k] * panel[k, :R] for `Rows` rows of x (row stride K); the R columns
// go to `out` (row stride `out_stride`), the first `columns` of them.
template <int Rows>
void Tile(const float* x, const float* panel, int64_t K, float* out, int64_t out_stride,
          int64_t columns) {
  Vec acc[Rows][kVectors] = {};
  for (int64_t k = 0; k < K; ++k) {
    Vec w[kVectors];
    for (int64_t j = 0; j < kVectors; ++j) w[j] = Load(panel + k * kPanel + j * kLanes);
    for (int r = 0; r < Rows; ++r) {
      const float xr = x[r * K + k];
      for (int64_t j = 0; j < kVectors; ++j) acc[r][j] += xr * w[j];
    }
  }
  for (int r = 0; r < Rows; ++r) {
    float row[kPanel];
    std::memcpy(row, acc[r], sizeof(row));
    std::memcpy(out + r * out_stride, row, columns * sizeof(float));
  }
}

ffi::Error Invalid(const std::string& message) {
  return ffi::Error::InvalidArgument("prerl_packed_matmul: " + message);
}

ffi::Error PackedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                        ffi::Buffer<ffi::F32> panels, ffi::ResultBuffer<ffi::F32> out) {
  auto pd = panels.dimensions(), xd = x.dimensions(), od = out->dimensions();
  if (pd.size() != 3 || pd[2] != kPanel) {
    return Invalid("weights must be packed as [panels, K, " + std::to_string(kPanel) + "]");
  }
  const int64_t K = pd[1], P = pd[0];
  if (xd.size() == 0 || xd[xd.size() - 1] != K || od.size() != xd.size()) {
    return Invalid("x must be [..., K] with K = " + std::to_string(K) + " and out of x's rank");
  }
  const int64_t N = od[od.size() - 1], M = K ? x.element_count() / K : 0;
  if (N > P * kPanel || N <= (P - 1) * kPanel || out->element_count() != M * N) {
    return Invalid("out must be [..., N] with " + std::to_string(P) + " panels of " +
                   std::to_string(kPanel) + " columns covering N, and x's leading dimensions");
  }
  const float* xs = x.typed_data();
  const float* ws = panels.typed_data();
  float* os = out->typed_data();
  prerl_jax::ParallelTasks(pool, P, 4, [=] {
    return [=](int64_t p) {
      const float* panel = ws + p * K * kPanel;
      const int64_t columns = std::min(kPanel, N - p * kPanel);
      float* o = os + p * kPanel;
      int64_t m = 0;
      for (; m + kTileRows <= M; m += kTileRows) {
        Tile<kTileRows>(xs + m * K, panel, K, o + m * N, N, columns);
      }
      for (; m < M; ++m) Tile<1>(xs + m * K, panel, K, o + m * N, N, columns);
    };
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PrerlPackedMatmul, PackedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // packed weights
                                  .Ret<ffi::Buffer<ffi::F32>>()); // out
