// Decode attention over per-layer cache blocks, as one XLA:CPU FFI call per layer.
//
// Computes what prerl_jax/generate/decode.py's `write_and_attend` computes (float32): the new
// token's queries and keys are rotated (rotary embeddings), its keys and values are written at
// slot `offset` of the last cache block, then one query token per row attends over all the
// blocks; each block gets its own softmax statistics, combined at the end as in flash-decoding.
// Built and registered by prerl_jax/kernels/cpu/library.py.
//
// Operands: q [N, K, G, H], the new keys [N, K, H] and values [N, K, H] (q and the keys not yet
// rotated), the rotary cos and sin [N, H / 2] of each row's new token, offset (int32 scalar),
// then per block keys [R, K, H, C], values [R, K, C, H] and a PRED mask [R, C] or [C], where R
// divides N and row n reads block row n / (N / R) (a prompt block is shared by the N / R
// consecutive samples of its prompt); the last block has R = N. Attribute `scale` multiplies the
// scores. Results: the attention [N, K, G, H], then the last block's keys and values with the
// new token written (meant to alias that block's operands, so the write is in place).
//
// Why a kernel: XLA:CPU runs these products as batched dots of G (e.g. 3) rows each, on one
// core at about a quarter of the memory bandwidth; here each (row, kv head) is one task over
// both cores, with register-tiled vector products, a vector exp, and no reads past a block's
// last valid slot. A task rotates its own queries and key and writes its row's new keys and
// values, into cache lines it is about to read (XLA's separate update of the [H, C] keys wrote
// one float per line, and its rotations were two more ops per layer).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "cpu_attention_lanes.h"
#include "cpu_kernel_pool.h"
#include "cpu_new_token.h"
#include "cpu_register_tile.h"
#include "cpu_vector_exp.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Block {
  const float* keys;    // [R, K, H, C]
  const float* values;  // [R, K, C, H]
  const bool* mask;     // [R, C] or [C]
  int64_t rows, slots, mask_row_stride;
};

struct Problem {
  const float* q;  // [N, K, G, H]
  const float* new_keys;    // [N, K, H], rotated and written at slot `offset` of the last block
  const float* new_values;  // [N, K, H]
  const float* cos;  // [N, H / 2]
  const float* sin;
  int64_t offset;
  std::vector<Block> blocks;
  float* last_keys;  // The last block's keys and values (the results; blocks.back() reads them).
  float* last_values;
  int64_t rows, kv, groups, head_dim, max_slots;
  float scale;
  float* out;  // [N, K, G, H]
};

// The keys and values of the block a thread will read next from memory, prefetched one cache line
// per stream per step of the current block's product loops, so that those reads overlap this
// block's arithmetic instead of stalling the next block's first tiles. In a 30-layer chain of
// this kernel at SmolLM2's shapes (64 rows, a shared prompt block, three generated blocks):
// 1.27-1.30 against 1.47-1.51 ms per layer without it. Prefetching a whole block at once before
// its products did not help, nor did one line per step (alternating streams) or two per stream.
// The keys are `rows` rows of `row_floats` floats, `stride_floats` apart (only a block's valid
// slots are read); the values are one range.
class Lookahead {
 public:
  void Queue(const float* keys, int64_t rows, int64_t row_floats, int64_t stride_floats,
             const float* values, int64_t value_floats) {
    key_row_ = Bytes(keys);
    key_ = key_row_;
    key_end_ = key_row_ + row_floats * sizeof(float);
    key_rows_left_ = rows;
    key_stride_ = stride_floats * sizeof(float);
    value_ = Bytes(values);
    value_end_ = value_ + value_floats * sizeof(float);
  }

  void Clear() { key_rows_left_ = 0, value_ = value_end_ = nullptr; }

  void Step() {
    if (key_rows_left_ > 0) {
      __builtin_prefetch(key_, 0, 1);
      key_ += kLine;
      if (key_ >= key_end_ && --key_rows_left_ > 0) {
        key_row_ += key_stride_;
        key_end_ += key_stride_;
        key_ = key_row_;
      }
    }
    if (value_ < value_end_) {
      __builtin_prefetch(value_, 0, 1);
      value_ += kLine;
    }
  }

 private:
  static constexpr int64_t kLine = 64;
  static const char* Bytes(const float* x) { return reinterpret_cast<const char*>(x); }
  const char *key_row_ = nullptr, *key_ = nullptr, *key_end_ = nullptr;
  int64_t key_rows_left_ = 0, key_stride_ = 0;
  const char *value_ = nullptr, *value_end_ = nullptr;
};

// Scratch of one thread: the task's rotated queries, scores of one block, its mask as floats
// (1 or 0), each block's statistics and weighted values, their combination for one query, and
// the lookahead.
struct Scratch {
  explicit Scratch(const Problem& p)
      : query(p.groups * p.head_dim),
        scores(p.groups * p.max_slots),
        keep(p.max_slots),
        maxima(p.blocks.size() * p.groups),
        sums(p.blocks.size() * p.groups),
        outs(p.blocks.size() * p.groups * p.head_dim),
        combined(p.head_dim) {}
  std::vector<float> query, scores, keep, maxima, sums, outs, combined;
  Lookahead ahead;
};

using namespace prerl_jax::lanes;

// out[r, j:j+W] = a[r] @ b[K, j:j+W] for the Rows rows r of a (K apart) and W = V * kLanes
// columns (b's rows `ldb` apart, out's `N` apart), stepping `ahead` once per k.
template <int Rows, int V>
void ProductTile(const float* a, const float* b, int64_t ldb, float* out, int64_t K, int64_t N,
                 int64_t j, Lookahead& ahead) {
  Lookahead local = ahead;  // A local copy, which the compiler keeps in registers.
  prerl_jax::RegisterTile<Vec, Rows, V>(
      a, K, b + j, ldb, K, [&](int r, int v, Vec sum) { Store(out + r * N + j + kLanes * v, sum); },
      [&local] { local.Step(); });
  ahead = local;
}

// ProductTile<Rows, V> for `vectors` (1 to V) vectors: the widest tile that fits, so that narrow
// products still keep several independent accumulators in flight.
template <int Rows, int V>
void NarrowTile(int64_t vectors, const float* a, const float* b, int64_t ldb, float* out,
                int64_t K, int64_t N, int64_t j, Lookahead& ahead) {
  if constexpr (V > 1) {
    if (vectors < V) return NarrowTile<Rows, V - 1>(vectors, a, b, ldb, out, K, N, j, ahead);
  }
  ProductTile<Rows, V>(a, b, ldb, out, K, N, j, ahead);
}

// out[Rows, N] = a[Rows, K] @ b[K, N]: tiles of V vectors (12 accumulators at most), the last one
// overlapping the one before where N is not a multiple of its width (each column's sum is the
// same whichever tile computes it); below one tile's width, one narrower tile and an overlapping
// last vector; scalar sums below one vector's width.
template <int Rows>
void RowsProduct(const float* a, const float* b, int64_t ldb, float* out, int64_t K, int64_t N,
                 Lookahead& ahead) {
  constexpr int V = Rows == 1 ? 8 : 12 / Rows;
  if (N < kLanes) {  // Too few columns for a vector.
    for (int64_t r = 0; r < Rows; ++r) {
      for (int64_t j = 0; j < N; ++j) {
        float sum = 0.0f;
        for (int64_t k = 0; k < K; ++k) sum += a[r * K + k] * b[k * ldb + j];
        out[r * N + j] = sum;
      }
    }
    return;
  }
  int64_t j = 0;
  for (; j + V * kLanes <= N; j += V * kLanes) {
    ProductTile<Rows, V>(a, b, ldb, out, K, N, j, ahead);
  }
  if (j == N) return;
  if (j > 0) return ProductTile<Rows, V>(a, b, ldb, out, K, N, N - V * kLanes, ahead);
  const int64_t vectors = N / kLanes;
  NarrowTile<Rows, V>(vectors, a, b, ldb, out, K, N, 0, ahead);
  if (vectors * kLanes < N) ProductTile<Rows, 1>(a, b, ldb, out, K, N, N - kLanes, ahead);
}

// out[M, N] = a[M, K] @ b[K, N] (b's rows `ldb` apart; a and out contiguous), up to four rows of
// a at a time (the query heads of a GQA group share one read of the keys and values).
void Product(const float* a, const float* b, int64_t ldb, float* out, int64_t M, int64_t K,
             int64_t N, Lookahead& ahead) {
  while (M > 0) {
    const int64_t rows = M == 5 || M == 6 ? 3 : std::min<int64_t>(M, 4);
    switch (rows) {
      case 4: RowsProduct<4>(a, b, ldb, out, K, N, ahead); break;
      case 3: RowsProduct<3>(a, b, ldb, out, K, N, ahead); break;
      case 2: RowsProduct<2>(a, b, ldb, out, K, N, ahead); break;
      default: RowsProduct<1>(a, b, ldb, out, K, N, ahead);
    }
    a += rows * K, out += rows * N, M -= rows;
  }
}

// Applies `f` to x[0:C] and keep[0:C] a vector at a time (the last C % kLanes slots through a
// padded vector), writing its result into x.
template <typename F>
void Lanewise(float* x, const float* keep, int64_t C, F f) {
  int64_t c = 0;
  for (; c + kLanes <= C; c += kLanes) Store(x + c, f(Load(x + c), Load(keep + c)));
  if (c < C) {
    float tail_x[kLanes] = {}, tail_keep[kLanes] = {};
    std::copy(x + c, x + C, tail_x);
    std::copy(keep + c, keep + C, tail_keep);
    Store(tail_x, f(Load(tail_x), Load(tail_keep)));
    std::copy(tail_x, tail_x + (C - c), x + c);
  }
}

// What task `task` (row n, kv head k) reads of block b: its keys [H, C] and values [C, H], its mask
// row, and its valid slots (up to the last one the mask keeps; later slots are not read).
struct TaskBlock {
  const float* keys;
  const float* values;
  const bool* mask;
  int64_t slots, valid;
};

TaskBlock View(const Problem& p, int64_t task, size_t b) {
  const int64_t n = task / p.kv, k = task % p.kv, H = p.head_dim;
  const Block& block = p.blocks[b];
  const int64_t C = block.slots, row = n / (p.rows / block.rows);
  const bool* mask = block.mask + row * block.mask_row_stride;
  int64_t valid = C;
  while (valid > 0 && !mask[valid - 1]) --valid;
  return {block.keys + (row * p.kv + k) * H * C, block.values + (row * p.kv + k) * C * H, mask,
          C, valid};
}

// Queues in `ahead` the block after block b of `task` that has a row per query row and a valid
// slot, or else the first such block of the next task (the thread's next task, except at the end
// of a chunk). Blocks shared by a prompt's samples are skipped: consecutive tasks read them, so
// they are usually in cache.
void QueueNext(const Problem& p, int64_t task, size_t b, Lookahead& ahead) {
  for (int64_t t = task; t < std::min(task + 2, p.rows * p.kv); ++t) {
    for (size_t c = t == task ? b + 1 : 0; c < p.blocks.size(); ++c) {
      if (p.blocks[c].rows != p.rows) continue;
      const TaskBlock next = View(p, t, c);
      if (next.valid == 0) continue;  // Not read.
      const int64_t H = p.head_dim;
      return ahead.Queue(next.keys, H, next.valid, next.slots, next.values, next.valid * H);
    }
  }
  ahead.Clear();
}

// Row n, kv head k: every block's softmax statistics and weighted values, then their combination.
// Slots after a block's last valid one (the unwritten end of the block being decoded into) are
// not read.
void AttendOne(const Problem& p, int64_t task, Scratch& scratch) {
  const int64_t n = task / p.kv, G = p.groups, H = p.head_dim;
  const float *cos = p.cos + n * (H / 2), *sin = p.sin + n * (H / 2);
  float* q = scratch.query.data();
  for (int64_t g = 0; g < G; ++g) Rotate(p.q + (task * G + g) * H, cos, sin, H, q + g * H, 1);
  {  // This task's row of the last block (which has a row per query row): the new token, its key
     // rotated into column `offset` of the [H, C] keys.
    const int64_t C = p.blocks.back().slots;
    Rotate(p.new_keys + task * H, cos, sin, H, p.last_keys + task * H * C + p.offset, C);
    std::copy(p.new_values + task * H, p.new_values + (task + 1) * H,
              p.last_values + (task * C + p.offset) * H);
  }
  const float infinity = std::numeric_limits<float>::infinity();
  for (size_t b = 0; b < p.blocks.size(); ++b) {
    const auto [keys, values, mask, C, valid] = View(p, task, b);
    QueueNext(p, task, b, scratch.ahead);
    float* keep = scratch.keep.data();  // 1 for a valid slot, 0 for a masked one.
    for (int64_t c = 0; c < valid; ++c) keep[c] = mask[c] ? 1.0f : 0.0f;
    float* scores = scratch.scores.data();  // [G, valid]
    Product(q, keys, C, scores, G, H, valid, scratch.ahead);
    const Vec zero = {}, minus_infinity = zero - infinity;
    for (int64_t g = 0; g < G; ++g) {
      float* s = scores + g * valid;
      Lanewise(s, keep, valid, [&](Vec x, Vec kept) {
        return Select(kept > zero, x * p.scale, minus_infinity);
      });
      float maximum = Maximum(s, valid);
      if (!std::isfinite(maximum)) maximum = 0.0f;  // A block with no valid slot.
      Lanewise(s, keep, valid, [&](Vec x, Vec kept) {
        return Select(kept > zero, prerl_jax::Exp<Vec, Mask>(x - maximum), zero);
      });
      scratch.maxima[b * G + g] = maximum;
      scratch.sums[b * G + g] = Sum(s, valid);
    }
    Product(scores, values, H, scratch.outs.data() + b * G * H, G, valid, H, scratch.ahead);
  }
  float* result = p.out + task * G * H;
  for (int64_t g = 0; g < G; ++g) {
    float overall = -infinity;
    for (size_t b = 0; b < p.blocks.size(); ++b) {
      overall = std::max(overall, scratch.maxima[b * G + g]);
    }
    float total = 0.0f;
    float* combined = scratch.combined.data();  // Summed here, not in `out`, which is written once.
    std::fill(combined, combined + H, 0.0f);
    for (size_t b = 0; b < p.blocks.size(); ++b) {
      const float scale = std::exp(scratch.maxima[b * G + g] - overall);
      total += scale * scratch.sums[b * G + g];
      const float* o = scratch.outs.data() + (b * G + g) * H;
      for (int64_t h = 0; h < H; ++h) combined[h] += scale * o[h];
    }
    for (int64_t h = 0; h < H; ++h) result[g * H + h] = combined[h] / total;
  }
}

ffi::Error Invalid(const std::string& message) {
  return ffi::Error::InvalidArgument("prerl_decode_attention: " + message);
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                           ffi::Buffer<ffi::F32> new_keys, ffi::Buffer<ffi::F32> new_values,
                           ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                           ffi::Buffer<ffi::S32> offset, ffi::RemainingArgs blocks, float scale,
                           ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> last_keys,
                           ffi::ResultBuffer<ffi::F32> last_values) {
  auto qd = q.dimensions();
  const std::string shape_error =
      prerl_jax::NewTokenShapeError(q, new_keys, new_values, cos, sin);
  if (!shape_error.empty()) return Invalid(shape_error);
  if (offset.element_count() != 1) return Invalid("offset must be a scalar");
  if (blocks.size() == 0 || blocks.size() % 3 != 0) {
    return Invalid("expected (keys, values, mask) per block, got " + std::to_string(blocks.size()) +
                   " operands after the offset");
  }
  Problem p;
  p.q = q.typed_data();
  p.new_keys = new_keys.typed_data();
  p.new_values = new_values.typed_data();
  p.cos = cos.typed_data();
  p.sin = sin.typed_data();
  p.offset = offset.typed_data()[0];
  p.rows = qd[0], p.kv = qd[1], p.groups = qd[2], p.head_dim = qd[3];
  p.scale = scale;
  p.out = out->typed_data();
  p.max_slots = 0;
  for (size_t i = 0; i < blocks.size(); i += 3) {
    auto keys = blocks.get<ffi::AnyBuffer>(i), values = blocks.get<ffi::AnyBuffer>(i + 1),
         mask = blocks.get<ffi::AnyBuffer>(i + 2);
    if (!keys.has_value() || !values.has_value() || !mask.has_value()) {
      return Invalid("bad operand");
    }
    const std::string which = "block " + std::to_string(i / 3) + ": ";
    if (keys->element_type() != ffi::F32 || values->element_type() != ffi::F32 ||
        mask->element_type() != ffi::PRED) {
      return Invalid(which + "keys and values must be float32 and the mask bool");
    }
    auto kd = keys->dimensions(), vd = values->dimensions(), md = mask->dimensions();
    if (kd.size() != 4 || vd.size() != 4 || kd[0] <= 0 || p.rows % kd[0] != 0 || kd[1] != p.kv ||
        kd[2] != p.head_dim || vd[0] != kd[0] || vd[1] != p.kv || vd[2] != kd[3] ||
        vd[3] != p.head_dim) {
      return Invalid(which + "keys must be [R, kv_heads, head_dim, C] and values [R, kv_heads, C, "
                     "head_dim], with R dividing the query rows");
    }
    const bool per_row = md.size() == 2;
    if (!(md.size() == 1 && md[0] == kd[3]) && !(per_row && md[0] == kd[0] && md[1] == kd[3])) {
      return Invalid(which + "mask must be [R, C] or [C]");
    }
    p.blocks.push_back(Block{keys->typed_data<float>(), values->typed_data<float>(),
                             reinterpret_cast<const bool*>(mask->untyped_data()), kd[0], kd[3],
                             per_row ? kd[3] : 0});
    p.max_slots = std::max(p.max_slots, kd[3]);
  }
  Block& last = p.blocks.back();
  if (last.rows != p.rows || p.offset < 0 || p.offset >= last.slots ||
      last_keys->element_count() != last.rows * p.kv * p.head_dim * last.slots ||
      last_values->element_count() != last_keys->element_count()) {
    return Invalid("the last block must have a row per query row, results of its shape and an "
                   "offset inside it");
  }
  p.last_keys = last_keys->typed_data();
  p.last_values = last_values->typed_data();
  if (p.last_keys != last.keys || p.last_values != last.values) {
    return Invalid("the last two results must alias the last block's keys and values "
                   "(input_output_aliases)");
  }
  prerl_jax::ParallelTasks(pool, p.rows * p.kv, 4, [p] {
    return [&p, scratch = Scratch(p)](int64_t task) mutable { AttendOne(p, task, scratch); };
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PrerlDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // new keys
                                  .Arg<ffi::Buffer<ffi::F32>>()  // new values
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cos
                                  .Arg<ffi::Buffer<ffi::F32>>()  // sin
                                  .Arg<ffi::Buffer<ffi::S32>>()  // offset
                                  .RemainingArgs()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // attention
                                  .Ret<ffi::Buffer<ffi::F32>>()   // last block's keys
                                  .Ret<ffi::Buffer<ffi::F32>>()); // and values
