/*
 * score-sandbox: runs untrusted Python programs, one at a time, for a long-lived parent.
 *
 * The parent (score.rl.rewards.sandbox) starts one launcher per worker and keeps it: the launcher
 * is a small C process, so no execution pays for forking a trainer that holds torch and a
 * model. Requests arrive on fd 0, results leave on fd 1 (framing: see protocol.py).
 *
 * The launcher builds a set of namespaces (user, pid, mount, net, ipc, uts) and starts a
 * Python fork server (zygote.py) inside them as pid 1; each program is a fork of that
 * warm interpreter, so no execution pays for interpreter start-up either. After each run
 * the zygote kills everything the run left and wipes its directory; at a timeout or an
 * output overflow the launcher kills the whole namespace and starts a fresh zygote.
 *   - user: programs are an unprivileged uid (host "nobody" when the launcher is root),
 *     so rlimits such as RLIMIT_NPROC apply, and they hold no capability;
 *   - pid: the zygote is pid 1: programs cannot kill it, orphans come back to it, and when
 *     it dies the kernel kills every process left, daemons that left the group included;
 *   - mount: a tmpfs root holding only read-only binds of the Python runtime and system
 *     libraries, /dev/{null,zero,full,random,urandom} and a size-limited writable /sandbox;
 *   - net: no interface is up, so nothing (host loopback included) is reachable;
 *   - ipc, uts: no shared SysV IPC with the host, a private hostname.
 * On top: a cleared environment, no inherited descriptors, rlimits (CPU, address space,
 * file size, open files, processes, core; set by the zygote), its own session, SIGKILL of
 * the whole namespace at the wall-clock deadline, when output passes its cap, or when the
 * parent dies.
 *
 * Namespaces the kernel refuses are reported in the hello message; unless started with
 * --allow-missing the launcher then refuses to run anything (strict mode).
 * Not done: cgroup memory/pid accounting (RLIMIT_AS is per process, RLIMIT_NPROC bounds
 * how many), seccomp syscall filtering, fresh namespaces per program (consecutive programs
 * of one launcher share them; nothing of a run survives it but SysV IPC objects).
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
#include <sys/socket.h>
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
#define ZYGOTE_START_S 20    /* how long a starting zygote may take to say it is ready */

static const struct { uint32_t bit; int flag; const char *name; } NAMESPACES[] = {
    {PROT_USER, CLONE_NEWUSER, "user"}, {PROT_PID, CLONE_NEWPID, "pid"},
    {PROT_MOUNT, CLONE_NEWNS, "mount"}, {PROT_NET, CLONE_NEWNET, "net"},
    {PROT_IPC, CLONE_NEWIPC, "ipc"},    {PROT_UTS, CLONE_NEWUTS, "uts"},
};
#define N_NAMESPACES (sizeof NAMESPACES / sizeof NAMESPACES[0])

struct config {
    const char *python;
    char *zygote_source;
    const char *ro_paths[MAX_RO_PATHS];
    int n_ro_paths;
    uint32_t present;  /* PROT_* bits the kernel grants */
    int clone_flags;
    int is_root;
    unsigned program_id;      /* uid and gid the program runs as, as init sees them */
    unsigned program_host_id; /* the same, as the host sees them */
    char work_base[64];       /* where the zygote makes each run's directory */
    pid_t parent;
};

/* The running fork server: its pid (pid 1 of the namespaces), control socket, pidfd. */
struct zygote { pid_t pid; int control, pidfd; };

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

/* In the zygote's init before exec: tell the launcher what failed, then give up. */
static void fail_setup(int control_fd, const char *step) {
    char message[512];
    int n = snprintf(message, sizeof message, "Fsandbox setup failed at %s: %s", step, strerror(errno));
    send(control_fd, message, (size_t)n, 0);
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

/* The zygote's side of start_zygote: enter the view, drop privileges, exec the fork server. */
static void exec_zygote(const struct config *cfg, int control_fd, int sync_fd) {
    close(STDIN_FILENO), close(STDOUT_FILENO); /* the launcher's request/response pipes */
    char go;
    /* Wait until the id maps are written; EOF means the launcher died first. */
    if (read_full(sync_fd, &go, 1)) _exit(1);
    close(sync_fd);
    if (cfg->present & PROT_MOUNT) enter_filesystem_view(cfg, control_fd);
    if (cfg->present & PROT_UTS) sethostname("sandbox", 7);
    if (drop_privileges(cfg)) fail_setup(control_fd, "dropping privileges");
    prctl(PR_SET_PDEATHSIG, SIGKILL); /* after the uid change, which clears it */
    int null_fd = open("/dev/null", O_RDWR);
    if (null_fd < 0 || dup2(null_fd, 0) < 0 || dup2(null_fd, 1) < 0 || dup2(control_fd, 3) < 0)
        fail_setup(control_fd, "setting up descriptors");
    syscall(SYS_close_range, 4, ~0U, 0); /* nothing of the launcher's leaks in */
    char home[96], tmpdir[96], base[96];
    snprintf(home, sizeof home, "HOME=%s/run", cfg->work_base);
    snprintf(tmpdir, sizeof tmpdir, "TMPDIR=%s/run", cfg->work_base);
    snprintf(base, sizeof base, "SANDBOX_WORK_BASE=%s", cfg->work_base);
    /* A cleared environment: only what the programs need, nothing of the parent's. */
    char *const envp[] = {"PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8", home, tmpdir, base, NULL};
    char *const argv[] = {(char *)cfg->python, "-I", "-S", "-B", "-c", cfg->zygote_source, NULL};
    execve(cfg->python, argv, envp);
    fail_setup(3, cfg->python);
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

/* Starts the namespaces and the fork server in them. Returns 0, or -1 with `error` set. */
static int start_zygote(const struct config *cfg, struct zygote *z, char *error, size_t error_size) {
    int sv[2], sync_pipe[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) || pipe2(sync_pipe, O_CLOEXEC)) die("socketpair");
    pid_t pid = clone_fork(cfg->clone_flags);
    if (pid < 0) die("clone");
    if (pid == 0) {
        close(sv[0]), close(sync_pipe[1]);
        exec_zygote(cfg, sv[1], sync_pipe[0]);
    }
    close(sv[1]), close(sync_pipe[0]);
    if (cfg->present & PROT_USER && write_id_maps(pid, cfg)) {
        snprintf(error, error_size, "writing uid/gid maps failed: %s", strerror(errno));
        kill(pid, SIGKILL);
    }
    write_full(sync_pipe[1], "g", 1);
    close(sync_pipe[1]);
    struct pollfd p = {sv[0], POLLIN, 0};
    char message[512];
    ssize_t n = poll(&p, 1, ZYGOTE_START_S * 1000) == 1 ? recv(sv[0], message, sizeof message - 1, 0) : -1;
    if (n == 1 && message[0] == 'R') {
        z->pid = pid, z->control = sv[0];
        z->pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
        if (z->pidfd < 0) die("pidfd_open");
        return 0;
    }
    if (n > 1 && message[0] == 'F') snprintf(error, error_size, "%.*s", (int)n - 1, message + 1);
    else if (!error[0]) snprintf(error, error_size, "the sandbox fork server did not start");
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    close(sv[0]);
    return -1;
}

static void stop_zygote(struct zygote *z) {
    if (!z->pid) return;
    kill(z->pid, SIGKILL); /* pid 1 of the namespace: everything in it dies too */
    waitpid(z->pid, NULL, 0);
    close(z->control), close(z->pidfd);
    z->pid = 0;
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

/* Hands the program and its pipe ends to the zygote (SCM_RIGHTS). */
static int send_request(const struct zygote *z, const struct request *req, int fds[4]) {
    uint32_t header[3] = {PROTOCOL_MAGIC, req->timeout_ms, req->memory_mb};
    struct iovec iov = {header, sizeof header};
    union { char buf[CMSG_SPACE(4 * sizeof(int))]; struct cmsghdr align; } control;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf, .msg_controllen = sizeof control.buf};
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET, cmsg->cmsg_type = SCM_RIGHTS, cmsg->cmsg_len = CMSG_LEN(4 * sizeof(int));
    memcpy(CMSG_DATA(cmsg), fds, 4 * sizeof(int));
    return sendmsg(z->control, &msg, MSG_NOSIGNAL) == (ssize_t)sizeof header ? 0 : -1;
}

static void respond(const struct response *resp, const struct capture *out, const struct capture *err) {
    if (write_full(STDOUT_FILENO, resp, sizeof *resp) || write_full(STDOUT_FILENO, out->data, out->len) ||
        write_full(STDOUT_FILENO, err->data, err->len))
        exit(0); /* parent gone */
}

/* Waits for the zygote's "S" + pid: the run has forked. -1 if the zygote died instead. */
static int await_start(struct zygote *z, int32_t *run_pid) {
    struct pollfd p = {z->control, POLLIN, 0};
    char message[16];
    if (poll(&p, 1, ZYGOTE_START_S * 1000) != 1 || recv(z->control, message, sizeof message, 0) != 5 || message[0] != 'S')
        return -1;
    memcpy(run_pid, message + 1, 4);
    return 0;
}

static void respond_setup_failed(struct response *resp, struct capture *out, struct capture *err, uint32_t cap) {
    resp->flags = FLAG_SETUP_FAILED;
    err->len = (uint32_t)strnlen(err->data, cap);
    resp->stdout_len = 0, resp->stderr_len = err->len;
    respond(resp, out, err);
}

static void run_request(const struct config *cfg, struct zygote *z, const struct request *req, const char *source,
                        const char *stdin_data) {
    struct response resp = {.magic = PROTOCOL_MAGIC};
    uint32_t cap = req->max_output_bytes;
    struct capture out = {malloc(cap + 512), 0}, err = {malloc(cap + 512), 0};
    if (!out.data || !err.data) die("malloc");
    int64_t start = now_ns();
    int src_pipe[2], in_pipe[2], out_pipe[2], err_pipe[2];
    int32_t run_pid = 0;
    /* A zygote that died since the last run (e.g. failing to clean up) is replaced, and
     * the request retried once on the fresh one. */
    for (int attempt = 0;; attempt++) {
        struct pollfd alive = {z->pid ? z->pidfd : -1, POLLIN, 0};
        if (z->pid && poll(&alive, 1, 0) == 1) stop_zygote(z);
        err.data[0] = 0;
        if (!z->pid && start_zygote(cfg, z, err.data, cap + 512)) {
            respond_setup_failed(&resp, &out, &err, cap);
            free(out.data), free(err.data);
            return;
        }
        if (pipe2(src_pipe, O_CLOEXEC) || pipe2(in_pipe, O_CLOEXEC) || pipe2(out_pipe, O_CLOEXEC) ||
            pipe2(err_pipe, O_CLOEXEC))
            die("pipe");
        int theirs[4] = {src_pipe[0], in_pipe[0], out_pipe[1], err_pipe[1]};
        int started = send_request(z, req, theirs) == 0 && await_start(z, &run_pid) == 0;
        for (int i = 0; i < 4; i++) close(theirs[i]);
        if (started) break;
        close(src_pipe[1]), close(in_pipe[1]), close(out_pipe[0]), close(err_pipe[0]);
        stop_zygote(z);
        if (attempt == 1) {
            snprintf(err.data, cap, "the sandbox fork server died before the run started");
            respond_setup_failed(&resp, &out, &err, cap);
            free(out.data), free(err.data);
            return;
        }
    }
    /* The run reads its source before anything else, so this cannot block for long. */
    write_full(src_pipe[1], source, req->source_len);
    close(src_pipe[1]);

    fcntl(in_pipe[1], F_SETFL, O_NONBLOCK);
    uint32_t stdin_sent = 0;
    int in_open = req->stdin_len > 0, out_open = 1, err_open = 1, reported = 0, killed = 0, zygote_died = 0;
    int32_t wait_status = 0;
    if (!in_open) close(in_pipe[1]);
    int64_t deadline = start + (int64_t)req->timeout_ms * 1000000, give_up = 0;
    while (out_open || err_open || !(reported || zygote_died)) {
        /* Negative descriptors are skipped by poll; closed ones would report POLLNVAL forever. */
        struct pollfd p[6] = {{out_open ? out_pipe[0] : -1, POLLIN, 0}, {err_open ? err_pipe[0] : -1, POLLIN, 0},
                              {in_open ? in_pipe[1] : -1, POLLOUT, 0}, {z->pid ? z->control : -1, POLLIN, 0},
                              {z->pid ? z->pidfd : -1, POLLIN, 0}, {STDIN_FILENO, 0, 0}};
        int64_t now = now_ns(), left_ms = ((killed ? give_up : deadline) - now) / 1000000;
        int n = poll(p, 6, left_ms < 0 ? 0 : left_ms > 200 ? 200 : (int)left_ms);
        if (n < 0 && errno != EINTR) die("poll");
        if ((p[5].revents & (POLLHUP | POLLERR)) || getppid() != cfg->parent) { stop_zygote(z); exit(0); }
        now = now_ns();
        int overflow = 0;
        if (out_open && p[0].revents) {
            int r = drain(out_pipe[0], &out, req->max_output_bytes);
            out_open = r != 0, overflow |= r == 2;
        }
        if (err_open && p[1].revents) {
            int r = drain(err_pipe[0], &err, req->max_output_bytes);
            err_open = r != 0, overflow |= r == 2;
        }
        if (in_open && p[2].revents) {
            ssize_t w = write(in_pipe[1], stdin_data + stdin_sent, req->stdin_len - stdin_sent);
            if (w > 0) stdin_sent += (uint32_t)w;
            if ((w < 0 && errno != EAGAIN && errno != EINTR) || stdin_sent == req->stdin_len)
                close(in_pipe[1]), in_open = 0; /* done, or the program closed its stdin */
        }
        if (z->pid && p[3].revents & POLLIN) {
            char message[16];
            ssize_t m = recv(z->control, message, sizeof message, 0);
            if (m == 5 && message[0] == 'W') memcpy(&wait_status, message + 1, 4), reported = 1;
        }
        if (z->pid && p[4].revents && !reported) zygote_died = 1;
        if (overflow && !(resp.flags & (FLAG_TIMED_OUT | FLAG_OUTPUT_LIMIT))) resp.flags |= FLAG_OUTPUT_LIMIT;
        if (!killed && !reported && (overflow || now >= deadline)) {
            if (!overflow) resp.flags |= FLAG_TIMED_OUT;
            /* Without a pid namespace the run's group must be killed by hand. */
            if (!(cfg->present & PROT_PID) && run_pid > 0) kill(-run_pid, SIGKILL);
            stop_zygote(z);
            killed = 1, zygote_died = 1;
            give_up = now + 1000000000; /* stragglers holding the pipes get one second */
        }
        if (killed && now >= give_up) break;
    }
    if (in_open) close(in_pipe[1]);
    close(out_pipe[0]), close(err_pipe[0]);
    if (zygote_died && !killed) stop_zygote(z); /* died on its own: reap; restart next time */

    resp.wall_ns = (uint64_t)(now_ns() - start);
    if (killed) {
        resp.outcome = OUTCOME_SIGNALED, resp.code = SIGKILL;
    } else if (!reported) {
        resp.flags |= FLAG_SETUP_FAILED;
        snprintf(err.data, cap, "the sandbox fork server died during the run");
        err.len = (uint32_t)strnlen(err.data, cap);
    } else if (WIFSIGNALED(wait_status)) {
        resp.outcome = OUTCOME_SIGNALED, resp.code = WTERMSIG(wait_status);
    } else {
        resp.outcome = OUTCOME_EXITED, resp.code = WEXITSTATUS(wait_status);
    }
    resp.stdout_len = out.len, resp.stderr_len = err.len;
    respond(&resp, &out, &err);
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

static char *read_text_file(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) die(path);
    static char text[1 << 16];
    size_t n = fread(text, 1, sizeof text - 1, f);
    if (n == sizeof text - 1) { fprintf(stderr, "score-sandbox: %s is too large\n", path); exit(2); }
    fclose(f);
    text[n] = 0;
    return text;
}

static int remove_entry(const char *path, const struct stat *st, int type, struct FTW *ftw) {
    (void)st, (void)type, (void)ftw;
    return remove(path);
}

static struct zygote *running_zygote;
static const char *host_work_base;

static void cleanup(void) {
    if (running_zygote) stop_zygote(running_zygote);
    if (host_work_base) nftw(host_work_base, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
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
        else if (!strcmp(argv[i], "--zygote") && i + 1 < argc) cfg.zygote_source = read_text_file(argv[++i]);
        else if (!strcmp(argv[i], "--ro") && i + 1 < argc && cfg.n_ro_paths < MAX_RO_PATHS) cfg.ro_paths[cfg.n_ro_paths++] = argv[++i];
        else if (!strcmp(argv[i], "--without") && i + 1 < argc) without = parse_namespaces(argv[++i]); /* tests of the fallback */
        else if (!strcmp(argv[i], "--allow-missing")) allow_missing = 1;
        else { fprintf(stderr, "score-sandbox: unexpected argument '%s'\nusage: score-sandbox --python PATH --zygote FILE [--ro PATH]... [--without NS,...] [--allow-missing]\n", argv[i]); return 2; }
    }
    if (!cfg.python || cfg.python[0] != '/') { fprintf(stderr, "score-sandbox: --python needs an absolute path\n"); return 2; }
    if (!cfg.zygote_source) { fprintf(stderr, "score-sandbox: --zygote FILE (zygote.py) is required\n"); return 2; }
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
    if (cfg.present & PROT_MOUNT) {
        snprintf(cfg.work_base, sizeof cfg.work_base, WORK_DIR);
    } else { /* no private root: a fresh host directory, removed at exit */
        snprintf(cfg.work_base, sizeof cfg.work_base, "/tmp/score-sandbox-XXXXXX");
        if (!mkdtemp(cfg.work_base) || chown(cfg.work_base, cfg.program_host_id, cfg.program_host_id)) die("work dir");
        host_work_base = cfg.work_base;
    }
    atexit(cleanup);
    struct hello hello = {PROTOCOL_MAGIC, cfg.present, PROT_ALL};
    if (write_full(STDOUT_FILENO, &hello, sizeof hello)) return 0;
    if (cfg.present != PROT_ALL && !allow_missing) return 3; /* strict: never run unprotected */

    struct zygote z = {0};
    running_zygote = &z;
    char error[512] = "";
    if (start_zygote(&cfg, &z, error, sizeof error)) fprintf(stderr, "score-sandbox: %s\n", error); /* retried per request */
    for (;;) {
        struct request req;
        next_request(&cfg, &req);
        char *source = malloc(req.source_len + 1), *stdin_data = malloc(req.stdin_len + 1);
        if (!source || !stdin_data) die("malloc");
        if (read_full(STDIN_FILENO, source, req.source_len) || read_full(STDIN_FILENO, stdin_data, req.stdin_len)) return 0;
        run_request(&cfg, &z, &req, source, stdin_data);
        free(source), free(stdin_data);
    }
}
