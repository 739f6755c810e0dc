/**
 * A readiness dispatcher for Deno, shaped like Python's `selectors` module:
 * register resources with the events you want, `select()` the ready ones, and
 * call their callbacks from one loop.
 *
 * How completions become readiness: Deno offers completions (promises), not
 * readiness (epoll). So for each registered key the dispatcher keeps one
 * operation in flight, an `accept()` for a listener or a `read()` for a
 * connection. When it completes, the key goes on the ready list and the waiting
 * `select()` wakes up. The callback then takes the result at once with
 * {@linkcode SelectorKey.accept} or {@linkcode SelectorKey.recv} ("should be
 * ready", as in the Python version), and the next operation starts.
 * {@linkcode SelectorKey.send} queues bytes; the dispatcher writes every one of
 * them, continuing partial writes itself, and a key is WRITE-ready when all
 * of its queue is written.
 *
 * The lesson's loop, `for key, mask in sel.select(): key.data(key.fileobj, mask)`,
 * reads in TypeScript:
 *
 * ```ts ignore
 * for (;;) {
 *   for (const [key, mask] of await selector.select()) key.callback(key, mask);
 * }
 * ```
 *
 * {@linkcode Selector.run} is that loop with less overhead per turn; it ends
 * when the selector is closed or no resource is left.
 *
 * The file reads top-down: §1 the public API, §2 the core (the ready list and
 * the keys). It imports nothing: copy it into your project as it is. When
 * more reads are ready at once than Deno serves per turn, some connections can
 * wait long for theirs; fairness.ts is a plug-in that prevents it
 * (`new Selector({ readGate: new Fairness() })`).
 *
 * @example An echo server, and one client to try it
 * ```ts
 * import { READ, Selector, type SelectorKey, WRITE } from "./loop.ts";
 * import { assertEquals } from "@std/assert";
 *
 * const selector = new Selector();
 *
 * function accept(key: SelectorKey) {
 *   const conn = key.accept(); // should be ready
 *   selector.register(conn, READ, read);
 * }
 *
 * function read(key: SelectorKey) {
 *   let data;
 *   try {
 *     data = key.recv(); // should be ready
 *   } catch {
 *     return close(key); // a reset: it ends this connection, not the server
 *   }
 *   if (data) key.send(data); // queued: the loop writes every byte
 *   else selector.modify(key.resource, WRITE, close); // EOF: close once written
 * }
 *
 * function close(key: SelectorKey) {
 *   selector.unregister(key.resource);
 *   key.resource.close();
 * }
 *
 * const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
 * selector.register(listener, READ, accept);
 * const serving = selector.run(); // for each ready key: key.callback(key, mask)
 *
 * // One client: send "hello", say we are done, read the echo until EOF.
 * const conn = await Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port });
 * await conn.write(new TextEncoder().encode("hello"));
 * await conn.closeWrite();
 * const reply = new Uint8Array(64);
 * let got = 0;
 * for (let n; (n = await conn.read(reply.subarray(got))) !== null;) got += n;
 * conn.close();
 * assertEquals(new TextDecoder().decode(reply.subarray(0, got)), "hello");
 *
 * selector.close(); // closes the listener too, and ends run()
 * await serving;
 * ```
 *
 * @module
 */

// ===========================================================================
// §1 The public API
// ===========================================================================

/** Interest in, and readiness for, reading: an accepted connection or received bytes are waiting. */
export const READ = 1;
/** Interest in, and readiness for, writing: everything queued with `send()` has been written. */
export const WRITE = 2;

/** A listener, as a selector's users see it: `Deno.Listener` is one. */
export interface ListenerResource {
  /** The address it listens on. */
  readonly addr: Deno.Addr;
  /** Closes it. */
  close(): void;
}

/** A connection (TCP or Unix), as a selector's users see it: `Deno.Conn` is one. */
export interface ConnResource {
  /** Our end's address. */
  readonly localAddr: Deno.Addr;
  /** The peer's address. */
  readonly remoteAddr: Deno.Addr;
  /** Closes it. */
  close(): void;
  /** Half-closes it: the peer reads EOF, and we can still read. */
  closeWrite(): Promise<void>;
  /** TCP only: sends small writes at once instead of waiting ~40 ms to merge them (Nagle). */
  setNoDelay?(noDelay?: boolean): void;
}

/** A datagram (UDP) socket, as a selector's users see it: `Deno.DatagramConn` is one. */
export interface DatagramResource {
  /** The address it is bound to. */
  readonly addr: Deno.Addr;
  /** Closes it. */
  close(): void;
}

/**
 * What can be registered: a listener (READ only), a connection, or a datagram
 * socket. This selector takes Deno's own (`Deno.listen`, `Deno.connect`,
 * `Deno.listenDatagram`); another selector takes sockets of its own kind.
 */
export type Resource = ListenerResource | ConnResource | DatagramResource;

/** Called by {@linkcode Selector.run} for each ready key, with the ready events. */
export type Callback<T = unknown> = (key: SelectorKey<T>, mask: number) => void;

/** One `[key, mask]` pair of a {@linkcode Selector.select} result. */
export type ReadyEvent = [key: SelectorKey, mask: number];

/** A registered resource: what it is, what it waits for, and its I/O. */
export interface SelectorKey<T = unknown> {
  /** The registered listener, connection or datagram socket (Python's `fileobj`). */
  readonly resource: Resource;
  /** The events of interest: a mix of {@linkcode READ} and {@linkcode WRITE}. */
  readonly events: number;
  /**
   * The function {@linkcode Selector.run} calls when the key is ready. (Declared
   * as a method so that any key is a `SelectorKey<unknown>`.)
   */
  callback(key: SelectorKey<T>, mask: number): void;
  /** Anything you attach to the key. */
  data: T;
  /** Bytes queued by `send()` or `sendto()` and not yet written. */
  readonly queued: number;
  /** The error that ended this connection, if one did (a reset, a broken pipe...). */
  readonly error: Error | undefined;
  /**
   * Takes the connection a listener key accepted. Call it when the key is READ-ready.
   *
   * @returns The accepted connection.
   * @throws The error the accept failed with (e.g. "Too many open files"); the
   *   dispatcher retries, backing off while the process is out of descriptors.
   *   A peer that left before it was accepted is skipped, never reported.
   */
  accept(): ConnResource;
  /**
   * Takes the bytes a connection key received. Call it when the key is READ-ready.
   * The bytes stay valid until the next `select()`, or until they are written if
   * you `send()` them (on any key); use `slice()` to keep them longer.
   *
   * @returns The bytes, or `null` once the peer has finished sending (EOF).
   * @throws The error the connection failed with (`Deno.errors.ConnectionReset`...).
   */
  recv(): Uint8Array | null;
  /**
   * Queues bytes to be written; the dispatcher writes every one of them, in order.
   * Do not modify them until they are written. While more than the high-water
   * mark is queued, reading pauses; it resumes at the low-water mark.
   *
   * @param bytes The bytes to write.
   * @throws The error the connection failed with, if it failed.
   */
  send(bytes: Uint8Array): void;
  /**
   * Takes the datagram a datagram key received, whole, and its sender (Python's
   * `recvfrom`). Call it when the key is READ-ready. The bytes stay valid as
   * those of recv() do.
   *
   * @returns The datagram (possibly empty) and the address it came from.
   * @throws The error receiving failed with; the dispatcher tries again.
   */
  recvfrom(): [Uint8Array, Deno.Addr];
  /**
   * Queues one datagram for `addr` (Python's `sendto`); datagrams go out whole,
   * in order. One the kernel refuses (e.g. a bad address) is dropped, as UDP
   * drops. Do not modify the bytes until they are sent.
   *
   * @param bytes The datagram, at most 65,507 bytes over IPv4.
   * @param addr Where to send it.
   */
  sendto(bytes: Uint8Array, addr: Deno.Addr): void;
  /**
   * Keeps the bytes the last `recv()` or `recvfrom()` returned valid past the
   * next `select()`: the key reads nothing into its buffer, and so reports no
   * READ, until {@linkcode SelectorKey.release}. For code that hands the bytes
   * on, e.g. to a coroutine (async_loop.ts).
   */
  retain(): void;
  /** Ends a `retain()`: the key may read into its buffer again. */
  release(): void;
}

/**
 * One step of the loop, for {@linkcode SelectorOptions.trace}: what a learner
 * would want to see the loop do.
 */
export type TraceEvent =
  /** select() returned these ready keys (the array is reused: read it at once). */
  | { step: "select"; ready: readonly ReadyEvent[] }
  /** run() calls this key's callback with this mask. */
  | { step: "callback"; key: SelectorKey; mask: number }
  /** Backpressure: more than the high-water mark is queued, so the key stops reading. */
  | { step: "pause"; key: SelectorKey }
  /** Backpressure: the queue is down to the low-water mark, so the key reads again. */
  | { step: "resume"; key: SelectorKey };

/** A connection key's next read, as a {@linkcode ReadGate} sees it. */
export interface GatedRead {
  /** Starts the read the gate held back, if the key still wants one. */
  startNext(): void;
  /** The gate's own note on this read while it is pending (undefined when it has none). */
  gateNote: unknown;
}

/**
 * A plug-in that decides when connections' reads start: fairness.ts is one.
 * The selector calls it at these points, and at none when no gate is attached.
 */
export interface ReadGate {
  /**
   * A connection's read is about to start.
   *
   * @returns Whether it may start now; if not, the gate calls `read.startNext()` later.
   */
  admit(read: GatedRead): boolean;
  /** The read `admit()` let start has completed, or failed. */
  readDone(read: GatedRead): void;
  /** A connection's write has completed. */
  writeDone(): void;
  /** select() has collected the ready keys, at `now` (performance.now()). */
  selected(now: number): void;
  /** The selector is closing. */
  close(): void;
}

/** Options for {@linkcode Selector}. */
export interface SelectorOptions {
  /** Queued bytes above which a connection stops reading. @default {65536} */
  highWaterMark?: number;
  /** Queued bytes at or below which it reads again. @default {16384} */
  lowWaterMark?: number;
  /** Called at each step of the loop, to watch it work; off by default, and then free. */
  trace?: (event: TraceEvent) => void;
  /** Decides when connections' reads start (e.g. fairness.ts); none by default. */
  readGate?: ReadGate;
}

/**
 * Waits for registered resources to become ready and dispatches their callbacks.
 *
 * Work per event is O(1) however many keys are registered: a completion puts
 * its key on the ready list and wakes the one waiting `select()`.
 */
export class Selector {
  /** Queued bytes above which a connection stops reading. */
  readonly highWaterMark: number;
  /** Queued bytes at or below which it reads again. */
  readonly lowWaterMark: number;
  /** Every registered resource's key: for getKey(), modify(), unregister() and close(). */
  readonly #keys = new Map<Resource, Key>();
  /** What the keys share: the ready list, the wake-up, the water marks. */
  readonly #core: SelectorCore;
  /** The array select() returns, reused so that a turn allocates nothing. */
  readonly #events: ReadyEvent[] = [];
  /** True while a select() or run() waits: only one may. */
  #selecting = false;
  /** True once close() was called: nothing may be registered again. */
  #closed = false;
  /** performance.now() when select() last returned: see {@linkcode Selector.now}. */
  #now = 0;

  /**
   * Creates a selector.
   *
   * @param options Backpressure thresholds for `send()`, a trace function, a read gate.
   */
  constructor(options: SelectorOptions = {}) {
    const { highWaterMark = 64 * 1024, lowWaterMark = 16 * 1024, trace, readGate } = options;
    if (!(lowWaterMark >= 0 && highWaterMark >= lowWaterMark)) {
      throw new RangeError(
        `Water marks must satisfy 0 <= low <= high: got low ${lowWaterMark}, high ${highWaterMark}`,
      );
    }
    this.highWaterMark = highWaterMark;
    this.lowWaterMark = lowWaterMark;
    this.#core = new SelectorCore(highWaterMark, lowWaterMark, trace, readGate);
  }

  /** How many resources are registered. */
  get size(): number {
    return this.#keys.size;
  }

  /**
   * performance.now() when select() last returned (asyncio's `loop.time()`):
   * a clock for callbacks, which run just after, without reading the clock
   * again (each read costs 0.1-0.2 µs on some machines).
   */
  get now(): number {
    return this.#now;
  }

  /**
   * Starts watching a resource. With READ interest the dispatcher starts an
   * accept (listener) or a read (connection) right away.
   *
   * @param resource A listener, a connection or a datagram socket.
   * @param events {@linkcode READ}, {@linkcode WRITE} (not for listeners), both, or 0.
   * @param callback What {@linkcode Selector.run} calls when the key is ready.
   * @param data Anything to attach to the key.
   * @returns The new key.
   * @throws {Error} If the resource is already registered or the selector is closed.
   */
  register<T = undefined>(
    resource: Resource,
    events: number,
    callback: Callback<T>,
    data?: T,
  ): SelectorKey<T> {
    if (this.#closed) throw new Error("Cannot register: the selector is closed");
    if (this.#keys.has(resource)) {
      throw new Error("Cannot register: the resource is already registered");
    }
    const interest = checkEvents(resource, events);
    const core = this.#core;
    const key = "read" in resource
      ? new ConnKey(resource as Deno.Conn, interest, callback, data, core)
      : "receive" in resource
      ? new DatagramKey(resource as Deno.DatagramConn, interest, callback, data, core)
      : new ListenerKey(resource as Deno.Listener, interest, callback, data, core);
    this.#keys.set(resource, key);
    key.startNext();
    core.markReady(key);
    return key;
  }

  /**
   * Changes a registered resource's interest, and its callback or data if given.
   * Interest 0 pauses it: nothing is reported and no new read or accept starts.
   *
   * @param resource A registered resource.
   * @param events The new interest.
   * @param callback The new callback; the old one is kept if omitted.
   * @param data The new data; the old data is kept if omitted.
   * @returns The key.
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
    key.startNext();
    this.#core.markReady(key);
    return key;
  }

  /**
   * Stops watching a resource and drops what is pending for it: an accepted
   * connection not yet taken, received bytes, bytes queued by `send()`. The
   * resource stays open: close it, which also ends the read or accept Deno
   * still has in flight for it.
   *
   * @param resource A registered resource.
   * @returns The key it had.
   * @throws {Error} If the resource is not registered.
   */
  unregister(resource: Resource): SelectorKey {
    const key = this.#keyOf(resource);
    this.#keys.delete(resource);
    key.cancel();
    if (this.#keys.size === 0) this.#core.wakeUp(); // nothing left to wait for
    return key;
  }

  /**
   * The key of a registered resource.
   *
   * @param resource Any resource.
   * @returns Its key, or `undefined` if it is not registered.
   */
  getKey(resource: Resource): SelectorKey | undefined {
    return this.#keys.get(resource);
  }

  /**
   * Waits until at least one registered resource is ready, or the timeout passes.
   * A key stays ready until its callback takes the result (level-triggered).
   *
   * @param timeout Milliseconds to wait at most; 0 polls; omit to wait until
   *   something is ready (an empty selector returns at once).
   * @returns `[key, mask]` pairs, mask being the ready events of interest. The
   *   array and the pairs are reused by the next call.
   */
  async select(timeout?: number): Promise<ReadyEvent[]> {
    this.#enter();
    try {
      const waiting = this.#prepare(timeout);
      if (waiting) await waiting;
      return this.#collect();
    } finally {
      this.#selecting = false;
    }
  }

  /**
   * The loop: select, then call each ready key's callback with its mask, until
   * the selector is closed or no resource is left.
   *
   * @returns A promise that settles when the loop ends; it rejects if a callback throws.
   */
  async run(): Promise<void> {
    this.#enter();
    const { trace } = this.#core;
    try {
      while (!this.#closed && this.#keys.size > 0) {
        const waiting = this.#prepare(undefined); // select(), without a promise of its own
        if (waiting) await waiting;
        const events = this.#collect();
        for (let i = 0; i < events.length; i++) {
          const key = events[i][0] as Key;
          if (!key.registered) continue;
          if (trace) trace({ step: "callback", key, mask: events[i][1] });
          key.callback(key, events[i][1]);
        }
      }
    } finally {
      this.#selecting = false;
    }
  }

  /**
   * Unregisters and closes every resource (closing is the only way to end the
   * reads and accepts Deno has in flight), and ends `run()`.
   */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const [resource, key] of this.#keys) {
      key.cancel();
      try {
        resource.close();
      } catch {
        // already closed by its owner
      }
    }
    this.#keys.clear();
    this.#core.gate?.close();
    this.#core.wakeUp();
  }

  #enter(): void {
    if (this.#selecting) throw new Error("Cannot select: another select() is waiting");
    this.#selecting = true;
  }

  /** What select() does before it waits: returns what to wait for, if anything. */
  #prepare(timeout: number | undefined): Promise<unknown> | undefined {
    const core = this.#core;
    const relisted = core.unpinAll();
    if (relisted > 0 && relisted === core.readyCount) {
      // Only old events: let Deno poll I/O first, or this loop would starve it.
      return new Promise((resolve) => setTimeout(resolve, 0));
    }
    if (core.readyCount === 0 && !this.#closed && this.#keys.size > 0 && timeout !== 0) {
      return core.wait(timeout);
    }
  }

  /** What select() does once it has waited: takes the ready keys. */
  #collect(): ReadyEvent[] {
    const core = this.#core;
    const events = core.collect(this.#events);
    this.#now = performance.now();
    core.gate?.selected(this.#now);
    core.trace?.({ step: "select", ready: events });
    return events;
  }

  #keyOf(resource: Resource): Key {
    const key = this.#keys.get(resource);
    if (!key) throw new Error("The resource is not registered");
    return key;
  }
}

/**
 * What every selector offers, as Python's `BaseSelector` states it once for
 * all of them: the public API of {@linkcode Selector}. Code written against
 * it (async_loop.ts, the server) runs on any selector; epoll.ts is another.
 */
export type BaseSelector = Pick<
  Selector,
  | "highWaterMark"
  | "lowWaterMark"
  | "size"
  | "now"
  | "register"
  | "modify"
  | "unregister"
  | "getKey"
  | "select"
  | "run"
  | "close"
>;

/** Checks an interest mask: READ and WRITE bits only, READ only for a listener. */
function checkEvents(resource: Resource, events: number): number {
  const isListener = !("remoteAddr" in resource) && !("receive" in resource);
  const valid = isListener ? READ : READ | WRITE;
  if (!Number.isInteger(events) || (events & ~valid) !== 0) {
    throw new RangeError(
      `Invalid events ${events}: a ${
        isListener ? "listener takes READ" : "connection or datagram socket takes READ and WRITE"
      }`,
    );
  }
  return events;
}

// ===========================================================================
// §2 The core: the ready list, and the keys that fill it
// ===========================================================================

/**
 * What every key of one selector shares: the ready list, the wake-up of the
 * waiting `select()`, and the keys whose bytes are pinned until the next one.
 *
 * A key is on the ready list at most once (`key.listed`). Each `select()`
 * takes the whole list and reports the keys that are still ready for an event
 * of interest; a key whose callback did not take its result is put back by
 * the next `select()`, as a level-triggered selector reports it again.
 */
class SelectorCore {
  /** Keys that may be ready, each once: what the next select() looks at. */
  #ready: Key[] = [];
  /** The previous ready array, swapped in by collect() so that no turn allocates. */
  #spare: Key[] = [];
  /** Keys whose read buffer the caller may still be looking at: unpinned by the next select(). */
  #pinned: Key[] = [];
  /** Resolves the waiting select(), while one waits. */
  #wake: (() => void) | undefined = undefined;

  constructor(
    /** Queued bytes above which a connection stops reading (backpressure). */
    readonly highWaterMark: number,
    /** Queued bytes at or below which a paused connection reads again. */
    readonly lowWaterMark: number,
    /** The selector's trace function, if any: keys report backpressure through it. */
    readonly trace: ((event: TraceEvent) => void) | undefined,
    /** The plug-in that decides when reads start, if any. */
    readonly gate: ReadGate | undefined,
  ) {}

  /** How many keys are on the ready list. */
  get readyCount(): number {
    return this.#ready.length;
  }

  /** Puts a key that may be ready on the ready list, and wakes select(); returns whether it was added. */
  markReady(key: Key): boolean {
    if (key.listed || !key.registered || !(key.readiness & key.events)) return false;
    key.listed = true;
    this.#ready.push(key);
    this.wakeUp();
    return true;
  }

  /** Pins a key's read buffer: no read may reuse it until the next select(). */
  pin(key: Key): void {
    key.pinned = true;
    this.#pinned.push(key);
  }

  /** Unpins the keys pinned since the last select(); returns how many went back on the ready list. */
  unpinAll(): number {
    let relisted = 0;
    for (const key of this.#pinned) if (key.unpin()) relisted++;
    this.#pinned.length = 0;
    return relisted;
  }

  /** Waits until a key is marked ready or the timeout passes (`undefined`: no timeout). */
  wait(timeout: number | undefined): Promise<void> {
    if (timeout === undefined) return new Promise<void>(this.#waitForever);
    return new Promise<void>((resolve) => {
      const timer = setTimeout(() => {
        this.#wake = undefined;
        resolve();
      }, timeout);
      this.#wake = () => {
        clearTimeout(timer);
        resolve();
      };
    });
  }

  /** The executor of wait() without a timeout, made once. */
  #waitForever = (resolve: () => void): void => {
    this.#wake = resolve;
  };

  /** Ends the wait of select(), if one waits. */
  wakeUp(): void {
    const wake = this.#wake;
    this.#wake = undefined;
    wake?.();
  }

  /** Takes the ready list: fills `events` with the keys still ready, and pins each one reported. */
  collect(events: ReadyEvent[]): ReadyEvent[] {
    const ready = this.#ready;
    this.#ready = this.#spare;
    this.#spare = ready;
    events.length = 0;
    for (let i = 0; i < ready.length; i++) {
      const key = ready[i];
      key.listed = false;
      const mask = key.readiness & key.events;
      if (!key.registered || mask === 0) continue;
      key.event[1] = mask;
      events.push(key.event);
      if (!key.pinned) this.pin(key);
    }
    ready.length = 0;
    return events;
  }
}

// Keys of any data type live in one map; the public type is SelectorKey<T>.
// deno-lint-ignore no-explicit-any
type AnyData = any;

/** What every key shares; the implementation of SelectorKey. */
abstract class Key implements SelectorKey<AnyData> {
  error: Error | undefined = undefined;
  /** The `[key, mask]` pair select() reports for this key, made once and reused. */
  readonly event: ReadyEvent;
  /** True while on the ready list, so that it is never listed twice. */
  listed = false;
  /** False once unregistered: late completions are then dropped. */
  registered = true;
  /** True from the select() that reported the key (or from recv()) to the next select(). */
  pinned = false;

  constructor(
    readonly resource: Resource,
    public events: number,
    public callback: Callback<AnyData>,
    public data: AnyData,
    /** The ready list and what else the selector's keys share. */
    protected readonly core: SelectorCore,
  ) {
    this.event = [this, 0];
  }

  /** The events the key is ready for, whatever its interest. */
  abstract get readiness(): number;
  /** Starts the next accept or read, if the key wants one and nothing holds it back. */
  abstract startNext(): void;
  /** Drops everything pending; late completions are ignored from now on. */
  abstract cancel(): void;

  get queued(): number {
    return 0;
  }

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

  retain(): void {
    throw new TypeError("retain() needs a connection's or datagram socket's key");
  }

  release(): void {
    throw new TypeError("release() needs a connection's or datagram socket's key");
  }

  /**
   * Called by the next select(): the bytes recv() handed out may be reused now.
   * A key still ready (its callback did not take the result) goes back on the
   * ready list.
   *
   * @returns Whether the key went back on the ready list.
   */
  unpin(): boolean {
    this.pinned = false;
    if (!this.registered) return false;
    this.startNext();
    return this.core.markReady(this);
  }
}

/** Back-off between accepts while the process is out of file descriptors: doubles from min to max. */
const MIN_BACKOFF_MS = 10;
const MAX_BACKOFF_MS = 500;

/** Accept errors caused by a peer that left before we accepted it: not reported, retried at once. */
function peerLeft(error: unknown): boolean {
  return error instanceof Deno.errors.NotConnected ||
    error instanceof Deno.errors.ConnectionAborted ||
    error instanceof Deno.errors.ConnectionReset;
}

/** Errors that mean the resource itself is gone (closed): never retry. */
function resourceGone(error: unknown): boolean {
  return error instanceof Deno.errors.BadResource ||
    error instanceof Deno.errors.Interrupted;
}

/**
 * A listener's key: keeps one accept in flight. When accepting fails for want
 * of descriptors (EMFILE), retrying at once would spin the CPU, so it backs off.
 */
class ListenerKey extends Key {
  /** True while an accept() is pending: one at a time. */
  #accepting = false;
  /** The connection accepted and not yet taken by accept(). */
  #accepted: Deno.Conn | null = null;
  /** True once the listener is closed: no accept will ever work again. */
  #gone = false;
  /** The current back-off: 0 after a success, doubling with each failure. */
  #backoffMs = 0;
  /** performance.now() before which no accept is tried. */
  #retryAt = 0;
  /** The timer that ends a back-off. */
  #retryTimer: ReturnType<typeof setTimeout> | undefined = undefined;

  get readiness(): number {
    return this.error || this.#accepted ? READ : 0;
  }

  override accept(): Deno.Conn {
    const conn = this.#accepted;
    this.#accepted = null;
    if (conn) return conn;
    const error = this.error;
    if (!this.#gone) this.error = undefined; // accept errors pass; the next accept may work
    throw error ?? new Deno.errors.WouldBlock("accept() before the key was ready");
  }

  startNext(): void {
    if (
      this.#accepting || !this.registered || !(this.events & READ) || this.error ||
      this.#accepted || this.#retryTimer
    ) return;
    const wait = this.#retryAt && this.#retryAt - performance.now();
    if (wait > 0) {
      this.#retryTimer = setTimeout(this.#retry, wait);
      return;
    }
    this.#accepting = true;
    (this.resource as Deno.Listener).accept().then(this.#onAccept, this.#onAcceptError);
  }

  cancel(): void {
    this.registered = false;
    clearTimeout(this.#retryTimer);
    this.#retryTimer = undefined;
    this.#accepted?.close(); // accepted by us, never handed out
    this.#accepted = null;
  }

  #onAccept = (conn: Deno.Conn): void => {
    this.#accepting = false;
    this.#backoffMs = 0;
    this.#retryAt = 0;
    if (!this.registered) return conn.close();
    this.#accepted = conn;
    this.core.markReady(this);
  };

  #onAcceptError = (error: Error): void => {
    this.#accepting = false;
    if (!this.registered) return;
    if (peerLeft(error)) return this.startNext(); // nothing to report: accept the next one
    if (resourceGone(error)) this.#gone = true;
    else {
      this.#backoffMs = Math.min(MAX_BACKOFF_MS, Math.max(MIN_BACKOFF_MS, this.#backoffMs * 2));
      this.#retryAt = performance.now() + this.#backoffMs;
    }
    this.error = error;
    this.core.markReady(this);
  };

  #retry = (): void => {
    this.#retryTimer = undefined;
    this.#retryAt = 0;
    this.startNext();
  };
}

/**
 * Bytes waiting to be written, in order: a connection's chunks, or a datagram
 * socket's datagrams with their addresses. One array with a moving head, since
 * shifting the array on each write would cost O(n).
 */
class SendQueue {
  /** The chunks, from #head on; those before are written. */
  #chunks: (Uint8Array | undefined)[] = [];
  /** Each datagram's address, at its chunk's index (datagram sockets only). */
  #to: (Deno.Addr | undefined)[] = [];
  #head = 0;
  /** Bytes in the queue. */
  bytes = 0;

  /** Chunks in the queue, the one being written included. */
  get length(): number {
    return this.#chunks.length - this.#head;
  }

  /** The chunk to write next. */
  get first(): Uint8Array {
    return this.#chunks[this.#head]!;
  }

  /** The address of the datagram to send next. */
  get firstTo(): Deno.Addr {
    return this.#to[this.#head]!;
  }

  /** Adds a chunk, and for a datagram its address (then every chunk has one). */
  push(chunk: Uint8Array, to?: Deno.Addr): void {
    this.#chunks.push(chunk);
    if (to) this.#to.push(to);
    this.bytes += chunk.byteLength;
  }

  /** `n` bytes of the first chunk are written: keeps the rest, or removes it and returns it. */
  written(n: number): Uint8Array | undefined {
    const chunk = this.#chunks[this.#head]!;
    this.bytes -= n;
    if (n < chunk.byteLength) {
      this.#chunks[this.#head] = chunk.subarray(n); // a partial write: go on with the rest
      return undefined;
    }
    this.#chunks[this.#head] = undefined;
    if (this.#to.length > 0) this.#to[this.#head] = undefined;
    if (++this.#head === this.#chunks.length) {
      this.#chunks.length = this.#to.length = this.#head = 0;
    }
    return chunk;
  }

  /** Empties the queue, except the first chunk if `keepFirst` (its write is in flight). */
  drop(keepFirst: boolean, dropped: (chunk: Uint8Array) => void): void {
    const from = keepFirst ? this.#head + 1 : this.#head;
    for (let i = from; i < this.#chunks.length; i++) dropped(this.#chunks[i]!);
    if (keepFirst) {
      this.#chunks.length = from;
      if (this.#to.length > from) this.#to.length = from;
    } else this.#chunks.length = this.#to.length = this.#head = 0;
    this.bytes = 0;
  }
}

/**
 * Zero-copy echo. recv() hands out the key's read buffer itself, not a copy, so
 * `send(recv())` writes those very bytes. While any of them wait in a send
 * queue (on this key or another), or while the caller retains them, the
 * buffer is *lent*, and the key starts no read, since a read would overwrite
 * them; the last write of a lent chunk, or release(), returns it. This map
 * finds the key a buffer belongs to, from any send queue.
 */
const lenders = new WeakMap<ArrayBufferLike, BufferedKey>();

/**
 * What connection and datagram keys share: a read buffer lent while its bytes
 * wait in a send queue or are retained, and the send queue, written one chunk
 * at a time, with backpressure.
 */
abstract class BufferedKey extends Key {
  /** The read buffer: recv() and recvfrom() hand out views of it (see `lenders`). */
  protected buf: Uint8Array | undefined = undefined;
  /** What send() or sendto() queued and is not yet written. */
  protected readonly queue = new SendQueue();
  /** True while a write of the queue's first chunk is pending: one at a time, in order. */
  protected writing = false;
  /** Backpressure: true from above the high-water mark until back at the low-water mark. */
  #paused = false;
  /** Views of `buf` lent out: waiting in some send queue, plus one while retained. No read while any. */
  #loans = 0;
  /** True between retain() and release(). */
  #retained = false;

  override get queued(): number {
    return this.queue.bytes;
  }

  /** Whether no read may start now: the buffer is lent or retained, or backpressure pauses reading. */
  protected get blocked(): boolean {
    return this.#loans > 0 || this.#paused;
  }

  /** Writes the queue's first chunk; resolves with the bytes written. */
  protected abstract write(): Promise<number>;
  /** Whether a failed write ends the key (a connection's does; a datagram is just dropped). */
  protected abstract fatal(error: Error): boolean;

  /** Makes the read buffer, of `size` bytes, if it has another size. */
  protected bufferOf(size: number): Uint8Array {
    if (this.buf?.byteLength !== size) {
      this.buf = new Uint8Array(size);
      lenders.set(this.buf.buffer, this);
    }
    return this.buf;
  }

  override retain(): void {
    if (this.#retained) return;
    this.#retained = true;
    this.countLoans(1);
  }

  override release(): void {
    if (!this.#retained) return;
    this.#retained = false;
    this.countLoans(-1);
  }

  /** Queues a chunk (with its address, for a datagram); pauses reading above the high-water mark. */
  protected enqueue(bytes: Uint8Array, to?: Deno.Addr): void {
    this.#loan(bytes, 1);
    this.queue.push(bytes, to);
    if (this.queue.bytes > this.core.highWaterMark && !this.#paused) {
      this.#paused = true;
      this.core.trace?.({ step: "pause", key: this });
    }
    if (!this.writing) this.#writeNext();
  }

  /** Drops the queue: nothing more will be written (a write in flight returns its chunk later). */
  protected dropQueue(): void {
    this.queue.drop(this.writing, this.#returnChunk);
  }

  #writeNext(): void {
    this.writing = true;
    this.write().then(this.#onWrite, this.#onWriteError);
  }

  #onWrite = (n: number): void => {
    this.writing = false;
    this.core.gate?.writeDone();
    const queue = this.queue;
    if (!this.registered) return this.#loan(queue.first, -1); // dropped but for this chunk
    const chunk = queue.written(n);
    if (chunk) this.#loan(chunk, -1);
    if (this.#paused && queue.bytes <= this.core.lowWaterMark) {
      this.#paused = false;
      this.core.trace?.({ step: "resume", key: this });
      this.startNext();
    }
    if (queue.length > 0) this.#writeNext();
    else if (this.events & WRITE) this.core.markReady(this);
  };

  #onWriteError = (error: Error): void => {
    if (!this.fatal(error) || !this.registered) return this.#onWrite(this.queue.first.byteLength);
    this.writing = false;
    this.#loan(this.queue.written(this.queue.first.byteLength)!, -1);
    this.dropQueue(); // nothing more can be written
    this.fail(error);
  };

  /** The key has failed for good: it reports the error, as READ and WRITE. */
  protected fail(error: Error): void {
    this.error ??= error;
    this.core.markReady(this);
  }

  #returnChunk = (chunk: Uint8Array): void => this.#loan(chunk, -1);

  /** Tells the key whose buffer `bytes` come from that they enter (+1) or leave (-1) a queue. */
  #loan(bytes: Uint8Array, delta: number): void {
    if (bytes.buffer === this.buf?.buffer) this.countLoans(delta); // an echo: our own buffer
    else lenders.get(bytes.buffer)?.countLoans(delta);
  }

  /** Counts views of this key's buffer lent out (+1) or returned (-1); reads again at 0. */
  countLoans(delta: number): void {
    this.#loans += delta;
    if (this.#loans === 0) this.startNext();
  }
}

/**
 * Read sizes. V8 zero-fills every buffer, so each one is resident memory: an
 * idle connection waits on MIN_READ bytes. A read that fills its buffer makes
 * the next one 4 times larger, up to MAX_READ; a read of a sixteenth or less
 * drops it back to MIN_READ.
 */
const MIN_READ = 256;
const MAX_READ = 64 * 1024;

/** A connection's key: keeps one read in flight, and writes what send() queues. */
class ConnKey extends BufferedKey implements GatedRead {
  gateNote: unknown = undefined;
  /** True while a read() is pending: one at a time. */
  #reading = false;
  /** What the last read gave and recv() has not taken: a byte count, null at EOF. */
  #received: number | null | undefined = undefined;
  /** The size of the next read buffer. */
  #nextSize = MIN_READ;

  get readiness(): number {
    if (this.error) return READ | WRITE;
    return (this.#received !== undefined ? READ : 0) | (this.queue.length === 0 ? WRITE : 0);
  }

  override recv(): Uint8Array | null {
    if (this.error) throw this.error;
    const n = this.#received;
    if (n === undefined) throw new Deno.errors.WouldBlock("recv() before the key was ready");
    if (n === null) return null; // EOF stays readable, as on a socket
    this.#received = undefined;
    if (!this.pinned) this.core.pin(this); // the bytes are the caller's until select()
    return this.buf!.subarray(0, n);
  }

  override send(bytes: Uint8Array): void {
    if (this.error) throw this.error;
    if (!this.registered) throw new Deno.errors.BadResource("send() on an unregistered key");
    if (bytes.byteLength > 0) this.enqueue(bytes);
  }

  startNext(): void {
    if (
      this.#reading || !this.registered || !(this.events & READ) || this.error ||
      this.#received !== undefined || this.pinned || this.blocked
    ) return;
    const gate = this.core.gate;
    if (gate && !gate.admit(this)) return; // held back: the gate starts it later
    this.#reading = true;
    const buf = this.bufferOf(this.#nextSize);
    (this.resource as Deno.Conn).read(buf).then(this.#onRead, this.#onReadError);
  }

  cancel(): void {
    this.registered = false;
    this.dropQueue();
  }

  protected write(): Promise<number> {
    return (this.resource as Deno.Conn).write(this.queue.first);
  }

  protected fatal(): boolean {
    return true;
  }

  #onRead = (n: number | null): void => {
    this.#reading = false;
    if (this.registered) {
      const size = this.buf!.byteLength;
      if (n === size) this.#nextSize = Math.min(MAX_READ, size * 4);
      else if (n !== null && n <= size / 16) this.#nextSize = MIN_READ;
      this.#received = n;
      this.core.markReady(this);
    }
    this.core.gate?.readDone(this); // last: the gate may start reads, and must not start ours
  };

  #onReadError = (error: Error): void => {
    this.#reading = false;
    if (this.registered) this.fail(error);
    this.core.gate?.readDone(this); // last, as in #onRead
  };
}

/** The receive buffer of a datagram socket: the largest UDP payload fits whole. */
const DATAGRAM_BUFFER = 65_536;
/** After a receive error other than closing, the next receive waits this long (no spin). */
const DATAGRAM_RETRY_MS = 10;

/**
 * A datagram socket's key: keeps one receive in flight (concurrent receives
 * complete out of order) into a buffer that holds any datagram whole, and
 * sends what sendto() queues, one datagram at a time, in order. A read gate
 * does not apply: it is one socket.
 */
class DatagramKey extends BufferedKey {
  /** True while a receive() is pending. */
  #receiving = false;
  /** The datagram received and not yet taken, and its sender. */
  #datagram: Uint8Array | undefined = undefined;
  #from: Deno.Addr | undefined = undefined;
  /** True once the socket is closed: no receive will ever work again. */
  #gone = false;
  /** The timer that ends the pause after a receive error. */
  #retryTimer: ReturnType<typeof setTimeout> | undefined = undefined;

  get readiness(): number {
    if (this.error) return READ | WRITE;
    return (this.#datagram ? READ : 0) | (this.queue.length === 0 ? WRITE : 0);
  }

  override recvfrom(): [Uint8Array, Deno.Addr] {
    const datagram = this.#datagram;
    if (datagram) {
      this.#datagram = undefined;
      if (!this.pinned) this.core.pin(this); // the bytes are the caller's until select()
      return [datagram, this.#from!];
    }
    const error = this.error;
    if (!error) throw new Deno.errors.WouldBlock("recvfrom() before the key was ready");
    if (!this.#gone) { // a passing error: receive again after a pause
      this.error = undefined;
      this.#retryTimer = setTimeout(this.#retry, DATAGRAM_RETRY_MS);
    }
    throw error;
  }

  override sendto(bytes: Uint8Array, addr: Deno.Addr): void {
    if (this.#gone) throw this.error;
    if (!this.registered) throw new Deno.errors.BadResource("sendto() on an unregistered key");
    this.enqueue(bytes, addr);
  }

  startNext(): void {
    if (
      this.#receiving || !this.registered || !(this.events & READ) || this.error ||
      this.#datagram || this.pinned || this.blocked || this.#retryTimer
    ) return;
    this.#receiving = true;
    (this.resource as Deno.DatagramConn).receive(this.bufferOf(DATAGRAM_BUFFER)).then(
      this.#onReceive,
      this.#onReceiveError,
    );
  }

  cancel(): void {
    this.registered = false;
    clearTimeout(this.#retryTimer);
    this.#retryTimer = undefined;
    this.dropQueue();
  }

  protected async write(): Promise<number> {
    const datagram = this.queue.first;
    await (this.resource as Deno.DatagramConn).send(datagram, this.queue.firstTo);
    return datagram.byteLength;
  }

  /** A datagram the kernel refuses is dropped, as UDP drops; only a closed socket ends the key. */
  protected fatal(error: Error): boolean {
    if (!resourceGone(error)) return false;
    this.#gone = true;
    return true;
  }

  #onReceive = ([datagram, from]: [Uint8Array, Deno.Addr]): void => {
    this.#receiving = false;
    if (!this.registered) return;
    this.#datagram = datagram;
    this.#from = from;
    this.core.markReady(this);
  };

  #onReceiveError = (error: Error): void => {
    this.#receiving = false;
    if (!this.registered) return;
    if (resourceGone(error)) this.#gone = true;
    this.error = error;
    this.core.markReady(this);
  };

  #retry = (): void => {
    this.#retryTimer = undefined;
    this.startNext();
  };
}
