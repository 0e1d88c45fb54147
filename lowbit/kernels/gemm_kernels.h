// lowbit's low-bit GEMM kernels (header-only: cpu_kernels.cpp wraps them for Python, decode_step.cpp
// calls them inside the compiled one-token step).
//
// Weight-only low-bit GEMM for small batches (decode), fp32 activations.
//
// y[m, n] = sum_g s[n, g] * (sum_{k in g} q[n, k] * x[m, k] - z[n, g] * sum_{k in g} x[m, k])
//
// which is W = S (Q - Z) (report Eq. 3.2) applied group by group without ever building W.
// Layouts (prepared by lowbit/kernels/cpu.py from a QuantizedWeight):
//   int4: uint8 (N, K/2), lowbit's own packing (QuantLinear.qdata, used in place, no copy):
//         byte j holds column 2j in its low nibble and column 2j + 1 in its high nibble, so
//         a little-endian 32-bit word holds 8 consecutive columns, column i at bit 4i.
//   int8: uint8 (N, K), one code per column (QuantLinear.qdata as well).
//   scales, zeros: float32 (N, K/G); zeros are in code units (symmetric: 2^(b-1); a float
//         offset m becomes -m/s).
//   The last group of a row may be shorter (K % G columns), as everywhere in lowbit.
// Requirements (checked by the Python wrapper): K % 32 == 0, G % 32 == 0, M <= 16.
#pragma once
#include <torch/extension.h>
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>
#include <omp.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace lowbit_gemm {

constexpr int kMaxBatch = 16;

// Per-group sums of the activations, sum_{k in g} x[m, k]: the zero-point term of every row.
std::vector<float> group_sums(const float* x, int64_t M, int64_t K, int64_t G, int64_t ng) {
  std::vector<float> xsum(M * ng, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < ng; ++g) {
      float acc = 0.f;
      for (int64_t k = g * G; k < std::min((g + 1) * G, K); ++k) acc += x[m * K + k];
      xsum[m * ng + g] = acc;
    }
  return xsum;
}

// The row loop both paths share: the per-group activation sums once, then the rows split
// across threads; row(n, qrow, xsum, ng) computes output column n for every token.
template <bool kInt4, typename RowFn>
void for_each_row(const uint8_t* q, const float* xsum, int64_t N, int64_t K, int64_t G, RowFn row) {
  const int64_t ng = (K + G - 1) / G;
  const int64_t row_bytes = kInt4 ? K / 2 : K;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) row(n, q + n * row_bytes, xsum, ng);
}

template <bool kInt4, typename RowFn>
void for_each_row(const uint8_t* q, const float* x, int64_t M, int64_t N, int64_t K, int64_t G, RowFn row) {
  const std::vector<float> xsum = group_sums(x, M, K, G, (K + G - 1) / G);
  for_each_row<kInt4>(q, xsum.data(), N, K, G, row);
}

// W4A8: activations quantised to int8 per token in blocks of 32 columns, x' = d_b * xq with
// d_b = max|x| / 127 over the block (llama.cpp's Q8_0 layout for the activation side), so
// that the inner product runs on integers: y[m, n] = sum_g s[n,g] (sum_{b in g} d_b
// sum_{k in b} q[n,k] xq[m,k] - z[n,g] sum_{k in g} x'[m,k]). Within a block the codes are
// stored in the weight's nibble order: the 16 even columns, then the 16 odd ones.
struct QuantActs {
  std::vector<int8_t> xq;   // (M, K), each block of 32 as [even columns | odd columns]
  std::vector<float> d;     // (M, K / 32)
  std::vector<float> gsum;  // (M, ng): sum over each weight group of x' = d * xq
};

QuantActs quantize_acts(const float* x, int64_t M, int64_t K, int64_t G, bool nibble_order = true) {
  const int64_t nb = K / 32, ng = (K + G - 1) / G;
  QuantActs a{std::vector<int8_t>(M * K), std::vector<float>(M * nb), std::vector<float>(M * ng, 0.f)};
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + m * K + b * 32;
      float amax = 0.f;
      for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(xb[j]));
      const float d = amax / 127.f;
      int sum = 0;
      int8_t* out = a.xq.data() + m * K + b * 32;
      for (int j = 0; j < 32; ++j) {
        const int v = d > 0.f ? static_cast<int>(std::nearbyint(xb[j] / d)) : 0;
        out[!nibble_order ? j : (j & 1) ? 16 + j / 2 : j / 2] = static_cast<int8_t>(v);
        sum += v;
      }
      a.d[m * nb + b] = d;
      a.gsum[m * ng + (b * 32) / G] += d * static_cast<float>(sum);
    }
  return a;
}

// The portable integer-activation GEMMs. W4A8: 4-bit codes against activation blocks in the
// weight's nibble order. W8A8: 8-bit codes (uint8, one per column) against the same blocks in
// natural column order (quantize_acts(..., nibble_order = false)). Both compute
// y[m, n] = sum_g s[n,g] (sum_{b in g} d_b sum_{k in b} q[n,k] xq[m,k] - z[n,g] sum_{k in g} x'[m,k]).
template <bool kInt4>
void gemm_int8_acts_portable(const uint8_t* q, const float* s, const float* z, const QuantActs& a, float* y,
                             int64_t M, int64_t N, int64_t K, int64_t G) {
  const int64_t nb = K / 32;
  for_each_row<kInt4>(q, a.gsum.data(), N, K, G, [&](int64_t n, const uint8_t* qrow, const float* gsum, int64_t ng) {
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.f;
      for (int64_t g = 0; g < ng; ++g) {
        float part = 0.f;
        for (int64_t c = g * G; c < std::min((g + 1) * G, K); c += 32) {
          const int8_t* xb = a.xq.data() + m * K + c;
          int dot = 0;
          if constexpr (kInt4) {
            const uint8_t* bytes = qrow + c / 2;
            for (int j = 0; j < 16; ++j) dot += (bytes[j] & 15) * xb[j] + (bytes[j] >> 4) * xb[16 + j];
          } else {
            for (int j = 0; j < 32; ++j) dot += qrow[c + j] * xb[j];
          }
          part += a.d[m * nb + c / 32] * static_cast<float>(dot);
        }
        acc += s[n * ng + g] * (part - z[n * ng + g] * gsum[m * ng + g]);
      }
      y[m * N + n] = acc;
    }
  });
}

// Portable path (any compiler, any CPU): the codes of a run of 32 columns widened to float,
// then one dot product per token. Used where AVX2/FMA are absent.
template <bool kInt4>
void gemm_portable(const uint8_t* q, const float* s, const float* z, const float* x, float* y,
                   int64_t M, int64_t N, int64_t K, int64_t G) {
  for_each_row<kInt4>(q, x, M, N, K, G, [&](int64_t n, const uint8_t* qrow, const float* xsum, int64_t ng) {
    float acc[kMaxBatch] = {0.f};
    for (int64_t g = 0; g < ng; ++g) {
      float part[kMaxBatch] = {0.f};
      const int64_t end = std::min((g + 1) * G, K);
      for (int64_t c = g * G; c < end; c += 32) {
        float w[32];
        if (kInt4) {
          const uint8_t* b = qrow + c / 2;
          for (int j = 0; j < 16; ++j) {
            w[2 * j] = static_cast<float>(b[j] & 15);
            w[2 * j + 1] = static_cast<float>(b[j] >> 4);
          }
        } else {
          const uint8_t* b = qrow + c;
          for (int j = 0; j < 32; ++j) w[j] = static_cast<float>(b[j]);
        }
        for (int64_t m = 0; m < M; ++m) {
          const float* xm = x + m * K + c;
          float p = 0.f;
          for (int j = 0; j < 32; ++j) p += w[j] * xm[j];
          part[m] += p;
        }
      }
      const float sc = s[n * ng + g], zp = z[n * ng + g];
      for (int64_t m = 0; m < M; ++m) acc[m] += sc * (part[m] - zp * xsum[m * ng + g]);
    }
    for (int64_t m = 0; m < M; ++m) y[m * N + n] = acc[m];
  });
}

#if defined(__AVX2__) && defined(__FMA__)
// AVX2 paths. One or two tokens take the block path below (`gemm_blocks`) wherever the
// layout allows; larger tiles and int4 groups of 32 take `row_tile`: a run of 32 codes
// becomes four 8-float vectors in registers (int4: each 32-bit word, 8 columns, broadcast to
// the 8 lanes straight from memory, shifted by 0, 4, ..., 28 bits lane by lane and masked;
// int8: one 32-byte load, zero-extended 8 bytes at a time), then each token in a tile of up
// to four multiplies them into its accumulators, so a tile converts the codes once for four
// tokens. Two things keep the FMA units busy (measured on a Zen 3 core, docs/results.md):
// enough independent accumulators per token (an FMA waits 4 cycles for the previous one on
// the same register, so one or two tokens get four chains), and no horizontal sum per group:
// a group's partial sum is scaled into a vector total, total += s_g * part_g, and the
// zero-point term sum_g s_g z_g xsum_g is a scalar beside it; one horizontal sum per output.
inline __m256 widen8(__m128i bytes) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)); }

inline __m256 nibbles8(__m256i word, __m256i shifts, __m256i low4) {
  return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(word, shifts), low4));
}

inline float hsum(__m256 v) {
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}

template <bool kInt4, int MT>
void row_tile(const uint8_t* qrow, const float* srow, const float* zrow, const float* x, const float* xsum,
              float* y, int64_t N, int64_t K, int64_t G, int64_t ng) {
  constexpr int NA = MT <= 2 ? 4 : 2;  // independent accumulators per token
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), low4 = _mm256_set1_epi32(15);
  __m256 total[MT];
  float zterm[MT];
  for (int m = 0; m < MT; ++m) total[m] = _mm256_setzero_ps(), zterm[m] = 0.f;
  for (int64_t g = 0; g < ng; ++g) {
    __m256 a[MT][NA];
    for (int m = 0; m < MT; ++m)
      for (int j = 0; j < NA; ++j) a[m][j] = _mm256_setzero_ps();
    const int64_t end = std::min((g + 1) * G, K);
    for (int64_t c = g * G; c < end; c += 32) {
      __m256 w0, w1, w2, w3;
      if (kInt4) {
        const float* words = reinterpret_cast<const float*>(qrow + (c >> 1));  // 4 words, 8 codes each
        w0 = nibbles8(_mm256_castps_si256(_mm256_broadcast_ss(words)), shifts, low4);
        w1 = nibbles8(_mm256_castps_si256(_mm256_broadcast_ss(words + 1)), shifts, low4);
        w2 = nibbles8(_mm256_castps_si256(_mm256_broadcast_ss(words + 2)), shifts, low4);
        w3 = nibbles8(_mm256_castps_si256(_mm256_broadcast_ss(words + 3)), shifts, low4);
      } else {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qrow + c));
        const __m128i v0 = _mm256_castsi256_si128(v), v1 = _mm256_extracti128_si256(v, 1);
        w0 = widen8(v0);
        w1 = widen8(_mm_srli_si128(v0, 8));
        w2 = widen8(v1);
        w3 = widen8(_mm_srli_si128(v1, 8));
      }
      for (int m = 0; m < MT; ++m) {
        const float* xm = x + m * K + c;
        a[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm), a[m][0]);
        a[m][1 % NA] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + 8), a[m][1 % NA]);
        a[m][2 % NA] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xm + 16), a[m][2 % NA]);
        a[m][3 % NA] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xm + 24), a[m][3 % NA]);
      }
    }
    const float sc = srow[g], zp = zrow[g];
    const __m256 scale = _mm256_set1_ps(sc);
    for (int m = 0; m < MT; ++m) {
      __m256 part = _mm256_add_ps(a[m][0], a[m][1]);
      if (NA == 4) part = _mm256_add_ps(part, _mm256_add_ps(a[m][2 % NA], a[m][3 % NA]));
      total[m] = _mm256_fmadd_ps(part, scale, total[m]);
      zterm[m] += sc * zp * xsum[m * ng + g];
    }
  }
  for (int m = 0; m < MT; ++m) y[m * N] = hsum(total[m]) - zterm[m];
}

// The block path (int8 always; int4 when K and G are multiples of 64, which covers every W4
// layer of the models we measure). One 32-byte load holds a block of codes, 8 lanes of 32
// bits: int4, 64 codes, lane i holding columns 8i..8i+7 (column 8i+p at bits 4p); int8, 32
// codes, lane i columns 4i..4i+3 (column 4i+p at bits 8p). Shifting all lanes by p code widths
// and masking gives "plane" p, the columns {p, P+p, 2P+p, ...} (P planes per block), so the
// activations are permuted once per call to match, xt[B b + L p + i] = x[B b + P i + p] (L
// lanes; a transpose per block of B columns, `transpose_blocks`), and each plane is one FMA against
// contiguous activations: one weight load per block instead of a broadcast or a widening
// shuffle per 8 codes. At one token, two rows share each activation load, and each row's
// codes are prefetched 4 KB ahead. Measured against row_tile in one process on this machine's
// Zen 3 cores (both MLP shapes of the 1.1B model, weights cold, 2 threads, 6 interleaved
// rounds): int4 1.38-1.47x faster at one token and 1.09-1.16x at two, int8 1.01-1.09x and
// 1.15-1.24x; at four or more tokens row_tile, which converts each run of codes once for four
// tokens, was as fast or up to 8% faster, so it keeps them.
//
// The vector width the block path runs at: 256-bit AVX2 everywhere, 512-bit AVX-512 where the
// build has it and a 64-byte block (128 int4 or 64 int8 codes) divides K and G. The path is
// written once against these few operations.
struct Avx2 {
  using F = __m256;
  using I = __m256i;
  static constexpr int kLanes = 8;
  static I load_i(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static F load_f(const float* p) { return _mm256_loadu_ps(p); }
  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static I set1_i(int v) { return _mm256_set1_epi32(v); }
  template <int kShift> static I shift(I v) { return _mm256_srli_epi32(v, kShift); }
  static I mask(I v, I m) { return _mm256_and_si256(v, m); }
  static F to_float(I v) { return _mm256_cvtepi32_ps(v); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static float sum(F v) { return hsum(v); }
};

#if defined(__AVX512F__)
struct Avx512 {
  using F = __m512;
  using I = __m512i;
  static constexpr int kLanes = 16;
  static I load_i(const void* p) { return _mm512_loadu_si512(p); }
  static F load_f(const float* p) { return _mm512_loadu_ps(p); }
  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static I set1_i(int v) { return _mm512_set1_epi32(v); }
  template <int kShift> static I shift(I v) { return _mm512_srli_epi32(v, kShift); }
  static I mask(I v, I m) { return _mm512_and_si512(v, m); }
  static F to_float(I v) { return _mm512_cvtepi32_ps(v); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static float sum(F v) { return _mm512_reduce_add_ps(v); }
};
#endif

template <bool kInt4, class V>
struct Blocks {
  static constexpr int kPlanes = kInt4 ? 8 : 4;  // codes per 32-bit lane
  static constexpr int kCols = kPlanes * V::kLanes;  // columns per block (one vector load)
  static constexpr int kBits = kInt4 ? 4 : 8;
};

template <bool kInt4, class V>
std::vector<float> transpose_blocks(const float* x, int64_t M, int64_t K) {
  using B = Blocks<kInt4, V>;
  std::vector<float> xt(M * K);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < K; b += B::kCols)
      for (int i = 0; i < V::kLanes; ++i)
        for (int p = 0; p < B::kPlanes; ++p) xt[m * K + b + V::kLanes * p + i] = x[m * K + b + B::kPlanes * i + p];
  return xt;
}

template <bool kInt4, class V, int P>
inline typename V::F code_plane(typename V::I v, typename V::I mask) {
  using B = Blocks<kInt4, V>;
#if defined(__AVX512F__)
  if constexpr (kInt4 && V::kLanes == 16) {
    // vpermps reads only the low four bits of each index: one instruction masks and converts
    // (4-6% faster at one token than mask + convert on Zen 5, bench/kernel_width_ab.py)
    const __m512 lut = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    return _mm512_permutexvar_ps(P == 0 ? v : V::template shift<B::kBits * P>(v), lut);
  }
#endif
  if (P == B::kPlanes - 1) return V::to_float(V::template shift<B::kBits * P>(v));
  if (P == 0) return V::to_float(V::mask(v, mask));
  return V::to_float(V::mask(V::template shift<B::kBits * P>(v), mask));
}

// NR rows x MT tokens (2 x 1 or 1 x 2 or 1 x 1); two accumulators per row and token (even and
// odd planes; four measured no faster on Zen 5, with either width).
template <bool kInt4, class V, int NR, int MT>
void block_tile(const uint8_t* qrow, int64_t row_bytes, const float* srow, const float* zrow, const float* xt,
                const float* xsum, float* y, int64_t N, int64_t K, int64_t G, int64_t ng) {
  using B = Blocks<kInt4, V>;
  using F = typename V::F;
  constexpr int kPrefetch = 4096;
  const typename V::I mask = V::set1_i((1 << B::kBits) - 1);
  F total[NR][MT];
  float zterm[NR][MT];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MT; ++m) total[r][m] = V::zero(), zterm[r][m] = 0.f;
  for (int64_t g = 0; g < ng; ++g) {
    F a[NR][MT][2];
    for (int r = 0; r < NR; ++r)
      for (int m = 0; m < MT; ++m) a[r][m][0] = a[r][m][1] = V::zero();
    const int64_t end = std::min((g + 1) * G, K);
    for (int64_t c = g * G; c < end; c += B::kCols) {
      typename V::I v[NR];
      for (int r = 0; r < NR; ++r) {
        const uint8_t* block = qrow + r * row_bytes + (kInt4 ? c / 2 : c);
        v[r] = V::load_i(block);
        _mm_prefetch(reinterpret_cast<const char*>(block + kPrefetch), _MM_HINT_T0);
      }
      auto plane = [&](auto p) {
        constexpr int P = decltype(p)::value;
        if constexpr (P < B::kPlanes) {
          for (int m = 0; m < MT; ++m) {
            const F xv = V::load_f(xt + m * K + c + V::kLanes * P);
            for (int r = 0; r < NR; ++r) a[r][m][P & 1] = V::fmadd(code_plane<kInt4, V, P>(v[r], mask), xv, a[r][m][P & 1]);
          }
        }
      };
      plane(std::integral_constant<int, 0>{}), plane(std::integral_constant<int, 1>{});
      plane(std::integral_constant<int, 2>{}), plane(std::integral_constant<int, 3>{});
      plane(std::integral_constant<int, 4>{}), plane(std::integral_constant<int, 5>{});
      plane(std::integral_constant<int, 6>{}), plane(std::integral_constant<int, 7>{});
    }
    for (int r = 0; r < NR; ++r) {
      const float sc = srow[r * ng + g], zp = zrow[r * ng + g];
      for (int m = 0; m < MT; ++m) {
        total[r][m] = V::fmadd(V::add(a[r][m][0], a[r][m][1]), V::set1(sc), total[r][m]);
        zterm[r][m] += sc * zp * xsum[m * ng + g];
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MT; ++m) y[m * N + r] = V::sum(total[r][m]) - zterm[r][m];
}

template <bool kInt4, class V>
void gemm_blocks(const uint8_t* q, const float* s, const float* z, const float* x, float* y,
                 int64_t M, int64_t N, int64_t K, int64_t G) {
  const int64_t ng = (K + G - 1) / G, row_bytes = kInt4 ? K / 2 : K;
  const std::vector<float> xsum = group_sums(x, M, K, G, ng), xt = transpose_blocks<kInt4, V>(x, M, K);
  // one token: with 256-bit vectors rows two at a time (and the odd last one alone), sharing
  // each activation load (measured faster on Zen 3); with 512-bit vectors one row at a time,
  // which measured 1.3-1.5x faster than pairs for W4 and the W8 head on Zen 5 (results.md)
  if (M == 1 && V::kLanes == 8) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N / 2; ++i)
      block_tile<kInt4, V, 2, 1>(q + 2 * i * row_bytes, row_bytes, s + 2 * i * ng, z + 2 * i * ng, xt.data(), xsum.data(), y + 2 * i, N, K, G, ng);
    if (N % 2)
      block_tile<kInt4, V, 1, 1>(q + (N - 1) * row_bytes, row_bytes, s + (N - 1) * ng, z + (N - 1) * ng, xt.data(), xsum.data(), y + N - 1, N, K, G,
                                 ng);
    return;
  }
  if (M == 1) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n)
      block_tile<kInt4, V, 1, 1>(q + n * row_bytes, row_bytes, s + n * ng, z + n * ng, xt.data(), xsum.data(), y + n, N, K, G, ng);
    return;
  }
  TORCH_CHECK(M == 2, "the block path takes one or two tokens");
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n)
    block_tile<kInt4, V, 1, 2>(q + n * row_bytes, row_bytes, s + n * ng, z + n * ng, xt.data(), xsum.data(), y + n, N, K, G, ng);
}

// The widest block path whose block divides K and G (AVX-512 where built, else AVX2); false
// if none does.
template <bool kInt4>
bool try_gemm_blocks(const uint8_t* q, const float* s, const float* z, const float* x, float* y,
                     int64_t M, int64_t N, int64_t K, int64_t G) {
  if (M > 2) return false;
#if defined(__AVX512F__)
  if (K % Blocks<kInt4, Avx512>::kCols == 0 && G % Blocks<kInt4, Avx512>::kCols == 0) {
    gemm_blocks<kInt4, Avx512>(q, s, z, x, y, M, N, K, G);
    return true;
  }
#endif
  if (K % Blocks<kInt4, Avx2>::kCols == 0 && G % Blocks<kInt4, Avx2>::kCols == 0) {
    gemm_blocks<kInt4, Avx2>(q, s, z, x, y, M, N, K, G);
    return true;
  }
  return false;
}

// Eight int32 sums of four byte products each, unsigned u times signed v (u at most 128 here,
// so that the AVX2 pair sums of vpmaddubsw cannot saturate): one VNNI instruction where the
// CPU has it (AVX-VNNI, or AVX-512 VNNI on 256-bit registers), else vpmaddubsw + vpmaddwd.
// The sums are exact integers either way, so both give the same bits.
inline __m256i dot_u8s8(__m256i u, __m256i v, __m256i ones) {
#if defined(__AVXVNNI__)
  (void)ones;
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, v);
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
  (void)ones;
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, v);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, v), ones);
#endif
}

// W4A8 tile: 16 bytes of codes become one 32-byte vector [low nibbles | high nibbles],
// matching the activation block's [even | odd] order; `dot_u8s8` multiplies the unsigned
// codes by the signed activations into eight int32 (on AVX2, vpmaddubsw's pair sums are at
// most 2 * 15 * 127, no saturation, and vpmaddwd adds pairs again), which are converted to float and scaled by
// d_b * s_g (the block's activation scale times the group's weight scale) straight into
// the token's total: no per-group vector work at all. Two accumulators per token
// (alternate blocks) so that the FMAs overlap; the zero-point term is a scalar per group.
template <int MT>
inline void w4a8_block(const uint8_t* qb, const int8_t* xb, const float* d, int64_t K, int64_t nb, float sc, __m128i low4,
                       __m256i ones, __m256* acc) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qb));
  const __m256i w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), low4), _mm_and_si128(bytes, low4));
  for (int m = 0; m < MT; ++m) {
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + m * K));
    const __m256i dot = dot_u8s8(w, xv, ones);
    acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(d[m * nb] * sc), acc[m]);
  }
}

template <int MT>
void row_tile_w4a8(const uint8_t* qrow, const float* srow, const float* zrow, const int8_t* xq, const float* d,
                   const float* gsum, float* y, int64_t N, int64_t K, int64_t G, int64_t ng) {
  const int64_t nb = K / 32, bpg = G / 32;  // blocks per full group
  const __m128i low4 = _mm_set1_epi8(15);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 a0[MT], a1[MT];  // two accumulators per token, fixed in registers: alternate blocks
  float zterm[MT];
  for (int m = 0; m < MT; ++m) a0[m] = a1[m] = _mm256_setzero_ps(), zterm[m] = 0.f;
  for (int64_t g = 0; g < ng; ++g) {
    const float sc = srow[g], zp = zrow[g];
    const int64_t b_end = std::min((g + 1) * bpg, nb);
    int64_t b = g * bpg;
    for (; b + 2 <= b_end; b += 2) {
      w4a8_block<MT>(qrow + 16 * b, xq + 32 * b, d + b, K, nb, sc, low4, ones, a0);
      w4a8_block<MT>(qrow + 16 * (b + 1), xq + 32 * (b + 1), d + b + 1, K, nb, sc, low4, ones, a1);
    }
    if (b < b_end) w4a8_block<MT>(qrow + 16 * b, xq + 32 * b, d + b, K, nb, sc, low4, ones, a0);
    for (int m = 0; m < MT; ++m) zterm[m] += sc * zp * gsum[m * ng + g];
  }
  for (int m = 0; m < MT; ++m) y[m * N] = hsum(_mm256_add_ps(a0[m], a1[m])) - zterm[m];
}

// W8A8 tile: vpmaddubsw multiplies unsigned by signed bytes, and 255 * 127 * 2 overflows its
// int16 pair sums, so the codes are first made signed, c - 128 (an XOR of the top bit), and
// the product taken llama.cpp's way: |c - 128| (unsigned, at most 128) times x with the sign
// of c - 128 moved onto it (at most 128 * 127 * 2 = 32512 per pair). The 128 taken off each
// code comes back in the zero-point term: z - 128 instead of z.
template <int MT>
void row_tile_w8a8(const uint8_t* qrow, const float* srow, const float* zrow, const int8_t* xq, const float* d,
                   const float* gsum, float* y, int64_t N, int64_t K, int64_t G, int64_t ng) {
  const int64_t nb = K / 32, bpg = G / 32;
  const __m256i ones = _mm256_set1_epi16(1), top = _mm256_set1_epi8(static_cast<char>(0x80));
  __m256 acc[MT];
  float zterm[MT];
  for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps(), zterm[m] = 0.f;
  for (int64_t g = 0; g < ng; ++g) {
    const float sc = srow[g], zp = zrow[g] - 128.f;
    for (int64_t b = g * bpg; b < std::min((g + 1) * bpg, nb); ++b) {
      const __m256i w = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qrow + 32 * b)), top);
      const __m256i magnitude = _mm256_sign_epi8(w, w);
      for (int m = 0; m < MT; ++m) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * K + 32 * b));
        const __m256i dot = dot_u8s8(magnitude, _mm256_sign_epi8(xv, w), ones);
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(d[m * nb + b] * sc), acc[m]);
      }
    }
    for (int m = 0; m < MT; ++m) zterm[m] += sc * zp * gsum[m * ng + g];
  }
  for (int m = 0; m < MT; ++m) y[m * N] = hsum(acc[m]) - zterm[m];
}

template <bool kInt4, int MT>
inline void int8_acts_tile(const uint8_t* qrow, const float* srow, const float* zrow, const int8_t* xq, const float* d,
                           const float* gsum, float* y, int64_t N, int64_t K, int64_t G, int64_t ng) {
  if constexpr (kInt4) row_tile_w4a8<MT>(qrow, srow, zrow, xq, d, gsum, y, N, K, G, ng);
  else row_tile_w8a8<MT>(qrow, srow, zrow, xq, d, gsum, y, N, K, G, ng);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
// AVX-512 VNNI W4A8 (CPUs with 512-bit VNNI: Zen 4 and later, Ice Lake and later), taken
// when K is a multiple of 64 and G is too, or is 32. One iteration covers two activation
// blocks, 64 columns: the row's 32 bytes are broadcast to both halves of a 512-bit register,
// the upper half shifted by 4 bits, and every byte masked to its nibble, giving
//   [block b even columns | block b+1 even | block b odd | block b+1 odd]   (16 codes each),
// so the activations are laid out once per call in that order (`PairActs`). One vpdpbusd
// then yields 16 int32 sums of 4 products each: lanes 0-3 and 8-11 belong to block b, lanes
// 4-7 and 12-15 to block b+1, and `dexp` holds each lane's d_b, so that one convert and one
// FMA (with d_b * s_g) put the whole pair into the token's accumulator. About seven
// instructions per 64 codes, against fourteen on the AVX2 path.
struct PairActs {
  std::vector<int8_t> xq;   // (M, K): each pair of blocks as [even b | even b+1 | odd b | odd b+1]
  std::vector<float> dexp;  // (M, K / 64, 16): the block scale of each int32 lane of a pair's product
};

inline PairActs pair_layout(const QuantActs& a, int64_t M, int64_t K) {
  const int64_t nb = K / 32, np = K / 64;
  PairActs p{std::vector<int8_t>(M * K), std::vector<float>(M * np * 16)};
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < np; ++i) {
      const int8_t* src = a.xq.data() + m * K + 64 * i;  // [even b | odd b | even b+1 | odd b+1]
      int8_t* dst = p.xq.data() + m * K + 64 * i;
      std::copy(src, src + 16, dst), std::copy(src + 32, src + 48, dst + 16);
      std::copy(src + 16, src + 32, dst + 32), std::copy(src + 48, src + 64, dst + 48);
      float* de = p.dexp.data() + (m * np + i) * 16;
      for (int j = 0; j < 4; ++j) {
        de[j] = de[8 + j] = a.d[m * nb + 2 * i];
        de[4 + j] = de[12 + j] = a.d[m * nb + 2 * i + 1];
      }
    }
  return p;
}

// One pair of blocks (64 codes) of a row into the MT tokens' accumulators acc: sc holds the
// weight scale of each int32 lane (one group's scale in every lane, or with groups of 32 the
// two blocks' own scales in their lanes).
template <int MT>
inline void w4a8_pair(const uint8_t* qrow, const int8_t* xq, const float* dexp, int64_t K, int64_t np, int64_t i, __m512 sc,
                      __m512i shifts, __m512i low4, __m512* acc) {
  const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qrow + 32 * i));
  const __m512i w = _mm512_and_si512(_mm512_srlv_epi64(_mm512_broadcast_i64x4(bytes), shifts), low4);
  for (int m = 0; m < MT; ++m) {
    const __m512i xv = _mm512_loadu_si512(xq + m * K + 64 * i);
    const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, xv);
    const __m512 scale = _mm512_mul_ps(_mm512_loadu_ps(dexp + (m * np + i) * 16), sc);
    acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[m]);
  }
}

// MT tokens of one row; xq and dexp point at the first token's pair layout. Groups of 64 or
// more columns (G % 64 == 0) scale a group's pairs by its one scale; groups of 32 (kG32: the
// Q4_0 and Q4_1 files' blocks) give each pair two groups, whose scales one permute puts into
// their lanes (0-3 and 8-11: block b, 4-7 and 12-15: block b+1).
template <int MT, bool kG32>
void row_tile_w4a8_avx512(const uint8_t* qrow, const float* srow, const float* zrow, const int8_t* xq, const float* dexp,
                          const float* gsum, float* y, int64_t N, int64_t K, int64_t G, int64_t ng) {
  const int64_t np = K / 64;
  const __m512i shifts = _mm512_setr_epi64(0, 0, 0, 0, 4, 4, 4, 4), low4 = _mm512_set1_epi8(15);
  __m512 acc0[MT], acc1[MT];  // two accumulators per token (alternate pairs) so that the FMAs overlap
  float zterm[MT];
  for (int m = 0; m < MT; ++m) acc0[m] = acc1[m] = _mm512_setzero_ps(), zterm[m] = 0.f;
  if constexpr (kG32) {
    const __m512i lane_block = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1);
    auto scales = [&](int64_t i) {  // s[2i] and s[2i + 1] into their blocks' lanes
      return _mm512_permutexvar_ps(lane_block, _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(srow + 2 * i)))));
    };
    int64_t i = 0;
    for (; i + 2 <= np; i += 2) {
      _mm_prefetch(reinterpret_cast<const char*>(qrow + 32 * i + 4096), _MM_HINT_T0);
      w4a8_pair<MT>(qrow, xq, dexp, K, np, i, scales(i), shifts, low4, acc0);
      w4a8_pair<MT>(qrow, xq, dexp, K, np, i + 1, scales(i + 1), shifts, low4, acc1);
    }
    if (i < np) w4a8_pair<MT>(qrow, xq, dexp, K, np, i, scales(i), shifts, low4, acc0);
    for (int64_t g = 0; g < ng; ++g)
      for (int m = 0; m < MT; ++m) zterm[m] += srow[g] * zrow[g] * gsum[m * ng + g];
  } else {
    const int64_t ppg = G / 64;  // pairs per full group
    for (int64_t g = 0; g < ng; ++g) {
      const __m512 sc = _mm512_set1_ps(srow[g]);
      const int64_t end = std::min((g + 1) * ppg, np);
      int64_t i = g * ppg;
      for (; i + 2 <= end; i += 2) {
        _mm_prefetch(reinterpret_cast<const char*>(qrow + 32 * i + 4096), _MM_HINT_T0);
        w4a8_pair<MT>(qrow, xq, dexp, K, np, i, sc, shifts, low4, acc0);
        w4a8_pair<MT>(qrow, xq, dexp, K, np, i + 1, sc, shifts, low4, acc1);
      }
      if (i < end) w4a8_pair<MT>(qrow, xq, dexp, K, np, i, sc, shifts, low4, acc0);
      for (int m = 0; m < MT; ++m) zterm[m] += srow[g] * zrow[g] * gsum[m * ng + g];
    }
  }
  for (int m = 0; m < MT; ++m) y[m * N] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[m], acc1[m])) - zterm[m];
}

template <bool kG32>
void gemm_w4a8_avx512(const uint8_t* q, const float* s, const float* z, const QuantActs& a, float* y,
                      int64_t M, int64_t N, int64_t K, int64_t G) {
  const PairActs p = pair_layout(a, M, K);
  const int64_t np = K / 64;
  for_each_row<true>(q, a.gsum.data(), N, K, G, [&](int64_t n, const uint8_t* qrow, const float* gsum, int64_t ng) {
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int8_t* xm = p.xq.data() + m0 * K;
      const float* dm = p.dexp.data() + m0 * np * 16;
      const float* gs = gsum + m0 * ng;
      float* ym = y + m0 * N + n;
      switch (std::min<int64_t>(4, M - m0)) {
        case 1: row_tile_w4a8_avx512<1, kG32>(qrow, s + n * ng, z + n * ng, xm, dm, gs, ym, N, K, G, ng); break;
        case 2: row_tile_w4a8_avx512<2, kG32>(qrow, s + n * ng, z + n * ng, xm, dm, gs, ym, N, K, G, ng); break;
        case 3: row_tile_w4a8_avx512<3, kG32>(qrow, s + n * ng, z + n * ng, xm, dm, gs, ym, N, K, G, ng); break;
        default: row_tile_w4a8_avx512<4, kG32>(qrow, s + n * ng, z + n * ng, xm, dm, gs, ym, N, K, G, ng); break;
      }
    }
  });
}
#endif

// The integer-activation GEMMs (W4A8, W8A8): rows across threads, tokens in tiles of up to four.
template <bool kInt4>
void gemm_int8_acts_avx2(const uint8_t* q, const float* s, const float* z, const QuantActs& a, float* y,
                         int64_t M, int64_t N, int64_t K, int64_t G) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
  if (kInt4 && K % 64 == 0 && G % 64 == 0) return gemm_w4a8_avx512<false>(q, s, z, a, y, M, N, K, G);
  if (kInt4 && K % 64 == 0 && G == 32) return gemm_w4a8_avx512<true>(q, s, z, a, y, M, N, K, G);
#endif
  const int64_t nb = K / 32;
  for_each_row<kInt4>(q, a.gsum.data(), N, K, G, [&](int64_t n, const uint8_t* qrow, const float* gsum, int64_t ng) {
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int8_t* xm = a.xq.data() + m0 * K;
      const float* dm = a.d.data() + m0 * nb;
      const float* gs = gsum + m0 * ng;
      float* ym = y + m0 * N + n;
      switch (std::min<int64_t>(4, M - m0)) {
        case 1: int8_acts_tile<kInt4, 1>(qrow, s + n * ng, z + n * ng, xm, dm, gs, ym, N, K, G, ng); break;
        case 2: int8_acts_tile<kInt4, 2>(qrow, s + n * ng, z + n * ng, xm, dm, gs, ym, N, K, G, ng); break;
        case 3: int8_acts_tile<kInt4, 3>(qrow, s + n * ng, z + n * ng, xm, dm, gs, ym, N, K, G, ng); break;
        default: int8_acts_tile<kInt4, 4>(qrow, s + n * ng, z + n * ng, xm, dm, gs, ym, N, K, G, ng); break;
      }
    }
  });
}

template <bool kInt4>
void gemm_avx2(const uint8_t* q, const float* s, const float* z, const float* x, float* y,
               int64_t M, int64_t N, int64_t K, int64_t G) {
  // one or two tokens: the block path (int8 always qualifies: K, G % 32 == 0); more tokens
  // share each converted run of codes across a tile of four in row_tile, which measured
  // faster there (docs/results.md)
  if (try_gemm_blocks<kInt4>(q, s, z, x, y, M, N, K, G)) return;
  for_each_row<kInt4>(q, x, M, N, K, G, [&](int64_t n, const uint8_t* qrow, const float* xsum, int64_t ng) {
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const float* xm = x + m0 * K;
      const float* xs = xsum + m0 * ng;
      float* ym = y + m0 * N + n;
      switch (std::min<int64_t>(4, M - m0)) {
        case 1: row_tile<kInt4, 1>(qrow, s + n * ng, z + n * ng, xm, xs, ym, N, K, G, ng); break;
        case 2: row_tile<kInt4, 2>(qrow, s + n * ng, z + n * ng, xm, xs, ym, N, K, G, ng); break;
        case 3: row_tile<kInt4, 3>(qrow, s + n * ng, z + n * ng, xm, xs, ym, N, K, G, ng); break;
        default: row_tile<kInt4, 4>(qrow, s + n * ng, z + n * ng, xm, xs, ym, N, K, G, ng); break;
      }
    }
  });
}
#endif

template <bool kInt4>
void gemm_lowbit(const uint8_t* q, const float* s, const float* z, const float* x, float* y,
                 int64_t M, int64_t N, int64_t K, int64_t G) {
#if defined(__AVX2__) && defined(__FMA__)
  gemm_avx2<kInt4>(q, s, z, x, y, M, N, K, G);
#else
  gemm_portable<kInt4>(q, s, z, x, y, M, N, K, G);
#endif
}

bool has_avx2() {
#if defined(__AVX2__) && defined(__FMA__)
  return true;
#else
  return false;
#endif
}

// Dequantise the whole weight to float32 (N, K), W = S (Q - Z) group by group (Eq. 3.2),
// rows split across threads: the large-batch (prefill) path, followed by one BLAS matmul.
// The vector path computes exactly what the scalar one does, (q - z) * s per element.
template <bool kInt4>
void dequantize_rows(const uint8_t* q, const float* s, const float* z, float* w, int64_t N, int64_t K, int64_t G) {
  const int64_t ng = (K + G - 1) / G, row_bytes = kInt4 ? K / 2 : K;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const uint8_t* qrow = q + n * row_bytes;
    float* wrow = w + n * K;
    for (int64_t g = 0; g < ng; ++g) {
      const float sc = s[n * ng + g], zp = z[n * ng + g];
      int64_t c = g * G;
      const int64_t end = std::min(c + G, K);
#if defined(__AVX2__) && defined(__FMA__)
      const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), low4 = _mm256_set1_epi32(15);
      const __m256 sv = _mm256_set1_ps(sc), zv = _mm256_set1_ps(zp);
      for (; c + 8 <= end; c += 8) {
        const __m256 codes = kInt4 ? nibbles8(_mm256_set1_epi32(*reinterpret_cast<const int32_t*>(qrow + c / 2)), shifts, low4)
                                   : widen8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qrow + c)));
        _mm256_storeu_ps(wrow + c, _mm256_mul_ps(_mm256_sub_ps(codes, zv), sv));
      }
#endif
      for (; c < end; ++c) {
        const int code = kInt4 ? (qrow[c / 2] >> (4 * (c & 1))) & 15 : qrow[c];
        wrow[c] = (static_cast<float>(code) - zp) * sc;
      }
    }
  }
}

// Float32 matrix-vector product at one token, y = W x, W float32 (N, K) row-major: the float
// linears of the compiled decode step (a float head, as in a GGUF file that stores its output
// matrix in F32, or a float32 model). Rows split across threads in runs of four that share
// each activation load, one accumulator per row, the widest vectors the build has; the K % L
// tail in scalars. Memory-bound: every weight is read once. torch.mv (BLAS) is the reference;
// it read 24 GB/s on the 1.1B model's 262 MB head with two threads (docs/results.md).
#if defined(__AVX2__) && defined(__FMA__)
template <class V, int R>
inline void dot_rows(const float* w, int64_t K, const float* x, float* y) {
  typename V::F acc[R];
  for (int r = 0; r < R; ++r) acc[r] = V::zero();
  int64_t k = 0;
  for (; k + V::kLanes <= K; k += V::kLanes) {
    const typename V::F xv = V::load_f(x + k);
    for (int r = 0; r < R; ++r) acc[r] = V::fmadd(V::load_f(w + r * K + k), xv, acc[r]);
  }
  for (int r = 0; r < R; ++r) {
    float total = V::sum(acc[r]);
    for (int64_t c = k; c < K; ++c) total += w[r * K + c] * x[c];
    y[r] = total;
  }
}
#endif

inline void gemv_f32(const float* w, const float* x, float* y, int64_t N, int64_t K) {
  constexpr int64_t kRows = 4;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; n += kRows) {
    const float* wrow = w + n * K;
#if defined(__AVX2__) && defined(__FMA__)
#if defined(__AVX512F__)
    using V = Avx512;
#else
    using V = Avx2;
#endif
    if (n + kRows <= N) {
      dot_rows<V, kRows>(wrow, K, x, y + n);
      continue;
    }
    for (int64_t r = n; r < N; ++r) dot_rows<V, 1>(w + r * K, K, x, y + r);
#else
    for (int64_t r = n; r < std::min(n + kRows, N); ++r) {
      float total = 0.0f;
      for (int64_t c = 0; c < K; ++c) total += w[r * K + c] * x[c];
      y[r] = total;
    }
#endif
  }
}

// The integer-activation GEMM (W4A8 or W8A8) on the best path this build has.
template <bool kInt4>
void int8_acts_gemm(const uint8_t* q, const float* s, const float* z, const QuantActs& a, float* y,
                    int64_t M, int64_t N, int64_t K, int64_t G) {
#if defined(__AVX2__) && defined(__FMA__)
  gemm_int8_acts_avx2<kInt4>(q, s, z, a, y, M, N, K, G);
#else
  gemm_int8_acts_portable<kInt4>(q, s, z, a, y, M, N, K, G);
#endif
}

}  // namespace lowbit_gemm
