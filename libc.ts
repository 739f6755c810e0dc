/**
 * The C library through Deno's FFI, for epoll.ts: the system calls of a
 * nonblocking socket server on Linux, their constants, `errno` as Deno's error
 * classes, and socket addresses in and out of C structs.
 *
 * Memory safety: every pointer handed to C is a typed array, and every call
 * that writes through one is given that array's length. Sizes go to C as
 * bigints (`usize`), and results come back as `i32` (a byte count or -1), so
 * no call allocates a bigint for its result.
 *
 * Linux on x86_64 and aarch64 only: the constants below are Linux's, and
 * `struct epoll_event` is 12 bytes (packed) on x86_64 and 16 on aarch64.
 *
 * @module
 */

/** Why this machine cannot use libc.ts, or undefined if it can. */
export function unsupported(): string | undefined {
  if (Deno.build.os !== "linux") return `it needs Linux, not ${Deno.build.os}`;
  if (Deno.build.arch !== "x86_64" && Deno.build.arch !== "aarch64") {
    return `it knows Linux on x86_64 and aarch64, not on ${Deno.build.arch}`;
  }
}

// Linux's constants (the same on x86_64 and aarch64).
export const AF_UNIX = 1, AF_INET = 2, AF_INET6 = 10;
export const SOCK_STREAM = 1, SOCK_DGRAM = 2;
const SOCK_NONBLOCK = 0o4000, SOCK_CLOEXEC = 0o2000000, CLOCK_MONOTONIC = 1;
export const SOL_SOCKET = 1, SO_REUSEADDR = 2, SO_REUSEPORT = 15;
export const IPPROTO_TCP = 6, TCP_NODELAY = 1;
export const SHUT_WR = 1;
export const EPOLLIN = 0x1, EPOLLOUT = 0x4, EPOLLERR = 0x8, EPOLLHUP = 0x10;
export const EPOLL_CTL_ADD = 1, EPOLL_CTL_DEL = 2, EPOLL_CTL_MOD = 3;
export const EAGAIN = 11, EINTR = 4, EMFILE = 24, ENFILE = 23, ENOBUFS = 105, ENOMEM = 12;
export const ECONNABORTED = 103, EPROTO = 71, ENOENT = 2;

/** `struct epoll_event`: u32 events, then u64 data, packed on x86_64 only. */
export const EVENT_SIZE = Deno.build.arch === "x86_64" ? 12 : 16;
/** Where an event's data (the fd, here) starts. */
export const EVENT_DATA = Deno.build.arch === "x86_64" ? 4 : 8;

const SYMBOLS = {
  epoll_create1: { parameters: ["i32"], result: "i32" },
  epoll_ctl: { parameters: ["i32", "i32", "i32", "buffer"], result: "i32" },
  epoll_wait: { parameters: ["i32", "buffer", "i32", "i32"], result: "i32" },
  /** The same call on a thread of Deno's pool, so that Deno's own loop runs meanwhile. */
  epoll_wait_nonblocking: {
    name: "epoll_wait",
    parameters: ["i32", "buffer", "i32", "i32"],
    result: "i32",
    nonblocking: true,
  },
  eventfd: { parameters: ["u32", "i32"], result: "i32" },
  timerfd_create: { parameters: ["i32", "i32"], result: "i32" },
  timerfd_settime: { parameters: ["i32", "i32", "buffer", "pointer"], result: "i32" },
  /** Sleeps on a thread of Deno's pool: Deno's runtime parks meanwhile. */
  usleep_nonblocking: {
    name: "usleep",
    parameters: ["u32"],
    result: "i32",
    nonblocking: true,
  },
  read: { parameters: ["i32", "buffer", "usize"], result: "i32" },
  write: { parameters: ["i32", "buffer", "usize"], result: "i32" },
  close: { parameters: ["i32"], result: "i32" },
  socket: { parameters: ["i32", "i32", "i32"], result: "i32" },
  bind: { parameters: ["i32", "buffer", "u32"], result: "i32" },
  listen: { parameters: ["i32", "i32"], result: "i32" },
  accept4: { parameters: ["i32", "buffer", "buffer", "i32"], result: "i32" },
  setsockopt: { parameters: ["i32", "i32", "i32", "buffer", "u32"], result: "i32" },
  getsockname: { parameters: ["i32", "buffer", "buffer"], result: "i32" },
  shutdown: { parameters: ["i32", "i32"], result: "i32" },
  recvfrom: {
    parameters: ["i32", "buffer", "usize", "i32", "buffer", "buffer"],
    result: "i32",
  },
  sendto: { parameters: ["i32", "buffer", "usize", "i32", "buffer", "u32"], result: "i32" },
  __errno_location: { parameters: [], result: "pointer" },
  strerror: { parameters: ["i32"], result: "pointer" },
} as const;

type Symbols = Deno.DynamicLibrary<typeof SYMBOLS>["symbols"];

/** The room a socket address can take (`struct sockaddr_un` is the largest), and its length. */
const ADDR_SIZE = 112;

/**
 * The system calls epoll.ts makes, each returning what C returns (-1 on
 * failure, with the reason in {@linkcode Libc.errno}).
 */
export class Libc {
  readonly #library: Deno.DynamicLibrary<typeof SYMBOLS>;
  readonly #c: Symbols;
  readonly #errno: Deno.PointerObject;
  /** One `struct epoll_event` for epoll_ctl(). */
  readonly #event = new Uint8Array(EVENT_SIZE);
  readonly #eventView = new DataView(this.#event.buffer);
  /** A `socklen_t` for the calls that fill in an address, and the address. */
  readonly #addrLen = new Uint32Array(1);
  readonly #addrLenBytes = new Uint8Array(this.#addrLen.buffer);
  /** The address the last accept(), recvfrom() or sockname() filled in. */
  readonly addr = new Uint8Array(ADDR_SIZE);
  /** A `struct itimerspec` (interval, then first expiry; seconds and nanoseconds in 64 bits each). */
  readonly #timerSpec = new BigInt64Array(4);
  readonly #timerSpecBytes = new Uint8Array(this.#timerSpec.buffer);
  /** One int, for setsockopt(). */
  readonly #int = new Uint8Array(4);
  /** The last sizes passed to C, and the same as bigints (see #size). */
  readonly #sizes = [-1, -1, -1, -1, -1, -1, -1, -1];
  readonly #bigSizes = [0n, 0n, 0n, 0n, 0n, 0n, 0n, 0n];

  /**
   * Opens the C library.
   *
   * @throws {Deno.errors.NotCapable} Without `--allow-ffi`.
   */
  constructor() {
    this.#library = Deno.dlopen("libc.so.6", SYMBOLS);
    this.#c = this.#library.symbols;
    this.#errno = this.#c.__errno_location()!;
  }

  /** Unloads the library: no call may be made, or be under way on another thread, after. */
  unload(): void {
    this.#library.close();
  }

  /** The error number of the last call that failed: read it before any other call. */
  errno(): number {
    return new Deno.UnsafePointerView(this.#errno).getInt32();
  }

  /** The C library's text for an error number. */
  describe(errno: number): string {
    const text = this.#c.strerror(errno);
    return text ? Deno.UnsafePointerView.getCString(text) : `error ${errno}`;
  }

  epollCreate(): number {
    return this.#c.epoll_create1(SOCK_CLOEXEC);
  }

  /** Adds, changes or removes `fd` in an epoll set, for `events`; the event's data is `fd`. */
  epollCtl(epoll: number, op: number, fd: number, events: number): number {
    this.#eventView.setUint32(0, events, true);
    this.#eventView.setUint32(EVENT_DATA, fd, true);
    return this.#c.epoll_ctl(epoll, op, fd, this.#event);
  }

  /** Waits for events into `events` (EVENT_SIZE bytes each), on this thread. */
  epollWait(epoll: number, events: Uint8Array, timeout: number): number {
    return this.#c.epoll_wait(epoll, events, events.byteLength / EVENT_SIZE, timeout);
  }

  /** Waits on a thread of Deno's pool: Deno's own loop (timers, signals) runs meanwhile. */
  epollWaitAway(epoll: number, events: Uint8Array, timeout: number): Promise<number> {
    return this.#c.epoll_wait_nonblocking(
      epoll,
      events,
      events.byteLength / EVENT_SIZE,
      timeout,
    );
  }

  /** Sleeps `micros` on a thread of Deno's pool, so that Deno's runtime parks meanwhile. */
  pause(micros: number): Promise<number> {
    return this.#c.usleep_nonblocking(micros);
  }

  eventfd(): number {
    return this.#c.eventfd(0, SOCK_NONBLOCK | SOCK_CLOEXEC);
  }

  /** A timer on the monotonic clock whose expiries are epoll events. */
  timerfd(): number {
    return this.#c.timerfd_create(CLOCK_MONOTONIC, SOCK_NONBLOCK | SOCK_CLOEXEC);
  }

  /** Makes a timer expire every `ms` milliseconds (less than 1000) from now; 0 stops it. */
  setTimer(fd: number, ms: number): number {
    const nanos = BigInt(ms * 1_000_000);
    this.#timerSpec.set([0n, nanos, 0n, nanos]);
    return this.#c.timerfd_settime(fd, 0, this.#timerSpecBytes, null);
  }

  read(fd: number, into: Uint8Array): number {
    return this.#c.read(fd, into, this.#size(into.byteLength));
  }

  write(fd: number, bytes: Uint8Array): number {
    return this.#c.write(fd, bytes, this.#size(bytes.byteLength));
  }

  /**
   * `n` as the bigint C's `size_t` takes. A server reads and writes the same
   * few sizes over and over, so the last eight are kept (by their low bits)
   * rather than a bigint made per call, which costs a few percent of the
   * round trips.
   */
  #size(n: number): bigint {
    const slot = n & 7;
    if (this.#sizes[slot] !== n) {
      this.#sizes[slot] = n;
      this.#bigSizes[slot] = BigInt(n);
    }
    return this.#bigSizes[slot];
  }

  close(fd: number): number {
    return this.#c.close(fd);
  }

  /** A nonblocking socket, closed on exec. */
  socket(family: number, type: number): number {
    return this.#c.socket(family, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  }

  setOption(fd: number, level: number, option: number, value: number): number {
    new DataView(this.#int.buffer).setInt32(0, value, true);
    return this.#c.setsockopt(fd, level, option, this.#int, 4);
  }

  bind(fd: number, addr: Uint8Array): number {
    return this.#c.bind(fd, addr, addr.byteLength);
  }

  listen(fd: number, backlog: number): number {
    return this.#c.listen(fd, backlog);
  }

  /** Accepts a connection, nonblocking and closed on exec; its peer's address goes to `addr`. */
  accept(fd: number): number {
    this.#addrLen[0] = ADDR_SIZE;
    return this.#c.accept4(fd, this.addr, this.#addrLenBytes, SOCK_NONBLOCK | SOCK_CLOEXEC);
  }

  /** The socket's own address, into `addr`; returns its length, or -1. */
  sockname(fd: number): number {
    this.#addrLen[0] = ADDR_SIZE;
    const ok = this.#c.getsockname(fd, this.addr, this.#addrLenBytes);
    return ok < 0 ? ok : this.#addrLen[0];
  }

  shutdown(fd: number, how: number): number {
    return this.#c.shutdown(fd, how);
  }

  /** Receives a datagram into `into`; its sender's address goes to `addr`. */
  recvfrom(fd: number, into: Uint8Array): number {
    this.#addrLen[0] = ADDR_SIZE;
    return this.#c.recvfrom(
      fd,
      into,
      this.#size(into.byteLength),
      0,
      this.addr,
      this.#addrLenBytes,
    );
  }

  sendto(fd: number, datagram: Uint8Array, to: Uint8Array): number {
    return this.#c.sendto(fd, datagram, this.#size(datagram.byteLength), 0, to, to.byteLength);
  }
}

/** The error classes Deno gives the error numbers a socket server meets. */
const ERRORS: Record<number, new (message: string) => Error> = {
  1: Deno.errors.PermissionDenied, // EPERM
  2: Deno.errors.NotFound, // ENOENT
  4: Deno.errors.Interrupted, // EINTR
  9: Deno.errors.BadResource, // EBADF
  11: Deno.errors.WouldBlock, // EAGAIN
  13: Deno.errors.PermissionDenied, // EACCES
  17: Deno.errors.AlreadyExists, // EEXIST
  22: Deno.errors.InvalidData, // EINVAL
  32: Deno.errors.BrokenPipe, // EPIPE
  98: Deno.errors.AddrInUse, // EADDRINUSE
  99: Deno.errors.AddrNotAvailable, // EADDRNOTAVAIL
  103: Deno.errors.ConnectionAborted, // ECONNABORTED
  104: Deno.errors.ConnectionReset, // ECONNRESET
  107: Deno.errors.NotConnected, // ENOTCONN
  110: Deno.errors.TimedOut, // ETIMEDOUT
  111: Deno.errors.ConnectionRefused, // ECONNREFUSED
};

/**
 * An error number as Deno reports it: `ConnectionReset: Connection reset by
 * peer (os error 104)`, a plain Error where Deno has no class of its own.
 *
 * @param libc The library, for the error's text.
 * @param errno The error number.
 * @returns The error.
 */
export function osError(libc: Libc, errno: number): Error {
  const ErrorClass = ERRORS[errno] ?? Error;
  return new ErrorClass(`${libc.describe(errno)} (os error ${errno})`);
}

// Socket addresses ==========================================================

/**
 * A numeric address as the bytes of `struct sockaddr_in` or `sockaddr_in6`;
 * `localhost` is 127.0.0.1.
 *
 * @param hostname An IPv4 or IPv6 address, or `localhost`.
 * @param port The port.
 * @returns The C struct, or undefined if `hostname` is not numeric.
 */
export function inetAddr(hostname: string, port: number): Uint8Array | undefined {
  const v4 = parseIPv4(hostname === "localhost" ? "127.0.0.1" : hostname);
  const v6 = v4 ? undefined : parseIPv6(hostname.replace(/^\[(.*)\]$/, "$1"));
  if (!v4 && !v6) return undefined;
  const addr = new Uint8Array(v4 ? 16 : 28);
  const view = new DataView(addr.buffer);
  view.setUint16(0, v4 ? AF_INET : AF_INET6, true);
  view.setUint16(2, port, false); // network byte order
  addr.set(v4 ?? v6!, v4 ? 4 : 8); // sin_addr, or sin6_addr after sin6_flowinfo
  return addr;
}

/**
 * A Unix socket's path as the bytes of `struct sockaddr_un`.
 *
 * @param path The path: at most 107 bytes of UTF-8.
 * @returns The C struct, or undefined if the path is too long.
 */
export function unixAddr(path: string): Uint8Array | undefined {
  const bytes = new TextEncoder().encode(path);
  if (bytes.length > 107 || bytes.includes(0)) return undefined;
  const addr = new Uint8Array(2 + bytes.length + 1); // the path, then a NUL
  new DataView(addr.buffer).setUint16(0, AF_UNIX, true);
  addr.set(bytes, 2);
  return addr;
}

/**
 * An address C filled in, as Deno writes one.
 *
 * @param addr The `struct sockaddr_*` bytes.
 * @param transport For an internet address: `tcp` or `udp`.
 * @returns The address.
 */
export function readAddr(addr: Uint8Array, transport: "tcp" | "udp"): Deno.Addr {
  const view = new DataView(addr.buffer, addr.byteOffset, addr.byteLength);
  const family = view.getUint16(0, true);
  if (family === AF_UNIX) {
    const path = addr.subarray(2, addr.indexOf(0, 2) < 0 ? undefined : addr.indexOf(0, 2));
    return { transport: "unix", path: new TextDecoder().decode(path) };
  }
  const port = view.getUint16(2, false);
  const hostname = family === AF_INET
    ? addr.subarray(4, 8).join(".")
    : formatIPv6(addr.subarray(8, 24));
  return { transport, hostname, port };
}

/** The 4 bytes of a dotted IPv4 address, or undefined. */
function parseIPv4(text: string): Uint8Array | undefined {
  const parts = text.split(".");
  if (parts.length !== 4 || !parts.every((part) => /^(0|[1-9]\d{0,2})$/.test(part))) return;
  const bytes = parts.map(Number);
  return bytes.every((byte) => byte <= 255) ? new Uint8Array(bytes) : undefined;
}

/** The 16 bytes of an IPv6 address in any of RFC 4291's text forms, or undefined. */
function parseIPv6(text: string): Uint8Array | undefined {
  const halves = text.split("::");
  if (halves.length > 2) return;
  const [head, tail] = halves.map((half) => half === "" ? [] : half.split(":"));
  const last = tail ?? head; // the group list that ends the address
  if (last.at(-1)?.includes(".")) { // a dotted IPv4 address ends it: two groups
    const v4 = parseIPv4(last.pop()!);
    if (!v4) return;
    last.push(((v4[0] << 8) | v4[1]).toString(16), ((v4[2] << 8) | v4[3]).toString(16));
  }
  const zeros = 8 - head.length - (tail?.length ?? 0); // the groups "::" stands for
  if (tail ? zeros < 1 : zeros !== 0) return;
  const groups = [...head, ...Array(tail ? zeros : 0).fill("0"), ...(tail ?? [])];
  if (!groups.every((group) => /^[0-9a-f]{1,4}$/i.test(group))) return;
  const bytes = new Uint8Array(16);
  const view = new DataView(bytes.buffer);
  groups.forEach((group, i) => view.setUint16(i * 2, parseInt(group, 16)));
  return bytes;
}

/** An IPv6 address as RFC 5952 writes it (as Deno does): `::1`, `fe80::1`, `::ffff:1.2.3.4`. */
function formatIPv6(bytes: Uint8Array): string {
  const view = new DataView(bytes.buffer, bytes.byteOffset, 16);
  const groups = Array.from({ length: 8 }, (_, i) => view.getUint16(i * 2));
  if (groups.slice(0, 5).every((group) => group === 0) && groups[5] === 0xffff) {
    return `::ffff:${bytes.subarray(12).join(".")}`; // an IPv4-mapped address
  }
  let [best, bestLength] = [-1, 1]; // the longest run of two or more zero groups
  for (let i = 0; i < 8;) {
    let j = i;
    while (j < 8 && groups[j] === 0) j++;
    if (j - i > bestLength) [best, bestLength] = [i, j - i];
    i = j === i ? i + 1 : j;
  }
  const hex = groups.map((group) => group.toString(16));
  if (best < 0) return hex.join(":");
  return `${hex.slice(0, best).join(":")}::${hex.slice(best + bestLength).join(":")}`;
}
