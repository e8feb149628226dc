// Linear layers computed straight on GGUF quantised blocks (Q8_0, Q4_0, Q4_1): y = x @ W^T with W never
// expanded to float, so a decode step reads 4.5-8.5 bits per weight instead of 32.
//
// Why integer arithmetic: at batch 1 the float formulation would spend several instructions per weight just
// expanding it (unpack, convert, scale), more than the multiply itself. Quantising each activation row once
// per call into 32-wide int8 blocks (one fp32 scale per block, the same granularity as the weights) turns a
// block's 32 multiply-adds into one or two integer instructions on bytes, and the block's two scales are
// applied once per block:
//   sum_k w_k x_k ~= d_w d_x sum_k q_k p_k  +  (Q4_1) m_w d_x sum_k p_k  -  (Q4_0) 8 d_w d_x sum_k p_k
// where w_k = d_w q_k (+ m_w) and x_k ~= d_x p_k; d_x sum_k p_k is computed once per activation block.
//
// Large batches (prefill) are compute-bound instead: there the caller's threshold sends the call to the float
// GEMM on the weight expanded once per call.
#include <atomic>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define GGUF_LINEAR_AVX2 1
#endif

// Tests build this file a second time without AVX2, under another namespace, to check the scalar path.
#ifndef GGUF_LINEAR_LIBRARY
#define GGUF_LINEAR_LIBRARY graphcap_cpu
#endif

namespace {

constexpr int64_t kBlock = 32;
// Block format codes, shared with graphcap/ops/gguf_kernels.py.
constexpr int64_t kQ8_0 = 0, kQ4_0 = 1, kQ4_1 = 2;

constexpr int64_t block_bytes(int64_t qtype) { return qtype == kQ8_0 ? 34 : qtype == kQ4_0 ? 18 : 20; }

// Output rows are split across threads with at::parallel_for (which splits only in a build with OpenMP,
// -fopenmp; otherwise it runs the whole range on the calling thread). Waking a second thread costs
// microseconds, and on a busy machine a wait for a descheduled one can cost a time slice: worth it only when
// each thread reads over 100 KB (SmolLM2's k/v projections, 69 KB, stay on one thread; its o projection,
// 207 KB, gains 1.4x on two).
constexpr int64_t kMinBytesPerThread = 128 * 1024;
// Weight tiles fetched ahead of the one being computed (measured: the decode step's linear layers ran about
// 30% faster with 2 to 8 tiles ahead than with none, with no difference among 2, 4 and 8).
constexpr int64_t kPrefetchTiles = 4;
// The float GEMM path expands the weight this many bytes at a time: a whole LM head at once (113 MB for
// SmolLM2's) costs more in fresh-page faults and memory traffic than the GEMM itself (measured at 64 rows:
// 111 ms, against 52 ms in 4 MB chunks).
constexpr int64_t kGemmChunkBytes = 4 << 20;

inline float half_to_float(uint16_t h) {
#ifdef GGUF_LINEAR_AVX2
  return _cvtsh_ss(h);
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  const uint32_t bits = exponent == 31 ? sign | 0x7f800000u | (mantissa << 13)
                                       : sign | ((exponent + 112) << 23) | (mantissa << 13);
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
#endif
}

inline uint16_t load_u16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, sizeof(h));
  return h;
}

inline uint32_t load_u32(const uint8_t* p) {
  uint32_t u;
  std::memcpy(&u, p, sizeof(u));
  return u;
}

// The activation rows as int8 blocks: q [M, K] and, for Q8_0 under VNNI, the same plus 128 as bytes (qu); per
// block its scale d and d * (sum of its q), both block-major ([nb, M]: a tile's consecutive rows are one vector
// load) with kPad floats of slack for that load.
constexpr int64_t kPad = 8;
struct Activations {
  std::vector<int8_t> q;
  std::vector<uint8_t> qu;
  std::vector<float> d, ds;
  int64_t m = 0, k = 0, nb = 0;
};

// Blocks whose largest |x| is below this are stored as zeros: 127 / max|x| would overflow float, and the
// int8 values must stay within +-127 (the Q8_0 dot products rely on it). Their values are all under 1.5e-36.
constexpr float kMinTop = 127.f * std::numeric_limits<float>::min();
constexpr uint32_t kExponentBits = 0x7f800000u;  // all set: inf or NaN

// Nearest int8 of x / d with d = max|x| / 127 per block: the error of each element is at most d / 2. A block
// holding inf or NaN gets d = NaN and zero codes, so its rows of the output are NaN, as in float math (the
// test is on the bits: -ffast-math lets the compiler assume float comparisons never see NaN).
void quantize_row(const float* x, int64_t nb, int64_t m, int8_t* q, uint8_t* qu, float* d, float* ds) {
  for (int64_t b = 0; b < nb; ++b, x += kBlock, q += kBlock) {
    float top;
    bool finite;
    int32_t sum;
#ifdef GGUF_LINEAR_AVX2
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256i exponent = _mm256_set1_epi32(static_cast<int>(kExponentBits));
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    __m256i special = _mm256_setzero_si256();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(x + 8 * i);
      amax = _mm256_max_ps(amax, _mm256_and_ps(v[i], abs_mask));
      special = _mm256_or_si256(
          special, _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(v[i]), exponent), exponent));
    }
    finite = _mm256_testz_si256(special, special);
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    top = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
    const __m256 inv = _mm256_set1_ps(finite && top > kMinTop ? 127.f / top : 0.f);
    __m256i i32[4];
    for (int i = 0; i < 4; ++i) i32[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));  // to nearest
    const __m256i sum8 = _mm256_add_epi32(_mm256_add_epi32(i32[0], i32[1]), _mm256_add_epi32(i32[2], i32[3]));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum8), _mm256_extracti128_si256(sum8, 1));
    s4 = _mm_hadd_epi32(s4, s4);
    sum = _mm_cvtsi128_si32(_mm_hadd_epi32(s4, s4));
    // The packs interleave the four vectors per 128-bit lane; the permute restores element order.
    const __m256i packed = finite ? _mm256_permutevar8x32_epi32(
        _mm256_packs_epi16(_mm256_packs_epi32(i32[0], i32[1]), _mm256_packs_epi32(i32[2], i32[3])),
        _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)) : _mm256_setzero_si256();
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), packed);
    if (qu) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qu + b * kBlock),
                          _mm256_xor_si256(packed, _mm256_set1_epi8(static_cast<char>(0x80))));
    }
#else
    top = 0.f;
    finite = true;
    for (int i = 0; i < kBlock; ++i) {
      uint32_t bits;
      std::memcpy(&bits, &x[i], sizeof(bits));
      finite = finite && (bits & kExponentBits) != kExponentBits;
      top = std::max(top, std::fabs(x[i]));
    }
    const float inv = finite && top > kMinTop ? 127.f / top : 0.f;
    sum = 0;
    for (int i = 0; i < kBlock; ++i) {
      q[i] = finite ? static_cast<int8_t>(std::nearbyint(x[i] * inv)) : 0;
      sum += q[i];
    }
#endif
    d[b * m] = finite ? top / 127.f : std::numeric_limits<float>::quiet_NaN();
    ds[b * m] = d[b * m] * static_cast<float>(sum);
  }
}

Activations quantize_activations(const float* x, int64_t m, int64_t k, bool biased) {
  Activations a;
  a.m = m;
  a.k = k;
  a.nb = k / kBlock;
  a.q.resize(m * k);
  if (biased) a.qu.resize(m * k);
  a.d.resize(a.nb * m + kPad);
  a.ds.resize(a.nb * m + kPad);
  at::parallel_for(0, m, std::max<int64_t>(1, 16384 / k), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      quantize_row(x + i * k, a.nb, m, a.q.data() + i * k, biased ? a.qu.data() + i * k : nullptr, a.d.data() + i,
                   a.ds.data() + i);
  });
  return a;
}

#ifdef GGUF_LINEAR_AVX2
// Sum of 32 (unsigned byte) x (signed byte) products, in 8 int32 lanes.
inline __m256i dot_u8_s8(__m256i u, __m256i s) {
#ifdef __AVXVNNI__
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else  // pairs of products fit int16: at most 2 * 128 * 127 (Q8_0) or 2 * 15 * 127 (Q4)
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

#ifdef __AVXVNNI__
// 16 bytes of nibbles -> the block's 32 weights in the activations' order: elements 0-15 (low nibbles) in the
// lower half, 16-31 (high nibbles) in the upper half. The high nibbles stay in place, so they count 16 times
// their value: VNNI's int32 products cannot overflow on that, and as every block adds to the same upper
// accumulator lanes, one division by 16 at the end (kUpperLanes) undoes it, saving a shift and a cross-lane
// insert per block.
constexpr float kUpperLanes = 1.f / 16;
inline __m256i load_nibbles(const uint8_t* p) {
  const __m256i both = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_and_si256(both, _mm256_setr_m128i(_mm_set1_epi8(0x0f), _mm_set1_epi8(static_cast<char>(0xf0))));
}
#else  // maddubs's int16 pair sums would saturate on 16x values: shift the high nibbles down
constexpr float kUpperLanes = 1.f;
inline __m256i load_nibbles(const uint8_t* p) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i both = _mm256_inserti128_si256(_mm256_castsi128_si256(bytes), _mm_srli_epi16(bytes, 4), 1);
  return _mm256_and_si256(both, _mm256_set1_epi8(0x0f));
}
#endif

// One weight block ready for integer dots with activation blocks.
template <int64_t Q>
struct WeightBlock {
  __m256i v;  // Q4: the 32 unsigned nibbles (see load_nibbles); Q8_0: the 32 signed weights
#ifdef __AVXVNNI__
  __m256i bias;  // Q8_0: -128 sum w per lane, the start of each dot
#endif
  WeightBlock() = default;
  explicit WeightBlock(const uint8_t* blk) {
    if constexpr (Q == kQ8_0) {
      v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
#ifdef __AVXVNNI__
      bias = _mm256_sub_epi32(_mm256_setzero_si256(),
                              _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), _mm256_set1_epi8(-128), v));
#endif
    } else {
      v = load_nibbles(blk + (Q == kQ4_1 ? 4 : 2));
    }
  }
  // The 8 int32 partial sums of this block times the activation block at element offset `at`.
  __m256i dot(const Activations& a, int64_t at) const {
    if constexpr (Q == kQ8_0) {
#ifdef __AVXVNNI__  // (x + 128) as unsigned times signed w, from -128 sum w
      return _mm256_dpbusd_avx_epi32(bias, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.qu.data() + at)), v);
#else  // |w| as unsigned times x with w's sign
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q.data() + at));
      return dot_u8_s8(_mm256_sign_epi8(v, v), _mm256_sign_epi8(x, v));
#endif
    } else {
      return dot_u8_s8(v, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q.data() + at)));
    }
  }
};

inline float hsum(__m256 v, float upper_scale) {
  __m128 s = _mm_fmadd_ps(_mm256_extractf128_ps(v, 1), _mm_set1_ps(upper_scale), _mm256_castps256_ps128(v));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// 4 floats from p into lanes 0-3 (lanes 4-7 undefined).
inline __m256 load4(const float* p) { return _mm256_castps128_ps256(_mm_loadu_ps(p)); }
#endif

// Per-thread work space, 8 lanes per block: the block scales of the current weight rows (lane r: d, and the
// offset factor m for Q4_1 or -8 d for Q4_0), and the products d_w d_x of the current tile's row pairs.
struct Scratch {
  explicit Scratch(int64_t nb) : wd(8 * nb), woff(8 * nb), scale(8 * nb) {}
  std::vector<float> wd, woff, scale;
};

// The fp16 block scales of R <= 8 weight rows as floats, converted once however many activation rows use them.
template <int64_t Q, int R>
void weight_scales(const uint8_t* w, int64_t stride, int64_t nb, Scratch& s) {
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * block_bytes(Q);
#ifdef GGUF_LINEAR_AVX2
    // One 32-bit load per row brings d and, for Q4_1, the m that follows it (inserted straight from memory: a
    // vector load of scalars just stored would stall on store forwarding).
    const auto scale_bits = [&](int r) {
      const uint8_t* p = blk + r * stride;
      return static_cast<int>(Q == kQ4_1 ? load_u32(p) : load_u16(p));
    };
    const auto rows4 = [&](int first) {
      __m128i v = _mm_cvtsi32_si128(scale_bits(first));
      if (R > first + 1) v = _mm_insert_epi32(v, scale_bits(first + 1), 1);
      if (R > first + 2) v = _mm_insert_epi32(v, scale_bits(first + 2), 2);
      if (R > first + 3) v = _mm_insert_epi32(v, scale_bits(first + 3), 3);
      return v;
    };
    const __m256i both = R > 4 ? _mm256_setr_m128i(rows4(0), rows4(4)) : _mm256_castsi128_si256(rows4(0));
    const auto halves = [](__m256i v) {  // the low 16 bits of 8 int32 lanes -> 8 floats
      return _mm256_cvtph_ps(_mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)));
    };
    const __m256 d = halves(_mm256_and_si256(both, _mm256_set1_epi32(0xffff)));
    _mm256_storeu_ps(s.wd.data() + 8 * b, d);
    if constexpr (Q == kQ4_1) _mm256_storeu_ps(s.woff.data() + 8 * b, halves(_mm256_srli_epi32(both, 16)));
    if constexpr (Q == kQ4_0) _mm256_storeu_ps(s.woff.data() + 8 * b, _mm256_mul_ps(d, _mm256_set1_ps(-8.f)));
#else
    for (int r = 0; r < R; ++r) {
      const float d = half_to_float(load_u16(blk + r * stride));
      s.wd[8 * b + r] = d;
      s.woff[8 * b + r] = Q == kQ4_1 ? half_to_float(load_u16(blk + r * stride + 2)) : -8.f * d;
    }
#endif
  }
}

// out[c, r] for R weight rows x C activation rows (R * C <= 8 pairs), from the weight scales in `s`: each
// weight block is unpacked once for the C rows and each activation block loaded once for the R rows; the
// pairs' accumulators are independent vectors, so FMA latency overlaps. The scales d_w d_x of all pairs are
// computed first, one vector per block, so that the inner loop is only integer dot, convert and FMA. The Q4
// offsets (m_w, or -8 d_w, times d_x sum p, summed over blocks) are one vector FMA per block for all pairs.
template <int64_t Q, int R, int C>
void dot_tile(const uint8_t* w, int64_t w_stride, const Activations& a, int64_t m0, float* out, int64_t ldo,
              Scratch& s, const uint8_t* ahead) {
  static_assert(R * C <= 8 && C <= 4, "one vector of scales per block");
  constexpr int64_t bpb = block_bytes(Q);
  const int64_t nb = a.nb, k = a.k, m = a.m;
  const float* wd = s.wd.data();
  const float* woff = s.woff.data();
  alignas(32) float offset[8] = {};
  float sums[R][C];
#ifdef GGUF_LINEAR_AVX2
  // Lane i of the per-block vectors belongs to weight row i / C and activation row i % C.
  const __m256i row_of_lane = _mm256_setr_epi32(0 / C, 1 / C, 2 / C, 3 / C, 4 / C, 5 / C, 6 / C, 7 / C);
  const __m256i col_of_lane = _mm256_setr_epi32(0 % C, 1 % C, 2 % C, 3 % C, 4 % C, 5 % C, 6 % C, 7 % C);
  const auto rows_lanes = [&](const float* p) {
    return C == 1 ? _mm256_loadu_ps(p) : _mm256_permutevar8x32_ps(_mm256_loadu_ps(p), row_of_lane);
  };
  const auto cols_lanes = [&](const float* p) {
    return C == 1 ? _mm256_broadcast_ss(p) : _mm256_permutevar8x32_ps(load4(p), col_of_lane);
  };
  float* scale = s.scale.data();
  __m256 offsets = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    _mm256_storeu_ps(scale + 8 * b, _mm256_mul_ps(rows_lanes(wd + 8 * b), cols_lanes(a.d.data() + b * m + m0)));
    if constexpr (Q != kQ8_0)
      offsets = _mm256_fmadd_ps(rows_lanes(woff + 8 * b), cols_lanes(a.ds.data() + b * m + m0), offsets);
  }
  _mm256_store_ps(offset, offsets);
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const float* sb = scale + 8 * b;
    if (ahead != nullptr) {
      for (int64_t i = 0; i < R * bpb; i += 64) __builtin_prefetch(ahead + b * R * bpb + i);
    }
    const int64_t at = m0 * k + b * kBlock;
    // Few live registers: with one activation row each weight block is used once, so rows go one at a time;
    // with several, the R unpacked blocks stay while the activation rows stream past them.
    if constexpr (C == 1) {
      for (int r = 0; r < R; ++r) {
        const __m256i dot = WeightBlock<Q>(w + r * w_stride + b * bpb).dot(a, at);
        acc[r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_broadcast_ss(sb + r), acc[r][0]);
      }
    } else {
      WeightBlock<Q> wb[R];
      for (int r = 0; r < R; ++r) wb[r] = WeightBlock<Q>(w + r * w_stride + b * bpb);
      for (int c = 0; c < C; ++c) {
        for (int r = 0; r < R; ++r) {
          const __m256i dot = wb[r].dot(a, at + c * k);
          acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_broadcast_ss(sb + r * C + c), acc[r][c]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) sums[r][c] = hsum(acc[r][c], Q == kQ8_0 ? 1.f : kUpperLanes);
#else
  (void)ahead;  // the hardware prefetcher's business here
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) sums[r][c] = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    for (int r = 0; r < R; ++r) {
      const uint8_t* blk = w + r * w_stride + b * bpb;
      int8_t wq[kBlock];
      if constexpr (Q == kQ8_0) {
        std::memcpy(wq, blk + 2, kBlock);
      } else {
        const uint8_t* nib = blk + (Q == kQ4_1 ? 4 : 2);
        for (int j = 0; j < kBlock / 2; ++j) {
          wq[j] = static_cast<int8_t>(nib[j] & 0x0f);
          wq[j + kBlock / 2] = static_cast<int8_t>(nib[j] >> 4);
        }
      }
      for (int c = 0; c < C; ++c) {
        const int8_t* xb = a.q.data() + (m0 + c) * k + b * kBlock;
        int32_t dot = 0;
        for (int j = 0; j < kBlock; ++j) dot += static_cast<int32_t>(wq[j]) * xb[j];
        sums[r][c] += static_cast<float>(dot) * (wd[8 * b + r] * a.d[b * m + m0 + c]);
        if constexpr (Q != kQ8_0) offset[r * C + c] += woff[8 * b + r] * a.ds[b * m + m0 + c];
      }
    }
  }
#endif
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) out[c * ldo + r] = sums[r][c] + offset[r * C + c];
}

// All activation rows against R weight rows, C at a time, the rest in smaller tiles. The first pass over the
// rows also prefetches `ahead` (the rows kPrefetchTiles tiles on, which follow in memory; null at the end):
// at one activation row a tile computes faster than memory delivers, and the hardware prefetcher alone
// leaves the loads waiting.
template <int64_t Q, int R, int C>
void dot_rows(const uint8_t* w, int64_t w_stride, const Activations& a, float* out, int64_t ldo, Scratch& s,
              const uint8_t* ahead) {
  weight_scales<Q, R>(w, w_stride, a.nb, s);
  int64_t m0 = 0;
  for (; m0 + C <= a.m; m0 += C, ahead = nullptr) dot_tile<Q, R, C>(w, w_stride, a, m0, out + m0 * ldo, ldo, s, ahead);
  for (; m0 + C / 2 <= a.m && C > 1; m0 += C / 2, ahead = nullptr)
    dot_tile<Q, R, (C > 1 ? C / 2 : 1)>(w, w_stride, a, m0, out + m0 * ldo, ldo, s, ahead);
  for (; m0 < a.m; ++m0, ahead = nullptr) dot_tile<Q, R, 1>(w, w_stride, a, m0, out + m0 * ldo, ldo, s, ahead);
}

template <int64_t Q>
void integer_linear(const Activations& a, const uint8_t* w, int64_t n, float* out) {
  const int64_t row_bytes = a.nb * block_bytes(Q);
  // One activation row: tiles of 8 weight rows (one fp16 conversion and one multiply give the 8 rows' block
  // scales). Several: 4 weight rows x 2 activation rows (each unpacked block serves 2 rows, each activation
  // block 4; measured faster than 2 x 4 at 2 rows and as fast from 4 on; the 8 accumulators and temporaries
  // fit AVX2's 16 vector registers).
  const int64_t rows = a.m == 1 ? 8 : 4;
  const int64_t tiles = (n + rows - 1) / rows;
  const int64_t grain = std::max<int64_t>(1, kMinBytesPerThread / (row_bytes * rows));
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    Scratch s(a.nb);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n0 = t * rows;
      const uint8_t* tile = w + n0 * row_bytes;
      const bool more = n0 + (kPrefetchTiles + 1) * rows <= n;
      const uint8_t* ahead = more ? tile + kPrefetchTiles * rows * row_bytes : nullptr;
      if (n0 + rows > n) {  // the last rows of an N that is not a multiple of the tile
        for (int64_t r = n0; r < n; ++r) dot_rows<Q, 1, 4>(w + r * row_bytes, row_bytes, a, out + r, n, s, nullptr);
      } else if (rows == 8) {
        dot_rows<Q, 8, 1>(tile, row_bytes, a, out + n0, n, s, ahead);
      } else {
        dot_rows<Q, 4, 2>(tile, row_bytes, a, out + n0, n, s, ahead);
      }
    }
  });
}

void dequantize_rows(const uint8_t* w, int64_t qtype, int64_t nb, int64_t begin, int64_t end, float* out) {
  const int64_t bpb = block_bytes(qtype), k = nb * kBlock;
  for (int64_t r = begin; r < end; ++r) {
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = w + (r * nb + b) * bpb;
      float* o = out + r * k + b * kBlock;
      const float d = half_to_float(load_u16(blk));
      if (qtype == kQ8_0) {
        const int8_t* q = reinterpret_cast<const int8_t*>(blk + 2);
        for (int j = 0; j < kBlock; ++j) o[j] = static_cast<float>(q[j]) * d;
      } else {
        const uint8_t* nib = blk + (qtype == kQ4_1 ? 4 : 2);
        const float offset = qtype == kQ4_1 ? half_to_float(load_u16(blk + 2)) : -8.f * d;
        for (int j = 0; j < kBlock / 2; ++j) {
          o[j] = static_cast<float>(nib[j] & 0x0f) * d + offset;
          o[j + kBlock / 2] = static_cast<float>(nib[j] >> 4) * d + offset;
        }
      }
    }
  }
}

// Graph verification judges a graph against a float64 reference of the dequantised weights, with eager's own
// error as the yardstick. On the integer path that error is the activations' 8-bit rounding, large enough to
// hide a graph's fault; while verifying, capture switches every call (eager's and the graph's) to the float
// path, whose error is float32 rounding, and back afterwards.
std::atomic<bool> g_float_only{false};

void set_float_only(bool on) { g_float_only.store(on); }

// x [M, K] float32 @ W^T, W as blocks [N, K/32 * bytes per block] -> [M, N] float32: the integer kernel for
// M < gemm_min_rows, else (or in float-only mode) float32 GEMM on W expanded once for the call.
at::Tensor gguf_linear(const at::Tensor& x, const at::Tensor& blocks, int64_t qtype, int64_t gemm_min_rows) {
  TORCH_CHECK(qtype == kQ8_0 || qtype == kQ4_0 || qtype == kQ4_1, "gguf_linear: unknown block type code ", qtype);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "gguf_linear: x must be a 2-d float32 tensor");
  TORCH_CHECK(blocks.dim() == 2 && blocks.scalar_type() == at::kByte, "gguf_linear: blocks must be 2-d uint8");
  const int64_t m = x.size(0), k = x.size(1), n = blocks.size(0);
  TORCH_CHECK(k % kBlock == 0, "gguf_linear: in_features ", k, " is not a multiple of ", kBlock);
  const int64_t nb = k / kBlock;
  TORCH_CHECK(blocks.size(1) == nb * block_bytes(qtype), "gguf_linear: ", blocks.size(1),
              " bytes per weight row do not encode ", k, " weights");
  if (m == 0 || n == 0 || k == 0) return at::zeros({m, n}, x.options());
  const at::Tensor xc = x.contiguous(), wc = blocks.contiguous();
  const uint8_t* w = wc.data_ptr<uint8_t>();
  at::Tensor out = at::empty({m, n}, x.options());
  if (m >= gemm_min_rows || g_float_only.load(std::memory_order_relaxed)) {
    // The weight is expanded a chunk of rows at a time into a buffer that stays in cache, each chunk's
    // product written straight into its columns of the output (a row-major view with the output's stride).
    const int64_t chunk = std::max<int64_t>(16, kGemmChunkBytes / (k * 4));
    at::Tensor weight = at::empty({std::min(chunk, n), k}, x.options());
    float* wf = weight.data_ptr<float>();
    for (int64_t n0 = 0; n0 < n; n0 += chunk) {
      const int64_t rows = std::min(chunk, n - n0);
      at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / k), [&](int64_t begin, int64_t end) {
        dequantize_rows(w + n0 * nb * block_bytes(qtype), qtype, nb, begin, end, wf);
      });
      at::Tensor slice = out.narrow(1, n0, rows);
      at::mm_out(slice, xc, weight.narrow(0, 0, rows).t());
    }
    return out;
  }
#ifdef __AVXVNNI__
  const bool biased = qtype == kQ8_0;
#else
  const bool biased = false;
#endif
  const Activations a = quantize_activations(xc.data_ptr<float>(), m, k, biased);
  float* o = out.data_ptr<float>();
  if (qtype == kQ8_0) integer_linear<kQ8_0>(a, w, n, o);
  else if (qtype == kQ4_0) integer_linear<kQ4_0>(a, w, n, o);
  else integer_linear<kQ4_1>(a, w, n, o);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(GGUF_LINEAR_LIBRARY, m) {
  m.def("gguf_linear(Tensor x, Tensor blocks, int qtype, int gemm_min_rows) -> Tensor");
  m.def("gguf_float_only(bool on) -> ()", &set_float_only);
}

TORCH_LIBRARY_IMPL(GGUF_LINEAR_LIBRARY, CPU, m) { m.impl("gguf_linear", &gguf_linear); }
