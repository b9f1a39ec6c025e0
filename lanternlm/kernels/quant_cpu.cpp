// Lantern's CPU kernels for linear layers whose weights stay quantized in 32-element blocks.
//
// Built at run time by lanternlm/kernels/__init__.py through torch.utils.cpp_extension and cached there.
// The weights come in one "split block" layout that kernels/blocks.py repacks ggml's Q4_0/Q4_1/Q8_0 (and,
// through them, other types) into without changing a value:
//   qs (N, K/2) uint8 for 4-bit kinds: block i of a row is bytes 16i..16i+15, byte j = element j in its low
//      nibble and element j+16 in its high nibble (ggml's order); (N, K) int8 for the 8-bit kind;
//   d (N, K/32) float16, one scale per block; m (N, K/32) float16, one offset per block (KIND_Q4_MIN only).
// A weight is d*q + m, with m = -8d for KIND_Q4 (ggml Q4_0) and m = 0 for KIND_Q8.
//
// Activations are quantized per 32 values to int16 (scale dx = max|x|/32767, values qx) first, so each
// block's product is an integer dot product scaled once:
//   sum_i (d*q_i + m) * dx*qx_i = d*dx * sum(q_i*qx_i) + m * dx*sum(qx).
// int16 keeps the activations' rounding error (at most max|x|/65534 per value) far below the weights' own,
// so the results are those of the float32 reference up to summation order. (8-bit activations, as
// llama.cpp uses, are cheaper but flip close greedy choices on small models: SmolLM2-135M answers
// "L'Étoile, ..." instead of "The capital of France is Paris." with them, llama.cpp included.)
//
// Two instruction sets are compiled from this file and picked once at load from CPUID: AVX-512 VNNI (a block
// per 512-bit register, the int16 dot product and accumulation in one instruction) and AVX2+FMA. Non-x86
// builds and CPUs without AVX2 report isa() == 0, and the Python side keeps PyTorch's kernels.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <vector>

void parallel_rows(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);  // pool.cpp

namespace {

constexpr int64_t KIND_Q4_MIN = 0;  // 4-bit, stored offset m (ggml Q4_1, Q4_K)
constexpr int64_t KIND_Q4 = 1;      // 4-bit, m = -8d (ggml Q4_0)
constexpr int64_t KIND_Q8 = 2;      // 8-bit signed, m = 0 (ggml Q8_0; other types requantized)

// Quantized activations for `rows` rows of K values, blocks padded to a multiple of 16 with zeros.
struct XQuant {
    int64_t blocks;            // padded block count per row
    std::vector<int16_t> q;    // rows * blocks * 32
    std::vector<float> d;      // rows * blocks: the scale dx
    std::vector<float> s;      // rows * blocks: dx * sum(qx)
    XQuant(int64_t rows, int64_t k) : blocks((k / 32 + 15) / 16 * 16),
        q(rows * blocks * 32, 0), d(rows * blocks, 0.0f), s(rows * blocks, 0.0f) {}
};

}  // namespace

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {

inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// One block of 32 floats -> 32 int16 (round to nearest even), dx = max|x| / 32767 and dx * sum(q).
inline void quantize_block(const float* x, int16_t* out, float* d_out, float* s_out) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    for (int j = 0; j < 4; j++) {
        v[j] = _mm256_loadu_ps(x + 8 * j);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    const float maxabs = _mm_cvtss_f32(m);
    const __m256 inv = _mm256_set1_ps(maxabs != 0.0f ? 32767.0f / maxabs : 0.0f);
    __m256i sum = _mm256_setzero_si256();
    for (int j = 0; j < 4; j += 2) {
        const __m256i a = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[j], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        const __m256i b = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[j + 1], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        sum = _mm256_add_epi32(sum, _mm256_add_epi32(a, b));
        // 16 int32 -> 16 int16; packs works per 128-bit lane, so a permute restores element order
        const __m256i q = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 8 * j), q);
    }
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    s = _mm_hadd_epi32(s, s);
    s = _mm_hadd_epi32(s, s);
    const float d = maxabs / 32767.0f;
    *d_out = d;
    *s_out = d * static_cast<float>(_mm_cvtsi128_si32(s));
}

void quantize_rows(const float* x, int64_t rows, int64_t k, XQuant& xq) {
    const int64_t nb = k / 32;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < nb; i++)
            quantize_block(x + r * k + 32 * i, xq.q.data() + (r * xq.blocks + i) * 32, &xq.d[r * xq.blocks + i],
                           &xq.s[r * xq.blocks + i]);
}

// A block's 32 weights as unsigned (4-bit) or signed (8-bit) bytes, in element order.
inline __m256i block_bytes(const uint8_t* row, int64_t i, int64_t kind) {
    if (kind == KIND_Q8) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 32 * i));
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * i));
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), _mm256_set1_epi8(0x0F));
}

inline __m256i widen(__m128i bytes, int64_t kind) {  // 16 bytes -> 16 int16
    return kind == KIND_Q8 ? _mm256_cvtepi8_epi16(bytes) : _mm256_cvtepu8_epi16(bytes);
}

// y[b, n] for n in [n0, n1) and all m activation rows, one block at a time.
void matmul_rows(const uint8_t* qs, const uint16_t* dw, const uint16_t* mw, int64_t kind, int64_t k,
                 const XQuant& xq, int64_t m, float* y, int64_t n_out, int64_t n0, int64_t n1) {
    const int64_t nb = k / 32;
    const int64_t row_bytes = kind == KIND_Q8 ? k : k / 2;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t* row = qs + n * row_bytes;
        for (int64_t b = 0; b < m; b++) {
            const int16_t* xr = xq.q.data() + b * xq.blocks * 32;
            const float* xd = xq.d.data() + b * xq.blocks;
            const float* xs = xq.s.data() + b * xq.blocks;
            __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
            float madd = 0.0f;
            for (int64_t i = 0; i < nb; i++) {
                const float d = _cvtsh_ss(dw[n * nb + i]);
                const __m256i w = block_bytes(row, i, kind);
                const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + 32 * i));
                const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + 32 * i + 16));
                const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(widen(_mm256_castsi256_si128(w), kind), x0),
                                                   _mm256_madd_epi16(widen(_mm256_extracti128_si256(w, 1), kind), x1));
                if (kind != KIND_Q8) madd += (kind == KIND_Q4_MIN ? _cvtsh_ss(mw[n * nb + i]) : -8.0f * d) * xs[i];
                const __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * xd[i]));
                if (i & 1) acc1 = _mm256_add_ps(acc1, t); else acc0 = _mm256_add_ps(acc0, t);
            }
            y[b * n_out + n] = hsum8(_mm256_add_ps(acc0, acc1)) + madd;
        }
    }
}

// Rows of blocks -> float32 or bfloat16 (round to nearest even) values.
void dequantize_rows(const uint8_t* qs, const uint16_t* dw, const uint16_t* mw, int64_t kind, int64_t k,
                     int64_t r0, int64_t r1, float* out_f32, uint16_t* out_bf16) {
    const int64_t nb = k / 32;
    const int64_t row_bytes = kind == KIND_Q8 ? k : k / 2;
    for (int64_t r = r0; r < r1; r++) {
        for (int64_t i = 0; i < nb; i++) {
            const float d = _cvtsh_ss(dw[r * nb + i]);
            const float mo = kind == KIND_Q4_MIN ? _cvtsh_ss(mw[r * nb + i]) : kind == KIND_Q4 ? -8.0f * d : 0.0f;
            alignas(32) uint8_t q[32];
            _mm256_store_si256(reinterpret_cast<__m256i*>(q), block_bytes(qs + r * row_bytes, i, kind));
            for (int j = 0; j < 4; j++) {
                const __m128i b8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * j));
                const __m256i qi = kind == KIND_Q8 ? _mm256_cvtepi8_epi32(b8) : _mm256_cvtepu8_epi32(b8);
                const __m256 v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(qi), _mm256_set1_ps(d), _mm256_set1_ps(mo));
                const int64_t off = r * k + 32 * i + 8 * j;
                if (out_f32) {
                    _mm256_storeu_ps(out_f32 + off, v);
                } else {
                    __m256i bits = _mm256_castps_si256(v);
                    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
                    bits = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lsb), 16);
                    _mm_storeu_si128(reinterpret_cast<__m128i*>(out_bf16 + off),
                                     _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1)));
                }
            }
        }
    }
}

}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
namespace avx512 {

// A block's 32 weights as 32 int16 lanes.
template <int64_t KIND>
inline __m512i load_block(const uint8_t* row, int64_t i) {
    if (KIND == KIND_Q8)
        return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 32 * i)));
    // 16 bytes -> 16 int16 lanes, each holding a byte: its low nibbles are elements 0-15, high ones 16-31
    const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * i)));
    const __m256i lo = _mm256_and_si256(v, _mm256_set1_epi16(0x0F));
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), _mm256_srli_epi16(v, 4), 1);
}

// y[b, n..n+R-1] for the NB activation rows from b0. Each weight block is widened once and used for all NB
// activation rows; R weight rows at a time keep R*NB independent accumulator chains in flight and spread
// each row's fixed costs (scales, the final sum). The offset terms m * dx*sum(qx) go into the same
// accumulators, since only the sum of all lanes matters.
template <int64_t KIND, int R, int NB>
inline void rows_tile(const uint8_t* qs, const uint16_t* dw, const uint16_t* mw, int64_t k, const XQuant& xq,
                      int64_t b0, float* y, int64_t n_out, int64_t n) {
    const int64_t nb = k / 32;
    const int64_t row_bytes = KIND == KIND_Q8 ? k : k / 2;
    // Few rows at a time leave too few independent fmadd chains to hide their latency: then even and odd
    // blocks accumulate apart (S = 2).
    constexpr int S = R * NB <= 2 ? 2 : 1;
    __m512 acc[R][NB], acc_odd[R][NB];
    for (int r = 0; r < R; r++)
        for (int b = 0; b < NB; b++) acc[r][b] = acc_odd[r][b] = _mm512_setzero_ps();
    for (int64_t g = 0; g < nb; g += 16) {
        const int left = static_cast<int>(std::min<int64_t>(16, nb - g));
        const __mmask16 lm = static_cast<__mmask16>((1u << left) - 1);
        // Each block's scale d * dx, kept in memory so every block broadcasts its own with a load (a
        // register permute per block cost a shuffle-port operation, measured slower).
        alignas(64) float scale[R][NB][16];
        for (int r = 0; r < R; r++) {
            const int64_t wo = (n + r) * nb + g;
            const __m512 d16 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lm, dw + wo));
            for (int b = 0; b < NB; b++) {
                const int64_t xo = (b0 + b) * xq.blocks + g;
                _mm512_store_ps(scale[r][b], _mm512_mul_ps(d16, _mm512_loadu_ps(xq.d.data() + xo)));
                if (KIND != KIND_Q8) {
                    const __m512 m16 = KIND == KIND_Q4_MIN ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lm, mw + wo))
                                                           : _mm512_mul_ps(d16, _mm512_set1_ps(-8.0f));
                    acc[r][b] = _mm512_fmadd_ps(m16, _mm512_loadu_ps(xq.s.data() + xo), acc[r][b]);
                }
            }
        }
        for (int j = 0; j < left; j++) {
            const int64_t i = g + j;
            __m512i xv[NB];
            for (int b = 0; b < NB; b++)
                xv[b] = _mm512_loadu_si512(xq.q.data() + ((b0 + b) * xq.blocks + i) * 32);
            for (int r = 0; r < R; r++) {
                const __m512i w = load_block<KIND>(qs + (n + r) * row_bytes, i);
                for (int b = 0; b < NB; b++) {
                    const __m512 dot = _mm512_cvtepi32_ps(_mm512_dpwssd_epi32(_mm512_setzero_si512(), w, xv[b]));
                    if (S == 2 && (j & 1))
                        acc_odd[r][b] = _mm512_fmadd_ps(dot, _mm512_set1_ps(scale[r][b][j]), acc_odd[r][b]);
                    else
                        acc[r][b] = _mm512_fmadd_ps(dot, _mm512_set1_ps(scale[r][b][j]), acc[r][b]);
                }
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int b = 0; b < NB; b++) y[(b0 + b) * n_out + n + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][b], acc_odd[r][b]));
}

// Weight rows n..n+R-1 against all m activation rows, in tiles of NB activation rows.
template <int64_t KIND, int R>
inline void rows_block(const uint8_t* qs, const uint16_t* dw, const uint16_t* mw, int64_t k, const XQuant& xq,
                       int64_t m, float* y, int64_t n_out, int64_t n) {
    int64_t b0 = 0;
    for (; b0 + 4 <= m; b0 += 4) rows_tile<KIND, R, 4>(qs, dw, mw, k, xq, b0, y, n_out, n);
    switch (m - b0) {
        case 3: rows_tile<KIND, R, 3>(qs, dw, mw, k, xq, b0, y, n_out, n); break;
        case 2: rows_tile<KIND, R, 2>(qs, dw, mw, k, xq, b0, y, n_out, n); break;
        case 1: rows_tile<KIND, R, 1>(qs, dw, mw, k, xq, b0, y, n_out, n); break;
        default: break;
    }
}

template <int64_t KIND>
void rows_all(const uint8_t* qs, const uint16_t* dw, const uint16_t* mw, int64_t k, const XQuant& xq, int64_t m,
              float* y, int64_t n_out, int64_t n0, int64_t n1) {
    // Tiles measured on the project's VM: 4 rows for 4-bit matvecs, 2 for small batches; 8-bit weight rows
    // are as fast one at a time (4 at once was twice as slow on the 49152x576 lm_head).
    int64_t n = n0;
    if (KIND != KIND_Q8 && m <= 2) {
        for (; n + 4 <= n1; n += 4) rows_block<KIND, 4>(qs, dw, mw, k, xq, m, y, n_out, n);
    } else if (KIND != KIND_Q8) {
        for (; n + 2 <= n1; n += 2) rows_block<KIND, 2>(qs, dw, mw, k, xq, m, y, n_out, n);
    }
    for (; n < n1; n++) rows_block<KIND, 1>(qs, dw, mw, k, xq, m, y, n_out, n);
}

// Rows of blocks -> float32 or bfloat16 (round to nearest even), 16 values per instruction.
void dequantize_rows(const uint8_t* qs, const uint16_t* dw, const uint16_t* mw, int64_t kind, int64_t k,
                     int64_t r0, int64_t r1, float* out_f32, uint16_t* out_bf16) {
    const int64_t nb = k / 32;
    const int64_t row_bytes = kind == KIND_Q8 ? k : k / 2;
    for (int64_t r = r0; r < r1; r++) {
        for (int64_t i = 0; i < nb; i++) {
            const __m512 d = _mm512_set1_ps(_cvtsh_ss(dw[r * nb + i]));
            const __m512 mo = _mm512_set1_ps(kind == KIND_Q4_MIN ? _cvtsh_ss(mw[r * nb + i])
                                             : kind == KIND_Q4 ? -8.0f * _cvtsh_ss(dw[r * nb + i]) : 0.0f);
            __m512i half[2];  // elements 0-15 and 16-31 as int32
            if (kind == KIND_Q8) {
                const int8_t* q = reinterpret_cast<const int8_t*>(qs + r * row_bytes + 32 * i);
                half[0] = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
                half[1] = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16)));
            } else {
                const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + r * row_bytes + 16 * i));
                const __m512i b = _mm512_cvtepu8_epi32(v);
                half[0] = _mm512_and_si512(b, _mm512_set1_epi32(0x0F));
                half[1] = _mm512_srli_epi32(b, 4);
            }
            for (int h = 0; h < 2; h++) {
                const __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(half[h]), d, mo);
                const int64_t off = r * k + 32 * i + 16 * h;
                if (out_f32) {
                    _mm512_storeu_ps(out_f32 + off, v);
                } else {
                    __m512i bits = _mm512_castps_si512(v);
                    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
                    bits = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), lsb), 16);
                    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out_bf16 + off), _mm512_cvtepi32_epi16(bits));
                }
            }
        }
    }
}

void matmul_rows(const uint8_t* qs, const uint16_t* dw, const uint16_t* mw, int64_t kind, int64_t k,
                 const XQuant& xq, int64_t m, float* y, int64_t n_out, int64_t n0, int64_t n1) {
    if (kind == KIND_Q4_MIN) rows_all<KIND_Q4_MIN>(qs, dw, mw, k, xq, m, y, n_out, n0, n1);
    else if (kind == KIND_Q4) rows_all<KIND_Q4>(qs, dw, mw, k, xq, m, y, n_out, n0, n1);
    else rows_all<KIND_Q8>(qs, dw, mw, k, xq, m, y, n_out, n0, n1);
}

}  // namespace avx512
#pragma GCC pop_options

static int detect_isa() {
    __builtin_cpu_init();
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) return 0;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
        return 2;
    return 1;
}
#else
static int detect_isa() { return 0; }
#endif

static int ISA = detect_isa();

int64_t isa() { return ISA; }

// Tests use this to run the AVX2 kernel on an AVX-512 machine; it never raises the level above the CPU's.
int64_t set_isa(int64_t level) {
    ISA = static_cast<int>(std::min<int64_t>(std::max<int64_t>(level, 0), detect_isa()));
    return ISA;
}

static void check(const torch::Tensor& qs, const torch::Tensor& d, const c10::optional<torch::Tensor>& m,
                  int64_t kind, int64_t k) {
    TORCH_CHECK(ISA > 0, "Lantern's quantized CPU kernels need an x86-64 CPU with AVX2 and FMA");
    TORCH_CHECK(kind == KIND_Q4_MIN || kind == KIND_Q4 || kind == KIND_Q8, "unknown block kind ", kind);
    TORCH_CHECK(k > 0 && k % 32 == 0, "in_features must be a multiple of 32, got ", k);
    TORCH_CHECK(qs.device().is_cpu() && qs.scalar_type() == (kind == KIND_Q8 ? torch::kInt8 : torch::kUInt8) &&
                qs.dim() == 2 && qs.is_contiguous(), "qs: 2-D contiguous uint8 (4-bit) or int8 (8-bit) on the CPU");
    const int64_t n = qs.size(0);
    TORCH_CHECK(qs.size(1) == (kind == KIND_Q8 ? k : k / 2), "qs: wrong row length ", qs.size(1), " for K=", k);
    TORCH_CHECK(d.scalar_type() == torch::kHalf && d.is_contiguous() && d.dim() == 2 && d.size(0) == n &&
                d.size(1) == k / 32, "d: (N, K/32) contiguous float16");
    if (kind == KIND_Q4_MIN) {
        TORCH_CHECK(m.has_value() && m->scalar_type() == torch::kHalf && m->is_contiguous() &&
                    m->sizes() == d.sizes(), "m: (N, K/32) contiguous float16");
    }
}

static const uint16_t* half_ptr(const torch::Tensor& t) {
    return reinterpret_cast<const uint16_t*>(t.data_ptr<at::Half>());
}

// y (..., N) float32 = x (..., K) float32 @ W.T, W given as split blocks.
torch::Tensor qmatmul(const torch::Tensor& x_in, const torch::Tensor& qs, const torch::Tensor& d,
                      const c10::optional<torch::Tensor>& m, int64_t kind) {
    TORCH_CHECK(x_in.scalar_type() == torch::kFloat32 && x_in.dim() >= 1 && x_in.device().is_cpu(),
                "x: float32 on the CPU");
    const torch::Tensor x = x_in.contiguous();
    const int64_t k = x.size(-1), rows = k ? x.numel() / k : 0, n = qs.size(0);
    check(qs, d, m, kind, k);
    auto shape = x.sizes().vec();
    shape.back() = n;
    auto y = torch::empty(shape, x.options());
    if (rows == 0 || n == 0) return y;
    const uint16_t* mw = kind == KIND_Q4_MIN ? half_ptr(*m) : nullptr;
#if defined(__x86_64__) || defined(_M_X64)
    const bool wide = ISA == 2;
    XQuant xq(rows, k);
    avx2::quantize_rows(x.data_ptr<float>(), rows, k, xq);
    // Enough output rows per task that a thread's start-up cost stays small against its work.
    const int64_t grain = std::max<int64_t>(4, 8192 / std::max<int64_t>(1, k / 32 * rows));
    const uint8_t* w = static_cast<const uint8_t*>(qs.data_ptr());
    const uint16_t* dw = half_ptr(d);
    float* out = y.data_ptr<float>();
    parallel_rows(n, grain, [&](int64_t n0, int64_t n1) {
        if (wide) avx512::matmul_rows(w, dw, mw, kind, k, xq, rows, out, n, n0, n1);
        else avx2::matmul_rows(w, dw, mw, kind, k, xq, rows, out, n, n0, n1);
    });
#endif
    return y;
}

// The weights as an (N, K) float32 or bfloat16 tensor.
torch::Tensor dequantize(const torch::Tensor& qs, const torch::Tensor& d, const c10::optional<torch::Tensor>& m,
                         int64_t kind, int64_t k, torch::ScalarType dtype) {
    check(qs, d, m, kind, k);
    TORCH_CHECK(dtype == torch::kFloat32 || dtype == torch::kBFloat16, "dequantize to float32 or bfloat16");
    auto out = torch::empty({qs.size(0), k}, qs.options().dtype(dtype));
    const uint16_t* mw = kind == KIND_Q4_MIN ? half_ptr(*m) : nullptr;
    float* f = dtype == torch::kFloat32 ? out.data_ptr<float>() : nullptr;
    uint16_t* h = dtype == torch::kBFloat16 ? reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) : nullptr;
#if defined(__x86_64__) || defined(_M_X64)
    parallel_rows(qs.size(0), 16, [&](int64_t r0, int64_t r1) {
        const uint8_t* w = static_cast<const uint8_t*>(qs.data_ptr());
        if (ISA == 2) avx512::dequantize_rows(w, half_ptr(d), mw, kind, k, r0, r1, f, h);
        else avx2::dequantize_rows(w, half_ptr(d), mw, kind, k, r0, r1, f, h);
    });
#endif
    return out;
}

// decode_cpu.cpp
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps, double offset);
torch::Tensor gated_act(const torch::Tensor& x, int64_t act);
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor k_cache,
                               torch::Tensor v_cache, const torch::Tensor& slots, const torch::Tensor& positions,
                               double scale, int64_t window);

void register_decode_stack(pybind11::module& mod);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
    register_decode_stack(mod);
    mod.def("rms_norm", &rms_norm, "x * rsqrt(mean(x^2) + eps) * (w + offset) over the last dimension, float32");
    mod.def("gated_act", &gated_act, "act(gate) * up for x = [gate | up]; act 0 SiLU, 1 GELU-tanh");
    mod.def("decode_attention", &decode_attention,
            "one token per row: RoPE, cache write and attention over the cache -> (B, H*D)");
    mod.def("isa", &isa, "0: no kernels on this CPU, 1: AVX2+FMA, 2: AVX-512 VNNI");
    mod.def("set_isa", &set_isa, "use a lower instruction set than the CPU's (for tests); returns the level in use");
    // The products let other Python threads run meanwhile (the server's event loop beside the Engine's
    // thread); they touch no Python object.
    mod.def("qmatmul", &qmatmul, "x (..., K) float32 @ W.T -> (..., N) float32; W as split blocks (qs, d, m, kind)",
            pybind11::call_guard<pybind11::gil_scoped_release>());
    mod.def("dequantize", &dequantize, "split blocks (qs, d, m, kind, K) -> (N, K) float32 or bfloat16",
            pybind11::call_guard<pybind11::gil_scoped_release>());
}
