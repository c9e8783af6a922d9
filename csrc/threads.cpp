#include <algorithm>
#include <thread>

#include "ops.h"

namespace magicseg {

int default_num_threads() {
  const unsigned hw = std::thread::hardware_concurrency();
  return static_cast<int>(std::max(1u, hw));
}

}  // namespace magicseg
