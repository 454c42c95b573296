// Every schema of torch.ops.fastablate, in one place. Each backend registers its kernels
// in a sibling file with the op's stem: csrc/cpu/<op>.cpp, csrc/cuda/<op>.cu.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing fastablate._C loads this library, which runs the registrations below and in
// the backend files; the module itself is empty (no pybind11 glue).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fastablate, m) {
  // out = post(shortcut + keep[row] * residual), post = ReLU if relu else identity.
  // With index: residual holds only rows index[j] of the output (gather/scatter form).
  m.def("block_skip(Tensor shortcut, Tensor residual, Tensor keep, bool relu, Tensor? index) -> Tensor");
}
