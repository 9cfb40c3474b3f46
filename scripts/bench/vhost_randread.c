/* A guest-side 4 KiB random reader for scripts/bench/vhost.sh (fio's job at
 * QD 32 without fio's dependencies): Linux native AIO with O_DIRECT on a block
 * device, QD requests kept in flight at random aligned offsets. Prints
 * "READER-START" after the warm-up, then "READER-END ops=N secs=S" after the
 * measured window, and checks every read came back whole and holds its
 * block's number in its first 8 bytes (the host writes the data so); with
 * "zero" (a null device that reads as zeroes), that its first 8 bytes, set to
 * a marker before each read, came back zero.
 *
 *   randread DEV QD WARMUP_S SECS [BS [zero]]
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <linux/fs.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static uint64_t rng = 88172645463325252ull;
static uint64_t next(void) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return rng; }

int main(int argc, char **argv) {
    if (argc < 5) { fprintf(stderr, "usage: randread DEV QD WARMUP_S SECS [BS [zero]]\n"); return 2; }
    int qd = atoi(argv[2]);
    double warm = atof(argv[3]), secs = atof(argv[4]);
    long bs = argc > 5 ? atol(argv[5]) : 4096;
    int zero = argc > 6 && argv[6][0] == 'z';
    const uint64_t marker = 0x5a5a5a5a5a5a5a5aull;
    int fd = open(argv[1], O_RDONLY | O_DIRECT);
    if (fd < 0) { perror("open"); return 1; }
    uint64_t size = 0;
    if (ioctl(fd, BLKGETSIZE64, &size) < 0 || size < (uint64_t)bs) { perror("size"); return 1; }
    uint64_t blocks = size / bs;
    aio_context_t ctx = 0;
    if (syscall(SYS_io_setup, qd, &ctx) < 0) { perror("io_setup"); return 1; }
    struct iocb *cbs = calloc(qd, sizeof(*cbs));
    struct iocb **ptrs = calloc(qd, sizeof(*ptrs));
    struct io_event *ev = calloc(qd, sizeof(*ev));
    char *buf;
    if (posix_memalign((void **)&buf, 4096, (size_t)qd * bs)) return 1;
    for (int i = 0; i < qd; i++) {
        cbs[i].aio_fildes = fd;
        cbs[i].aio_lio_opcode = IOCB_CMD_PREAD;
        cbs[i].aio_buf = (uint64_t)(uintptr_t)(buf + (size_t)i * bs);
        cbs[i].aio_nbytes = bs;
        cbs[i].aio_offset = (next() % blocks) * bs;
        cbs[i].aio_data = i;
        if (zero) *(uint64_t *)(buf + (size_t)i * bs) = marker;
        ptrs[i] = &cbs[i];
    }
    if (syscall(SYS_io_submit, ctx, qd, ptrs) != qd) { perror("io_submit"); return 1; }
    double t0 = now(), start = 0;
    long ops = 0, started = 0;
    for (;;) {
        int n = syscall(SYS_io_getevents, ctx, 1, qd, ev, NULL);
        if (n < 0) { perror("io_getevents"); return 1; }
        for (int k = 0; k < n; k++) {
            if (ev[k].res != bs) { fprintf(stderr, "READER-ERROR res=%lld\n", (long long)ev[k].res); return 1; }
            struct iocb *cb = &cbs[ev[k].data];
            uint64_t got = *(uint64_t *)(uintptr_t)cb->aio_buf;
            if (got != (zero ? 0 : cb->aio_offset / bs)) {
                fprintf(stderr, "READER-ERROR block %llu holds %llu\n",
                        (unsigned long long)(cb->aio_offset / bs), (unsigned long long)got);
                return 1;
            }
            cb->aio_offset = (next() % blocks) * bs;
            if (zero) *(uint64_t *)(uintptr_t)cb->aio_buf = marker;
            ptrs[k] = cb;
        }
        double t = now();
        if (started) ops += n;
        if (!started && t - t0 >= warm) { started = 1; start = t; printf("READER-START\n"); fflush(stdout); }
        if (started && t - start >= secs) {
            printf("READER-END ops=%ld secs=%.3f iops=%.0f\n", ops, t - start, ops / (t - start));
            fflush(stdout);
            return 0;
        }
        if (syscall(SYS_io_submit, ctx, n, ptrs) != n) { perror("io_submit"); return 1; }
    }
}
