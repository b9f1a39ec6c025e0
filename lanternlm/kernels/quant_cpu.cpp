// Lantern's CPU kernels for linear layers whose weights stay quantized in 32-element blocks.
//
// Built with the package (setup.py compiles every .cpp beside this file into one extension); when
// that build is missing or stale, lanternlm/kernels/__init__.py builds it at first use and caches it.
// The weights come in the "split block" layouts that kernels/blocks.py repacks ggml's types into without
// changing a value (Q4_K, Q5_K, Q6_K, Q3_K, Q2_K and IQ4_XS keep their scales):
//   qs (N, K/32 * block_bytes(kind)): block i of a row is bytes block_bytes*i onwards. Its 4-bit part is 16
//      bytes, byte j = element j in its low nibble and element j+16 in its high nibble (ggml's Q4_0 order);
//      the 8-bit kind holds 32 int8 instead (int8 dtype). The 5-, 6- and 3-bit kinds (Q5_0, Q5_1, Q5_K, Q6_K,
//      Q3_K) are grouped: each group of 16 blocks of a row (fewer in its last) holds one part of every block,
//      then the other. The 5-bit kinds: 16 nibble bytes, then 4 high-bit bytes per block (bit 4); the 6-bit
//      kind: 16 nibble bytes, then 8 "crumb" bytes, an element's bits 4-5; the 3-bit kind: 8 crumb bytes (bits
//      0-1), then 4 high-bit bytes (bit 2). The 2-bit kind (Q2_K) is 8 crumb bytes per block, block after
//      block. Crumb byte 4c + j holds at bits 2s, 2s+1 those of element
//      16c + 4s + j; high-bit byte j holds at bit s that of element 4s + j (one shift per step of the byte
//      dot product, see avx512::load_across; one stream of bytes per row, which this VM's prefetcher follows
//      far better than two);
//   d (N, K/32) float16, one scale per block (KIND_Q4_K, KIND_Q5_K, KIND_Q2_K: (N, K/256 * 2), d and dmin of each
//      super-block; KIND_IQ4_XS: (N, K/256), d of each super-block);
//   m: (N, K/32) float16 offsets (kinds with stored offsets), or (N, K/16) int8 multipliers, one per 16
//      elements (KIND_Q6, KIND_Q3), or (N, K/32 * 2) uint8, each block's 6-bit scale sc and min mn
//      (KIND_Q4_K, KIND_Q5_K) or each 16-element half's 4-bit scale sc and min mn, sc | mn << 4 (KIND_Q2_K, as in
//      the file), or (N, K/32) uint8, each block's 6-bit scale ls (KIND_IQ4_XS), or nothing.
// A weight is d*q + m (stored offset), d*(q - z) (implicit zero point z), d*mult*(q - z) (multipliers),
// d*sc*q - dmin*mn (KIND_Q4_K, KIND_Q5_K), d*sc[half]*q - dmin*mn[half] (KIND_Q2_K), or d*V[q] and
// d*(ls - 32)*V[q] (KIND_IQ4_NL, KIND_IQ4_XS: V = IQ4_NL_VALUES, the nibble an index into it).
//
// Activations are quantized per 32 values to int16 (scale dx = max|x|/32767, values qx) first, so each
// block's product is an integer dot product scaled once:
//   sum_i (d*q_i + m) * dx*qx_i = d*dx * sum(q_i*qx_i) + m * dx*sum(qx),
// with m = -z*d for an implicit zero point; kinds with multipliers fold (q - z)*mult into the integer weight
// (|.| <= 4096, so a pair of products stays far inside int32). int16 keeps the activations' rounding error (at
// most max|x|/65534 per value) far below the weights' own, so the results are those of the float32 reference
// up to summation order. (8-bit activations, as llama.cpp uses, are cheaper but flip close greedy choices on
// small models: SmolLM2-135M answers "L'Étoile, ..." instead of "The capital of France is Paris." with them,
// llama.cpp included.)
//
// Two instruction sets are compiled from this file and picked once at load from CPUID: AVX-512 VNNI (the 2- to
// 6-bit kinds and IQ4 as byte dot products 16 blocks across lanes, the 8-bit kind a block per 512-bit register,
// the int16 dot product and accumulation in one instruction) and AVX2+FMA. Non-x86
// builds and CPUs without AVX2 report isa() == 0, and the Python side keeps PyTorch's kernels.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <mutex>
#include <vector>

void parallel_rows(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);  // pool.cpp
bool amx_bf16();  // amx_cpu.cpp
void amx_bf16_matmul(const float* x, int64_t rows, int64_t k, const torch::Tensor& w, float* y);
torch::Tensor bf16_tile_rows(const torch::Tensor& w, const torch::Tensor& index);
void check_tiled(const torch::Tensor& w);

// parallel_rows over output rows, split only at multiples of 4: batched products take rows in tiles of 2 from the
// start of their range, with a single row at its end, and a tile's rounding differs from single rows'. Aligned
// splits make every row's result the same whatever the thread count or split (the pool's chunks are claimed
// dynamically), so the Engine, the API and 1 or 2 threads give the same bits.
inline void parallel_tiles(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
    parallel_rows((n + 3) / 4, (grain + 3) / 4, [&](int64_t t0, int64_t t1) { fn(4 * t0, std::min(n, 4 * t1)); });
}

namespace {

// Block kinds (kernels/blocks.py has the same numbers and the ggml types each comes from).
constexpr int64_t KIND_Q4_MIN = 0;  // 4-bit, stored offset m (ggml Q4_1, Q4_K)
constexpr int64_t KIND_Q4 = 1;      // 4-bit, zero point 8 (ggml Q4_0)
constexpr int64_t KIND_Q8 = 2;      // 8-bit signed (ggml Q8_0; types without a kind of their own requantized)
constexpr int64_t KIND_Q5_MIN = 3;  // 5-bit: nibbles + high bits (bit 4), stored offset m (ggml Q5_1)
constexpr int64_t KIND_Q5 = 4;      // 5-bit: nibbles + high bits (bit 4), zero point 16 (ggml Q5_0)
constexpr int64_t KIND_Q6 = 5;      // 6-bit: nibbles + crumbs (bits 4-5), zero point 32, multipliers (Q6_K)
constexpr int64_t KIND_Q3 = 6;      // 3-bit: crumbs (bits 0-1) + high bits (bit 2), zero point 4, multipliers (Q3_K)
constexpr int64_t KIND_BF16 = 7;    // plain bfloat16 weights (N, K): HF folders, BF16 GGUFs (see "float weights")
constexpr int64_t KIND_F16 = 8;     // plain float16 weights (N, K)
constexpr int64_t KIND_F32 = 9;     // plain float32 weights (N, K)
constexpr int64_t KIND_Q4_K = 10;   // 4-bit, Q4_K's own scales: per block a 6-bit scale and min, per super-block d, dmin
constexpr int64_t KIND_Q5_K = 11;   // 5-bit (nibbles + high bits), Q5_K's own scales, as KIND_Q4_K's
constexpr int64_t KIND_Q2_K = 12;   // 2-bit: crumbs, Q2_K's own scales: per 16 elements a 4-bit scale and min, per
                                    // super-block d, dmin
constexpr int64_t KIND_IQ4_NL = 13;  // 4-bit indices into ggml's non-linear table (IQ4_NL_VALUES), d per block
constexpr int64_t KIND_IQ4_XS = 14;  // the same, d per super-block and a 6-bit scale per block (IQ4_XS)
constexpr int64_t KIND_Q8_LANES = 15;  // KIND_Q8's values, each group of 16 blocks step-major (see q8_lanes)
constexpr int64_t KIND_BF16_TILES = 16;  // KIND_BF16's values in AMX tile order (amx_cpu.cpp)
constexpr int64_t KIND_COUNT = 17;

// IQ4_NL's and IQ4_XS's 16 values (ggml's kvalues_iq4nl; loader/quants.IQ4_NL_VALUES): a nibble q stands for
// IQ4_NL_VALUES[q] times the block's scale.
alignas(64) constexpr int8_t IQ4_NL_VALUES[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
constexpr bool nonlinear(int64_t kind) { return kind == KIND_IQ4_NL || kind == KIND_IQ4_XS; }
constexpr bool eight_bit(int64_t kind) { return kind == KIND_Q8 || kind == KIND_Q8_LANES; }
// Kinds whose integer values are signed bytes (the byte dot products take them as v + 128: avx512::half_dots).
constexpr bool signed_bytes(int64_t kind) { return nonlinear(kind) || kind == KIND_Q8_LANES; }

constexpr bool has_nibbles(int64_t kind) { return !eight_bit(kind) && kind != KIND_Q3 && kind != KIND_Q2_K; }
// The 6-, 3- and 2-bit kinds keep 2 bits of each element as a "crumb" (bits 4-5 of a 6-bit value, 0-1 of a 3-bit
// one, the whole 2-bit one), the 5- and 3-bit kinds their top bit as a high bit (see the header).
constexpr bool has_crumbs(int64_t kind) { return kind == KIND_Q6 || kind == KIND_Q3 || kind == KIND_Q2_K; }
constexpr bool has_high_bits(int64_t kind) {
    return kind == KIND_Q5 || kind == KIND_Q5_MIN || kind == KIND_Q5_K || kind == KIND_Q3;
}
constexpr int high_bit(int64_t kind) { return kind == KIND_Q3 ? 2 : 4; }  // the value bit a high bit is
constexpr int64_t block_bytes(int64_t kind) {
    return eight_bit(kind) ? 32 : 16 * has_nibbles(kind) + 8 * has_crumbs(kind) + 4 * has_high_bits(kind);
}
// The grouped kinds: each group of 16 blocks of a row (fewer in its last) holds a first part of every block (the
// 5- and 6-bit kinds' nibbles, the 3-bit kind's crumbs), then a second one (high bits, crumbs, high bits).
constexpr bool grouped(int64_t kind) { return has_crumbs(kind) || has_high_bits(kind); }
constexpr int64_t first_part(int64_t kind) { return eight_bit(kind) ? 32 : has_nibbles(kind) ? 16 : 8; }
// Where block i of a row of nb blocks starts (a grouped kind: its first part), and where its second part is.
constexpr int64_t block_at(int64_t kind, int64_t i) {
    return grouped(kind) ? block_bytes(kind) * (i - i % 16) + first_part(kind) * (i % 16) : block_bytes(kind) * i;
}
constexpr int64_t second_at(int64_t kind, int64_t nb, int64_t i) {
    const int64_t g = i - i % 16;
    return block_bytes(kind) * g + first_part(kind) * std::min<int64_t>(16, nb - g) +
           (block_bytes(kind) - first_part(kind)) * (i % 16);
}
constexpr bool has_offsets(int64_t kind) { return kind == KIND_Q4_MIN || kind == KIND_Q5_MIN; }
// The K-quants' scales as stored: d and dmin per super-block of 8 blocks, and 2 bytes per block: Q4_K's and Q5_K's
// 6-bit scale and min of the block (a weight is d*scale*q - dmin*min), or Q2_K's scale (low nibble) and min (high
// nibble) of each 16-element half (a weight is d*scale[half]*q - dmin*min[half]: `half_scales`).
constexpr bool has_super_scales(int64_t kind) { return kind == KIND_Q4_K || kind == KIND_Q5_K || kind == KIND_Q2_K; }
constexpr bool half_scales(int64_t kind) { return kind == KIND_Q2_K; }
// IQ4_XS's scales as stored: d per super-block of 8 blocks, a 6-bit scale ls per block (`sub`, one byte each): a
// weight is d*(ls - 32)*IQ4_NL_VALUES[q].
constexpr bool block_scales(int64_t kind) { return kind == KIND_IQ4_XS; }
constexpr bool has_multipliers(int64_t kind) { return kind == KIND_Q6 || kind == KIND_Q3; }
constexpr int zero_point(int64_t kind) {
    return kind == KIND_Q4 ? 8 : kind == KIND_Q5 ? 16 : kind == KIND_Q6 ? 32 : kind == KIND_Q3 ? 4 : 0;
}
// Whether a block's product gets the term m * dx*sum(qx): stored offsets, or a zero point left out of the
// integer weights (kinds with multipliers subtract theirs before multiplying).
// (Q2_K's mins, one per half, are a term of their own: see half_offset.)
constexpr bool offset_term(int64_t kind) {
    return has_offsets(kind) || (has_super_scales(kind) && !half_scales(kind)) ||
           (zero_point(kind) && !has_multipliers(kind));
}

// A row's last t < 16 blocks (K = 576: 16 + 2) cost a whole group of 16 to compute across lanes, and a block at a
// time they cost more than the group did: with t <= PACKED_TAIL_MAX, avx512::add_tails computes the tails of
// 16 / t weight rows as one group instead, for the kinds with a scale per block (K-quant rows are whole super-
// blocks: only a tensor-parallel cut leaves them a tail, Q4_K and Q5_K cut as the 4- and 5-bit kinds with
// offsets, which take add_tails too, Q3_K and Q6_K with their multipliers, which keep the block-at-a-time way).
constexpr int64_t PACKED_TAIL_MAX = 4;
constexpr bool packed_tail(int64_t tail) { return tail >= 1 && tail <= PACKED_TAIL_MAX; }
constexpr bool packed_tail_kind(int64_t kind) {
    return kind == KIND_Q4 || kind == KIND_Q4_MIN || kind == KIND_Q5 || kind == KIND_Q5_MIN || kind == KIND_IQ4_NL ||
           kind == KIND_Q8_LANES;
}

// The most blocks a row's last group may have and still be computed a block at a time (avx512::rows_tile_across;
// a group across lanes costs about what 6 blocks one at a time do).
constexpr int64_t TAIL_ALONE_MAX = 6;

// KIND_Q8_LANES: a row's groups of 16 blocks (its last, of L < 16, too when L > TAIL_ALONE_MAX: the ones
// computed across lanes) hold the blocks step-major, dword s (elements 4s..4s+3) of block l at byte 4Ls + 4l of
// the group: the 8 registers avx512::rows_tile_across takes a group in, loaded as they are, where KIND_Q8's
// block order needs a 16 x 8 transpose per group and product. The last group of up to TAIL_ALONE_MAX blocks
// stays block after block. The lanes of group g of a row of nb blocks (0 for a group kept in block order):
constexpr int64_t lanes_of(int64_t nb, int64_t g) {
    const int64_t L = std::min<int64_t>(16, nb - g);
    return L > TAIL_ALONE_MAX ? L : 0;
}

// One matrix's blocks: qs rows, d, and the kind's m as offsets (float16 bits), multipliers or Q4_K's scales.
struct Weights {
    const uint8_t* qs;
    const uint16_t* d;         // (N, K/32) float16; KIND_Q4_K/Q5_K: (N, K/256 * 2), d and dmin of each super-block
    const uint16_t* offsets;   // (N, K/32) float16, kinds with stored offsets
    const int8_t* mult;        // (N, K/16) int8, kinds with multipliers
    const uint8_t* sub = nullptr;  // KIND_Q4_K/Q5_K: (N, K/32 * 2) uint8, each block's 6-bit scale and min;
                                   // KIND_Q2_K: each half's 4-bit scale (low nibble) and min (high nibble);
                                   // KIND_IQ4_XS: (N, K/32) uint8, each block's 6-bit scale
};

// The per-half integer multipliers of row n (nb blocks) that load_block multiplies a block's values by: int8
// multipliers, or Q2_K's half scales (the low nibbles of its `sub` bytes); nullptr for other kinds.
template <int64_t KIND>
inline const int8_t* row_multipliers(const Weights& w, int64_t n, int64_t nb) {
    if (has_multipliers(KIND)) return w.mult + n * 2 * nb;
    if (half_scales(KIND)) return reinterpret_cast<const int8_t*>(w.sub + n * 2 * nb);
    return nullptr;
}


// The largest |qx|.
constexpr float QX_MAX = 32767.0f;

// Quantized activations for `rows` rows of K values, blocks padded to a multiple of 16 with zeros.
// With `bytes`, each qx is also split into its two bytes, qx = 256 * hi + lo with hi signed and lo unsigned, for
// the AVX-512 kernels' byte dot products (see avx512::rows_tile_across). The arrays live in a buffer of the
// calling thread that its next product reuses (grown up to REUSED_BYTES, never shrunk): a decode step's products
// allocate, clear and fault in nothing but their padding (a fresh zeroed allocation per product cost more than
// the arithmetic of eight rows against a small matrix at K = 8192). Larger ones (many rows) get a buffer of
// their own, freed with the XQuant, so that no thread keeps a prefill's worth.
struct XQuant {
    int64_t nb;                // blocks per row (K / 32)
    int64_t blocks;            // padded block count per row
    int16_t* q;                // rows * blocks * 32
    float* d;                  // rows * blocks: the scale dx
    float* s;                  // rows * blocks: dx * sum(qx)
    // with `bytes`, rows * blocks * 32 each: qx >> 8 and qx & 255, each group of 16 blocks across lanes (8 steps
    // of 64 bytes, step s holding elements 4s..4s+3 of the group's block l in bytes 4l..4l+3)
    int8_t* hi_across = nullptr;
    uint8_t* lo_across = nullptr;
    // with `bytes`, rows * blocks * 2: sum(qx) over elements 0-15 and over 16-31 of each block (what the zero point
    // of a kind with multipliers costs), per group of 16 blocks the 16 first halves, then the 16 second halves
    int32_t* half_sums = nullptr;
    // with `bytes`, rows * blocks: sum(qx >> 8) of each block, laid out like half_sums (for the IQ4 kinds' signed
    // weight bytes: see avx512::rows_tile_across)
    int32_t* hi_sums = nullptr;
    // with `bytes` and a row of 16g + t blocks, t = 1..PACKED_TAIL_MAX: the last t blocks of each row laid out for
    // avx512::add_tails, lane L holding block 16g + L % t (rows * 8 steps * 64 bytes each; lanes past the last
    // whole multiple of t zero), and their dx and dx * sum(qx) the same way (rows * 16 each)
    int8_t* tail_hi = nullptr;
    uint8_t* tail_lo = nullptr;
    float* tail_d = nullptr;
    float* tail_s = nullptr;
    int32_t* tail_hs = nullptr;

    static constexpr size_t REUSED_BYTES = size_t(8) << 20;
    std::vector<uint8_t> own;  // the buffer of a product too large for the thread's
    XQuant(const XQuant&) = delete;  // the pointers point into this object's buffer, or the thread's

    XQuant(int64_t rows, int64_t k, bool bytes = false) : nb(k / 32), blocks((k / 32 + 15) / 16 * 16) {
        const size_t n = static_cast<size_t>(rows * blocks), values = n * 32, scales = 16 * ((n + 15) / 16);
        const bool tails = bytes && packed_tail(k / 32 % 16);
        const size_t total = values * 2 + scales * 4 * 2 + (bytes ? values * 2 + n * 8 + 64 * ((n + 15) / 16) : 0) +
                             (tails ? static_cast<size_t>(rows) * (512 * 2 + 64 * 3) : 0) + 64;
        thread_local std::vector<uint8_t> reused;
        std::vector<uint8_t>& buffer = total <= REUSED_BYTES ? reused : own;
        if (buffer.size() < total) buffer.resize(total);
        uint8_t* at = buffer.data() + (64 - reinterpret_cast<uintptr_t>(buffer.data()) % 64) % 64;
        auto take = [&](size_t size) { uint8_t* p = at; at += size; return p; };  // sizes keep 64-byte alignment
        q = reinterpret_cast<int16_t*>(take(values * 2));
        d = reinterpret_cast<float*>(take(scales * 4));
        s = reinterpret_cast<float*>(take(scales * 4));
        if (bytes) {
            hi_across = reinterpret_cast<int8_t*>(take(values));
            lo_across = take(values);
            half_sums = reinterpret_cast<int32_t*>(take(n * 8));
            hi_sums = reinterpret_cast<int32_t*>(take(64 * ((n + 15) / 16)));
        }
        if (tails) {
            tail_hi = reinterpret_cast<int8_t*>(take(rows * 512));
            tail_lo = take(rows * 512);
            tail_d = reinterpret_cast<float*>(take(rows * 64));
            tail_s = reinterpret_cast<float*>(take(rows * 64));
            tail_hs = reinterpret_cast<int32_t*>(take(rows * 64));
        }
        const int64_t nb = k / 32;  // each row's padding: zero values and scales
        for (int64_t r = 0; r < rows; r++) {
            const int64_t first = r * blocks + nb, count = blocks - nb;
            std::memset(q + first * 32, 0, count * 32 * 2);
            std::memset(d + first, 0, count * 4);
            std::memset(s + first, 0, count * 4);
        }
    }
};

inline uint32_t load_u32(const uint8_t* p) {
    uint32_t v;
    std::memcpy(&v, p, 4);
    return v;
}

}  // namespace

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
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

// A block of 32 floats into v[0..3], and its max |x|.
inline float load_max_abs(const float* x, __m256 v[4]) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 amax = _mm256_setzero_ps();
    for (int j = 0; j < 4; j++) {
        v[j] = _mm256_loadu_ps(x + 8 * j);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

// One block of 32 floats -> 32 int16 (round to nearest even), dx = max|x| / QX_MAX and dx * sum(q).
inline void quantize_block(const float* x, int16_t* out, float* d_out, float* s_out) {
    __m256 v[4];
    const float maxabs = load_max_abs(x, v);
    const __m256 inv = _mm256_set1_ps(maxabs != 0.0f ? QX_MAX / maxabs : 0.0f);
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
    const float d = maxabs / QX_MAX;
    *d_out = d;
    *s_out = d * static_cast<float>(_mm_cvtsi128_si32(s));
}

void quantize_rows(const float* x, int64_t rows, int64_t k, XQuant& xq) {
    const int64_t nb = k / 32;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < nb; i++)
            quantize_block(x + r * k + 32 * i, xq.q + (r * xq.blocks + i) * 32, &xq.d[r * xq.blocks + i],
                           &xq.s[r * xq.blocks + i]);
}

// A block's 8 crumb bytes (at p) -> 32 bytes, element e's crumb << `shift` in byte e: crumb byte 4c + j holds, at
// bits 2s and 2s + 1, the crumb of element 16c + 4s + j.
inline __m256i expand_crumbs(const uint8_t* p, int shift) {
    int64_t v;
    std::memcpy(&v, p, 8);
    const __m256i b = _mm256_shuffle_epi8(_mm256_set1_epi64x(v),  // per 128-bit lane: bytes j, then 4 + j
        _mm256_setr_epi8(0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7));
    const __m256i s = _mm256_srlv_epi32(b, _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6));  // dword s: crumb s at bit 0
    return _mm256_slli_epi16(_mm256_and_si256(s, _mm256_set1_epi8(3)), shift);
}

// A block's 4 high-bit bytes (at p) -> 32 bytes, element e's high bit at bit `value_bit` of byte e: byte j holds at
// bit s that of element 4s + j.
inline __m256i expand_high_bits(const uint8_t* p, int value_bit) {
    const __m256i s = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(load_u32(p))), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_slli_epi16(_mm256_and_si256(s, _mm256_set1_epi8(1)), value_bit);
}

// Block i's 32 bytes in a KIND_Q8_LANES row of nb blocks (lanes_of): its 8 dwords gathered from a step-major group.
inline __m256i lanes_block(const uint8_t* row, int64_t nb, int64_t i) {
    const int64_t g = i - i % 16, L = lanes_of(nb, g);
    if (L == 0) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 32 * i));
    const __m256i at = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                          _mm256_set1_epi32(static_cast<int>(4 * L)));  // dword s at 4Ls
    return _mm256_i32gather_epi32(reinterpret_cast<const int*>(row + 32 * g + 4 * (i % 16)), at, 1);
}

// Block i of a weight row as 32 int16 (elements 0-15 in lo, 16-31 in hi): the integers its scale multiplies,
// i.e. q, or (q - z) * multiplier for kinds with multipliers, q * scale for Q2_K (`mult`: row_multipliers).
// `nb` is the row's block count (where a grouped kind's second part is).
template <int64_t KIND>
inline void load_block(const uint8_t* row, int64_t nb, const int8_t* mult, int64_t i, __m256i& lo, __m256i& hi) {
    const uint8_t* b = row + block_at(KIND, i);
    if (eight_bit(KIND)) {
        const __m256i v = KIND == KIND_Q8 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b))
                                          : lanes_block(row, nb, i);
        lo = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(v));
        hi = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(v, 1));
        return;
    }
    __m256i bytes = _mm256_setzero_si256();  // element e's value in byte e
    if (has_nibbles(KIND)) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b));
        bytes = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), _mm256_set1_epi8(0x0F));
    }
    if (KIND == KIND_Q6) bytes = _mm256_or_si256(bytes, expand_crumbs(row + second_at(KIND, nb, i), 4));
    if (KIND == KIND_Q3 || KIND == KIND_Q2_K) bytes = expand_crumbs(b, 0);
    if (has_high_bits(KIND))
        bytes = _mm256_or_si256(bytes, expand_high_bits(row + second_at(KIND, nb, i), high_bit(KIND)));
    if (nonlinear(KIND)) {  // each nibble's value, a signed byte
        const __m256i table = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(IQ4_NL_VALUES)));
        bytes = _mm256_shuffle_epi8(table, bytes);
        lo = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(bytes));
        hi = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(bytes, 1));
        return;
    }
    lo = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(bytes));
    hi = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(bytes, 1));
    if (has_multipliers(KIND)) {
        const __m256i z = _mm256_set1_epi16(zero_point(KIND));
        lo = _mm256_mullo_epi16(_mm256_sub_epi16(lo, z), _mm256_set1_epi16(mult[2 * i]));
        hi = _mm256_mullo_epi16(_mm256_sub_epi16(hi, z), _mm256_set1_epi16(mult[2 * i + 1]));
    }
    if (half_scales(KIND)) {  // Q2_K: each half's 4-bit scale
        lo = _mm256_mullo_epi16(lo, _mm256_set1_epi16(mult[2 * i] & 0x0F));
        hi = _mm256_mullo_epi16(hi, _mm256_set1_epi16(mult[2 * i + 1] & 0x0F));
    }
}

// Block `at` (= row * K/32 + i)'s scale, for the kernels that take a block at a time.
template <int64_t KIND>
inline float block_scale(const Weights& w, int64_t at) {
    if (half_scales(KIND)) return _cvtsh_ss(w.d[2 * (at / 8)]);  // the halves' scales are in load_block's integers
    if (block_scales(KIND)) return _cvtsh_ss(w.d[at / 8]) * static_cast<float>(static_cast<int>(w.sub[at]) - 32);
    if (has_super_scales(KIND)) return _cvtsh_ss(w.d[2 * (at / 8)]) * static_cast<float>(w.sub[2 * at]);
    return _cvtsh_ss(w.d[at]);
}

// Q2_K: half h (elements 16h..16h+15) of block `at`'s offset, -dmin*min[half].
template <int64_t KIND>
inline float half_offset(const Weights& w, int64_t at, int h) {
    return half_scales(KIND) ? -_cvtsh_ss(w.d[2 * (at / 8) + 1]) * static_cast<float>(w.sub[2 * at + h] >> 4) : 0.0f;
}

// The block's offset: stored, -dmin*min (Q4_K's scales), -z*d for an implicit zero point outside the integers,
// else 0 (Q2_K: its halves' offsets, half_offset).
template <int64_t KIND>
inline float block_offset(const Weights& w, int64_t at, float d) {
    if (half_scales(KIND)) return 0.0f;
    if (has_offsets(KIND)) return _cvtsh_ss(w.offsets[at]);
    if (has_super_scales(KIND)) return -_cvtsh_ss(w.d[2 * (at / 8) + 1]) * static_cast<float>(w.sub[2 * at + 1]);
    return offset_term(KIND) ? -static_cast<float>(zero_point(KIND)) * d : 0.0f;
}

// y[b, n] for activation rows b0..b0+NB-1 and weight row n, one block at a time: each block is widened once for
// the NB rows, where it was widened again for each (Zen 4, 2 threads, 8192 x 2048 from DRAM at 8 rows: Q4_1 5.6 ->
// 4.0 ms, Q4_K 7.2 -> 4.3, Q6_K 7.6 -> 4.0, Q2_K 9.4 -> 5.2; one row unchanged). Each (row, activation row) pair
// adds its blocks in the same order whatever NB. Not inlined: inlined into rows_all, the one-row tile lost its
// registers (Q4_K at one row 1.4-1.5 -> 1.6-1.9 ms).
template <int64_t KIND, int NB>
__attribute__((noinline)) void rows_tile(const Weights& w, int64_t k, const XQuant& xq, int64_t b0, float* y, int64_t n_out, int64_t n) {
    const int64_t nb = k / 32;
    const uint8_t* row = w.qs + n * nb * block_bytes(KIND);
    const int8_t* mult = row_multipliers<KIND>(w, n, nb);
    __m256 acc0[NB], acc1[NB];  // even and odd blocks
    float madd[NB];
    const int16_t* xr[NB];  // each activation row's values, scales and scaled sums (hoisted: measured faster)
    const float *xd[NB], *xs[NB];
    for (int b = 0; b < NB; b++) {
        acc0[b] = acc1[b] = _mm256_setzero_ps();
        madd[b] = 0.0f;
        xr[b] = xq.q + (b0 + b) * xq.blocks * 32;
        xd[b] = xq.d + (b0 + b) * xq.blocks;
        xs[b] = xq.s + (b0 + b) * xq.blocks;
    }
    for (int64_t i = 0; i < nb; i++) {
        const float d = block_scale<KIND>(w, n * nb + i);
        __m256i w0, w1;
        load_block<KIND>(row, nb, mult, i, w0, w1);
        __m256i m0, m1;  // Q2_K: each half's min
        float dmin = 0.0f;
        if constexpr (half_scales(KIND)) {
            const uint8_t* sub = w.sub + 2 * (n * nb + i);
            m0 = _mm256_set1_epi16(sub[0] >> 4);
            m1 = _mm256_set1_epi16(sub[1] >> 4);
            dmin = _cvtsh_ss(w.d[2 * ((n * nb + i) / 8) + 1]);
        }
        for (int b = 0; b < NB; b++) {
            const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr[b] + 32 * i));
            const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr[b] + 32 * i + 16));
            const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1));
            // explicit FMAs: a product and a sum the compiler may fuse or not, differently per NB, would give a row
            // other bits in a batch than alone
            if (offset_term(KIND)) madd[b] = std::fma(block_offset<KIND>(w, n * nb + i, d), xs[b][i], madd[b]);
            __m256& acc = i & 1 ? acc1[b] : acc0[b];
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * xd[b][i]), acc);
            if constexpr (half_scales(KIND)) {  // Q2_K: -dmin * dx * (min[0] * sum(qx) of half 0 + min[1] * ...)
                const __m256i pm = _mm256_add_epi32(_mm256_madd_epi16(m0, x0), _mm256_madd_epi16(m1, x1));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pm), _mm256_set1_ps(-dmin * xd[b][i]), acc);
            }
        }
    }
    for (int b = 0; b < NB; b++) y[(b0 + b) * n_out + n] = hsum8(_mm256_add_ps(acc0[b], acc1[b])) + madd[b];
}

// y[b, n] for n in [n0, n1) and all m activation rows, in tiles of up to 4 activation rows (2 for the 8-bit kind,
// whose widening is one instruction: at 8 rows of 8192 x 2048, 4.4 ms in tiles of 4, 3.6 in tiles of 2, 4.0 a
// row at a time).
template <int64_t KIND>
void rows_all(const Weights& w, int64_t k, const XQuant& xq, int64_t m, float* y, int64_t n_out, int64_t n0,
              int64_t n1) {
    constexpr int TILE = eight_bit(KIND) ? 2 : 4;
    for (int64_t n = n0; n < n1; n++) {
        int64_t b0 = 0;
        for (; b0 + TILE <= m; b0 += TILE) rows_tile<KIND, TILE>(w, k, xq, b0, y, n_out, n);
        switch (m - b0) {
            case 3: rows_tile<KIND, 3>(w, k, xq, b0, y, n_out, n); break;
            case 2: rows_tile<KIND, 2>(w, k, xq, b0, y, n_out, n); break;
            case 1: rows_tile<KIND, 1>(w, k, xq, b0, y, n_out, n); break;
            default: break;
        }
    }
}

// 8 float32 -> 8 bfloat16 (round to nearest even).
inline __m128i to_bf16(__m256 v) {
    __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    bits = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lsb), 16);
    return _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
}

// Rows of blocks -> float32 or bfloat16 values.
template <int64_t KIND>
void dequantize_rows(const Weights& w, int64_t k, int64_t r0, int64_t r1, float* out_f32, uint16_t* out_bf16) {
    const int64_t nb = k / 32;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t* row = w.qs + r * nb * block_bytes(KIND);
        const int8_t* mult = row_multipliers<KIND>(w, r, nb);
        for (int64_t i = 0; i < nb; i++) {
            const float d = block_scale<KIND>(w, r * nb + i);
            const __m256 dv = _mm256_set1_ps(d);
            __m256 mo[2];
            for (int h = 0; h < 2; h++)
                mo[h] = _mm256_set1_ps(block_offset<KIND>(w, r * nb + i, d) + half_offset<KIND>(w, r * nb + i, h));
            __m256i half[2];
            load_block<KIND>(row, nb, mult, i, half[0], half[1]);
            for (int j = 0; j < 4; j++) {
                const __m128i q16 = j & 1 ? _mm256_extracti128_si256(half[j / 2], 1) : _mm256_castsi256_si128(half[j / 2]);
                const __m256 v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(q16)), dv, mo[j / 2]);
                const int64_t off = r * k + 32 * i + 8 * j;
                if (out_f32) _mm256_storeu_ps(out_f32 + off, v);
                else _mm_storeu_si128(reinterpret_cast<__m128i*>(out_bf16 + off), to_bf16(v));
            }
        }
    }
}

// One block of 32 floats -> the 8-bit kind: d = float16(max|x| / 127), q = round(x / d) to even, clamped to
// +-127, the same bits as blocks.quantize_q8 (ggml's Q8_0 recipe): x * (1 / d) in float32, as it computes.
inline void quantize_q8_block(const float* x, int8_t* q, uint16_t* d_out) {
    __m256 v[4];
    const uint16_t h = _cvtss_sh(load_max_abs(x, v) / 127.0f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const float d = _cvtsh_ss(h);
    const __m256 inv = _mm256_set1_ps(d > 0.0f ? 1.0f / d : 0.0f);
    const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
    __m256i i32[4];
    for (int j = 0; j < 4; j++) {
        const __m256 r = _mm256_round_ps(_mm256_mul_ps(v[j], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        i32[j] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
    }
    // packs work within 128-bit lanes: the bytes come out in 4-byte groups ordered 0, 2, 4, 6, 1, 3, 5, 7,
    // which one permute of 32-bit groups puts back
    const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(i32[0], i32[1]), _mm256_packs_epi32(i32[2], i32[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    *d_out = h;
}

}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
namespace avx512 {

// Two int8 multipliers (elements 0-15, 16-31) -> 32 int16 lanes, each holding its element's multiplier.
inline __m512i multipliers(const int8_t* sc) {
    uint16_t pair;
    std::memcpy(&pair, sc, 2);
    const __m512i v = _mm512_set1_epi16(static_cast<int16_t>(pair));  // lane = sc[1] << 8 | sc[0]
    const __m512i lo = _mm512_srai_epi16(_mm512_slli_epi16(v, 8), 8);
    return _mm512_mask_srai_epi16(lo, 0xFFFF0000u, v, 8);
}

// Block i of a weight row as 32 int16 lanes: the integers its scale multiplies (see avx2::load_block).
template <int64_t KIND>
inline __m512i load_block(const uint8_t* row, int64_t nb, const int8_t* mult, int64_t i) {
    const uint8_t* b = row + block_at(KIND, i);
    if (KIND == KIND_Q8) return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
    if (KIND == KIND_Q8_LANES) return _mm512_cvtepi8_epi16(avx2::lanes_block(row, nb, i));
    __m512i w = _mm512_setzero_si512();
    if (has_nibbles(KIND)) {
        // 16 bytes -> 16 int16 lanes, each holding a byte: its low nibbles are elements 0-15, high ones 16-31
        const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
        const __m256i lo = _mm256_and_si256(v, _mm256_set1_epi16(0x0F));
        w = _mm512_inserti64x4(_mm512_castsi256_si512(lo), _mm256_srli_epi16(v, 4), 1);
    }
    if (has_crumbs(KIND)) {  // lane e takes crumb byte 4*(e/16) + e%4, shifted right by 2*((e%16)/4) (avx2::expand_crumbs)
        alignas(64) static const int16_t at[32] = {0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3,
                                                   4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7};
        alignas(64) static const int16_t shift[32] = {0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 6, 6,
                                                      0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 6, 6};
        const uint8_t* cp = KIND == KIND_Q6 ? row + second_at(KIND, nb, i) : b;
        const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_zextsi128_si256(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(cp))));
        const __m512i c = _mm512_srlv_epi16(_mm512_permutexvar_epi16(_mm512_load_si512(at), bytes), _mm512_load_si512(shift));
        w = _mm512_add_epi16(w, _mm512_slli_epi16(_mm512_and_si512(c, _mm512_set1_epi16(3)), KIND == KIND_Q6 ? 4 : 0));
    }
    if (has_high_bits(KIND)) {  // lane e takes bit e/4 of high-bit byte e%4 (avx2::expand_high_bits)
        alignas(64) static const int16_t at[32] = {0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3,
                                                   0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3};
        alignas(64) static const int16_t shift[32] = {0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3,
                                                      4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7};
        const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_zextsi128_si256(_mm_cvtsi32_si128(
            static_cast<int>(load_u32(row + second_at(KIND, nb, i))))));
        const __m512i h = _mm512_srlv_epi16(_mm512_permutexvar_epi16(_mm512_load_si512(at), bytes), _mm512_load_si512(shift));
        w = _mm512_add_epi16(w, _mm512_slli_epi16(_mm512_and_si512(h, _mm512_set1_epi16(1)), high_bit(KIND)));
    }
    if (nonlinear(KIND)) {  // each nibble's value: lanes 0-15 of the table hold the 16 values as int16
        const __m512i values = _mm512_cvtepi8_epi16(_mm256_zextsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(IQ4_NL_VALUES))));
        w = _mm512_permutexvar_epi16(w, values);
    }
    if (has_multipliers(KIND))
        w = _mm512_mullo_epi16(_mm512_sub_epi16(w, _mm512_set1_epi16(zero_point(KIND))), multipliers(mult + 2 * i));
    if (half_scales(KIND))  // Q2_K: each half's 4-bit scale, the low nibble of its byte
        w = _mm512_mullo_epi16(w, _mm512_and_si512(multipliers(mult + 2 * i), _mm512_set1_epi16(0x0F)));
    return w;
}

// ---- Byte dot products, 16 blocks across lanes (the 2- to 6-bit kinds) ----
// Their integers q fit a byte, so they go through vpdpbusd (64 byte products per instruction, unsigned times
// signed) against the activations' two bytes: sum(q * qx) = 256 * sum(q * hi) + sum(lo * q), the same int32 as
// the int16 dot product of the other kinds (the same qx: results differ from it only in float summation order).
// A group of 16 blocks of a weight row is transposed in registers so that 32-bit lane l holds block l: step s
// (s = 0..7) is a register of elements 4s..4s+3 of each of the 16 blocks, and vpdpbusd over the 8 steps leaves
// each block's dot product in its own lane (steps 0-3: its first 16 elements, 4-7: its last 16). One int32 ->
// float conversion and one multiply-add by the 16 blocks' scales then finish the group, where a block per
// register (the int16 kernel) needs a conversion and a multiply-add per block. The transpose is done once per
// weight row and group and shared by every activation row of a tile. Measured on Zen 4 (2 threads, Q4_1
// 8192 x 2048 from DRAM): one row 37 -> 43 GMAC/s, eight rows 59 -> 100.
// The 6-bit kind (Q6_K) adds each element's crumb (bits 4-5) to its nibble per step, keeps the two halves'
// sums apart (each half has its own int8 multiplier), and subtracts its zero point as 32 * sum(qx) of the half
// (XQuant::half_sums): (q - 32) * qx summed over 16 elements stays under 2^24, so its float conversion is exact.
// The 3-bit kind (Q3_K) the same way, from its crumbs (bits 0-1) and high bits, zero point 4; the 2-bit kind
// (Q2_K) from its crumbs alone, each half by d times its 4-bit scale, its min a third term, -dmin * min * sum(qx)
// of the half. The IQ4 kinds look their nibbles' values up (one vpshufb per step), signed bytes: their hi
// products take v + 128 as the unsigned operand, less 128 * the block's sum of hi bytes (per product, from the
// activations; a sum of the values per weight row took 8 more vpdpbusd a group: 8 rows of 8192 x 2048 IQ4_XS
// 1.23-1.24 -> 1.10-1.12 ms, IQ4_NL 1.18-1.21 -> 1.06-1.10). A
// 2048 x 8192 Q6_K product from DRAM at one row: 0.80 ms with the int16 kernel, 0.59 ms as 8-bit blocks,
// 0.54-0.59 ms this way (with the software prefetch below). The 5-bit kinds add each element's high bit (bit 4)
// to its nibble per step, one shift and one ternary-logic op: a Q5_0 8192 x 2048 product from DRAM, 1 / 8 rows,
// 0.39-0.40 / 1.73-1.78 ms with the int16 kernel (a bit plane, one masked add per block), 0.335 / 1.28-1.34 ms
// this way; Q5_1 0.39 / 1.84-1.87 -> 0.36-0.39 / 1.31-1.38 ms.
// The 8-bit kind goes across lanes as KIND_Q8_LANES, its bytes laid out at load in the order a group is taken in
// (lanes_of), signed bytes as the IQ4 kinds' are: transposed here per product instead (KIND_Q8's order), its 16 x 8
// transpose cost what the conversions save, so KIND_Q8 keeps the int16 kernel. Against it (2 threads, this
// project's Intel VM, 1 / 8 / 16 rows): 49152 x 576 (SmolLM2's head) from DRAM 1.11 / 3.22 / 6.47 -> 1.06 / 2.18 /
// 4.45 ms, 8192 x 2048 0.80 / 1.80 / 3.48 -> 0.67 / 1.17 / 2.27 ms.
// (The ceiling either way: one vpdpbusd or vpdpwssd per cycle on Zen 4, so int16 activations get at most 32
// multiply-adds per cycle, int8 ones 64.)

constexpr bool across_kind(int64_t kind) { return kind != KIND_Q8; }

void transpose_16x8(const __m512i z[8], __m512i out[8]);

// The activations' hi and lo bytes, each group of 16 blocks across lanes (XQuant::hi_across, lo_across), and
// sum(qx) of each block's halves (XQuant::half_sums).
void split_bytes(XQuant& xq, int64_t rows) {
    const int64_t n = rows * xq.blocks;
    alignas(64) int8_t hi[512];
    alignas(64) uint8_t lo[512];
    const __m512i ones = _mm512_set1_epi8(1);
    for (int64_t g = 0; g < n; g += 16) {  // rows are whole groups of 16 blocks
        for (int b = 0; b < 16; b++) {
            const __m512i q = _mm512_loadu_si512(xq.q + 32 * (g + b));
            _mm256_store_si256(reinterpret_cast<__m256i*>(hi + 32 * b), _mm512_cvtepi16_epi8(_mm512_srai_epi16(q, 8)));
            _mm256_store_si256(reinterpret_cast<__m256i*>(lo + 32 * b), _mm512_cvtepi16_epi8(q));
        }
        __m512i sum_hi[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()}, sum_lo[2] = {sum_hi[0], sum_hi[1]};
        for (int part = 0; part < 2; part++) {
            const uint8_t* from = part ? lo : reinterpret_cast<const uint8_t*>(hi);
            uint8_t* to = part ? xq.lo_across : reinterpret_cast<uint8_t*>(xq.hi_across);
            __m512i z[8], t[8];
            for (int u = 0; u < 8; u++) z[u] = _mm512_load_si512(from + 64 * u);
            transpose_16x8(z, t);
            for (int u = 0; u < 8; u++) {
                _mm512_store_si512(to + 32 * g + 64 * u, t[u]);
                if (part) sum_lo[u / 4] = _mm512_dpbusd_epi32(sum_lo[u / 4], t[u], ones);  // unsigned lo bytes
                else sum_hi[u / 4] = _mm512_dpbusd_epi32(sum_hi[u / 4], ones, t[u]);       // signed hi bytes
            }
        }
        for (int h = 0; h < 2; h++)
            _mm512_store_si512(xq.half_sums + 2 * g + 16 * h, _mm512_add_epi32(_mm512_slli_epi32(sum_hi[h], 8), sum_lo[h]));
        _mm512_store_si512(xq.hi_sums + g, _mm512_add_epi32(sum_hi[0], sum_hi[1]));
    }
    if (xq.tail_hi == nullptr) return;
    // each row's last group (its tail in lanes 0..t-1, zero activations past it) with lane L taking lane L % t
    const int64_t last = xq.nb / 16 * 16, t = xq.nb - last;
    alignas(64) int32_t idx[16];
    for (int l = 0; l < 16; l++) idx[l] = l < 16 / t * t ? static_cast<int32_t>(l % t) : 15;  // lane 15: padding, 0
    const __m512i pick = _mm512_load_si512(idx);
    for (int64_t r = 0; r < rows; r++) {
        const int64_t xo = r * xq.blocks + last;
        for (int st = 0; st < 8; st++) {
            _mm512_store_si512(xq.tail_hi + 512 * r + 64 * st,
                               _mm512_permutexvar_epi32(pick, _mm512_load_si512(xq.hi_across + 32 * xo + 64 * st)));
            _mm512_store_si512(xq.tail_lo + 512 * r + 64 * st,
                               _mm512_permutexvar_epi32(pick, _mm512_load_si512(xq.lo_across + 32 * xo + 64 * st)));
        }
        _mm512_store_ps(xq.tail_d + 16 * r, _mm512_permutexvar_ps(pick, _mm512_loadu_ps(xq.d + xo)));
        _mm512_store_ps(xq.tail_s + 16 * r, _mm512_permutexvar_ps(pick, _mm512_loadu_ps(xq.s + xo)));
        _mm512_store_si512(xq.tail_hs + 16 * r, _mm512_permutexvar_epi32(pick, _mm512_load_si512(xq.hi_sums + xo)));
    }
}

// Dwords [block][t] of 4 registers (4 blocks x 4 dwords each) -> out[t] = dword t of blocks 0..15.
inline void transpose_16x4(const __m512i z[4], __m512i out[4]) {
    // a: t = 0 (lanes 0-7) and 1 (8-15) of 8 blocks; b: t = 2 and 3
    const __m512i i01 = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29);
    const __m512i i23 = _mm512_add_epi32(i01, _mm512_set1_epi32(2));
    const __m512i a0 = _mm512_permutex2var_epi32(z[0], i01, z[1]), b0 = _mm512_permutex2var_epi32(z[0], i23, z[1]);
    const __m512i a1 = _mm512_permutex2var_epi32(z[2], i01, z[3]), b1 = _mm512_permutex2var_epi32(z[2], i23, z[3]);
    out[0] = _mm512_shuffle_i64x2(a0, a1, 0x44);
    out[1] = _mm512_shuffle_i64x2(a0, a1, 0xEE);
    out[2] = _mm512_shuffle_i64x2(b0, b1, 0x44);
    out[3] = _mm512_shuffle_i64x2(b0, b1, 0xEE);
}

// Dwords [block][s] of 8 registers (2 blocks x 8 dwords each) -> out[s] = dword s of blocks 0..15.
void transpose_16x8(const __m512i z[8], __m512i out[8]) {
    // 4 blocks (two registers) -> [s][4 blocks] for s = 0..3 and 4..7
    const __m512i i03 = _mm512_setr_epi32(0, 8, 16, 24, 1, 9, 17, 25, 2, 10, 18, 26, 3, 11, 19, 27);
    const __m512i i47 = _mm512_add_epi32(i03, _mm512_set1_epi32(4));
    __m512i a[4][2];
    for (int q = 0; q < 4; q++) {
        a[q][0] = _mm512_permutex2var_epi32(z[2 * q], i03, z[2 * q + 1]);
        a[q][1] = _mm512_permutex2var_epi32(z[2 * q], i47, z[2 * q + 1]);
    }
    // 8 blocks (two of those) -> [s][8 blocks] for two values of s
    const __m512i i_lo = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i i_hi = _mm512_add_epi32(i_lo, _mm512_set1_epi32(8));
    for (int h = 0; h < 2; h++) {
        const __m512i e0 = _mm512_permutex2var_epi32(a[0][h], i_lo, a[1][h]), e1 = _mm512_permutex2var_epi32(a[0][h], i_hi, a[1][h]);
        const __m512i f0 = _mm512_permutex2var_epi32(a[2][h], i_lo, a[3][h]), f1 = _mm512_permutex2var_epi32(a[2][h], i_hi, a[3][h]);
        out[4 * h + 0] = _mm512_shuffle_i64x2(e0, f0, 0x44);
        out[4 * h + 1] = _mm512_shuffle_i64x2(e0, f0, 0xEE);
        out[4 * h + 2] = _mm512_shuffle_i64x2(e1, f1, 0x44);
        out[4 * h + 3] = _mm512_shuffle_i64x2(e1, f1, 0xEE);
    }
}

// The inverse, from memory to memory: a step-major group of 16 blocks (KIND_Q8_LANES; 8 x 64 bytes, step s holding
// dword s of blocks 0..15) -> the 16 blocks in block order (16 x 32 bytes). Each 256-bit half (blocks 0-7, 8-15)
// is an 8 x 8 transpose of dwords: unpacks within 128-bit lanes gather a block's steps 0-3 (e) and 4-7 (f) in
// one lane, then lanes are paired into blocks.
void untranspose_group(const uint8_t* p, uint8_t* out) {
    __m512i t[8], e[4], f[4];
    for (int st = 0; st < 8; st++) t[st] = _mm512_loadu_si512(p + 64 * st);
    for (int half = 0; half < 2; half++) {  // steps 0-3 -> e, 4-7 -> f
        const __m512i* x = t + 4 * half;
        __m512i* y = half ? f : e;
        const __m512i a0 = _mm512_unpacklo_epi32(x[0], x[1]), a1 = _mm512_unpackhi_epi32(x[0], x[1]);
        const __m512i b0 = _mm512_unpacklo_epi32(x[2], x[3]), b1 = _mm512_unpackhi_epi32(x[2], x[3]);
        y[0] = _mm512_unpacklo_epi64(a0, b0);  // 128-bit lane c: steps of block 4c (4c + 1, 2, 3 in y[1..3])
        y[1] = _mm512_unpackhi_epi64(a0, b0);
        y[2] = _mm512_unpacklo_epi64(a1, b1);
        y[3] = _mm512_unpackhi_epi64(a1, b1);
    }
    // r[j]: blocks j (bits 0-255) and j + 8; r[j + 4]: blocks j + 4 and j + 12 (each e's lane then f's)
    const __m512i low = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13);
    const __m512i high = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
    __m512i r[8];
    for (int j = 0; j < 4; j++) {
        r[j] = _mm512_permutex2var_epi64(e[j], low, f[j]);
        r[j + 4] = _mm512_permutex2var_epi64(e[j], high, f[j]);
    }
    for (int u = 0; u < 4; u++) {  // blocks 2u, 2u + 1, and 8 + 2u, 9 + 2u
        _mm512_storeu_si512(out + 64 * u, _mm512_shuffle_i64x2(r[2 * u], r[2 * u + 1], 0x44));
        _mm512_storeu_si512(out + 256 + 64 * u, _mm512_shuffle_i64x2(r[2 * u], r[2 * u + 1], 0xEE));
    }
}

// `dwords` (<= 16) dwords from p, the rest of the register zero: nothing past them is read.
inline __m512i load_dwords(const uint8_t* p, int64_t dwords) {
    return dwords >= 16 ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi32(static_cast<__mmask16>((1u << dwords) - 1), p);
}

// The 8 steps of blocks g..g+left-1 of a weight row of nb blocks, q as bytes (`left` <= 16; lanes past it are
// zero): the nibbles, and for the 5-bit kinds each element's high bit at bit 4, for the 6-bit kind its crumb at
// bits 4-5; for the 3-bit kind each element's crumb at bits 0-1 and its high bit at bit 2. Shifts of whole dwords
// move a byte's bits only within the byte where the mask keeps them.
template <int64_t KIND>
inline void load_across(const uint8_t* row, int64_t nb, int64_t g, int left, __m512i w[8]) {
    const uint8_t* p = row + block_at(KIND, g);  // g is a multiple of 16
    if constexpr (KIND == KIND_Q8_LANES) {  // step-major already (lanes_of(nb, g) == left)
        for (int st = 0; st < 8; st++) w[st] = load_dwords(p + 4 * left * st, left);
        return;
    }
    if constexpr (has_nibbles(KIND)) {
        static_assert(block_at(KIND, 1) == 16, "nibble blocks of 4 dwords");
        __m512i z[4], t[4];  // z: 4 blocks each, 4 dwords per block
        for (int quad = 0; quad < 4; quad++)
            z[quad] = load_dwords(p + 64 * quad, 4 * std::max(0, std::min(4, left - 4 * quad)));
        transpose_16x4(z, t);
        const __m512i low = _mm512_set1_epi8(0x0F);
        for (int u = 0; u < 4; u++) {  // byte j of a block: element j (low nibble), element j + 16 (high nibble)
            w[u] = _mm512_and_si512(t[u], low);
            w[u + 4] = _mm512_and_si512(_mm512_srli_epi16(t[u], 4), low);
        }
        if constexpr (nonlinear(KIND)) {  // each nibble's value, a signed byte
            const __m512i table = _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(IQ4_NL_VALUES)));
            for (int st = 0; st < 8; st++) w[st] = _mm512_shuffle_epi8(table, w[st]);
        }
    }
    if constexpr (has_crumbs(KIND)) {
        // 2 crumb dwords per block -> c[h] = dword h (the crumbs of elements 16h..16h+15) of blocks 0..15
        const uint8_t* cp = KIND == KIND_Q6 ? row + second_at(KIND, nb, g) : p;
        const __m512i z0 = load_dwords(cp, 2 * std::min(8, left)), z1 = load_dwords(cp + 64, 2 * std::max(0, left - 8));
        const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        const __m512i c[2] = {_mm512_permutex2var_epi32(z0, even, z1),
                              _mm512_permutex2var_epi32(z0, _mm512_add_epi32(even, _mm512_set1_epi32(1)), z1)};
        if constexpr (KIND == KIND_Q2_K) {  // step 4h + s: bits 2s and 2s + 1 of each crumb byte, moved to bits 0-1
            const __m512i bits01 = _mm512_set1_epi8(0x03);
            for (int st = 0; st < 8; st++) w[st] = _mm512_and_si512(_mm512_srli_epi32(c[st / 4], 2 * (st % 4)), bits01);
        } else if constexpr (KIND == KIND_Q6) {
            // step 4h + s takes bits 2s and 2s + 1 of each crumb byte, moved to bits 4-5
            const __m512i bits45 = _mm512_set1_epi8(0x30);
            for (int h = 0; h < 2; h++) {
                const __m512i at[4] = {_mm512_slli_epi32(c[h], 4), _mm512_slli_epi32(c[h], 2), c[h], _mm512_srli_epi32(c[h], 2)};
                for (int s = 0; s < 4; s++) w[4 * h + s] = _mm512_ternarylogic_epi32(w[4 * h + s], at[s], bits45, 0xF8);  // a | (b & c)
            }
        } else {
            // one high-bit dword per block: 16 blocks are one register already across lanes; step s takes bit s
            // of each byte, moved to bit 2, and crumb bits 2(s%4), 2(s%4) + 1, moved to bits 0-1
            const __m512i hb = load_dwords(row + second_at(KIND, nb, g), left);
            const __m512i bit2 = _mm512_set1_epi8(0x04), bits01 = _mm512_set1_epi8(0x03);
            for (int st = 0; st < 8; st++) {
                const __m512i h = st <= 2 ? _mm512_slli_epi32(hb, 2 - st) : _mm512_srli_epi32(hb, st - 2);
                const __m512i cr = _mm512_srli_epi32(c[st / 4], 2 * (st % 4));
                w[st] = _mm512_ternarylogic_epi32(cr, _mm512_and_si512(h, bit2), bits01, 0xEC);  // (a & c) | b
            }
        }
    }
    if constexpr (has_high_bits(KIND) && has_nibbles(KIND)) {
        // the 5-bit kinds: one high-bit dword per block, 16 blocks in one register; step s takes bit s of each
        // byte, moved to bit 4
        const __m512i hb = load_dwords(row + second_at(KIND, nb, g), left);
        const __m512i bit4 = _mm512_set1_epi8(0x10);
        for (int st = 0; st < 8; st++) {
            const __m512i h = st <= 4 ? _mm512_slli_epi32(hb, 4 - st) : _mm512_srli_epi32(hb, st - 4);
            w[st] = _mm512_ternarylogic_epi32(w[st], h, bit4, 0xF8);  // a | (b & c)
        }
    }
}

// One activation row's bytes (xh, xl: a group's 8 steps, XQuant::hi_across and lo_across) against a group's 8
// weight steps: each half's (steps 0-3, 4-7) sum(q * qx) per lane = 256 * sum(q * hi) + sum(lo * q). hw: the
// weight steps as vpdpbusd's unsigned operand against the signed hi bytes (w, or w + 128 for the IQ4 kinds' signed
// values); the unsigned lo bytes take w. Each half's hi and lo sums are chains of their own, so consecutive
// vpdpbusd do not wait on each other.
inline void half_dots(const __m512i hw[8], const __m512i w[8], const int8_t* xh, const uint8_t* xl, __m512i& u0,
                      __m512i& u1) {
    __m512i h0 = _mm512_setzero_si512(), h1 = _mm512_setzero_si512();
    __m512i l0 = _mm512_setzero_si512(), l1 = _mm512_setzero_si512();
    for (int st = 0; st < 4; st++) {
        h0 = _mm512_dpbusd_epi32(h0, hw[st], _mm512_load_si512(xh + 64 * st));
        h1 = _mm512_dpbusd_epi32(h1, hw[st + 4], _mm512_load_si512(xh + 64 * st + 256));
        l0 = _mm512_dpbusd_epi32(l0, _mm512_load_si512(xl + 64 * st), w[st]);
        l1 = _mm512_dpbusd_epi32(l1, _mm512_load_si512(xl + 64 * st + 256), w[st + 4]);
    }
    u0 = _mm512_add_epi32(_mm512_slli_epi32(h0, 8), l0);
    u1 = _mm512_add_epi32(_mm512_slli_epi32(h1, 8), l1);
}

// Software prefetch of what the group of 16 blocks PREFETCH_BLOCKS after block g of weight row n reads: its
// bytes, scales and offsets or multipliers (past the row's end: the next row's, read next). A row's qs, d and m
// are three streams, which this VM's hardware prefetcher alone follows poorly: from DRAM at one activation row,
// 2 threads, a 2048 x 8192 Q4_K product took 0.435 ms without, 0.393 with; Q6_K 0.672 and 0.542-0.592 ms.
constexpr int64_t PREFETCH_BLOCKS = 64;

template <int64_t KIND>
inline void prefetch_group(const Weights& wt, int64_t nb, int64_t n, int64_t g) {
    const int64_t at = g + PREFETCH_BLOCKS;  // in this row's block numbers
    const char* q = reinterpret_cast<const char*>(wt.qs) + (n * nb + at) * block_bytes(KIND);
    for (int64_t c = 0; c < 16 * block_bytes(KIND); c += 64) _mm_prefetch(q + c, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(has_super_scales(KIND) ? wt.d + 2 * ((n * nb + at) / 8)
                                               : block_scales(KIND) ? wt.d + (n * nb + at) / 8 : wt.d + n * nb + at), _MM_HINT_T0);
    if (has_super_scales(KIND)) _mm_prefetch(reinterpret_cast<const char*>(wt.sub + 2 * (n * nb + at)), _MM_HINT_T0);
    if (block_scales(KIND)) _mm_prefetch(reinterpret_cast<const char*>(wt.sub + n * nb + at), _MM_HINT_T0);
    if (has_multipliers(KIND)) _mm_prefetch(reinterpret_cast<const char*>(wt.mult + 2 * (n * nb + at)), _MM_HINT_T0);
    if (has_offsets(KIND)) _mm_prefetch(reinterpret_cast<const char*>(wt.offsets + n * nb + at), _MM_HINT_T0);
}

// y[b, n] for the NB activation rows from b0, one weight row, groups of 16 blocks across lanes. Integer sums are
// exact, and each (row, activation row) pair accumulates its groups in the same order whatever NB: the same
// bits for a row alone or in any tile.
template <int64_t KIND, int NB>
inline void rows_tile_across(const Weights& wt, int64_t k, const XQuant& xq, int64_t b0, float* y, int64_t n_out,
                             int64_t n) {
    const int64_t nb = k / 32;
    const uint8_t* row = wt.qs + n * nb * block_bytes(KIND);
    const int8_t* mult = row_multipliers<KIND>(wt, n, nb);
    __m512 acc[NB];
    for (int b = 0; b < NB; b++) acc[b] = _mm512_setzero_ps();
    // A last group of a few blocks would cost a whole group's transpose and steps: those blocks take the int16
    // kernel's way instead, a block per register, or add_tails' (K = 576: 16 blocks across lanes and 2 in
    // add_tails, see packed_tail). Q2_K's rows are
    // whole super-blocks of 8 blocks, so its last group has 8 or 16 blocks: always across lanes (the block-at-a-
    // time way has no term for its halves' mins).
    const int64_t across_end = nb % 16 > TAIL_ALONE_MAX || half_scales(KIND) ? nb : nb / 16 * 16;
    const int64_t alone_end = packed_tail_kind(KIND) && packed_tail(nb % 16) ? across_end : nb;  // add_tails' part
    for (int64_t i = across_end; i < alone_end; i++) {
        const float d = avx2::block_scale<KIND>(wt, n * nb + i);
        const __m512i w = load_block<KIND>(row, nb, mult, i);
        for (int b = 0; b < NB; b++) {
            const int64_t xo = (b0 + b) * xq.blocks + i;
            const __m512i dot = _mm512_dpwssd_epi32(_mm512_setzero_si512(), w, _mm512_loadu_si512(xq.q + xo * 32));
            acc[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(d * xq.d[xo]), acc[b]);
            if (offset_term(KIND))
                acc[b] = _mm512_mask_add_ps(acc[b], 1, acc[b], _mm512_set1_ps(avx2::block_offset<KIND>(wt, n * nb + i, d) * xq.s[xo]));
        }
    }
    for (int64_t g = 0; g < across_end; g += 16) {
        const int left = static_cast<int>(std::min<int64_t>(16, nb - g));
        const __mmask16 lm = static_cast<__mmask16>((1u << left) - 1);
        prefetch_group<KIND>(wt, nb, n, g);
        __m512i w[8];
        load_across<KIND>(row, nb, g, left, w);
        // per lane: the scale of each half (6-bit: d times its multiplier), and the offset (Q2_K: -dmin, and its
        // halves' mins)
        __m512 d16, scale[2], m16 = _mm512_setzero_ps();
        __m512i mins[2];
        if constexpr (has_super_scales(KIND)) {  // g is a multiple of 16: super-blocks g/8 and g/8 + 1
            const int64_t sb = (n * nb + g) / 8;
            const __m512 dd = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(left > 8 ? 0xF : 0x3, wt.d + 2 * sb));
            const __m512i first = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2);
            d16 = _mm512_permutexvar_ps(first, dd);
            const __m512 dmin = _mm512_permutexvar_ps(_mm512_add_epi32(first, _mm512_set1_epi32(1)), dd);
            // 2 bytes per block -> dword l = block l's two bytes as two int16 (Q4_K, Q5_K: scale, min; Q2_K: each
            // half's scale | min << 4)
            const __m512i pair = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(static_cast<__mmask32>((uint64_t(1) << (2 * left)) - 1), wt.sub + 2 * (n * nb + g)));
            if constexpr (half_scales(KIND)) {
                const __m512i low16 = _mm512_set1_epi32(0xFFFF), sc = _mm512_and_si512(pair, _mm512_set1_epi32(0x000F000F));
                const __m512i mn = _mm512_and_si512(_mm512_srli_epi32(pair, 4), _mm512_set1_epi32(0x000F000F));
                scale[0] = _mm512_mul_ps(d16, _mm512_cvtepi32_ps(_mm512_and_si512(sc, low16)));
                scale[1] = _mm512_mul_ps(d16, _mm512_cvtepi32_ps(_mm512_srli_epi32(sc, 16)));
                mins[0] = _mm512_and_si512(mn, low16);
                mins[1] = _mm512_srli_epi32(mn, 16);
                m16 = _mm512_sub_ps(_mm512_setzero_ps(), dmin);
            } else {
                scale[0] = scale[1] = _mm512_mul_ps(d16, _mm512_cvtepi32_ps(_mm512_and_si512(pair, _mm512_set1_epi32(0xFFFF))));
                m16 = _mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), dmin), _mm512_cvtepi32_ps(_mm512_srli_epi32(pair, 16)));
            }
        } else if constexpr (block_scales(KIND)) {  // IQ4_XS: d of super-blocks g/8 and g/8 + 1 times (ls - 32)
            const int64_t wo = n * nb + g;
            const __m512 dd = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(left > 8 ? 0x3 : 0x1, wt.d + wo / 8));
            const __m512i ls = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(lm, wt.sub + wo));
            d16 = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1), dd),
                                _mm512_cvtepi32_ps(_mm512_sub_epi32(ls, _mm512_set1_epi32(32))));
            scale[0] = scale[1] = d16;
        } else {
            d16 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lm, wt.d + n * nb + g));
            scale[0] = scale[1] = d16;
        }
        // The IQ4 kinds' values are signed bytes: they go in as v + 128, unsigned, against the signed hi bytes,
        // 256 * sum(hi * v) = 256 * sum(hi * (v + 128)) - 32768 * sum(hi), sum(hi) per block from the activations
        // (XQuant::hi_sums, once per product); the unsigned lo bytes take v as it is.
        __m512i wu[8];
        if constexpr (signed_bytes(KIND))
            for (int st = 0; st < 8; st++) wu[st] = _mm512_xor_si512(w[st], _mm512_set1_epi8(static_cast<char>(0x80)));
        if constexpr (has_multipliers(KIND)) {
            // 2 int8 per block -> dword l = block l's pair as two int16
            const __m512i pair = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(static_cast<__mmask32>((uint64_t(1) << (2 * left)) - 1), mult + 2 * g));
            scale[0] = _mm512_mul_ps(d16, _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(pair, 16), 16)));
            scale[1] = _mm512_mul_ps(d16, _mm512_cvtepi32_ps(_mm512_srai_epi32(pair, 16)));
        } else if constexpr (!has_super_scales(KIND) && offset_term(KIND)) {
            m16 = has_offsets(KIND) ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lm, wt.offsets + n * nb + g))
                                    : _mm512_mul_ps(d16, _mm512_set1_ps(-static_cast<float>(zero_point(KIND))));
        }
        for (int b = 0; b < NB; b++) {
            const int64_t xo = (b0 + b) * xq.blocks + g;
            __m512i u0, u1;
            half_dots(signed_bytes(KIND) ? wu : w, w, xq.hi_across + xo * 32, xq.lo_across + xo * 32, u0, u1);
            const __m512 dx = _mm512_loadu_ps(xq.d + xo);
            if constexpr (has_multipliers(KIND)) {  // zero points 32 and 4: the half sums shifted
                constexpr int z_shift = KIND == KIND_Q6 ? 5 : 2;
                static_assert(zero_point(KIND) == 1 << z_shift, "a power of two");
                u0 = _mm512_sub_epi32(u0, _mm512_slli_epi32(_mm512_load_si512(xq.half_sums + 2 * xo), z_shift));
                u1 = _mm512_sub_epi32(u1, _mm512_slli_epi32(_mm512_load_si512(xq.half_sums + 2 * xo + 16), z_shift));
                acc[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(u0), _mm512_mul_ps(scale[0], dx), acc[b]);
                acc[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(u1), _mm512_mul_ps(scale[1], dx), acc[b]);
            } else if constexpr (half_scales(KIND)) {  // Q2_K: each half by its scale, and -dmin * its min * sum(qx)
                // q * qx over 16 elements is under 2^21, min * sum(qx) over two halves under 2^24: exact floats
                const __m512i mq = _mm512_add_epi32(_mm512_mullo_epi32(mins[0], _mm512_load_si512(xq.half_sums + 2 * xo)),
                                                    _mm512_mullo_epi32(mins[1], _mm512_load_si512(xq.half_sums + 2 * xo + 16)));
                acc[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(u0), _mm512_mul_ps(scale[0], dx), acc[b]);
                acc[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(u1), _mm512_mul_ps(scale[1], dx), acc[b]);
                acc[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(mq), _mm512_mul_ps(m16, dx), acc[b]);
            } else {
                __m512i t = _mm512_add_epi32(u0, u1);
                if constexpr (signed_bytes(KIND))
                    t = _mm512_sub_epi32(t, _mm512_slli_epi32(_mm512_load_si512(xq.hi_sums + xo), 15));
                acc[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_mul_ps(scale[0], dx), acc[b]);
                if constexpr (offset_term(KIND)) acc[b] = _mm512_fmadd_ps(m16, _mm512_loadu_ps(xq.s + xo), acc[b]);
            }
        }
    }
    for (int b = 0; b < NB; b++) y[(b0 + b) * n_out + n] = _mm512_reduce_add_ps(acc[b]);
}
// y[b, n + r] += the tails of weight rows n..n+count-1 (count <= 16 / t, t = K/32 % 16, packed_tail(t)) for
// activation rows b_begin..b_end-1, after rows_tile_across left them out: the rows' tails make one group, block
// r*t + j (lane r*t + j) being block 16g + j of row n + r, against each activation row's tail repeated in the same
// lanes (XQuant::tail_hi). Each lane is computed as if alone, and a row's lanes are added in order and then to its
// sum: the same bits whatever the other rows of the group, the batch or the thread split. K = 576 (16 + 2 blocks),
// Q4_1 3072 x 576 from cache, 2 threads, 1 / 8 rows: 47.8 / 197 us a block at a time against 38.2 / 143 for
// K = 512.
template <int64_t KIND, int T>
inline void add_tails(const Weights& wt, int64_t k, const XQuant& xq, int64_t b_begin, int64_t b_end, float* y,
                      int64_t n_out, int64_t n, int count) {
    constexpr int64_t t = T;  // the tail's blocks: a constant, so that the copies below are a few moves each
    const int64_t nb = k / 32, last = nb / 16 * 16, lanes = count * t;
    constexpr int64_t first = first_part(KIND), second = block_bytes(KIND) - first_part(KIND);
    // the rows' tails as one group's bytes (all first parts, then all second parts: block_at and second_at of a
    // row of 16 blocks), scales and offsets; lanes past `lanes` zero
    alignas(64) uint8_t group[16 * block_bytes(KIND)] = {};
    alignas(32) uint16_t d[16] = {}, offsets[16] = {};
    for (int r = 0; r < count; r++) {
        const uint8_t* row = wt.qs + (n + r) * nb * block_bytes(KIND);
        std::memcpy(group + first * r * t, row + block_at(KIND, last), first * t);
        if (second) std::memcpy(group + 16 * first + second * r * t, row + second_at(KIND, nb, last), second * t);
        std::memcpy(d + r * t, wt.d + (n + r) * nb + last, 2 * t);
        if (has_offsets(KIND)) std::memcpy(offsets + r * t, wt.offsets + (n + r) * nb + last, 2 * t);
    }
    __m512i w[8];
    if constexpr (KIND == KIND_Q8_LANES) {  // tails are kept block after block: transposed here
        __m512i z[8];
        for (int u = 0; u < 8; u++) z[u] = _mm512_load_si512(group + 64 * u);
        transpose_16x8(z, w);
    } else {
        load_across<KIND>(group, 16, 0, static_cast<int>(lanes), w);
    }
    const __m512 d16 = _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(d)));
    const __m512 m16 = has_offsets(KIND) ? _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(offsets)))
                                         : _mm512_mul_ps(d16, _mm512_set1_ps(-static_cast<float>(zero_point(KIND))));
    __m512i wu[8];  // signed bytes: as in rows_tile_across
    if constexpr (signed_bytes(KIND))
        for (int st = 0; st < 8; st++) wu[st] = _mm512_xor_si512(w[st], _mm512_set1_epi8(static_cast<char>(0x80)));
    for (int64_t b = b_begin; b < b_end; b++) {
        __m512i u0, u1;
        half_dots(signed_bytes(KIND) ? wu : w, w, xq.tail_hi + 512 * b, xq.tail_lo + 512 * b, u0, u1);
        __m512i dot = _mm512_add_epi32(u0, u1);
        if constexpr (signed_bytes(KIND))
            dot = _mm512_sub_epi32(dot, _mm512_slli_epi32(_mm512_load_si512(xq.tail_hs + 16 * b), 15));
        __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(d16, _mm512_load_ps(xq.tail_d + 16 * b)));
        if constexpr (offset_term(KIND)) v = _mm512_fmadd_ps(m16, _mm512_load_ps(xq.tail_s + 16 * b), v);
        alignas(64) float lane[16];
        _mm512_store_ps(lane, v);
        for (int r = 0; r < count; r++) {
            float sum = lane[r * t];
            for (int64_t j = 1; j < t; j++) sum += lane[r * t + j];
            y[b * n_out + n + r] += sum;
        }
    }
}

// y[b, n..n+R-1] for the NB activation rows from b0. Each weight block is widened once and used for all NB
// activation rows; R weight rows at a time keep R*NB independent accumulator chains in flight and spread
// each row's fixed costs (scales, the final sum). The offset terms m * dx*sum(qx) go into the same
// accumulators, since only the sum of all lanes matters. Since every kind but KIND_Q8 goes across lanes,
// only KIND_Q8 takes this int16 body, and rows_all calls it with R = 1 (the R and offset generality is unused).
template <int64_t KIND, int R, int NB>
inline void rows_tile(const Weights& wt, int64_t k, const XQuant& xq, int64_t b0, float* y, int64_t n_out, int64_t n) {
    if constexpr (across_kind(KIND)) {  // one weight row at a time (rows_all)
        rows_tile_across<KIND, NB>(wt, k, xq, b0, y, n_out, n);
        return;
    }
    const int64_t nb = k / 32;
    const int64_t row_bytes = nb * block_bytes(KIND);
    // Even and odd blocks accumulate apart: with few rows at a time there would be too few independent fmadd
    // chains to hide their latency, and every tile size must add a row's blocks in the same order, so that a
    // row gets the same bits alone or in any batch (with one chain for tiles of 3-4 rows it did not).
    constexpr int S = 2;
    __m512 acc[R][NB], acc_odd[R][NB];
    for (int r = 0; r < R; r++)
        for (int b = 0; b < NB; b++) acc[r][b] = acc_odd[r][b] = _mm512_setzero_ps();
    for (int64_t g = 0; g < nb; g += 16) {
        const int left = static_cast<int>(std::min<int64_t>(16, nb - g));
        const __mmask16 lm = static_cast<__mmask16>((1u << left) - 1);
        for (int r = 0; r < R; r++) prefetch_group<KIND>(wt, nb, n + r, g);
        // Each block's scale d * dx, kept in memory so every block broadcasts its own with a load (a
        // register permute per block cost a shuffle-port operation, measured slower).
        alignas(64) float scale[R][NB][16];
        for (int r = 0; r < R; r++) {
            const int64_t wo = (n + r) * nb + g;
            const __m512 d16 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lm, wt.d + wo));
            for (int b = 0; b < NB; b++) {
                const int64_t xo = (b0 + b) * xq.blocks + g;
                _mm512_store_ps(scale[r][b], _mm512_mul_ps(d16, _mm512_loadu_ps(xq.d + xo)));
                if (offset_term(KIND)) {
                    const __m512 m16 = has_offsets(KIND)
                        ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lm, wt.offsets + wo))
                        : _mm512_mul_ps(d16, _mm512_set1_ps(-static_cast<float>(zero_point(KIND))));
                    acc[r][b] = _mm512_fmadd_ps(m16, _mm512_loadu_ps(xq.s + xo), acc[r][b]);
                }
            }
        }
        for (int j = 0; j < left; j++) {
            const int64_t i = g + j;
            __m512i xv[NB];
            for (int b = 0; b < NB; b++)
                xv[b] = _mm512_loadu_si512(xq.q + ((b0 + b) * xq.blocks + i) * 32);
            for (int r = 0; r < R; r++) {
                const __m512i w = load_block<KIND>(wt.qs + (n + r) * row_bytes, nb, row_multipliers<KIND>(wt, n + r, nb), i);
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

// Weight rows n..n+R-1 against activation rows b_begin..b_end-1, in tiles of NB activation rows.
template <int64_t KIND, int R>
inline void rows_block(const Weights& w, int64_t k, const XQuant& xq, int64_t b_begin, int64_t b_end, float* y,
                       int64_t n_out, int64_t n) {
    int64_t b0 = b_begin;
    for (; b0 + 4 <= b_end; b0 += 4) rows_tile<KIND, R, 4>(w, k, xq, b0, y, n_out, n);
    switch (b_end - b0) {
        case 3: rows_tile<KIND, R, 3>(w, k, xq, b0, y, n_out, n); break;
        case 2: rows_tile<KIND, R, 2>(w, k, xq, b0, y, n_out, n); break;
        case 1: rows_tile<KIND, R, 1>(w, k, xq, b0, y, n_out, n); break;
        default: break;
    }
}

// Batches whose activations would not stay in L1: passes of `pass` activation rows over blocks of weight rows,
// a block small enough to stay in L2 (2 MiB here) until the next pass reads it again; every weight row reads all
// of a pass's activation rows for each of its groups. 16 rows of a 8192 x 2048 product (4 KiB of activation
// bytes a row) from DRAM, 2 threads: Q4_1 2.6 -> 1.94 ms, Q8_0 3.9 -> 3.5 (8 rows: 1.0 and 1.8 ms either way).
// Kept out of line: inlined beside the one-pass loop of rows_all, it cost that loop 10-25% at one row (Q4_1
// 576 x 1536 from cache 15.7 -> 19.7 us).
constexpr int64_t PASS_BYTES = 40 << 10, WEIGHT_BLOCK_BYTES = 512 << 10;

inline int64_t pass_rows(const XQuant& xq) { return std::max<int64_t>(4, PASS_BYTES / (xq.blocks * 64) / 4 * 4); }

// Weight rows n0..n1-1 against activation rows b_begin..b_end-1 when their tails go to add_tails: 16 / t rows at
// a time, then their tails (from L1: the rows were just read).
template <int64_t KIND, int T>
__attribute__((noinline)) void rows_with_tails(const Weights& w, int64_t k, const XQuant& xq, int64_t b_begin,
                                               int64_t b_end, float* y, int64_t n_out, int64_t n0, int64_t n1) {
    constexpr int per = 16 / T;
    for (int64_t ns = n0; ns < n1; ns += per) {
        const int count = static_cast<int>(std::min<int64_t>(per, n1 - ns));
        for (int64_t n = ns; n < ns + count; n++) rows_block<KIND, 1>(w, k, xq, b_begin, b_end, y, n_out, n);
        add_tails<KIND, T>(w, k, xq, b_begin, b_end, y, n_out, ns, count);
    }
}

template <int64_t KIND>
void rows_with_tails(const Weights& w, int64_t k, const XQuant& xq, int64_t b_begin, int64_t b_end, float* y,
                     int64_t n_out, int64_t n0, int64_t n1) {
    static_assert(PACKED_TAIL_MAX == 4, "a case per tail length");
    if constexpr (packed_tail_kind(KIND)) {
        switch (k / 32 % 16) {
            case 1: rows_with_tails<KIND, 1>(w, k, xq, b_begin, b_end, y, n_out, n0, n1); break;
            case 2: rows_with_tails<KIND, 2>(w, k, xq, b_begin, b_end, y, n_out, n0, n1); break;
            case 3: rows_with_tails<KIND, 3>(w, k, xq, b_begin, b_end, y, n_out, n0, n1); break;
            case 4: rows_with_tails<KIND, 4>(w, k, xq, b_begin, b_end, y, n_out, n0, n1); break;
            default: break;
        }
    }
}

template <int64_t KIND>
inline bool tails_packed(int64_t k) { return packed_tail_kind(KIND) && packed_tail(k / 32 % 16); }

template <int64_t KIND>
__attribute__((noinline)) void rows_in_passes(const Weights& w, int64_t k, const XQuant& xq, int64_t m, float* y,
                                              int64_t n_out, int64_t n0, int64_t n1) {
    const int64_t pass = pass_rows(xq);
    const int64_t block_rows = std::max<int64_t>(4, WEIGHT_BLOCK_BYTES / (k / 32 * block_bytes(KIND)));
    for (int64_t nb0 = n0; nb0 < n1; nb0 += block_rows) {
        const int64_t nb1 = std::min(n1, nb0 + block_rows);
        for (int64_t b0 = 0; b0 < m; b0 += pass) {
            if (tails_packed<KIND>(k)) {
                rows_with_tails<KIND>(w, k, xq, b0, std::min(m, b0 + pass), y, n_out, nb0, nb1);
                continue;
            }
            for (int64_t n = nb0; n < nb1; n++) rows_block<KIND, 1>(w, k, xq, b0, std::min(m, b0 + pass), y, n_out, n);
        }
    }
}

template <int64_t KIND>
void rows_all(const Weights& w, int64_t k, const XQuant& xq, int64_t m, float* y, int64_t n_out, int64_t n0,
              int64_t n1) {
    // Matrix-vector products (1-2 activation rows) take one weight row at a time: the hardware prefetcher
    // follows one sequential stream far better than several interleaved rows (Zen 4 VM, one thread streaming
    // fp16 rows from DRAM: 23 GB/s one row at a time, 10 for 4 rows; 40 vs 12 in 2 MiB pages). All products of
    // a 1B Q4_K/Q6_K file at one row: 35.7 ms in tiles of 4 rows, 27.1 ms one by one; SmolLM2 Q4_1 5.0 either
    // way. Across lanes, a weight row's transpose serves every activation row; the 8-bit kind's rows go one at
    // a time as well.
    if (m > pass_rows(xq)) {
        rows_in_passes<KIND>(w, k, xq, m, y, n_out, n0, n1);
        return;
    }
    if (tails_packed<KIND>(k)) {
        rows_with_tails<KIND>(w, k, xq, 0, m, y, n_out, n0, n1);
        return;
    }
    for (int64_t n = n0; n < n1; n++) rows_block<KIND, 1>(w, k, xq, 0, m, y, n_out, n);
}

// Rows of blocks -> float32 or bfloat16 (round to nearest even), 16 values per instruction.
// 16 floats -> their bf16 bits, rounded to nearest even as PyTorch rounds (a NaN stays a NaN).
inline __m256i bf16_bits(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));  // ties go to the even
    __m512i b = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd)), 16);
    b = _mm512_mask_mov_epi32(b, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(b);
}

template <int64_t KIND>
void dequantize_rows(const Weights& w, int64_t k, int64_t r0, int64_t r1, float* out_f32, uint16_t* out_bf16) {
    const int64_t nb = k / 32;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t* row = w.qs + r * nb * block_bytes(KIND);
        const int8_t* mult = row_multipliers<KIND>(w, r, nb);
        alignas(64) uint8_t block_order[16 * 32];  // KIND_Q8_LANES: a whole group put back (a block's gather is slow)
        for (int64_t i = 0; i < nb; i++) {
            const float dv = avx2::block_scale<KIND>(w, r * nb + i);
            const __m512 d = _mm512_set1_ps(dv);
            const float mo = avx2::block_offset<KIND>(w, r * nb + i, dv);
            __m512i q;
            if (KIND == KIND_Q8_LANES && lanes_of(nb, i - i % 16) == 16) {
                if (i % 16 == 0) untranspose_group(row + 32 * i, block_order);
                const uint8_t* b = block_order + 32 * (i % 16);
                q = _mm512_cvtepi8_epi16(_mm256_load_si256(reinterpret_cast<const __m256i*>(b)));
            } else {
                q = load_block<KIND>(row, nb, mult, i);
            }
            for (int h = 0; h < 2; h++) {  // elements 0-15, 16-31
                const __m512i q32 = _mm512_cvtepi16_epi32(h ? _mm512_extracti64x4_epi64(q, 1) : _mm512_castsi512_si256(q));
                const __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q32), d, _mm512_set1_ps(mo + avx2::half_offset<KIND>(w, r * nb + i, h)));
                const int64_t off = r * k + 32 * i + 16 * h;
                if (out_f32) {
                    _mm512_storeu_ps(out_f32 + off, v);
                } else {
                    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out_bf16 + off), bf16_bits(v));
                }
            }
        }
    }
}

}  // namespace avx512
#pragma GCC pop_options

// ---- 2- and 4-byte float weights (HF folders, F16/BF16 GGUFs) ----
//
// A float kind's "qs" is the plain (N, K) weight matrix in its stored type: bfloat16, float16 or float32; it
// has no d or m, and K may be any length. Activations stay float32 and each weight is widened to float32 (a
// shift for bf16, F16C for fp16) before an FMA, so every product is exact and only the summation order differs
// from the float32 reference: these kernels are bandwidth-bound (2 bytes read per multiply-add), and the
// widening is cheaper than the memory traffic it rides on. On CPUs with AVX-512 BF16, bf16 weights times
// 1-2 activation rows use dpbf16 instead, each activation split into two bf16 parts, hi = bf16(x) and
// lo = bf16(x - hi) (two dot products per pair of weights, |x - hi - lo| <= 2^-16 |x|): a single bf16
// activation (2^-9 relative) would be ~100x the int16 rounding the block kinds keep, and the split costs
// nothing where the weights' bytes, not the arithmetic, set the speed. See bf16_dot() and float_matmul.

namespace {

constexpr bool is_float_kind(int64_t kind) { return kind == KIND_BF16 || kind == KIND_F16 || kind == KIND_F32; }
constexpr int64_t float_bytes(int64_t kind) { return kind == KIND_F32 ? 4 : 2; }

inline float bf16_value(uint16_t h) {
    const uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

constexpr int64_t DPBF16_MAX_ROWS = 2;

// Independent accumulator sets per output in a float tile (its S): a product of 1-2 activation rows has tiles of
// one or two outputs, whose single chains of FMAs (or dpbf16 pairs) would wait on their own latency, so steps
// alternate between two sets; from 3 rows on, one chain per output in every tile shape (float_rows), so a row's
// bits do not depend on the rows beside it (3 or more) or the thread split.
constexpr int64_t FEW_FLOAT_ROWS = 2;

// Which float-kind kernel the last product used (tests assert it): FLOAT_PATH_*.
constexpr int64_t FLOAT_PATH_NONE = 0, FLOAT_PATH_AVX2 = 1, FLOAT_PATH_AVX512 = 2, FLOAT_PATH_DPBF16 = 3,
                  FLOAT_PATH_DENSE = 4, FLOAT_PATH_AMX = 5;
std::atomic<int64_t> LAST_FLOAT_PATH{FLOAT_PATH_NONE};

// Which block-kind kernel the last product (its last part) used: BLOCK_PATH_*. AVX-512 computes every kind but
// KIND_Q8 with byte dot products across lanes (avx512::rows_tile_across), rows ending in 1-4 blocks with
// avx512::add_tails too (ACROSS_TAILS), and KIND_Q8 (8-bit blocks in block order) with int16 ones.
constexpr int64_t BLOCK_PATH_NONE = 0, BLOCK_PATH_AVX2 = 1, BLOCK_PATH_INT16 = 2, BLOCK_PATH_ACROSS = 3,
                  BLOCK_PATH_ACROSS_TAILS = 4;
std::atomic<int64_t> LAST_BLOCK_PATH{BLOCK_PATH_NONE};

}  // namespace

#if defined(__x86_64__) || defined(_M_X64)

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {

template <int64_t KIND>
inline __m256 load8(const void* w, int64_t at) {
    if (KIND == KIND_BF16) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + at));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    if (KIND == KIND_F16)
        return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + at)));
    return _mm256_loadu_ps(static_cast<const float*>(w) + at);
}

template <int64_t KIND>
inline float load1(const void* w, int64_t at) {
    if (KIND == KIND_BF16) return bf16_value(static_cast<const uint16_t*>(w)[at]);
    if (KIND == KIND_F16) return _cvtsh_ss(static_cast<const uint16_t*>(w)[at]);
    return static_cast<const float*>(w)[at];
}

// y[b0..b0+NB-1, n..n+R-1] = x rows . weight rows, 8 lanes at a time, the last K % 8 values one by one.
template <int64_t KIND, int R, int NB, int S>
inline void float_tile(const uint8_t* w, int64_t k, const float* x, int64_t b0, float* y, int64_t n_out, int64_t n) {
    const int64_t row_bytes = k * float_bytes(KIND);
    __m256 acc[S][R][NB];
    for (int c = 0; c < S; c++)
        for (int r = 0; r < R; r++)
            for (int b = 0; b < NB; b++) acc[c][r][b] = _mm256_setzero_ps();
    auto step = [&](int64_t i, __m256 (&a)[R][NB]) {
        __m256 xv[NB];
        for (int b = 0; b < NB; b++) xv[b] = _mm256_loadu_ps(x + (b0 + b) * k + i);
        for (int r = 0; r < R; r++) {
            const __m256 wv = load8<KIND>(w + (n + r) * row_bytes, i);
            for (int b = 0; b < NB; b++) a[r][b] = _mm256_fmadd_ps(wv, xv[b], a[r][b]);
        }
    };
    int64_t i = 0;
    for (; i + 8 * S <= k; i += 8 * S)
        for (int c = 0; c < S; c++) step(i + 8 * c, acc[c]);
    for (; i + 8 <= k; i += 8) step(i, acc[0]);
    for (int r = 0; r < R; r++)
        for (int b = 0; b < NB; b++) {
            __m256 t = acc[0][r][b];
            for (int c = 1; c < S; c++) t = _mm256_add_ps(t, acc[c][r][b]);
            float s = hsum8(t);
            for (int64_t j = i; j < k; j++) s += load1<KIND>(w + (n + r) * row_bytes, j) * x[(b0 + b) * k + j];
            y[(b0 + b) * n_out + n + r] = s;
        }
}

}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl")
namespace avx512 {

// 16 weights from element `at` as float32; FULL: all 16 (a plain load), else the lanes of `mask` (the rest 0).
// Masked loads only for the row's last partial step: every-step masked loads were measured ~2x slower.
template <int64_t KIND, bool FULL>
inline __m512 load16(const void* w, int64_t at, __mmask16 mask) {
    if (KIND == KIND_F32)
        return FULL ? _mm512_loadu_ps(static_cast<const float*>(w) + at)
                    : _mm512_maskz_loadu_ps(mask, static_cast<const float*>(w) + at);
    const uint16_t* p = static_cast<const uint16_t*>(w) + at;
    const __m256i h = FULL ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)) : _mm256_maskz_loadu_epi16(mask, p);
    if (KIND == KIND_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// One step of 16 elements from i for R weight rows and NB activation rows.
template <int64_t KIND, int R, int NB, bool FULL>
inline void float_step(const uint8_t* w, int64_t row_bytes, int64_t k, const float* x, int64_t b0, int64_t n,
                       int64_t i, __mmask16 mask, __m512 (&acc)[R][NB]) {
    __m512 xv[NB];
    for (int b = 0; b < NB; b++)
        xv[b] = FULL ? _mm512_loadu_ps(x + (b0 + b) * k + i) : _mm512_maskz_loadu_ps(mask, x + (b0 + b) * k + i);
    for (int r = 0; r < R; r++) {
        const __m512 wv = load16<KIND, FULL>(w + (n + r) * row_bytes, i, mask);
        for (int b = 0; b < NB; b++) acc[r][b] = _mm512_fmadd_ps(wv, xv[b], acc[r][b]);
    }
}

// count fp16 or fp32 weights -> bf16, rounded as PyTorch rounds (bf16_bits). PyTorch's own copy_ from fp16 ran at
// ~2.4 G values/s on 2 threads (to fp32: ~10), and the dense path's conversion of an fp16 matrix cost more than
// its matmul.
template <int64_t KIND>
void to_bf16(const void* w, int64_t count, uint16_t* out) {
    for (int64_t i = 0; i < count; i += 16) {
        const __mmask16 mask = count - i >= 16 ? static_cast<__mmask16>(0xFFFF)
                                               : static_cast<__mmask16>((1u << (count - i)) - 1);
        _mm256_mask_storeu_epi16(out + i, mask, bf16_bits(load16<KIND, false>(w, i, mask)));
    }
}

template <int64_t KIND, int R, int NB, int S>
inline void float_tile(const uint8_t* w, int64_t k, const float* x, int64_t b0, float* y, int64_t n_out, int64_t n) {
    const int64_t row_bytes = k * float_bytes(KIND);
    __m512 acc[S][R][NB];
    for (int c = 0; c < S; c++)
        for (int r = 0; r < R; r++)
            for (int b = 0; b < NB; b++) acc[c][r][b] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 * S <= k; i += 16 * S)
        for (int c = 0; c < S; c++) float_step<KIND, R, NB, true>(w, row_bytes, k, x, b0, n, i + 16 * c, 0xFFFF, acc[c]);
    for (; i + 16 <= k; i += 16) float_step<KIND, R, NB, true>(w, row_bytes, k, x, b0, n, i, 0xFFFF, acc[0]);
    if (i < k) float_step<KIND, R, NB, false>(w, row_bytes, k, x, b0, n, i, static_cast<__mmask16>((1u << (k - i)) - 1), acc[0]);
    for (int r = 0; r < R; r++)
        for (int b = 0; b < NB; b++) {
            __m512 t = acc[0][r][b];
            for (int c = 1; c < S; c++) t = _mm512_add_ps(t, acc[c][r][b]);
            y[(b0 + b) * n_out + n + r] = _mm512_reduce_add_ps(t);
        }
}

}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512bf16")
namespace avx512bf16 {

// x (rows, k) float32 -> hi and lo bf16 parts, rows of kp (k rounded up to 32) values, zero-padded.
void split_rows(const float* x, int64_t rows, int64_t k, int64_t kp, uint16_t* hi, uint16_t* lo) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < kp; i += 16) {
            const __mmask16 mask = i >= k ? 0 : k - i >= 16 ? static_cast<__mmask16>(0xFFFF)
                                                            : static_cast<__mmask16>((1u << (k - i)) - 1);
            const __m512 v = _mm512_maskz_loadu_ps(mask, x + r * k + i);
            const __m256bh h = _mm512_cvtneps_pbh(v);
            const __m512 back = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)h), 16));
            const __m256bh l = _mm512_cvtneps_pbh(_mm512_sub_ps(v, back));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi + r * kp + i), (__m256i)h);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo + r * kp + i), (__m256i)l);
        }
}

// One step of 32 bf16 weights from i: two dpbf16 per (weight row, activation row), lo part first.
template <int R, int NB, bool FULL>
inline void bf16_step(const uint16_t* w, int64_t k, int64_t kp, const uint16_t* hi, const uint16_t* lo, int64_t b0,
                      int64_t n, int64_t i, __mmask32 mask, __m512 (&acc)[R][NB]) {
    __m512bh xh[NB], xl[NB];
    for (int b = 0; b < NB; b++) {  // activation rows are zero-padded to kp: always a full load
        xh[b] = (__m512bh)_mm512_loadu_si512(hi + (b0 + b) * kp + i);
        xl[b] = (__m512bh)_mm512_loadu_si512(lo + (b0 + b) * kp + i);
    }
    for (int r = 0; r < R; r++) {
        const uint16_t* p = w + (n + r) * k + i;
        const __m512bh wv = (__m512bh)(FULL ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi16(mask, p));
        for (int b = 0; b < NB; b++) acc[r][b] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(acc[r][b], wv, xl[b]), wv, xh[b]);
    }
}

// As avx512::float_tile for bf16 weights, with the activations split into hi and lo bf16 parts.
template <int R, int NB, int S>
inline void bf16_tile(const uint16_t* w, int64_t k, int64_t kp, const uint16_t* hi, const uint16_t* lo, int64_t b0,
                      float* y, int64_t n_out, int64_t n) {
    __m512 acc[S][R][NB];
    for (int c = 0; c < S; c++)
        for (int r = 0; r < R; r++)
            for (int b = 0; b < NB; b++) acc[c][r][b] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 * S <= k; i += 32 * S)
        for (int c = 0; c < S; c++) bf16_step<R, NB, true>(w, k, kp, hi, lo, b0, n, i + 32 * c, 0xFFFFFFFFu, acc[c]);
    for (; i + 32 <= k; i += 32) bf16_step<R, NB, true>(w, k, kp, hi, lo, b0, n, i, 0xFFFFFFFFu, acc[0]);
    if (i < k) bf16_step<R, NB, false>(w, k, kp, hi, lo, b0, n, i, (1u << (k - i)) - 1, acc[0]);
    for (int r = 0; r < R; r++)
        for (int b = 0; b < NB; b++) {
            __m512 t = acc[0][r][b];
            for (int c = 1; c < S; c++) t = _mm512_add_ps(t, acc[c][r][b]);
            y[(b0 + b) * n_out + n + r] = _mm512_reduce_add_ps(t);
        }
}

}  // namespace avx512bf16
#pragma GCC pop_options

#endif

// Calls fn.template operator()<KIND>() for a run-time kind (every kernel is compiled once per kind).
template <typename Fn>
inline void with_kind(int64_t kind, Fn&& fn) {
    switch (kind) {
        case KIND_Q4_MIN: fn(std::integral_constant<int64_t, KIND_Q4_MIN>{}); break;
        case KIND_Q4_K: fn(std::integral_constant<int64_t, KIND_Q4_K>{}); break;
        case KIND_Q5_K: fn(std::integral_constant<int64_t, KIND_Q5_K>{}); break;
        case KIND_Q4: fn(std::integral_constant<int64_t, KIND_Q4>{}); break;
        case KIND_Q8: fn(std::integral_constant<int64_t, KIND_Q8>{}); break;
        case KIND_Q8_LANES: fn(std::integral_constant<int64_t, KIND_Q8_LANES>{}); break;
        case KIND_Q5_MIN: fn(std::integral_constant<int64_t, KIND_Q5_MIN>{}); break;
        case KIND_Q5: fn(std::integral_constant<int64_t, KIND_Q5>{}); break;
        case KIND_Q6: fn(std::integral_constant<int64_t, KIND_Q6>{}); break;
        case KIND_Q3: fn(std::integral_constant<int64_t, KIND_Q3>{}); break;
        case KIND_Q2_K: fn(std::integral_constant<int64_t, KIND_Q2_K>{}); break;
        case KIND_IQ4_NL: fn(std::integral_constant<int64_t, KIND_IQ4_NL>{}); break;
        case KIND_IQ4_XS: fn(std::integral_constant<int64_t, KIND_IQ4_XS>{}); break;
        default: break;
    }
}

// The same for the float kinds.
template <typename Fn>
inline void with_float_kind(int64_t kind, Fn&& fn) {
    switch (kind) {
        case KIND_BF16: fn(std::integral_constant<int64_t, KIND_BF16>{}); break;
        case KIND_F16: fn(std::integral_constant<int64_t, KIND_F16>{}); break;
        case KIND_F32: fn(std::integral_constant<int64_t, KIND_F32>{}); break;
        default: break;
    }
}

// Output rows [n0, n1) against m activation rows: tile(R, NB, S, b0, n) computes weight rows n..n+R-1 against
// activation rows b0..b0+NB-1 with S accumulator sets per output (R, NB and S as integral constants; S: see
// FEW_FLOAT_ROWS). Matrix-vector products take one weight row at a time (one sequential stream for the
// prefetcher; see rows_all: bf16 and fp16 matrices at one row went from 12.6 and 14.4 ms to 8.0 and 7.9 ms for
// SmolLM2's 121 products); batches of 3 or more RMAX weight rows a tile, each over up to 4 activation rows. RMAX
// is 4 on AVX-512 (16 accumulators of 32 registers; against 2, 8192 x 2048 from DRAM, 2 threads, 8 / 16 / 32
// rows, on the project's Intel VM: bf16 2.70 / 4.53 / 8.17 -> 1.95 / 3.23 / 5.77 ms, fp16 3.00 / 4.59 / 8.15 ->
// 2.15 / 3.29 / 5.67 ms) and 2 on AVX2 (16 registers).
template <int RMAX, typename Tile>
void float_rows(int64_t m, int64_t n0, int64_t n1, const Tile& tile) {
    using One = std::integral_constant<int, 1>;
    if (m <= FEW_FLOAT_ROWS) {
        using Two = std::integral_constant<int, 2>;
        for (int64_t n = n0; n < n1; n++) {
            if (m == 2) tile(One{}, Two{}, Two{}, 0, n);
            else tile(One{}, One{}, Two{}, 0, n);
        }
        return;
    }
    auto batch = [&](auto r, int64_t n) {
        int64_t b0 = 0;
        for (; b0 + 4 <= m; b0 += 4) tile(r, std::integral_constant<int, 4>{}, One{}, b0, n);
        switch (m - b0) {
            case 3: tile(r, std::integral_constant<int, 3>{}, One{}, b0, n); break;
            case 2: tile(r, std::integral_constant<int, 2>{}, One{}, b0, n); break;
            case 1: tile(r, One{}, One{}, b0, n); break;
            default: break;
        }
    };
    int64_t n = n0;
    for (; n + RMAX <= n1; n += RMAX) batch(std::integral_constant<int, RMAX>{}, n);
    if constexpr (RMAX > 2)
        for (; n + 2 <= n1; n += 2) batch(std::integral_constant<int, 2>{}, n);
    for (; n < n1; n++) batch(One{}, n);
}

static bool detect_bf16_dot() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16");
}

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
static bool detect_bf16_dot() { return false; }
#endif


static int ISA = detect_isa();
static bool BF16_DOT = detect_bf16_dot();

// From how many activation rows a bf16 matrix is multiplied by a dense bf16 matmul (PyTorch's, so oneDNN's AMX
// tiles) instead of Lantern's float kernels; 0: never. On a CPU with AMX-BF16 the tiles win from about 16 rows
// (Sapphire Rapids-class VM, 2 threads, 3072 x 576: 0.35 vs 0.18 ms at 16 rows, 0.63 vs 0.25 at 32; at 8 rows
// 0.20 vs 0.18, and 0.040 vs 0.049 for 576 x 576); without AMX oneDNN's AVX-512 BF16 kernels lose to these up to 64 rows and beyond, so
// it stays off. The activations and the outputs are rounded to bf16 there (the dense prefill's accuracy and vLLM's,
// not the float kernels'), and a row's bits then depend on whether its batch reached this size. Since the matrices
// with N % 16 == 0 and K % 32 == 0 are kept in AMX tiles on such CPUs (KIND_BF16_TILES, amx_cpu.cpp: Lantern's own
// product at every row count), this is the path of the other bf16 matrices there.
constexpr int64_t AMX_DENSE_BF16_ROWS = 16;
static std::atomic<int64_t> DENSE_BF16_ROWS{amx_bf16() ? AMX_DENSE_BF16_ROWS : 0};

int64_t isa() { return ISA; }

// Whether bf16 weights are multiplied with dpbf16 (hi + lo activation parts) rather than widened for FMAs:
// needs AVX-512 in use (isa() == 2) and a CPU with AVX-512 BF16.
int64_t bf16_dot() { return ISA == 2 && BF16_DOT; }

// Tests and measurements switch dpbf16 off (0) or back on (1, only where the CPU has it); returns bf16_dot().
int64_t set_bf16_dot(int64_t on) {
    BF16_DOT = on && detect_bf16_dot();
    return bf16_dot();
}

// From how many rows bf16 matrices go to a dense matmul (0: never); tests and measurements set it, returns it.
int64_t dense_bf16_rows() { return DENSE_BF16_ROWS.load(); }
int64_t set_dense_bf16_rows(int64_t rows) {
    DENSE_BF16_ROWS = std::max<int64_t>(rows, 0);
    return dense_bf16_rows();
}

// The float-kind kernel the last product ran: 0 none yet, 1 AVX2 FMA, 2 AVX-512 FMA, 3 AVX-512 dpbf16, 4 dense,
// 5 AMX tiles.
int64_t last_float_path() { return LAST_FLOAT_PATH.load(); }

// The block-kind kernel the last product ran (its last part): 0 none yet, 1 AVX2 int16, 2 AVX-512 int16, 3 AVX-512
// bytes across lanes, 4 the same with the rows' last blocks in add_tails.
int64_t last_block_path() { return LAST_BLOCK_PATH.load(); }

static void note_block_path(bool wide, int64_t kind, int64_t k) {
#if defined(__x86_64__) || defined(_M_X64)
    const bool tails = packed_tail_kind(kind) && packed_tail(k / 32 % 16);
    LAST_BLOCK_PATH = !wide ? BLOCK_PATH_AVX2
                      : !avx512::across_kind(kind) ? BLOCK_PATH_INT16
                      : tails ? BLOCK_PATH_ACROSS_TAILS : BLOCK_PATH_ACROSS;
#endif
}

// Tests use this to run the AVX2 kernel on an AVX-512 machine; it never raises the level above the CPU's.
int64_t set_isa(int64_t level) {
    ISA = static_cast<int>(std::min<int64_t>(std::max<int64_t>(level, 0), detect_isa()));
    return ISA;
}

static void check(const torch::Tensor& qs, const c10::optional<torch::Tensor>& d_opt,
                  const c10::optional<torch::Tensor>& m, int64_t kind, int64_t k) {
    TORCH_CHECK(ISA > 0, "Lantern's quantized CPU kernels need an x86-64 CPU with AVX2 and FMA");
    TORCH_CHECK(kind >= 0 && kind < KIND_COUNT, "unknown block kind ", kind);
    if (kind == KIND_BF16_TILES) {
        check_tiled(qs);
        TORCH_CHECK(qs.size(1) == k, "tiled bf16 weights: (N, K=", k, "), got ", qs.sizes());
        return;
    }
    if (is_float_kind(kind)) {
        const auto dtype = kind == KIND_BF16 ? torch::kBFloat16 : kind == KIND_F16 ? torch::kHalf : torch::kFloat32;
        TORCH_CHECK(qs.device().is_cpu() && qs.scalar_type() == dtype && qs.dim() == 2 && qs.is_contiguous() &&
                    qs.size(1) == k, "float weights: (N, K=", k, ") contiguous ", dtype, " on the CPU, got ",
                    qs.scalar_type(), " ", qs.sizes());
        return;
    }
    TORCH_CHECK(k > 0 && k % 32 == 0, "in_features must be a multiple of 32, got ", k);
    TORCH_CHECK(qs.device().is_cpu() && qs.scalar_type() == (eight_bit(kind) ? torch::kInt8 : torch::kUInt8) &&
                qs.dim() == 2 && qs.is_contiguous(), "qs: 2-D contiguous uint8 (int8 for 8-bit blocks) on the CPU");
    const int64_t n = qs.size(0);
    TORCH_CHECK(qs.size(1) == k / 32 * block_bytes(kind), "qs: wrong row length ", qs.size(1), " for K=", k);
    TORCH_CHECK(d_opt.has_value(), "d: block scales are required for block kinds");
    const torch::Tensor& d = *d_opt;
    if (has_super_scales(kind) || block_scales(kind)) {  // d (and dmin) per super-block; 2 bytes or 1 per block
        const bool mins = has_super_scales(kind);
        TORCH_CHECK(k % 256 == 0, "Q2_K/Q4_K/Q5_K/IQ4_XS blocks: in_features must be a multiple of 256, got ", k);
        TORCH_CHECK(d.scalar_type() == torch::kHalf && d.is_contiguous() && d.dim() == 2 && d.size(0) == n &&
                    d.size(1) == k / (mins ? 128 : 256),
                    mins ? "d: (N, K/256 * 2) contiguous float16 (d and dmin per super-block)"
                         : "d: (N, K/256) contiguous float16 (d per super-block)");
        TORCH_CHECK(m.has_value() && m->scalar_type() == torch::kUInt8 && m->is_contiguous() && m->dim() == 2 &&
                    m->size(0) == n && m->size(1) == k / (mins ? 16 : 32),
                    mins ? "m: (N, K/32 * 2) contiguous uint8 (scales and mins)"
                         : "m: (N, K/32) contiguous uint8 (a scale per block)");
        return;
    }
    TORCH_CHECK(d.scalar_type() == torch::kHalf && d.is_contiguous() && d.dim() == 2 && d.size(0) == n &&
                d.size(1) == k / 32, "d: (N, K/32) contiguous float16");
    if (has_offsets(kind)) {
        TORCH_CHECK(m.has_value() && m->scalar_type() == torch::kHalf && m->is_contiguous() &&
                    m->sizes() == d.sizes(), "m: (N, K/32) contiguous float16 offsets");
    } else if (has_multipliers(kind)) {
        TORCH_CHECK(m.has_value() && m->scalar_type() == torch::kInt8 && m->is_contiguous() && m->dim() == 2 &&
                    m->size(0) == n && m->size(1) == k / 16, "m: (N, K/16) contiguous int8 multipliers");
    }
}

static Weights weights(const torch::Tensor& qs, const torch::Tensor& d, const c10::optional<torch::Tensor>& m,
                       int64_t kind) {
    Weights w{static_cast<const uint8_t*>(qs.data_ptr()), reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>()),
              nullptr, nullptr};
    if (has_offsets(kind)) w.offsets = reinterpret_cast<const uint16_t*>(m->data_ptr<at::Half>());
    if (has_multipliers(kind)) w.mult = m->data_ptr<int8_t>();
    if (has_super_scales(kind) || block_scales(kind)) w.sub = m->data_ptr<uint8_t>();
    return w;
}

// y (rows, N) = x (rows, K) @ W.T for a float kind; x float32 contiguous, W its plain (N, K) matrix.
static void float_matmul(const float* x, int64_t rows, int64_t k, const torch::Tensor& w, int64_t kind, float* y) {
#if defined(__x86_64__) || defined(_M_X64)
    const int64_t n = w.size(0);
    const uint8_t* wp = static_cast<const uint8_t*>(w.data_ptr());
    // As for blocks: enough output rows per task that a thread's start-up cost stays small against its work.
    const int64_t grain = std::max<int64_t>(4, 8192 / std::max<int64_t>(1, (k + 31) / 32 * rows));
    // dpbf16 for 1-2 activation rows, where the product is bound by reading the weights; from 3 rows on the
    // doubled dot products (hi and lo) cost more than widening for FMAs (measured on Zen 4: a 3072x576 product
    // 31 vs 37 us for one row, 116 vs 94 us for four).
    if (kind == KIND_BF16 && bf16_dot() && rows <= DPBF16_MAX_ROWS) {
        const int64_t kp = (k + 31) / 32 * 32;
        std::vector<uint16_t> hi(rows * kp), lo(rows * kp);
        avx512bf16::split_rows(x, rows, k, kp, hi.data(), lo.data());
        const uint16_t* w16 = reinterpret_cast<const uint16_t*>(wp);
        parallel_tiles(n, grain, [&](int64_t n0, int64_t n1) {
            float_rows<1>(rows, n0, n1, [&](auto r, auto nb, auto s, int64_t b0, int64_t row) {
                avx512bf16::bf16_tile<decltype(r)::value, decltype(nb)::value, decltype(s)::value>(
                    w16, k, kp, hi.data(), lo.data(), b0, y, n, row);
            });
        });
        LAST_FLOAT_PATH = FLOAT_PATH_DPBF16;
        return;
    }
    const bool wide = ISA == 2;
    parallel_tiles(n, grain, [&](int64_t n0, int64_t n1) {
        with_float_kind(kind, [&](auto kc) {
            constexpr int64_t KIND = decltype(kc)::value;
            if (wide)
                float_rows<4>(rows, n0, n1, [&](auto r, auto nb, auto s, int64_t b0, int64_t row) {
                    avx512::float_tile<KIND, decltype(r)::value, decltype(nb)::value, decltype(s)::value>(wp, k, x, b0,
                                                                                                          y, n, row);
                });
            else
                float_rows<2>(rows, n0, n1, [&](auto r, auto nb, auto s, int64_t b0, int64_t row) {
                    avx2::float_tile<KIND, decltype(r)::value, decltype(nb)::value, decltype(s)::value>(wp, k, x, b0,
                                                                                                        y, n, row);
                });
        });
    });
    LAST_FLOAT_PATH = wide ? FLOAT_PATH_AVX512 : FLOAT_PATH_AVX2;
#endif
}

// y (..., N) float32 = x (..., K) float32 @ W.T, W given as split blocks, or as a plain matrix for the float
// kinds (qs = W, no d or m).
torch::Tensor qmatmul(const torch::Tensor& x_in, const torch::Tensor& qs, const c10::optional<torch::Tensor>& d,
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
    if (kind == KIND_BF16_TILES) {  // AMX tiles at every row count (amx_cpu.cpp)
        amx_bf16_matmul(x.data_ptr<float>(), rows, k, qs, y.data_ptr<float>());
        LAST_FLOAT_PATH = FLOAT_PATH_AMX;
        return y;
    }
    if (is_float_kind(kind)) {
        const int64_t dense = DENSE_BF16_ROWS.load();
        if (kind == KIND_BF16 && dense > 0 && rows >= dense) {
            const auto xb = x.view({rows, k}).to(torch::kBFloat16);
            auto out = y.view({rows, n});
            const int64_t threads = std::max(1, at::get_num_threads());
            const bool inference = c10::InferenceMode::is_enabled();  // thread-local: each thread takes the caller's
            // Each of the pool's threads runs oneDNN on one thread over its slice of W's rows, rather than one
            // matmul on PyTorch's OpenMP team: called from the serving Engine's thread (not the first one), that
            // team's workers slept between products and every call waited for them to wake. bf16 folder, 32
            // streams, Engine in-process on its own thread: 296-334 tok/s with the float kernels, 316-344 with
            // OpenMP's matmul, 412-431 so (from the first thread OpenMP's did 456-487); `lantern serve`, 32
            // streams over HTTP: 324-325 with the float kernels, 454-463 so.
            std::exception_ptr failed;
            std::mutex failed_mutex;
            parallel_rows(n, std::max<int64_t>(16, (n + threads - 1) / threads), [&](int64_t n0, int64_t n1) {
                at::get_num_threads();  // PyTorch's once-per-thread setup first: it would reset the count below
                const int before = omp_get_max_threads();
                omp_set_num_threads(1);
                try {
                    c10::InferenceMode mode(inference);
                    out.narrow(1, n0, n1 - n0).copy_(torch::matmul(xb, qs.narrow(0, n0, n1 - n0).t()));
                } catch (...) {  // thrown on the caller's thread below, not out of a pool worker (terminate)
                    std::lock_guard<std::mutex> lock(failed_mutex);
                    failed = std::current_exception();
                }
                omp_set_num_threads(before);
            });
            if (failed) std::rethrow_exception(failed);
            LAST_FLOAT_PATH = FLOAT_PATH_DENSE;
            return y;
        }
        float_matmul(x.data_ptr<float>(), rows, k, qs, kind, y.data_ptr<float>());
        return y;
    }
#if defined(__x86_64__) || defined(_M_X64)
    const bool wide = ISA == 2;
    const bool bytes = wide && avx512::across_kind(kind);
    XQuant xq(rows, k, bytes);
    avx2::quantize_rows(x.data_ptr<float>(), rows, k, xq);
    if (bytes) avx512::split_bytes(xq, rows);
    // Enough output rows per task that a thread's start-up cost stays small against its work.
    const int64_t grain = std::max<int64_t>(4, 8192 / std::max<int64_t>(1, k / 32 * rows));
    const Weights w = weights(qs, *d, m, kind);
    float* out = y.data_ptr<float>();
    parallel_tiles(n, grain, [&](int64_t n0, int64_t n1) {
        with_kind(kind, [&](auto kc) {
            constexpr int64_t KIND = decltype(kc)::value;
            if (wide) avx512::rows_all<KIND>(w, k, xq, rows, out, n, n0, n1);
            else avx2::rows_all<KIND>(w, k, xq, rows, out, n, n0, n1);
        });
    });
    note_block_path(wide, kind, k);
#endif
    return y;
}

// y (..., N_0 + N_1 + ...) = x @ [W_0; W_1; ...].T for block matrices of different kinds: q, k and v (or
// gate and up) that a K-quant mix keeps in different types (Q5_0 q/k beside Q8_0 v). x is quantized once and
// all parts' rows make one parallel region, so a small part (k, v: 128 rows at 0.5B shapes, under one task's
// grain) does not leave a thread idle in a region of its own. Each part is tiled from its own first row, as
// a qmatmul of its own would be: the same bits.
torch::Tensor qmatmul_parts(const torch::Tensor& x_in, const std::vector<torch::Tensor>& qs,
                            const std::vector<c10::optional<torch::Tensor>>& d,
                            const std::vector<c10::optional<torch::Tensor>>& m, const std::vector<int64_t>& kinds) {
    TORCH_CHECK(x_in.scalar_type() == torch::kFloat32 && x_in.dim() >= 1 && x_in.device().is_cpu(),
                "x: float32 on the CPU");
    const size_t parts = qs.size();
    TORCH_CHECK(parts > 0 && d.size() == parts && m.size() == parts && kinds.size() == parts,
                "qs, d, m and kinds: one entry per part");
    const torch::Tensor x = x_in.contiguous();
    const int64_t k = x.size(-1), rows = k ? x.numel() / k : 0;
    std::vector<int64_t> offset(parts + 1, 0), first_tile(parts + 1, 0);
    std::vector<Weights> w;
    for (size_t p = 0; p < parts; p++) {
        TORCH_CHECK(!is_float_kind(kinds[p]), "qmatmul_parts takes block kinds only");
        check(qs[p], d[p], m[p], kinds[p], k);
        w.push_back(weights(qs[p], *d[p], m[p], kinds[p]));
        offset[p + 1] = offset[p] + qs[p].size(0);
        first_tile[p + 1] = first_tile[p] + (qs[p].size(0) + 3) / 4;
    }
    auto shape = x.sizes().vec();
    shape.back() = offset[parts];
    auto y = torch::empty(shape, x.options());
    if (rows == 0 || offset[parts] == 0) return y;
#if defined(__x86_64__) || defined(_M_X64)
    const bool wide = ISA == 2;
    const bool bytes = wide && std::any_of(kinds.begin(), kinds.end(), [](int64_t kind) { return avx512::across_kind(kind); });
    XQuant xq(rows, k, bytes);
    avx2::quantize_rows(x.data_ptr<float>(), rows, k, xq);
    if (bytes) avx512::split_bytes(xq, rows);
    const int64_t grain = std::max<int64_t>(4, 8192 / std::max<int64_t>(1, k / 32 * rows));  // as in qmatmul
    float* out = y.data_ptr<float>();
    const int64_t n_out = offset[parts];
    parallel_rows(first_tile[parts], (grain + 3) / 4, [&](int64_t t0, int64_t t1) {
        for (size_t p = 0; p < parts; p++) {
            const int64_t lo = std::max(t0, first_tile[p]), hi = std::min(t1, first_tile[p + 1]);
            if (lo >= hi) continue;
            const int64_t n = offset[p + 1] - offset[p];
            const int64_t n0 = 4 * (lo - first_tile[p]), n1 = std::min(n, 4 * (hi - first_tile[p]));
            with_kind(kinds[p], [&](auto kc) {
                constexpr int64_t KIND = decltype(kc)::value;
                if (wide) avx512::rows_all<KIND>(w[p], k, xq, rows, out + offset[p], n_out, n0, n1);
                else avx2::rows_all<KIND>(w[p], k, xq, rows, out + offset[p], n_out, n0, n1);
            });
        }
    });
    note_block_path(wide, kinds[parts - 1], k);
#endif
    return y;
}

// The weights as an (N, K) float32 or bfloat16 tensor.
// Blocks -> `out`, (N, K) float32 or bfloat16.
void dequantize_to(const torch::Tensor& qs, const c10::optional<torch::Tensor>& d,
                   const c10::optional<torch::Tensor>& m, int64_t kind, int64_t k, torch::Tensor& out) {
    check(qs, d, m, kind, k);
    TORCH_CHECK(out.device().is_cpu() && out.dim() == 2 && out.size(0) == qs.size(0) && out.size(1) == k &&
                out.is_contiguous(), "out: a contiguous (N, K) tensor on the CPU");
    TORCH_CHECK(out.scalar_type() == torch::kFloat32 || out.scalar_type() == torch::kBFloat16,
                "dequantize to float32 or bfloat16");
    if (kind == KIND_BF16_TILES) {
        out.copy_(bf16_tile_rows(qs, torch::arange(qs.size(0), qs.options().dtype(torch::kInt64))));
        return;
    }
    float* f = out.scalar_type() == torch::kFloat32 ? out.data_ptr<float>() : nullptr;
    uint16_t* h = out.scalar_type() == torch::kBFloat16 ? reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) : nullptr;
#if defined(__x86_64__) || defined(_M_X64)
    if (is_float_kind(kind) && h && kind != KIND_BF16 && ISA == 2) {  // fp16/fp32 -> bf16 (the dense path)
        const uint8_t* wp = static_cast<const uint8_t*>(qs.data_ptr());
        at::parallel_for(0, qs.size(0), 16, [&](int64_t r0, int64_t r1) {
            with_float_kind(kind, [&](auto kc) {
                constexpr int64_t KIND = decltype(kc)::value;
                avx512::to_bf16<KIND>(wp + r0 * k * float_bytes(KIND), (r1 - r0) * k, h + r0 * k);
            });
        });
        return;
    }
#endif
    if (is_float_kind(kind)) {
        out.copy_(qs);
        return;
    }
#if defined(__x86_64__) || defined(_M_X64)
    const Weights w = weights(qs, *d, m, kind);
    // PyTorch's own threads, not the pool (pool.cpp): a dense forward alternates this with oneDNN's matmuls,
    // and two sets of spinning threads on the same cores slowed a 64-token prefill by a third.
    at::parallel_for(0, qs.size(0), 16, [&](int64_t r0, int64_t r1) {
        with_kind(kind, [&](auto kc) {
            constexpr int64_t KIND = decltype(kc)::value;
            if (ISA == 2) avx512::dequantize_rows<KIND>(w, k, r0, r1, f, h);
            else avx2::dequantize_rows<KIND>(w, k, r0, r1, f, h);
        });
    });
#endif
}

torch::Tensor dequantize(const torch::Tensor& qs, const c10::optional<torch::Tensor>& d,
                         const c10::optional<torch::Tensor>& m, int64_t kind, int64_t k, torch::ScalarType dtype) {
    TORCH_CHECK(dtype == torch::kFloat32 || dtype == torch::kBFloat16, "dequantize to float32 or bfloat16");
    if (is_float_kind(kind) && (dtype == torch::kFloat32 || kind == KIND_BF16)) {  // fp16/fp32 -> bf16: dequantize_to
        check(qs, d, m, kind, k);
        return qs.to(dtype);  // a copy only when the type changes
    }
    auto out = torch::empty({qs.size(0), k}, qs.options().dtype(dtype));
    dequantize_to(qs, d, m, kind, k, out);
    return out;
}

// The same into `out`: a caller's buffer, reused between calls (QuantLinear's dense path: a fresh one of
// megabytes is fresh pages, faulted in each time).
torch::Tensor dequantize_into(const torch::Tensor& qs, const c10::optional<torch::Tensor>& d,
                              const c10::optional<torch::Tensor>& m, int64_t kind, int64_t k, torch::Tensor out) {
    dequantize_to(qs, d, m, kind, k, out);
    return out;
}

// KIND_Q8 values (N, K) int8 -> KIND_Q8_LANES's order, in place (lanes_of: each row's groups computed across
// lanes, step-major). d stays as it is.
void q8_lanes(torch::Tensor qs) {
    TORCH_CHECK(qs.scalar_type() == torch::kInt8 && qs.dim() == 2 && qs.is_contiguous() && qs.device().is_cpu() &&
                qs.size(1) % 32 == 0, "qs: (N, K) contiguous int8 on the CPU, K a multiple of 32");
    const int64_t n = qs.size(0), nb = qs.size(1) / 32;
    uint8_t* base = reinterpret_cast<uint8_t*>(qs.data_ptr<int8_t>());
    at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
        uint8_t block_order[512];
        for (int64_t r = r0; r < r1; r++)
            for (int64_t g = 0; g < nb; g += 16) {
                const int64_t lanes = lanes_of(nb, g);
                uint8_t* p = base + (r * nb + g) * 32;
                std::memcpy(block_order, p, 32 * lanes);
                for (int64_t l = 0; l < lanes; l++)
                    for (int64_t st = 0; st < 8; st++)
                        std::memcpy(p + 4 * lanes * st + 4 * l, block_order + 32 * l + 4 * st, 4);
            }
    });
}

// Float32 weights (N, K) -> the 8-bit kind's (qs int8 (N, K), d float16 (N, K/32)), as blocks.quantize_q8:
// one pass over the weights, where PyTorch's whole-tensor operations take six (the bulk of loading a file whose
// types are computed as 8-bit blocks, and of `--quantize q8_0`).
std::vector<torch::Tensor> quantize_q8(const torch::Tensor& w_in) {
    TORCH_CHECK(w_in.scalar_type() == torch::kFloat32 && w_in.dim() == 2 && w_in.device().is_cpu(),
                "w: (N, K) float32 on the CPU");
    TORCH_CHECK(w_in.size(1) % 32 == 0, "w: K must be a multiple of 32");
    TORCH_CHECK(ISA >= 1, "quantize_q8 needs AVX2");
    const torch::Tensor w = w_in.contiguous();
    const int64_t n = w.size(0), k = w.size(1), nb = k / 32;
    auto qs = torch::empty({n, k}, w.options().dtype(torch::kInt8));
    auto d = torch::empty({n, nb}, w.options().dtype(torch::kHalf));
#if defined(__x86_64__) || defined(_M_X64)
    const float* x = w.data_ptr<float>();
    int8_t* q = qs.data_ptr<int8_t>();
    uint16_t* dp = reinterpret_cast<uint16_t*>(d.data_ptr<at::Half>());
    parallel_rows(n, std::max<int64_t>(1, 65536 / std::max<int64_t>(k, 1)), [&](int64_t r0, int64_t r1) {
        for (int64_t i = r0 * nb; i < r1 * nb; i++) avx2::quantize_q8_block(x + 32 * i, q + 32 * i, dp + i);
    });
#endif
    return {qs, d};
}

// K-quant nibble runs -> ggml's Q4_0 byte order per 32-element sub-block, as blocks._pack_nibble_runs computes in
// torch: `packed` (B, bytes) holds per row runs of `run` bytes whose low nibbles are elements 0..run-1 and high
// nibbles run..2run-1; out (B, bytes / 16, 16) gives per run its low-nibble sub-blocks, then its high-nibble ones,
// byte j of a sub-block holding element j (low nibble) and j + 16 (high). One pass, 8 bytes per operation: the
// torch version's five passes were the largest part of loading a Q4_K file's matrices.
torch::Tensor pack_nibble_runs(const torch::Tensor& packed, int64_t run) {
    TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.dim() == 2 && packed.stride(1) == 1 &&
                packed.device().is_cpu(), "packed: 2-D uint8 on the CPU, rows of contiguous bytes");
    TORCH_CHECK(run > 0 && run % 32 == 0 && packed.size(1) % run == 0, "run: a multiple of 32 dividing the row");
    const int64_t rows = packed.size(0), bytes = packed.size(1), stride = packed.stride(0), subs = run / 32;
    auto out = torch::empty({rows, bytes / 16, 16}, packed.options());
    const uint8_t* in = packed.data_ptr<uint8_t>();
    uint8_t* o = out.data_ptr<uint8_t>();
    constexpr uint64_t LOW = 0x0F0F0F0F0F0F0F0FULL, HIGH = 0xF0F0F0F0F0F0F0F0ULL;
    at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; r++)
            for (int64_t at = 0; at < bytes; at += run)
                for (int64_t s = 0; s < subs; s++)
                    for (int half = 0; half < 2; half++) {  // 8 of the sub-block's 16 byte pairs at a time
                        uint64_t a, b;
                        std::memcpy(&a, in + r * stride + at + 32 * s + 8 * half, 8);
                        std::memcpy(&b, in + r * stride + at + 32 * s + 16 + 8 * half, 8);
                        const uint64_t low = (a & LOW) | ((b << 4) & HIGH), high = ((a >> 4) & LOW) | (b & HIGH);
                        uint8_t* dst = o + r * bytes + at + 16 * s + 8 * half;
                        std::memcpy(dst, &low, 8);
                        std::memcpy(dst + 16 * subs, &high, 8);
                    }
    });
    return out;
}

// Bit planes -> high-bit bytes, as blocks._plane_high_bits computes in torch: `planes` (B, 4) holds per row a
// little-endian uint32 whose bit e belongs to element e (ggml's qh); out (B, 4): byte j holds at bit s that of
// element 4s + j. Element 4s + j is bit j of nibble s: with nibble s spread to byte s of a uint64, the word is an
// 8 x 8 bit matrix whose transpose (three swaps, Hacker's Delight 7-3) holds in byte j the bits s. One pass over
// the file's strided field (the torch version took 0.58 s for a 0.5B file's 7.9M Q5_0 blocks).
torch::Tensor high_bits(const torch::Tensor& planes) {
    TORCH_CHECK(planes.scalar_type() == torch::kUInt8 && planes.dim() == 2 && planes.size(1) == 4 &&
                planes.stride(1) == 1 && planes.device().is_cpu(), "planes: (B, 4) uint8 on the CPU, rows contiguous");
    const int64_t rows = planes.size(0), stride = planes.stride(0);
    auto out = torch::empty({rows, 4}, planes.options());
    const uint8_t* in = planes.data_ptr<uint8_t>();
    uint8_t* o = out.data_ptr<uint8_t>();
    auto spread = [](uint64_t x) {  // byte i of a uint32 -> byte 2i
        x = (x | (x << 16)) & 0x0000FFFF0000FFFFULL;
        return (x | (x << 8)) & 0x00FF00FF00FF00FFULL;
    };
    at::parallel_for(0, rows, 1 << 16, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; r++) {
            const uint64_t w = load_u32(in + r * stride);
            uint64_t x = spread(w & 0x0F0F0F0Fu) | (spread((w >> 4) & 0x0F0F0F0Fu) << 8);  // byte s: nibble s
            for (const auto& [delta, mask] : {std::pair<int, uint64_t>{7, 0x00AA00AA00AA00AAULL},
                                              {14, 0x0000CCCC0000CCCCULL}, {28, 0x00000000F0F0F0F0ULL}}) {
                const uint64_t t = ((x >> delta) ^ x) & mask;
                x ^= t ^ (t << delta);
            }
            const uint32_t bytes = static_cast<uint32_t>(x);
            std::memcpy(o + 4 * r, &bytes, 4);
        }
    });
    return out;
}

// K-quant 2-bit fields -> crumb bytes per sub-block, as blocks._crumbs computes in torch: `runs` (B, 64) holds per
// row (a super-block's Q2_K/Q3_K qs or Q6_K qh) two runs of 32 bytes, bits 2t, 2t+1 of byte l of run h belonging
// to element l of sub-block 4h + t; out (B, 8, 8): crumb byte 4c + j of sub-block 4h + t holds at bits 2s, 2s+1
// the crumb of its element 16c + 4s + j. The bytes l = 16c + 4s + j (s = 0..3) of a run as one uint32 hold
// crumb (s, t) at bit 8s + 2t; the transpose of those 4 x 4 fields (two swaps, Hacker's Delight 7-3) holds, in
// byte t, that crumb byte of sub-block 4h + t. One pass over the file's strided field.
torch::Tensor crumbs(const torch::Tensor& runs) {
    TORCH_CHECK(runs.scalar_type() == torch::kUInt8 && runs.dim() == 2 && runs.size(1) == 64 && runs.stride(1) == 1 &&
                runs.device().is_cpu(), "runs: (B, 64) uint8 on the CPU, rows contiguous");
    const int64_t rows = runs.size(0), stride = runs.stride(0);
    auto out = torch::empty({rows, 8, 8}, runs.options());
    const uint8_t* in = runs.data_ptr<uint8_t>();
    uint8_t* o = out.data_ptr<uint8_t>();
    at::parallel_for(0, rows, 1 << 14, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; r++) {
            const uint8_t* p = in + r * stride;
            uint8_t* q = o + 64 * r;
            for (int h = 0; h < 2; h++)
                for (int c = 0; c < 2; c++)
                    for (int j = 0; j < 4; j++) {
                        const uint8_t* b = p + 32 * h + 16 * c + j;
                        uint32_t w = b[0] | uint32_t(b[4]) << 8 | uint32_t(b[8]) << 16 | uint32_t(b[12]) << 24;
                        uint32_t t = ((w >> 12) ^ w) & 0x0000F0F0u;
                        w ^= t ^ (t << 12);
                        t = ((w >> 6) ^ w) & 0x00CC00CCu;
                        w ^= t ^ (t << 6);
                        for (int sub = 0; sub < 4; sub++) q[8 * (4 * h + sub) + 4 * c + j] = uint8_t(w >> (8 * sub));
                    }
        }
    });
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
void register_amx(pybind11::module& mod);  // amx_cpu.cpp

// logits_cpu.cpp
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> top_logits(const torch::Tensor& x, int64_t k);
int64_t logit_rank(const torch::Tensor& x, int64_t index, bool ties_by_id);
int64_t set_torch_threads(int64_t n);  // pool.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
    register_decode_stack(mod);
    register_amx(mod);
    mod.def("rms_norm", &rms_norm, "x * rsqrt(mean(x^2) + eps) * (w + offset) over the last dimension, float32");
    mod.def("gated_act", &gated_act, "act(gate) * up for x = [gate | up]; act 0 SiLU, 1 GELU-tanh");
    mod.def("decode_attention", &decode_attention,
            "one token per row: RoPE, cache write and attention over the cache -> (B, H*D)");
    mod.def("top_logits", &top_logits, "per row of (V,) or (T, V) float32 logits: the k largest > -inf (largest "
            "first, lower id first on ties; -inf / -1 past the row's count) and their ids, and the count > -inf");
    mod.def("logit_rank", &logit_rank, "1-based rank of x[index] in a (V,) row: 1 + the logits above it (+ those equal "
            "to it at lower ids with ties_by_id, as argmax breaks ties)", pybind11::arg("x"), pybind11::arg("index"),
            pybind11::arg("ties_by_id") = true);
    mod.def("set_torch_threads", &set_torch_threads,
            "the calling thread's thread count for PyTorch's own (OpenMP) ops; returns the previous one");
    mod.def("isa", &isa, "0: no kernels on this CPU, 1: AVX2+FMA, 2: AVX-512 VNNI");
    mod.def("set_isa", &set_isa, "use a lower instruction set than the CPU's (for tests); returns the level in use");
    mod.def("bf16_dot", &bf16_dot, "1 when bf16 weights are multiplied with AVX-512 BF16 dpbf16 (hi + lo activations)");
    mod.def("set_bf16_dot", &set_bf16_dot, "switch dpbf16 for bf16 weights off (0) or on (1, where the CPU has it)");
    mod.def("last_float_path", &last_float_path,
            "the kernel of the last float-weight product: 0 none, 1 AVX2 FMA, 2 AVX-512 FMA, 3 AVX-512 dpbf16, "
            "4 a dense bf16 matmul (DENSE_BF16_ROWS), 5 AMX tiles (KIND_BF16_TILES)");
    mod.def("dense_bf16_rows", &dense_bf16_rows, "from how many rows bf16 matrices go to a dense matmul (0: never)");
    mod.def("set_dense_bf16_rows", &set_dense_bf16_rows, "set that row count (0: never); returns it");
    mod.def("last_block_path", &last_block_path,
            "the kernel of the last block product: 0 none, 1 AVX2 int16, 2 AVX-512 int16, 3 AVX-512 bytes across lanes, "
            "4 the same with rows' last 1-4 blocks packed together (add_tails)");
    // The products let other Python threads run meanwhile (the server's event loop beside the Engine's
    // thread); they touch no Python object.
    mod.def("qmatmul", &qmatmul, "x (..., K) float32 @ W.T -> (..., N) float32; W as split blocks (qs, d, m, kind) or a float matrix (qs)",
            pybind11::call_guard<pybind11::gil_scoped_release>());
    mod.def("qmatmul_parts", &qmatmul_parts, "x (..., K) float32 @ [W_0; W_1; ...].T for block matrices of "
            "different kinds (lists qs, d, m, kinds) -> (..., N_0 + N_1 + ...), x quantized once, one parallel region",
            pybind11::call_guard<pybind11::gil_scoped_release>());
    mod.def("pack_nibble_runs", &pack_nibble_runs, "K-quant nibble runs (B, bytes) uint8 -> (B, bytes/16, 16) in "
            "ggml's Q4_0 order per 32-element sub-block (low-nibble sub-blocks of a run first)",
            pybind11::call_guard<pybind11::gil_scoped_release>());
    mod.def("crumbs", &crumbs, "K-quant 2-bit runs (B, 64) uint8 -> (B, 8, 8) crumb bytes per sub-block (byte 4c + j, "
            "bits 2s: element 16c + 4s + j)", pybind11::call_guard<pybind11::gil_scoped_release>());
    mod.def("high_bits", &high_bits, "bit planes (B, 4) uint8 (bit e: element e) -> (B, 4) high-bit bytes (byte j, "
            "bit s: element 4s + j)", pybind11::call_guard<pybind11::gil_scoped_release>());
    mod.def("quantize_q8", &quantize_q8, "(N, K) float32 -> (qs int8 (N, K), d float16 (N, K/32)), ggml's Q8_0 recipe",
            pybind11::call_guard<pybind11::gil_scoped_release>());
    mod.def("dequantize", &dequantize, "split blocks (qs, d, m, kind, K) -> (N, K) float32 or bfloat16",
            pybind11::call_guard<pybind11::gil_scoped_release>());
    mod.def("q8_lanes", &q8_lanes, "8-bit blocks (N, K) int8 -> the order of KIND_Q8_LANES, in place");
    mod.def("dequantize_into", &dequantize_into, "split blocks (qs, d, m, kind, K) -> `out`, a contiguous (N, K) "
            "float32 or bfloat16 tensor, returned", pybind11::call_guard<pybind11::gil_scoped_release>());
}
