// Lantern's fused CPU ops for the decode step: RMSNorm, the gated activation, and single-token attention
// (RoPE, cache write and attention over the cache in one call). Each replaces a chain of small PyTorch ops
// whose dispatch cost, not arithmetic, dominated a decode step (measured: ~270 ops per token).
//
// Plain loops; the hot inner loops are compiled for AVX-512, AVX2 and baseline x86-64 (GCC target_clones
// picks one at load). Attention and the gated activation also have AVX-512 loops (`wide`), used while
// isa() == 2. Shapes: B rows, H query heads, KV key/value heads, D head_dim, S cache length.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "clones.h"

void parallel_rows(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);  // pool.cpp

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

// Rows of rms_norm and gated_act split over PyTorch's threads when there are many (a prefill) and at least this
// many; fewer (a decode step, batched or not) stay on the calling thread. An OpenMP region opened by a decode step
// leaves its threads spinning beside the kernels' pool (pool.cpp) on the same cores, as MKL's did from RoPE (see
// fused.py's table): the gated activation of 8 rows at MLP width 8192 (16384 / 8192 = a grain of 2 rows) took a
// 1B-shape batched decode step (99 ms of products) from 111 to 167-173 ms.
constexpr int64_t SERIAL_ROWS = 64;

inline int64_t row_grain(int64_t width) { return std::max<int64_t>(SERIAL_ROWS, 16384 / std::max<int64_t>(width, 1)); }

void check_f32(const torch::Tensor& t, const char* name) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32, name, ": float32 on the CPU");
}

}  // namespace

int64_t isa();  // quant_cpu.cpp: 2 while the AVX-512 kernels are in use

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl")
namespace {
namespace wide {

// e^x, 16 lanes: x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts, so n ln2 is exact), e^r by its Taylor
// series to r^7 (truncation under 1e-8 relative), times 2^n by scalef. x is clamped to [-104, 88.7]: below, e^x
// is under float's smallest subnormal and scalef gives 0; above, float's largest value.
inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(88.7f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
    for (const float c : {1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f})
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    return _mm512_scalef_ps(p, n);
}

// One row of act(g) * u, 16 lanes at a time. Both activations are g * sigmoid(a): SiLU with a = g, and the
// tanh-approximated GELU, 0.5 g (1 + tanh(z)), with a = 2z (1 + tanh(z) = 2 sigmoid(2z)). On a decode step the
// scalar expf/tanhf were 7% of the calling thread's time (Gemma-3 shapes, GELU).
void gated_row(const float* g, const float* u, float* o, int64_t n, int64_t act) {
    const __m512 one = _mm512_set1_ps(1.0f), k = _mm512_set1_ps(2.0f * 0.7978845608028654f),
                 c = _mm512_set1_ps(0.044715f);
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = n - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1);
        const __m512 x = _mm512_maskz_loadu_ps(m, g + i);
        const __m512 a = act == 0 ? x : _mm512_mul_ps(k, _mm512_fmadd_ps(_mm512_mul_ps(c, x), _mm512_mul_ps(x, x), x));
        const __m512 y = _mm512_div_ps(x, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), a))));
        _mm512_mask_storeu_ps(o + i, m, _mm512_mul_ps(y, _mm512_maskz_loadu_ps(m, u + i)));
    }
}

}  // namespace wide
}  // namespace
#pragma GCC pop_options
#define LANTERN_WIDE 1
#endif

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
    // Rows split over PyTorch's threads when there are many (a prefill; a decode step's rows stay on one: see
    // SERIAL_ROWS): these ops sit between oneDNN matmuls, whose threads they share (see dequantize in quant_cpu.cpp).
    at::parallel_for(0, rows, row_grain(n), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; r++)
            rms_row(xp + r * n, wp, static_cast<float>(offset), static_cast<float>(eps), op + r * n, n);
    });
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
    const bool wide_ok = isa() == 2;
    at::parallel_for(0, rows, row_grain(inter), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; r++) {  // rows split as in rms_norm
            const float* g = xp + r * two_i;
            const float* u = g + inter;
            float* o = op + r * inter;
#ifdef LANTERN_WIDE
            if (wide_ok) {
                wide::gated_row(g, u, o, inter, act);
                continue;
            }
#endif
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
    });
    return out;
}

// ---- single-token attention ----
//
// A decode step attends one new query per sequence over that sequence's cached keys and values. The cache is
// either contiguous per sequence (slots, KV, S, D) or paged: per layer a pool of fixed-size blocks, K and V each
// (num_blocks, KV, bs, D), float32 or bfloat16, and per sequence a block table mapping its logical block i
// (positions i*bs .. i*bs+bs-1) to a physical block. Block tables are (B, max_blocks) int32 or int64; entries for
// blocks wholly before the attention window may be -1 (released) and are never read. Both caches hand the same
// core (`attend_all`) the runs of rows a sequence's window covers, so a float32 paged cache gives the contiguous
// cache's numbers exactly.

namespace {

// bfloat16 is the top half of a float32: widening is a shift, narrowing rounds to nearest even (as torch's
// .to(torch.bfloat16), including its one quiet NaN).
inline float bf16_to_f32(uint16_t h) {
    const uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

inline uint16_t f32_to_bf16(float f) {
    if (std::isnan(f)) return 0x7FC0;
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

LANTERN_CLONES float dot_bf16(const float* a, const uint16_t* b, int64_t n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; i++) s += a[i] * bf16_to_f32(b[i]);
    return s;
}

LANTERN_CLONES void axpy_bf16(float a, const uint16_t* x, float* y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += a * bf16_to_f32(x[i]);
}

// One element type per cache: float32 rows through dot/axpy, bfloat16 rows through the widening ones.
inline float row_dot(const float* q, const float* k, int64_t n) { return dot(q, k, n); }
inline float row_dot(const float* q, const uint16_t* k, int64_t n) { return dot_bf16(q, k, n); }
inline void row_axpy(float a, const float* v, float* o, int64_t n) { axpy(a, v, o, n); }
inline void row_axpy(float a, const uint16_t* v, float* o, int64_t n) { axpy_bf16(a, v, o, n); }
inline void row_store(const float* x, float* dst, int64_t n) { std::copy(x, x + n, dst); }
inline void row_store(const float* x, uint16_t* dst, int64_t n) {
    for (int64_t i = 0; i < n; i++) dst[i] = f32_to_bf16(x[i]);
}

// Rotate-half RoPE on the first `rot` dims of one head, the rest copied.
void rope_head(const float* x, const float* c, const float* s, float* o, int64_t rot, int64_t d) {
    const int64_t half = rot / 2;
    for (int64_t i = 0; i < half; i++) {
        o[i] = x[i] * c[i] - x[i + half] * s[i];
        o[i + half] = x[i + half] * c[i + half] + x[i] * s[i + half];
    }
    for (int64_t i = rot; i < d; i++) o[i] = x[i];
}

// The hardware prefetcher follows a run of rows but not the jump to the next block; ask for that block's
// rows while reading this one's.
template <typename T>
inline void prefetch_row(const T* p, int64_t n) {
    for (int64_t at = 0; at < n * static_cast<int64_t>(sizeof(T)); at += 64)
        __builtin_prefetch(reinterpret_cast<const char*>(p) + at);
}

// n consecutive cached positions of one sequence and one KV head: their K and V rows start at k and v, D apart.
template <typename T>
struct Span {
    const T* k;
    const T* v;
    int64_t n;
};

// Each of G rows of scores (G, n), in place: softmax, then divided by its sum.
void softmax_rows(float* s, int64_t G, int64_t n) {
    for (int64_t h = 0; h < G; h++, s += n) {
        const float mx = *std::max_element(s, s + n);
        float total = 0.0f;
        for (int64_t j = 0; j < n; j++) total += (s[j] = std::exp(s[j] - mx));
        const float inv = 1.0f / total;
        for (int64_t j = 0; j < n; j++) s[j] *= inv;
    }
}

// G query heads q (G, D), rotated, that share one KV head, over the n positions of `spans` (in order); out gets
// the heads' outputs, D apart; s is scratch for (G, n) scores. These loops take one head at a time, a dot
// product or an axpy per cached row (compiled for each instruction set by target_clones).
template <typename T>
void attend_rows(const float* q, int64_t G, int64_t D, const std::vector<Span<T>>& spans, int64_t n, float scale,
                 float* s, float* out) {
    for (int64_t h = 0; h < G; h++) {
        int64_t j = 0;
        for (size_t i = 0; i < spans.size(); i++) {
            const T* next = i + 1 < spans.size() ? spans[i + 1].k : nullptr;
            for (int64_t r = 0; r < spans[i].n; r++, j++) {
                if (next) prefetch_row(next + r * D, D);
                s[h * n + j] = row_dot(q + h * D, spans[i].k + r * D, D) * scale;
            }
        }
    }
    softmax_rows(s, G, n);
    for (int64_t h = 0; h < G; h++) {
        float* o = out + h * D;
        std::fill(o, o + D, 0.0f);
        int64_t j = 0;
        for (size_t i = 0; i < spans.size(); i++) {
            const T* next = i + 1 < spans.size() ? spans[i + 1].v : nullptr;
            for (int64_t r = 0; r < spans[i].n; r++, j++) {
                if (next) prefetch_row(next + r * D, D);
                row_axpy(s[h * n + j], spans[i].v + r * D, o, D);
            }
        }
    }
}

}  // namespace

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl")
namespace {
namespace wide {

// The same attention for D a multiple of 16, in AVX-512 registers: each cached row is loaded once for all G heads
// (G <= 4), and the outputs stay in registers across the rows instead of being read and written per row. On the
// default model's 8-stream decode the per-row dot/axpy calls above took ~20% of a step.

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// The sums of 4 vectors' lanes, as the 4 lanes of one: pairs first within 128-bit lanes, then the four lanes.
inline __m128 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
    const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));  // a02 b02 a13 b13 per lane
    const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    const __m512 x = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xEE));  // a b c d
    const __m256 y = _mm256_add_ps(_mm512_castps512_ps256(x),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
    return _mm_add_ps(_mm256_castps256_ps128(y), _mm256_extractf128_ps(y, 1));
}

// Scores of G heads against 4 keys k[0..3] (rows j..j+3; only the first `count` are stored): 4G accumulators
// of 16-lane partial sums over D, each key piece loaded once for all G heads, then one sum4 per head.
template <int G, typename T>
inline void score_tile(const float* q, int64_t D, const T* const* k, float scale, float* s, int64_t n, int64_t j,
                       int count) {
    __m512 acc[G][4];
    for (int h = 0; h < G; h++)
        for (int p = 0; p < 4; p++) acc[h][p] = _mm512_setzero_ps();
    for (int64_t c = 0; c < D; c += 16) {
        __m512 kc[4];
        for (int p = 0; p < 4; p++) kc[p] = load16(k[p] + c);
        for (int h = 0; h < G; h++) {
            const __m512 qh = _mm512_loadu_ps(q + h * D + c);
            for (int p = 0; p < 4; p++) acc[h][p] = _mm512_fmadd_ps(qh, kc[p], acc[h][p]);
        }
    }
    const __m128 sc = _mm_set1_ps(scale);
    for (int h = 0; h < G; h++)
        _mm_mask_storeu_ps(s + h * n + j, static_cast<__mmask8>((1u << count) - 1),
                           _mm_mul_ps(sum4(acc[h][0], acc[h][1], acc[h][2], acc[h][3]), sc));
}

// s (G, n) = q_h . k_j * scale, four cached rows at a time (a tile may straddle two spans).
template <int G, typename T>
void scores(const float* q, int64_t D, const std::vector<Span<T>>& spans, int64_t n, float scale, float* s) {
    const T* tile[4];
    int m = 0;
    int64_t j = 0;
    for (size_t i = 0; i < spans.size(); i++) {
        const T* next = i + 1 < spans.size() ? spans[i + 1].k : nullptr;
        const T* k = spans[i].k;
        for (int64_t r = 0; r < spans[i].n; r++, j++, k += D) {
            if (next) prefetch_row(next + r * D, D);
            tile[m++] = k;
            if (m == 4) {
                score_tile<G>(q, D, tile, scale, s, n, j - 3, 4);
                m = 0;
            }
        }
    }
    if (m > 0) {
        for (int p = m; p < 4; p++) tile[p] = tile[m - 1];  // repeats of a real row, not stored
        score_tile<G>(q, D, tile, scale, s, n, j - m, m);
    }
}

// out[h][c .. c + 16 C) = sum over rows j, in order, of p[h][j] * v_j[c .. c + 16 C).
template <int G, int C, typename T>
void weighted(const float* p, int64_t D, int64_t c, const std::vector<Span<T>>& spans, int64_t n, float* out) {
    __m512 acc[G][C];
    for (int h = 0; h < G; h++)
        for (int u = 0; u < C; u++) acc[h][u] = _mm512_setzero_ps();
    int64_t j = 0;
    for (size_t i = 0; i < spans.size(); i++) {
        const T* next = c == 0 && i + 1 < spans.size() ? spans[i + 1].v : nullptr;  // the first pass fetches
        const T* v = spans[i].v + c;
        for (int64_t r = 0; r < spans[i].n; r++, j++, v += D) {
            if (next) prefetch_row(next + r * D, D);
            __m512 x[C];
            for (int u = 0; u < C; u++) x[u] = load16(v + 16 * u);
            for (int h = 0; h < G; h++) {
                const __m512 w = _mm512_set1_ps(p[h * n + j]);
                for (int u = 0; u < C; u++) acc[h][u] = _mm512_fmadd_ps(w, x[u], acc[h][u]);
            }
        }
    }
    for (int h = 0; h < G; h++)
        for (int u = 0; u < C; u++) _mm512_storeu_ps(out + h * D + c + 16 * u, acc[h][u]);
}

// softmax_rows, 16 scores at a time (the scalar exp was a quarter of the attention's time).
void softmax(float* s, int64_t G, int64_t n) {
    const __m512 lowest = _mm512_set1_ps(-INFINITY);
    for (int64_t h = 0; h < G; h++, s += n) {
        __m512 m = lowest;
        for (int64_t j = 0; j < n; j += 16) {
            const __mmask16 k = n - j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - j)) - 1);
            m = _mm512_max_ps(m, _mm512_mask_loadu_ps(lowest, k, s + j));
        }
        const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(m));
        __m512 sum = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; j += 16) {
            const __mmask16 k = n - j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - j)) - 1);
            const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + j), mx));
            _mm512_mask_storeu_ps(s + j, k, e);
            sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(k, e));
        }
        const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
        for (int64_t j = 0; j < n; j += 16) {
            const __mmask16 k = n - j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - j)) - 1);
            _mm512_mask_storeu_ps(s + j, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, s + j), inv));
        }
    }
}

template <int G, typename T>
void attend(const float* q, int64_t D, const std::vector<Span<T>>& spans, int64_t n, float scale, float* s,
            float* out) {
    scores<G>(q, D, spans, n, scale, s);
    softmax(s, G, n);
    // 64 dims at a time (4G <= 16 accumulators, independent chains), then what remains of D
    int64_t c = 0;
    for (; c + 64 <= D; c += 64) weighted<G, 4>(s, D, c, spans, n, out);
    if (c + 32 <= D) weighted<G, 2>(s, D, c, spans, n, out), c += 32;
    if (c < D) weighted<G, 1>(s, D, c, spans, n, out);
}

}  // namespace wide
}  // namespace
#pragma GCC pop_options
#endif

namespace {

constexpr int64_t MAX_RUN = 4;  // query heads attended together (sharing their KV head's rows)
std::atomic<int64_t> LAST_ATTENTION_PATH{0};

// One run of G <= MAX_RUN heads: the AVX-512 registers where they are in use and D allows, else the loops.
template <typename T>
void attend_run(const float* q, int64_t G, int64_t D, const std::vector<Span<T>>& spans, int64_t n, float scale,
                float* s, float* out, bool wide_ok) {
#ifdef LANTERN_WIDE
    if (wide_ok) {
        switch (G) {
            case 1: return wide::attend<1>(q, D, spans, n, scale, s, out);
            case 2: return wide::attend<2>(q, D, spans, n, scale, s, out);
            case 3: return wide::attend<3>(q, D, spans, n, scale, s, out);
            default: return wide::attend<4>(q, D, spans, n, scale, s, out);
        }
    }
#endif
    attend_rows(q, G, D, spans, n, scale, s, out);
}

// Attention for every (row b, head h) of q (B, H, D), as tasks t = b * H + h split over the kernels' threads. A
// task range's consecutive heads of one row that share a KV head run together (at most MAX_RUN), so their keys
// and values are read once. spans_of(b, g, spans) fills row b's runs of cached rows for KV head g and returns
// their positions in all; q is rotated here by row b's cos/sin (rot each). op: (B, H * D).
template <typename T, typename SpansOf>
void attend_all(const torch::Tensor& q, const float* cp, const float* sp, int64_t rot, int64_t KV, float scale,
                int64_t longest, const SpansOf& spans_of, float* op) {
    const int64_t B = q.size(0), H = q.size(1), D = q.size(2), group = H / KV;
    const bool wide_ok = isa() == 2 && D % 16 == 0;
    LAST_ATTENTION_PATH = wide_ok ? 2 : 1;
    const float* qp = q.data_ptr<float>();
    // Threads only pay off on long caches (the work per (row, head) grows with the cached length).
    parallel_rows(B * H, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, longest * D)), [&](int64_t t0, int64_t t1) {
        std::vector<float> qr(MAX_RUN * D), scores;
        std::vector<Span<T>> spans;
        for (int64_t t = t0; t < t1;) {
            const int64_t b = t / H, h = t % H, g = h / group;
            const int64_t G = std::min({t1 - t, (g + 1) * group - h, MAX_RUN});
            for (int64_t i = 0; i < G; i++)
                rope_head(qp + b * q.stride(0) + (h + i) * q.stride(1), cp + b * rot, sp + b * rot, qr.data() + i * D,
                          rot, D);
            spans.clear();
            const int64_t n = spans_of(b, g, spans);
            scores.resize(G * n);
            attend_run(qr.data(), G, D, spans, n, scale, scores.data(), op + (b * H + h) * D, wide_ok);
            t += G;
        }
    });
}

}  // namespace

// The attention loops the last decode_attention(_paged) call ran: 0 none yet, 1 the per-row loops, 2 AVX-512
// registers (isa() == 2 and head_dim a multiple of 16).
int64_t last_attention_path() { return LAST_ATTENTION_PATH.load(); }

// One new token per row b: rotate q (B, H, D) and k (B, KV, D) by cos/sin (B, rot) (rotate-half convention,
// the first `rot` dims), write k and v (B, KV, D) into the caches (slots, KV, S, D) at row slots[b], position
// positions[b], then attend over that row's positions max(0, p - window + 1)..p. Returns (B, H * D).
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor k_cache,
                               torch::Tensor v_cache, const torch::Tensor& slots, const torch::Tensor& positions,
                               double scale, int64_t window) {
    for (const torch::Tensor* t : {&q, &k, &v, &cos, &sin, static_cast<const torch::Tensor*>(&k_cache),
                                   static_cast<const torch::Tensor*>(&v_cache)})
        check_f32(*t, "decode_attention input");
    TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q, k, v: (B, heads, D)");
    TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1, "q, k, v: unit stride in D");
    TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 4, "caches: contiguous 4-D");
    TORCH_CHECK(slots.scalar_type() == torch::kInt64 && positions.scalar_type() == torch::kInt64,
                "slots, positions: int64");
    const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KV = k.size(1), S = k_cache.size(2);
    const int64_t rot = cos.size(-1);
    TORCH_CHECK(H % KV == 0 && k_cache.size(1) == KV && k_cache.size(3) == D && rot <= D, "decode_attention shapes");
    auto cos_c = cos.reshape({B, rot}).contiguous(), sin_c = sin.reshape({B, rot}).contiguous();
    auto slots_c = slots.contiguous(), pos_c = positions.contiguous();
    const int64_t* slot = slots_c.data_ptr<int64_t>();
    const int64_t* pos = pos_c.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; b++)
        TORCH_CHECK(slot[b] >= 0 && slot[b] < k_cache.size(0) && pos[b] >= 0 && pos[b] < S,
                    "slot or position out of range");
    auto out = torch::empty({B, H * D}, q.options());
    if (B == 0) return out;
    float* kc = k_cache.data_ptr<float>();
    float* vc = v_cache.data_ptr<float>();
    const float* cp = cos_c.data_ptr<float>();
    const float* sp = sin_c.data_ptr<float>();
    // Write the new keys (rotated) and values first; attention below reads them back from the cache.
    for (int64_t b = 0; b < B; b++) {
        for (int64_t h = 0; h < KV; h++) {
            const int64_t at = ((slot[b] * KV + h) * S + pos[b]) * D;
            rope_head(k.data_ptr<float>() + b * k.stride(0) + h * k.stride(1), cp + b * rot, sp + b * rot, kc + at,
                      rot, D);
            const float* vs = v.data_ptr<float>() + b * v.stride(0) + h * v.stride(1);
            std::copy(vs, vs + D, vc + at);
        }
    }
    const int64_t longest = *std::max_element(pos, pos + B) + 1;
    attend_all<float>(q, cp, sp, rot, KV, static_cast<float>(scale), longest,
                      [&](int64_t b, int64_t g, std::vector<Span<float>>& spans) {
                          const int64_t last = pos[b];
                          const int64_t first = window > 0 ? std::max<int64_t>(0, last - window + 1) : 0;
                          const int64_t base = ((slot[b] * KV + g) * S + first) * D;
                          spans.push_back({kc + base, vc + base, last - first + 1});
                          return last - first + 1;
                      },
                      out.data_ptr<float>());
    return out;
}

namespace {

// A (B, max_blocks) block table of int32 or int64 entries, read as int64.
struct BlockTable {
    const int32_t* i32 = nullptr;
    const int64_t* i64 = nullptr;
    int64_t width = 0;
    int64_t at(int64_t b, int64_t i) const { return i32 ? i32[b * width + i] : i64[b * width + i]; }
};

template <typename T>
void paged_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const float* cp,
                     const float* sp, int64_t rot, T* kp, T* vp, const BlockTable& table, const int64_t* pos,
                     int64_t bs, float scale, int64_t window, float* op) {
    const int64_t B = q.size(0), D = q.size(2), KV = k.size(1);
    // (physical block, kv head, offset) -> first element of that row in a pool
    auto row = [&](int64_t block, int64_t h, int64_t off) { return ((block * KV + h) * bs + off) * D; };
    // Write the new keys (rotated) and values first; attention below reads them back from the pool.
    std::vector<float> kr(D);
    for (int64_t b = 0; b < B; b++) {
        const int64_t at_block = table.at(b, pos[b] / bs), off = pos[b] % bs;
        for (int64_t h = 0; h < KV; h++) {
            rope_head(k.data_ptr<float>() + b * k.stride(0) + h * k.stride(1), cp + b * rot, sp + b * rot, kr.data(),
                      rot, D);
            row_store(kr.data(), kp + row(at_block, h, off), D);
            row_store(v.data_ptr<float>() + b * v.stride(0) + h * v.stride(1), vp + row(at_block, h, off), D);
        }
    }
    const int64_t longest = *std::max_element(pos, pos + B) + 1;
    // positions first..last: in each block they touch, a run of consecutive rows
    attend_all<T>(q, cp, sp, rot, KV, scale, longest,
                  [&](int64_t b, int64_t g, std::vector<Span<T>>& spans) {
                      const int64_t last = pos[b];
                      const int64_t first = window > 0 ? std::max<int64_t>(0, last - window + 1) : 0;
                      for (int64_t lb = first / bs; lb <= last / bs; lb++) {
                          const int64_t j0 = std::max(first, lb * bs), j1 = std::min(last, lb * bs + bs - 1);
                          const int64_t at = row(table.at(b, lb), g, j0 - lb * bs);
                          spans.push_back({kp + at, vp + at, j1 - j0 + 1});
                      }
                      return last - first + 1;
                  },
                  op);
}

}  // namespace

// decode_attention over a paged cache: rotate q (B, H, D) and k (B, KV, D) by cos/sin (B, rot), write k and
// v (B, KV, D) into the pools (num_blocks, KV, bs, D) at block block_tables[b][p / bs], offset p % bs, with
// p = positions[b] (rounded to nearest even when the pools are bfloat16), then attend over positions
// max(0, p - window + 1)..p (window <= 0: all), each read through the table. Returns (B, H * D) float32;
// with float32 pools the numbers are decode_attention's exactly.
torch::Tensor decode_attention_paged(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                     const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor k_pool,
                                     torch::Tensor v_pool, const torch::Tensor& block_tables,
                                     const torch::Tensor& positions, double scale, int64_t window) {
    for (const torch::Tensor* t : {&q, &k, &v, &cos, &sin}) check_f32(*t, "decode_attention_paged: q, k, v, cos, sin");
    TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "decode_attention_paged: q, k, v must be (B, heads, D)");
    TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1,
                "decode_attention_paged: q, k, v need unit stride in D");
    const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KV = k.size(1);
    TORCH_CHECK(KV > 0 && H % KV == 0 && k.size(0) == B && v.size(0) == B && v.size(1) == KV && k.size(2) == D &&
                v.size(2) == D,
                "decode_attention_paged: q (B, H, D), k and v (B, KV, D) with H a multiple of KV; got q ", q.sizes(),
                ", k ", k.sizes(), ", v ", v.sizes());
    const int64_t rot = cos.size(-1);
    TORCH_CHECK(rot <= D && rot % 2 == 0 && cos.numel() == B * rot && sin.numel() == B * rot,
                "decode_attention_paged: cos and sin must be (B, rot) with rot even and <= D; got ", cos.sizes(),
                " and ", sin.sizes());
    const auto dtype = k_pool.scalar_type();
    TORCH_CHECK(k_pool.device().is_cpu() && v_pool.device().is_cpu() &&
                (dtype == torch::kFloat32 || dtype == torch::kBFloat16),
                "decode_attention_paged: the pools must be float32 or bfloat16 on the CPU; k_pool is ", dtype);
    TORCH_CHECK(v_pool.scalar_type() == dtype,
                "decode_attention_paged: k_pool and v_pool must have the same dtype; got ", dtype, " and ",
                v_pool.scalar_type());
    TORCH_CHECK(k_pool.dim() == 4 && k_pool.sizes() == v_pool.sizes() && k_pool.size(1) == KV && k_pool.size(3) == D,
                "decode_attention_paged: k_pool and v_pool must both be (num_blocks, KV=", KV, ", block_size, D=", D,
                "); got ", k_pool.sizes(), " and ", v_pool.sizes());
    TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous(),
                "decode_attention_paged: the pools must be contiguous");
    const int64_t num_blocks = k_pool.size(0), bs = k_pool.size(2);
    TORCH_CHECK(bs > 0, "decode_attention_paged: block_size must be positive");
    TORCH_CHECK(block_tables.device().is_cpu() && block_tables.dim() == 2 && block_tables.size(0) == B &&
                (block_tables.scalar_type() == torch::kInt32 || block_tables.scalar_type() == torch::kInt64),
                "decode_attention_paged: block_tables must be (B=", B, ", max_blocks) int32 or int64 on the CPU; got ",
                block_tables.sizes(), " ", block_tables.scalar_type());
    TORCH_CHECK(positions.device().is_cpu() && positions.scalar_type() == torch::kInt64 && positions.numel() == B,
                "decode_attention_paged: positions must be (B=", B, ",) int64");
    auto table_c = block_tables.contiguous(), pos_c = positions.contiguous();
    BlockTable table;
    table.width = table_c.size(1);
    if (table_c.scalar_type() == torch::kInt32) table.i32 = table_c.data_ptr<int32_t>();
    else table.i64 = table_c.data_ptr<int64_t>();
    const int64_t* pos = pos_c.data_ptr<int64_t>();
    // Every block that is written or read must be a real block; the ones before the window are never touched.
    for (int64_t b = 0; b < B; b++) {
        const int64_t p = pos[b];
        TORCH_CHECK(p >= 0 && p < table.width * bs, "decode_attention_paged: positions[", b, "] = ", p,
                    " is outside the block table's 0..", table.width * bs - 1, " (", table.width, " blocks of ", bs,
                    ")");
        const int64_t first = window > 0 ? std::max<int64_t>(0, p - window + 1) : 0;
        for (int64_t i = first / bs; i <= p / bs; i++) {
            const int64_t e = table.at(b, i);
            TORCH_CHECK(e >= 0 && e < num_blocks, "decode_attention_paged: block_tables[", b, "][", i, "] = ", e,
                        " is not a block of the pool (0..", num_blocks - 1, ") but row ", b,
                        " reads or writes positions ", std::max(first, i * bs), "..", std::min(p, i * bs + bs - 1),
                        " there", e == -1 ? " (a released block inside the attention window)" : "");
        }
    }
    auto cos_c = cos.reshape({B, rot}).contiguous(), sin_c = sin.reshape({B, rot}).contiguous();
    auto out = torch::empty({B, H * D}, q.options());
    if (B == 0) return out;
    const float* cp = cos_c.data_ptr<float>();
    const float* sp = sin_c.data_ptr<float>();
    if (dtype == torch::kFloat32) {
        paged_attention<float>(q, k, v, cp, sp, rot, k_pool.data_ptr<float>(), v_pool.data_ptr<float>(), table, pos, bs,
                               static_cast<float>(scale), window, out.data_ptr<float>());
    } else {
        paged_attention<uint16_t>(q, k, v, cp, sp, rot, reinterpret_cast<uint16_t*>(k_pool.data_ptr<at::BFloat16>()),
                                  reinterpret_cast<uint16_t*>(v_pool.data_ptr<at::BFloat16>()), table, pos, bs,
                                  static_cast<float>(scale), window, out.data_ptr<float>());
    }
    return out;
}

// ---- the whole decoder stack for one decode step, in one call ----

torch::Tensor qmatmul(const torch::Tensor& x, const torch::Tensor& qs, const c10::optional<torch::Tensor>& d,
                      const c10::optional<torch::Tensor>& m, int64_t kind);
torch::Tensor qmatmul_parts(const torch::Tensor& x, const std::vector<torch::Tensor>& qs,
                            const std::vector<c10::optional<torch::Tensor>>& d,
                            const std::vector<c10::optional<torch::Tensor>>& m, const std::vector<int64_t>& kinds);

namespace {

struct QWeight {  // one QuantLinear: blocks (or a float kind's plain matrix, with no d) plus an optional bias
    torch::Tensor qs;
    c10::optional<torch::Tensor> d, m, bias;
    int64_t kind;
    torch::Tensor apply(const torch::Tensor& x) const {
        auto y = qmatmul(x, qs, d, m, kind);
        if (bias) y.add_(*bias);
        return y;
    }
};

// One product, or several whose outputs are concatenated (q, k, v or gate, up kept apart when their blocks
// differ in kind, as in Q4_K_M files): block kinds in one qmatmul_parts call, float kinds one by one.
struct QWeights {
    std::vector<QWeight> parts;
    std::vector<torch::Tensor> qs;
    std::vector<c10::optional<torch::Tensor>> d, m;
    std::vector<int64_t> kinds;
    bool blocks = false;  // every part has a block kind (float kinds have no scales d)

    void add(QWeight w) {
        qs.push_back(w.qs);
        d.push_back(w.d);
        m.push_back(w.m);
        kinds.push_back(w.kind);
        parts.push_back(std::move(w));
        blocks = std::all_of(parts.begin(), parts.end(), [](const QWeight& p) { return p.d.has_value(); });
    }

    torch::Tensor apply(const torch::Tensor& x) const {
        if (parts.size() == 1) return parts[0].apply(x);
        if (blocks) {
            auto y = qmatmul_parts(x, qs, d, m, kinds);
            int64_t at = 0;
            for (const auto& p : parts) {
                const int64_t n = p.qs.size(0);
                if (p.bias) y.narrow(-1, at, n).add_(*p.bias);
                at += n;
            }
            return y;
        }
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
    if (!w["d"].is_none()) q.d = w["d"].cast<torch::Tensor>();
    if (!w["m"].is_none()) q.m = w["m"].cast<torch::Tensor>();
    if (!w["bias"].is_none()) q.bias = w["bias"].cast<torch::Tensor>();
    q.kind = w["kind"].cast<int64_t>();
    return q;
}

QWeights qweights(const pybind11::list& parts) {
    QWeights q;
    for (const auto& part : parts) q.add(qweight(part.cast<pybind11::dict>()));
    return q;
}

c10::optional<torch::Tensor> optional_tensor(const pybind11::dict& d, const char* key) {
    if (!d.contains(key) || d[key].is_none()) return c10::nullopt;
    return d[key].cast<torch::Tensor>();
}

}  // namespace

// The decoder layers of a model whose linear layers are all QuantLinear (block or float kinds; q/k/v and
// gate/up fused or not), run for one new token per row without returning to Python between operations. Built
// once from the modules' tensors (shared, not copied); `forward` takes the hidden states after the embedding and returns them after the
// last layer (before the final norm). Mirrors DecoderLayer/Attention/MLP in model.py op for op.
//
// `allreduce` (None, or a Python callable) is for a tensor-parallel rank (distributed/shard.py): each rank holds
// some heads and MLP columns, so o_proj's and down_proj's outputs are partial sums that the callable sums over
// the ranks, in place, before the residual add. It is the only step that returns to Python, with the GIL taken
// for it; without it the stack never touches the GIL.
class DecodeStack {
public:
    DecodeStack(const pybind11::list& layers, int64_t heads, int64_t kv_heads, int64_t head_dim, double eps,
                double norm_offset, int64_t act, double scale, pybind11::object allreduce)
        : heads_(heads), kv_(kv_heads), dim_(head_dim), eps_(eps), offset_(norm_offset), act_(act), scale_(scale),
          allreduce_(std::move(allreduce)), sharded_(!allreduce_.is_none()) {
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
        return run(std::move(h), cos, sin, [&](size_t i, const Layer& l, const torch::Tensor& q, const torch::Tensor& k,
                                                const torch::Tensor& v) {
            return decode_attention(q, k, v, cos[l.rope], sin[l.rope], k_caches[i], v_caches[i], slots, positions,
                                    scale_, l.window);
        });
    }

    // forward over a paged cache: pools per layer (num_blocks, KV, bs, D), float32 or bfloat16; one block
    // table (B, max_blocks) int32 or int64 shared by all layers; positions (B,) int64.
    torch::Tensor forward_paged(torch::Tensor h, const std::vector<torch::Tensor>& cos,
                                const std::vector<torch::Tensor>& sin, const std::vector<torch::Tensor>& k_pools,
                                const std::vector<torch::Tensor>& v_pools, const torch::Tensor& block_tables,
                                const torch::Tensor& positions) const {
        TORCH_CHECK(k_pools.size() == layers_.size() && v_pools.size() == layers_.size(), "one pool pair per layer");
        return run(std::move(h), cos, sin, [&](size_t i, const Layer& l, const torch::Tensor& q, const torch::Tensor& k,
                                                const torch::Tensor& v) {
            return decode_attention_paged(q, k, v, cos[l.rope], sin[l.rope], k_pools[i], v_pools[i], block_tables,
                                          positions, scale_, l.window);
        });
    }

private:
    // The layers, with attend(layer index, layer, q, k, v) -> (B, H * D) as the attention over the cache.
    template <typename Attend>
    torch::Tensor run(torch::Tensor h, const std::vector<torch::Tensor>& cos, const std::vector<torch::Tensor>& sin,
                      const Attend& attend) const {
        TORCH_CHECK(cos.size() == sin.size(), "one sin per cos");
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
            auto attn = attend(i, l, q, k, v);
            auto o = l.o.apply(attn);
            sum_over_ranks(o);
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

    torch::Tensor mlp(const Layer& l, const torch::Tensor& x) const {
        auto y = l.down.apply(gated_act(l.gate_up.apply(x), act_));
        sum_over_ranks(y);
        return y;
    }

    // A tensor-parallel rank's partial o_proj / down_proj output (B, C), summed over the ranks in place.
    void sum_over_ranks(torch::Tensor& t) const {
        if (!sharded_) return;
        pybind11::gil_scoped_acquire gil;
        allreduce_(t);
    }

    std::vector<Layer> layers_;
    int64_t heads_, kv_, dim_;
    double eps_, offset_;
    int64_t act_;
    double scale_;
    pybind11::object allreduce_;  // None unless tensor-parallel
    bool sharded_;                // read without the GIL
};

void register_decode_stack(pybind11::module& mod) {
    pybind11::class_<DecodeStack>(mod, "DecodeStack")
        .def(pybind11::init<const pybind11::list&, int64_t, int64_t, int64_t, double, double, int64_t, double,
                            pybind11::object>(),
             pybind11::arg("layers"), pybind11::arg("heads"), pybind11::arg("kv_heads"), pybind11::arg("head_dim"),
             pybind11::arg("eps"), pybind11::arg("norm_offset"), pybind11::arg("act"), pybind11::arg("scale"),
             pybind11::arg("allreduce") = pybind11::none())
        .def("forward", &DecodeStack::forward, pybind11::call_guard<pybind11::gil_scoped_release>())
        .def("forward_paged", &DecodeStack::forward_paged, pybind11::call_guard<pybind11::gil_scoped_release>())
        // A deep-copied model gets no stack and builds its own over its own tensors on first use.
        .def("__deepcopy__", [](const DecodeStack&, const pybind11::dict&) { return pybind11::none(); });
    // Registered here because quant_cpu.cpp's module definition calls this function for decode_cpu.cpp.
    // It touches no Python object, so other Python threads run meanwhile.
    mod.def("decode_attention_paged", &decode_attention_paged,
            "decode_attention over a paged cache: pools (num_blocks, KV, block_size, D) float32 or bfloat16, "
            "block_tables (B, max_blocks) int32/int64, positions (B,) int64 -> (B, H*D)",
            pybind11::call_guard<pybind11::gil_scoped_release>());
    mod.def("last_attention_path", &last_attention_path,
            "the loops of the last decode attention: 0 none yet, 1 per-row dot/axpy, 2 AVX-512 registers");
}
