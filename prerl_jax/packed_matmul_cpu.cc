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
#include "cpu_register_tile.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 8;
constexpr int64_t kVectors = 3;             // Vectors per tile row.
constexpr int64_t kPanel = kLanes * kVectors;  // R: columns per panel.
constexpr int64_t kTileRows = 4;
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

// out[r, :R] = sum_k x[r, k] * panel[k, :R] for `Rows` rows of x (row stride K); the R columns
// go to `out` (row stride `out_stride`), the first `columns` of them.
template <int Rows>
void Tile(const float* x, const float* panel, int64_t K, float* out, int64_t out_stride,
          int64_t columns) {
  float rows[Rows][kPanel];
  prerl_jax::RegisterTile<Vec, Rows, kVectors>(x, K, panel, kPanel, K,
                                               [&](int r, int v, Vec sum) {
    std::memcpy(rows[r] + v * kLanes, &sum, sizeof(sum));
  });
  for (int r = 0; r < Rows; ++r) {
    std::memcpy(out + r * out_stride, rows[r], columns * sizeof(float));
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
