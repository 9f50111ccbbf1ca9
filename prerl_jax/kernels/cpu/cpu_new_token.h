// The new token's operands both decode-attention kernels take, and their shape check.
#ifndef PRERL_JAX_CPU_NEW_TOKEN_H_
#define PRERL_JAX_CPU_NEW_TOKEN_H_

#include <string>

#include "xla/ffi/api/ffi.h"

namespace prerl_jax {

// "" when q is [N, K, G, H], the new keys and values [N, K, H] and the rotary cos and sin
// [N, H / 2] (H even); otherwise what is wrong.
inline std::string NewTokenShapeError(const xla::ffi::Buffer<xla::ffi::F32>& q,
                                      const xla::ffi::Buffer<xla::ffi::F32>& new_keys,
                                      const xla::ffi::Buffer<xla::ffi::F32>& new_values,
                                      const xla::ffi::Buffer<xla::ffi::F32>& cos,
                                      const xla::ffi::Buffer<xla::ffi::F32>& sin) {
  auto qd = q.dimensions();
  if (qd.size() != 4) return "q must be [rows, kv_heads, groups, head_dim]";
  for (auto dims : {new_keys.dimensions(), new_values.dimensions()}) {
    if (dims.size() != 3 || dims[0] != qd[0] || dims[1] != qd[1] || dims[2] != qd[3]) {
      return "new keys and values must be [rows, kv_heads, head_dim] like q";
    }
  }
  if (qd[3] % 2 != 0 || static_cast<int64_t>(cos.element_count()) != qd[0] * qd[3] / 2 ||
      sin.element_count() != cos.element_count()) {
    return "cos and sin must be [rows, head_dim / 2] (an even head_dim)";
  }
  return "";
}

}  // namespace prerl_jax

#endif  // PRERL_JAX_CPU_NEW_TOKEN_H_
