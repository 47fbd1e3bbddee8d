/* mitmproxy's tnetstring encoding in C, for nhi_gateway.recording.flowformat.

   Writes exactly the bytes of flowformat's pure-Python encoder (and so of mitmproxy's own
   ``mitmproxy.io.tnetstring.dumps``): a dict's items in reverse insertion order, tuples as lists,
   ``4:true!`` / ``5:false!`` / ``0:~``, floats with ``repr``. Only the exact built-in types are
   encoded here; any other value (a str or int subclass, an OrderedDict...) is handed to
   ``fallback`` (mitmproxy's dumps), whose bytes are taken as they are. Any error (a lone
   surrogate, an integer too long to print) is raised; the Python side then lets mitmproxy's dumps
   raise its own exception for the whole value.

   Why C: encoding each flow record was about a fifth of the recording process's CPU, in some 150
   recursive calls per record. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

typedef struct {
    char *data;
    Py_ssize_t len;
    Py_ssize_t cap;
} Buf;

static int reserve(Buf *b, Py_ssize_t more) {
    if (b->len + more <= b->cap)
        return 0;
    Py_ssize_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + more) {
        if (cap > PY_SSIZE_T_MAX / 2) {
            PyErr_NoMemory();
            return -1;
        }
        cap *= 2;
    }
    char *data = PyMem_Realloc(b->data, cap);
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->data = data;
    b->cap = cap;
    return 0;
}

static int put(Buf *b, const char *s, Py_ssize_t n) {
    if (reserve(b, n) < 0)
        return -1;
    memcpy(b->data + b->len, s, n);
    b->len += n;
    return 0;
}

/* "<n>:" into out (at least 24 bytes); returns its length. Not snprintf: it took most of the
   time of a record's encoding. */
static int length_prefix(char *out, Py_ssize_t n) {
    char digits[24];
    int k = 0;
    do {
        digits[k++] = (char)('0' + n % 10);
        n /= 10;
    } while (n > 0);
    for (int i = 0; i < k; i++)
        out[i] = digits[k - 1 - i];
    out[k] = ':';
    return k + 1;
}

/* "<len>:<data><tag>" */
static int put_item(Buf *b, const char *s, Py_ssize_t n, char tag) {
    char prefix[32];
    int k = length_prefix(prefix, n);
    if (reserve(b, k + n + 1) < 0)
        return -1;
    memcpy(b->data + b->len, prefix, k);
    memcpy(b->data + b->len + k, s, n);
    b->data[b->len + k + n] = tag;
    b->len += k + n + 1;
    return 0;
}

/* The container's contents were written from ``start``: put "<len>:" in front and the tag after. */
static int close_container(Buf *b, Py_ssize_t start, char tag) {
    char prefix[32];
    Py_ssize_t n = b->len - start;
    int k = length_prefix(prefix, n);
    if (reserve(b, k + 1) < 0)
        return -1;
    memmove(b->data + start + k, b->data + start, n);
    memcpy(b->data + start, prefix, k);
    b->len += k;
    b->data[b->len++] = tag;
    return 0;
}

static int write_value(Buf *b, PyObject *v, PyObject *fallback);

static int write_text(Buf *b, PyObject *text, char tag) {
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(text, &n);
    if (s == NULL)
        return -1;
    return put_item(b, s, n, tag);
}

static int write_dict(Buf *b, PyObject *d, PyObject *fallback) {
    Py_ssize_t n = PyDict_GET_SIZE(d), i = 0, pos = 0, start = b->len;
    PyObject *key, *value;
    /* The items, held, so that a fallback that runs Python code cannot pull them away. */
    PyObject **items = PyMem_Malloc(sizeof(PyObject *) * 2 * (n ? n : 1));
    if (items == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    while (i < n && PyDict_Next(d, &pos, &key, &value)) {
        Py_INCREF(key);
        Py_INCREF(value);
        items[2 * i] = key;
        items[2 * i + 1] = value;
        i++;
    }
    int rc = 0;
    for (Py_ssize_t j = i - 1; j >= 0 && rc == 0; j--) { /* mitmproxy writes the last item first */
        rc = write_value(b, items[2 * j], fallback);
        if (rc == 0)
            rc = write_value(b, items[2 * j + 1], fallback);
    }
    for (Py_ssize_t j = 0; j < i; j++) {
        Py_DECREF(items[2 * j]);
        Py_DECREF(items[2 * j + 1]);
    }
    PyMem_Free(items);
    if (rc < 0)
        return -1;
    if (i != n) {
        PyErr_SetString(PyExc_RuntimeError, "dictionary changed size during encoding");
        return -1;
    }
    return close_container(b, start, '}');
}

static int write_sequence(Buf *b, PyObject *seq, PyObject *fallback) {
    /* A list could change under a fallback: PySequence_Fast holds its own reference to it. */
    PyObject *fast = PySequence_Fast(seq, "not a sequence");
    if (fast == NULL)
        return -1;
    Py_ssize_t start = b->len, n = PySequence_Fast_GET_SIZE(fast);
    int rc = 0;
    for (Py_ssize_t i = 0; i < n && rc == 0; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(fast, i);
        Py_INCREF(item);
        rc = write_value(b, item, fallback);
        Py_DECREF(item);
        if (rc == 0 && PyList_CheckExact(fast) && PyList_GET_SIZE(fast) != n) {
            PyErr_SetString(PyExc_RuntimeError, "list changed size during encoding");
            rc = -1;
        }
    }
    Py_DECREF(fast);
    if (rc < 0)
        return -1;
    return close_container(b, start, ']');
}

static int write_value(Buf *b, PyObject *v, PyObject *fallback) {
    if (PyBytes_CheckExact(v))
        return put_item(b, PyBytes_AS_STRING(v), PyBytes_GET_SIZE(v), ',');
    if (PyUnicode_CheckExact(v))
        return write_text(b, v, ';');
    if (PyDict_CheckExact(v) || PyTuple_CheckExact(v) || PyList_CheckExact(v)) {
        if (Py_EnterRecursiveCall(" while encoding a tnetstring"))
            return -1;
        int rc = PyDict_CheckExact(v) ? write_dict(b, v, fallback) : write_sequence(b, v, fallback);
        Py_LeaveRecursiveCall();
        return rc;
    }
    if (PyLong_CheckExact(v)) {
        int overflow = 0;
        long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
        if (x == -1 && PyErr_Occurred())
            return -1;
        if (!overflow) {
            /* Python's b"%d" % x */
            char digits[24], rev[24];
            int k = 0, r = 0;
            unsigned long long u = x < 0 ? 0ULL - (unsigned long long)x : (unsigned long long)x;
            do {
                rev[r++] = (char)('0' + u % 10);
                u /= 10;
            } while (u > 0);
            if (x < 0)
                digits[k++] = '-';
            while (r > 0)
                digits[k++] = rev[--r];
            return put_item(b, digits, k, '#');
        }
        PyObject *text = PyObject_Str(v); /* raises past the interpreter's digit limit, as b"%d" does */
        if (text == NULL)
            return -1;
        int rc = write_text(b, text, '#');
        Py_DECREF(text);
        return rc;
    }
    if (v == Py_None)
        return put(b, "0:~", 3);
    if (PyFloat_CheckExact(v)) {
        PyObject *text = PyObject_Repr(v);
        if (text == NULL)
            return -1;
        int rc = write_text(b, text, '^');
        Py_DECREF(text);
        return rc;
    }
    if (v == Py_True)
        return put(b, "4:true!", 7);
    if (v == Py_False)
        return put(b, "5:false!", 8);
    /* Anything else: mitmproxy's encoding of one value does not depend on where it stands. */
    PyObject *encoded = PyObject_CallOneArg(fallback, v);
    if (encoded == NULL)
        return -1;
    if (!PyBytes_Check(encoded)) {
        Py_DECREF(encoded);
        PyErr_SetString(PyExc_TypeError, "the fallback encoder must return bytes");
        return -1;
    }
    int rc = put(b, PyBytes_AS_STRING(encoded), PyBytes_GET_SIZE(encoded));
    Py_DECREF(encoded);
    return rc;
}

static PyObject *dumps(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "dumps(value, fallback) takes two arguments");
        return NULL;
    }
    Buf b = {NULL, 0, 0};
    if (write_value(&b, args[0], args[1]) < 0) {
        PyMem_Free(b.data);
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(b.data ? b.data : "", b.len);
    PyMem_Free(b.data);
    return out;
}

static PyMethodDef methods[] = {
    {"dumps", (PyCFunction)(void (*)(void))dumps, METH_FASTCALL,
     "dumps(value, fallback) -> bytes: value as mitmproxy's tnetstring; fallback(v) encodes any "
     "value that is not of an exact built-in type."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_tnetstring", NULL, 0, methods};

PyMODINIT_FUNC PyInit__tnetstring(void) { return PyModule_Create(&module); }
