// The one pybind11 module, videocom_fast._C. Each component registers its own functions from its own file so
// that components stay independent; input checks with messages live at this boundary (see check.h).
#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_protocol(py::module_& m);   // csrc/protocol/bind_protocol.cpp
void register_scheduler(py::module_& m);  // csrc/scheduler/bind_scheduler.cpp
void register_kernels(py::module_& m);    // csrc/cpu/bind_kernels.cpp
void register_attention(py::module_& m);  // csrc/cpu/paged_attention.cpp
void register_sampling(py::module_& m);   // csrc/cpu/sampling.cpp
void register_causal_softmax(py::module_& m);  // csrc/cpu/causal_softmax.cpp
void register_hand_off(py::module_& m);   // csrc/scheduler/hand_off.cpp

PYBIND11_MODULE(_C, m) {
  m.doc() = "videocom_fast C++ core: protocol, rollout scheduler, CPU kernels (torch-free)";
#ifdef VIDEOCOM_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
#ifdef VIDEOCOM_OPENMP
  m.attr("with_openmp") = true;
#else
  m.attr("with_openmp") = false;
#endif
  register_protocol(m);
  register_scheduler(m);
  register_kernels(m);
  register_attention(m);
  register_sampling(m);
  register_causal_softmax(m);
  register_hand_off(m);
}
