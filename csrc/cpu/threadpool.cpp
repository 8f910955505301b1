#include "cpu/threadpool.h"

#include <pthread.h>

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

namespace vkern {
namespace cpu {
namespace {

int default_threads() {
  for (const char* name : {"VKERN_NUM_THREADS", "OMP_NUM_THREADS"}) {
    if (const char* env = std::getenv(name)) {
      const int n = std::atoi(env);
      if (n > 0) return n;
    }
  }
  const unsigned hw = std::thread::hardware_concurrency();
  return hw > 0 ? static_cast<int>(hw) : 1;
}

class Pool {
 public:
  explicit Pool(int n) : size_(n) {
    for (int w = 1; w < n; ++w) workers_.emplace_back([this, w] { loop(w); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int size() const { return size_; }

  void run(int64_t n_tasks, const std::function<void(int64_t, int)>& fn) {
    if (n_tasks <= 0) return;
    if (size_ == 1 || n_tasks == 1) {
      for (int64_t t = 0; t < n_tasks; ++t) fn(t, 0);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      fn_ = &fn;
      n_tasks_ = n_tasks;
      next_.store(0);
      busy_ = size_ - 1;
      ++generation_;
    }
    wake_.notify_all();
    work(0);
    std::unique_lock<std::mutex> lock(mu_);
    done_.wait(lock, [this] { return busy_ == 0; });
    fn_ = nullptr;
  }

 private:
  void work(int worker) {
    for (int64_t t = next_.fetch_add(1); t < n_tasks_; t = next_.fetch_add(1)) (*fn_)(t, worker);
  }
  void loop(int worker) {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
      }
      work(worker);
      {
        std::lock_guard<std::mutex> lock(mu_);
        --busy_;
      }
      done_.notify_one();
    }
  }

  const int size_;
  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable wake_, done_;
  const std::function<void(int64_t, int)>* fn_ = nullptr;
  int64_t n_tasks_ = 0;
  std::atomic<int64_t> next_{0};
  int busy_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

std::mutex call_mu;      // one parallel_for at a time; also guards the pool pointer
Pool* pool = nullptr;    // created lazily
int wanted = 0;          // 0 = default

void forget_pool_after_fork() {
  // The child has none of the parent's worker threads: drop (leak) the pool
  // object instead of joining threads that do not exist, and start afresh.
  pool = nullptr;
  new (&call_mu) std::mutex();
}

Pool& get_pool() {
  static bool registered = [] {
    pthread_atfork(nullptr, nullptr, forget_pool_after_fork);
    return true;
  }();
  (void)registered;
  const int n = wanted > 0 ? wanted : default_threads();
  if (pool == nullptr || pool->size() != n) {
    delete pool;
    pool = new Pool(n);
  }
  return *pool;
}

}  // namespace

int num_threads() {
  std::lock_guard<std::mutex> lock(call_mu);
  return wanted > 0 ? wanted : (pool ? pool->size() : default_threads());
}

void set_num_threads(int n) {
  std::lock_guard<std::mutex> lock(call_mu);
  wanted = n < 1 ? 1 : n;
}

void parallel_for(int64_t n_tasks, const std::function<void(int64_t, int)>& fn) {
  std::lock_guard<std::mutex> lock(call_mu);
  get_pool().run(n_tasks, fn);
}

}  // namespace cpu
}  // namespace vkern
