/*
 * score-sandbox: runs untrusted Python programs, one at a time, for a long-lived parent.
 *
 * The parent (score.rl.sandbox) starts one launcher per worker and keeps it: the launcher
 * is a small C process, so no execution pays for forking a trainer that holds torch and a
 * model. Requests arrive on fd 0, results leave on fd 1 (framing: see protocol.py).
 *
 * Each program runs inside a fresh set of namespaces (user, pid, mount, net, ipc, uts):
 *   - user: the program is an unprivileged uid (host "nobody" when the launcher is root),
 *     so rlimits such as RLIMIT_NPROC apply and it holds no capability after exec;
 *   - pid: a small init (this file) is pid 1; when it exits the kernel kills every process
 *     left in the namespace, which catches daemons that left the process group;
 *   - mount: a tmpfs root holding only read-only binds of the Python runtime and system
 *     libraries, /dev/{null,zero,full,random,urandom} and a size-limited writable /sandbox;
 *   - net: no interface is up, so nothing (host loopback included) is reachable;
 *   - ipc, uts: no shared SysV IPC with the host, a private hostname.
 * On top: a cleared environment, no inherited descriptors, rlimits (CPU, address space,
 * file size, open files, processes, core), its own session, SIGKILL of the whole namespace
 * at the wall-clock deadline, when output passes its cap, or when the parent dies.
 *
 * Namespaces the kernel refuses are reported in the hello message; unless started with
 * --allow-missing the launcher then refuses to run anything (strict mode).
 * Not done: cgroup memory/pid accounting (RLIMIT_AS is per process, RLIMIT_NPROC bounds
 * how many), seccomp syscall filtering.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <grp.h>
#include <linux/mount.h>
#include <linux/securebits.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "protocol.h"

#define MAX_RO_PATHS 32
#define WORK_DIR "/sandbox"
#define SANDBOX_ID 1000      /* program uid/gid inside its user namespace (root launcher) */
#define NOBODY_ID 65534      /* the host uid/gid that SANDBOX_ID maps to */
#define WORK_TMPFS_MB 32     /* writable space of one run */
#define FILE_SIZE_MB 16      /* RLIMIT_FSIZE */
#define MAX_PROCS 32         /* RLIMIT_NPROC: processes + threads of one run */
#define MAX_OPEN_FILES 256

static const struct { uint32_t bit; int flag; const char *name; } NAMESPACES[] = {
    {PROT_USER, CLONE_NEWUSER, "user"}, {PROT_PID, CLONE_NEWPID, "pid"},
    {PROT_MOUNT, CLONE_NEWNS, "mount"}, {PROT_NET, CLONE_NEWNET, "net"},
    {PROT_IPC, CLONE_NEWIPC, "ipc"},    {PROT_UTS, CLONE_NEWUTS, "uts"},
};
#define N_NAMESPACES (sizeof NAMESPACES / sizeof NAMESPACES[0])

/* Runs the program with python -I -S (no site, no environment, no user paths). Without
 * site, exit()/quit() do not exist, yet model code calls them. MemoryError is turned into
 * a distinct exit code so the parent can report "memory" rather than a generic error. */
static const char PRELUDE[] =
    "import builtins, sys\n"
    "builtins.exit = builtins.quit = sys.exit\n"
    "sys.argv = ['main.py']\n"
    "try:\n"
    "    _src = open('main.py', 'rb').read()\n"
    "    exec(compile(_src, 'main.py', 'exec'), {'__name__': '__main__', '__file__': 'main.py',"
    " '__builtins__': builtins})\n"
    "except MemoryError:\n"
    "    import os, traceback\n"
    "    traceback.print_exc()\n"
    "    sys.stderr.flush()\n"
    "    os._exit(" MEMORY_EXIT_STR ")\n";

struct config {
    const char *python;
    const char *ro_paths[MAX_RO_PATHS];
    int n_ro_paths;
    uint32_t present;  /* PROT_* bits the kernel grants */
    int clone_flags;
    int is_root;
    unsigned program_id;      /* uid and gid the program runs as, as init sees them */
    unsigned program_host_id; /* the same, as the host sees them */
    pid_t parent;
};

/* What the init of one run reports to the launcher over its status pipe. */
struct init_report {
    int32_t setup_failed; /* 0: wait_status is the program's; 1: message says what failed */
    int32_t wait_status;
    char message[240];
};

static void die(const char *what) {
    fprintf(stderr, "score-sandbox: %s: %s\n", what, strerror(errno));
    exit(2);
}

static int read_full(int fd, void *buf, size_t len) {
    char *p = buf;
    while (len) {
        ssize_t n = read(fd, p, len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        p += n, len -= (size_t)n;
    }
    return 0;
}

static int write_full(int fd, const void *buf, size_t len) {
    const char *p = buf;
    while (len) {
        ssize_t n = write(fd, p, len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        p += n, len -= (size_t)n;
    }
    return 0;
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* A raw clone behaves like fork but accepts namespace flags; the launcher is
 * single-threaded, so nothing glibc-internal is left inconsistent in the child. */
static pid_t clone_fork(int flags) {
    return (pid_t)syscall(SYS_clone, (unsigned long)(flags | SIGCHLD), NULL, NULL, NULL, NULL);
}

static int write_file(const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    int rc = write_full(fd, text, strlen(text));
    close(fd);
    return rc;
}

/* Which namespaces may this process create? Each is tried in a throwaway child. */
static uint32_t probe_namespaces(uint32_t without) {
    uint32_t present = 0;
    int user_ok = 0;
    for (size_t i = 0; i < N_NAMESPACES; i++) {
        if (NAMESPACES[i].bit & without) continue;
        /* Unprivileged, every other namespace needs a user namespace around it. */
        int flags = NAMESPACES[i].flag | (user_ok ? CLONE_NEWUSER : 0);
        pid_t pid = clone_fork(flags);
        if (pid == 0) _exit(0);
        int status;
        if (pid > 0 && waitpid(pid, &status, 0) == pid && WIFEXITED(status) && !WEXITSTATUS(status)) {
            present |= NAMESPACES[i].bit;
            if (NAMESPACES[i].flag == CLONE_NEWUSER) user_ok = 1;
        }
    }
    return present;
}

static void fail_setup(int status_fd, const char *step) {
    struct init_report r = {.setup_failed = 1};
    snprintf(r.message, sizeof r.message, "sandbox setup failed at %s: %s", step, strerror(errno));
    write_full(status_fd, &r, sizeof r);
    _exit(1);
}

static int mkdir_p(const char *path) {
    char buf[4096];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        if (mkdir(buf, 0755) && errno != EEXIST) return -1;
        *p = '/';
    }
    return mkdir(buf, 0755) && errno != EEXIST ? -1 : 0;
}

/* Bind host path `path` (seen under /oldroot) at the same place in the new root. */
static int bind_same_path(const char *path, int read_only) {
    char src[4096], parent[4096];
    struct stat st;
    snprintf(src, sizeof src, "/oldroot%s", path);
    if (lstat(src, &st)) return -1;
    snprintf(parent, sizeof parent, "%s", path);
    char *slash = strrchr(parent, '/');
    if (slash && slash != parent) {
        *slash = 0;
        if (mkdir_p(parent)) return -1;
    }
    if (S_ISLNK(st.st_mode)) { /* e.g. /lib -> usr/lib on merged-/usr systems */
        char target[4096];
        ssize_t n = readlink(src, target, sizeof target - 1);
        if (n < 0) return -1;
        target[n] = 0;
        return symlink(target, path) && errno != EEXIST ? -1 : 0;
    }
    if (S_ISDIR(st.st_mode) ? mkdir_p(path) : close(open(path, O_CREAT | O_WRONLY, 0644))) return -1;
    if (mount(src, path, NULL, MS_BIND | MS_REC, NULL)) return -1;
    /* mount_setattr changes only the named attributes, so locked host flags survive. */
    struct mount_attr attr = {.attr_set = MOUNT_ATTR_NOSUID | (read_only ? MOUNT_ATTR_RDONLY | MOUNT_ATTR_NODEV : 0)};
    return (int)syscall(SYS_mount_setattr, -1, path, AT_RECURSIVE, &attr, sizeof attr);
}

/* Build the minimal filesystem view and enter it. Runs as init, inside the new namespaces. */
static void enter_filesystem_view(const struct config *cfg, int status_fd) {
    static const char *devices[] = {"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"};
    char opts[64];
    /* Nothing mounted from here on may propagate back to the host. */
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL)) fail_setup(status_fd, "making / private");
    if (mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755"))
        fail_setup(status_fd, "mounting the root tmpfs on /tmp");
    if (chdir("/tmp") || mkdir("oldroot", 0700) || syscall(SYS_pivot_root, ".", "oldroot") || chdir("/"))
        fail_setup(status_fd, "pivot_root");
    for (int i = 0; i < cfg->n_ro_paths; i++)
        if (bind_same_path(cfg->ro_paths[i], 1)) fail_setup(status_fd, cfg->ro_paths[i]);
    for (size_t i = 0; i < sizeof devices / sizeof devices[0]; i++)
        if (bind_same_path(devices[i], 0)) fail_setup(status_fd, devices[i]);
    snprintf(opts, sizeof opts, "size=%dm,mode=0700,uid=%u,gid=%u", WORK_TMPFS_MB, cfg->program_id, cfg->program_id);
    if (mkdir(WORK_DIR, 0755) || mount("tmpfs", WORK_DIR, "tmpfs", MS_NOSUID | MS_NODEV, opts))
        fail_setup(status_fd, "mounting " WORK_DIR);
    if (umount2("/oldroot", MNT_DETACH) || rmdir("/oldroot")) fail_setup(status_fd, "detaching the host root");
    /* Only /sandbox (and the devices) stay writable. */
    if (mount(NULL, "/", NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, NULL))
        fail_setup(status_fd, "remounting / read-only");
}

static void set_limit(int resource, rlim_t value) {
    struct rlimit rl = {value, value};
    setrlimit(resource, &rl);
}

/* Leave init's identity for the program's: no capabilities, now or after exec. */
static int drop_privileges(const struct config *cfg) {
    if (cfg->present & PROT_USER) {
        /* Unprivileged launchers can map one uid only, so the program may stay uid 0 of its
         * namespace: lock root out of regaining capabilities at exec. */
        for (int cap = 0; prctl(PR_CAPBSET_READ, cap, 0, 0, 0) >= 0; cap++)
            if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)) return -1;
        if (prctl(PR_SET_SECUREBITS, SECBIT_NOROOT | SECBIT_NOROOT_LOCKED | SECBIT_NO_CAP_AMBIENT_RAISE |
                  SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED, 0, 0, 0))
            return -1;
    } else if (cfg->is_root) {
        gid_t gid = cfg->program_id; /* host root without a user namespace: become nobody */
        if (setgroups(1, &gid)) return -1;
    }
    if (getuid() != cfg->program_id &&
        (setresgid(cfg->program_id, cfg->program_id, cfg->program_id) ||
         setresuid(cfg->program_id, cfg->program_id, cfg->program_id)))
        return -1;
    return prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
}

/* The program itself: runs as a child of init, never returns. */
static void exec_program(const struct config *cfg, const struct request *req, int fds[3], const char *work_dir) {
    setsid(); /* own session and process group */
    for (int i = 0; i < 3; i++)
        if (dup2(fds[i], i) < 0) _exit(127);
    syscall(SYS_close_range, 3, ~0U, 0); /* no inherited descriptors */
    signal(SIGPIPE, SIG_DFL);
    set_limit(RLIMIT_CPU, req->timeout_ms / 1000 + 2);
    set_limit(RLIMIT_AS, (rlim_t)req->memory_mb << 20);
    set_limit(RLIMIT_FSIZE, (rlim_t)FILE_SIZE_MB << 20);
    set_limit(RLIMIT_NOFILE, MAX_OPEN_FILES);
    set_limit(RLIMIT_NPROC, MAX_PROCS);
    set_limit(RLIMIT_CORE, 0);
    if (drop_privileges(cfg) || chdir(work_dir)) _exit(126);
    char *const argv[] = {(char *)cfg->python, "-I", "-S", "-B", "-c", (char *)PRELUDE, NULL};
    char *const envp[] = {"PATH=/usr/local/bin:/usr/bin:/bin", "HOME=" WORK_DIR, "TMPDIR=" WORK_DIR,
                          "LANG=C.UTF-8", NULL};
    execve(cfg->python, argv, envp);
    _exit(127);
}

static int remove_entry(const char *path, const struct stat *st, int type, struct FTW *ftw) {
    (void)st, (void)type, (void)ftw;
    return remove(path);
}

/* Init of one run (pid 1 of its pid namespace when that exists). Never returns. */
static void run_init(const struct config *cfg, const struct request *req, const char *source,
                     int sync_fd, int status_fd, int fds[3], const char *host_work_dir) {
    prctl(PR_SET_PDEATHSIG, SIGKILL); /* launcher gone -> init gone -> namespace gone */
    close(STDIN_FILENO), close(STDOUT_FILENO); /* the launcher's request/response pipes */
    char go;
    /* Wait until the id maps are written; EOF here also means the launcher died before
     * PR_SET_PDEATHSIG took effect. */
    if (read_full(sync_fd, &go, 1)) _exit(1);
    close(sync_fd);
    if (cfg->present & PROT_MOUNT) {
        enter_filesystem_view(cfg, status_fd);
        int fd = open(WORK_DIR "/main.py", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (fd < 0 || write_full(fd, source, req->source_len) || close(fd)) fail_setup(status_fd, "writing main.py");
    }
    if (cfg->present & PROT_UTS) sethostname("sandbox", 7);

    pid_t program = fork();
    if (program < 0) fail_setup(status_fd, "fork");
    if (program == 0) exec_program(cfg, req, fds, host_work_dir[0] ? host_work_dir : WORK_DIR);
    for (int i = 0; i < 3; i++) close(fds[i]);
    /* Reap everything (orphans reparent to us) until the program itself is done. */
    struct init_report report = {0};
    for (;;) {
        int status;
        pid_t pid = wait(&status);
        if (pid == program) { report.wait_status = status; break; }
        if (pid < 0 && errno != EINTR) break;
    }
    write_full(status_fd, &report, sizeof report);
    if (!(cfg->present & PROT_PID)) kill(-program, SIGKILL); /* best effort without a pid namespace */
    _exit(0);
}

/* Init keeps the launcher's own uid as uid 0 of the namespace (it needs that uid to reach
 * the runtime it binds, e.g. under a 0700 /root). A root launcher also maps SANDBOX_ID to
 * host nobody for the program, so RLIMIT_NPROC applies (it never does to host root). */
static int write_id_maps(pid_t pid, const struct config *cfg) {
    char path[64], map[96];
    snprintf(path, sizeof path, "/proc/%d/setgroups", pid);
    if (write_file(path, "deny")) return -1;
    const char *names[2] = {"uid_map", "gid_map"};
    unsigned own[2] = {getuid(), getgid()};
    for (int i = 0; i < 2; i++) {
        int n = snprintf(map, sizeof map, "0 %u 1\n", own[i]);
        if (cfg->is_root) snprintf(map + n, sizeof map - n, "%d %d 1\n", SANDBOX_ID, NOBODY_ID);
        snprintf(path, sizeof path, "/proc/%d/%s", pid, names[i]);
        if (write_file(path, map)) return -1;
    }
    return 0;
}

struct capture { char *data; uint32_t len; };

/* Reads what is available; returns 0 on EOF, 1 if more may come, 2 if the cap is passed. */
static int drain(int fd, struct capture *c, uint32_t cap) {
    char buf[65536];
    ssize_t n = read(fd, buf, sizeof buf);
    if (n < 0) return errno == EINTR || errno == EAGAIN ? 1 : 0;
    if (n == 0) return 0;
    size_t keep = (size_t)n;
    if (c->len + keep > cap) keep = cap - c->len;
    memcpy(c->data + c->len, buf, keep);
    c->len += (uint32_t)keep;
    return keep < (size_t)n ? 2 : 1;
}

static void run_request(const struct config *cfg, const struct request *req, const char *source,
                        const char *stdin_data) {
    struct response resp = {.magic = PROTOCOL_MAGIC};
    struct capture out = {malloc(req->max_output_bytes + 1), 0}, err = {malloc(req->max_output_bytes + 1), 0};
    struct init_report report = {.setup_failed = 1};
    int in_pipe[2], out_pipe[2], err_pipe[2], sync_pipe[2], status_pipe[2];
    char host_work_dir[64] = "";
    if (!out.data || !err.data) die("malloc");
    if (pipe2(in_pipe, O_CLOEXEC) || pipe2(out_pipe, O_CLOEXEC) || pipe2(err_pipe, O_CLOEXEC) ||
        pipe2(sync_pipe, O_CLOEXEC) || pipe2(status_pipe, O_CLOEXEC))
        die("pipe");
    if (!(cfg->present & PROT_MOUNT)) { /* no private root: a fresh host directory instead */
        snprintf(host_work_dir, sizeof host_work_dir, "/tmp/score-sandbox-XXXXXX");
        if (!mkdtemp(host_work_dir)) die("mkdtemp");
        char path[96];
        snprintf(path, sizeof path, "%s/main.py", host_work_dir);
        int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
        if (fd < 0 || write_full(fd, source, req->source_len) || close(fd)) die("writing main.py");
        if (chown(host_work_dir, cfg->program_host_id, cfg->program_host_id)) die("chown work dir");
    }
    int64_t start = now_ns();
    pid_t init = clone_fork(cfg->clone_flags);
    if (init < 0) die("clone");
    if (init == 0) {
        int fds[3] = {in_pipe[0], out_pipe[1], err_pipe[1]};
        close(in_pipe[1]), close(out_pipe[0]), close(err_pipe[0]), close(sync_pipe[1]), close(status_pipe[0]);
        run_init(cfg, req, source, sync_pipe[0], status_pipe[1], fds, host_work_dir);
    }
    close(in_pipe[0]), close(out_pipe[1]), close(err_pipe[1]), close(sync_pipe[0]), close(status_pipe[1]);
    if (cfg->present & PROT_USER && write_id_maps(init, cfg)) {
        snprintf(report.message, sizeof report.message, "writing uid/gid maps failed: %s", strerror(errno));
        kill(init, SIGKILL);
    }
    write_full(sync_pipe[1], "g", 1);
    close(sync_pipe[1]);

    int pidfd = (int)syscall(SYS_pidfd_open, init, 0);
    if (pidfd < 0) die("pidfd_open");
    fcntl(in_pipe[1], F_SETFL, O_NONBLOCK);
    uint32_t stdin_sent = 0;
    int in_open = 1, out_open = 1, err_open = 1, init_alive = 1, killed = 0;
    if (req->stdin_len == 0) close(in_pipe[1]), in_open = 0;
    int64_t deadline = start + (int64_t)req->timeout_ms * 1000000;
    while (out_open || err_open || init_alive) {
        /* Negative descriptors are skipped by poll; closed ones would report POLLNVAL forever. */
        struct pollfd p[5] = {{out_open ? out_pipe[0] : -1, POLLIN, 0}, {err_open ? err_pipe[0] : -1, POLLIN, 0},
                              {init_alive ? pidfd : -1, POLLIN, 0}, {in_open ? in_pipe[1] : -1, POLLOUT, 0},
                              {STDIN_FILENO, 0, 0}};
        int64_t left_ms = (deadline - now_ns()) / 1000000;
        if (killed) left_ms = 200;
        int n = poll(p, 5, left_ms < 0 ? 0 : left_ms > 200 ? 200 : (int)left_ms);
        if (n < 0 && errno != EINTR) die("poll");
        int parent_gone = (p[4].revents & (POLLHUP | POLLERR)) || getppid() != cfg->parent;
        if (parent_gone) { kill(init, SIGKILL); exit(0); }
        if (!killed && now_ns() >= deadline) { resp.flags |= FLAG_TIMED_OUT; kill(init, SIGKILL); killed = 1; }
        if (out_open && p[0].revents) {
            int r = drain(out_pipe[0], &out, req->max_output_bytes);
            if (r == 0) out_open = 0;
            if (r == 2 && !killed) { resp.flags |= FLAG_OUTPUT_LIMIT; kill(init, SIGKILL); killed = 1; }
        }
        if (err_open && p[1].revents) {
            int r = drain(err_pipe[0], &err, req->max_output_bytes);
            if (r == 0) err_open = 0;
            if (r == 2 && !killed) { resp.flags |= FLAG_OUTPUT_LIMIT; kill(init, SIGKILL); killed = 1; }
        }
        if (in_open && p[3].revents) {
            ssize_t w = write(in_pipe[1], stdin_data + stdin_sent, req->stdin_len - stdin_sent);
            if (w > 0) stdin_sent += (uint32_t)w;
            if ((w < 0 && errno != EAGAIN && errno != EINTR) || stdin_sent == req->stdin_len)
                close(in_pipe[1]), in_open = 0; /* done, or the program closed its stdin */
        }
        if (init_alive && p[2].revents) {
            int status;
            waitpid(init, &status, 0);
            init_alive = 0;
            /* The namespace dies with init; stragglers holding the pipes die with it. */
            if (read_full(status_pipe[0], &report, sizeof report) && !killed && !report.message[0])
                snprintf(report.message, sizeof report.message, "sandbox init ended without a report");
        }
    }
    if (in_open) close(in_pipe[1]);
    close(out_pipe[0]), close(err_pipe[0]), close(status_pipe[0]), close(pidfd);
    if (host_work_dir[0]) nftw(host_work_dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);

    resp.wall_ns = (uint64_t)(now_ns() - start);
    if (killed) {
        resp.outcome = OUTCOME_SIGNALED, resp.code = SIGKILL;
    } else if (report.setup_failed) {
        resp.flags |= FLAG_SETUP_FAILED;
        err.len = 0;
        uint32_t n = (uint32_t)strnlen(report.message, sizeof report.message);
        if (n > req->max_output_bytes) n = req->max_output_bytes;
        memcpy(err.data, report.message, n), err.len = n;
    } else if (WIFSIGNALED(report.wait_status)) {
        resp.outcome = OUTCOME_SIGNALED, resp.code = WTERMSIG(report.wait_status);
    } else {
        resp.outcome = OUTCOME_EXITED, resp.code = WEXITSTATUS(report.wait_status);
    }
    resp.stdout_len = out.len, resp.stderr_len = err.len;
    if (write_full(STDOUT_FILENO, &resp, sizeof resp) || write_full(STDOUT_FILENO, out.data, out.len) ||
        write_full(STDOUT_FILENO, err.data, err.len))
        exit(0); /* parent gone */
    free(out.data), free(err.data);
}

/* Waits for the next request; exits quietly when the parent is gone. */
static int next_request(const struct config *cfg, struct request *req) {
    for (;;) {
        struct pollfd p = {STDIN_FILENO, POLLIN, 0};
        if (poll(&p, 1, 1000) > 0) break;
        if (getppid() != cfg->parent) exit(0); /* a forked copy of the parent may hold our pipe */
    }
    if (read_full(STDIN_FILENO, req, sizeof *req)) exit(0);
    if (req->magic != PROTOCOL_MAGIC) { fprintf(stderr, "score-sandbox: bad request magic\n"); exit(2); }
    return 0;
}

static uint32_t parse_namespaces(const char *list) {
    uint32_t bits = 0;
    char buf[256];
    snprintf(buf, sizeof buf, "%s", list);
    for (char *save, *name = strtok_r(buf, ",", &save); name; name = strtok_r(NULL, ",", &save)) {
        size_t i = 0;
        while (i < N_NAMESPACES && strcmp(NAMESPACES[i].name, name)) i++;
        if (i == N_NAMESPACES) { fprintf(stderr, "score-sandbox: unknown namespace '%s'\n", name); exit(2); }
        bits |= NAMESPACES[i].bit;
    }
    return bits;
}

int main(int argc, char **argv) {
    struct config cfg = {.parent = getppid(), .is_root = geteuid() == 0};
    uint32_t without = 0;
    int allow_missing = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--python") && i + 1 < argc) cfg.python = argv[++i];
        else if (!strcmp(argv[i], "--ro") && i + 1 < argc && cfg.n_ro_paths < MAX_RO_PATHS) cfg.ro_paths[cfg.n_ro_paths++] = argv[++i];
        else if (!strcmp(argv[i], "--without") && i + 1 < argc) without = parse_namespaces(argv[++i]); /* tests of the fallback */
        else if (!strcmp(argv[i], "--allow-missing")) allow_missing = 1;
        else { fprintf(stderr, "score-sandbox: unexpected argument '%s'\nusage: score-sandbox --python PATH [--ro PATH]... [--without NS,...] [--allow-missing]\n", argv[i]); return 2; }
    }
    if (!cfg.python || cfg.python[0] != '/') { fprintf(stderr, "score-sandbox: --python needs an absolute path\n"); return 2; }
    for (int i = 0; i < cfg.n_ro_paths; i++)
        if (cfg.ro_paths[i][0] != '/') { fprintf(stderr, "score-sandbox: --ro needs absolute paths, got '%s'\n", cfg.ro_paths[i]); return 2; }
    syscall(SYS_close_range, 3, ~0U, 0);
    signal(SIGPIPE, SIG_IGN);
    if (cfg.is_root) setgroups(0, NULL); /* children must not carry root's supplementary groups */

    cfg.present = probe_namespaces(without);
    for (size_t i = 0; i < N_NAMESPACES; i++)
        if (cfg.present & NAMESPACES[i].bit) cfg.clone_flags |= NAMESPACES[i].flag;
    if (cfg.present & PROT_USER) cfg.program_id = cfg.is_root ? SANDBOX_ID : 0;
    else cfg.program_id = cfg.is_root ? NOBODY_ID : getuid();
    cfg.program_host_id = cfg.is_root ? NOBODY_ID : getuid();
    struct hello hello = {PROTOCOL_MAGIC, cfg.present, PROT_ALL};
    if (write_full(STDOUT_FILENO, &hello, sizeof hello)) return 0;
    if (cfg.present != PROT_ALL && !allow_missing) return 3; /* strict: never run unprotected */

    for (;;) {
        struct request req;
        next_request(&cfg, &req);
        char *source = malloc(req.source_len + 1), *stdin_data = malloc(req.stdin_len + 1);
        if (!source || !stdin_data) die("malloc");
        if (read_full(STDIN_FILENO, source, req.source_len) || read_full(STDIN_FILENO, stdin_data, req.stdin_len)) return 0;
        run_request(&cfg, &req, source, stdin_data);
        free(source), free(stdin_data);
    }
}
