// A small persistent thread pool. The calling thread works too, as worker 0.
#pragma once
#include <cstdint>
#include <functional>

namespace vkern {
namespace cpu {

int num_threads();
void set_num_threads(int n);  // n >= 1

// Runs fn(task, worker) for every task in [0, n_tasks), tasks handed out
// dynamically; worker is in [0, num_threads()). Returns when all are done.
// Calls from several threads at once are serialised. fn must not throw.
void parallel_for(int64_t n_tasks, const std::function<void(int64_t, int)>& fn);

}  // namespace cpu
}  // namespace vkern
