/* vsockcat CID PORT | vsockcat -l PORT: a guest's vsock client for the VM tests (busybox has none).  Connects to
 * CID:PORT (or accepts one connection on PORT, saying "listening" on stderr first), copies stdin to the socket,
 * shuts the write side at stdin's end, and copies the socket to stdout until its end.
 * Built static by the test (gcc -static) and put in the guest's initramfs. */
#include <linux/vm_sockets.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

static int write_all(int fd, const char *p, ssize_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w <= 0) return -1;
        p += w;
        n -= w;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: vsockcat CID PORT | vsockcat -l PORT\n");
        return 2;
    }
    int listening = argv[1][0] == '-';
    struct sockaddr_vm a = {0};
    a.svm_family = AF_VSOCK;
    a.svm_cid = listening ? VMADDR_CID_ANY : (unsigned)strtoul(argv[1], NULL, 10);
    a.svm_port = (unsigned)strtoul(argv[2], NULL, 10);
    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (s < 0) {
        perror("vsockcat: socket");
        return 1;
    }
    if (listening) {
        if (bind(s, (struct sockaddr *)&a, sizeof a) < 0 || listen(s, 1) < 0) {
            perror("vsockcat: listen");
            return 1;
        }
        fprintf(stderr, "listening\n");
        int c = accept(s, NULL, NULL);
        if (c < 0) {
            perror("vsockcat: accept");
            return 1;
        }
        close(s);
        s = c;
    } else if (connect(s, (struct sockaddr *)&a, sizeof a) < 0) {
        perror("vsockcat: connect");
        return 1;
    }
    static char buf[65536];
    int in_open = 1;
    for (;;) {
        struct pollfd p[2] = {{in_open ? 0 : -1, POLLIN, 0}, {s, POLLIN, 0}};
        if (poll(p, 2, -1) < 0) return 1;
        if (p[0].revents) {
            ssize_t n = read(0, buf, sizeof buf);
            if (n <= 0) {
                shutdown(s, SHUT_WR);
                in_open = 0;
            } else if (write_all(s, buf, n) < 0) {
                perror("vsockcat: send");
                return 1;
            }
        }
        if (p[1].revents) {
            ssize_t n = read(s, buf, sizeof buf);
            if (n < 0) {
                perror("vsockcat: recv");
                return 1;
            }
            if (n == 0) break;
            if (write_all(1, buf, n) < 0) return 1;
        }
    }
    close(s);
    return 0;
}
