// RMSNorm over the last axis, as one XLA:CPU FFI call: the decode step's norms.
//
// out [M, D] = x [M, D] * rsqrt(mean(x^2 over D) + eps) * weight [D] (float32), the products in
// that order as in prerl_jax/model.py's rms_norm; the mean is summed in eight lanes, so it can
// differ from XLA's in the last bits. Built and registered by prerl_jax/kernels/cpu/library.py.
//
// Why a kernel: XLA:CPU ran each decode-step norm as three or four small ops (a reduce, the
// rsqrt, the products), about 0.1 ms per norm at 64 rows x 576, where this is one call.

#include <cmath>
#include <cstdint>
#include <string>

#include "cpu_kernel_pool.h"
#include "cpu_register_tile.h"  // LoadVector, StoreVector
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 8;
// Below this many elements one thread does the whole norm: at SmolLM2's 64 x 576 it took 21-24 us
// per call against 35-46 us split over two threads (waking the pool costs more than the work).
constexpr int64_t kThreadedElements = 1 << 17;
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

void NormRow(const float* x, const float* weight, int64_t D, float eps, float* out) {
  Vec lanes = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    const Vec v = prerl_jax::LoadVector<Vec>(x + d);
    lanes += v * v;
  }
  float sum = 0.0f;
  for (int64_t i = 0; i < kLanes; ++i) sum += lanes[i];
  for (; d < D; ++d) sum += x[d] * x[d];
  const float scale = 1.0f / std::sqrt(sum / static_cast<float>(D) + eps);
  d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    const Vec v =
        prerl_jax::LoadVector<Vec>(x + d) * scale * prerl_jax::LoadVector<Vec>(weight + d);
    prerl_jax::StoreVector(out + d, v);
  }
  for (; d < D; ++d) out[d] = x[d] * scale * weight[d];
}

ffi::Error RmsNorm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> weight,
                   float eps, ffi::ResultBuffer<ffi::F32> out) {
  auto xd = x.dimensions();
  const int64_t D = xd.size() ? xd[xd.size() - 1] : 0;
  if (D == 0 || weight.element_count() != D || out->element_count() != x.element_count()) {
    return ffi::Error::InvalidArgument(
        "prerl_rms_norm: x must be [..., D] (D > 0), the weight [D] and out of x's shape; got "
        "D = " + std::to_string(D) + " and a weight of " + std::to_string(weight.element_count()));
  }
  const int64_t M = x.element_count() / D;
  const float *xs = x.typed_data(), *w = weight.typed_data();
  float* os = out->typed_data();
  auto row = [=](int64_t m) { NormRow(xs + m * D, w, D, eps, os + m * D); };
  if (M * D < kThreadedElements) {
    for (int64_t m = 0; m < M; ++m) row(m);
  } else {
    prerl_jax::ParallelTasks(pool, M, 1, [=] { return row; });
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PrerlRmsNorm, RmsNorm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // weight
                                  .Attr<float>("eps")
                                  .Ret<ffi::Buffer<ffi::F32>>()); // out
