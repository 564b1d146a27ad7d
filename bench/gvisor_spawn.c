/* A process start inside a fresh gVisor sandbox, three ways: fork + exec (std's Command with a
 * pre_exec hook), a vfork-style clone(CLONE_VM | CLONE_VFORK) + exec (the agent's
 * ringfence_sys::spawn_hardened), and glibc's posix_spawn. Run as a sandbox's init by
 * bench/gvisor_spawn.py; prints, per start, when the call returned and when /bin/echo exited.
 *
 *     gvisor_spawn fork|vfork|posix
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
        double t0 = now_ms();
        pid_t pid = -1;
        if (!strcmp(mode, "fork")) {
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
