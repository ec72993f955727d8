// A task pool for the CPU kernel that never waits for a thread that has not started (see the .cpp).
#pragma once

#include <cstdint>
#include <functional>

namespace vcf {

// Runs fn(task) for every task in [0, num_tasks): on the calling thread and on up to `threads - 1` helper
// threads, each claiming the next task as it becomes free. Returns when every task has run.
void run_tasks(int64_t num_tasks, int threads, const std::function<void(int64_t)>& fn);

}  // namespace vcf
