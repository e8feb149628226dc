// Paged decode attention for CPU: one query per request over its cached keys, read straight from the
// paged cache through the per-request slot indices. Only the request's real keys (positions 0..q_pos) are
// visited, where a masked tensor formulation pays for every padded column of the batch.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

template <typename T>
void attend_one(const T* q, const T* k_cache, const T* v_cache, const int64_t* slots, int64_t n, int64_t h,
                int64_t group, int64_t num_kv_heads, int64_t head_dim, float scale, T* out, std::vector<float>& qf,
                std::vector<float>& scores, std::vector<float>& acc) {
  // q: the group's queries [group, head_dim]; out: [group, head_dim]; keys of kv head h at `slots[0..n)`.
  for (int64_t i = 0; i < group * head_dim; ++i) qf[i] = static_cast<float>(q[i]) * scale;
  for (int64_t l = 0; l < n; ++l) {
    const T* k = k_cache + (slots[l] * num_kv_heads + h) * head_dim;
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = qf.data() + g * head_dim;
      float dot = 0.f;
      for (int64_t d = 0; d < head_dim; ++d) dot += qg[d] * static_cast<float>(k[d]);
      scores[g * n + l] = dot;
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    float* s = scores.data() + g * n;
    const float top = *std::max_element(s, s + n);
    float sum = 0.f;
    for (int64_t l = 0; l < n; ++l) {
      s[l] = std::exp(s[l] - top);
      sum += s[l];
    }
    const float inv = 1.f / sum;
    for (int64_t l = 0; l < n; ++l) s[l] *= inv;
  }
  std::fill(acc.begin(), acc.begin() + group * head_dim, 0.f);
  for (int64_t l = 0; l < n; ++l) {
    const T* v = v_cache + (slots[l] * num_kv_heads + h) * head_dim;
    for (int64_t g = 0; g < group; ++g) {
      const float p = scores[g * n + l];
      float* a = acc.data() + g * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) a[d] += p * static_cast<float>(v[d]);
    }
  }
  for (int64_t i = 0; i < group * head_dim; ++i) out[i] = static_cast<T>(acc[i]);
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& kv_indices, const at::Tensor& q_pos, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3, "q and caches must be 3-d");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "q and caches must share a dtype");
  TORCH_CHECK(kv_indices.scalar_type() == at::kLong && q_pos.scalar_type() == at::kLong, "indices must be int64");
  const at::Tensor qc = q.contiguous();
  const at::Tensor slots = kv_indices.contiguous();
  const at::Tensor pos = q_pos.contiguous();
  const int64_t batch = qc.size(0), num_heads = qc.size(1), head_dim = qc.size(2);
  const int64_t num_kv_heads = k_cache.size(1), key_len = slots.size(1);
  TORCH_CHECK(num_heads % num_kv_heads == 0 && k_cache.size(2) == head_dim, "head shapes do not match");
  TORCH_CHECK(slots.size(0) == batch && pos.numel() == batch, "one index row and one position per request");
  const int64_t group = num_heads / num_kv_heads;
  at::Tensor out = at::empty({batch, num_heads * head_dim}, qc.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qc.scalar_type(), "paged_decode_attention", [&] {
    const scalar_t* qp = qc.data_ptr<scalar_t>();
    const scalar_t* kp = k_cache.data_ptr<scalar_t>();
    const scalar_t* vp = v_cache.data_ptr<scalar_t>();
    const int64_t* sp = slots.data_ptr<int64_t>();
    const int64_t* pp = pos.data_ptr<int64_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, batch * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> qf(group * head_dim), scores(group * key_len), acc(group * head_dim);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / num_kv_heads, h = i % num_kv_heads;
        const int64_t n = std::clamp<int64_t>(pp[b] + 1, 1, key_len);
        const int64_t offset = (b * num_heads + h * group) * head_dim;
        attend_one(qp + offset, kp, vp, sp + b * key_len, n, h, group, num_kv_heads, head_dim,
                   static_cast<float>(scale), op + offset, qf, scores, acc);
      }
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
