// bf16 weight matrices on AMX tiles (Intel Xeons from Sapphire Rapids on): the layout such a matrix is kept in on
// those CPUs (blocks.py KIND_BF16_TILES) and the product that reads it. Elsewhere (Zen 4, older Xeons, AVX2) none
// of this runs: the matrix stays plain (N, K) and quant_cpu.cpp's float kernels multiply it.
//
// Layout. W (N, K) bf16, N a multiple of 16 and K of 32, is kept as N/16 column blocks (16 outputs each) of K/32
// tiles, a tile 16 rows of 64 bytes: row p holds, for each of the block's outputs c = 0..15, the pair
// W[16b + c][32t + 2p], W[16b + c][32t + 2p + 1] (the pairs TDPBF16PS multiplies). So element (r, i) of W is
// element ((r/16 * K/32 + i/32) * 16 + i%32/2) * 32 + r%16 * 2 + i%2 of the tiled tensor, which keeps W's shape and
// size (the values move in place, bf16_tiles). A column block's tiles are consecutive: a thread streams its
// outputs' weights in order.
//
// Product. The float32 activations are split into bf16 parts, x = hi + lo to about 16 bits (the dpbf16 kernel's
// split, quant_cpu.cpp), and every weight tile is multiplied by both: a result is the float32 reference's up to
// ~2^-16 of each term and the summation order, not bf16 rounding of the activations (oneDNN's bf16 matmul, vLLM's).
// Each output row's sums run in the same order whatever the number of rows beside it: a row's bits do not depend
// on its batch. Rows are taken 16 at a time (a tile's height) against 4 column blocks (4 accumulator tiles, the
// two activation parts, and two weight tiles alternating: the 8 tile registers).
//
// Measured first (the project's Sapphire Rapids-class VM, 2 threads, 3072 x 576 bf16, ms at 1 / 8 / 16 rows):
// the float kernels 0.085 / 0.155 / 0.289, oneDNN's matmul on a weight it packed beforehand 0.065 / 0.070 / 0.077
// (bf16 activations and outputs; unpacked, as PyTorch's `x @ W.T`, 0.135 / 0.142 at 8 / 16 rows).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

void parallel_rows(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);  // pool.cpp
namespace avx512bf16 {
void split_rows(const float* x, int64_t rows, int64_t k, int64_t kp, uint16_t* hi, uint16_t* lo);  // quant_cpu.cpp
}

namespace {

constexpr int64_t TILE_OUT = 16, TILE_IN = 32, TILE_VALUES = TILE_OUT * TILE_IN;
constexpr int64_t GROUP = 4;  // column blocks computed together (accumulator tiles)

#if defined(__x86_64__) || defined(_M_X64)
// AMX-BF16 present, enabled by the OS (XCR0 bits 17-18: tile state saved on a switch), AVX-512 BF16 for the split
// of the activations, and this process allowed to use the tile data (Linux asks each process to request it).
bool detect_amx_bf16() {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 22)) || !(d & (1u << 24))) return false;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return false;  // OSXSAVE, so xgetbv may run
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & (3u << 17)) != (3u << 17)) return false;
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx512bf16")) return false;
#if defined(__linux__)
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
#else
    return false;
#endif
}
#else
bool detect_amx_bf16() { return false; }
#endif


// Index of element (r, i) of a (N, K) matrix in the tiled order.
inline int64_t tiled_at(int64_t r, int64_t i, int64_t k) {
    return ((r / TILE_OUT * (k / TILE_IN) + i / TILE_IN) * TILE_OUT + i % TILE_IN / 2) * TILE_IN + r % TILE_OUT * 2 +
           i % 2;
}

}  // namespace

// A tiled matrix's tensor: quant_cpu.cpp's check() of KIND_BF16_TILES and this file's entry points call it.
void check_tiled(const torch::Tensor& w) {
    TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == torch::kBFloat16 && w.dim() == 2 && w.is_contiguous() &&
                w.size(0) % TILE_OUT == 0 && w.size(1) % TILE_IN == 0,
                "tiled bf16 weights: a contiguous (N, K) bfloat16 CPU tensor, N a multiple of 16 and K of 32, got ",
                w.scalar_type(), " ", w.sizes());
}

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")
namespace amx {

struct alignas(64) TileConfig {
    uint8_t palette = 1, start_row = 0;
    uint8_t reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

// Tiles 0-3: accumulators (mt rows of 16 floats); 4, 5: the activations' hi and lo parts (mt rows of 32 bf16);
// 6, 7: weight tiles (16 rows of 64 bytes).
void configure(int mt) {
    TileConfig cfg;
    for (int t = 0; t < 8; t++) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = t >= 6 ? 16 : mt;
    }
    // Not _tile_loadconfig: GCC 12 does not see that builtin read the struct and dropped the stores above.
    __asm__ volatile("ldtilecfg %0" : : "m"(cfg));
}

// y[:, 16*b0 : 16*b1] for column blocks [b0, b1). hi and lo: (rows rounded up to 16 when over 16, K) bf16, the
// padding rows zero; y (rows, n) float32.
template <bool SPLIT>
void column_blocks(const uint16_t* w, int64_t k, const uint16_t* hi, const uint16_t* lo, int64_t rows, int64_t n,
                   int64_t b0, int64_t b1, float* y) {
    const int mt = static_cast<int>(std::min<int64_t>(rows, 16));
    configure(mt);
    const int64_t kt = k / TILE_IN, a_stride = k * 2, y_stride = n * 4;
    alignas(64) float part[16 * 16];
    for (int64_t g = b0; g < b1; g += GROUP) {
        const int64_t blocks = std::min<int64_t>(GROUP, b1 - g);
        const uint16_t* w0 = w + g * kt * TILE_VALUES;
        const uint16_t* w1 = w0 + kt * TILE_VALUES;
        const uint16_t* w2 = w1 + kt * TILE_VALUES;
        const uint16_t* w3 = w2 + kt * TILE_VALUES;
        for (int64_t m0 = 0; m0 < rows; m0 += 16) {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            const uint16_t* h = hi + m0 * k;
            const uint16_t* l = lo + m0 * k;
            for (int64_t t = 0; t < kt; t++) {
                _tile_loadd(4, h + t * TILE_IN, a_stride);
                if (SPLIT) _tile_loadd(5, l + t * TILE_IN, a_stride);
                _tile_loadd(6, w0 + t * TILE_VALUES, 64);
                if (SPLIT) _tile_dpbf16ps(0, 5, 6);  // the small part first
                _tile_dpbf16ps(0, 4, 6);
                if (blocks > 1) {
                    _tile_loadd(7, w1 + t * TILE_VALUES, 64);
                    if (SPLIT) _tile_dpbf16ps(1, 5, 7);
                    _tile_dpbf16ps(1, 4, 7);
                }
                if (blocks > 2) {
                    _tile_loadd(6, w2 + t * TILE_VALUES, 64);
                    if (SPLIT) _tile_dpbf16ps(2, 5, 6);
                    _tile_dpbf16ps(2, 4, 6);
                }
                if (blocks > 3) {
                    _tile_loadd(7, w3 + t * TILE_VALUES, 64);
                    if (SPLIT) _tile_dpbf16ps(3, 5, 7);
                    _tile_dpbf16ps(3, 4, 7);
                }
            }
            const int64_t live = std::min<int64_t>(16, rows - m0);
            float* out = y + m0 * n + g * TILE_OUT;
            // A full chunk goes straight into y; the last of a batch over 16 rows through `part` (its padding
            // rows must not be written). GCC's tile intrinsics take the tile number as a literal: a macro.
#define LANTERN_STORE_TILE(T)                                                            \
    if (live == mt) {                                                                    \
        _tile_stored(T, out + T * TILE_OUT, y_stride);                                   \
    } else {                                                                             \
        _tile_stored(T, part, 64);                                                       \
        for (int64_t r = 0; r < live; r++) std::memcpy(out + r * n + T * TILE_OUT, part + r * 16, 64); \
    }
            LANTERN_STORE_TILE(0)
            if (blocks > 1) { LANTERN_STORE_TILE(1) }
            if (blocks > 2) { LANTERN_STORE_TILE(2) }
            if (blocks > 3) { LANTERN_STORE_TILE(3) }
#undef LANTERN_STORE_TILE
        }
    }
    _tile_release();
}

// The prefill's product (bf16 activations, more than 16 rows): 2 x 2 accumulator tiles, 32 rows by 2 column
// blocks, so each activation tile and each weight tile loaded serves two multiplications (against one and a
// quarter loads a multiplication in column_blocks). a: (rows rounded up to 16, K) bf16, zero past `rows`.
void block_pairs(const uint16_t* w, int64_t k, const uint16_t* a, int64_t rows, int64_t n, int64_t b0, int64_t b1,
                 float* y) {
    configure(16);
    const int64_t kt = k / TILE_IN, a_stride = k * 2, y_stride = n * 4;
    alignas(64) float part[16 * 16];
    for (int64_t b = b0; b < b1; b += 2) {
        const bool two = b + 1 < b1;
        const uint16_t* w0 = w + b * kt * TILE_VALUES;
        const uint16_t* w1 = w0 + kt * TILE_VALUES;
        for (int64_t m0 = 0; m0 < rows; m0 += 32) {
            const bool second = m0 + 16 < rows;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            const uint16_t* a0 = a + m0 * k;
            const uint16_t* a1 = a0 + 16 * k;
            for (int64_t t = 0; t < kt; t++) {
                _tile_loadd(4, a0 + t * TILE_IN, a_stride);
                _tile_loadd(6, w0 + t * TILE_VALUES, 64);
                _tile_dpbf16ps(0, 4, 6);
                if (second) {
                    _tile_loadd(5, a1 + t * TILE_IN, a_stride);
                    _tile_dpbf16ps(2, 5, 6);
                }
                if (two) {
                    _tile_loadd(7, w1 + t * TILE_VALUES, 64);
                    _tile_dpbf16ps(1, 4, 7);
                    if (second) _tile_dpbf16ps(3, 5, 7);
                }
            }
            // Tile T holds rows m0 + 16*R on, column block b + C; rows past `rows` are not written.
#define LANTERN_STORE_PAIR(T, R, C)                                                                 \
    {                                                                                               \
        const int64_t live = std::min<int64_t>(16, rows - m0 - 16 * R);                            \
        float* out = y + (m0 + 16 * R) * n + (b + C) * TILE_OUT;                                    \
        if (live == 16) {                                                                           \
            _tile_stored(T, out, y_stride);                                                         \
        } else {                                                                                    \
            _tile_stored(T, part, 64);                                                              \
            for (int64_t r = 0; r < live; r++) std::memcpy(out + r * n, part + r * 16, 64);         \
        }                                                                                           \
    }
            LANTERN_STORE_PAIR(0, 0, 0)
            if (two) LANTERN_STORE_PAIR(1, 0, 1)
            if (second) LANTERN_STORE_PAIR(2, 1, 0)
            if (second && two) LANTERN_STORE_PAIR(3, 1, 1)
#undef LANTERN_STORE_PAIR
        }
    }
    _tile_release();
}

}  // namespace amx
#pragma GCC pop_options
#endif

// Whether this CPU and OS run the AMX-BF16 product (tiled matrices are made only then). Asked once, on first use
// (quant_cpu.cpp's static initialisation calls it, in an order across files C++ leaves open).
bool amx_bf16() {
    static const bool usable = detect_amx_bf16();
    return usable;
}

namespace {

// y (rows, N) float32 = A (rows, K) @ W.T, A as bf16 hi (+ lo, when given) parts of `padded` rows (zero past `rows`).
// The decode products (hi + lo) run on the kernels' pool, as the other decode kernels; the prefill's (bf16
// activations, tiles_matmul) on PyTorch's OpenMP threads, as the dense phase's other ops: two sets of spinning
// threads on the same cores made a 56-token prefill of the bf16 folder ~2x slower (quant_cpu.cpp, dequantize_to).
void tiles_product(const uint16_t* hi, const uint16_t* lo, int64_t rows, int64_t k, const torch::Tensor& w, float* y) {
#if defined(__x86_64__) || defined(_M_X64)
    const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
    const int64_t n = w.size(0), blocks = n / TILE_OUT, groups = (blocks + GROUP - 1) / GROUP;
    // Tasks of whole groups of column blocks, each configuring the tiles once: about two per thread.
    const int64_t grain = std::max<int64_t>(1, groups / (2 * std::max(1, at::get_num_threads())));
    auto task = [&](int64_t g0, int64_t g1) {
        const int64_t b0 = g0 * GROUP, b1 = std::min(blocks, g1 * GROUP);
        if (lo) amx::column_blocks<true>(wp, k, hi, lo, rows, n, b0, b1, y);
        else if (rows > 16) amx::block_pairs(wp, k, hi, rows, n, b0, b1, y);
        else amx::column_blocks<false>(wp, k, hi, nullptr, rows, n, b0, b1, y);
    };
    if (lo) parallel_rows(groups, grain, task);
    else at::parallel_for(0, groups, grain, task);
#endif
}

int64_t padded_rows(int64_t rows) { return rows <= 16 ? rows : (rows + 15) / 16 * 16; }

}  // namespace

// y (rows, N) float32 = x (rows, K) float32 @ W.T, W tiled (N, K) bf16 (checked by the caller, quant_cpu.cpp's
// qmatmul): x split into hi + lo, the decode products.
void amx_bf16_matmul(const float* x, int64_t rows, int64_t k, const torch::Tensor& w, float* y) {
    TORCH_CHECK(amx_bf16(), "tiled bf16 weights need a CPU with AMX-BF16 (Intel Xeon, Sapphire Rapids or later)");
    std::vector<uint16_t> hi(padded_rows(rows) * k, 0), lo(padded_rows(rows) * k, 0);
#if defined(__x86_64__) || defined(_M_X64)
    avx512bf16::split_rows(x, rows, k, k, hi.data(), lo.data());
#endif
    tiles_product(hi.data(), lo.data(), rows, k, w, y);
}

// (..., N) float32 = x (..., K) bf16 @ W.T for a tiled W: the activations as they are (a prefill's, rounded to bf16
// as the dense path's).
torch::Tensor tiles_matmul(const torch::Tensor& x_in, const torch::Tensor& w) {
    TORCH_CHECK(amx_bf16(), "tiled bf16 weights need a CPU with AMX-BF16 (Intel Xeon, Sapphire Rapids or later)");
    check_tiled(w);
    TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == torch::kBFloat16 && x_in.dim() >= 1 &&
                x_in.size(-1) == w.size(1), "x: (..., K=", w.size(1), ") bfloat16 on the CPU");
    const int64_t k = w.size(1), rows = x_in.numel() / k;
    auto shape = x_in.sizes().vec();
    shape.back() = w.size(0);
    auto y = torch::empty(shape, x_in.options().dtype(torch::kFloat32));
    if (rows == 0) return y;
    auto x = x_in.reshape({rows, k});
    if (padded_rows(rows) != rows || !x.is_contiguous())
        x = torch::cat({x, torch::zeros({padded_rows(rows) - rows, k}, x.options())});
    tiles_product(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), nullptr, rows, k, w,
                  y.data_ptr<float>());
    return y;
}

// W (N, K) bf16 -> the tiled order, in place.
void bf16_tiles(torch::Tensor w) {
    check_tiled(w);
    const int64_t n = w.size(0), k = w.size(1);
    uint16_t* p = reinterpret_cast<uint16_t*>(w.data_ptr<at::BFloat16>());
    // One column block (16 rows) at a time through a copy: the block's rows and its tiles cover the same memory.
    std::vector<uint16_t> rows(TILE_OUT * k);
    for (int64_t b = 0; b < n / TILE_OUT; b++) {
        uint16_t* block = p + b * TILE_OUT * k;
        std::memcpy(rows.data(), block, rows.size() * 2);
        for (int64_t c = 0; c < TILE_OUT; c++)
            for (int64_t i = 0; i < k; i++) block[tiled_at(c, i, k)] = rows[c * k + i];
    }
}

// Rows `index` of a tiled W, as a plain (len(index), K) bf16 tensor (an embedding lookup, dequantization).
torch::Tensor bf16_tile_rows(const torch::Tensor& w, const torch::Tensor& index) {
    check_tiled(w);
    TORCH_CHECK(index.scalar_type() == torch::kInt64 && index.dim() == 1, "index: 1-D int64");
    const int64_t n = w.size(0), k = w.size(1), count = index.size(0);
    const auto idx = index.contiguous();
    const int64_t* ids = idx.data_ptr<int64_t>();
    auto out = torch::empty({count, k}, w.options());
    const uint16_t* p = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
    uint16_t* o = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
    for (int64_t j = 0; j < count; j++) {
        const int64_t r = ids[j];
        TORCH_CHECK(r >= 0 && r < n, "row ", r, " out of range for ", n, " rows");
        const uint16_t* base = p + r / TILE_OUT * TILE_OUT * k + r % TILE_OUT * 2;
        for (int64_t i = 0; i < k; i += 2) {  // pair i/2 of the row: tile i/32, tile row i%32/2
            const uint16_t* pair = base + (i / TILE_IN * TILE_OUT + i % TILE_IN / 2) * TILE_IN;
            o[j * k + i] = pair[0];
            o[j * k + i + 1] = pair[1];
        }
    }
    return out;
}

void register_amx(pybind11::module& mod) {
    mod.def("amx_bf16", &amx_bf16, "whether this CPU and OS run the AMX-BF16 product of tiled bf16 matrices");
    // The GIL is let go as in quant_cpu.cpp's products: a server's event loop runs meanwhile.
    mod.def("bf16_tiles", &bf16_tiles, "bf16 weights (N, K), N % 16 == 0, K % 32 == 0 -> the tiled order, in place",
            pybind11::call_guard<pybind11::gil_scoped_release>());
    mod.def("tiles_matmul", &tiles_matmul, "(..., N) float32 = x (..., K) bf16 @ W.T for a tiled bf16 W (AMX)",
            pybind11::call_guard<pybind11::gil_scoped_release>());
    mod.def("bf16_tile_rows", &bf16_tile_rows, "rows of a tiled bf16 matrix, as a plain (len, K) bf16 tensor",
            pybind11::call_guard<pybind11::gil_scoped_release>());
}
