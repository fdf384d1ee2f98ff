/* rtbserve.codecs._csv_fast: the one-pass C parser behind csv_codec.parse_csv_rows.
 *
 * parse_rows(body, n_features) returns the float32 C-contiguous (rows, n_features) matrix of a
 * simple body, or None; on None the caller runs its exact Python parser, which returns the same
 * matrix or raises the precise error. So this file reports no data error: anything it is not
 * sure of (an unknown token, a blank line, a row of another width, another feature count, an
 * argument of another type) is None. The rules are csv_codec's: the body and each field are
 * stripped of bytes.strip()'s whitespace (" \t\n\r\v\f"), rows split on '\n' (a '\r' before
 * it is field whitespace), an empty field is float("nan"), and any other field must be a token
 * float() accepts without underscores, [+-](digits[.[digits]] | .digits)[(e|E)[+-]digits] or
 * [+-](nan|inf|infinity) in any case, whose value is np.float32(float(token)), NaN sign included.
 *
 * Tokens are checked against that grammar here, never by strtod, which accepts more (hex
 * floats, "nan(...)", a locale's decimal point). A decimal goes to float64 first, as float()
 * does, then to float32 by one C cast (round to nearest even; past float32's range +-inf, as
 * numpy's cast). Most take Clinger's fast path: a mantissa m <= 2^53 of at most 19 significant
 * digits and a decimal exponent e in [-22, 22] make m and 10^|e| exact doubles, so one IEEE
 * multiply or divide is the correctly rounded value. The rest go to strtod, correctly rounded
 * in glibc (and musl and the BSDs), pinned to the C locale where strtod_l exists.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GLIBC__)
#include <locale.h>
#define HAVE_STRTOD_L 1
#endif

#ifdef __FAST_MATH__
#error "_csv_fast.c must not be built with -ffast-math: it relies on IEEE rounding"
#endif

/* x87 evaluates in extended precision and would round twice on the fast path. */
#if defined(FLT_EVAL_METHOD) && FLT_EVAL_METHOD == 0
#define CLINGER_FAST_PATH 1
#else
#define CLINGER_FAST_PATH 0
#endif

/* Bodies larger than this are parsed without the GIL. Below it, parsing takes well under the
 * interpreter's switch interval, and handing the GIL over could cost more than it saves. */
#define RELEASE_GIL_BYTES (64 * 1024)

static PyObject* numpy_empty;   /* numpy.empty */
static PyObject* numpy_float32; /* numpy.float32, the dtype */
static float nan_plus;          /* np.float32(float("nan")): the empty field and "nan" */
static float nan_minus;         /* np.float32(float("-nan")) */
#ifdef HAVE_STRTOD_L
static locale_t c_locale;
#endif

static const double powers_of_ten[23] = {
    1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,  1e8,  1e9,  1e10, 1e11,
    1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
};

static inline int is_field_space(unsigned char c) {
  /* bytes.strip() whitespace except '\n', which separates rows */
  return c == ' ' || c == '\t' || c == '\r' || c == '\v' || c == '\f';
}

static inline int is_body_space(unsigned char c) { return c == '\n' || is_field_space(c); }

static inline int is_digit(unsigned char c) { return (unsigned char)(c - '0') < 10; }

/* True when [p, end) starts with the lower-case ASCII word, in any case. */
static inline int starts_with_word(const char* p, const char* end, const char* word, Py_ssize_t n) {
  if (end - p < n) {
    return 0;
  }
  for (Py_ssize_t i = 0; i < n; i++) {
    if ((p[i] | 0x20) != word[i]) { /* | 0x20 folds exactly 'A'-'Z' onto 'a'-'z' here */
      return 0;
    }
  }
  return 1;
}

/* float64 value of the checked unsigned decimal [p, end) by strtod; -1 if strtod disagrees. */
static int decimal_by_strtod(const char* p, const char* end, double* value) {
  char small[128];
  size_t n = (size_t)(end - p);
  char* text = n < sizeof(small) ? small : malloc(n + 1);
  if (text == NULL) {
    return -1;
  }
  memcpy(text, p, n);
  text[n] = '\0';
  char* stop;
#ifdef HAVE_STRTOD_L
  *value = strtod_l(text, &stop, c_locale);
#else
  *value = strtod(text, &stop);
#endif
  /* A locale whose decimal point is not '.' stops early: not simple, let Python parse. */
  int ok = stop == text + n;
  if (text != small) {
    free(text);
  }
  return ok ? 0 : -1;
}

/* Reads the longest number float() could begin with at *cursor (before end), as
 * np.float32(float(number)) into *out, and moves *cursor past it; -1 when what is there cannot
 * begin a number. The grammar has no backtracking ('.' and 'e' commit), so a field is a number
 * exactly when this reads it whole: the caller then checks that a separator follows. */
static inline int parse_number(const char** cursor, const char* end, float* out) {
  const char* p = *cursor;
  int negative = 0;
  if (*p == '+' || *p == '-') {
    negative = *p == '-';
    if (++p == end) {
      return -1;
    }
  }
  if (!is_digit(*p) && *p != '.') {
    if (starts_with_word(p, end, "nan", 3)) {
      *out = negative ? nan_minus : nan_plus;
      *cursor = p + 3;
    } else if (starts_with_word(p, end, "inf", 3)) {
      *out = negative ? -HUGE_VALF : HUGE_VALF;
      *cursor = p + (starts_with_word(p + 3, end, "inity", 5) ? 8 : 3);
    } else {
      return -1;
    }
    return 0;
  }

  const char* digits_start = p;
  uint64_t mantissa = 0;
  int significant = 0;     /* digits in mantissa from its first non-zero one */
  int too_long = 0;        /* more than 19 significant digits: strtod's job */
  Py_ssize_t n_digits = 0; /* integer and fraction digits */
  int64_t exponent = 0;    /* value = mantissa * 10^exponent unless too_long */
  for (; p < end && is_digit(*p); p++, n_digits++) {
    if (significant < 19) {
      mantissa = mantissa * 10 + (uint64_t)(*p - '0');
      significant += mantissa != 0;
    } else {
      too_long = 1;
    }
  }
  if (p < end && *p == '.') {
    for (p++; p < end && is_digit(*p); p++, n_digits++) {
      if (significant < 19) {
        mantissa = mantissa * 10 + (uint64_t)(*p - '0');
        significant += mantissa != 0;
        exponent--;
      } else {
        too_long = 1;
      }
    }
  }
  if (n_digits == 0) {
    return -1;
  }
  if (p < end && (*p | 0x20) == 'e') {
    p++;
    int exp_negative = 0;
    if (p < end && (*p == '+' || *p == '-')) {
      exp_negative = *p == '-';
      p++;
    }
    if (p == end || !is_digit(*p)) {
      return -1;
    }
    int64_t written = 0;
    for (; p < end && is_digit(*p); p++) {
      if (written < 1000000) { /* saturates: far beyond any float64 exponent */
        written = written * 10 + (*p - '0');
      }
    }
    exponent += exp_negative ? -written : written;
  }

  double value;
  if (!too_long && mantissa == 0) {
    value = 0.0;
  } else if (CLINGER_FAST_PATH && !too_long && mantissa <= ((uint64_t)1 << 53) && exponent >= -22 &&
             exponent <= 22) {
    value = (double)mantissa;
    if (exponent < 0) {
      value /= powers_of_ten[-exponent];
    } else {
      value *= powers_of_ten[exponent];
    }
  } else if (decimal_by_strtod(digits_start, p, &value) < 0) {
    return -1;
  }
  *out = (float)(negative ? -value : value);
  *cursor = p;
  return 0;
}

/* Parse [p, end) -- a body without surrounding whitespace, of exactly `rows` lines -- into
 * out[rows * n]. 0 when simple, else -1. Touches no Python object: runs without the GIL. */
static int parse_body(const char* p, const char* end, Py_ssize_t rows, Py_ssize_t n, float* out) {
  for (Py_ssize_t r = 0; r < rows; r++) {
    for (Py_ssize_t c = 0; c < n; c++, out++) {
      while (p < end && is_field_space(*p)) {
        p++;
      }
      if (p == end || *p == ',' || *p == '\n') {
        if (n == 1) {
          return -1; /* a blank line, not an empty field */
        }
        *out = nan_plus;
      } else {
        if (parse_number(&p, end, out) < 0) {
          return -1;
        }
        while (p < end && is_field_space(*p)) {
          p++;
        }
      }
      /* what follows a field: ',' inside a row, '\n' after a row, the end after the last;
       * anything else is a bad token, a space inside one, or a row of another width */
      if (c + 1 < n) {
        if (p == end || *p != ',') {
          return -1;
        }
        p++;
      } else if (r + 1 < rows) {
        if (p == end || *p != '\n') {
          return -1;
        }
        p++;
      } else if (p != end) {
        return -1;
      }
    }
  }
  return 0;
}

static PyObject* new_float32_matrix(Py_ssize_t rows, Py_ssize_t n) {
  PyObject* n_rows = PyLong_FromSsize_t(rows);
  PyObject* n_columns = PyLong_FromSsize_t(n);
  PyObject* shape = n_rows && n_columns ? PyTuple_Pack(2, n_rows, n_columns) : NULL;
  Py_XDECREF(n_rows);
  Py_XDECREF(n_columns);
  if (shape == NULL) {
    return NULL;
  }
  PyObject* args[2] = {shape, numpy_float32};
  PyObject* matrix = PyObject_Vectorcall(numpy_empty, args, 2, NULL); /* allocates */
  Py_DECREF(shape);
  return matrix;
}

static PyObject* parse_rows(PyObject* module, PyObject* const* args, Py_ssize_t nargs) {
  (void)module;
  if (nargs != 2) {
    PyErr_Format(PyExc_TypeError, "parse_rows expects 2 arguments, got %zd", nargs);
    return NULL;
  }
  /* Arguments of other types are the Python parser's to accept or refuse. */
  Py_ssize_t n = PyNumber_AsSsize_t(args[1], NULL); /* clips on overflow */
  if (n == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    Py_RETURN_NONE;
  }
  if (n < 1 || !(PyBytes_Check(args[0]) || PyByteArray_Check(args[0]))) {
    Py_RETURN_NONE;
  }
  Py_buffer body;
  if (PyObject_GetBuffer(args[0], &body, PyBUF_SIMPLE) < 0) {
    return NULL;
  }
  const char* start = body.buf;
  const char* end = start + body.len;
  while (start < end && is_body_space(*start)) {
    start++;
  }
  while (end > start && is_body_space(end[-1])) {
    end--;
  }
  Py_ssize_t rows = 1;
  for (const char* nl = start; (nl = memchr(nl, '\n', (size_t)(end - nl))) != NULL; nl++) {
    rows++;
  }
  PyObject* matrix = NULL;
  Py_buffer out;
  if (start == end || rows > PY_SSIZE_T_MAX / 4 / n) {
    goto not_simple;
  }
  matrix = new_float32_matrix(rows, n);
  if (matrix == NULL) {
    PyBuffer_Release(&body);
    return NULL;
  }
  if (PyObject_GetBuffer(matrix, &out, PyBUF_SIMPLE | PyBUF_WRITABLE) < 0) {
    Py_DECREF(matrix);
    PyBuffer_Release(&body);
    return NULL;
  }
  int status;
  if (end - start > RELEASE_GIL_BYTES) {
    Py_BEGIN_ALLOW_THREADS /* releases GIL */
    status = parse_body(start, end, rows, n, out.buf);
    Py_END_ALLOW_THREADS
  } else {
    status = parse_body(start, end, rows, n, out.buf);
  }
  PyBuffer_Release(&out);
  if (status == 0) {
    PyBuffer_Release(&body);
    return matrix;
  }
not_simple:
  Py_XDECREF(matrix);
  PyBuffer_Release(&body);
  Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"parse_rows", (PyCFunction)(void (*)(void))parse_rows, METH_FASTCALL,
     "parse_rows(body, n_features, /)\n--\n\n"
     "float32 (rows, n_features) array of a simple CSV body, or None: see csv_codec."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_csv_fast",
    .m_doc = "One-pass C parser for simple CSV bodies; csv_codec.parse_csv_rows is the interface.",
    .m_size = -1,
    .m_methods = methods,
};

/* np.float32(float(text)), computed by Python's own float() parser. */
static int float32_of(const char* text, float* out) {
  double value = PyOS_string_to_double(text, NULL, NULL);
  if (value == -1.0 && PyErr_Occurred()) {
    return -1;
  }
  *out = (float)value;
  return 0;
}

PyMODINIT_FUNC PyInit__csv_fast(void) {
#ifdef HAVE_STRTOD_L
  c_locale = newlocale(LC_ALL_MASK, "C", (locale_t)0);
  if (c_locale == (locale_t)0) {
    return PyErr_NoMemory();
  }
#endif
  if (float32_of("nan", &nan_plus) < 0 || float32_of("-nan", &nan_minus) < 0) {
    return NULL;
  }
  PyObject* numpy = PyImport_ImportModule("numpy");
  if (numpy == NULL) {
    return NULL;
  }
  numpy_empty = PyObject_GetAttrString(numpy, "empty");
  numpy_float32 = PyObject_GetAttrString(numpy, "float32");
  Py_DECREF(numpy);
  if (numpy_empty == NULL || numpy_float32 == NULL) {
    return NULL;
  }
  return PyModule_Create(&module_def);
}
