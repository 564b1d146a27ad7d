/* A process start inside a fresh gVisor sandbox, four ways: fork + exec (std's Command with a
 * pre_exec hook), a vfork-style clone(CLONE_VM | CLONE_VFORK) + exec (the agent's
 * ringfence_sys::spawn_hardened), glibc's posix_spawn, and `stem`: a child forked before the
 * clock starts, waiting on a pipe, that only execs when told (what a process forked ahead
 * would leave of a start). Run as a sandbox's init by bench/gvisor_spawn.py; prints, per
 * start, when the call returned and when /bin/echo exited.
 *
 *     gvisor_spawn fork|vfork|posix|stem
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;
static char *args[] = {"/bin/echo", "hi", NULL};
static int null_fd;

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static int child(void *unused) {
    (void)unused;
    dup2(null_fd, 1);
    execve(args[0], args, environ);
    _exit(127);
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "fork";
    static char stack[64 * 1024];
    null_fd = open("/dev/null", O_WRONLY | O_CLOEXEC);
    for (int i = 0; i < 3; i++) {
        int go[2] = {-1, -1};
        pid_t stem = -1;
        if (!strcmp(mode, "stem")) {
            char b;
            if (pipe(go) != 0) return 1;
            stem = fork();
            if (stem == 0) {
                close(go[1]);
                if (read(go[0], &b, 1) != 1) _exit(126);
                child(NULL);
            }
            close(go[0]);
            usleep(20000); /* the fork's work done before the clock starts */
        }
        double t0 = now_ms();
        pid_t pid = -1;
        if (stem > 0) {
            pid = stem;
            if (write(go[1], "x", 1) != 1) return 1;
            close(go[1]);
        } else if (!strcmp(mode, "fork")) {
            pid = fork();
            if (pid == 0) child(NULL);
        } else if (!strcmp(mode, "vfork")) {
            pid = clone(child, stack + sizeof stack, CLONE_VM | CLONE_VFORK | SIGCHLD, NULL);
        } else {
            posix_spawn_file_actions_t fa;
            posix_spawn_file_actions_init(&fa);
            posix_spawn_file_actions_adddup2(&fa, null_fd, 1);
            posix_spawn(&pid, args[0], &fa, NULL, args, environ);
        }
        double t1 = now_ms();
        int status;
        waitpid(pid, &status, 0);
        printf("%s %d %.2f %.2f\n", mode, i, t1 - t0, now_ms() - t0);
    }
    return 0;
}
