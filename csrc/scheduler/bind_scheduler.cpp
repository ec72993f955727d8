// Placeholder registration; replaced by the component's real bindings.
#include <pybind11/pybind11.h>
namespace py = pybind11;
void register_scheduler(py::module_& m) { (void)m; }
