// Batch parallelism shared by the C++ ops: one std::thread per worker over a range of items.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

#include "ops.h"

namespace magicseg {

// Calls fn(i, scratch) for every i in [0, n) on up to num_threads threads (num_threads <= 0:
// default_num_threads()), each thread reusing one default-constructed Scratch. Items are
// handed out one at a time so a few large ones do not leave threads idle. An exception from
// fn is rethrown here, the one with the lowest i, so errors do not depend on timing. Must be
// called without the GIL held if fn may run long; fn must not touch Python objects.
template <typename Scratch, typename Fn>
void parallel_for(int64_t n, int num_threads, Fn fn) {
  if (n <= 0) return;
  if (num_threads <= 0) num_threads = default_num_threads();
  const int64_t workers = std::min<int64_t>(num_threads, n);
  std::atomic<int64_t> next{0};
  std::vector<std::exception_ptr> errors(static_cast<size_t>(n));
  auto work = [&] {
    Scratch scratch;
    for (int64_t i; (i = next.fetch_add(1)) < n;) {
      try {
        fn(i, scratch);
      } catch (...) {
        errors[i] = std::current_exception();
      }
    }
  };
  std::vector<std::thread> threads;
  for (int64_t t = 1; t < workers; ++t) threads.emplace_back(work);
  work();
  for (auto& t : threads) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace magicseg
