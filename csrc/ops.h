// Declarations of the C++ ops bound in bindings.cpp.
#pragma once

namespace magicseg {

// Threads a batched op uses when the caller passes num_threads <= 0.
int default_num_threads();

}  // namespace magicseg
