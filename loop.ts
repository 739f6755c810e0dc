/**
 * A readiness dispatcher for Deno, shaped like Python's `selectors` module:
 * register resources with the events you want, `select()` the ready ones, and
 * call their callbacks from one loop.
 *
 * Deno offers completions (promises), not readiness (epoll). So for each key
 * the dispatcher keeps one operation in flight, an `accept()` or a `read()`;
 * when it completes, the key goes on the ready list and `select()` wakes up.
 * The callback then takes the result with {@linkcode SelectorKey.accept} or
 * {@linkcode SelectorKey.recv} ("should be ready", as in Python), and the next
 * operation starts. {@linkcode SelectorKey.send} queues bytes; the dispatcher
 * writes every one, and a key is WRITE-ready when its queue is written.
 *
 * The lesson's `for key, mask in sel.select(): key.data(key.fileobj, mask)` is
 * `for (const [key, mask] of await selector.select()) key.callback(key, mask)`,
 * and {@linkcode Selector.run} is that loop, until the selector is closed.
 *
 * It reads top-down: §1 the public API, §2 the core (the ready list and the
 * keys). It imports nothing: copy it as it is. fairness.ts is a plug-in for
 * a process that saturates its CPU (`new Selector({ readGate: new Fairness() })`).
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
 * assertEquals(await new Response(conn.readable).text(), "hello");
 *
 * selector.close(); // closes the listener too, and ends run()
 * await serving;
 * ```
 *
 * @module
 */

// §1 The public API ==========================================================

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

/** A datagram (UDP) socket, as a selector's users see it: `Deno.DatagramConn` is one. */
export type DatagramResource = ListenerResource;

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

/** What can be registered: Deno's own for this selector; sockets of its own kind for another. */
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
  /** What {@linkcode Selector.run} calls when the key is ready (a method, so any key is a `SelectorKey`). */
  callback(key: SelectorKey<T>, mask: number): void;
  /** Anything you attach to the key. */
  data: T;
  /** Bytes queued by `send()` or `sendto()` and not yet written. */
  readonly queued: number;
  /** The error that ended this connection, if one did (a reset, a broken pipe...). */
  readonly error: Error | undefined;
  /**
   * Takes the connection a READ-ready listener key accepted, or throws why the
   * accept failed ("Too many open files": the selector backs off meanwhile).
   */
  accept(): ConnResource;
  /**
   * Takes what a READ-ready connection key received: bytes, valid until the next
   * `select()` or until written if you `send()` them, or `null` at EOF; or throws
   * the error the connection failed with (`Deno.errors.ConnectionReset`...).
   */
  recv(): Uint8Array | null;
  /** Queues bytes, all written in order; reading pauses above the high-water mark. */
  send(bytes: Uint8Array): void;
  /** Takes the datagram a READ-ready datagram key received, whole, and its sender. */
  recvfrom(): [Uint8Array, Deno.Addr];
  /** Queues a datagram for `addr`; one the kernel refuses is dropped, as UDP drops. */
  sendto(bytes: Uint8Array, addr: Deno.Addr): void;
  /**
   * Keeps the bytes of the last `recv()` valid past the next `select()` (the key
   * reads nothing, so reports no READ) until `release()`: for code that hands them on.
   */
  retain(): void;
  /** Ends a `retain()`: the key may read into its buffer again. */
  release(): void;
}

/** One step of the loop, for {@linkcode SelectorOptions.trace}: what a learner would want to see. */
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

/** A plug-in that decides when connections' reads start (fairness.ts); called at these points. */
export interface ReadGate {
  /** A connection's read is about to start: may it? If not, the gate calls `read.startNext()` later. */
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
 * Waits for registered resources to become ready and dispatches their callbacks,
 * at a cost per event that does not grow with the number of keys.
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

  /** Creates a selector, with backpressure thresholds, a trace function and a read gate if given. */
  constructor(options: SelectorOptions = {}) {
    const { highWaterMark = 64 * 1024, lowWaterMark = 16 * 1024, trace, readGate } = options;
    if (!(lowWaterMark >= 0 && highWaterMark >= lowWaterMark)) {
      throw new RangeError(`Water marks need 0 <= low <= high: ${lowWaterMark}, ${highWaterMark}`);
    }
    this.highWaterMark = highWaterMark;
    this.lowWaterMark = lowWaterMark;
    this.#core = new SelectorCore(highWaterMark, lowWaterMark, trace, readGate);
  }

  /** How many resources are registered. */
  get size(): number {
    return this.#keys.size;
  }

  /** performance.now() when select() last returned (asyncio's `loop.time()`): no clock read per callback. */
  get now(): number {
    return this.#now;
  }

  /**
   * Starts watching a resource for `events`: {@linkcode READ}, {@linkcode WRITE}
   * (not for listeners), both, or 0. {@linkcode Selector.run} calls `callback`
   * when the key is ready; `data` is anything you attach.
   *
   * @throws {Error} If the resource is already registered or the selector is closed.
   */
  register<T = undefined>(
    resource: Resource,
    events: number,
    callback: Callback<T>,
    data?: T,
  ): SelectorKey<T> {
    if (this.#closed) throw new Error("Cannot register: the selector is closed");
    if (this.#keys.has(resource)) throw new Error("Cannot register: it is already registered");
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
   * Changes a registered resource's interest, and its callback or data if given
   * (kept if omitted). Interest 0 pauses it: nothing reported, nothing started.
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
    key.startNext();
    this.#core.markReady(key);
    return key;
  }

  /**
   * Stops watching a resource and drops what is pending for it: an accepted
   * connection not yet taken, received bytes, bytes queued by `send()`. The
   * resource stays open: close it, which also ends what Deno has in flight.
   *
   * @throws {Error} If the resource is not registered.
   */
  unregister(resource: Resource): SelectorKey {
    const key = this.#keyOf(resource);
    this.#keys.delete(resource);
    key.cancel();
    if (this.#keys.size === 0) this.#core.wakeUp(); // nothing left to wait for
    return key;
  }

  /** The key of a registered resource, or `undefined`. */
  getKey(resource: Resource): SelectorKey | undefined {
    return this.#keys.get(resource);
  }

  /**
   * Waits until a registered resource is ready, or `timeout` milliseconds pass
   * (0 or less polls; none, or more than setTimeout can count (2^31-1), waits
   * without limit, but an empty selector returns at once). A key stays ready
   * until its callback takes the result (level-triggered).
   *
   * @returns `[key, mask]` pairs, mask being the ready events of interest; the
   *   next call reuses the array and the pairs.
   */
  async select(timeout?: number): Promise<ReadyEvent[]> {
    if (this.#selecting) throw new Error("Cannot select: another select() is waiting");
    this.#selecting = true;
    try {
      const waiting = this.#core.prepare(timeout, this.#closed || this.#keys.size === 0);
      if (waiting) await waiting;
      return this.#collect();
    } finally {
      this.#selecting = false;
    }
  }

  /** The loop: select, call each ready key's callback, until closed or empty; rejects if one throws. */
  async run(): Promise<void> {
    if (this.#selecting) throw new Error("Cannot select: another select() is waiting");
    this.#selecting = true;
    const { trace } = this.#core;
    try {
      while (!this.#closed && this.#keys.size > 0) {
        // select(), without a promise of its own:
        const waiting = this.#core.prepare(undefined, this.#keys.size === 0);
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

  /** Unregisters and closes every resource (the only way to end what Deno has in flight); ends run(). */
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

/** What every selector offers (Python's `BaseSelector`): code written against it runs on any. */
export type BaseSelector = Pick<Selector, keyof Selector>;

/** Checks an interest mask: READ and WRITE bits only, READ only for a listener. */
function checkEvents(resource: Resource, events: number): number {
  return checkInterest(events, !("remoteAddr" in resource) && !("receive" in resource));
}

/**
 * Checks an interest mask: READ and WRITE bits only, and READ only for a
 * listener. Both selectors use it (epoll.ts tells its own listeners apart).
 *
 * @param events The mask.
 * @param listener Whether the resource is a listener.
 * @returns The mask.
 * @throws {RangeError} Saying what the resource takes.
 */
export function checkInterest(events: number, listener: boolean): number {
  const valid = listener ? READ : READ | WRITE;
  if (Number.isInteger(events) && (events & ~valid) === 0) return events;
  const takes = listener
    ? "listener takes READ"
    : "connection or datagram socket takes READ and WRITE";
  throw new RangeError(`Invalid events ${events}: a ${takes}`);
}

// §2 The core: the ready list, and the keys that fill it ======================

/** The longest select() timeout (ms) setTimeout counts; a longer one waits without limit. */
export const MAX_TIMEOUT = 2 ** 31 - 1;

/**
 * What one selector's keys share: the ready list, the wake-up of `select()`, the keys
 * pinned until the next one. Each `select()` takes the list and reports the keys still
 * ready; a key whose callback did not take its result is listed again (level-triggered).
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

  /** The selector's water marks, trace function and read gate: what its keys use of its options. */
  constructor(
    readonly highWaterMark: number,
    readonly lowWaterMark: number,
    readonly trace: ((event: TraceEvent) => void) | undefined,
    readonly gate: ReadGate | undefined,
  ) {}

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
  #unpinAll(): number {
    let relisted = 0;
    for (const key of this.#pinned) if (key.unpin()) relisted++;
    this.#pinned.length = 0;
    return relisted;
  }

  /**
   * What select() does before it waits: unpins the keys pinned since the last
   * one, and returns what to wait for: a key marked ready, or `timeout` ms
   * (none: no timeout), if nothing is ready and `idle` is false.
   */
  prepare(timeout: number | undefined, idle: boolean): Promise<void> | undefined {
    const relisted = this.#unpinAll();
    if (relisted > 0 && relisted === this.#ready.length) {
      // Only old events: let Deno poll I/O first, or this loop would starve it.
      return new Promise((resolve) => setTimeout(resolve, 0));
    }
    const polls = timeout !== undefined && !(timeout > 0); // 0, less, or NaN
    if (this.#ready.length === 0 && !idle && !polls) return this.#wait(timeout);
  }

  #wait(timeout: number | undefined): Promise<void> {
    const waiting = new Promise<void>(this.#waitForever);
    if (timeout === undefined || timeout > MAX_TIMEOUT) return waiting; // past setTimeout's range
    const timer = setTimeout(() => this.wakeUp(), timeout);
    return waiting.finally(() => clearTimeout(timer));
  }

  /** The executor of wait()'s promise, made once. */
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

/**
 * What every key shares. Each kind keeps one operation in flight (an accept, a read, a
 * receive); its result waits, READ-ready, until the callback takes it; then the next starts.
 */
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
  /** True once the resource is closed: its error stays, and nothing is tried again. */
  gone = false;
  /** After a passing error, the timer before the next try: no spinning on a failure. */
  retryTimer: ReturnType<typeof setTimeout> | undefined = undefined;

  constructor(
    readonly resource: Resource,
    public events: number,
    public callback: Callback<AnyData>,
    public data: AnyData,
    protected readonly core: SelectorCore, // the ready list, and what else the keys share
  ) {
    this.event = [this, 0];
  }

  /** The events the key is ready for, whatever its interest. */
  abstract get readiness(): number;
  /** Starts the next operation, if the key wants one and nothing holds it back. */
  abstract startNext(): void;

  /** Drops everything pending; late completions are ignored from now on. */
  cancel(): void {
    this.registered = false;
    clearTimeout(this.retryTimer);
  }

  /** Reports a failed accept or receive, and retries in `ms`, unless the resource is gone. */
  protected retryLater(error: Error, ms: number): void {
    if (resourceGone(error)) this.gone = true;
    else this.retryTimer = setTimeout(this.#retry, ms);
    this.error = error;
    this.core.markReady(this);
  }

  #retry = (): void => {
    this.retryTimer = undefined;
    this.startNext();
  };

  /** Throws the error a READ-ready key reports; it passes, unless the resource is gone. */
  protected throwError(call: string): never {
    const error = this.error;
    if (!this.gone) this.error = undefined;
    throw error ?? new Deno.errors.WouldBlock(`${call} before the key was ready`);
  }

  get queued(): number {
    return 0;
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
  retain(): void {
    throw new TypeError("retain() needs a connection's or datagram socket's key");
  }
  release(): void {
    throw new TypeError("release() needs a connection's or datagram socket's key");
  }

  /** Called by the next select(): the buffer is free again; a key still ready is relisted (true). */
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

/** A listener's key: its operation is an accept; out of descriptors (EMFILE), it backs off. */
class ListenerKey extends Key {
  /** True while an accept() is pending. */
  #accepting = false;
  /** The connection accepted and not yet taken by accept(). */
  #accepted: Deno.Conn | null = null;
  /** The current back-off: 0 after a success, doubling with each failure. */
  #backoffMs = 0;

  get readiness(): number {
    return this.error || this.#accepted ? READ : 0;
  }

  override accept(): Deno.Conn {
    const conn = this.#accepted;
    this.#accepted = null;
    return conn ?? this.throwError("accept()");
  }

  startNext(): void {
    if (
      this.#accepting || !this.registered || !(this.events & READ) || this.error ||
      this.#accepted || this.retryTimer
    ) return;
    this.#accepting = true;
    (this.resource as Deno.Listener).accept().then(this.#onAccept, this.#onAcceptError);
  }

  override cancel(): void {
    super.cancel();
    this.#accepted?.close(); // accepted by us, never handed out
    this.#accepted = null;
  }

  #onAccept = (conn: Deno.Conn): void => {
    this.#accepting = false;
    this.#backoffMs = 0;
    if (!this.registered) return conn.close();
    this.#accepted = conn;
    this.core.markReady(this);
  };

  #onAcceptError = (error: Error): void => {
    this.#accepting = false;
    if (!this.registered) return;
    if (peerLeft(error)) return this.startNext(); // nothing to report: accept the next one
    this.#backoffMs = Math.min(MAX_BACKOFF_MS, Math.max(MIN_BACKOFF_MS, this.#backoffMs * 2));
    this.retryLater(error, this.#backoffMs);
  };
}

/** Bytes waiting to be written, in order: chunks, or datagrams with their addresses. */
class SendQueue {
  /** The chunks, from #head on (a moving head: shifting would cost O(n) per write). */
  #chunks: (Uint8Array | undefined)[] = [];
  /** Each chunk's address, for a datagram (undefined for a stream's chunks). */
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

  /** Adds a chunk, and for a datagram its address. */
  push(chunk: Uint8Array, to?: Deno.Addr): void {
    this.#chunks.push(chunk);
    this.#to.push(to);
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
    this.#chunks[this.#head] = this.#to[this.#head] = undefined;
    if (++this.#head === this.#chunks.length) {
      this.#chunks.length = this.#to.length = this.#head = 0;
    }
    return chunk;
  }

  /** Empties the queue, except the first chunk if `keepFirst` (its write is in flight). */
  drop(keepFirst: boolean, dropped: (chunk: Uint8Array) => void): void {
    const from = keepFirst ? this.#head + 1 : this.#head;
    for (let i = from; i < this.#chunks.length; i++) dropped(this.#chunks[i]!);
    this.#chunks.length = this.#to.length = from;
    if (!keepFirst) this.#chunks.length = this.#to.length = this.#head = 0;
    this.bytes = 0;
  }
}

/**
 * Zero-copy echo: recv() hands out the key's read buffer itself, so `send(recv())` queues
 * those very bytes. While any wait in a send queue (any key's), or are retained, the buffer
 * is *lent*, and no read may overwrite it. This map finds a buffer's key from any queue.
 */
const lenders = new WeakMap<ArrayBufferLike, BufferedKey>();

/** What connection and datagram keys share: the read buffer and its loans, the send queue. */
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
    this.queue.drop(this.writing, (chunk) => this.#loan(chunk, -1));
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
    this.broken(error);
  };

  /** The connection is broken for good: it reports the error, as READ and WRITE. */
  protected broken(error: Error): void {
    this.error ??= error;
    this.core.markReady(this);
  }

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
 * Read sizes. V8 zero-fills buffers, so an idle connection holds MIN_READ bytes of
 * memory; a full read makes the next 4 times larger, one of 1/16 or less, MIN_READ.
 */
const MIN_READ = 256;
const MAX_READ = 64 * 1024;

/** A connection's key: its operation is a read; it writes what send() queues. */
class ConnKey extends BufferedKey implements GatedRead {
  gateNote: unknown = undefined;
  /** True while a read() is pending. */
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

  override cancel(): void {
    super.cancel();
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
    if (this.registered) this.broken(error);
    this.core.gate?.readDone(this); // last, as in #onRead
  };
}

/** The receive buffer of a datagram socket: the largest UDP payload fits whole. */
const DATAGRAM_BUFFER = 65_536;
/** After a receive error other than closing, the next receive waits this long (no spin). */
const DATAGRAM_RETRY_MS = 10;

/** A datagram socket's key: its operation is a receive, into a buffer any datagram fits. */
class DatagramKey extends BufferedKey {
  /** True while a receive() is pending (concurrent ones complete out of order). */
  #receiving = false;
  /** The datagram received and not yet taken, and its sender. */
  #received: [Uint8Array, Deno.Addr] | undefined = undefined;

  get readiness(): number {
    if (this.error) return READ | WRITE;
    return (this.#received ? READ : 0) | (this.queue.length === 0 ? WRITE : 0);
  }

  override recvfrom(): [Uint8Array, Deno.Addr] {
    const received = this.#received;
    if (!received) return this.throwError("recvfrom()");
    this.#received = undefined;
    if (!this.pinned) this.core.pin(this); // the bytes are the caller's until select()
    return received;
  }

  override sendto(bytes: Uint8Array, addr: Deno.Addr): void {
    if (this.gone) throw this.error;
    if (!this.registered) throw new Deno.errors.BadResource("sendto() on an unregistered key");
    this.enqueue(bytes, addr);
  }

  startNext(): void {
    if (
      this.#receiving || !this.registered || !(this.events & READ) || this.error ||
      this.#received || this.pinned || this.blocked || this.retryTimer
    ) return;
    this.#receiving = true;
    const receiving = (this.resource as Deno.DatagramConn).receive(this.bufferOf(DATAGRAM_BUFFER));
    receiving.then(this.#onReceive, this.#onReceiveError);
  }

  override cancel(): void {
    super.cancel();
    this.dropQueue();
  }

  protected async write(): Promise<number> {
    const datagram = this.queue.first;
    await (this.resource as Deno.DatagramConn).send(datagram, this.queue.firstTo);
    return datagram.byteLength;
  }

  /** A datagram the kernel refuses is dropped, as UDP drops; only a closed socket ends the key. */
  protected fatal(error: Error): boolean {
    return this.gone ||= resourceGone(error);
  }

  #onReceive = (received: [Uint8Array, Deno.Addr]): void => {
    this.#receiving = false;
    if (!this.registered) return;
    this.#received = received;
    this.core.markReady(this);
  };

  #onReceiveError = (error: Error): void => {
    this.#receiving = false;
    if (this.registered) this.retryLater(error, DATAGRAM_RETRY_MS);
  };
}
