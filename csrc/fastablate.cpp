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
  // y = x + m * sigma * channel_sigma[c] * z, z ~ N(0, 1) from Philox keyed by (seed, offset + element
  // index); m = mask (broadcastable to x) or Bernoulli(p) drawn in the same pass.
  m.def("gaussian_noise(Tensor x, float sigma, Tensor? channel_sigma, float p, Tensor? mask, int seed, "
        "int offset) -> Tensor");
  m.def("gaussian_noise_(Tensor(a!) x, float sigma, Tensor? channel_sigma, float p, Tensor? mask, int seed, "
        "int offset) -> ()");
  // For each image, the k pixels with the largest sum over channels of |grad| (ties: lower pixel
  // index first), or `indices`; all channels of those pixels move by step * sign(grad) ("sign")
  // or step * grad / ||grad over the chosen entries|| ("l2"), clamped to [lo[c], hi[c]].
  // Returns the new images and the (N, k) pixel indices (h * W + w).
  m.def("sparse_pixel_update(Tensor x, Tensor grad, int k, float step, Tensor lo, Tensor hi, Tensor? indices, "
        "str mode) -> (Tensor, Tensor)");
}
