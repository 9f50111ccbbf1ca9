// Decode attention over a page-pool KV cache, as one XLA:CPU FFI call per layer.
//
// Computes what the continuous sampler's decode step computes with page_pool.write_tokens and
// paged_attention.gather_attention (prerl_jax/generate/, float32), for one new token per row:
// the token's queries and keys are rotated (rotary embeddings), its keys and values are written
// at its position in the row's pages, then its queries attend over the row's positions 0 ..
// position. Built and registered by prerl_jax/kernels/cpu/library.py.
//
// Operands: q [N, K, G, H], the new keys [N, K, H] and values [N, K, H] (q and the keys not yet
// rotated), the rotary cos and sin [N, H / 2] of each row's new token, the page tables [N, P]
// (int32), each row's position [N] (int32), which rows are live [N] (PRED), then the pool
// [layers, pages, S, 2K, H] (kv head k's keys at combined head 2k, its values at 2k + 1; see
// prerl_jax/generate/page_pool.py). Attributes: `layer` (the pool's layer this call reads and
// writes) and `scale` (multiplies the scores). Results: the attention [N, K, G, H] (zero for rows
// that are not live), then the pool (meant to alias its operand, so the write is in place).
//
// Position t of row n is slot t % S of page table[n, t / S]. A live row reads only its slots
// 0 .. position (the table's later entries may point anywhere) and writes only slot `position`;
// a row that is not live reads and writes nothing, so it cannot touch a page a live row reads.
//
// Why a kernel: the XLA path gathers every row's whole page table of keys and values per layer
// (rows x pages x S x 2K x H floats copied per layer per step) and runs the products as batched
// dots of G rows; here each (row, kv head) is one task over XLA's intra-op threads that reads its
// filled slots in place, with vector products and a vector exp, and writes its own new slot.
// A slot's keys of one kv head are H contiguous floats, so a score is a dot product of two
// vectors; the products of kLanes slots are summed across lanes together by a tree of shuffles
// (summing each slot's lanes alone took a quarter more time per call: 0.62 against 0.47 ms per
// layer at 16 rows of 151 positions, SmolLM2's heads). The weighted values are a register tile
// of the G query heads by H, accumulated page by page. Prefetching the next page's slots while
// scoring one did not help (0.61 against 0.62 ms per layer).

#include <algorithm>
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

using namespace prerl_jax::lanes;

struct Problem {
  const float* q;           // [N, K, G, H]
  const float* new_keys;    // [N, K, H]
  const float* new_values;  // [N, K, H]
  const float* cos;         // [N, H / 2]
  const float* sin;
  const int32_t* page_table;  // [N, table_width]
  const int32_t* positions;   // [N]
  const bool* live;           // [N]
  float* pages;               // This layer's pages [pages, S, 2K, H] of the (aliased) pool.
  int64_t rows, kv, groups, head_dim, page_size, table_width;
  float scale;
  float* out;  // [N, K, G, H]

  int64_t slot_stride() const { return 2 * kv * head_dim; }
  // Scores per query head in a task's scratch: the most positions a row has, to whole vectors.
  int64_t score_stride() const {
    return (table_width * page_size + kLanes - 1) / kLanes * kLanes;
  }
};

// Scratch of one thread: the task's rotated and scaled queries [G, H], its scores [G, positions],
// its weighted values [G, H] and softmax sums [G].
struct Scratch {
  explicit Scratch(const Problem& p)
      : query(p.groups * p.head_dim),
        scores(p.groups * p.score_stride()),
        outs(p.groups * p.head_dim),
        sums(p.groups) {}
  std::vector<float> query, scores, outs, sums;
};

float LaneSum(Vec v) {
  float sum = 0.0f;
  for (int64_t i = 0; i < kLanes; ++i) sum += v[i];
  return sum;
}

// The vector whose lane i is the sum of x[i]'s lanes, for L = 8 or 4 lanes: a transposing tree
// of shuffles and adds (far fewer instructions than L separate lane sums).
template <typename V, int L>
V LaneSums(const V (&x)[L]) {
  static_assert(L == 8 || L == 4);
  if constexpr (L == 8) {
    auto pairs = [](V a, V b) {  // Lanes (a0 + a1, b0 + b1, a2 + a3, b2 + b3, ...).
      return __builtin_shufflevector(a, b, 0, 8, 2, 10, 4, 12, 6, 14) +
             __builtin_shufflevector(a, b, 1, 9, 3, 11, 5, 13, 7, 15);
    };
    auto quads = [](V a, V b) {  // Lanes (a0:4, a0:4 of the next operand pair, ...).
      return __builtin_shufflevector(a, b, 0, 1, 8, 9, 4, 5, 12, 13) +
             __builtin_shufflevector(a, b, 2, 3, 10, 11, 6, 7, 14, 15);
    };
    const V b0 = quads(pairs(x[0], x[1]), pairs(x[2], x[3]));
    const V b1 = quads(pairs(x[4], x[5]), pairs(x[6], x[7]));
    return __builtin_shufflevector(b0, b1, 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(b0, b1, 4, 5, 6, 7, 12, 13, 14, 15);
  } else {
    auto pairs = [](V a, V b) {
      return __builtin_shufflevector(a, b, 0, 4, 2, 6) + __builtin_shufflevector(a, b, 1, 5, 3, 7);
    };
    const V a0 = pairs(x[0], x[1]), a1 = pairs(x[2], x[3]);
    return __builtin_shufflevector(a0, a1, 0, 1, 4, 5) + __builtin_shufflevector(a0, a1, 2, 3, 6, 7);
  }
}

// scores[s] = q . keys[s * stride : s * stride + H] for one query head q and `slots` slots s:
// kLanes slots at a time, their products summed across lanes together.
void ScoreRow(const float* q, int64_t H, const float* keys, int64_t stride, int64_t slots,
              float* scores) {
  const int64_t whole = H / kLanes * kLanes;
  int64_t s = 0;
  for (; s + kLanes <= slots; s += kLanes) {
    Vec acc[kLanes] = {};
    for (int64_t h = 0; h < whole; h += kLanes) {
      const Vec qv = Load(q + h);
      for (int i = 0; i < kLanes; ++i) acc[i] += qv * Load(keys + (s + i) * stride + h);
    }
    Store(scores + s, LaneSums<Vec, kLanes>(acc));
    for (int64_t i = 0; i < kLanes && whole < H; ++i) {
      for (int64_t h = whole; h < H; ++h) scores[s + i] += q[h] * keys[(s + i) * stride + h];
    }
  }
  for (; s < slots; ++s) {
    const float* key = keys + s * stride;
    Vec acc = {};
    for (int64_t h = 0; h < whole; h += kLanes) acc += Load(q + h) * Load(key + h);
    float sum = LaneSum(acc);
    for (int64_t h = whole; h < H; ++h) sum += q[h] * key[h];
    scores[s] = sum;
  }
}

// ScoreRow for each of the G query heads (H apart; their scores ld apart).
void Scores(const float* q, int64_t G, int64_t H, const float* keys, int64_t stride,
            int64_t slots, float* scores, int64_t ld) {
  for (int64_t g = 0; g < G; ++g) ScoreRow(q + g * H, H, keys, stride, slots, scores + g * ld);
}

// out[r, j : j + V * kLanes] += sum over s of weights[r * ld + s] * values[s * stride + j ...]
// for Rows rows r (out's H apart).
template <int Rows, int V>
void WeightedTile(const float* weights, int64_t ld, const float* values, int64_t stride,
                  int64_t slots, float* out, int64_t H, int64_t j) {
  prerl_jax::RegisterTile<Vec, Rows, V>(weights, ld, values + j, stride, slots,
                                        [&](int r, int v, Vec sum) {
                                          float* o = out + r * H + j + kLanes * v;
                                          Store(o, Load(o) + sum);
                                        });
}

// WeightedTile over all H columns: tiles of V vectors (12 accumulators at most), then single
// vectors, then scalar columns.
template <int Rows>
void WeightedRows(const float* weights, int64_t ld, const float* values, int64_t stride,
                  int64_t slots, float* out, int64_t H) {
  constexpr int V = 12 / Rows;
  int64_t j = 0;
  for (; j + V * kLanes <= H; j += V * kLanes) {
    WeightedTile<Rows, V>(weights, ld, values, stride, slots, out, H, j);
  }
  for (; j + kLanes <= H; j += kLanes) {
    WeightedTile<Rows, 1>(weights, ld, values, stride, slots, out, H, j);
  }
  for (; j < H; ++j) {
    for (int r = 0; r < Rows; ++r) {
      float sum = 0.0f;
      for (int64_t s = 0; s < slots; ++s) sum += weights[r * ld + s] * values[s * stride + j];
      out[r * H + j] += sum;
    }
  }
}

// out[G, H] += weights[G, slots] @ values[slots, H] (weights' rows ld apart, values' stride).
void Weighted(const float* weights, int64_t ld, const float* values, int64_t stride,
              int64_t slots, float* out, int64_t G, int64_t H) {
  while (G > 0) {
    const int64_t rows = std::min<int64_t>(G, 4);
    switch (rows) {
      case 4: WeightedRows<4>(weights, ld, values, stride, slots, out, H); break;
      case 3: WeightedRows<3>(weights, ld, values, stride, slots, out, H); break;
      case 2: WeightedRows<2>(weights, ld, values, stride, slots, out, H); break;
      default: WeightedRows<1>(weights, ld, values, stride, slots, out, H);
    }
    weights += rows * ld, out += rows * H, G -= rows;
  }
}

// Row n, kv head k: writes the new token's rotated key and value into its slot, scores the
// queries against positions 0 .. position page by page, takes the softmax, then sums the values
// page by page.
void AttendOne(const Problem& p, int64_t task, Scratch& scratch) {
  const int64_t n = task / p.kv, k = task % p.kv, G = p.groups, H = p.head_dim;
  float* result = p.out + task * G * H;
  if (!p.live[n]) {
    std::fill(result, result + G * H, 0.0f);
    return;
  }
  const float *cos = p.cos + n * (H / 2), *sin = p.sin + n * (H / 2);
  float* q = scratch.query.data();
  for (int64_t g = 0; g < G; ++g) {
    Rotate(p.q + (task * G + g) * H, cos, sin, H, q + g * H, 1);
    for (int64_t h = 0; h < H; ++h) q[g * H + h] *= p.scale;
  }
  const int64_t S = p.page_size, stride = p.slot_stride(), position = p.positions[n];
  const int32_t* table = p.page_table + n * p.table_width;
  // Kv head k's keys at position t (its values follow them).
  auto keys_at = [&](int64_t t) {
    return p.pages + (static_cast<int64_t>(table[t / S]) * S + t % S) * stride + 2 * k * H;
  };
  float* written = keys_at(position);
  Rotate(p.new_keys + task * H, cos, sin, H, written, 1);
  std::copy(p.new_values + task * H, p.new_values + (task + 1) * H, written + H);

  const int64_t T = position + 1, ld = p.score_stride();
  float* scores = scratch.scores.data();
  for (int64_t first = 0; first < T; first += S) {
    Scores(q, G, H, keys_at(first), stride, std::min(S, T - first), scores + first, ld);
  }
  const int64_t padded = (T + kLanes - 1) / kLanes * kLanes;
  for (int64_t g = 0; g < G; ++g) {
    float* s = scores + g * ld;
    const float maximum = Maximum(s, T);
    // Lanes past T are exp(-87)-small but never summed or read.
    std::fill(s + T, s + padded, -std::numeric_limits<float>::infinity());
    for (int64_t c = 0; c < padded; c += kLanes) {
      Store(s + c, prerl_jax::Exp<Vec, Mask>(Load(s + c) - maximum));
    }
    scratch.sums[g] = Sum(s, T);
  }
  float* outs = scratch.outs.data();
  std::fill(outs, outs + G * H, 0.0f);
  for (int64_t first = 0; first < T; first += S) {
    Weighted(scores + first, ld, keys_at(first) + H, stride, std::min(S, T - first), outs, G, H);
  }
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t h = 0; h < H; ++h) result[g * H + h] = outs[g * H + h] / scratch.sums[g];
  }
}

ffi::Error Invalid(const std::string& message) {
  return ffi::Error::InvalidArgument("prerl_paged_attention: " + message);
}

// Every live row's position fits its table and the pages it reads exist; the first row that
// does not, named.
ffi::Error CheckRows(const Problem& p, int64_t pages) {
  for (int64_t n = 0; n < p.rows; ++n) {
    if (!p.live[n]) continue;
    const int64_t position = p.positions[n];
    if (position < 0 || position >= p.table_width * p.page_size) {
      return Invalid("row " + std::to_string(n) + ": position " + std::to_string(position) +
                     " is outside its page table's " +
                     std::to_string(p.table_width * p.page_size) + " slots");
    }
    for (int64_t j = 0; j <= position / p.page_size; ++j) {
      const int32_t page = p.page_table[n * p.table_width + j];
      if (page < 0 || page >= pages) {
        return Invalid("row " + std::to_string(n) + ": page table entry " + std::to_string(j) +
                       " is page " + std::to_string(page) + ", outside the pool's " +
                       std::to_string(pages) + " pages");
      }
    }
  }
  return ffi::Error::Success();
}

ffi::Error PagedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                          ffi::Buffer<ffi::F32> new_keys, ffi::Buffer<ffi::F32> new_values,
                          ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                          ffi::Buffer<ffi::S32> page_table, ffi::Buffer<ffi::S32> positions,
                          ffi::Buffer<ffi::PRED> live, ffi::Buffer<ffi::F32> kv_pages,
                          int64_t layer, float scale, ffi::ResultBuffer<ffi::F32> out,
                          ffi::ResultBuffer<ffi::F32> kv_pages_out) {
  auto qd = q.dimensions(), td = page_table.dimensions(), pd = kv_pages.dimensions();
  const std::string shape_error =
      prerl_jax::NewTokenShapeError(q, new_keys, new_values, cos, sin);
  if (!shape_error.empty()) return Invalid(shape_error);
  if (td.size() != 2 || td[0] != qd[0] || td[1] < 1 || positions.element_count() != qd[0] ||
      live.element_count() != qd[0]) {
    return Invalid("the page table must be [rows, pages per row], positions and live [rows]");
  }
  if (pd.size() != 5 || pd[3] != 2 * qd[1] || pd[4] != qd[3] || pd[2] < 1) {
    return Invalid("the pool must be [layers, pages, page_size, 2 * kv_heads, head_dim]");
  }
  if (layer < 0 || layer >= pd[0]) {
    return Invalid("layer " + std::to_string(layer) + " is outside the pool's " +
                   std::to_string(pd[0]) + " layers");
  }
  if (kv_pages_out->typed_data() != kv_pages.typed_data()) {
    return Invalid("the pool result must alias the pool operand (input_output_aliases)");
  }
  Problem p;
  p.q = q.typed_data();
  p.new_keys = new_keys.typed_data();
  p.new_values = new_values.typed_data();
  p.cos = cos.typed_data();
  p.sin = sin.typed_data();
  p.page_table = page_table.typed_data();
  p.positions = positions.typed_data();
  p.live = live.typed_data();
  p.rows = qd[0], p.kv = qd[1], p.groups = qd[2], p.head_dim = qd[3];
  p.page_size = pd[2], p.table_width = td[1];
  p.pages = kv_pages_out->typed_data() + layer * pd[1] * pd[2] * pd[3] * pd[4];
  p.scale = scale;
  p.out = out->typed_data();
  if (ffi::Error error = CheckRows(p, pd[1]); error.failure()) return error;
  prerl_jax::ParallelTasks(pool, p.rows * p.kv, 4, [p] {
    return [&p, scratch = Scratch(p)](int64_t task) mutable { AttendOne(p, task, scratch); };
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PrerlPagedAttention, PagedAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::Buffer<ffi::F32>>()   // new keys
                                  .Arg<ffi::Buffer<ffi::F32>>()   // new values
                                  .Arg<ffi::Buffer<ffi::F32>>()   // cos
                                  .Arg<ffi::Buffer<ffi::F32>>()   // sin
                                  .Arg<ffi::Buffer<ffi::S32>>()   // page table
                                  .Arg<ffi::Buffer<ffi::S32>>()   // positions
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // live
                                  .Arg<ffi::Buffer<ffi::F32>>()   // pool
                                  .Attr<int64_t>("layer")
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // attention
                                  .Ret<ffi::Buffer<ffi::F32>>()); // pool
