// Lantern's fused CPU ops for the decode step: RMSNorm, the gated activation, and single-token attention
// (RoPE, cache write and attention over the cache in one call). Each replaces a chain of small PyTorch ops
// whose dispatch cost, not arithmetic, dominated a decode step (measured: ~270 ops per token).
//
// Plain loops; the hot inner loops are compiled for AVX-512, AVX2 and baseline x86-64 (GCC target_clones
// picks one at load). Shapes: B rows, H query heads, KV key/value heads, D head_dim, S cache length.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

void parallel_rows(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);  // pool.cpp

#if defined(__x86_64__) && defined(__GNUC__)
#define LANTERN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LANTERN_CLONES
#endif

namespace {

LANTERN_CLONES float dot(const float* a, const float* b, int64_t n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

LANTERN_CLONES void axpy(float a, const float* x, float* y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

LANTERN_CLONES void rms_row(const float* x, const float* w, float offset, float eps, float* out, int64_t n) {
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
    const float r = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
    for (int64_t i = 0; i < n; i++) out[i] = x[i] * r * (w[i] + offset);
}

void check_f32(const torch::Tensor& t, const char* name) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32, name, ": float32 on the CPU");
}

}  // namespace

// RMSNorm over the last dimension: x * rsqrt(mean(x^2) + eps) * (w + offset), in float32.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps, double offset) {
    check_f32(x, "x");
    check_f32(w, "w");
    const int64_t n = w.numel();
    TORCH_CHECK(x.size(-1) == n && w.is_contiguous(), "rms_norm: weight size must match the last dimension");
    auto xc = x.contiguous();
    auto out = torch::empty_like(xc);
    const int64_t rows = xc.numel() / n;
    const float* xp = xc.data_ptr<float>();
    const float* wp = w.data_ptr<float>();
    float* op = out.data_ptr<float>();
    for (int64_t r = 0; r < rows; r++)
        rms_row(xp + r * n, wp, static_cast<float>(offset), static_cast<float>(eps), op + r * n, n);
    return out;
}

// act(gate) * up for x = [gate | up] on the last dimension; act 0 = SiLU, 1 = GELU (tanh approximation).
torch::Tensor gated_act(const torch::Tensor& x, int64_t act) {
    check_f32(x, "x");
    auto xc = x.contiguous();
    const int64_t two_i = xc.size(-1), inter = two_i / 2;
    auto sizes = xc.sizes().vec();
    sizes.back() = inter;
    auto out = torch::empty(sizes, xc.options());
    const int64_t rows = xc.numel() / two_i;
    const float* xp = xc.data_ptr<float>();
    float* op = out.data_ptr<float>();
    for (int64_t r = 0; r < rows; r++) {
        const float* g = xp + r * two_i;
        const float* u = g + inter;
        float* o = op + r * inter;
        if (act == 0) {
            for (int64_t i = 0; i < inter; i++) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
        } else {
            for (int64_t i = 0; i < inter; i++) {
                const float v = g[i];
                const float t = std::tanh(0.7978845608028654f * (v + 0.044715f * v * v * v));
                o[i] = 0.5f * v * (1.0f + t) * u[i];
            }
        }
    }
    return out;
}

// One new token per row b: rotate q (B, H, D) and k (B, KV, D) by cos/sin (B, rot) (rotate-half convention,
// the first `rot` dims), write k and v (B, KV, D) into the caches (slots, KV, S, D) at row slots[b], position
// positions[b], then attend over that row's positions max(0, p - window + 1)..p. Returns (B, H * D).
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor k_cache,
                               torch::Tensor v_cache, const torch::Tensor& slots, const torch::Tensor& positions,
                               double scale, int64_t window) {
    for (const torch::Tensor* t : {&q, &k, &v, &cos, &sin, static_cast<const torch::Tensor*>(&k_cache), static_cast<const torch::Tensor*>(&v_cache)}) check_f32(*t, "decode_attention input");
    TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q, k, v: (B, heads, D)");
    TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1, "q, k, v: unit stride in D");
    TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 4, "caches: contiguous 4-D");
    TORCH_CHECK(slots.scalar_type() == torch::kInt64 && positions.scalar_type() == torch::kInt64,
                "slots, positions: int64");
    const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KV = k.size(1), S = k_cache.size(2);
    const int64_t rot = cos.size(-1), half = rot / 2;
    TORCH_CHECK(H % KV == 0 && k_cache.size(1) == KV && k_cache.size(3) == D && rot <= D, "decode_attention shapes");
    auto cos_c = cos.reshape({B, rot}).contiguous(), sin_c = sin.reshape({B, rot}).contiguous();
    auto slots_c = slots.contiguous(), pos_c = positions.contiguous();
    const int64_t* slot = slots_c.data_ptr<int64_t>();
    const int64_t* pos = pos_c.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; b++)
        TORCH_CHECK(slot[b] >= 0 && slot[b] < k_cache.size(0) && pos[b] >= 0 && pos[b] < S, "slot or position out of range");
    auto out = torch::empty({B, H * D}, q.options());
    float* kc = k_cache.data_ptr<float>();
    float* vc = v_cache.data_ptr<float>();
    const float* cp = cos_c.data_ptr<float>();
    const float* sp = sin_c.data_ptr<float>();
    const int64_t group = H / KV;

    auto rope = [&](const float* x, const float* c, const float* s, float* o) {
        for (int64_t i = 0; i < half; i++) {
            o[i] = x[i] * c[i] - x[i + half] * s[i];
            o[i + half] = x[i + half] * c[i + half] + x[i] * s[i + half];
        }
        for (int64_t i = rot; i < D; i++) o[i] = x[i];
    };
    // Write the new keys (rotated) and values first; attention below reads them back from the cache.
    for (int64_t b = 0; b < B; b++) {
        for (int64_t h = 0; h < KV; h++) {
            const int64_t at = ((slot[b] * KV + h) * S + pos[b]) * D;
            rope(k.data_ptr<float>() + b * k.stride(0) + h * k.stride(1), cp + b * rot, sp + b * rot, kc + at);
            const float* vs = v.data_ptr<float>() + b * v.stride(0) + h * v.stride(1);
            std::copy(vs, vs + D, vc + at);
        }
    }
    float* op = out.data_ptr<float>();
    // Threads only pay off on long caches (the work per (row, head) grows with the cached length).
    const int64_t longest = *std::max_element(pos, pos + B) + 1;
    parallel_rows(B * H, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, longest * D)), [&](int64_t t0, int64_t t1) {
        std::vector<float> qr(D), scores;
        for (int64_t t = t0; t < t1; t++) {
            const int64_t b = t / H, h = t % H, g = h / group;
            rope(q.data_ptr<float>() + b * q.stride(0) + h * q.stride(1), cp + b * rot, sp + b * rot, qr.data());
            const int64_t last = pos[b];
            const int64_t first = window > 0 ? std::max<int64_t>(0, last - window + 1) : 0;
            const float* kb = kc + (slot[b] * KV + g) * S * D;
            const float* vb = vc + (slot[b] * KV + g) * S * D;
            scores.resize(last - first + 1);
            float mx = -INFINITY;
            for (int64_t j = first; j <= last; j++) {
                const float sc = dot(qr.data(), kb + j * D, D) * static_cast<float>(scale);
                scores[j - first] = sc;
                mx = std::max(mx, sc);
            }
            float total = 0.0f;
            for (auto& sc : scores) total += (sc = std::exp(sc - mx));
            float* o = op + b * H * D + h * D;
            std::fill(o, o + D, 0.0f);
            const float inv = 1.0f / total;
            for (int64_t j = first; j <= last; j++) axpy(scores[j - first] * inv, vb + j * D, o, D);
        }
    });
    return out;
}

// ---- the whole decoder stack for one decode step, in one call ----

torch::Tensor qmatmul(const torch::Tensor& x, const torch::Tensor& qs, const torch::Tensor& d,
                      const c10::optional<torch::Tensor>& m, int64_t kind);

namespace {

struct QWeight {  // one QuantLinear: blocks plus an optional bias
    torch::Tensor qs, d;
    c10::optional<torch::Tensor> m, bias;
    int64_t kind;
    torch::Tensor apply(const torch::Tensor& x) const {
        auto y = qmatmul(x, qs, d, m, kind);
        if (bias) y.add_(*bias);
        return y;
    }
};

// One product, or several whose outputs are concatenated (q, k, v or gate, up kept apart when their blocks
// differ in kind, as in Q4_K_M files).
struct QWeights {
    std::vector<QWeight> parts;
    torch::Tensor apply(const torch::Tensor& x) const {
        if (parts.size() == 1) return parts[0].apply(x);
        std::vector<torch::Tensor> outs;
        for (const auto& p : parts) outs.push_back(p.apply(x));
        return torch::cat(outs, -1);
    }
};

struct Layer {
    QWeights qkv, gate_up;
    QWeight o, down;
    torch::Tensor in_norm, post_attn_norm;
    c10::optional<torch::Tensor> q_norm, k_norm, pre_ff_norm, post_ff_norm;  // Qwen3/Gemma 3; Gemma 3 sandwich
    int64_t window;   // sliding window, 0 for full attention
    int64_t rope;     // which cos/sin this layer uses (Gemma 3: 0 full, 1 sliding)
};

QWeight qweight(const pybind11::dict& w) {
    QWeight q;
    q.qs = w["qs"].cast<torch::Tensor>();
    q.d = w["d"].cast<torch::Tensor>();
    if (!w["m"].is_none()) q.m = w["m"].cast<torch::Tensor>();
    if (!w["bias"].is_none()) q.bias = w["bias"].cast<torch::Tensor>();
    q.kind = w["kind"].cast<int64_t>();
    return q;
}

QWeights qweights(const pybind11::list& parts) {
    QWeights q;
    for (const auto& part : parts) q.parts.push_back(qweight(part.cast<pybind11::dict>()));
    return q;
}

c10::optional<torch::Tensor> optional_tensor(const pybind11::dict& d, const char* key) {
    if (!d.contains(key) || d[key].is_none()) return c10::nullopt;
    return d[key].cast<torch::Tensor>();
}

}  // namespace

// The decoder layers of a model whose linear layers are all QuantLinear (q/k/v and gate/up fused or not), run
// for one new token per row without returning to Python between operations. Built once from the modules' tensors
// (shared, not copied); `forward` takes the hidden states after the embedding and returns them after the
// last layer (before the final norm). Mirrors DecoderLayer/Attention/MLP in model.py op for op.
class DecodeStack {
public:
    DecodeStack(const pybind11::list& layers, int64_t heads, int64_t kv_heads, int64_t head_dim, double eps,
                double norm_offset, int64_t act, double scale)
        : heads_(heads), kv_(kv_heads), dim_(head_dim), eps_(eps), offset_(norm_offset), act_(act), scale_(scale) {
        for (const auto& item : layers) {
            const auto spec = item.cast<pybind11::dict>();
            Layer l;
            l.qkv = qweights(spec["qkv"].cast<pybind11::list>());
            l.o = qweight(spec["o"].cast<pybind11::dict>());
            l.gate_up = qweights(spec["gate_up"].cast<pybind11::list>());
            l.down = qweight(spec["down"].cast<pybind11::dict>());
            l.in_norm = spec["in_norm"].cast<torch::Tensor>();
            l.post_attn_norm = spec["post_attn_norm"].cast<torch::Tensor>();
            l.q_norm = optional_tensor(spec, "q_norm");
            l.k_norm = optional_tensor(spec, "k_norm");
            l.pre_ff_norm = optional_tensor(spec, "pre_ff_norm");
            l.post_ff_norm = optional_tensor(spec, "post_ff_norm");
            l.window = spec["window"].cast<int64_t>();
            l.rope = spec["rope"].cast<int64_t>();
            layers_.push_back(std::move(l));
        }
    }

    // h (B, C); cos/sin: one (B, rot) pair per rope kind; caches: per layer (slots, KV, S, D); slots,
    // positions (B,) int64.
    torch::Tensor forward(torch::Tensor h, const std::vector<torch::Tensor>& cos, const std::vector<torch::Tensor>& sin,
                          const std::vector<torch::Tensor>& k_caches, const std::vector<torch::Tensor>& v_caches,
                          const torch::Tensor& slots, const torch::Tensor& positions) const {
        TORCH_CHECK(k_caches.size() == layers_.size() && v_caches.size() == layers_.size(), "one cache per layer");
        h = h.contiguous().clone();
        const int64_t B = h.size(0);
        for (size_t i = 0; i < layers_.size(); i++) {
            const Layer& l = layers_[i];
            TORCH_CHECK(l.rope < static_cast<int64_t>(cos.size()), "missing cos/sin for a layer");
            auto x = rms_norm(h, l.in_norm, eps_, offset_);
            auto qkv = l.qkv.apply(x).view({B, heads_ + 2 * kv_, dim_});
            auto q = qkv.narrow(1, 0, heads_), k = qkv.narrow(1, heads_, kv_), v = qkv.narrow(1, heads_ + kv_, kv_);
            if (l.q_norm) {
                q = rms_norm(q, *l.q_norm, eps_, offset_);
                k = rms_norm(k, *l.k_norm, eps_, offset_);
            }
            auto attn = decode_attention(q, k, v, cos[l.rope], sin[l.rope], k_caches[i], v_caches[i], slots, positions,
                                         scale_, l.window);
            auto o = l.o.apply(attn);
            if (l.pre_ff_norm) {  // Gemma 3: norms after attention and around the MLP
                h.add_(rms_norm(o, l.post_attn_norm, eps_, offset_));
                auto m = mlp(l, rms_norm(h, *l.pre_ff_norm, eps_, offset_));
                h.add_(rms_norm(m, *l.post_ff_norm, eps_, offset_));
            } else {
                h.add_(o);
                h.add_(mlp(l, rms_norm(h, l.post_attn_norm, eps_, offset_)));
            }
        }
        return h;
    }

private:
    torch::Tensor mlp(const Layer& l, const torch::Tensor& x) const {
        return l.down.apply(gated_act(l.gate_up.apply(x), act_));
    }

    std::vector<Layer> layers_;
    int64_t heads_, kv_, dim_;
    double eps_, offset_;
    int64_t act_;
    double scale_;
};

void register_decode_stack(pybind11::module& mod) {
    pybind11::class_<DecodeStack>(mod, "DecodeStack")
        .def(pybind11::init<const pybind11::list&, int64_t, int64_t, int64_t, double, double, int64_t, double>())
        .def("forward", &DecodeStack::forward, pybind11::call_guard<pybind11::gil_scoped_release>())
        // A deep-copied model gets no stack and builds its own over its own tensors on first use.
        .def("__deepcopy__", [](const DecodeStack&, const pybind11::dict&) { return pybind11::none(); });
}
