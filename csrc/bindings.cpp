// The one place where C++ ops are registered with Python. Each op lives in its own file
// and is declared in ops.h; this file only describes the Python-facing signatures.
#include <pybind11/pybind11.h>

#include "ops.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "magicseg-engine C++ mask operations";

  m.def("build_info", []() {
    py::dict info;
#ifdef MAGICSEG_WITH_CUDA
    info["cuda"] = true;
#else
    info["cuda"] = false;
#endif
    info["compiler"] = MAGICSEG_COMPILER;
    info["max_threads"] = magicseg::default_num_threads();
    return info;
  }, "How this extension was built: CUDA ops compiled or not, compiler, default thread count.");
}
