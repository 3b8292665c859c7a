/*
 * edgesdk_predict: one inference through the agent's local API, from C.
 *
 *     edgesdk_predict SOCKET MODEL INPUT DTYPE D0,D1,...  [--raw]
 *         INPUT: a file of the input's raw bytes (row-major, this machine's byte order), e.g.
 *         numpy's x.astype(np.float32).tofile("x.raw"); DTYPE: float32, uint8, int8, ...
 *         Prints "output I DTYPE D0,D1,..." then one value a line, for each output.
 *     edgesdk_predict SOCKET --json models|status|ping
 *         Prints the agent's JSON answer.
 *
 * Exit codes: 0 done, 1 the agent refused (its one-line reason on stderr), 2 usage or I/O.
 *
 *     gcc -std=c99 -O2 -o edgesdk_predict predict.c edgesdk_client.c
 */
#define _POSIX_C_SOURCE 200809L

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "edgesdk_client.h"

static const char *DTYPE_NAMES[] = {"float32", "float16", "int8", "uint8", "int16", "int32", "int64", "bool", "float64"};
#define N_DTYPES (sizeof DTYPE_NAMES / sizeof DTYPE_NAMES[0])

static int usage(void) {
    fprintf(stderr, "usage: edgesdk_predict SOCKET MODEL INPUT DTYPE D0,D1,... [--raw]\n"
                    "       edgesdk_predict SOCKET --json models|status|ping\n");
    return 2;
}

static int parse_dtype(const char *name) {
    for (size_t i = 0; i < N_DTYPES; i++)
        if (strcmp(name, DTYPE_NAMES[i]) == 0) return (int)i;
    return -1;
}

static int parse_dims(const char *text, edgesdk_tensor *t) {
    char *copy = strdup(text), *save = NULL;
    t->ndim = 0;
    for (char *tok = strtok_r(copy, ",", &save); tok != NULL; tok = strtok_r(NULL, ",", &save)) {
        char *end;
        unsigned long v = strtoul(tok, &end, 10);
        if (*end != '\0' || t->ndim == EDGESDK_MAX_DIMS || v > 0xFFFFFFFFul) {
            free(copy);
            return -1;
        }
        t->dims[t->ndim++] = (uint32_t)v;
    }
    free(copy);
    return 0;
}

static void *read_file(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    if (f == NULL) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    void *data = malloc(n > 0 ? (size_t)n : 1);
    if (data != NULL && fread(data, 1, (size_t)n, f) != (size_t)n) {
        free(data);
        data = NULL;
    }
    fclose(f);
    *size = (size_t)n;
    return data;
}

static double half_to_double(uint16_t h) {
    int exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF;
    double sign = (h & 0x8000) ? -1.0 : 1.0;
    if (exponent == 0) return sign * ldexp(mantissa, -24);
    if (exponent == 31) return mantissa ? NAN : sign * INFINITY;
    return sign * ldexp(mantissa + 1024, exponent - 25);
}

static void print_value(const edgesdk_tensor *t, size_t i) {
    const uint8_t *p = (const uint8_t *)t->data + i * edgesdk_dtype_size(t->dtype);
    union { float f; double d; int8_t i8; uint8_t u8; int16_t i16; uint16_t u16; int32_t i32; int64_t i64; } v;
    memcpy(&v, p, edgesdk_dtype_size(t->dtype));
    switch (t->dtype) {
        case EDGESDK_FLOAT32: printf("%.9g\n", v.f); break;
        case EDGESDK_FLOAT16: printf("%.5g\n", half_to_double(v.u16)); break;
        case EDGESDK_FLOAT64: printf("%.17g\n", v.d); break;
        case EDGESDK_INT8: printf("%d\n", v.i8); break;
        case EDGESDK_UINT8: case EDGESDK_BOOL: printf("%u\n", v.u8); break;
        case EDGESDK_INT16: printf("%d\n", v.i16); break;
        case EDGESDK_INT32: printf("%d\n", (int)v.i32); break;
        default: printf("%lld\n", (long long)v.i64); break;
    }
}

static int json_op(edgesdk_client *c, const char *what) {
    uint8_t op = strcmp(what, "models") == 0 ? EDGESDK_OP_MODELS
                 : strcmp(what, "status") == 0 ? EDGESDK_OP_STATUS
                 : strcmp(what, "ping") == 0 ? EDGESDK_OP_PING : 0;
    char *json;
    if (op == 0) return usage();
    int rc = edgesdk_request_json(c, op, "", &json);
    if (rc != 0) {
        fprintf(stderr, "error: %s\n", c->error);
        return rc == 1 ? 1 : 2;
    }
    printf("%s\n", json);
    free(json);
    return 0;
}

int main(int argc, char **argv) {
    edgesdk_client c;
    if (argc < 4) return usage();
    if (edgesdk_connect(&c, argv[1]) != 0) {
        fprintf(stderr, "error: %s\n", c.error);
        return 2;
    }
    int rc;
    if (strcmp(argv[2], "--json") == 0) {
        rc = json_op(&c, argv[3]);
        edgesdk_close(&c);
        return rc;
    }
    edgesdk_tensor input;
    size_t size;
    int dtype = argc >= 6 ? parse_dtype(argv[4]) : -1;
    if (dtype < 0 || parse_dims(argv[5], &input) != 0) {
        edgesdk_close(&c);
        return usage();
    }
    input.dtype = (uint8_t)dtype;
    input.data = read_file(argv[3], &size);
    if (input.data == NULL) {
        fprintf(stderr, "error: cannot read %s\n", argv[3]);
        edgesdk_close(&c);
        return 2;
    }
    input.nbytes = (uint32_t)size;
    unsigned flags = argc >= 7 && strcmp(argv[6], "--raw") == 0 ? EDGESDK_FLAG_RAW : 0;
    edgesdk_tensor outputs[16];
    size_t n_out;
    rc = edgesdk_predict(&c, argv[2], flags, &input, 1, outputs, 16, &n_out);
    free(input.data);
    if (rc != 0) {
        fprintf(stderr, "error: %s\n", c.error);
        edgesdk_close(&c);
        return rc == 1 ? 1 : 2;
    }
    for (size_t k = 0; k < n_out; k++) {
        printf("output %zu %s ", k, outputs[k].dtype < N_DTYPES ? DTYPE_NAMES[outputs[k].dtype] : "?");
        for (int d = 0; d < outputs[k].ndim; d++) printf(d ? ",%u" : "%u", outputs[k].dims[d]);
        printf("\n");
        for (size_t i = 0; i < outputs[k].nbytes / edgesdk_dtype_size(outputs[k].dtype); i++) print_value(&outputs[k], i);
    }
    edgesdk_free_tensors(outputs, n_out);
    edgesdk_close(&c);
    return 0;
}
