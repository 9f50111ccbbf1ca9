// Matmuls with pre-packed weights, as XLA:CPU FFI calls: the decode step's layer products.
//
// out [M, N] = x [M, K] @ w [K, N], where w arrives packed as panels [P, K, R] (P = ceil(N / R),
// panel p holding columns p*R .. p*R + R - 1, zero past N): see prerl_jax/kernels/cpu/matmul.py,
// which packs the weights once per sampler call. Each panel is one task over XLA's intra-op
// threads; a task runs a kTileRows x R register tile down all K, kTileRows rows at a time (then
// 4, then 1 for the rest), reading its panel contiguously. With AVX-512 (32 vector registers) a
// tile is 8 rows, its 8 x 3 accumulators in 24 registers: 4-row tiles read each panel twice as
// often and ran 25-30% slower at 8-64 rows on SmolLM2-135M's shapes (a 2-core Zen 4 host);
// elsewhere (16 vector registers or fewer) 4 rows. Three handlers share that loop and differ in
// what a tile writes:
//   PrerlPackedMatmul         out = x @ w
//   PrerlPackedMatmulResidual out = residual + x @ w  (a residual operand [M, N] after w)
//   PrerlGatedMatmul          out = silu(x @ w_gate) * (x @ w_up)  (two packed operands)
// so that the decoder layer's residual adds and its MLP's gate are not separate XLA ops.
//
// Why a kernel: at the decode batch (64 rows) XLA:CPU's dots pack the weight on every call and
// ran at 24-58 GFLOP/s; this runs at 180-215 on the host above (its square 2048 matmul: ~190).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>

#include "cpu_kernel_pool.h"
#include "cpu_register_tile.h"
#include "cpu_vector_exp.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 8;
constexpr int64_t kVectors = 3;             // Vectors per tile row.
constexpr int64_t kPanel = kLanes * kVectors;  // R: columns per panel.
#ifdef __AVX512F__
constexpr int64_t kTileRows = 8;
#else
constexpr int64_t kTileRows = 4;
#endif
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t Mask __attribute__((vector_size(kLanes * sizeof(int32_t))));

enum class Epilogue { kNone, kResidual, kSiluGate };

// rows[r][:R] = sum_k x[r, k] * panel[k, :R] for `Rows` rows of x (row stride K).
template <int Rows>
void Tile(const float* x, const float* panel, int64_t K, Vec (&rows)[Rows][kVectors]) {
  prerl_jax::RegisterTile<Vec, Rows, kVectors>(x, K, panel, kPanel, K,
                                               [&](int r, int v, Vec sum) { rows[r][v] = sum; });
}

// out[m:m+Rows, columns of panel p] for the epilogue E: `first` is x's product with panel p of
// the (first) weight, `second` that of the up weight (kSiluGate); `residual` is [M, N] (kResidual).
template <Epilogue E, int Rows>
void PanelRows(const float* x, const float* first, const float* second, const float* residual,
               int64_t K, int64_t N, int64_t m, int64_t p, float* out) {
  Vec sums[Rows][kVectors];
  Tile<Rows>(x + m * K, first + p * K * kPanel, K, sums);
  if constexpr (E == Epilogue::kSiluGate) {
    Vec up[Rows][kVectors];
    Tile<Rows>(x + m * K, second + p * K * kPanel, K, up);
    const Vec one = Vec{} + 1.0f;
    for (int r = 0; r < Rows; ++r) {
      for (int v = 0; v < kVectors; ++v) {
        const Vec gate = sums[r][v];
        sums[r][v] = gate / (one + prerl_jax::Exp<Vec, Mask>(-gate)) * up[r][v];
      }
    }
  }
  const int64_t columns = std::min(kPanel, N - p * kPanel);
  for (int r = 0; r < Rows; ++r) {
    float row[kPanel];
    std::memcpy(row, sums[r], sizeof(row));
    float* o = out + (m + r) * N + p * kPanel;
    if constexpr (E == Epilogue::kResidual) {
      const float* add = residual + (m + r) * N + p * kPanel;
      for (int64_t c = 0; c < columns; ++c) o[c] = add[c] + row[c];
    } else {
      std::memcpy(o, row, columns * sizeof(float));
    }
  }
}

ffi::Error Invalid(const char* kernel, const std::string& message) {
  return ffi::Error::InvalidArgument(std::string(kernel) + ": " + message);
}

// Checks the operands' shapes and runs the panels as tasks; `second` (kSiluGate) and `residual`
// (kResidual) are null for the other epilogues.
template <Epilogue E>
ffi::Error Run(const char* kernel, ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& x,
               ffi::Buffer<ffi::F32>& panels, const ffi::Buffer<ffi::F32>* second,
               const ffi::Buffer<ffi::F32>* residual, ffi::ResultBuffer<ffi::F32>& out) {
  auto pd = panels.dimensions(), xd = x.dimensions(), od = out->dimensions();
  if (pd.size() != 3 || pd[2] != kPanel) {
    return Invalid(kernel, "weights must be packed as [panels, K, " + std::to_string(kPanel) + "]");
  }
  const int64_t K = pd[1], P = pd[0];
  if (xd.size() == 0 || xd[xd.size() - 1] != K || od.size() != xd.size()) {
    return Invalid(kernel, "x must be [..., K] with K = " + std::to_string(K) +
                   " and out of x's rank");
  }
  const int64_t N = od[od.size() - 1], M = K ? x.element_count() / K : 0;
  if (N > P * kPanel || N <= (P - 1) * kPanel || out->element_count() != M * N) {
    return Invalid(kernel, "out must be [..., N] with " + std::to_string(P) + " panels of " +
                   std::to_string(kPanel) + " columns covering N, and x's leading dimensions");
  }
  if (second != nullptr && !std::equal(pd.begin(), pd.end(), second->dimensions().begin(),
                                        second->dimensions().end())) {
    return Invalid(kernel, "the gate and up weights must be packed to the same shape");
  }
  if (residual != nullptr && residual->element_count() != M * N) {
    return Invalid(kernel, "the residual must have out's shape");
  }
  const float* xs = x.typed_data();
  const float* first = panels.typed_data();
  const float* up = second ? second->typed_data() : nullptr;
  const float* add = residual ? residual->typed_data() : nullptr;
  float* os = out->typed_data();
  prerl_jax::ParallelTasks(pool, P, 4, [=] {
    return [=](int64_t p) {
      int64_t m = 0;
      for (; m + kTileRows <= M; m += kTileRows) {
        PanelRows<E, kTileRows>(xs, first, up, add, K, N, m, p, os);
      }
      if constexpr (kTileRows > 4) {
        for (; m + 4 <= M; m += 4) PanelRows<E, 4>(xs, first, up, add, K, N, m, p, os);
      }
      for (; m < M; ++m) PanelRows<E, 1>(xs, first, up, add, K, N, m, p, os);
    };
  });
  return ffi::Error::Success();
}

ffi::Error PackedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                        ffi::Buffer<ffi::F32> panels, ffi::ResultBuffer<ffi::F32> out) {
  return Run<Epilogue::kNone>("prerl_packed_matmul", pool, x, panels, nullptr, nullptr, out);
}

ffi::Error PackedMatmulResidual(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                ffi::Buffer<ffi::F32> panels, ffi::Buffer<ffi::F32> residual,
                                ffi::ResultBuffer<ffi::F32> out) {
  return Run<Epilogue::kResidual>("prerl_packed_matmul_residual", pool, x, panels, nullptr,
                                  &residual, out);
}

ffi::Error GatedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                       ffi::Buffer<ffi::F32> gate, ffi::Buffer<ffi::F32> up,
                       ffi::ResultBuffer<ffi::F32> out) {
  return Run<Epilogue::kSiluGate>("prerl_gated_matmul", pool, x, gate, &up, nullptr, out);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PrerlPackedMatmul, PackedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // packed weights
                                  .Ret<ffi::Buffer<ffi::F32>>()); // out

XLA_FFI_DEFINE_HANDLER_SYMBOL(PrerlPackedMatmulResidual, PackedMatmulResidual,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // packed weights
                                  .Arg<ffi::Buffer<ffi::F32>>()  // residual
                                  .Ret<ffi::Buffer<ffi::F32>>()); // out

XLA_FFI_DEFINE_HANDLER_SYMBOL(PrerlGatedMatmul, GatedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // packed gate weights
                                  .Arg<ffi::Buffer<ffi::F32>>()  // packed up weights
                                  .Ret<ffi::Buffer<ffi::F32>>()); // out
