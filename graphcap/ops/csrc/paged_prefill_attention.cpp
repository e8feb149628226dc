// Paged prefill attention for CPU: store the new tokens' keys/values in the paged cache, then let every new
// token attend causally over its request's keys (cached prefix and new tokens alike), in one call.
//
// Why not SDPA: at prefill sizes of small models the work per layer is a few hundred thousand multiply-adds,
// and SDPA's per-call set-up, the gathers that build its padded [B, L] layout and the separate cache writes
// cost several times that. Ragged batches also need no padding here: each token visits only its own keys.
//
// Tokens are taken in tiles of consecutive rows of one request. A tile's queries for one kv head (tile rows x
// query heads per kv head) are scored against each key together, so every key and value row is read once
// per tile, and softmax runs online over blocks of keys (no score matrix over the whole context).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "kernel_common.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

namespace {

// A tile scores up to kLanes (token, query head) pairs against each key: consecutive tokens of one request
// times the query heads that share one kv head (in chunks of at most kLanes heads when more share it). The
// lane count is fixed so every loop over lanes compiles to a few full-width vector operations with no
// run-time trip count; lanes beyond the tile's real pairs compute on zeros and are never stored.
constexpr int64_t kLanes = 32;
constexpr int64_t kKeyBlock = 64;  // keys scored before each online-softmax update
// exp() arguments are clamped here: below it the result would underflow, and an underflowing lane sends the
// vectorised exp down a scalar slow path (masked keys score -1e30, so every causal block has such lanes).
// e^-80 is below float resolution relative to the row's largest term, so nothing measurable is lost.
constexpr float kMinExponent = -80.f;

struct Tile {
  int64_t first;    // first token row
  int64_t rows;     // consecutive tokens of one request
  int64_t request;  // their request
};

struct Scratch {
  alignas(64) float scores[kKeyBlock][kLanes];
  alignas(64) float top[kLanes];
  alignas(64) float total[kLanes];
  alignas(64) float limit[kLanes];  // the last key position each lane may see (-1: a padding lane)
};

// One tile for `heads` query heads from `head0` on, all reading kv head `kv_head`. kHeadDim > 0 fixes the
// head size at compile time; 0 reads it from `head_dim_rt`. qt and acc are [head_dim][kLanes], lane-major,
// so the loops over lanes are the innermost, contiguous ones.
template <typename T, int kHeadDim>
void attend_tile(const T* q, int64_t q_stride, const T* k_cache, const T* v_cache, const int64_t* slots,
                 const int64_t* positions, const Tile& tile, int64_t kv_head, int64_t head0, int64_t heads,
                 int64_t num_kv_heads, int64_t head_dim_rt, float scale, T* out, int64_t out_stride,
                 float* __restrict qt, float* __restrict acc, Scratch& w) {
  const int64_t head_dim = kHeadDim > 0 ? kHeadDim : head_dim_rt;
  const int64_t used = tile.rows * heads;
  int64_t last_key = 0;
  for (int64_t r = 0; r < tile.rows; ++r) last_key = std::max(last_key, positions[r]);
  std::fill(qt, qt + head_dim * kLanes, 0.f);
  for (int64_t l = 0; l < kLanes; ++l) w.limit[l] = l < used ? static_cast<float>(positions[l / heads]) : -1.f;
  for (int64_t r = 0; r < tile.rows; ++r) {
    const T* qr = q + (tile.first + r) * q_stride + head0 * head_dim;
    for (int64_t g = 0; g < heads; ++g)
      for (int64_t d = 0; d < head_dim; ++d)
        qt[d * kLanes + r * heads + g] = static_cast<float>(qr[g * head_dim + d]) * scale;
  }
  std::fill(acc, acc + head_dim * kLanes, 0.f);
  std::fill(w.top, w.top + kLanes, -1e30f);
  std::fill(w.total, w.total + kLanes, 0.f);
  for (int64_t j0 = 0; j0 <= last_key; j0 += kKeyBlock) {
    const int64_t n = std::min(kKeyBlock, last_key + 1 - j0);
    alignas(64) float block_top[kLanes];
    for (int64_t l = 0; l < kLanes; ++l) block_top[l] = w.top[l];
    const float* __restrict limit = w.limit;
    for (int64_t j = 0; j < n; ++j) {
      const T* key = k_cache + (slots[j0 + j] * num_kv_heads + kv_head) * head_dim;
      float* __restrict s = w.scores[j];
      for (int64_t l = 0; l < kLanes; ++l) s[l] = 0.f;
      for (int64_t d = 0; d < head_dim; ++d) {
        const float kd = static_cast<float>(key[d]);
        const float* __restrict qd = qt + d * kLanes;
        for (int64_t l = 0; l < kLanes; ++l) s[l] += qd[l] * kd;
      }
      const float key_pos = static_cast<float>(j0 + j);
      for (int64_t l = 0; l < kLanes; ++l) {
        const float score = key_pos > limit[l] ? -1e30f : s[l];  // a key after the query's position is not visible
        s[l] = score;
        block_top[l] = block_top[l] > score ? block_top[l] : score;
      }
    }
    alignas(64) float rescale[kLanes];
    for (int64_t l = 0; l < kLanes; ++l) {
      rescale[l] = std::exp(std::max(w.top[l] - block_top[l], kMinExponent));
      w.top[l] = block_top[l];
      w.total[l] *= rescale[l];
    }
    for (int64_t d = 0; d < head_dim; ++d) {
      float* __restrict ad = acc + d * kLanes;
      for (int64_t l = 0; l < kLanes; ++l) ad[l] *= rescale[l];
    }
    for (int64_t j = 0; j < n; ++j) {
      float* __restrict s = w.scores[j];
      const float key_pos = static_cast<float>(j0 + j);
      for (int64_t l = 0; l < kLanes; ++l) {
        const float p = std::exp(std::max(s[l] - w.top[l], kMinExponent));
        s[l] = key_pos > limit[l] ? 0.f : p;
        w.total[l] += s[l];
      }
      const T* value = v_cache + (slots[j0 + j] * num_kv_heads + kv_head) * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) {
        const float vd = static_cast<float>(value[d]);
        float* __restrict ad = acc + d * kLanes;
        for (int64_t l = 0; l < kLanes; ++l) ad[l] += s[l] * vd;
      }
    }
  }
  for (int64_t r = 0; r < tile.rows; ++r) {
    T* o = out + (tile.first + r) * out_stride + head0 * head_dim;
    for (int64_t g = 0; g < heads; ++g) {
      const int64_t l = r * heads + g;
      const float inv = 1.f / w.total[l];
      for (int64_t d = 0; d < head_dim; ++d) o[g * head_dim + d] = static_cast<T>(acc[d * kLanes + l] * inv);
    }
  }
}

template <typename T>
void write_rows(const at::Tensor& src, at::Tensor& cache, const int64_t* slot_mapping) {
  // One row per token, [Hkv, D] each; padding tokens all write the reserved slot 0.
  const int64_t tokens = src.size(0), row = src.size(1) * src.size(2);
  const T* s = src.data_ptr<T>();
  T* c = cache.data_ptr<T>();
  const int64_t stride = src.stride(0);
  for (int64_t t = 0; t < tokens; ++t) std::copy(s + t * stride, s + t * stride + row, c + slot_mapping[t] * row);
}

at::Tensor paged_prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor k_cache,
                                   at::Tensor v_cache, const at::Tensor& slot_mapping, const at::Tensor& kv_indices,
                                   const at::Tensor& q_pos, const at::Tensor& out_index, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3,
              "q, k, v and caches must be 3-d");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type() &&
                  q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "q, k, v and caches must share a dtype");
  for (const at::Tensor* t : {&slot_mapping, &kv_indices, &q_pos, &out_index})
    TORCH_CHECK(t->scalar_type() == at::kLong, "indices must be int64");
  using graphcap_cpu::packed_rows;
  const at::Tensor qc = packed_rows(q), kc = packed_rows(k), vc = packed_rows(v);
  const at::Tensor slots = kv_indices.contiguous(), pos = q_pos.contiguous(), rows = out_index.contiguous();
  const at::Tensor written = slot_mapping.contiguous();
  const int64_t tokens = qc.size(0), num_heads = qc.size(1), head_dim = qc.size(2);
  const int64_t num_kv_heads = k_cache.size(1), key_len = slots.size(1), max_q = pos.size(1);
  TORCH_CHECK(num_heads % num_kv_heads == 0 && k_cache.size(2) == head_dim, "head shapes do not match");
  TORCH_CHECK(kc.size(0) == tokens && vc.size(0) == tokens && written.numel() == tokens && rows.numel() == tokens,
              "one k/v row, slot and output row per token");
  TORCH_CHECK(kc.size(1) == num_kv_heads && vc.size(1) == num_kv_heads && kc.size(2) == head_dim,
              "k/v heads do not match the cache");
  TORCH_CHECK(slots.size(0) == pos.size(0), "one key-index row and one position row per request");
  // Query heads per kv head, scored together in chunks of at most kLanes.
  const int64_t group = num_heads / num_kv_heads, chunk = std::min(group, kLanes);
  const int64_t chunks = (group + chunk - 1) / chunk;
  const int64_t* flat = rows.data_ptr<int64_t>();
  const int64_t* pos_data = pos.data_ptr<int64_t>();

  // Token t is query slot (flat / max_q, flat % max_q) of the padded layout; its position bounds its keys.
  const int64_t tile_rows = kLanes / chunk;
  std::vector<int64_t> token_pos(tokens);
  std::vector<Tile> tiles;
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t request = flat[t] / max_q;
    TORCH_CHECK(flat[t] >= 0 && flat[t] < pos.numel(), "output row out of range");
    token_pos[t] = std::clamp<int64_t>(pos_data[flat[t]], 0, key_len - 1);
    if (tiles.empty() || tiles.back().request != request || tiles.back().rows == tile_rows)
      tiles.push_back({t, 0, request});
    ++tiles.back().rows;
  }

  at::Tensor out = at::empty({tokens, num_heads * head_dim}, qc.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qc.scalar_type(), "paged_prefill_attention", [&] {
    const int64_t* write_slots = written.data_ptr<int64_t>();
    write_rows<scalar_t>(kc, k_cache, write_slots);
    write_rows<scalar_t>(vc, v_cache, write_slots);
    const int64_t items = static_cast<int64_t>(tiles.size()) * num_kv_heads * chunks;
    graphcap_cpu::dispatch_head_dim(head_dim, [&](auto head_dim_tag) {
      at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> qt(head_dim * kLanes), acc(head_dim * kLanes);
        auto scratch = std::make_unique<Scratch>();
        for (int64_t i = begin; i < end; ++i) {
          const Tile& tile = tiles[i / (num_kv_heads * chunks)];
          const int64_t kv_head = i / chunks % num_kv_heads, first = i % chunks * chunk;
          attend_tile<scalar_t, decltype(head_dim_tag)::value>(
              qc.data_ptr<scalar_t>(), qc.stride(0), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
              slots.data_ptr<int64_t>() + tile.request * key_len, token_pos.data() + tile.first, tile, kv_head,
              kv_head * group + first, std::min(chunk, group - first), num_kv_heads, head_dim,
              static_cast<float>(scale), out.data_ptr<scalar_t>(), num_heads * head_dim, qt.data(), acc.data(),
              *scratch);
        }
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(graphcap_cpu, m) {
  m.def("paged_prefill_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor slot_mapping, Tensor kv_indices, Tensor q_pos, Tensor out_index, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(graphcap_cpu, CPU, m) { m.impl("paged_prefill_attention", &paged_prefill_attention); }
