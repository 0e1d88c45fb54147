// lowbit CPU kernels: weight-only low-bit GEMM for small batches (decode), fp32 activations.
//
// y[m, n] = sum_g s[n, g] * (sum_{k in g} q[n, k] * x[m, k] - z[n, g] * sum_{k in g} x[m, k])
//
// which is W = S (Q - Z) (report Eq. 3.2) applied group by group without ever building W.
// Layouts (prepared by lowbit/kernels/cpu.py from a QuantizedWeight):
//   int4: uint8 (N, K/2); within each run of 32 columns of a row, byte j (0..15) holds
//         column j in its low nibble and column 16 + j in its high nibble, so a 16-byte
//         load gives two contiguous 16-column slices after a mask and a shift.
//   int8: uint8 (N, K), one code per column.
//   scales, zeros: float32 (N, K/G); zeros are in code units (symmetric: 2^(b-1); a float
//         offset m becomes -m/s).
//   The last group of a row may be shorter (K % G columns), as everywhere in lowbit.
// Requirements (checked by the Python wrapper): K % 32 == 0, G % 32 == 0, M <= 16.
#include <torch/extension.h>
#include <algorithm>
#include <vector>

namespace {

constexpr int kMaxBatch = 16;

template <bool kInt4>
void gemm_lowbit(const uint8_t* q, const float* s, const float* z, const float* x, float* y,
                 int64_t M, int64_t N, int64_t K, int64_t G) {
  const int64_t ng = (K + G - 1) / G;
  const int64_t row_bytes = kInt4 ? K / 2 : K;
  std::vector<float> xsum(M * ng, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < ng; ++g) {
      float acc = 0.f;
      for (int64_t k = g * G; k < std::min((g + 1) * G, K); ++k) acc += x[m * K + k];
      xsum[m * ng + g] = acc;
    }
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const uint8_t* qrow = q + n * row_bytes;
    float acc[kMaxBatch] = {0.f};
    for (int64_t g = 0; g < ng; ++g) {
      float part[kMaxBatch] = {0.f};
      const int64_t end = std::min((g + 1) * G, K);
      for (int64_t c = g * G; c < end; c += 32) {
        float w[32];
        if (kInt4) {
          const uint8_t* b = qrow + c / 2;
#pragma omp simd
          for (int j = 0; j < 16; ++j) {
            w[j] = static_cast<float>(b[j] & 15);
            w[16 + j] = static_cast<float>(b[j] >> 4);
          }
        } else {
          const uint8_t* b = qrow + c;
#pragma omp simd
          for (int j = 0; j < 32; ++j) w[j] = static_cast<float>(b[j]);
        }
        for (int64_t m = 0; m < M; ++m) {
          const float* xm = x + m * K + c;
          float p = 0.f;
#pragma omp simd reduction(+ : p)
          for (int j = 0; j < 32; ++j) p += w[j] * xm[j];
          part[m] += p;
        }
      }
      const float sc = s[n * ng + g], zp = z[n * ng + g];
      for (int64_t m = 0; m < M; ++m) acc[m] += sc * (part[m] - zp * xsum[m * ng + g]);
    }
    for (int64_t m = 0; m < M; ++m) y[m * N + n] = acc[m];
  }
}

torch::Tensor gemm(torch::Tensor x, torch::Tensor q, torch::Tensor scales, torch::Tensor zeros, int64_t group_size, bool int4) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2, "x must be contiguous float32 (M, K)");
  TORCH_CHECK(q.dtype() == torch::kUInt8 && q.is_contiguous(), "q must be contiguous uint8");
  TORCH_CHECK(scales.dtype() == torch::kFloat32 && zeros.dtype() == torch::kFloat32, "scales and zeros must be float32");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  TORCH_CHECK(M <= kMaxBatch, "batch larger than 16");
  TORCH_CHECK(K % 32 == 0 && group_size % 32 == 0, "K and the group size must be multiples of 32");
  auto y = torch::empty({M, N}, x.options());
  if (int4)
    gemm_lowbit<true>(q.data_ptr<uint8_t>(), scales.data_ptr<float>(), zeros.data_ptr<float>(), x.data_ptr<float>(), y.data_ptr<float>(), M, N, K, group_size);
  else
    gemm_lowbit<false>(q.data_ptr<uint8_t>(), scales.data_ptr<float>(), zeros.data_ptr<float>(), x.data_ptr<float>(), y.data_ptr<float>(), M, N, K, group_size);
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemm", &gemm, "low-bit weight-only GEMM for small batches (fp32 activations)");
}
