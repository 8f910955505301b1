#include "cpu/threadpool.h"

#include <pthread.h>

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

namespace vkern {
namespace cpu {
namespace {

int default_threads() {
  static const int n = [] {
    for (const char* name : {"VKERN_NUM_THREADS", "OMP_NUM_THREADS"}) {
      if (const char* env = std::getenv(name)) {
        const int v = std::atoi(env);
        if (v > 0) return v;
      }
    }
    const unsigned hw = std::thread::hardware_concurrency();
    return hw > 0 ? static_cast<int>(hw) : 1;
  }();
  return n;
}

std::atomic<int> wanted{0};  // 0 = default
int configured() {
  const int w = wanted.load(std::memory_order_relaxed);
  return w > 0 ? w : default_threads();
}

using Team = CallScope;
thread_local Team* tls_team = nullptr;  // the call this thread works for
thread_local int tls_worker = -1;       // >= 0 while running a parallel_for task

}  // namespace

// A fixed-size pool: size - 1 threads plus the caller. Owned by one call at a time.
class Pool {
 public:
  Pool(int n, uint64_t epoch) : size_(n), epoch_(epoch) {
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
  uint64_t epoch() const { return epoch_; }

  void run(int64_t n_tasks, const std::function<void(int64_t, int)>& fn, Team* team) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      fn_ = &fn;
      team_ = team;
      n_tasks_ = n_tasks;
      next_.store(0);
      busy_ = 0;
      open_ = true;
      ++generation_;
    }
    wake_.notify_all();
    work(0);
    // Wait only for the workers that joined this run. A worker the scheduler has
    // not woken by the time the caller ran out of tasks is not waited for (on a
    // loaded machine that wake-up took milliseconds, on every call); once the run
    // is closed, a late worker skips it (it joins under mu_, so it either counts
    // in busy_ before the close or sees open_ == false).
    std::unique_lock<std::mutex> lock(mu_);
    open_ = false;
    done_.wait(lock, [this] { return busy_ == 0; });
    fn_ = nullptr;
    team_ = nullptr;
  }

 private:
  void work(int worker) {
    const int saved = tls_worker;
    tls_worker = worker;
    for (int64_t t = next_.fetch_add(1); t < n_tasks_; t = next_.fetch_add(1)) (*fn_)(t, worker);
    tls_worker = saved;
  }
  void loop(int worker) {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
        if (!open_ || next_.load() >= n_tasks_) continue;  // closed, or nothing left to take
        ++busy_;
        tls_team = team_;
      }
      work(worker);
      tls_team = nullptr;
      {
        std::lock_guard<std::mutex> lock(mu_);
        --busy_;
      }
      done_.notify_one();
    }
  }

  const int size_;
  const uint64_t epoch_;
  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable wake_, done_;
  const std::function<void(int64_t, int)>* fn_ = nullptr;
  Team* team_ = nullptr;
  int64_t n_tasks_ = 0;
  std::atomic<int64_t> next_{0};
  int busy_ = 0;      // workers inside the current run
  bool open_ = false;  // the current run still admits workers
  uint64_t generation_ = 0;
  bool stop_ = false;
};

namespace {

// Idle pools, handed to calls as they start. Guarded by registry_mu.
constexpr size_t kMaxIdle = 8;
std::mutex registry_mu;
std::vector<Pool*>* idle = new std::vector<Pool*>();  // never destroyed: no joins at exit
uint64_t epoch = 0;  // bumped in a forked child: pools of older epochs are dead

void after_fork_in_child() {
  // Only the forking thread exists here. The parent's pools have no threads in
  // this process: drop (leak) them rather than join threads that do not exist,
  // and give the registry a fresh, unlocked mutex.
  new (&registry_mu) std::mutex();
  idle = new std::vector<Pool*>();
  ++epoch;
  tls_team = nullptr;
  tls_worker = -1;
}

const bool atfork_registered = [] {
  pthread_atfork(nullptr, nullptr, after_fork_in_child);
  return true;
}();

Pool* take_pool(int n) {
  uint64_t e;
  {
    std::lock_guard<std::mutex> lock(registry_mu);
    e = epoch;
    for (size_t i = 0; i < idle->size(); ++i) {
      Pool* p = (*idle)[i];
      if (p->size() == n) {
        (*idle)[i] = idle->back();
        idle->pop_back();
        return p;
      }
    }
  }
  return new Pool(n, e);
}

void give_back(Pool* p) {
  Pool* drop = nullptr;
  {
    std::lock_guard<std::mutex> lock(registry_mu);
    if (p->epoch() != epoch) return;  // from before a fork: its threads are gone
    if (p->size() == configured() && idle->size() < kMaxIdle) {
      idle->push_back(p);
    } else {
      drop = p;
    }
    // Pools of a size no call asks for any more are retired.
    for (size_t i = 0; i < idle->size();) {
      if ((*idle)[i]->size() != configured() && drop == nullptr) {
        drop = (*idle)[i];
        (*idle)[i] = idle->back();
        idle->pop_back();
      } else {
        ++i;
      }
    }
  }
  delete drop;  // joins its threads, outside the lock
}

}  // namespace

CallScope::CallScope() {
  (void)atfork_registered;
  if (tls_team != nullptr) return;  // nested: share the outer call's team
  size_ = configured();
  if (size_ > 1) pool_ = take_pool(size_);
  tls_team = this;
  owner_ = true;
}

CallScope::~CallScope() {
  if (!owner_) return;
  tls_team = nullptr;
  if (pool_) give_back(pool_);
}

int num_threads() { return tls_team ? tls_team->size_ : configured(); }

void set_num_threads(int n) { wanted.store(n < 1 ? 1 : n, std::memory_order_relaxed); }

void parallel_for(int64_t n_tasks, const std::function<void(int64_t, int)>& fn) {
  if (n_tasks <= 0) return;
  if (tls_worker >= 0) {  // nested inside a task: run inline on this worker
    for (int64_t t = 0; t < n_tasks; ++t) fn(t, tls_worker);
    return;
  }
  CallScope scope;  // no-op inside a call
  Team* team = tls_team;
  if (team->pool_ == nullptr || n_tasks == 1) {
    const int saved = tls_worker;
    tls_worker = 0;
    for (int64_t t = 0; t < n_tasks; ++t) fn(t, 0);
    tls_worker = saved;
    return;
  }
  team->pool_->run(n_tasks, fn, team);
}

}  // namespace cpu
}  // namespace vkern
