/*
 * edgesdk_client: a client of the edgesdk agent's local API in C (C99, libc only).
 *
 * The wire format is specified in docs/local-api.md; this client follows it and nothing else
 * (no Python involved). One client holds one connection to the agent's Unix socket; use one per
 * thread. Inputs travel inline (the shared-memory path of the specification is optional).
 *
 *     edgesdk_client c;
 *     if (edgesdk_connect(&c, "/run/edgesdk/agent.sock") != 0) { puts(c.error); ... }
 *     edgesdk_tensor in = {EDGESDK_FLOAT32, 4, {1, 8, 8, 1}, 256, pixels};
 *     edgesdk_tensor out[4];
 *     size_t n_out;
 *     int rc = edgesdk_predict(&c, "digits", 0, &in, 1, out, 4, &n_out);
 *     ... rc 0: out[0].data holds the outputs; 1: the agent refused (c.error says why)
 *     edgesdk_free_tensors(out, n_out);
 *     edgesdk_close(&c);
 */
#ifndef EDGESDK_CLIENT_H
#define EDGESDK_CLIENT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define EDGESDK_MAX_DIMS 16

/* Tensor element types: the codes of the specification's dtype table. */
enum edgesdk_dtype {
    EDGESDK_FLOAT32 = 0,
    EDGESDK_FLOAT16 = 1,
    EDGESDK_INT8 = 2,
    EDGESDK_UINT8 = 3,
    EDGESDK_INT16 = 4,
    EDGESDK_INT32 = 5,
    EDGESDK_INT64 = 6,
    EDGESDK_BOOL = 7,
    EDGESDK_FLOAT64 = 8
};

/* Request ops. */
enum edgesdk_op {
    EDGESDK_OP_PREDICT = 1,
    EDGESDK_OP_MODELS = 2,
    EDGESDK_OP_PING = 3,
    EDGESDK_OP_ROLLBACK = 4,
    EDGESDK_OP_ATTACH = 5,
    EDGESDK_OP_DEPLOY = 6,
    EDGESDK_OP_STATUS = 7
};

/* Predict flags. */
#define EDGESDK_FLAG_RAW 0x01 /* integer I/O as the model has it (no quantization by the agent) */

typedef struct {
    uint8_t dtype;                    /* enum edgesdk_dtype */
    uint8_t ndim;                     /* at most EDGESDK_MAX_DIMS */
    uint32_t dims[EDGESDK_MAX_DIMS];  /* row-major, batch first */
    uint32_t nbytes;                  /* product of dims times the element size */
    void *data;                       /* inputs: the caller's bytes; outputs: malloc'ed by the client */
} edgesdk_tensor;

typedef struct {
    int fd;          /* the connection; -1 when closed */
    char error[512]; /* after a call that did not return 0: the agent's message or the local failure */
} edgesdk_client;

/* Connect to the agent's socket. 0 on success, -1 on failure (c->error says why). */
int edgesdk_connect(edgesdk_client *c, const char *socket_path);

/* Close the connection (safe to call twice). */
void edgesdk_close(edgesdk_client *c);

/* Bytes per element of a dtype; 0 for a code this client does not know. */
size_t edgesdk_dtype_size(uint8_t dtype);

/* Run `model` on `inputs` (the model's inputs, in order). On 0, `*n_outputs` outputs are in
 * `outputs` (their data malloc'ed: free with edgesdk_free_tensors). Returns 1 when the agent
 * refused the request (c->error holds its one-line message; the connection stays usable), -1 on
 * an I/O or framing failure (c->error says what; close the client). */
int edgesdk_predict(edgesdk_client *c, const char *model, unsigned flags, const edgesdk_tensor *inputs,
                    size_t n_inputs, edgesdk_tensor *outputs, size_t max_outputs, size_t *n_outputs);

/* An op answered in JSON (MODELS, PING, STATUS, ROLLBACK with `name` the model): on 0, `*json`
 * is the NUL-terminated JSON text (malloc'ed: free it). 1: refused (c->error), -1: failure. */
int edgesdk_request_json(edgesdk_client *c, uint8_t op, const char *name, char **json);

/* Free the data of outputs filled by edgesdk_predict. */
void edgesdk_free_tensors(edgesdk_tensor *tensors, size_t n);

#ifdef __cplusplus
}
#endif

#endif
