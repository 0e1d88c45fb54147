// One decode step of attention over lowbit's quantised KV cache, read as stored.
//
// The cache (lowbit/inference/kv_cache.py) keeps keys per channel and values per token
// (KIVI). Keys: chunks of G tokens; per (batch, kv head, chunk, channel) one scale S and an
// integer zero-point Z, codes packed along the chunk's tokens. Values: per (batch, kv head,
// token) codes packed along the channels, one (S, Z) per group of VG channels. Newer tokens
// are a float32 tail. Codes are in planes (lowbit.inference.kv_attention.pack_planar), the
// zero-points in lowbit's packing (lowbit.numerics.packing.pack); 2, 4 or 8 bits.
//
// Nothing is dequantised into a float copy of the cache: with k = S (c - Z),
//   q . k_t = sum_d (q_d S_d) c_{t,d} - sum_d q_d S_d Z_d          (per key chunk)
//   sum_t p_t v_t[d] = sum_t (p_t S_{t,g}) (c_{t,d} - Z_{t,g})      (per value token)
// so each step reads the packed bytes once. The reference is the dequantised cache followed
// by torch's scaled dot-product attention (lowbit.inference.kv_attention.attend_reference).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

inline int code_at(const uint8_t* packed, int64_t i, int64_t bits) {  // lowbit's packing (the zero-points)
  if (bits == 8) return packed[i];
  const int64_t per_byte = 8 / bits;
  return (packed[i / per_byte] >> (bits * (i % per_byte))) & ((1 << bits) - 1);
}

// bytes of n codes in one row of lowbit's packing: whole runs of 8 codes (8 bits: no padding)
int64_t packed_length(int64_t n, int64_t bits) { return bits == 8 ? n : (n + 7) / 8 * bits; }

// bytes of n codes in the planar packing (kv_attention.pack_planar)
int64_t planar_length(int64_t n, int64_t bits) { return bits == 8 ? n : (n + 8 / bits - 1) / (8 / bits); }

// n codes of a planar row into floats: plane p of the m bytes holds codes p m .. p m + m - 1
// (BITS a compile-time constant, so each plane is one shift-and-mask loop the compiler vectorises)
template <int BITS>
inline void unpack_planar(const uint8_t* __restrict packed, int64_t n, float* __restrict out) {
  if constexpr (BITS == 8) {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(packed[i]);
  } else {
    constexpr int per_byte = 8 / BITS, mask = (1 << BITS) - 1;
    const int64_t m = (n + per_byte - 1) / per_byte;
    for (int plane = 0; plane < per_byte; ++plane) {
      const int64_t hi = std::min(m, n - plane * m);
      float* __restrict o = out + plane * m;
      for (int64_t j = 0; j < hi; ++j) o[j] = static_cast<float>((packed[j] >> (BITS * plane)) & mask);
    }
  }
}

}  // namespace

// q: (B, Hq, D) float32, one query per head; the R = Hq / H query heads of key/value head h
// are h R .. h R + R - 1. k_codes: (B, H, C, D, planar(G)) uint8; k_scale: (B, H, C, D)
// float16; k_zero: (B, H, C, packed(D)) uint8. v_codes: (B, H, C*G, planar(D)) uint8;
// v_scale: (B, H, C*G, NG) float16; v_zero: (B, H, C, packed(G*NG)) uint8. Only the first
// n_chunks chunks are read: the buffers may be larger. tail_k, tail_v: (B, H, Tt, D)
// float32. Returns (B, Hq, D) float32.
//
// Work is split over (batch, key/value head, part of the chunks); each part computes its
// scores for the R query heads, their maximum m, the sum l of exp(s - m) and the sum of
// exp(s - m) v, which are merged after (the same softmax, computed in pieces).
template <int BITS>
torch::Tensor kv_attend_bits(torch::Tensor q, torch::Tensor k_codes, torch::Tensor k_scale, torch::Tensor k_zero,
                             torch::Tensor v_codes, torch::Tensor v_scale, torch::Tensor v_zero, int64_t n_chunks,
                             int64_t group, int64_t value_group, torch::Tensor tail_k, torch::Tensor tail_v, double scaling) {
  constexpr int64_t bits = BITS;
  TORCH_CHECK(q.dtype() == torch::kFloat32 && q.dim() == 3 && q.is_contiguous(), "q must be contiguous float32 (B, Hq, D)");
  for (const auto& t : {k_codes, k_zero, v_codes, v_zero})
    TORCH_CHECK(t.dtype() == torch::kUInt8 && t.is_contiguous(), "codes and zero-points must be contiguous uint8");
  for (const auto& t : {k_scale, v_scale})
    TORCH_CHECK(t.dtype() == torch::kFloat16 && t.is_contiguous(), "scales must be contiguous float16");
  for (const auto& t : {tail_k, tail_v})
    TORCH_CHECK(t.dtype() == torch::kFloat32 && t.dim() == 4 && t.is_contiguous(), "the tail must be contiguous float32 (B, H, T, D)");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t H = k_codes.size(1), C = k_codes.size(2), T_cap = v_codes.size(2), Tt = tail_k.size(2);
  const int64_t NG = (D + value_group - 1) / value_group;
  const int64_t kb = planar_length(group, bits), vb = planar_length(D, bits), kzb = packed_length(D, bits), vzb = packed_length(group * NG, bits);
  TORCH_CHECK(Hq % H == 0, "query heads must be a multiple of the cache's heads");
  TORCH_CHECK(n_chunks <= C && n_chunks * group <= T_cap, "n_chunks exceeds the buffers");
  TORCH_CHECK(k_codes.size(3) == D && k_codes.size(4) == kb && v_codes.size(3) == vb && v_scale.size(3) == NG
              && k_zero.size(3) == kzb && v_zero.size(3) == vzb && tail_k.size(3) == D, "buffer shapes do not match D, G and bits");
  const int64_t R = Hq / H;
  // parts per head: enough work items for the threads, each part at least 4 chunks
  const int64_t threads = at::get_num_threads();
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>((2 * threads + B * H - 1) / (B * H), n_chunks / 4));
  const int64_t items = B * H * parts;
  std::vector<float> part_max(items * R), part_sum(items * R), part_acc(items * R * D);
  const float* qp = q.data_ptr<float>();
  const uint8_t* kc = k_codes.data_ptr<uint8_t>();
  const at::Half* ks = k_scale.data_ptr<at::Half>();
  const uint8_t* kz = k_zero.data_ptr<uint8_t>();
  const uint8_t* vc = v_codes.data_ptr<uint8_t>();
  const at::Half* vs = v_scale.data_ptr<at::Half>();
  const uint8_t* vz = v_zero.data_ptr<uint8_t>();
  const float* tk = tail_k.data_ptr<float>();
  const float* tv = tail_v.data_ptr<float>();
  const float scale_qk = static_cast<float>(scaling);

  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> codes(std::max(group, D)), a(R), base(R);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / parts, part = item % parts;
      const int64_t b = bh / H, h = bh % H;
      const int64_t c0 = n_chunks * part / parts, c1 = n_chunks * (part + 1) / parts;
      const int64_t tails = part == parts - 1 ? Tt : 0;
      const int64_t T = (c1 - c0) * group + tails;
      std::vector<float> scores(std::max<int64_t>(R * T, 1), 0.0f);  // (R, T)
      const float* qh = qp + (b * Hq + h * R) * D;  // (R, D)
      for (int64_t c = c0; c < c1; ++c) {  // keys: q . k = sum_d (q_d S_d) c_d - sum_d q_d S_d Z_d
        const int64_t row = (bh * C + c) * D;
        const uint8_t* zeros = kz + (bh * C + c) * kzb;
        const int64_t at = (c - c0) * group;
        std::fill(base.begin(), base.end(), 0.0f);
        for (int64_t d = 0; d < D; ++d) {
          const float s = static_cast<float>(ks[row + d]), z = static_cast<float>(code_at(zeros, d, bits));
          unpack_planar<BITS>(kc + (row + d) * kb, group, codes.data());
          for (int64_t r = 0; r < R; ++r) {
            const float w = qh[r * D + d] * s;
            base[r] += w * z;
            float* __restrict sr = scores.data() + r * T + at;
            const float* __restrict cs = codes.data();
            for (int64_t t = 0; t < group; ++t) sr[t] += w * cs[t];
          }
        }
        for (int64_t r = 0; r < R; ++r)
          for (int64_t t = 0; t < group; ++t) scores[r * T + at + t] = (scores[r * T + at + t] - base[r]) * scale_qk;
      }
      for (int64_t j = 0; j < tails; ++j) {  // the float tail
        const float* k = tk + (bh * Tt + j) * D;
        for (int64_t r = 0; r < R; ++r) {
          float dot = 0.0f;
          for (int64_t d = 0; d < D; ++d) dot += qh[r * D + d] * k[d];
          scores[r * T + (c1 - c0) * group + j] = dot * scale_qk;
        }
      }
      float* acc = part_acc.data() + item * R * D;
      std::fill(acc, acc + R * D, 0.0f);
      for (int64_t r = 0; r < R; ++r) {  // exp(s - m) and its sum, per query head
        float* sr = scores.data() + r * T;
        float peak = -INFINITY;
        for (int64_t t = 0; t < T; ++t) peak = std::max(peak, sr[t]);
        float total = 0.0f;
        for (int64_t t = 0; t < T; ++t) total += (sr[t] = std::exp(sr[t] - peak));
        part_max[item * R + r] = peak;
        part_sum[item * R + r] = total;
      }
      for (int64_t t = 0; t < (c1 - c0) * group; ++t) {  // values: sum_t (p_t S_tg) (c_td - Z_tg)
        const int64_t row = bh * T_cap + c0 * group + t;
        unpack_planar<BITS>(vc + row * vb, D, codes.data());
        const int64_t chunk = c0 + t / group, in_chunk = t % group;
        const uint8_t* zeros = vz + (bh * C + chunk) * vzb;
        for (int64_t g = 0; g < NG; ++g) {
          const float s = static_cast<float>(vs[row * NG + g]), z = static_cast<float>(code_at(zeros, in_chunk * NG + g, bits));
          const int64_t lo = g * value_group, hi = std::min(D, lo + value_group);
          for (int64_t r = 0; r < R; ++r) {
            const float w = scores[r * T + t] * s;
            float* __restrict ar = acc + r * D;
            const float* __restrict cs = codes.data();
            for (int64_t d = lo; d < hi; ++d) ar[d] += w * (cs[d] - z);
          }
        }
      }
      for (int64_t j = 0; j < tails; ++j) {
        const float* v = tv + (bh * Tt + j) * D;
        for (int64_t r = 0; r < R; ++r) {
          const float w = scores[r * T + (c1 - c0) * group + j];
          float* ar = acc + r * D;
          for (int64_t d = 0; d < D; ++d) ar[d] += w * v[d];
        }
      }
    }
  });

  auto out = torch::zeros({B, Hq, D}, q.options());
  float* op = out.data_ptr<float>();
  for (int64_t bh = 0; bh < B * H; ++bh) {  // merge the parts: weights exp(m_i - M), normalised by their sums
    const int64_t b = bh / H, h = bh % H;
    for (int64_t r = 0; r < R; ++r) {
      float peak = -INFINITY;
      for (int64_t part = 0; part < parts; ++part) peak = std::max(peak, part_max[(bh * parts + part) * R + r]);
      float total = 0.0f;
      float* o = op + (b * Hq + h * R + r) * D;
      for (int64_t part = 0; part < parts; ++part) {
        const int64_t at = (bh * parts + part) * R + r;
        if (part_sum[at] == 0.0f) continue;  // a part with no tokens
        const float w = std::exp(part_max[at] - peak);
        total += w * part_sum[at];
        const float* acc = part_acc.data() + at * D;
        for (int64_t d = 0; d < D; ++d) o[d] += w * acc[d];
      }
      for (int64_t d = 0; d < D; ++d) o[d] /= total;
    }
  }
  return out;
}

torch::Tensor kv_attend(torch::Tensor q, torch::Tensor k_codes, torch::Tensor k_scale, torch::Tensor k_zero,
                        torch::Tensor v_codes, torch::Tensor v_scale, torch::Tensor v_zero, int64_t n_chunks,
                        int64_t group, int64_t value_group, int64_t bits, torch::Tensor tail_k, torch::Tensor tail_v,
                        double scaling) {
  switch (bits) {
    case 2: return kv_attend_bits<2>(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, n_chunks, group, value_group, tail_k, tail_v, scaling);
    case 4: return kv_attend_bits<4>(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, n_chunks, group, value_group, tail_k, tail_v, scaling);
    case 8: return kv_attend_bits<8>(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, n_chunks, group, value_group, tail_k, tail_v, scaling);
    default: TORCH_CHECK(false, "the kernel reads 2-, 4- or 8-bit codes");
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("kv_attend", &kv_attend, "one decode step of attention over the packed KV cache");
}
