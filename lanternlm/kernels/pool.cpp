// How Lantern's products and decode kernels split work across threads: parallel_rows(n, grain, fn) splits [0, n)
// into contiguous ranges of at least `grain` rows, run by a small persistent pool whose threads (the caller
// included) claim up to four ranges per thread one at a time, so a thread the OS has not scheduled holds no one
// up: the others take the rest of the ranges.
//
// Why not PyTorch's OpenMP team: its static split waits for every thread, and with another process holding a
// core each product waited a whole time slice (~4 ms); greedy decode on the project's 2-core VM beside one busy
// process ran at 35-40 tokens/s through OpenMP and 60-77 through the pool. Called from a thread other than the
// first (the serving Engine's), an OpenMP region also woke its team from sleep on every call (+45 us per
// product). The pool's workers spin briefly between calls (a decode step makes hundreds of calls microseconds
// apart), then sleep, so they cost nothing while idle. The thread count follows torch.get_num_threads().
//
// The dense phases (a prefill: oneDNN matmuls with dequantize, RMSNorm and the gated activation between them)
// keep PyTorch's OpenMP threads instead (at::parallel_for in those kernels): there the two sets of spinning
// threads on the same cores slowed a 64-token prefill by a third. They now share the cores only at the switch
// between a prefill and decoding.

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace {

class Pool {
public:
    ~Pool() { resize(0); }

    void run(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
        grain = std::max<int64_t>(grain, 1);
        const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (n + grain - 1) / grain));
        if (threads <= 1 || n <= 0) {
            if (n > 0) fn(0, n);
            return;
        }
        std::lock_guard<std::mutex> caller(call_mutex_);  // one parallel call at a time
        if (static_cast<int64_t>(workers_.size()) != threads - 1) resize(threads - 1);
        // Up to CHUNKS_PER_THREAD chunks per thread, each at least `grain` rows, claimed one at a time
        const int64_t chunk = std::max(grain, (n + threads * CHUNKS_PER_THREAD - 1) / (threads * CHUNKS_PER_THREAD));
        const int64_t chunks = (n + chunk - 1) / chunk;
        fn_ = &fn;
        n_ = n;
        chunk_ = chunk;
        done_.store(0, std::memory_order_relaxed);
        const uint64_t id = ++calls_;
        work_.store(id << 32 | static_cast<uint64_t>(chunks) << 16, std::memory_order_release);
        {
            std::lock_guard<std::mutex> lock(sleep_mutex_);
            generation_.store(id, std::memory_order_release);
        }
        wake_.notify_all();
        help(id);
        while (done_.load(std::memory_order_acquire) != chunks) _mm_pause();
    }

private:
    // Chunks are claimed from one word: call id (32 bits) | chunk count (16) | next chunk (16). A thread that
    // wakes late finds another call's id, or no chunk left, and claims nothing, so the caller never waits for
    // a thread the OS has not scheduled: it does the chunks itself (a static split waited a whole time slice,
    // ~4 ms, whenever another process held the second core).
    void help(uint64_t id) {
        uint64_t w = work_.load(std::memory_order_acquire);
        while (true) {
            const uint64_t next = w & 0xFFFF, count = (w >> 16) & 0xFFFF;
            if ((w >> 32) != id || next >= count) return;
            if (!work_.compare_exchange_weak(w, w + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
            // A claimed chunk keeps the caller waiting for done_, so fn_ and n_ belong to this call.
            const int64_t begin = static_cast<int64_t>(next) * chunk_, end = std::min(n_, begin + chunk_);
            (*fn_)(begin, end);
            done_.fetch_add(1, std::memory_order_acq_rel);
            w = work_.load(std::memory_order_acquire);
        }
    }

    void worker(uint64_t seen) {
        while (true) {
            // spin for a while (~0.2 ms) for the next call, then sleep until one comes
            uint64_t now = generation_.load(std::memory_order_acquire);
            const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(200);
            int checks = 0;
            while (now == seen) {
                _mm_pause();
                if (++checks % 64 == 0 && std::chrono::steady_clock::now() > spin_until) {
                    std::unique_lock<std::mutex> lock(sleep_mutex_);
                    wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
                }
                now = generation_.load(std::memory_order_acquire);
            }
            seen = now;
            if (stop_.load(std::memory_order_acquire)) return;
            help(now);
        }
    }

    void resize(size_t count) {
        if (!workers_.empty()) {
            stop_.store(true, std::memory_order_release);
            {
                std::lock_guard<std::mutex> lock(sleep_mutex_);
                generation_.store(++calls_, std::memory_order_release);
            }
            wake_.notify_all();
            for (auto& t : workers_) t.join();
            workers_.clear();
            stop_.store(false, std::memory_order_release);
        }
        const uint64_t seen = generation_.load(std::memory_order_acquire);
        for (size_t i = 0; i < count; i++) workers_.emplace_back(&Pool::worker, this, seen);
    }

    static constexpr int64_t CHUNKS_PER_THREAD = 4;
    std::vector<std::thread> workers_;
    std::mutex call_mutex_, sleep_mutex_;
    std::condition_variable wake_;
    uint64_t calls_ = 0;                    // ids of calls (and of resizes), under call_mutex_
    std::atomic<uint64_t> generation_{0};   // the latest id: workers wake when it changes
    std::atomic<uint64_t> work_{0};         // see help()
    std::atomic<int64_t> done_{0};          // chunks finished in the current call
    std::atomic<bool> stop_{false};
    const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
    int64_t n_ = 0, chunk_ = 1;
};

// Never destroyed: workers must not be joined during interpreter shutdown. A forked child has none of the
// parent's threads, so it starts a pool of its own (the parent's is left untouched in the child's memory).
Pool* current = nullptr;
std::once_flag registered;

Pool& pool() {
    std::call_once(registered, [] { pthread_atfork(nullptr, nullptr, [] { current = nullptr; }); });
    if (current == nullptr) current = new Pool();
    return *current;
}

}  // namespace

void parallel_rows(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
    pool().run(n, grain, fn);
}

// The calling thread's OpenMP thread count for PyTorch's own ops (torch.set_num_threads would change every new
// thread's and MKL's too); returns the previous count. Small per-token ops (sampling over a vocabulary row) run
// serially with 1: libgomp throttles its spinning to near nothing once a second thread (the Engine's) has a team
// of its own beside the first thread's, and every parallel op then waits for a sleeping worker to wake.
int64_t set_torch_threads(int64_t n) {
    const int64_t before = at::get_num_threads();  // first: PyTorch's once-per-thread setup, which sets the count
    omp_set_num_threads(static_cast<int>(std::max<int64_t>(1, n)));
    return before;
}
