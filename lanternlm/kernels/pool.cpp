// How Lantern's kernels split work across threads: parallel_rows(n, grain, fn) splits [0, n) into one
// contiguous range per thread. On the process's first thread it uses PyTorch's OpenMP team; on any other
// thread, a small persistent pool of its own (the calling thread takes the first range).
//
// Why two: called from a thread other than the first (the serving Engine's), each OpenMP region woke its
// team from sleep, adding ~45 us per call on the project's 2-core VM (a 3072x576 product: 39 us from the
// main thread, 86 us from another) and halving the Engine's decode speed. On the first thread, a pool of
// its own fought PyTorch's OpenMP workers, which spin after PyTorch's own parallel ops, and halved plain
// generation instead. The pool's workers spin briefly between calls (a decode step makes hundreds of calls
// microseconds apart), then sleep, so they cost nothing while idle. The thread count follows
// torch.get_num_threads().

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>

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
        const int64_t want = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (n + grain - 1) / std::max<int64_t>(grain, 1)));
        if (want <= 1 || n <= 0) {
            if (n > 0) fn(0, n);
            return;
        }
        std::lock_guard<std::mutex> caller(call_mutex_);  // one parallel call at a time
        if (static_cast<int64_t>(workers_.size()) != want - 1) resize(want - 1);
        fn_ = &fn;
        n_ = n;
        parts_ = want;
        pending_.store(want - 1, std::memory_order_relaxed);
        {
            std::lock_guard<std::mutex> lock(sleep_mutex_);
            generation_.fetch_add(1, std::memory_order_release);
        }
        wake_.notify_all();
        part(0);
        while (pending_.load(std::memory_order_acquire) != 0) _mm_pause();
    }

private:
    void part(int64_t index) {
        const int64_t chunk = (n_ + parts_ - 1) / parts_;
        const int64_t begin = index * chunk, end = std::min(n_, begin + chunk);
        if (begin < end) (*fn_)(begin, end);
    }

    void worker(int64_t index, uint64_t seen) {
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
            if (index < parts_) part(index);
            pending_.fetch_sub(1, std::memory_order_acq_rel);
        }
    }

    void resize(size_t count) {
        if (!workers_.empty()) {
            stop_.store(true, std::memory_order_release);
            {
                std::lock_guard<std::mutex> lock(sleep_mutex_);
                generation_.fetch_add(1, std::memory_order_release);
            }
            wake_.notify_all();
            for (auto& t : workers_) t.join();
            workers_.clear();
            stop_.store(false, std::memory_order_release);
        }
        const uint64_t seen = generation_.load(std::memory_order_acquire);
        for (size_t i = 0; i < count; i++) workers_.emplace_back(&Pool::worker, this, static_cast<int64_t>(i + 1), seen);
    }

    std::vector<std::thread> workers_;
    std::mutex call_mutex_, sleep_mutex_;
    std::condition_variable wake_;
    std::atomic<uint64_t> generation_{0};
    std::atomic<int64_t> pending_{0};
    std::atomic<bool> stop_{false};
    const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
    int64_t n_ = 0, parts_ = 1;
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
    // The process's first thread shares PyTorch's OpenMP team (whose workers spin between PyTorch's own
    // parallel ops and would otherwise take a core from ours); other threads use the pool.
    if (static_cast<pid_t>(syscall(SYS_gettid)) == getpid()) {
        at::parallel_for(0, n, grain, fn);
    } else {
        pool().run(n, grain, fn);
    }
}
