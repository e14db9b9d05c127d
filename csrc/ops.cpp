// The one place where every refreekv operator schema is declared. Device
// implementations register themselves in csrc/cpu/*.cpp and csrc/cuda/*.cu;
// fake (meta) implementations live next to the Python wrappers in
// refreekv/ops.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(refreekv, m) {
  m.def(
      "attention_importance(Tensor query, Tensor key, float scale, "
      "Tensor? kv_valid=None, bool normalize=True, str group_reduce='none', "
      "float softcap=0.0, Tensor? sinks=None) -> Tensor");
  m.def(
      "adaptive_keep_count(Tensor ranked_scores, float threshold, "
      "Tensor? valid_len=None) -> Tensor");
  m.def(
      "mass_keep_count(Tensor ranked_scores, float tolerance, "
      "Tensor? valid_len=None) -> Tensor");
  m.def(
      "compact_kv(Tensor key, Tensor value, Tensor keep_index, Tensor keep_len) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "paged_attention(Tensor query, Tensor key_pool, Tensor value_pool, "
      "Tensor block_table, Tensor lengths, float scale, float softcap=0.0, "
      "Tensor? sinks=None) -> Tensor");
  m.def(
      "paged_write(Tensor(a!) key_pool, Tensor(b!) value_pool, "
      "Tensor block_table, Tensor start, Tensor key, Tensor value, "
      "Tensor? row_index=None, Tensor? row_count=None) -> ()");
}

namespace {

PyObject* built_with_cuda(PyObject* /*self*/, PyObject* /*args*/) {
#ifdef REFREEKV_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef module_methods[] = {
    {"built_with_cuda", built_with_cuda, METH_NOARGS,
     "True when the CUDA kernels were compiled into this extension."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                          "refreekv native operators (registered with torch "
                          "on import under torch.ops.refreekv).",
                          -1, module_methods};

}  // namespace

// Importing refreekv._C runs the static registrations above; the module
// itself only answers how it was built.
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
