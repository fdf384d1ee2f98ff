/* CPython entry point around the prediction function TL2cgen generates for one model.
 *
 * TL2cgen emits `predict(union Entry* row, int pred_margin, LEAF_T* result)` for a single row;
 * this file adds the batch loop, NaN -> "missing" conversion and a METH_FASTCALL entry so that a
 * one-row call from Python costs well under a microsecond. The loop runs without the GIL; calls on
 * disjoint row ranges are thread-safe (all state is on the stack).
 *
 * Built by rtbserve.predictors.tl2cgen_impl with -DRTB_MODULE=<name> -DRTB_LEAF_T=float|double.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <string.h>

#include "header.h"

#define RTB_CAT(a, b) a##b
#define RTB_XCAT(a, b) RTB_CAT(a, b)
#define RTB_STR(a) #a
#define RTB_XSTR(a) RTB_STR(a)
#define RTB_N_OUT (N_TARGET * MAX_N_CLASS)

#ifdef RTB_LIGHTGBM_INPUT
/* LightGBM reads |x| <= 1e-35f as 0 (it drops them when a dense row turns sparse) and casts
 * categorical values to int (truncation toward zero); TL2cgen's code does neither. */
extern const unsigned char rtb_is_categorical[]; /* written by tl2cgen_impl.py */
#endif

static int get_buffer(PyObject* obj, Py_buffer* view, Py_ssize_t itemsize, const char* what) {
  if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE * (what[0] == 'o')) < 0) {
    return -1;
  }
  if (view->itemsize != itemsize) {
    PyErr_Format(PyExc_TypeError, "%s: expected items of %zd bytes, got %zd", what, itemsize,
                 view->itemsize);
    PyBuffer_Release(view);
    return -1;
  }
  return 0;
}

/* predict(X, out, begin, end, margin): score rows [begin, end) of X (float32, n x F, C order)
 * into out (LEAF_T, n x K). */
static PyObject* rtb_predict(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  (void)self;
  if (nargs != 5) {
    PyErr_SetString(PyExc_TypeError, "predict(X, out, begin, end, margin) takes 5 arguments");
    return NULL;
  }
  const Py_ssize_t begin = PyLong_AsSsize_t(args[2]);
  const Py_ssize_t end = PyLong_AsSsize_t(args[3]);
  const int margin = PyObject_IsTrue(args[4]);
  if ((begin == -1 || end == -1 || margin < 0) && PyErr_Occurred()) return NULL;
  Py_buffer xb, ob;
  if (get_buffer(args[0], &xb, sizeof(float), "X") < 0) return NULL;
  if (get_buffer(args[1], &ob, sizeof(RTB_LEAF_T), "out") < 0) {
    PyBuffer_Release(&xb);
    return NULL;
  }
  const Py_ssize_t n_features = get_num_feature();
  if (begin < 0 || end < begin || xb.len < end * n_features * (Py_ssize_t)sizeof(float) ||
      ob.len < end * RTB_N_OUT * (Py_ssize_t)sizeof(RTB_LEAF_T)) {
    PyBuffer_Release(&xb);
    PyBuffer_Release(&ob);
    PyErr_SetString(PyExc_ValueError, "row range outside X or out");
    return NULL;
  }
  const float* x = (const float*)xb.buf;
  RTB_LEAF_T* out = (RTB_LEAF_T*)ob.buf;
  Py_BEGIN_ALLOW_THREADS
  union Entry row[n_features > 0 ? n_features : 1];
  RTB_LEAF_T result[RTB_N_OUT];
  for (Py_ssize_t r = begin; r < end; ++r) {
    const float* xr = x + r * n_features;
    for (Py_ssize_t j = 0; j < n_features; ++j) {
      float v = xr[j];
      if (isnan(v)) {
        row[j].missing = -1;
        continue;
      }
#ifdef RTB_LIGHTGBM_INPUT
      if (fabsf(v) <= 1e-35f) {
        v = 0.0f;
      } else if (rtb_is_categorical[j] && fabsf(v) < 2147483648.0f) {
        v = truncf(v);
      }
#endif
      row[j].fvalue = v;
    }
    memset(result, 0, sizeof(result));
    predict(row, margin, result);
    memcpy(out + r * RTB_N_OUT, result, sizeof(result));
  }
  Py_END_ALLOW_THREADS
  PyBuffer_Release(&xb);
  PyBuffer_Release(&ob);
  Py_RETURN_NONE;
}

static PyMethodDef rtb_methods[] = {
    {"predict", (PyCFunction)(void (*)(void))rtb_predict, METH_FASTCALL,
     "predict(X, out, begin, end, margin): score rows [begin, end) without the GIL"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef rtb_module = {PyModuleDef_HEAD_INIT, RTB_XSTR(RTB_MODULE), NULL, -1,
                                        rtb_methods};

PyMODINIT_FUNC RTB_XCAT(PyInit_, RTB_MODULE)(void) {
  PyObject* m = PyModule_Create(&rtb_module);
  if (m == NULL) return NULL;
  if (PyModule_AddIntConstant(m, "n_features", get_num_feature()) < 0 ||
      PyModule_AddIntConstant(m, "n_outputs", RTB_N_OUT) < 0 ||
      PyModule_AddStringConstant(m, "leaf_type", get_leaf_output_type()) < 0) {
    Py_DECREF(m);
    return NULL;
  }
  return m;
}
