/*
 * edgesdk_client.c: the agent's local API (docs/local-api.md) over a Unix stream socket.
 * Every integer of a head is little-endian and packed byte by byte here, so the code does not
 * depend on the host's byte order; tensor bytes are the host's own (client and agent share it).
 */
#define _POSIX_C_SOURCE 200809L

#include "edgesdk_client.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_HEAD 0xFFFF
#define REQ_HEAD_SIZE 5  /* op u8 | flags u8 | n_tensors u8 | name_len u16 */
#define TEXT_HEAD_SIZE 6 /* status u8 | 0 u8 | msg_len u32 */

static int fail(edgesdk_client *c, int rc, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->error, sizeof c->error, fmt, ap);
    va_end(ap);
    return rc;
}

size_t edgesdk_dtype_size(uint8_t dtype) {
    static const size_t sizes[] = {4, 2, 1, 1, 2, 4, 8, 1, 8};
    return dtype < sizeof sizes / sizeof sizes[0] ? sizes[dtype] : 0;
}

static void put_u16(uint8_t *p, uint16_t v) {
    p[0] = (uint8_t)(v & 0xFF);
    p[1] = (uint8_t)(v >> 8);
}

static void put_u32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static uint16_t get_u16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

static uint32_t get_u32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static int write_all(int fd, const void *buf, size_t len) {
    const uint8_t *p = buf;
    while (len > 0) {
        ssize_t k = send(fd, p, len, MSG_NOSIGNAL);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return -1;
        p += k;
        len -= (size_t)k;
    }
    return 0;
}

static int read_exact(int fd, void *buf, size_t len) {
    uint8_t *p = buf;
    while (len > 0) {
        ssize_t k = recv(fd, p, len, 0);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return -1;
        p += k;
        len -= (size_t)k;
    }
    return 0;
}

int edgesdk_connect(edgesdk_client *c, const char *socket_path) {
    struct sockaddr_un addr;
    c->fd = -1;
    c->error[0] = '\0';
    if (strlen(socket_path) >= sizeof addr.sun_path)
        return fail(c, -1, "socket path %s is too long for a Unix socket", socket_path);
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    memcpy(addr.sun_path, socket_path, strlen(socket_path) + 1);
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0) return fail(c, -1, "socket: %s", strerror(errno));
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        int err = errno;
        close(fd);
        return fail(c, -1, "cannot reach the agent at %s (%s): is edgesdk agent run running?", socket_path,
                    strerror(err));
    }
    c->fd = fd;
    return 0;
}

void edgesdk_close(edgesdk_client *c) {
    if (c->fd >= 0) close(c->fd);
    c->fd = -1;
}

void edgesdk_free_tensors(edgesdk_tensor *tensors, size_t n) {
    for (size_t i = 0; i < n; i++) {
        free(tensors[i].data);
        tensors[i].data = NULL;
    }
}

/* The byte count a tensor of these dims and dtype must have; -1 when it is not a valid one. */
static int64_t expected_bytes(uint8_t dtype, uint8_t ndim, const uint32_t *dims) {
    size_t size = edgesdk_dtype_size(dtype);
    if (size == 0 || ndim > EDGESDK_MAX_DIMS) return -1;
    uint64_t total = size;
    for (int i = 0; i < ndim; i++) {
        total *= dims[i];
        if (total > UINT32_MAX) return -1;
    }
    return (int64_t)total;
}

/* Send a request: the frame header, the head (op, flags, name, tensor headers), inline bytes.
 * 0 sent; -1 not a valid request (nothing sent, c->error says why); -2 the connection failed. */
static int send_request(edgesdk_client *c, uint8_t op, unsigned flags, const char *name,
                        const edgesdk_tensor *tensors, size_t n) {
    size_t name_len = strlen(name);
    size_t head_len = REQ_HEAD_SIZE + name_len;
    if (n > 255) return fail(c, -1, "at most 255 tensors in one request");
    for (size_t i = 0; i < n; i++) {
        if (expected_bytes(tensors[i].dtype, tensors[i].ndim, tensors[i].dims) != (int64_t)tensors[i].nbytes)
            return fail(c, -1, "input %zu: nbytes %u does not match its dtype and dims", i, tensors[i].nbytes);
        head_len += 2 + 4 * (size_t)tensors[i].ndim + 4;
    }
    if (head_len > MAX_HEAD) return fail(c, -1, "request head of %zu bytes is too large (at most %d)", head_len, MAX_HEAD);
    uint8_t *buf = malloc(4 + head_len);
    if (buf == NULL) return fail(c, -1, "out of memory");
    uint8_t *p = buf;
    p[0] = 'E';
    p[1] = 'Q';
    put_u16(p + 2, (uint16_t)head_len);
    p += 4;
    p[0] = op;
    p[1] = (uint8_t)flags;
    p[2] = (uint8_t)n;
    put_u16(p + 3, (uint16_t)name_len);
    p += REQ_HEAD_SIZE;
    memcpy(p, name, name_len);
    p += name_len;
    for (size_t i = 0; i < n; i++) {
        p[0] = tensors[i].dtype;
        p[1] = tensors[i].ndim;
        p += 2;
        for (int d = 0; d < tensors[i].ndim; d++, p += 4) put_u32(p, tensors[i].dims[d]);
        put_u32(p, tensors[i].nbytes);
        p += 4;
    }
    int rc = write_all(c->fd, buf, 4 + head_len);
    free(buf);
    for (size_t i = 0; rc == 0 && i < n; i++) rc = write_all(c->fd, tensors[i].data, tensors[i].nbytes);
    return rc == 0 ? 0 : -2;
}

/* Read a response's frame header and head (malloc'ed into *head). */
static int read_head(edgesdk_client *c, uint8_t **head, uint16_t *head_len) {
    uint8_t frame[4];
    if (read_exact(c->fd, frame, 4) != 0) return fail(c, -1, "the agent closed the connection");
    if (frame[0] != 'E' || frame[1] != 'R')
        return fail(c, -1, "bad response framing from the agent (a client of another edgesdk version?)");
    *head_len = get_u16(frame + 2);
    *head = malloc(*head_len ? *head_len : 1);
    if (*head == NULL) return fail(c, -1, "out of memory");
    if (read_exact(c->fd, *head, *head_len) != 0) {
        free(*head);
        return fail(c, -1, "the agent closed the connection in a response");
    }
    return 0;
}

static int is_text(const uint8_t *head, uint16_t head_len) { return head_len == TEXT_HEAD_SIZE && head[1] == 0; }

/* A text response's message (malloc'ed, NUL-terminated); 0 ok (a JSON value), 1 error, -1 failure. */
static int read_text(edgesdk_client *c, const uint8_t *head, char **text) {
    uint32_t len = get_u32(head + 2);
    *text = malloc((size_t)len + 1);
    if (*text == NULL) return fail(c, -1, "out of memory");
    if (read_exact(c->fd, *text, len) != 0) {
        free(*text);
        return fail(c, -1, "the agent closed the connection in a response");
    }
    (*text)[len] = '\0';
    if (head[0] != 0) {
        fail(c, 1, "%s", *text);
        free(*text);
        *text = NULL;
        return 1;
    }
    return 0;
}

/* After a failed send: the agent may have said why before closing (e.g. too many connections). */
static int send_failed(edgesdk_client *c) {
    uint8_t *head;
    uint16_t head_len;
    char *text;
    if (read_head(c, &head, &head_len) == 0) {
        if (is_text(head, head_len) && read_text(c, head, &text) == 1) {
            free(head);
            return -1; /* c->error holds the agent's message; the connection is gone */
        }
        free(head);
    }
    return fail(c, -1, "the agent closed the connection: open a new client (is edgesdk agent run still running?)");
}

static int read_tensors(edgesdk_client *c, const uint8_t *head, uint16_t head_len, edgesdk_tensor *outputs,
                        size_t max_outputs, size_t *n_outputs) {
    size_t n = head[1], pos = 2;
    if (head[0] != 0) return fail(c, -1, "a tensor response with status %u", head[0]);
    if (n > max_outputs) return fail(c, -1, "the model has %zu outputs, room was given for %zu", n, max_outputs);
    for (size_t i = 0; i < n; i++) {
        edgesdk_tensor *t = &outputs[i];
        if (pos + 2 > head_len) return fail(c, -1, "truncated tensor header in the response");
        t->dtype = head[pos];
        t->ndim = head[pos + 1];
        pos += 2;
        if (t->ndim > EDGESDK_MAX_DIMS || pos + 4 * (size_t)t->ndim + 4 > head_len)
            return fail(c, -1, "output %zu: %u dimensions, or a truncated header", i, t->ndim);
        for (int d = 0; d < t->ndim; d++, pos += 4) t->dims[d] = get_u32(head + pos);
        t->nbytes = get_u32(head + pos);
        pos += 4;
        if (expected_bytes(t->dtype, t->ndim, t->dims) != (int64_t)t->nbytes)
            return fail(c, -1, "output %zu: dtype %u and dims do not match its %u bytes", i, t->dtype, t->nbytes);
    }
    if (pos != head_len) return fail(c, -1, "unexpected bytes after the response's tensor headers");
    for (size_t i = 0; i < n; i++) {
        outputs[i].data = malloc(outputs[i].nbytes ? outputs[i].nbytes : 1);
        if (outputs[i].data == NULL || read_exact(c->fd, outputs[i].data, outputs[i].nbytes) != 0) {
            edgesdk_free_tensors(outputs, i + 1);
            return fail(c, -1, "the agent closed the connection in a response");
        }
    }
    *n_outputs = n;
    return 0;
}

int edgesdk_predict(edgesdk_client *c, const char *model, unsigned flags, const edgesdk_tensor *inputs,
                    size_t n_inputs, edgesdk_tensor *outputs, size_t max_outputs, size_t *n_outputs) {
    uint8_t *head;
    uint16_t head_len;
    char *text;
    *n_outputs = 0;
    if (c->fd < 0) return fail(c, -1, "the client is closed");
    int sent = send_request(c, EDGESDK_OP_PREDICT, flags & EDGESDK_FLAG_RAW, model, inputs, n_inputs);
    if (sent != 0) return sent == -1 ? -1 : send_failed(c);
    if (read_head(c, &head, &head_len) != 0) return -1;
    int rc;
    if (is_text(head, head_len)) {
        rc = read_text(c, head, &text);
        if (rc == 0) {
            free(text);
            rc = fail(c, -1, "a text answer to a predict request");
        }
    } else {
        rc = read_tensors(c, head, head_len, outputs, max_outputs, n_outputs);
    }
    free(head);
    return rc;
}

int edgesdk_request_json(edgesdk_client *c, uint8_t op, const char *name, char **json) {
    uint8_t *head;
    uint16_t head_len;
    *json = NULL;
    if (c->fd < 0) return fail(c, -1, "the client is closed");
    int sent = send_request(c, op, 0, name ? name : "", NULL, 0);
    if (sent != 0) return sent == -1 ? -1 : send_failed(c);
    if (read_head(c, &head, &head_len) != 0) return -1;
    int rc = is_text(head, head_len) ? read_text(c, head, json) : fail(c, -1, "tensors in answer to op %u", op);
    free(head);
    return rc;
}
