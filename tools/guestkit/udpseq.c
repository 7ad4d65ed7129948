/* udpseq: a guest's receiver of `pyvhost serve net --mode source` numbered frames, and a transmitter at once.
 *
 *   udpseq PORT DST_IP DST_PORT PAYLOAD IFACE
 *
 * Receives UDP datagrams on PORT (the guest's stack has verified each UDP checksum: a bad one is dropped and
 * counted in /proc/net/snmp's UdpInCsumErrors, which the test reads).  Each payload must be PAYLOAD bytes:
 * bytes 0..7 the frame's sequence number on its queue (big-endian), the rest zero; anything else is corrupt.
 * A number one above the last is in order; higher leaves a gap (frames dropped: allowed); equal is a repeat;
 * lower is a "back" step -- a new back-end restarting its queue at 0 (allowed only at a migration switchover,
 * which the test checks by where each one happened) or a frame out of order.  Each back step prints a line.
 * Meanwhile it sends numbered datagrams to DST_IP:DST_PORT (the back-end's TX side consumes them).
 * Every 200 ms it prints its counters; when IFACE's carrier goes down (the test's `set_link` over QMP) it
 * prints them a last time with done=1 and exits.  Lines are `RESULT key=value ...` (guestkit parses them).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define REPORT_NS 200000000LL
#define TX_BURST 4
#define MAX_PAYLOAD 9000

static long long now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1000000000LL + t.tv_nsec;
}

static int carrier_up(const char *path) {
  char c = '0';
  int fd = open(path, O_RDONLY);
  if (fd < 0)
    return 0;
  if (read(fd, &c, 1) != 1)
    c = '0';
  close(fd);
  return c == '1';
}

int main(int argc, char **argv) {
  if (argc != 6) {
    fprintf(stderr, "usage: udpseq PORT DST_IP DST_PORT PAYLOAD IFACE\n");
    return 2;
  }
  int port = atoi(argv[1]), dport = atoi(argv[3]);
  long payload = atol(argv[4]);
  if (payload < 8 || payload > MAX_PAYLOAD) {
    fprintf(stderr, "udpseq: PAYLOAD must be 8..%d\n", MAX_PAYLOAD);
    return 2;
  }
  char carrier[256];
  snprintf(carrier, sizeof carrier, "/sys/class/net/%s/carrier", argv[5]);

  int rx = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
  int tx = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
  if (rx < 0 || tx < 0) {
    perror("udpseq: socket");
    return 1;
  }
  int rcvbuf = 4 << 20;
  setsockopt(rx, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(INADDR_ANY)};
  if (bind(rx, (struct sockaddr *)&a, sizeof a) < 0) {
    perror("udpseq: bind");
    return 1;
  }
  struct sockaddr_in d = {.sin_family = AF_INET, .sin_port = htons(dport)};
  if (inet_pton(AF_INET, argv[2], &d.sin_addr) != 1 || connect(tx, (struct sockaddr *)&d, sizeof d) < 0) {
    perror("udpseq: destination");
    return 1;
  }
  printf("RESULT udpseq=ready\n");
  fflush(stdout);

  static unsigned char buf[MAX_PAYLOAD + 1], out[64];
  unsigned long long rxn = 0, gaps = 0, lost = 0, repeats = 0, backs = 0, corrupt = 0, first = 0;
  unsigned long long txn = 0, txfail = 0;
  unsigned long long last = 0;
  int have = 0, done = 0;
  long long next = now_ns() + REPORT_NS;
  struct pollfd p = {.fd = rx, .events = POLLIN};
  while (!done) {
    poll(&p, 1, 10);
    for (;;) {
      ssize_t n = recv(rx, buf, sizeof buf, 0);
      if (n < 0)
        break;
      rxn++;
      int bad = n != payload;
      for (ssize_t i = 8; !bad && i < n; i++)
        bad = buf[i] != 0;
      if (bad) {
        corrupt++;
        continue;
      }
      unsigned long long seq = 0;
      for (int i = 0; i < 8; i++)
        seq = seq << 8 | buf[i];
      if (!have) {
        first = seq;
        have = 1;
      } else if (seq == last + 1) {
      } else if (seq > last) {
        gaps++;
        lost += seq - last - 1;
      } else if (seq == last) {
        repeats++;
      } else {
        backs++;
        lost += seq; /* if it is a restart, the new stream's frames before this one */
        printf("RESULT back=%llu back_seq=%llu back_last=%llu back_rx=%llu\n", backs, seq, last, rxn);
        fflush(stdout);
      }
      last = seq;
    }
    for (int i = 0; i < TX_BURST; i++) {
      memset(out, 0, sizeof out);
      for (int j = 0; j < 8; j++)
        out[j] = (unsigned char)(txn >> (56 - 8 * j));
      if (send(tx, out, sizeof out, 0) == (ssize_t)sizeof out)
        txn++;
      else
        txfail++;
    }
    long long t = now_ns();
    if (t >= next) {
      done = !carrier_up(carrier);
      printf("RESULT rx=%llu first=%llu last=%llu gaps=%llu lost=%llu repeats=%llu backs=%llu corrupt=%llu "
             "tx=%llu txfail=%llu%s\n",
             rxn, first, last, gaps, lost, repeats, backs, corrupt, txn, txfail, done ? " done=1" : "");
      fflush(stdout);
      next = t + REPORT_NS;
    }
  }
  return 0;
}
