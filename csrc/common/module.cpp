// The Python module fastlstm._C. Importing it loads the shared library, whose static initializers
// register the ops (common/registration.cpp) and their CPU and CUDA kernels; the module itself only says how it
// was built.
#include <Python.h>

static PyObject* has_cuda(PyObject* /*self*/, PyObject* /*args*/) {
#ifdef FASTLSTM_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

static PyMethodDef methods[] = {
    {"has_cuda", has_cuda, METH_NOARGS,
     "has_cuda() -> bool: whether fastlstm._C was built with its CUDA kernels."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "fastlstm._C",
    "Compiled kernels of fastlstm: the fastlstm::* torch ops (CPU, and CUDA when built with it).",
    -1, methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
