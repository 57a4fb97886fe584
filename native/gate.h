/* The freeze gates of a slave and the cut they establish, without the GIL.
 *
 * See gate.c for the design; native/gate.py is the only caller from Python.
 */
#ifndef CGMIRROR_GATE_H
#define CGMIRROR_GATE_H

#include <stddef.h>
#include <stdint.h>

#include "_limits.h"        /* generated from wire/protocol.py (native/build.py) */

/* CDEF BEGIN */
typedef struct cg_gate cg_gate;
typedef struct cg_core cg_core;

/* A volume's gate: every modifying request enters before it touches the
 * volume and leaves after.  enter() returns the gate's generation, which the
 * core bumps at every cut transition (the writer's cue to look); seq, if not
 * NULL, gets the request's place in the order of admission.  A gate is
 * reference counted: its core holds one reference, the caller the other. */
cg_gate *cg_gate_new(void);
void cg_gate_unref(cg_gate *g);
uint64_t cg_gate_enter(cg_gate *g, uint64_t *seq);
void cg_gate_leave(cg_gate *g);
int cg_gate_close(cg_gate *g, double timeout_s);
double cg_gate_open(cg_gate *g);
void cg_gate_info(cg_gate *g, int *closed, int64_t *inside, int64_t *waiting);

#define CG_IDLE 0
#define CG_FROZEN 1
#define CG_CUT 2

#define CG_ENDED_NONE 0
#define CG_ENDED_ABORTED 1
#define CG_ENDED_EXPIRED 2
#define CG_ENDED_DONE 3
#define CG_ENDED_FAILED 4

struct cg_state {
    int phase;                  /* CG_IDLE, CG_FROZEN, CG_CUT */
    uint64_t n;                 /* current or last cut */
    int ended;                  /* how cut n ended, once IDLE */
    uint64_t volumes;           /* bit i: volume i is in cut n */
    uint64_t full;              /* bit i: volume i's PiT is copied whole */
    uint64_t gen;               /* bumped at every transition */
    double lease_left_ms;       /* FROZEN: until the lease thaws it; else -1 */
};

struct cg_result {
    char kind[16];              /* "" on success, else a protocol Kind value */
    char msg[240];
    double drain_ms;            /* freeze */
    double held_ms;             /* thaw */
    uint64_t blocks[64];        /* freeze: blocks in the cut, per volume (bit of the mask) */
};

/* The cut state machine of the frozen phase (IDLE -> FROZEN -> CUT | IDLE),
 * shared by the Python control server and the native listener. */
/* names: the volumes in gate order, one per line; notify_fd: -1 or the
 * write end of a non-blocking pipe that gets a byte at a freeze and when a
 * cut ends while frozen (abort, lease, its connection). */
cg_core *cg_core_new(cg_gate **gates, int ngates, const char *names, uint64_t last_n,
                     int notify_fd);
/* The node's session ("" : none) and how refusals name it ("node b1"),
 * before start (nbdplugin/noderecord.py): the gate socket refuses a request
 * naming another session.  -1 if either is too long. */
int cg_core_identity(cg_core *c, const char *session, const char *who);
/* The highest leader epoch the node has recorded (issue 19; Python calls
 * it once node.json holds it, nbdplugin/epoch.py); it only grows.  The gate
 * socket refuses, kind "fenced", a FREEZE carrying another epoch: a lower
 * one (a deposed leader) or a higher one (not yet recorded). */
void cg_core_set_epoch(cg_core *c, uint64_t epoch);
int cg_core_start(cg_core *c);
void cg_core_stop(cg_core *c);
void cg_core_free(cg_core *c);
void cg_core_bitmaps(cg_core *c, int vol, const uint64_t *cr, const uint64_t *oos,
                     size_t nwords);
int cg_freeze(cg_core *c, uint64_t n, uint32_t lease_ms, uint64_t volumes,
              uint64_t full, int64_t owner, struct cg_result *r);
int cg_thaw(cg_core *c, uint64_t n, struct cg_result *r);
int cg_abort(cg_core *c, uint64_t n, struct cg_result *r);
int cg_end(cg_core *c, uint64_t n, int ended);
void cg_owner_gone(cg_core *c, int64_t owner);
void cg_state(cg_core *c, struct cg_state *s);

/* Serve freeze/thaw/abort on a listening unix socket (the caller keeps the
 * fd open while the core runs); peers must be root or uid. */
int cg_serve(cg_core *c, int listen_fd, uint32_t uid);
/* The same on a listening TCP socket, with mutual TLS 1.3 from the host's
 * certificate files (wire/tls.py's rules); -1 and err if they do not load. */
int cg_serve_tls(cg_core *c, int listen_fd, const char *ca, const char *cert,
                 const char *key, char *err, size_t errlen);
/* CDEF END */

#endif
