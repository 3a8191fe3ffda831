/*
 * rbdfence's own declarations of the part of the librados / librbd C ABI it calls.
 *
 * Written for rbdfence from the documented ABI of librados 3.x and librbd 1.x; it is
 * not a copy of Ceph's headers. bindgen reads only this file (see build.rs and its
 * allowlist). `scripts/check-abi.sh` compiles it together with the system headers
 * (<rados/librados.h>, <rbd/librbd.h>) with RBDFENCE_ABI_CHECK defined, so any
 * prototype, struct layout or constant that disagrees with the installed Ceph fails
 * the build. Every symbol here is listed in README.md beside this file.
 */
#ifndef RBDFENCE_CEPH_H
#define RBDFENCE_CEPH_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/time.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The library versions these declarations were written and checked against.
 * At start-up the linked libraries must have the same major and at least this minor. */
#define RBDFENCE_LIBRADOS_MAJOR 3
#define RBDFENCE_LIBRADOS_MINOR 0
#define RBDFENCE_LIBRBD_MAJOR 1
#define RBDFENCE_LIBRBD_MINOR 16

/* Opaque handles: all three are plain pointers in the ABI. */
typedef void *rados_t;
typedef void *rados_ioctx_t;
typedef void *rbd_image_t;

/* One watcher of an image header object, as filled in by rbd_watchers_list(). */
struct rbdfence_image_watcher {
  char *addr;       /* entity address, "IP:PORT/NONCE", owned by librbd */
  int64_t id;       /* global client id (the N of client.N) */
  uint64_t cookie;  /* watch cookie */
};

#ifndef RBDFENCE_ABI_CHECK
/* The system header names this layout with an anonymous struct; in the ABI check the
 * system typedef is used instead and the layout is compared field by field. */
typedef struct rbdfence_image_watcher rbd_image_watcher_t;
#endif

/* ---- librados: version, set-up and teardown ---- */
void rados_version(int *major, int *minor, int *extra);
int rados_create(rados_t *cluster, const char *id);
int rados_conf_read_file(rados_t cluster, const char *path);
int rados_conf_set(rados_t cluster, const char *option, const char *value);
int rados_connect(rados_t cluster);
void rados_shutdown(rados_t cluster);

/* ---- librados: cluster state ---- */
int rados_wait_for_latest_osdmap(rados_t cluster);
uint64_t rados_get_instance_id(rados_t cluster);
int rados_getaddrs(rados_t cluster, char **addrs);

/* ---- librados: monitor commands (JSON in, JSON/text out) ---- */
int rados_mon_command(rados_t cluster, const char **cmd, size_t cmdlen,
                      const char *inbuf, size_t inbuflen,
                      char **outbuf, size_t *outbuflen,
                      char **outs, size_t *outslen);
void rados_buffer_free(char *buf);

/* ---- librados: pools and objects ---- */
int rados_ioctx_create(rados_t cluster, const char *pool_name, rados_ioctx_t *ioctx);
void rados_ioctx_destroy(rados_ioctx_t io);
/* Every later operation on this ioctx addresses objects in namespace nspace ("" or NULL: the
 * default namespace). Not thread-safe: set once, before the ioctx is shared. */
void rados_ioctx_set_namespace(rados_ioctx_t io, const char *nspace);
/* Lockers of one lock of one object; the lengths say how much room each buffer has, and are
 * set to what is needed when it returns -ERANGE. Returns the number of lockers. */
ssize_t rados_list_lockers(rados_ioctx_t io, const char *oid, const char *name,
                           int *exclusive,
                           char *tag, size_t *tag_len,
                           char *clients, size_t *clients_len,
                           char *cookies, size_t *cookies_len,
                           char *addrs, size_t *addrs_len);

/* ---- librados: whole objects (the fence ledger) ---- */
/* Replaces the object's data with len bytes of buf (creates it if missing). */
int rados_write_full(rados_ioctx_t io, const char *oid, const char *buf, size_t len);
/* Reads up to len bytes from offset off; returns the number of bytes read. */
int rados_read(rados_ioctx_t io, const char *oid, char *buf, size_t len, uint64_t off);
/* Size and modification time of an object; -ENOENT when it does not exist. */
int rados_stat(rados_ioctx_t io, const char *o, uint64_t *psize, time_t *pmtime);

/* A compound write: created, filled, run on one object atomically, released. */
typedef void *rados_write_op_t;
rados_write_op_t rados_create_write_op(void);
void rados_release_write_op(rados_write_op_t write_op);
/* exclusive = 1: the whole op fails with -EEXIST when the object exists already. */
void rados_write_op_create(rados_write_op_t write_op, int exclusive, const char *category);
void rados_write_op_write_full(rados_write_op_t write_op, const char *buffer, size_t len);
int rados_write_op_operate(rados_write_op_t write_op, rados_ioctx_t io, const char *oid,
                           time_t *mtime, int flags);

/* Listing the objects of the ioctx's namespace. */
typedef void *rados_list_ctx_t;
int rados_nobjects_list_open(rados_ioctx_t io, rados_list_ctx_t *ctx);
/* Next object: entry is its name (valid until the next call); -ENOENT at the end. */
int rados_nobjects_list_next(rados_list_ctx_t ctx, const char **entry, const char **key,
                             const char **nspace);
void rados_nobjects_list_close(rados_list_ctx_t ctx);

/* Advisory cls locks with a lease: one holder (name, cookie) at a time; a holder that stops
 * renewing loses the lock when `duration` runs out. -EBUSY: another holder has it. */
#define RBDFENCE_LOCK_FLAG_MAY_RENEW 1u
int rados_lock_exclusive(rados_ioctx_t io, const char *oid, const char *name,
                         const char *cookie, const char *desc, struct timeval *duration,
                         uint8_t flags);
int rados_unlock(rados_ioctx_t io, const char *o, const char *name, const char *cookie);

/* ---- librbd ---- */
void rbd_version(int *major, int *minor, int *extra);
int rbd_open_read_only(rados_ioctx_t io, const char *name, rbd_image_t *image,
                       const char *snap_name);
int rbd_close(rbd_image_t image);
int rbd_get_id(rbd_image_t image, char *id, size_t id_len);
int rbd_watchers_list(rbd_image_t image, rbd_image_watcher_t *watchers,
                      size_t *max_watchers);
void rbd_watchers_list_cleanup(rbd_image_watcher_t *watchers, size_t num_watchers);
ssize_t rbd_list_lockers(rbd_image_t image, int *exclusive,
                         char *tag, size_t *tag_len,
                         char *clients, size_t *clients_len,
                         char *cookies, size_t *cookies_len,
                         char *addrs, size_t *addrs_len);

#ifdef __cplusplus
}
#endif

#endif /* RBDFENCE_CEPH_H */
