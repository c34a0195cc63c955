/* pgdr-fast: archive_command's compiled front for the push queue (pgdr.walpush).

   PostgreSQL's archiver runs archive_command once per segment, one after another. With the push queue, the
   pusher has usually archived a segment before the archiver asks for it: the call only has to find the
   pusher's acknowledgement (pg_wal/.pgdr-push/<NAME>.ok) and exit 0. A Python interpreter spends 10 ms of
   CPU starting for that; this program spends well under one.

       archive_command = '/path/to/pgdr-fast --config /etc/pgdr/pgdr.yaml -q wal-push --cluster app %p'

   It takes pgdr's own command line and answers only the one case it knows: a plain `wal-push` of a file the
   server marked ready in its own pg_wal, acknowledged by the running pusher of the same cluster and
   configuration file, for this very file (device, inode, size, modification time), exactly as
   pgdr.walpush.answer_push checks it. It waits (as the Python call does) while that pusher runs and has
   not acknowledged the file yet. Anything else, and any doubt, runs the `pgdr` installed beside it with the
   same arguments (execv: the same process, no shell): starting the pusher, reporting a failure, archiving
   in the calling process, every other command. It never archives, writes or deletes anything but the
   acknowledgement it consumes, and it answers 0 only for an acknowledgement the pusher wrote after the
   upload was durable.

   Build: cc -O2 -o "$(dirname "$(command -v pgdr)")/pgdr-fast" plugins/pgdr/fast.c   (make venv does it) */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#define SPOOL_DIR ".pgdr-push"
#define ACK_MAGIC "pgdr-push-ack 1"
#define MAX_PARALLEL 8
#define MIN_FREE (64LL << 20)
#define DEFAULT_TIMEOUT 60.0
#define BUF 16384

static char **g_argv;

/* Hand the call, unchanged, to the pgdr beside this program. */
static void full_command(void) {
    char self[PATH_MAX], target[PATH_MAX + 8];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n <= 0) {
        fprintf(stderr, "pgdr-fast: cannot find itself (/proc/self/exe: %s); segment not archived\n", strerror(errno));
        exit(1);
    }
    self[n] = '\0';
    char *slash = strrchr(self, '/');
    if (slash == NULL) exit(1);
    *slash = '\0';
    snprintf(target, sizeof target, "%s/pgdr", self);
    g_argv[0] = target;
    execv(target, g_argv);
    fprintf(stderr, "pgdr-fast: cannot run %s (%s); segment not archived, PostgreSQL will retry\n", target,
            strerror(errno));
    exit(1);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static int is_hex(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'A' && s[i] <= 'F'))) return 0;
    return 1;
}

/* pgdr.fast.is_wal_file_name, no looser: a segment, .partial, a backup history file, a timeline history. */
static int is_wal_file_name(const char *name) {
    const char *dot = strchr(name, '.');
    size_t seg = dot ? (size_t)(dot - name) : strlen(name);
    const char *rest = dot ? dot + 1 : NULL;
    if (seg == 24 && is_hex(name, 24)) {
        if (rest == NULL || strcmp(rest, "partial") == 0) return 1;
        return strlen(rest) == 15 && is_hex(rest, 8) && strcmp(rest + 8, ".backup") == 0;
    }
    return seg == 8 && is_hex(name, 8) && rest != NULL && strcmp(rest, "history") == 0;
}

/* An absolute path as os.path.abspath would give it, when that is the path itself joined to the working
   directory; 0 when normalising would change it (dots, doubled or trailing slashes): the full command then. */
static int absolute(const char *path, char *out, size_t size) {
    char cwd[PATH_MAX];
    if (path[0] == '/') {
        if ((size_t)snprintf(out, size, "%s", path) >= size) return 0;
    } else {
        if (getcwd(cwd, sizeof cwd) == NULL) return 0;
        if ((size_t)snprintf(out, size, "%s/%s", strcmp(cwd, "/") == 0 ? "" : cwd, path) >= size) return 0;
    }
    size_t n = strlen(out);
    if (n < 2 || out[n - 1] == '/' || strstr(out, "//") || strstr(out, "/./") || strstr(out, "/../")) return 0;
    if ((n >= 2 && strcmp(out + n - 2, "/.") == 0) || (n >= 3 && strcmp(out + n - 3, "/..") == 0)) return 0;
    return 1;
}

/* Nanoseconds since the epoch, as Python's st_mtime_ns; 0 when they do not fit a long long (after 2262). */
static int mtime_ns(const struct stat *st, long long *out) {
    if (st->st_mtim.tv_sec > 9200000000LL || st->st_mtim.tv_sec < -9200000000LL) return 0;
    *out = (long long)st->st_mtim.tv_sec * 1000000000LL + st->st_mtim.tv_nsec;
    return 1;
}

/* A file's device, inode, size and modification time in ns, joined by ``sep``, as pgdr.walpush.file_stamp
   (sep ' ') and pgdr.fast.identity (sep '.') write them; 0 when the time does not fit (see mtime_ns). */
static int stat_text(const struct stat *st, char sep, char *out, size_t size) {
    long long ns;
    if (!mtime_ns(st, &ns)) return 0;
    snprintf(out, size, "%llu%c%llu%c%lld%c%lld", (unsigned long long)st->st_dev, sep,
             (unsigned long long)st->st_ino, sep, (long long)st->st_size, sep, ns);
    return 1;
}

static int plain_ascii(const char *s) {
    for (; *s; s++)
        if ((unsigned char)*s < 0x20 || (unsigned char)*s > 0x7e) return 0;
    return 1;
}

/* A whole number 0..MAX_PARALLEL written in digits only, else -1. */
static int parse_parallel(const char *s) {
    if (s == NULL) return 4;
    if (*s == '\0' || strlen(s) > 3) return -1;
    for (const char *p = s; *p; p++)
        if (*p < '0' || *p > '9') return -1;
    int v = atoi(s);
    return v <= MAX_PARALLEL ? v : -1;
}

/* Seconds in (0, 3600] written as digits with at most one point, else -1. */
static double parse_timeout(const char *s) {
    if (s == NULL) return DEFAULT_TIMEOUT;
    int points = 0, digits = 0;
    for (const char *p = s; *p; p++) {
        if (*p == '.') points++;
        else if (*p >= '0' && *p <= '9') digits++;
        else return -1;
    }
    if (!digits || points > 1 || strlen(s) > 32) return -1;
    double v = strtod(s, NULL);
    return isfinite(v) && v > 0 && v <= 3600 ? v : -1;
}

/* Read at most BUF - 1 bytes of a small file; -1 (errno set) when it cannot be read or is larger. */
static ssize_t read_small(const char *path, char *buf) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t total = 0, n;
    while ((n = read(fd, buf + total, BUF - 1 - total)) > 0) total += n;
    int saved = errno;
    close(fd);
    if (n < 0 || total >= BUF - 1) {
        errno = n < 0 ? saved : EFBIG;
        return -1;
    }
    buf[total] = '\0';
    return total;
}

enum ack { ACK_NONE, ACK_OURS, ACK_OTHER };

/* pgdr.walpush.Ack.read: the magic line, then who, stamp, sha256, key ('\n'-separated, as Python's split).
   Ours when who and stamp match; another's (or unreadable) otherwise, which the full command sorts out. */
static enum ack read_ack(const char *path, const char *who, const char *stamp, char *key, size_t key_size) {
    char buf[BUF];
    ssize_t len = read_small(path, buf);
    if (len < 0) return errno == ENOENT ? ACK_NONE : ACK_OTHER;
    for (ssize_t i = 0; i < len; i++) /* Python reads it as UTF-8 text: anything but ASCII is its to judge */
        if (buf[i] == '\0' || (unsigned char)buf[i] >= 0x80) return ACK_OTHER;
    char *lines[5], *p = buf;
    for (int i = 0; i < 5; i++) {
        if (p == NULL) return ACK_OTHER; /* fewer than five lines */
        lines[i] = p;
        char *nl = strchr(p, '\n');
        if (nl) *nl = '\0';
        p = nl ? nl + 1 : NULL;
    }
    if (strcmp(lines[0], ACK_MAGIC) != 0 || strcmp(lines[1], who) != 0 || strcmp(lines[2], stamp) != 0)
        return ACK_OTHER;
    snprintf(key, key_size, "%s", lines[4]);
    return ACK_OURS;
}

enum holder { NO_PUSHER, OUR_PUSHER, OTHER_PUSHER };

/* pgdr.fast.lock_holder + holder_identity: who holds the pusher's flock ("pid\nidentity\n"). A pusher that
   has not written its identity yet is taken for ours: the call waits, as the Python call does. */
static enum holder pusher(const char *lock, const char *who) {
    int fd = open(lock, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return NO_PUSHER;
    if (flock(fd, LOCK_SH | LOCK_NB) == 0) {
        close(fd);
        return NO_PUSHER;
    }
    char buf[4097];
    ssize_t n = pread(fd, buf, 4096, 0);
    close(fd);
    if (n < 0) return OTHER_PUSHER;
    buf[n] = '\0';
    char *first = strchr(buf, '\n');
    char *second = first ? strchr(first + 1, '\n') : NULL;
    if (second == NULL) return OUR_PUSHER; /* starting: identity not written yet */
    *second = '\0';
    return strcmp(first + 1, who) == 0 ? OUR_PUSHER : OTHER_PUSHER;
}

int main(int argc __attribute__((unused)), char **argv) {
    g_argv = argv;
    const char *cluster = NULL, *config = NULL, *parallel_arg = NULL, *batch_arg = NULL, *timeout_arg = NULL;
    const char *positional[3];
    int npos = 0, quiet = 0;

    /* pgdr.fast.parse: [--config C] [-q] wal-push --cluster X [--parallel N] [--timeout S] PATH */
    for (int i = 1; argv[i]; i++) {
        const char *a = argv[i];
        const char *eq = strchr(a, '=');
        size_t nl = eq ? (size_t)(eq - a) : strlen(a);
        const char **slot = NULL;
        if (nl == 8 && strncmp(a, "--config", nl) == 0) slot = &config;
        else if (nl == 9 && strncmp(a, "--cluster", nl) == 0) slot = &cluster;
        else if (nl == 10 && strncmp(a, "--parallel", nl) == 0) slot = &parallel_arg;
        else if (nl == 7 && strncmp(a, "--batch", nl) == 0) slot = &batch_arg;
        else if (nl == 9 && strncmp(a, "--timeout", nl) == 0) slot = &timeout_arg;
        if (slot) {
            if (eq) *slot = eq + 1;
            else if (argv[i + 1]) *slot = argv[++i];
            else full_command();
        } else if (strcmp(a, "-q") == 0 || strcmp(a, "--quiet") == 0) {
            quiet = 1;
        } else if (a[0] == '-') {
            full_command(); /* --json, --help, anything this front does not know */
        } else if (npos < 3) {
            positional[npos++] = a;
        } else {
            full_command();
        }
    }
    if (npos != 2 || strcmp(positional[0], "wal-push") != 0 || cluster == NULL || *cluster == '\0')
        full_command();
    int parallel = parse_parallel(parallel_arg ? parallel_arg : batch_arg);
    double timeout = parse_timeout(timeout_arg);
    if (parallel <= 0 || timeout < 0) full_command(); /* --parallel 0, or a usage error the CLI reports */

    /* The file: in pg_wal, owned by this user (the server's), marked ready; its name a WAL file name. */
    char path[PATH_MAX], pg_wal[PATH_MAX], buf[PATH_MAX + 64];
    if (!absolute(positional[1], path, sizeof path)) full_command();
    char *slash = strrchr(path, '/');
    const char *name = slash + 1;
    if (!is_wal_file_name(name)) full_command();
    snprintf(pg_wal, sizeof pg_wal, "%.*s", (int)(slash - path), path);
    const char *dir_name = strrchr(pg_wal, '/');
    if (dir_name == NULL || strcmp(dir_name + 1, "pg_wal") != 0) full_command();
    struct stat st;
    if (stat(pg_wal, &st) != 0 || st.st_uid != geteuid()) full_command();
    snprintf(buf, sizeof buf, "%s/archive_status/%s.ready", pg_wal, name);
    if (stat(buf, &st) != 0) full_command();

    /* pgdr.walpush._unsafe_here: a postmaster as PID 1, or a nearly full disk: the full command decides. */
    snprintf(buf, sizeof buf, "%.*s/postmaster.pid", (int)(dir_name - pg_wal), pg_wal);
    FILE *pid_file = fopen(buf, "re");
    if (pid_file) { /* its first line: a PID in digits, and not 1; anything else is the full command's to judge */
        char first[32] = "";
        char *got = fgets(first, sizeof first, pid_file);
        fclose(pid_file);
        size_t digits = got ? strspn(first, "0123456789") : 0;
        if (got && (digits == 0 || digits > 10 || first[digits] != '\n' || strcmp(first, "1\n") == 0))
            full_command();
    }
    struct statvfs vfs;
    if (statvfs(pg_wal, &vfs) != 0 || (long long)vfs.f_bavail * (long long)vfs.f_frsize < MIN_FREE) full_command();

    /* pgdr.walpush.file_stamp: device, inode, size, modification time in ns. */
    char stamp[128];
    if (stat(path, &st) != 0 || !stat_text(&st, ' ', stamp, sizeof stamp)) full_command();

    /* pgdr.fast.identity: cluster|configuration path|its device.inode.size.mtime_ns ("?" when missing). Only
       a configuration named on the command line or in PGDR_CONFIG; the default places are the CLI's to find. */
    if (config == NULL || *config == '\0') config = getenv("PGDR_CONFIG");
    if (config == NULL || *config == '\0') full_command();
    char config_path[PATH_MAX], version[128], who[2 * PATH_MAX];
    if (!absolute(config, config_path, sizeof config_path)) full_command();
    if (stat(config_path, &st) != 0)
        snprintf(version, sizeof version, "?");
    else if (!stat_text(&st, '.', version, sizeof version))
        full_command();
    if ((size_t)snprintf(who, sizeof who, "%s|%s|%s", cluster, config_path, version) >= sizeof who) full_command();
    if (!plain_ascii(who)) full_command();

    char spool[PATH_MAX + 16], ok[PATH_MAX + 64], error[PATH_MAX + 64], lock[PATH_MAX + 32], key[BUF];
    snprintf(spool, sizeof spool, "%s/%s", pg_wal, SPOOL_DIR);
    if (stat(spool, &st) != 0 || !S_ISDIR(st.st_mode)) full_command(); /* no pusher yet: it starts one */
    snprintf(ok, sizeof ok, "%s/%s.ok", spool, name);
    snprintf(error, sizeof error, "%s/%s.error", spool, name);
    snprintf(lock, sizeof lock, "%s/pusher.lock", spool);

    double deadline = now() + timeout, next_look = 0, pause = 0.001;
    for (;;) {
        enum ack ack = read_ack(ok, who, stamp, key, sizeof key);
        if (ack == ACK_OURS) {
            unlink(ok);
            if (!quiet) fprintf(stderr, "pgdr: %s archived by the push queue (%s)\n", name, key);
            return 0;
        }
        /* Another's acknowledgement (the full command waits for the pusher to replace it), or a failure to report */
        if (ack == ACK_OTHER || access(error, F_OK) == 0) full_command();
        double t = now();
        if (t >= next_look) {
            next_look = t + 0.1;
            if (pusher(lock, who) != OUR_PUSHER) full_command(); /* none, or another configuration's */
        }
        if (t >= deadline) {
            fprintf(stderr, "pgdr: %s not archived by the push queue within %g s (see %s/pusher.log); PostgreSQL "
                    "will retry\n", name, timeout, spool);
            return 1;
        }
        struct timespec ts = {0, (long)(pause * 1e9)};
        nanosleep(&ts, NULL);
        pause = pause * 1.5 < 0.003 ? pause * 1.5 : 0.003;
    }
}
