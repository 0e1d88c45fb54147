// lowbit CPU kernels for Python: argument checks and torch wrappers around gemm_kernels.h.
#include "gemm_kernels.h"

namespace {

using namespace lowbit_gemm;

// The weight-side checks every entry point shares (the GEMMs and the dequantisation).
void check_weight(const torch::Tensor& q, const torch::Tensor& scales, const torch::Tensor& zeros) {
  TORCH_CHECK(q.dtype() == torch::kUInt8 && q.is_contiguous() && q.dim() == 2, "q must be contiguous uint8 (N, row bytes)");
  TORCH_CHECK(scales.dtype() == torch::kFloat32 && zeros.dtype() == torch::kFloat32 && scales.is_contiguous() && zeros.is_contiguous(),
              "scales and zeros must be contiguous float32");
}

// The argument checks every GEMM entry point shares.
void check_args(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scales, const torch::Tensor& zeros, int64_t group_size) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2, "x must be contiguous float32 (M, K)");
  check_weight(q, scales, zeros);
  TORCH_CHECK(x.size(0) <= kMaxBatch, "batch larger than 16");
  TORCH_CHECK(x.size(1) % 32 == 0 && group_size % 32 == 0, "K and the group size must be multiples of 32");
}

torch::Tensor run_gemm(torch::Tensor x, torch::Tensor q, torch::Tensor scales, torch::Tensor zeros, int64_t group_size, bool int4,
                       bool portable) {
  check_args(x, q, scales, zeros, group_size);
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  TORCH_CHECK(q.size(1) == (int4 ? K / 2 : K), "q's row length does not match K");
  auto y = torch::empty({M, N}, x.options());
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float *sp = scales.data_ptr<float>(), *zp = zeros.data_ptr<float>(), *xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (portable) {
    if (int4) gemm_portable<true>(qp, sp, zp, xp, yp, M, N, K, group_size);
    else gemm_portable<false>(qp, sp, zp, xp, yp, M, N, K, group_size);
  } else {
    if (int4) gemm_lowbit<true>(qp, sp, zp, xp, yp, M, N, K, group_size);
    else gemm_lowbit<false>(qp, sp, zp, xp, yp, M, N, K, group_size);
  }
  return y;
}

// The integer-activation GEMMs: x rounded to int8 blocks of 32 (in the weight's nibble order
// for 4-bit codes), then W4A8 or W8A8.
torch::Tensor gemm_int8_acts(torch::Tensor x, torch::Tensor q, torch::Tensor scales, torch::Tensor zeros, int64_t group_size, bool int4,
                             bool portable) {
  check_args(x, q, scales, zeros, group_size);
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  TORCH_CHECK(q.size(1) == (int4 ? K / 2 : K), "q's row length does not match K");
  auto y = torch::empty({M, N}, x.options());
  const QuantActs a = quantize_acts(x.data_ptr<float>(), M, K, group_size, int4);
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float *sp = scales.data_ptr<float>(), *zp = zeros.data_ptr<float>();
  float* yp = y.data_ptr<float>();
#if defined(__AVX2__) && defined(__FMA__)
  if (!portable) {
    if (int4) gemm_int8_acts_avx2<true>(qp, sp, zp, a, yp, M, N, K, group_size);
    else gemm_int8_acts_avx2<false>(qp, sp, zp, a, yp, M, N, K, group_size);
    return y;
  }
#endif
  if (int4) gemm_int8_acts_portable<true>(qp, sp, zp, a, yp, M, N, K, group_size);
  else gemm_int8_acts_portable<false>(qp, sp, zp, a, yp, M, N, K, group_size);
  return y;
}

torch::Tensor gemm_w4a8(torch::Tensor x, torch::Tensor q, torch::Tensor scales, torch::Tensor zeros, int64_t group_size, bool portable) {
  return gemm_int8_acts(x, q, scales, zeros, group_size, true, portable);
}

torch::Tensor gemm_w8a8(torch::Tensor x, torch::Tensor q, torch::Tensor scales, torch::Tensor zeros, int64_t group_size, bool portable) {
  return gemm_int8_acts(x, q, scales, zeros, group_size, false, portable);
}

// The checks both dequantising entry points share: q's rows hold K codes, and scales and
// zeros one value per (row, group).
void check_dequant_shapes(const torch::Tensor& q, const torch::Tensor& scales, const torch::Tensor& zeros, int64_t group_size, bool int4,
                          int64_t K) {
  check_weight(q, scales, zeros);
  const int64_t N = q.size(0), ng = (K + group_size - 1) / group_size;
  TORCH_CHECK(K % 2 == 0 || !int4, "4-bit rows need an even K");
  TORCH_CHECK(q.size(1) == (int4 ? K / 2 : K), "q's row length does not match in_features");
  TORCH_CHECK(scales.numel() == N * ng && zeros.numel() == N * ng, "scales and zeros must be (N, n_groups)");
}

// Rows [r0, r0 + rows) of W in float32 into w (rows, K).
void dequantize_block(const torch::Tensor& q, const torch::Tensor& scales, const torch::Tensor& zeros, int64_t group_size, bool int4,
                      int64_t K, int64_t r0, int64_t rows, float* w) {
  const int64_t ng = (K + group_size - 1) / group_size, row_bytes = int4 ? K / 2 : K;
  const uint8_t* qp = q.data_ptr<uint8_t>() + r0 * row_bytes;
  const float *sp = scales.data_ptr<float>() + r0 * ng, *zp = zeros.data_ptr<float>() + r0 * ng;
  if (int4) dequantize_rows<true>(qp, sp, zp, w, rows, K, group_size);
  else dequantize_rows<false>(qp, sp, zp, w, rows, K, group_size);
}

torch::Tensor dequantize(torch::Tensor q, torch::Tensor scales, torch::Tensor zeros, int64_t group_size, bool int4, int64_t in_features) {
  check_dequant_shapes(q, scales, zeros, group_size, int4, in_features);
  auto w = torch::empty({q.size(0), in_features}, scales.options());
  dequantize_block(q, scales, zeros, group_size, int4, in_features, 0, q.size(0), w.data_ptr<float>());
  return w;
}

// Prefill-sized batches: each thread dequantises block_rows rows of W at a time into its own
// buffer, which stays in cache, and multiplies it by x with one single-threaded BLAS call,
// y[:, rows] = x W[rows]^T. Dequantising the whole weight first wrote 4 bytes per weight to
// fresh memory and read them back for the matmul; here memory sees only the packed codes. The
// arithmetic per output is the reference's (float32 dequantisation, float32 dot products).
torch::Tensor gemm_dequant_blocks(torch::Tensor x, torch::Tensor q, torch::Tensor scales, torch::Tensor zeros, int64_t group_size, bool int4,
                                  int64_t block_rows) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2, "x must be contiguous float32 (M, K)");
  TORCH_CHECK(block_rows > 0, "block_rows must be positive");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  check_dequant_shapes(q, scales, zeros, group_size, int4, K);
  auto y = torch::empty({M, N}, x.options());
  auto buffers = torch::empty({omp_get_max_threads(), std::min(block_rows, N), K}, x.options());
  const int64_t blocks = (N + block_rows - 1) / block_rows;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t r0 = b * block_rows, rows = std::min(block_rows, N - r0);
    auto buffer = buffers[omp_get_thread_num()].narrow(0, 0, rows);
    // dequantize_rows' own parallel loop runs on this thread alone (nested)
    dequantize_block(q, scales, zeros, group_size, int4, K, r0, rows, buffer.data_ptr<float>());
    auto out = y.narrow(1, r0, rows);  // (M, rows), row stride N: BLAS writes it in place
    at::mm_out(out, x, buffer.t());
  }
  return y;
}

// y = W x for a float32 W (N, K) at one token (the compiled step's float linears), checked
// against torch.mv by the tests.
torch::Tensor gemv(torch::Tensor w, torch::Tensor x) {
  TORCH_CHECK(w.dtype() == torch::kFloat32 && w.is_contiguous() && w.dim() == 2, "w must be contiguous float32 (N, K)");
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 1 && x.size(0) == w.size(1), "x must be contiguous float32 (K,)");
  auto y = torch::empty({w.size(0)}, x.options());
  gemv_f32(w.data_ptr<float>(), x.data_ptr<float>(), y.data_ptr<float>(), w.size(0), w.size(1));
  return y;
}

torch::Tensor gemm(torch::Tensor x, torch::Tensor q, torch::Tensor scales, torch::Tensor zeros, int64_t group_size, bool int4) {
  return run_gemm(x, q, scales, zeros, group_size, int4, false);
}

torch::Tensor gemm_portable_op(torch::Tensor x, torch::Tensor q, torch::Tensor scales, torch::Tensor zeros, int64_t group_size, bool int4) {
  return run_gemm(x, q, scales, zeros, group_size, int4, true);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemm", &gemm, "low-bit weight-only GEMM for small batches (fp32 activations)");
  m.def("gemm_portable", &gemm_portable_op, "the same GEMM on the portable path (for tests)");
  m.def("gemm_w8a8", &gemm_w8a8, "W8A8: 8-bit weights, activations int8 per token in blocks of 32, integer dot products");
  m.def("gemm_w4a8", &gemm_w4a8, "W4A8: 4-bit weights, activations int8 per token in blocks of 32, integer dot products");
  m.def("gemm_dequant_blocks", &gemm_dequant_blocks, "prefill-sized batches: W dequantised block_rows rows at a time, one BLAS product per block");
  m.def("dequantize", &dequantize, "the whole weight in float32 (N, K): the large-batch path before one BLAS matmul");
  m.def("gemv", &gemv, "float32 matrix-vector product at one token (the compiled step's float linears)");
  m.def("has_avx2", &has_avx2, "whether this build uses the AVX2/FMA path");
}
