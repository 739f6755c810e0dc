/**
 * A selector on Linux's epoll, through Deno's FFI: the lesson's own mechanism,
 * as Python's `selectors.EpollSelector` is. The kernel says which sockets are
 * ready (level-triggered: a socket stays ready until it is drained), and the
 * callbacks do the system calls then: `accept()`, `recv()`, `send()` at once,
 * on nonblocking sockets of its own making (`listen()`, `listenDatagram()`).
 *
 * It keeps loop.ts's contract ({@linkcode BaseSelector}), so the same callbacks,
 * async_loop.ts's coroutines and `--trace` run on either: `WRITE` still means
 * "everything queued is written", reading pauses above the high-water mark, and
 * the bytes `recv()` returns stay valid until the next `select()`.
 *
 * Deno's own event loop (timers, signals, promises of other code) runs only
 * when JavaScript waits. So `run()` polls epoll on the JS thread while sockets
 * are ready, and otherwise waits for epoll on a thread of Deno's pool, which
 * lets Deno's loop run; an eventfd in the same epoll set wakes that wait when
 * JavaScript makes a key ready meanwhile. While busy, Deno's loop takes a turn
 * every few milliseconds all the same, so that timers and signals keep time.
 *
 * It needs `--allow-ffi`, which lifts Deno's sandbox: the C library can open
 * any file or socket, whatever `--allow-net` says. Use it for code you trust.
 *
 * @example An echo server on epoll
 * ```ts ignore
 * import { EpollSelector } from "./epoll.ts";
 * import { READ, type SelectorKey, WRITE } from "./loop.ts";
 *
 * const selector = new EpollSelector();
 * const listener = selector.listen({ hostname: "127.0.0.1", port: 8888 });
 * selector.register(listener, READ, function accept(key: SelectorKey) {
 *   selector.register(key.accept(), READ, function read(key: SelectorKey) {
 *     const data = key.recv();
 *     if (data) key.send(data);
 *     else selector.modify(key.resource, WRITE, () => key.resource.close());
 *   });
 * });
 * await selector.run();
 * ```
 *
 * @module
 */

import type {
  BaseSelector,
  Callback,
  ConnResource,
  DatagramResource,
  ListenerResource,
  ReadyEvent,
  Resource,
  SelectorKey,
  TraceEvent,
} from "./loop.ts";
import { checkInterest, MAX_TIMEOUT, READ, WRITE } from "./loop.ts";
import {
  AF_INET,
  AF_INET6,
  AF_UNIX,
  EAGAIN,
  ECONNABORTED,
  EINTR,
  EMFILE,
  ENFILE,
  ENOBUFS,
  ENOMEM,
  EPOLL_CTL_ADD,
  EPOLL_CTL_DEL,
  EPOLL_CTL_MOD,
  EPOLLERR,
  EPOLLHUP,
  EPOLLIN,
  EPOLLOUT,
  EPROTO,
  EVENT_DATA,
  EVENT_SIZE,
  inetAddr,
  IPPROTO_TCP,
  Libc,
  osError,
  readAddr,
  SHUT_WR,
  SO_REUSEADDR,
  SO_REUSEPORT,
  SOCK_DGRAM,
  SOCK_STREAM,
  SOL_SOCKET,
  TCP_NODELAY,
  unixAddr,
  unsupported,
} from "./libc.ts";

/** Options for {@linkcode EpollSelector}. */
export interface EpollSelectorOptions {
  /** Queued bytes above which a connection stops reading. @default {65536} */
  highWaterMark?: number;
  /** Queued bytes at or below which it reads again. @default {16384} */
  lowWaterMark?: number;
  /** Called at each step of the loop, to watch it work; off by default. */
  trace?: (event: TraceEvent) => void;
}

/** Where to listen on TCP. */
export interface EpollListenOptions {
  /** A numeric IPv4 or IPv6 address, or `localhost` (127.0.0.1). */
  hostname: string;
  /** The port; 0 picks a free one. */
  port: number;
  /** Share the port with other processes that set it too (SO_REUSEPORT). @default {false} */
  reusePort?: boolean;
}

/**
 * While busy, Deno's own loop takes a whole turn at least this often (ms), in
 * which its runtime parks: only then do its timers advance and its signals arrive.
 */
const TURN_MS = 20;
/** How long that turn lasts: a sleep on Deno's pool, long enough for the runtime to park. */
const PAUSE_MICROS = 30;
/**
 * While busy, a timer expires this often (ms). After a busy turn the next poll
 * waits on the JS thread until an event or that expiry: the next event often
 * follows soon, and a wait on Deno's pool costs a thread hop. Deno's loop waits
 * meanwhile, so this stays under TURN_MS. (A wait with a timeout of its own
 * arms a kernel timer every time: 15-25% more CPU per round trip at one
 * connection. A 1 ms tick cost 3-5% at 20 connections; 10 ms costs nothing.)
 */
const TICK_MS = 10;
/** Events taken from the kernel at once. */
const MAX_EVENTS = 1024;
/**
 * run() lets the coroutines its callbacks woke run after every this many
 * callbacks, not only after the whole turn: each then writes its reply while
 * its socket is fresh in the caches, and sooner. Coroutines at 1000
 * connections gain a seventh; callbacks do not notice.
 */
const CALLBACKS_PER_TICK = 32;
/** Pending connections the kernel queues for a listener. */
const BACKLOG = 1024;
/**
 * Read sizes, as in loop.ts: an idle connection holds MIN_READ bytes, full
 * reads grow it ×4; MAX_READ bounds what one read can add to a send queue.
 */
const MIN_READ = 256;
const MAX_READ = 64 * 1024;
/** A datagram socket's receive buffer: the largest UDP payload fits whole. */
const DATAGRAM_BUFFER = 65_536;
/** Back-off between accepts while the process is out of descriptors: doubles from min to max. */
const MIN_BACKOFF_MS = 10;
const MAX_BACKOFF_MS = 500;

/**
 * Waits for the kernel to report sockets ready and dispatches their callbacks,
 * as loop.ts's Selector does (see {@linkcode BaseSelector}); makes the sockets
 * it watches.
 */
export class EpollSelector implements BaseSelector {
  /** Queued bytes above which a connection stops reading. */
  readonly highWaterMark: number;
  /** Queued bytes at or below which it reads again. */
  readonly lowWaterMark: number;
  /** What the keys and sockets share: the system calls, the epoll set, the ready keys. */
  readonly #core: EpollCore;
  /** Every registered resource's key. */
  readonly #keys = new Map<Resource, EpollKey>();
  /** True while a select() or run() waits: only one may. */
  #selecting = false;
  /** True once close() was called. */
  #closed = false;

  /**
   * Opens an epoll set.
   *
   * @param options Backpressure thresholds for `send()`, and a trace function.
   * @throws {Error} Off Linux (x86_64 or aarch64), and without `--allow-ffi`.
   */
  constructor(options: EpollSelectorOptions = {}) {
    const why = unsupported();
    if (why) throw new Error(`The epoll selector cannot run here: ${why}`);
    const { highWaterMark = 64 * 1024, lowWaterMark = 16 * 1024, trace } = options;
    if (!(lowWaterMark >= 0 && highWaterMark >= lowWaterMark)) {
      throw new RangeError(`Water marks need 0 <= low <= high: ${lowWaterMark}, ${highWaterMark}`);
    }
    this.highWaterMark = highWaterMark;
    this.lowWaterMark = lowWaterMark;
    this.#core = new EpollCore(new Libc(), highWaterMark, lowWaterMark, trace, this.#forget);
  }

  /** How many resources are registered. */
  get size(): number {
    return this.#keys.size;
  }

  /** performance.now() when select() last returned. */
  get now(): number {
    return this.#core.now;
  }

  /**
   * Listens on TCP, on a numeric address or `localhost`.
   *
   * @throws {Deno.errors.AddrInUse} And the other errors Deno.listen() throws;
   *   a TypeError for a host name that is not a numeric address.
   */
  listen(options: EpollListenOptions): ListenerResource {
    this.#open();
    const { hostname, port, reusePort = false } = options;
    const addr = inetAddr(hostname, port);
    if (!addr) {
      throw new TypeError(
        `The epoll selector listens on numeric addresses and localhost, not "${hostname}"`,
      );
    }
    const family = addr.length === 16 ? AF_INET : AF_INET6;
    return this.#core.bound(family, SOCK_STREAM, addr, { reusePort, listen: true });
  }

  /**
   * Listens on a Unix socket at `path` (which must not exist).
   *
   * @throws {Deno.errors.AddrInUse} If something is at the path.
   */
  listenUnix(path: string): ListenerResource {
    this.#open();
    const addr = unixAddr(path);
    if (!addr) throw new TypeError(`A Unix socket's path takes at most 107 bytes: ${path}`);
    return this.#core.bound(AF_UNIX, SOCK_STREAM, addr, { listen: true });
  }

  /** Binds a UDP socket, on a numeric address or `localhost`. */
  listenDatagram(options: EpollListenOptions): DatagramResource {
    this.#open();
    const addr = inetAddr(options.hostname, options.port);
    if (!addr) {
      throw new TypeError(
        `The epoll selector binds numeric addresses and localhost, not "${options.hostname}"`,
      );
    }
    return this.#core.bound(addr.length === 16 ? AF_INET : AF_INET6, SOCK_DGRAM, addr, {});
  }

  /**
   * Starts watching one of this selector's sockets for `events`.
   *
   * @throws {Error} If the resource is registered already, is not this
   *   selector's, or the selector is closed.
   */
  register<T = undefined>(
    resource: Resource,
    events: number,
    callback: Callback<T>,
    data?: T,
  ): SelectorKey<T> {
    if (this.#closed) throw new Error("Cannot register: the selector is closed");
    if (this.#keys.has(resource)) throw new Error("Cannot register: it is already registered");
    if (!(resource instanceof Socket) || resource.core !== this.#core || resource.fd < 0) {
      throw new TypeError("Cannot register: not an open socket of this epoll selector");
    }
    const key = resource.makeKey(checkEvents(resource, events), callback, data);
    this.#keys.set(resource, key);
    this.#core.add(key);
    return key;
  }

  /**
   * Changes a registered resource's interest, and its callback or data if given.
   *
   * @throws {Error} If the resource is not registered.
   */
  modify<T = undefined>(
    resource: Resource,
    events: number,
    callback?: Callback<T>,
    data?: T,
  ): SelectorKey<T> {
    const key = this.#keyOf(resource);
    key.events = checkEvents(resource, events);
    if (callback) key.callback = callback;
    if (data !== undefined) key.data = data;
    key.interestChanged();
    return key;
  }

  /**
   * Stops watching a resource and drops what is pending for it; the resource stays open.
   *
   * @throws {Error} If the resource is not registered.
   */
  unregister(resource: Resource): SelectorKey {
    const key = this.#keyOf(resource);
    this.#keys.delete(resource);
    this.#core.remove(key);
    if (this.#keys.size === 0) this.#core.wakeUp(); // nothing left to wait for
    return key;
  }

  /** The key of a registered resource, or `undefined`. */
  getKey(resource: Resource): SelectorKey | undefined {
    return this.#keys.get(resource);
  }

  /**
   * Waits until a registered resource is ready, or `timeout` milliseconds pass
   * (0 or less polls; none, or more than 2^31-1, waits without limit, but an
   * empty selector returns at once).
   *
   * @returns `[key, mask]` pairs; the next call reuses the array and the pairs.
   */
  async select(timeout?: number): Promise<ReadyEvent[]> {
    if (this.#selecting) throw new Error("Cannot select: another select() is waiting");
    this.#selecting = true;
    try {
      const idle = this.#closed || this.#keys.size === 0;
      // epoll_wait() takes whole milliseconds in an int, and waits for ever below 0
      const limit = timeout === undefined || timeout > MAX_TIMEOUT
        ? undefined
        : Math.max(0, Math.ceil(timeout)) || 0; // a fraction rounds up, as Python does; NaN polls
      const waiting = this.#core.poll(idle ? 0 : limit);
      if (typeof waiting !== "number") await waiting;
      return this.#core.collected();
    } finally {
      this.#selecting = false;
    }
  }

  /** The loop: select, call each ready key's callback, until closed or empty; rejects if one throws. */
  async run(): Promise<void> {
    if (this.#selecting) throw new Error("Cannot select: another select() is waiting");
    this.#selecting = true;
    const core = this.#core;
    try {
      while (!this.#closed && this.#keys.size > 0) {
        // The coroutines the last callbacks woke run now, before the poll: two microtask
        // ticks take one past `await recv()` and `await send()` to its next recv().
        await undefined;
        await undefined;
        const waiting = core.poll(undefined);
        if (typeof waiting !== "number") await waiting;
        const events = core.collected();
        for (let i = 0; i < events.length; i++) {
          const key = events[i][0] as EpollKey;
          if (!key.registered) continue;
          core.trace?.({ step: "callback", key, mask: events[i][1] });
          key.callback(key, events[i][1]);
          if (i % CALLBACKS_PER_TICK === CALLBACKS_PER_TICK - 1) { // and in a long turn, sooner
            await undefined;
            await undefined;
          }
        }
      }
    } finally {
      this.#selecting = false;
    }
  }

  /** Unregisters and closes every resource, closes the epoll set, and ends run(). */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const resource of [...this.#keys.keys()]) resource.close(); // unregisters it first
    this.#core.close();
  }

  /** Refuses to make sockets once closed: its library may be unloaded. */
  #open(): void {
    if (this.#closed) throw new Error("Cannot make a socket: the selector is closed");
  }

  #keyOf(resource: Resource): EpollKey {
    const key = this.#keys.get(resource);
    if (!key) throw new Error("The resource is not registered");
    return key;
  }

  /** A socket closes: its key, if it has one, goes first (its descriptor may be reused). */
  #forget = (socket: EpollSocket): void => {
    if (this.#keys.has(socket)) this.unregister(socket);
  };
}

/** Checks an interest mask for one of our sockets (see loop.ts's checkInterest). */
function checkEvents(resource: Resource, events: number): number {
  return checkInterest(events, resource instanceof Listener);
}

/**
 * What the selector, its keys and its sockets share: the system calls, the
 * epoll set and its wake-up, and the keys ready this turn.
 *
 * Each select() is a turn: it takes the keys that are ready whatever the
 * kernel says (a WRITE with nothing queued, an error, EOF), then the kernel's
 * events; a key reported twice in one turn is reported once, with both masks.
 */
class EpollCore {
  /** The epoll set's descriptor; -1 once closed. */
  epoll: number;
  /** Written to wake a wait that runs on Deno's pool: JavaScript made a key ready meanwhile. */
  readonly #wakeFd: number;
  readonly #wakeBytes = new Uint8Array(8);
  /** A timer that expires every TICK_MS while the selector is busy; read, it starts the next period. */
  readonly #tickFd: number;
  /** The kernel's events, EVENT_SIZE bytes each. */
  readonly #events = new Uint8Array(MAX_EVENTS * EVENT_SIZE);
  readonly #eventView = new DataView(this.#events.buffer);
  /** Registered keys by descriptor. */
  readonly #byFd: (EpollKey | undefined)[] = [];
  /** Keys that may be ready without a kernel event: checked at each select(). */
  #pending = new Set<EpollKey>();
  /** The `[key, mask]` pairs of this turn, reused. */
  readonly #ready: ReadyEvent[] = [];
  /** Counts select() calls: a key knows whether it was read or reported in this one. */
  turn = 0;
  /** performance.now() when select() last returned. */
  now = 0;
  /** performance.now() when Deno's runtime last parked: it does at least every TURN_MS. */
  #parked = 0;
  /** performance.now() when the current wait on Deno's pool began. */
  #awaySince = 0;
  /** Whether the last turn had anything to report: the next poll lingers on this thread, and the tick runs. */
  #busy = false;
  /** True while a wait runs on Deno's pool, and whether the eventfd was written since. */
  #away = false;
  #woken = false;
  #closed = false;
  /** Sockets made and not yet closed: the library stays loaded while any is open. */
  #open = 0;
  #unloaded = false;

  constructor(
    readonly libc: Libc,
    readonly highWaterMark: number,
    readonly lowWaterMark: number,
    readonly trace: ((event: TraceEvent) => void) | undefined,
    /** Called by a socket as it closes, so that its key goes first. */
    readonly forget: (socket: EpollSocket) => void,
  ) {
    this.epoll = libc.epollCreate();
    this.#wakeFd = libc.eventfd();
    this.#tickFd = libc.timerfd();
    const made = [this.epoll, this.#wakeFd, this.#tickFd];
    if (made.includes(-1)) { // out of descriptors, say: close what was made
      const error = osError(libc, libc.errno());
      for (const fd of made) if (fd >= 0) libc.close(fd);
      libc.unload();
      throw error;
    }
    libc.epollCtl(this.epoll, EPOLL_CTL_ADD, this.#wakeFd, EPOLLIN);
    libc.epollCtl(this.epoll, EPOLL_CTL_ADD, this.#tickFd, EPOLLIN);
  }

  /** A socket of ours: a new descriptor, bound, and listening if asked. */
  bound(
    family: number,
    type: number,
    addr: Uint8Array,
    options: { reusePort?: boolean; listen?: boolean },
  ): Listener | Datagram {
    const { libc } = this;
    const fd = libc.socket(family, type);
    if (fd < 0) throw osError(libc, libc.errno());
    const ok = (family === AF_UNIX || libc.setOption(fd, SOL_SOCKET, SO_REUSEADDR, 1) === 0) &&
      (!options.reusePort || libc.setOption(fd, SOL_SOCKET, SO_REUSEPORT, 1) === 0) &&
      libc.bind(fd, addr) === 0 && (!options.listen || libc.listen(fd, BACKLOG) === 0) &&
      libc.sockname(fd) > 0;
    if (!ok) {
      const error = osError(libc, libc.errno());
      libc.close(fd);
      throw error;
    }
    const local = family === AF_UNIX
      ? { transport: "unix" as const, path: new TextDecoder().decode(addr.subarray(2, -1)) }
      : readAddr(libc.addr, type === SOCK_DGRAM ? "udp" : "tcp");
    return type === SOCK_DGRAM ? new Datagram(this, fd, local) : new Listener(this, fd, local);
  }

  /** Adds a new key to the epoll set. */
  add(key: EpollKey): void {
    this.#byFd[key.fd] = key;
    key.kernelMask = key.wanted();
    this.libc.epollCtl(this.epoll, EPOLL_CTL_ADD, key.fd, key.kernelMask);
    this.markPending(key);
  }

  /** Takes a key out of the epoll set, and drops what it has pending. */
  remove(key: EpollKey): void {
    key.cancel();
    this.#pending.delete(key);
    if (this.#byFd[key.fd] === key) this.#byFd[key.fd] = undefined;
    if (key.kernelMask >= 0) this.libc.epollCtl(this.epoll, EPOLL_CTL_DEL, key.fd, 0);
    key.kernelMask = -1;
  }

  /** Tells the kernel what a key wants now: new interest at once, dropped interest lazily. */
  follow(key: EpollKey): void {
    if (key.kernelMask < 0) return; // out of the set: a hang-up, see take()
    const wanted = key.wanted();
    if ((wanted & ~key.kernelMask) === 0) return; // it gets all it wants; extra events are skipped
    key.kernelMask = wanted | key.kernelMask;
    this.libc.epollCtl(this.epoll, EPOLL_CTL_MOD, key.fd, key.kernelMask);
  }

  /**
   * The key may have become ready without a kernel event: if it is, the next
   * select() reports it. (One not ready now becomes ready only by a kernel
   * event or another call here.)
   */
  markPending(key: EpollKey): void {
    if (!key.registered || (key.readiness() & key.events) === 0) return;
    this.#pending.add(key);
    if (this.#away && !this.#woken) { // the wait runs on Deno's pool: end it
      this.#woken = true;
      new DataView(this.#wakeBytes.buffer).setBigUint64(0, 1n, true);
      this.libc.write(this.#wakeFd, this.#wakeBytes);
    }
  }

  /** Ends a wait on Deno's pool, if one runs. */
  wakeUp(): void {
    if (!this.#away || this.#woken) return;
    this.#woken = true;
    new DataView(this.#wakeBytes.buffer).setBigUint64(0, 1n, true);
    this.libc.write(this.#wakeFd, this.#wakeBytes);
  }

  /**
   * A turn: takes the keys ready without the kernel, then polls the kernel at
   * once, on this thread. If nothing is ready and `timeout` allows, it waits on
   * Deno's pool instead, and Deno's loop runs meanwhile. If it is busy, and
   * Deno's runtime has not parked for TURN_MS, Deno's loop takes a turn first.
   *
   * @param timeout Milliseconds to wait at most (0: poll; undefined: no limit).
   * @returns How many kernel events were taken, or a promise of it.
   */
  poll(timeout: number | undefined): number | Promise<number> {
    this.turn++;
    this.#ready.length = 0;
    this.#takePending();
    if (this.#closed) return 0;
    // Poll, then linger: 1-3.5% more round trips at one connection than lingering at once.
    let n = this.#waitHere(0);
    if (n === 0 && this.#ready.length === 0 && timeout !== 0 && this.#busy) {
      // Until an event or the tick's next expiry; a caller's timeout bounds the whole wait.
      const began = performance.now();
      n = this.#waitHere(timeout === undefined ? -1 : Math.min(timeout, TICK_MS));
      if (timeout !== undefined) {
        timeout = Math.max(0, Math.ceil(timeout - (performance.now() - began)));
      }
    }
    const busy = n > 0 || this.#ready.length > 0;
    if (busy !== this.#busy) { // the tick runs only while busy: idle costs no CPU
      this.#busy = busy;
      this.libc.setTimer(this.#tickFd, busy ? TICK_MS : 0);
    }
    if (this.#busy || timeout === 0) {
      if (performance.now() - this.#parked < TURN_MS) return this.#take(n);
      this.#away = true; // the library stays loaded until the pause is over
      return this.libc.pause(PAUSE_MICROS).then(() => {
        this.#away = false;
        this.#parked = performance.now();
        if (!this.#closed) return this.#take(n);
        this.#release();
        return 0;
      });
    }
    this.#away = true;
    this.#woken = false;
    this.#awaySince = performance.now();
    return this.libc.epollWaitAway(this.epoll, this.#events, timeout ?? -1).then(this.#arrived);
  }

  /** Waits for kernel events on this thread; the tick's expiry alone is no event. */
  #waitHere(timeout: number): number {
    const n = this.libc.epollWait(this.epoll, this.#events, timeout);
    if (n !== 1 || this.#eventView.getUint32(EVENT_DATA, true) !== this.#tickFd) return n;
    this.libc.read(this.#tickFd, this.#wakeBytes);
    return 0;
  }

  #arrived = (n: number): number => {
    this.#away = false;
    const now = performance.now();
    if (now - this.#awaySince >= 1) this.#parked = now; // it waited: Deno's runtime parked
    if (this.#closed) {
      this.#release(); // no thread of Deno's pool uses the epoll set any more
      return 0;
    }
    this.#takePending(); // what JavaScript made ready during the wait
    return this.#take(n);
  };

  /** The `[key, mask]` pairs of the turn: select()'s result. */
  collected(): ReadyEvent[] {
    this.now = performance.now();
    this.trace?.({ step: "select", ready: this.#ready });
    return this.#ready;
  }

  /** Reports a key this turn (once, with the union of its masks). */
  #report(key: EpollKey, mask: number): void {
    if (mask === 0) return;
    if (key.reportedIn === this.turn) {
      key.event[1] |= mask;
      return;
    }
    key.reportedIn = this.turn;
    key.event[1] = mask;
    this.#ready.push(key.event);
  }

  /** Reports the keys ready without a kernel event; those no longer ready leave the set. */
  #takePending(): void {
    for (const key of this.#pending) {
      const mask = key.registered ? key.readiness() & key.events : 0;
      if (mask === 0) this.#pending.delete(key);
      else this.#report(key, mask);
    }
  }

  /** Takes `n` kernel events: each key does what the event asks of it, then is reported. */
  #take(n: number): number {
    if (n < 0) n = 0; // EINTR: a signal came; the next turn polls again
    const view = this.#eventView;
    for (let i = 0; i < n; i++) {
      const events = view.getUint32(i * EVENT_SIZE, true);
      const fd = view.getUint32(i * EVENT_SIZE + EVENT_DATA, true);
      const key = this.#byFd[fd];
      if (!key) {
        // reset it (a timer starts its next period only once read)
        if (fd === this.#wakeFd || fd === this.#tickFd) this.libc.read(fd, this.#wakeBytes);
        continue;
      }
      if (events & (EPOLLERR | EPOLLHUP)) { // reported again and again: out of the set
        this.libc.epollCtl(this.epoll, EPOLL_CTL_DEL, fd, 0);
        key.kernelMask = -1;
        key.hungUp = true;
      } else if (events & ~key.wanted()) { // interest it dropped since: the kernel would repeat it
        key.kernelMask = key.wanted();
        this.libc.epollCtl(this.epoll, EPOLL_CTL_MOD, fd, key.kernelMask);
      }
      const mask = key.onEvent(events) & key.events;
      this.#report(key, mask);
      // The kernel repeats a readable socket's event until it is read; what it will not
      // repeat (WRITE, EOF, an error, a connection accepted and not taken) is checked again.
      if (mask & WRITE || key.sticky()) this.#pending.add(key);
    }
    return n;
  }

  /** A socket was made, or closed. */
  opened(delta: 1 | -1): void {
    this.#open += delta;
    if (this.#open === 0) this.#release();
  }

  /**
   * Closes the epoll set. A wait that runs on Deno's pool ends first; the
   * library is unloaded once no socket of this selector is open either.
   */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    if (this.#away) this.wakeUp();
    else this.#release();
  }

  #release(): void {
    if (!this.#closed || this.#away) return;
    if (this.epoll >= 0) {
      this.libc.close(this.epoll);
      this.libc.close(this.#wakeFd);
      this.libc.close(this.#tickFd);
      this.epoll = -1;
    }
    if (this.#open === 0 && !this.#unloaded) {
      this.#unloaded = true;
      this.libc.unload();
    }
  }
}

// Sockets ===================================================================

// Keys of any data type live in one map; the public type is SelectorKey<T>.
// deno-lint-ignore no-explicit-any
type AnyData = any;

/** A socket of an epoll selector, of any kind. */
type EpollSocket = Listener | Conn | Datagram;

/** A socket of an epoll selector: a nonblocking descriptor, closed exactly once. */
abstract class Socket {
  #fd: number;

  constructor(readonly core: EpollCore, fd: number) {
    this.#fd = fd;
    core.opened(1);
  }

  /** The descriptor, or -1 once closed. */
  get fd(): number {
    return this.#fd;
  }

  /** Makes the key that watches this socket. */
  abstract makeKey(events: number, callback: Callback<AnyData>, data: AnyData): EpollKey;

  /** Closes it: its key goes first, then the descriptor, once. */
  close(): void {
    if (this.#fd < 0) return;
    this.core.forget(this as unknown as EpollSocket); // every socket is one of the three kinds
    this.core.libc.close(this.#fd);
    this.#fd = -1;
    this.core.opened(-1);
  }
}

class Listener extends Socket implements ListenerResource {
  constructor(core: EpollCore, fd: number, readonly addr: Deno.Addr) {
    super(core, fd);
  }

  makeKey(events: number, callback: Callback<AnyData>, data: AnyData): EpollKey {
    return new ListenerKey(this, events, callback, data, this.core);
  }
}

class Conn extends Socket implements ConnResource {
  #localAddr: Deno.Addr | undefined;

  constructor(core: EpollCore, fd: number, readonly remoteAddr: Deno.Addr, local?: Deno.Addr) {
    super(core, fd);
    this.#localAddr = local;
  }

  /** Our end's address (asked of the kernel the first time). */
  get localAddr(): Deno.Addr {
    if (!this.#localAddr) {
      const { libc } = this.core;
      this.#localAddr = libc.sockname(this.fd) > 0
        ? readAddr(libc.addr, "tcp")
        : { transport: "tcp", hostname: "0.0.0.0", port: 0 };
    }
    return this.#localAddr;
  }

  closeWrite(): Promise<void> {
    if (this.fd < 0) {
      return Promise.reject(new Deno.errors.BadResource("closeWrite() on a closed socket"));
    }
    const { libc } = this.core;
    return libc.shutdown(this.fd, SHUT_WR) === 0
      ? Promise.resolve()
      : Promise.reject(osError(libc, libc.errno()));
  }

  setNoDelay(noDelay = true): void {
    this.core.libc.setOption(this.fd, IPPROTO_TCP, TCP_NODELAY, noDelay ? 1 : 0);
  }

  makeKey(events: number, callback: Callback<AnyData>, data: AnyData): EpollKey {
    return new ConnKey(this, events, callback, data, this.core);
  }
}

class Datagram extends Socket implements DatagramResource {
  constructor(core: EpollCore, fd: number, readonly addr: Deno.Addr) {
    super(core, fd);
  }

  makeKey(events: number, callback: Callback<AnyData>, data: AnyData): EpollKey {
    return new DatagramKey(this, events, callback, data, this.core);
  }
}

// Keys ======================================================================

/** What every key shares: its place in the epoll set, and the calls that do not fit its kind. */
abstract class EpollKey implements SelectorKey<AnyData> {
  error: Error | undefined = undefined;
  /** The `[key, mask]` pair select() reports for this key, made once and reused. */
  readonly event: ReadyEvent;
  /** The descriptor, kept for the epoll set after the socket closes. */
  readonly fd: number;
  registered = true;
  /** The events the epoll set watches for it; -1 once out of the set. */
  kernelMask = 0;
  /** The turn in which it was last reported, so that one turn reports it once. */
  reportedIn = -1;
  /** The kernel reported a hang-up or an error: the key stays ready until it is closed. */
  hungUp = false;
  /** True between retain() and release(): its buffer is not read into. */
  retained = false;

  constructor(
    readonly resource: EpollSocket,
    public events: number,
    public callback: Callback<AnyData>,
    public data: AnyData,
    protected readonly core: EpollCore,
  ) {
    this.event = [this, 0];
    this.fd = resource.fd;
  }

  /** The events the epoll set should watch for, now. */
  abstract wanted(): number;
  /** Ready events that need no kernel event (an error, EOF, nothing queued). */
  abstract readiness(): number;
  /** Handles a kernel event; returns the ready events to report. */
  abstract onEvent(events: number): number;
  /** Whether it is READ-ready with nothing the kernel would report again (EOF, an error...). */
  abstract sticky(): boolean;

  get queued(): number {
    return 0;
  }

  /** Interest changed: tell the kernel, and check for readiness it will not report. */
  interestChanged(): void {
    this.core.follow(this);
    this.core.markPending(this);
  }

  /** Drops what is pending; nothing is reported any more. */
  cancel(): void {
    this.registered = false;
  }

  retain(): void {
    this.retained = true;
  }

  release(): void {
    if (!this.retained) return;
    this.retained = false;
    this.core.follow(this);
    this.core.markPending(this);
  }

  // What does not fit the key's resource: each kind of key overrides its own.
  accept(): ConnResource {
    throw new TypeError("accept() needs a listener's key");
  }
  recv(): Uint8Array | null {
    throw new TypeError("recv() needs a connection's key");
  }
  send(_bytes: Uint8Array): void {
    throw new TypeError("send() needs a connection's key");
  }
  recvfrom(): [Uint8Array, Deno.Addr] {
    throw new TypeError("recvfrom() needs a datagram socket's key");
  }
  sendto(_bytes: Uint8Array, _addr: Deno.Addr): void {
    throw new TypeError("sendto() needs a datagram socket's key");
  }
}

/**
 * A listener's key. On a kernel event it accepts one connection, which waits
 * in the key until accept() takes it, as in loop.ts. Out of descriptors
 * (EMFILE), the kernel would report the waiting connections again at once, so
 * the key stops watching for a back-off, and reports the error once.
 */
class ListenerKey extends EpollKey {
  #accepted: Conn | undefined = undefined;
  #backoffMs = 0;
  #retryTimer: ReturnType<typeof setTimeout> | undefined = undefined;

  wanted(): number {
    return this.events & READ && !this.#accepted && !this.#retryTimer ? EPOLLIN : 0;
  }

  readiness(): number {
    return this.#accepted || this.error ? READ : 0;
  }

  sticky(): boolean {
    return this.readiness() !== 0;
  }

  onEvent(events: number): number {
    if (events & EPOLLIN && !this.#accepted && !this.#retryTimer) this.#acceptOne();
    return this.readiness();
  }

  override accept(): ConnResource {
    const conn = this.#accepted;
    this.#accepted = undefined;
    if (conn) {
      this.core.follow(this); // watch for the next one
      return conn;
    }
    const error = this.error;
    this.error = undefined; // a passing error: the next accept may work
    throw error ?? new Deno.errors.WouldBlock("accept() before the key was ready");
  }

  override cancel(): void {
    super.cancel();
    clearTimeout(this.#retryTimer);
    this.#accepted?.close(); // accepted by us, never handed out
    this.#accepted = undefined;
  }

  #acceptOne(): void {
    const { libc } = this.core;
    for (;;) {
      const fd = libc.accept(this.fd);
      if (fd >= 0) {
        this.#backoffMs = 0;
        const listener = this.resource as Listener;
        const local = listener.addr.transport === "unix" ? listener.addr : undefined;
        const peer = local ? { transport: "unix" as const, path: "" } : readAddr(libc.addr, "tcp");
        this.#accepted = new Conn(this.core, fd, peer, local);
        return;
      }
      const errno = libc.errno();
      if (errno === ECONNABORTED || errno === EPROTO || errno === EINTR) continue; // the peer left
      if (errno === EAGAIN) return;
      if (errno === EMFILE || errno === ENFILE || errno === ENOBUFS || errno === ENOMEM) {
        this.#backoffMs = Math.min(MAX_BACKOFF_MS, Math.max(MIN_BACKOFF_MS, this.#backoffMs * 2));
        this.#retryTimer = setTimeout(this.#retry, this.#backoffMs);
      }
      this.error = osError(libc, errno);
      return;
    }
  }

  #retry = (): void => {
    this.#retryTimer = undefined;
    this.core.follow(this);
  };
}

/**
 * What connection and datagram keys share: a send queue written as soon as the
 * socket takes it, and finished on EPOLLOUT, with backpressure.
 */
abstract class BufferedKey extends EpollKey {
  /**
   * Chunks the socket did not take yet, from #head on (copies: the caller may
   * reuse its bytes), and each datagram's address, at the same index.
   */
  #queue: (Uint8Array | undefined)[] = [];
  #queueTo: (Uint8Array | undefined)[] = [];
  #head = 0;
  #queued = 0;
  /** Backpressure: true from above the high-water mark until back at the low-water mark. */
  #paused = false;

  override get queued(): number {
    return this.#queued;
  }

  /** Whether chunks wait to be written. */
  protected get writing(): boolean {
    return this.#head < this.#queue.length;
  }

  /** Whether reading is paused: its bytes are retained, or backpressure. */
  protected get blocked(): boolean {
    return this.retained || this.#paused;
  }

  /**
   * Writes one chunk (to `to`, for a datagram).
   *
   * @returns The bytes written, or -1 with the reason in errno.
   */
  protected abstract writeOnce(chunk: Uint8Array, to: Uint8Array | undefined): number;
  /** A write failed with `errno` (not EAGAIN): whether the key is broken now. */
  protected abstract writeFailed(errno: number): boolean;

  /** Writes `bytes` now, as much as the socket takes, and queues the rest. */
  protected write(bytes: Uint8Array, to?: Uint8Array): void {
    if (!this.writing) {
      const n = this.writeOnce(bytes, to);
      if (n === bytes.byteLength) return;
      if (n < 0) {
        const errno = this.core.libc.errno();
        if (errno !== EAGAIN) {
          if (this.writeFailed(errno)) this.broken(osError(this.core.libc, errno));
          return;
        }
      } else bytes = bytes.subarray(n); // a partial write: the rest waits for EPOLLOUT
    }
    this.#queue.push(bytes.slice());
    this.#queueTo.push(to);
    this.#queued += bytes.byteLength;
    if (this.#queued > this.core.highWaterMark && !this.#paused) {
      this.#paused = true;
      this.core.trace?.({ step: "pause", key: this });
    }
    this.core.follow(this); // watch for EPOLLOUT
  }

  /** EPOLLOUT: writes what is queued, as much as the socket takes. */
  protected flush(): void {
    const { libc } = this.core;
    while (this.writing) {
      const chunk = this.#queue[this.#head]!;
      const n = this.writeOnce(chunk, this.#queueTo[this.#head]);
      if (n < 0) {
        const errno = libc.errno();
        if (errno === EAGAIN) break;
        if (this.writeFailed(errno)) return this.broken(osError(libc, errno));
      }
      if (n >= 0 && n < chunk.byteLength) { // partial: the rest later
        this.#queue[this.#head] = chunk.subarray(n);
        this.#queued -= n;
        break;
      }
      this.#queue[this.#head] = this.#queueTo[this.#head] = undefined; // sent, or dropped
      this.#head++;
      this.#queued -= chunk.byteLength;
    }
    if (!this.writing) this.dropQueue(); // empty: start the arrays afresh
    if (this.#paused && this.#queued <= this.core.lowWaterMark) {
      this.#paused = false;
      this.core.trace?.({ step: "resume", key: this });
      this.core.follow(this);
    }
    if (!this.writing) this.core.markPending(this); // WRITE-ready, if wanted
  }

  /** The socket failed for good: nothing more will be written; the error is reported. */
  protected broken(error: Error): void {
    this.error ??= error;
    this.dropQueue();
    this.core.markPending(this);
  }

  protected dropQueue(): void {
    this.#queue = [];
    this.#queueTo = [];
    this.#head = 0;
    this.#queued = 0;
  }

  override cancel(): void {
    super.cancel();
    this.dropQueue();
  }
}

/**
 * A connection's key. recv() reads once, on the kernel's word that bytes (or
 * EOF) are waiting, into a buffer of the key's own, valid until the next
 * select(); send() writes at once.
 */
class ConnKey extends BufferedKey {
  #buf: Uint8Array | undefined = undefined;
  #nextSize = MIN_READ;
  /** The kernel said bytes, EOF or an error are waiting, and recv() has not read yet. */
  #readable = false;
  /** The turn of the last read: one read per turn keeps the bytes valid until the next select(). */
  #readIn = -1;
  #eof = false;

  wanted(): number { // EPOLLIN stays while bytes wait unread: the kernel reports them again
    const reading = this.events & READ && !this.blocked && !this.#eof && !this.error;
    return (reading ? EPOLLIN : 0) | (this.writing ? EPOLLOUT : 0);
  }

  sticky(): boolean {
    return this.#eof || this.hungUp || this.error !== undefined;
  }

  readiness(): number {
    if (this.error) return READ | WRITE;
    const readable = (this.#readable || this.#eof || this.hungUp) && !this.blocked;
    return (readable ? READ : 0) | (!this.writing ? WRITE : 0);
  }

  onEvent(events: number): number {
    if (events & (EPOLLIN | EPOLLERR | EPOLLHUP)) this.#readable = true;
    if (events & (EPOLLOUT | EPOLLERR | EPOLLHUP) && this.writing) this.flush();
    return this.readiness();
  }

  override recv(): Uint8Array | null {
    if (this.error) throw this.error;
    if (this.#eof) return null; // EOF stays readable, as on a socket
    if (!(this.#readable || this.hungUp) || this.#readIn === this.core.turn || this.blocked) {
      throw new Deno.errors.WouldBlock("recv() before the key was ready");
    }
    const { libc } = this.core;
    if (this.#buf?.byteLength !== this.#nextSize) this.#buf = new Uint8Array(this.#nextSize);
    const n = libc.read(this.fd, this.#buf);
    this.#readIn = this.core.turn;
    this.#readable = false; // EPOLLIN stays: reading never adds interest, so the kernel needs no word
    if (n > 0) {
      if (n === this.#buf.byteLength) this.#nextSize = Math.min(MAX_READ, n * 4);
      else if (n <= this.#buf.byteLength / 16) this.#nextSize = MIN_READ;
      return this.#buf.subarray(0, n);
    }
    if (n === 0) {
      this.#eof = true;
      return null;
    }
    const errno = libc.errno();
    if (errno === EAGAIN || errno === EINTR) {
      throw new Deno.errors.WouldBlock("recv() before the key was ready");
    }
    this.broken(osError(libc, errno));
    throw this.error!;
  }

  override send(bytes: Uint8Array): void {
    if (this.error) throw this.error;
    if (!this.registered) throw new Deno.errors.BadResource("send() on an unregistered key");
    if (bytes.byteLength > 0) this.write(bytes);
  }

  protected writeOnce(chunk: Uint8Array): number {
    return this.core.libc.write(this.fd, chunk);
  }

  protected writeFailed(): boolean {
    return true;
  }
}

/**
 * A datagram socket's key: recvfrom() receives one datagram whole, on the
 * kernel's word; sendto() sends at once, or queues while the socket is full.
 */
class DatagramKey extends BufferedKey {
  #buf = new Uint8Array(DATAGRAM_BUFFER);
  #readable = false;
  #readIn = -1;
  /** The C address of each sender recvfrom() returned, so that a reply needs no parsing. */
  readonly #senders = new WeakMap<Deno.Addr, Uint8Array>();

  wanted(): number {
    const reading = this.events & READ && !this.blocked;
    return (reading ? EPOLLIN : 0) | (this.writing ? EPOLLOUT : 0);
  }

  sticky(): boolean {
    return this.error !== undefined;
  }

  readiness(): number {
    if (this.error) return READ | WRITE;
    return (this.#readable && !this.blocked ? READ : 0) | (!this.writing ? WRITE : 0);
  }

  onEvent(events: number): number {
    if (events & EPOLLIN) this.#readable = true;
    if (events & EPOLLOUT && this.writing) this.flush();
    return this.readiness();
  }

  override recvfrom(): [Uint8Array, Deno.Addr] {
    if (this.error) throw this.error;
    if (!this.#readable || this.#readIn === this.core.turn || this.blocked) {
      throw new Deno.errors.WouldBlock("recvfrom() before the key was ready");
    }
    const { libc } = this.core;
    const n = libc.recvfrom(this.fd, this.#buf);
    this.#readIn = this.core.turn;
    this.#readable = false; // EPOLLIN stays: reading never adds interest, so the kernel needs no word
    if (n < 0) {
      const errno = libc.errno();
      if (errno === EAGAIN || errno === EINTR) {
        throw new Deno.errors.WouldBlock("recvfrom() before the key was ready");
      }
      throw osError(libc, errno); // a passing error: the next datagram may come
    }
    const from = readAddr(libc.addr, "udp") as Deno.NetAddr;
    this.#senders.set(from, libc.addr.slice(0, from.hostname.includes(":") ? 28 : 16));
    return [this.#buf.subarray(0, n), from];
  }

  override sendto(bytes: Uint8Array, addr: Deno.Addr): void {
    if (this.error) throw this.error;
    if (!this.registered) throw new Deno.errors.BadResource("sendto() on an unregistered key");
    const to = this.#senders.get(addr) ??
      ("hostname" in addr ? inetAddr(addr.hostname, addr.port) : undefined);
    if (to) this.write(bytes, to); // an address it cannot send to is dropped, as UDP drops
  }

  protected writeOnce(datagram: Uint8Array, to: Uint8Array | undefined): number {
    return this.core.libc.sendto(this.fd, datagram, to!);
  }

  /** A datagram the kernel refuses is dropped, as UDP drops; a closed socket ends the key. */
  protected writeFailed(errno: number): boolean {
    return errno === 9; // EBADF
  }
}
