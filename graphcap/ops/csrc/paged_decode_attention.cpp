// Paged decode attention for CPU: one query per request over its cached keys, read straight from the
// paged cache through the per-request slot indices. Only the request's real keys (positions 0..q_pos) are
// visited, where a masked tensor formulation pays for every padded column of the batch.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "kernel_common.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// kHeadDim > 0 fixes the head size at compile time (fully unrolled dot products and accumulations for the
// common sizes); 0 reads it from `head_dim` at run time.
template <typename T, int kHeadDim>
void attend_one(const T* q, const T* k_cache, const T* v_cache, const int64_t* slots, int64_t n, int64_t h,
                int64_t group, int64_t num_kv_heads, int64_t head_dim_rt, float scale, T* out, float* qf,
                float* scores, float* acc) {
  // q: the group's queries [group, head_dim]; out: [group, head_dim]; keys of kv head h at `slots[0..n)`.
  const int64_t head_dim = kHeadDim > 0 ? kHeadDim : head_dim_rt;
  for (int64_t i = 0; i < group * head_dim; ++i) qf[i] = static_cast<float>(q[i]) * scale;
  int64_t l = 0;
  for (; l + 4 <= n; l += 4) {  // four independent dot products per pass keep the FMA units busy
    const T* k0 = k_cache + (slots[l] * num_kv_heads + h) * head_dim;
    const T* k1 = k_cache + (slots[l + 1] * num_kv_heads + h) * head_dim;
    const T* k2 = k_cache + (slots[l + 2] * num_kv_heads + h) * head_dim;
    const T* k3 = k_cache + (slots[l + 3] * num_kv_heads + h) * head_dim;
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = qf + g * head_dim;
      float d0 = 0.f, d1 = 0.f, d2 = 0.f, d3 = 0.f;
      for (int64_t d = 0; d < head_dim; ++d) {
        d0 += qg[d] * static_cast<float>(k0[d]);
        d1 += qg[d] * static_cast<float>(k1[d]);
        d2 += qg[d] * static_cast<float>(k2[d]);
        d3 += qg[d] * static_cast<float>(k3[d]);
      }
      float* s = scores + g * n + l;
      s[0] = d0;
      s[1] = d1;
      s[2] = d2;
      s[3] = d3;
    }
  }
  for (; l < n; ++l) {
    const T* k = k_cache + (slots[l] * num_kv_heads + h) * head_dim;
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = qf + g * head_dim;
      float dot = 0.f;
      for (int64_t d = 0; d < head_dim; ++d) dot += qg[d] * static_cast<float>(k[d]);
      scores[g * n + l] = dot;
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    float* s = scores + g * n;
    const float top = *std::max_element(s, s + n);
    float sum = 0.f;
    for (int64_t l = 0; l < n; ++l) {
      s[l] = std::exp(s[l] - top);
      sum += s[l];
    }
    const float inv = 1.f / sum;
    for (int64_t l = 0; l < n; ++l) s[l] *= inv;
  }
  std::fill(acc, acc + group * head_dim, 0.f);
  // Four keys per pass: each accumulator row is loaded and stored once per four keys, not once per key.
  for (l = 0; l + 4 <= n; l += 4) {
    const T* v0 = v_cache + (slots[l] * num_kv_heads + h) * head_dim;
    const T* v1 = v_cache + (slots[l + 1] * num_kv_heads + h) * head_dim;
    const T* v2 = v_cache + (slots[l + 2] * num_kv_heads + h) * head_dim;
    const T* v3 = v_cache + (slots[l + 3] * num_kv_heads + h) * head_dim;
    for (int64_t g = 0; g < group; ++g) {
      const float* p = scores + g * n + l;
      float* a = acc + g * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) {
        a[d] += p[0] * static_cast<float>(v0[d]) + p[1] * static_cast<float>(v1[d]) +
                p[2] * static_cast<float>(v2[d]) + p[3] * static_cast<float>(v3[d]);
      }
    }
  }
  for (; l < n; ++l) {
    const T* v = v_cache + (slots[l] * num_kv_heads + h) * head_dim;
    for (int64_t g = 0; g < group; ++g) {
      const float p = scores[g * n + l];
      float* a = acc + g * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) a[d] += p * static_cast<float>(v[d]);
    }
  }
  for (int64_t i = 0; i < group * head_dim; ++i) out[i] = static_cast<T>(acc[i]);
}

template <typename T, int kHeadDim>
void attend_all(const T* q, int64_t q_stride, const T* k_cache, const T* v_cache, const int64_t* slots,
                const int64_t* positions, T* out, int64_t batch, int64_t num_heads, int64_t num_kv_heads,
                int64_t head_dim, int64_t key_len, float scale) {
  const int64_t group = num_heads / num_kv_heads;
  at::parallel_for(0, batch * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * head_dim), scores(group * key_len), acc(group * head_dim);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / num_kv_heads, h = i % num_kv_heads;
      const int64_t n = std::clamp<int64_t>(positions[b] + 1, 1, key_len);
      attend_one<T, kHeadDim>(q + b * q_stride + h * group * head_dim, k_cache, v_cache, slots + b * key_len, n,
                              h, group, num_kv_heads, head_dim, scale,
                              out + (b * num_heads + h * group) * head_dim, qf.data(), scores.data(), acc.data());
    }
  });
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& kv_indices, const at::Tensor& q_pos, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3, "q and caches must be 3-d");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "q and caches must share a dtype");
  TORCH_CHECK(kv_indices.scalar_type() == at::kLong && q_pos.scalar_type() == at::kLong, "indices must be int64");
  const at::Tensor qc = graphcap_cpu::packed_rows(q);
  const at::Tensor slots = kv_indices.contiguous();
  const at::Tensor pos = q_pos.contiguous();
  const int64_t batch = qc.size(0), num_heads = qc.size(1), head_dim = qc.size(2);
  const int64_t num_kv_heads = k_cache.size(1), key_len = slots.size(1);
  TORCH_CHECK(num_heads % num_kv_heads == 0 && k_cache.size(2) == head_dim, "head shapes do not match");
  TORCH_CHECK(slots.size(0) == batch && pos.numel() == batch, "one index row and one position per request");
  at::Tensor out = at::empty({batch, num_heads * head_dim}, qc.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qc.scalar_type(), "paged_decode_attention", [&] {
    graphcap_cpu::dispatch_head_dim(head_dim, [&](auto head_dim_tag) {
      attend_all<scalar_t, decltype(head_dim_tag)::value>(
          qc.data_ptr<scalar_t>(), qc.stride(0), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
          slots.data_ptr<int64_t>(), pos.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), batch, num_heads,
          num_kv_heads, head_dim, key_len, static_cast<float>(scale));
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(graphcap_cpu, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor kv_indices, Tensor q_pos, "
        "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(graphcap_cpu, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
