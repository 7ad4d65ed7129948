/* udpseq: a guest's receiver of `pyvhost serve net --mode source` numbered frames, and a transmitter at once.
 *
 *   udpseq IFACE PORT DST_IP DST_PORT FRAME_HEX
 *
 * Reads every frame IFACE's driver receives (AF_PACKET, whatever its content: a stale or torn buffer is seen
 * too, not dropped unseen by the stack) and checks it against FRAME_HEX, the source's frame: the same length
 * and bytes except the UDP checksum and the sequence number (UDP payload bytes 0..7, big-endian), and a valid
 * UDP checksum; anything else is corrupt.  (The guest's stack verifies the checksums as well -- UdpInCsumErrors
 * in /proc/net/snmp, which the test reads -- and a UDP socket bound to PORT, never read, keeps it from
 * answering each frame with an ICMP port unreachable.)  A number one above the last is in order; higher leaves
 * a gap (frames dropped: allowed); equal is a repeat; lower is a "back" step -- a new back-end restarting its
 * queue at 0 (allowed only at a migration switchover, which the test checks by where each one happened) or a
 * frame out of order.  Each back step and each of the first corrupt frames prints a line.
 * Meanwhile it sends numbered datagrams to DST_IP:DST_PORT (the back-end's TX side consumes them).
 * Every 200 ms it prints its counters (drops: frames the packet socket had no room for); when IFACE's carrier goes down (the test's `set_link` over QMP) it
 * prints them a last time with done=1 and exits.  Lines are `RESULT key=value ...` (guestkit parses them).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <net/if.h>
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
#define MAX_FRAME 9000
/* the frame's UDP header, checksum and sequence number (devices/net_frame.py), and its IPv4 addresses */
#define IP_ADDRS_OFF 26
#define UDP_OFF 34
#define UDP_CSUM_OFF 40
#define SEQ_OFF 42
#define SEQ_LEN 8
#define IPPROTO_UDP_NUM 17
#define SHOW_CORRUPT 5

static long long now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* RFC 768: the one's complement sum of the pseudo-header, the UDP header and the payload folds to 0xffff */
static int udp_checksum_ok(const unsigned char *f, long n) {
  if (n < SEQ_OFF + SEQ_LEN)
    return 0;
  long ulen = f[UDP_OFF + 4] << 8 | f[UDP_OFF + 5];
  if (ulen < 8 || UDP_OFF + ulen > n)
    return 0;
  unsigned long s = IPPROTO_UDP_NUM + ulen;
  for (int o = IP_ADDRS_OFF; o < UDP_OFF; o += 2)
    s += f[o] << 8 | f[o + 1];
  long o = UDP_OFF;
  for (; o + 1 < UDP_OFF + ulen; o += 2)
    s += f[o] << 8 | f[o + 1];
  if (o < UDP_OFF + ulen)
    s += f[o] << 8;
  while (s >> 16)
    s = (s & 0xffff) + (s >> 16);
  return s == 0xffff;
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
    fprintf(stderr, "usage: udpseq IFACE PORT DST_IP DST_PORT FRAME_HEX\n");
    return 2;
  }
  int port = atoi(argv[2]), dport = atoi(argv[4]);
  static unsigned char want[MAX_FRAME], buf[MAX_FRAME + 1], out[64];
  long flen = (long)strlen(argv[5]) / 2;
  if (flen < SEQ_OFF + SEQ_LEN || flen > MAX_FRAME) {
    fprintf(stderr, "udpseq: FRAME_HEX must be %d..%d bytes\n", SEQ_OFF + SEQ_LEN, MAX_FRAME);
    return 2;
  }
  for (long i = 0; i < flen; i++)
    sscanf(argv[5] + 2 * i, "%2hhx", &want[i]);
  char carrier[256];
  snprintf(carrier, sizeof carrier, "/sys/class/net/%s/carrier", argv[1]);

  int rx = socket(AF_PACKET, SOCK_RAW | SOCK_NONBLOCK, htons(ETH_P_ALL));
  int udp = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
  int tx = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
  if (rx < 0 || udp < 0 || tx < 0) {
    perror("udpseq: socket");
    return 1;
  }
  int rcvbuf = 4 << 20;
  setsockopt(rx, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
  struct sockaddr_ll ll = {.sll_family = AF_PACKET, .sll_protocol = htons(ETH_P_ALL)};
  ll.sll_ifindex = (int)if_nametoindex(argv[1]);
  if (ll.sll_ifindex == 0 || bind(rx, (struct sockaddr *)&ll, sizeof ll) < 0) {
    perror("udpseq: bind to the interface");
    return 1;
  }
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(INADDR_ANY)};
  if (bind(udp, (struct sockaddr *)&a, sizeof a) < 0) {
    perror("udpseq: bind");
    return 1;
  }
  struct sockaddr_in d = {.sin_family = AF_INET, .sin_port = htons(dport)};
  if (inet_pton(AF_INET, argv[3], &d.sin_addr) != 1 || connect(tx, (struct sockaddr *)&d, sizeof d) < 0) {
    perror("udpseq: destination");
    return 1;
  }
  printf("RESULT udpseq=ready\n");
  fflush(stdout);

  unsigned long long rxn = 0, gaps = 0, lost = 0, repeats = 0, backs = 0, corrupt = 0, first = 0;
  unsigned long long txn = 0, txfail = 0, drops = 0;
  unsigned long long last = 0;
  int have = 0, done = 0;
  long long next = now_ns() + REPORT_NS;
  struct pollfd p = {.fd = rx, .events = POLLIN};
  while (!done) {
    poll(&p, 1, 10);
    for (;;) {
      struct sockaddr_ll from;
      socklen_t fl = sizeof from;
      ssize_t n = recvfrom(rx, buf, sizeof buf, MSG_TRUNC, (struct sockaddr *)&from, &fl);
      if (n < 0)
        break;
      if (from.sll_pkttype == PACKET_OUTGOING)
        continue;
      rxn++;
      int bad = n != flen || !udp_checksum_ok(buf, n);
      for (long i = 0; !bad && i < n; i++)
        bad = (i < UDP_CSUM_OFF || i >= SEQ_OFF + SEQ_LEN) && buf[i] != want[i];
      if (bad) {
        if (++corrupt <= SHOW_CORRUPT) {
          printf("RESULT corrupt_len=%ld corrupt_rx=%llu corrupt_head=", (long)n, rxn);
          for (long i = 0; i < n && i < 64; i++)
            printf("%02x", buf[i]);
          printf("\n");
          fflush(stdout);
        }
        continue;
      }
      unsigned long long seq = 0;
      for (int i = 0; i < SEQ_LEN; i++)
        seq = seq << 8 | buf[SEQ_OFF + i];
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
      struct tpacket_stats st;
      socklen_t sl = sizeof st;
      if (getsockopt(rx, SOL_PACKET, PACKET_STATISTICS, &st, &sl) == 0) /* (reading resets them) */
        drops += st.tp_drops;
      printf("RESULT rx=%llu first=%llu last=%llu gaps=%llu lost=%llu repeats=%llu backs=%llu corrupt=%llu "
             "drops=%llu tx=%llu txfail=%llu%s\n",
             rxn, first, last, gaps, lost, repeats, backs, corrupt, drops, txn, txfail, done ? " done=1" : "");
      fflush(stdout);
      next = t + REPORT_NS;
    }
  }
  return 0;
}
