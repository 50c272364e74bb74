// The one place that registers ops. Schemas are explicit: `Tensor(a!) out` tells the dispatcher (and
// torch.compile) that the op writes `out` in place and returns nothing.
#include <Python.h>
#include <torch/library.h>

void rms_norm(at::Tensor const& x, at::Tensor const& weight, double eps, at::Tensor& out);

TORCH_LIBRARY(omni, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(omni, CUDA, m) {
  m.impl("rms_norm", &rms_norm);
}

// `import omni_kernels._C` only has to load this library (running the registrations above); the ops are then
// reached through torch.ops.omni. An empty module, no pybind11.
PyMODINIT_FUNC PyInit__C() {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "omni_kernels._C", nullptr, 0, nullptr};
  return PyModule_Create(&module);
}
