// c_echo: the lesson's selectors server in C, straight on epoll, for `deno task
// bench` to measure main.ts's epoll selector against the same system calls
// without a runtime: level-triggered, nonblocking, one read and one write per
// event. What a write leaves unsent waits in a buffer of its own for EPOLLOUT,
// and the connection reads nothing more meanwhile (backpressure).
//
//	cc -O2 -o bench/.bin/c_echo bench/peers/c_echo.c
//	bench/.bin/c_echo PORT
//
// A measuring peer, not a server to deploy: out of descriptors it accepts
// again on every turn (main.ts backs off), and it runs until it is killed.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define READ_SIZE (64 * 1024)
#define MAX_EVENTS 512
#define MAX_FD 65536

// What a write left unsent, per descriptor: data is NULL while nothing waits.
struct pending {
  char *data;
  size_t off, len;
};
static struct pending pending[MAX_FD];
static int epoll_fd;

static void watch(int op, int fd, unsigned events) {
  struct epoll_event event = {.events = events, .data.fd = fd};
  epoll_ctl(epoll_fd, op, fd, &event);
}

// Closes a connection (which also takes it out of the epoll set) and drops what it had queued.
static void drop(int fd) {
  free(pending[fd].data);
  pending[fd].data = NULL;
  close(fd);
}

// Writes what the socket takes; the rest waits for EPOLLOUT, and reading stops until it is written.
static void send_all(int fd, const char *data, size_t len) {
  ssize_t written = write(fd, data, len);
  if (written == (ssize_t)len) return;
  if (written < 0) {
    if (errno != EAGAIN) return drop(fd); // a reset, a broken pipe: this connection only
    written = 0;
  }
  struct pending *p = &pending[fd];
  p->len = len - written;
  p->off = 0;
  p->data = malloc(p->len);
  if (!p->data) return drop(fd);
  memcpy(p->data, data + written, p->len);
  watch(EPOLL_CTL_MOD, fd, EPOLLOUT);
}

// EPOLLOUT (or an error): writes more of what waits; once all is written, reads again.
static void flush(int fd) {
  struct pending *p = &pending[fd];
  ssize_t written = write(fd, p->data + p->off, p->len - p->off);
  if (written < 0) {
    if (errno != EAGAIN) drop(fd);
    return;
  }
  p->off += written;
  if (p->off < p->len) return;
  free(p->data);
  p->data = NULL;
  watch(EPOLL_CTL_MOD, fd, EPOLLIN);
}

// The accept callback: takes every connection waiting.
static void accept_all(int listener) {
  for (;;) {
    int fd = accept4(listener, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == ECONNABORTED || errno == EINTR) continue;
      return; // EAGAIN: none left; EMFILE and the like: again next turn
    }
    if (fd >= MAX_FD) {
      close(fd);
      continue;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    watch(EPOLL_CTL_ADD, fd, EPOLLIN);
  }
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: c_echo PORT\n");
    return 2;
  }
  int listener = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  int one = 1;
  setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in addr = {
      .sin_family = AF_INET,
      .sin_port = htons((unsigned short)atoi(argv[1])),
      .sin_addr.s_addr = htonl(INADDR_LOOPBACK),
  };
  if (listener < 0 || bind(listener, (struct sockaddr *)&addr, sizeof addr) != 0 ||
      listen(listener, 1024) != 0) {
    perror("c_echo");
    return 1;
  }
  epoll_fd = epoll_create1(EPOLL_CLOEXEC);
  watch(EPOLL_CTL_ADD, listener, EPOLLIN);
  static char buffer[READ_SIZE];
  struct epoll_event events[MAX_EVENTS];
  for (;;) { // the loop: select, then each ready socket's callback
    int n = epoll_wait(epoll_fd, events, MAX_EVENTS, -1);
    if (n < 0 && errno != EINTR) {
      perror("c_echo");
      return 1;
    }
    for (int i = 0; i < n; i++) {
      int fd = events[i].data.fd;
      if (fd == listener) {
        accept_all(listener);
      } else if (pending[fd].data) {
        flush(fd);
      } else { // the read callback: echo what came; EOF or an error closes
        ssize_t got = read(fd, buffer, sizeof buffer);
        if (got > 0) send_all(fd, buffer, (size_t)got);
        else if (got == 0 || (errno != EAGAIN && errno != EINTR)) drop(fd);
      }
    }
  }
}
