// Thread pools for the CPU kernels. The calling thread works too, as worker 0.
//
// Every kernel call runs inside a CallScope (the bindings open one right after
// releasing the GIL). The scope pins the thread count for the whole call and
// takes a pool of that size for itself, so that:
//   * num_threads() and parallel_for() inside one call always agree, however
//     set_num_threads() races with the call (a change applies to calls that
//     start afterwards; no call ever sees its pool resized under it);
//   * calls from several threads at once run side by side, each on its own
//     pool (pools are reused: a finished call hands its pool back);
//   * with one thread, a call runs on the calling thread alone, no lock taken.
// After fork() the child forgets the parent's pools (their threads do not
// exist there) and builds new ones on its first call.
#pragma once
#include <cstdint>
#include <functional>

namespace vkern {
namespace cpu {

class Pool;

// Inside a call: that call's thread count. Outside: the count the next call gets.
int num_threads();
void set_num_threads(int n);  // n >= 1; applies to calls that start afterwards

// Pins a thread count and a pool for one kernel call (RAII). Nested scopes on
// the same thread share the outer one.
class CallScope {
 public:
  CallScope();
  ~CallScope();
  CallScope(const CallScope&) = delete;
  CallScope& operator=(const CallScope&) = delete;

 private:
  friend void parallel_for(int64_t, const std::function<void(int64_t, int)>&);
  friend int num_threads();
  bool owner_ = false;
  int size_ = 1;
  Pool* pool_ = nullptr;  // null when size_ == 1
};

// Runs fn(task, worker) for every task in [0, n_tasks), tasks handed out
// dynamically; worker is in [0, num_threads()). Returns when all are done.
// Outside a CallScope it opens one for itself. Called from inside fn (nested),
// it runs the tasks inline on the calling worker. fn must not throw.
void parallel_for(int64_t n_tasks, const std::function<void(int64_t, int)>& fn);

}  // namespace cpu
}  // namespace vkern
