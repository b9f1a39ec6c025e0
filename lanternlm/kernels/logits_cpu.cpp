// What the per-token trace and logprobs read from a logits row, in one pass each: the top k tokens (largest
// first, the lower id first on ties, as argmax breaks them), how many tokens are still in play (logit > -inf),
// and a token's rank. PyTorch takes a pass per question and a top-k that sorts: on a 49,152-token row, topk
// alone was ~80 us and the trace's eight passes ~0.5 ms a token, a tenth of a decode step (measured on the
// project's 2-core VM). Here the top k is kept in a small sorted array while a vector count per 64 logits says
// whether any of them beats the k-th value held so far, which after the first few chunks is rare.
//
// NaN is never counted, ranked ahead or taken into the top (every comparison with it is false); callers that
// must refuse NaN check for it themselves (the trace's log-sum-exp turns NaN). Shapes: T rows, V vocabulary.

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "clones.h"

namespace {

constexpr int64_t CHUNK = 64;  // logits tested together before any is looked at one by one

// How many of x[0..n) are > t, and how many are > -inf.
LANTERN_CLONES void count_above(const float* x, int64_t n, float t, int64_t& above, int64_t& kept) {
    const float ninf = -std::numeric_limits<float>::infinity();
    int64_t a = 0, c = 0;
#pragma omp simd reduction(+ : a, c)
    for (int64_t i = 0; i < n; i++) {
        a += x[i] > t;
        c += x[i] > ninf;
    }
    above = a;
    kept = c;
}

// One row's top k into vals/ids (largest first; unfilled entries stay -inf / -1); returns the kept count.
int64_t top_row(const float* x, int64_t n, int64_t k, float* vals, int64_t* ids) {
    const float ninf = -std::numeric_limits<float>::infinity();
    std::fill(vals, vals + k, ninf);
    std::fill(ids, ids + k, int64_t(-1));
    int64_t held = 0, kept = 0;
    float bar = ninf;  // a logit must be > bar to enter: -inf until k are held, then the k-th value held
    for (int64_t i0 = 0; i0 < n; i0 += CHUNK) {
        const int64_t len = std::min(CHUNK, n - i0);
        int64_t above, chunk_kept;
        count_above(x + i0, len, bar, above, chunk_kept);
        kept += chunk_kept;
        if (above == 0) continue;
        for (int64_t i = i0; i < i0 + len; i++) {
            const float v = x[i];
            if (!(v > bar)) continue;
            // Ids arrive in increasing order, so an equal value already held stays ahead (strict <).
            int64_t p = held < k ? held++ : k - 1;
            while (p > 0 && vals[p - 1] < v) {
                vals[p] = vals[p - 1];
                ids[p] = ids[p - 1];
                p--;
            }
            vals[p] = v;
            ids[p] = i;
            if (held == k) bar = vals[k - 1];
        }
    }
    return kept;
}

LANTERN_CLONES int64_t ahead_of(const float* x, int64_t n, int64_t index, bool ties_by_id) {
    const float v = x[index];
    const int64_t before = ties_by_id ? index : 0;  // equal logits at lower ids count as ahead
    int64_t c = 0;
#pragma omp simd reduction(+ : c)
    for (int64_t i = 0; i < n; i++) c += (x[i] > v) | ((x[i] == v) & (i < before));
    return c;
}

void check_rows(const torch::Tensor& x) {
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
                "logits: contiguous float32 on the CPU");
    TORCH_CHECK(x.dim() == 1 || x.dim() == 2, "logits: (V,) or (T, V)");
    TORCH_CHECK(x.size(-1) > 0, "logits: an empty row");
}

}  // namespace

// Per row of x ((V,) or (T, V)): the k largest logits that are > -inf and their ids, largest first, the lower id
// first on ties ((k,) or (T, k); past a row's kept count: -inf and -1), and the kept count ((), or (T,)).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> top_logits(const torch::Tensor& x, int64_t k) {
    check_rows(x);
    TORCH_CHECK(k >= 1, "top_logits: k >= 1");
    const int64_t n = x.size(-1), rows = x.numel() / n;
    k = std::min(k, n);
    auto vals = torch::empty({rows, k}, torch::kFloat32);
    auto ids = torch::empty({rows, k}, torch::kInt64);
    auto kept = torch::empty({rows}, torch::kInt64);
    const float* px = x.data_ptr<float>();
    for (int64_t r = 0; r < rows; r++)
        kept.data_ptr<int64_t>()[r] = top_row(px + r * n, n, k, vals.data_ptr<float>() + r * k,
                                              ids.data_ptr<int64_t>() + r * k);
    if (x.dim() == 1) return {vals[0], ids[0], kept[0]};
    return {vals, ids, kept};
}

// The 1-based rank of x[index]: 1 + the number of logits above it, + the number equal to it at lower ids when
// ties go by id (as argmax breaks them; otherwise equal logits share a rank, as vLLM's logprob ranks do). x: (V,).
int64_t logit_rank(const torch::Tensor& x, int64_t index, bool ties_by_id) {
    check_rows(x);
    TORCH_CHECK(x.dim() == 1 && index >= 0 && index < x.size(0), "logit_rank: one row and an id inside it");
    return 1 + ahead_of(x.data_ptr<float>(), x.size(0), index, ties_by_id);
}
