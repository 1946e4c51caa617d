#pragma once

// Thread counts for the OpenMP regions, and the one rule about fork.
//
// libgomp's thread pool does not survive fork(): the child has only the forking thread, but
// the pool's bookkeeping says its workers exist, and the child's first parallel region waits
// for them forever (a multiprocessing.Pool with the "fork" start method, after the parent ran
// a fit on 2 threads: the children never returned). So a process forked after this library
// was used runs every region on one thread, whatever was requested; with one thread libgomp
// does not touch the pool. (Processes made by spawn or forkserver start clean.)

#include <omp.h>

#include <atomic>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif

namespace dffkit {
namespace detail {
inline std::atomic<bool>& forked_flag() {
  static std::atomic<bool> flag{false};
  return flag;
}
inline void mark_forked_child() { forked_flag().store(true); }
}  // namespace detail

/// True in a process forked after this library's first parallel region was set up.
inline bool in_forked_child() { return detail::forked_flag().load(std::memory_order_relaxed); }

/// Threads for a parallel region: `requested` where positive, else OpenMP's default; 1 in a
/// forked child (see above). The fork handler is registered on the first call, before any
/// region can have started the pool.
inline int usable_threads(int requested) {
#if defined(__unix__) || defined(__APPLE__)
  static const int registered = pthread_atfork(nullptr, nullptr, detail::mark_forked_child);
  (void)registered;
#endif
  if (in_forked_child()) return 1;
  return requested > 0 ? requested : omp_get_max_threads();
}

}  // namespace dffkit
