// lowbit's compiled decode step: the whole one-token forward of a Llama-family decoder (Llama,
// Qwen2, Mistral, Gemma 3) in C++, from the embedding row to the argmax of the logits, with
// no Python between layers. lowbit/inference/compiled_step.py builds it from a model whose
// linears are float32 nn.Linear or lowbit KernelLinear (their packed codes used in place) and
// keeps transformers' forward as the reference it is tested against.
//
// One step at position p, for each block (x: the residual stream, (H,)):
//   h = norm(x);  q, k, v = h Wq, h Wk, h Wv (+ biases);  [Gemma 3: q, k normed per head]
//   q, k rotated by RoPE at p (rotate-half form, per-layer inverse frequencies);
//   k, v written to the layer's cache at p;  each query head attends (scaled dot product,
//   softmax) over the cached positions its kv head sees: [0, p], or [p - window + 1, p]
//   on sliding-window layers;
//   a = o Wo  [Gemma 3: a = norm(a)];  x += a
//   h = norm(x);  m = act(h Wgate) * (h Wup);  d = m Wdown  [Gemma 3: d = norm(d)];  x += d
// then logits = norm(x) Whead [softcapped if the model says so], next token = argmax.
// norm(x) = x / sqrt(mean(x^2) + eps) * (offset + w): offset 0 (Llama) or 1 (Gemma).
// Shapes: caches float32 (1, kv_heads, max_len, head_dim), as transformers' StaticCache;
// linears per gemm_kernels.h (codes uint8, scales/zeros float32 (N, n_groups)) or float32
// weights (N, K) with float32 biases (N,).
#include "gemm_kernels.h"

#include <limits>
#include <string>

namespace {

using namespace lowbit_gemm;
namespace py = pybind11;

enum Kind : int64_t { kFloat = 0, kInt4 = 1, kInt8 = 2, kW4A8 = 3, kW8A8 = 4 };
enum Activation : int64_t { kSilu = 0, kGeluTanh = 1 };

// One linear y = x W^T (+ b) at one token: a float32 weight through gemv_f32, or lowbit's packed
// codes through the GEMM kernels (the W4A8 and W8A8 ones quantise x to int8 blocks first).
struct Linear {
  int64_t kind = kFloat, N = 0, K = 0, G = 0;
  torch::Tensor w, scales, zeros, bias;  // w: float32 (N, K) or uint8 codes

  static Linear from(const py::tuple& t) {
    Linear l;
    l.kind = t[0].cast<int64_t>();
    l.w = t[1].cast<torch::Tensor>();
    if (!t[2].is_none()) l.scales = t[2].cast<torch::Tensor>();
    if (!t[3].is_none()) l.zeros = t[3].cast<torch::Tensor>();
    if (!t[4].is_none()) l.bias = t[4].cast<torch::Tensor>();
    l.G = t[5].cast<int64_t>();
    l.K = t[6].cast<int64_t>();
    l.N = l.w.size(0);
    TORCH_CHECK(l.w.is_contiguous() && (l.kind == kFloat ? l.w.dtype() == torch::kFloat32 : l.w.dtype() == torch::kUInt8),
                "a linear's weight must be contiguous float32 (float) or uint8 (codes)");
    if (l.kind != kFloat) TORCH_CHECK(l.scales.defined() && l.zeros.defined() && l.K % 32 == 0 && l.G % 32 == 0,
                                      "packed linears need scales, zeros and K, G multiples of 32");
    return l;
  }

  void apply(const float* x, float* y) const {
    if (kind == kFloat) {
      gemv_f32(w.data_ptr<float>(), x, y, N, K);
    } else if (kind == kW4A8 || kind == kW8A8) {
      const bool int4 = kind == kW4A8;
      const QuantActs acts = quantize_acts(x, 1, K, G, int4);
      const uint8_t* q = w.data_ptr<uint8_t>();
      if (int4) int8_acts_gemm<true>(q, scales.data_ptr<float>(), zeros.data_ptr<float>(), acts, y, 1, N, K, G);
      else int8_acts_gemm<false>(q, scales.data_ptr<float>(), zeros.data_ptr<float>(), acts, y, 1, N, K, G);
    } else if (kind == kInt4) {
      gemm_lowbit<true>(w.data_ptr<uint8_t>(), scales.data_ptr<float>(), zeros.data_ptr<float>(), x, y, 1, N, K, G);
    } else {
      gemm_lowbit<false>(w.data_ptr<uint8_t>(), scales.data_ptr<float>(), zeros.data_ptr<float>(), x, y, 1, N, K, G);
    }
    if (bias.defined()) {
      const float* b = bias.data_ptr<float>();
      for (int64_t n = 0; n < N; ++n) y[n] += b[n];
    }
  }
};

torch::Tensor optional_tensor(const py::dict& d, const char* key) {
  if (!d.contains(key) || d[key].is_none()) return torch::Tensor();
  return d[key].cast<torch::Tensor>();
}

struct Layer {
  Linear q, k, v, o, gate, up, down;
  torch::Tensor attn_norm, attn_out_norm, mlp_norm, mlp_out_norm, q_norm, k_norm;  // the *_out and q/k norms: Gemma 3 only
  torch::Tensor inv_freq;                                                          // float32 (head_dim / 2,)
  torch::Tensor keys, values;                                                      // float32 (1, kv_heads, max_len, head_dim)
  float rope_scale = 1.f, scaling = 1.f;
  int64_t window = 0;  // 0: full attention
};

// x (n,) -> out (n,): x / sqrt(mean(x^2) + eps) * (offset + w); out may alias x.
void rms_norm(const float* x, const float* w, float offset, float eps, int64_t n, float* out) {
  double squares = 0.0;
  for (int64_t i = 0; i < n; ++i) squares += static_cast<double>(x[i]) * x[i];
  const float inv = 1.f / std::sqrt(static_cast<float>(squares / n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * inv * (offset + w[i]);
}

// Rotate-half RoPE on `heads` vectors of head_dim d in place: for i < d/2, with f = p * inv_freq[i],
// (a, b) = (x[i], x[i + d/2]) -> (a cos f - b sin f, b cos f + a sin f), cos and sin times `scale`.
void rope(float* x, int64_t heads, int64_t d, const float* cosv, const float* sinv) {
  const int64_t half = d / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* v = x + h * d;
    for (int64_t i = 0; i < half; ++i) {
      const float a = v[i], b = v[i + half];
      v[i] = a * cosv[i] - b * sinv[i];
      v[i + half] = b * cosv[i] + a * sinv[i];
    }
  }
}

class DecodeStep {
 public:
  DecodeStep(const py::dict& config, const py::list& layers) {
    hidden_ = config["hidden"].cast<int64_t>();
    heads_ = config["heads"].cast<int64_t>();
    kv_heads_ = config["kv_heads"].cast<int64_t>();
    head_dim_ = config["head_dim"].cast<int64_t>();
    intermediate_ = config["intermediate"].cast<int64_t>();
    eps_ = config["eps"].cast<float>();
    norm_offset_ = config["norm_offset"].cast<float>();
    embed_scale_ = config["embed_scale"].cast<float>();
    activation_ = config["activation"].cast<int64_t>();
    softcap_ = config["final_softcap"].cast<float>();
    max_len_ = config["max_len"].cast<int64_t>();
    embed_ = config["embed"].cast<torch::Tensor>();
    final_norm_ = config["final_norm"].cast<torch::Tensor>();
    head_ = Linear::from(config["head"].cast<py::tuple>());
    TORCH_CHECK(embed_.dtype() == torch::kFloat32 && embed_.is_contiguous() && embed_.size(1) == hidden_, "embed must be float32 (vocab, hidden)");
    TORCH_CHECK(heads_ % kv_heads_ == 0 && head_dim_ % 2 == 0, "heads must be a multiple of kv_heads and head_dim even");
    for (const auto& item : layers) {
      const py::dict d = item.cast<py::dict>();
      Layer l;
      l.q = Linear::from(d["q"].cast<py::tuple>());
      l.k = Linear::from(d["k"].cast<py::tuple>());
      l.v = Linear::from(d["v"].cast<py::tuple>());
      l.o = Linear::from(d["o"].cast<py::tuple>());
      l.gate = Linear::from(d["gate"].cast<py::tuple>());
      l.up = Linear::from(d["up"].cast<py::tuple>());
      l.down = Linear::from(d["down"].cast<py::tuple>());
      l.attn_norm = d["attn_norm"].cast<torch::Tensor>();
      l.mlp_norm = d["mlp_norm"].cast<torch::Tensor>();
      l.attn_out_norm = optional_tensor(d, "attn_out_norm");
      l.mlp_out_norm = optional_tensor(d, "mlp_out_norm");
      l.q_norm = optional_tensor(d, "q_norm");
      l.k_norm = optional_tensor(d, "k_norm");
      l.inv_freq = d["inv_freq"].cast<torch::Tensor>();
      l.rope_scale = d["rope_scale"].cast<float>();
      l.scaling = d["scaling"].cast<float>();
      l.window = d["window"].cast<int64_t>();
      l.keys = d["keys"].cast<torch::Tensor>();
      l.values = d["values"].cast<torch::Tensor>();
      TORCH_CHECK(l.keys.is_contiguous() && l.values.is_contiguous() && l.keys.size(1) == kv_heads_ && l.keys.size(2) == max_len_ &&
                      l.keys.size(3) == head_dim_ && l.values.sizes() == l.keys.sizes(),
                  "each cache must be contiguous float32 (1, kv_heads, max_len, head_dim)");
      TORCH_CHECK(l.inv_freq.numel() == head_dim_ / 2, "inv_freq must have head_dim / 2 entries (RoPE over the whole head)");
      TORCH_CHECK(l.q.N == heads_ * head_dim_ && l.k.N == kv_heads_ * head_dim_ && l.v.N == kv_heads_ * head_dim_ &&
                      l.gate.N == intermediate_ && l.up.N == intermediate_ && l.down.N == hidden_ && l.o.N == hidden_,
                  "a layer's linear shapes do not match the config");
      layers_.push_back(std::move(l));
    }
    logits_ = torch::empty({head_.N});
    x_.resize(hidden_);
    h_.resize(std::max(hidden_, heads_ * head_dim_));
    q_.resize(heads_ * head_dim_);
    kv_.resize(2 * kv_heads_ * head_dim_);
    att_.resize(heads_ * head_dim_);
    gate_.resize(intermediate_);
    up_.resize(intermediate_);
    scores_.resize(heads_ * max_len_);
    cos_.resize(head_dim_ / 2);
    sin_.resize(head_dim_ / 2);
  }

  // The forward at one position: token at `position`, the caches holding positions [0, position).
  // Returns the argmax of the logits; the logits stay readable through logits().
  int64_t step(int64_t token, int64_t position) {
    TORCH_CHECK(position >= 0 && position < max_len_, "position ", position, " is outside the cache (max_len ", max_len_, ")");
    TORCH_CHECK(token >= 0 && token < embed_.size(0), "token id ", token, " is outside the vocabulary");
    const float* row = embed_.data_ptr<float>() + token * hidden_;
    for (int64_t i = 0; i < hidden_; ++i) x_[i] = row[i] * embed_scale_;
    for (auto& layer : layers_) block(layer, position);
    rms_norm(x_.data(), final_norm_.data_ptr<float>(), norm_offset_, eps_, hidden_, h_.data());
    float* logits = logits_.data_ptr<float>();
    head_.apply(h_.data(), logits);
    if (softcap_ > 0.f)
      for (int64_t i = 0; i < head_.N; ++i) logits[i] = std::tanh(logits[i] / softcap_) * softcap_;
    return std::max_element(logits, logits + head_.N) - logits;
  }

  torch::Tensor logits() const { return logits_; }

 private:
  void block(Layer& l, int64_t p) {
    const int64_t hd = head_dim_, nq = heads_ * hd, nkv = kv_heads_ * hd;
    float *h = h_.data(), *q = q_.data(), *k = kv_.data(), *v = kv_.data() + nkv;
    rms_norm(x_.data(), l.attn_norm.data_ptr<float>(), norm_offset_, eps_, hidden_, h);
    l.q.apply(h, q);
    l.k.apply(h, k);
    l.v.apply(h, v);
    if (l.q_norm.defined()) {
      for (int64_t i = 0; i < heads_; ++i) rms_norm(q + i * hd, l.q_norm.data_ptr<float>(), norm_offset_, eps_, hd, q + i * hd);
      for (int64_t i = 0; i < kv_heads_; ++i) rms_norm(k + i * hd, l.k_norm.data_ptr<float>(), norm_offset_, eps_, hd, k + i * hd);
    }
    const float* inv_freq = l.inv_freq.data_ptr<float>();
    for (int64_t i = 0; i < hd / 2; ++i) {
      const float f = static_cast<float>(p) * inv_freq[i];
      cos_[i] = std::cos(f) * l.rope_scale;
      sin_[i] = std::sin(f) * l.rope_scale;
    }
    rope(q, heads_, hd, cos_.data(), sin_.data());
    rope(k, kv_heads_, hd, cos_.data(), sin_.data());
    float *keys = l.keys.data_ptr<float>(), *values = l.values.data_ptr<float>();
    for (int64_t g = 0; g < kv_heads_; ++g) {
      std::copy(k + g * hd, k + (g + 1) * hd, keys + (g * max_len_ + p) * hd);
      std::copy(v + g * hd, v + (g + 1) * hd, values + (g * max_len_ + p) * hd);
    }
    attend(l, p, q, keys, values, att_.data());
    l.o.apply(att_.data(), h);
    if (l.attn_out_norm.defined()) rms_norm(h, l.attn_out_norm.data_ptr<float>(), norm_offset_, eps_, hidden_, h);
    for (int64_t i = 0; i < hidden_; ++i) x_[i] += h[i];

    rms_norm(x_.data(), l.mlp_norm.data_ptr<float>(), norm_offset_, eps_, hidden_, h);
    l.gate.apply(h, gate_.data());
    l.up.apply(h, up_.data());
    for (int64_t i = 0; i < intermediate_; ++i) gate_[i] = activate(gate_[i]) * up_[i];
    l.down.apply(gate_.data(), h);
    if (l.mlp_out_norm.defined()) rms_norm(h, l.mlp_out_norm.data_ptr<float>(), norm_offset_, eps_, hidden_, h);
    for (int64_t i = 0; i < hidden_; ++i) x_[i] += h[i];
  }

  // Scaled dot-product attention of every query head over its kv head's cached positions.
  void attend(const Layer& l, int64_t p, const float* q, const float* keys, const float* values, float* out) {
    const int64_t hd = head_dim_, group = heads_ / kv_heads_;
    const int64_t first = l.window > 0 ? std::max<int64_t>(0, p - l.window + 1) : 0, n = p - first + 1;
#pragma omp parallel for schedule(static) if (heads_ * n * hd > 32768)
    for (int64_t head = 0; head < heads_; ++head) {
      const int64_t g = head / group;
      const float* qh = q + head * hd;
      float* s = scores_.data() + head * max_len_;
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < n; ++j) {
        const float* kj = keys + (g * max_len_ + first + j) * hd;
        float dot = 0.f;
        for (int64_t i = 0; i < hd; ++i) dot += qh[i] * kj[i];
        s[j] = dot * l.scaling;
        top = std::max(top, s[j]);
      }
      float total = 0.f;
      for (int64_t j = 0; j < n; ++j) total += (s[j] = std::exp(s[j] - top));
      float* oh = out + head * hd;
      std::fill(oh, oh + hd, 0.f);
      for (int64_t j = 0; j < n; ++j) {
        const float weight = s[j] / total;
        const float* vj = values + (g * max_len_ + first + j) * hd;
        for (int64_t i = 0; i < hd; ++i) oh[i] += weight * vj[i];
      }
    }
  }

  float activate(float x) const {
    if (activation_ == kSilu) return x / (1.f + std::exp(-x));
    const float c = 0.7978845608028654f;  // sqrt(2 / pi): GELU's tanh approximation
    return 0.5f * x * (1.f + std::tanh(c * (x + 0.044715f * x * x * x)));
  }

  int64_t hidden_, heads_, kv_heads_, head_dim_, intermediate_, activation_, max_len_;
  float eps_, norm_offset_, embed_scale_, softcap_;
  torch::Tensor embed_, final_norm_, logits_;
  Linear head_;
  std::vector<Layer> layers_;
  std::vector<float> x_, h_, q_, kv_, att_, gate_, up_, scores_, cos_, sin_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<DecodeStep>(m, "DecodeStep")
      .def(py::init<const py::dict&, const py::list&>(), "the step's config (dict) and its layers (list of dicts)")
      .def("step", &DecodeStep::step, "one token at one position: writes its k, v to the caches, returns the argmax",
           py::call_guard<py::gil_scoped_release>())
      .def("logits", &DecodeStep::logits, "the last step's logits, float32 (vocab,)");
}
