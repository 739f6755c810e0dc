/**
 * A readiness dispatcher for Deno, shaped like Python's `selectors` module:
 * register resources with the events you want, `select()` the ready ones, and
 * call their callbacks from one loop.
 *
 * Deno offers completions (promises), not readiness (epoll), so readiness is
 * built from completions. For each key the dispatcher keeps one operation in
 * flight: an `accept()` for a listener, a `read()` for a connection. When it
 * completes the key is ready, and the callback takes the result at once with
 * {@linkcode SelectorKey.accept} or {@linkcode SelectorKey.recv} ("should be
 * ready", as in the Python version). {@linkcode SelectorKey.send} queues bytes
 * and the dispatcher writes all of them, continuing partial writes itself.
 *
 * This file imports nothing: copy it into your project as it is.
 *
 * @example An echo server
 * ```ts ignore
 * import { READ, Selector, type SelectorKey, WRITE } from "./loop.ts";
 *
 * const selector = new Selector();
 *
 * function accept(key: SelectorKey) {
 *   const conn = key.accept(); // should be ready
 *   selector.register(conn, READ, read);
 * }
 *
 * function read(key: SelectorKey) {
 *   const data = key.recv(); // should be ready
 *   if (data) key.send(data); // queued: the loop writes every byte
 *   else selector.modify(key.resource, WRITE, close); // EOF: close once written
 * }
 *
 * function close(key: SelectorKey) {
 *   selector.unregister(key.resource);
 *   key.resource.close();
 * }
 *
 * const listener = Deno.listen({ hostname: "127.0.0.1", port: 1234 });
 * selector.register(listener, READ, accept);
 * await selector.run(); // for each ready key: key.callback(key, mask)
 * ```
 *
 * @module
 */

/** Interest in, and readiness for, reading: an accepted connection or received bytes are waiting. */
export const READ = 1;
/** Interest in, and readiness for, writing: everything queued with `send()` has been written. */
export const WRITE = 2;

/** What can be registered: a listener (READ only) or a connection. */
export type Resource = Deno.Listener | Deno.Conn;

/** Called by {@linkcode Selector.run} for each ready key, with the ready events. */
export type Callback<T = unknown> = (key: SelectorKey<T>, mask: number) => void;

/** One `[key, mask]` pair of a {@linkcode Selector.select} result. */
export type ReadyEvent = [key: SelectorKey, mask: number];

/** A registered resource: what it is, what it waits for, and its I/O. */
export interface SelectorKey<T = unknown> {
  /** The registered listener or connection (Python's `fileobj`). */
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
  /** Bytes queued by `send()` and not yet written. */
  readonly queued: number;
  /** The error that ended this connection, if one did (a reset, a broken pipe...). */
  readonly error: Error | undefined;
  /**
   * Takes the connection a listener key accepted. Call it when the key is READ-ready.
   *
   * @returns The accepted connection.
   * @throws The error the accept failed with (e.g. "Too many open files"); the
   *   dispatcher retries, backing off while the process is out of descriptors.
   */
  accept(): Deno.Conn;
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
}

/** Options for {@linkcode Selector}. */
export interface SelectorOptions {
  /** Queued bytes above which a connection stops reading. @default {65536} */
  highWaterMark?: number;
  /** Queued bytes at or below which it reads again. @default {16384} */
  lowWaterMark?: number;
}

/** The smallest and largest read buffers; an idle connection waits on the smallest. */
const MIN_READ = 1024;
const MAX_READ = 64 * 1024;
/** Back-off between accepts while the process is out of file descriptors. */
const MIN_BACKOFF_MS = 10;
const MAX_BACKOFF_MS = 500;

/** Accept errors caused by a peer that left before we accepted it: retry at once. */
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

/** Which key lent its read buffer: `send()` of those bytes holds that key's reads. */
const lenders = new WeakMap<ArrayBufferLike, Key>();

/** The dispatcher's view of the selector: where ready keys go. */
interface ReadyQueue {
  /** Lists a key that may be ready; returns whether it was added. */
  push(key: Key): boolean;
  /** Keeps a key's read buffer untouched until the next select(). */
  hold(key: Key): void;
  readonly highWaterMark: number;
  readonly lowWaterMark: number;
}

// Keys of any data type live in one map; the public type is SelectorKey<T>.
// deno-lint-ignore no-explicit-any
type AnyData = any;

/** The implementation of {@linkcode SelectorKey}; private to this module. */
class Key implements SelectorKey<AnyData> {
  readonly resource: Resource;
  events: number;
  callback: Callback<AnyData>;
  data: AnyData;
  /** The `[key, mask]` pair select() reports for this key, reused. */
  readonly event: ReadyEvent;
  /** True while in the selector's ready list (never listed twice). */
  listed = false;
  /** False once unregistered: late completions are then dropped. */
  registered = true;
  /** True from the select() that reported the key, or from recv(), to the next select(). */
  held = false;

  readonly #queue: ReadyQueue;
  readonly #isListener: boolean;
  // Inbound: one accept or read in flight at a time.
  #inFlight = false;
  #accepted: Deno.Conn | null = null;
  #received: number | null | undefined = undefined; // bytes in #buf, null at EOF
  #lent = 0; // chunks of #buf queued by send() on some key
  #buf: Uint8Array = new Uint8Array(0);
  #nextSize = MIN_READ;
  #error: Error | undefined = undefined;
  #gone = false; // the listener was closed: accept no more
  #backoffMs = 0;
  #retryAt = 0; // performance.now() before which no accept is tried
  #retryTimer: ReturnType<typeof setTimeout> | undefined = undefined;
  // Outbound.
  #chunks: (Uint8Array | undefined)[] = [];
  #head = 0;
  #queued = 0;
  #writing = false;
  #paused = false; // above the high-water mark until back at the low-water mark

  constructor(
    resource: Resource,
    events: number,
    callback: Callback<AnyData>,
    data: AnyData,
    queue: ReadyQueue,
  ) {
    this.resource = resource;
    this.events = events;
    this.callback = callback;
    this.data = data;
    this.#queue = queue;
    this.#isListener = !("read" in resource);
    this.event = [this, 0];
  }

  get queued(): number {
    return this.#queued;
  }

  get error(): Error | undefined {
    return this.#error;
  }

  /** The events the key is ready for, whatever its interest. */
  get readiness(): number {
    if (this.#error) return READ | WRITE;
    if (this.#isListener) return this.#accepted ? READ : 0;
    return (this.#received !== undefined ? READ : 0) |
      (this.#queued === 0 ? WRITE : 0);
  }

  accept(): Deno.Conn {
    if (!this.#isListener) {
      throw new TypeError("accept() needs a listener's key");
    }
    const conn = this.#accepted;
    this.#accepted = null;
    if (conn) return conn;
    const error = this.#error;
    if (!this.#gone) this.#error = undefined; // accept errors pass; the next accept may work
    throw error ??
      new Deno.errors.WouldBlock("accept() before the key was ready");
  }

  recv(): Uint8Array | null {
    if (this.#isListener) {
      throw new TypeError("recv() needs a connection's key");
    }
    if (this.#error) throw this.#error;
    const n = this.#received;
    if (n === undefined) {
      throw new Deno.errors.WouldBlock("recv() before the key was ready");
    }
    if (n === null) return null; // EOF stays readable, as on a socket
    this.#received = undefined;
    if (!this.held) this.#queue.hold(this); // the bytes are the caller's until select()
    return this.#buf.subarray(0, n);
  }

  send(bytes: Uint8Array): void {
    if (this.#isListener) {
      throw new TypeError("send() needs a connection's key");
    }
    if (this.#error) throw this.#error;
    if (!this.registered) {
      throw new Deno.errors.BadResource("send() on an unregistered key");
    }
    if (bytes.byteLength === 0) return;
    lenders.get(bytes.buffer)?.lend(1);
    this.#chunks.push(bytes);
    this.#queued += bytes.byteLength;
    if (this.#queued > this.#queue.highWaterMark) this.#paused = true;
    if (!this.#writing) this.#write();
  }

  /** Counts chunks of this key's read buffer waiting in some send queue. */
  lend(delta: number): void {
    this.#lent += delta;
    if (this.#lent === 0) this.startInbound();
  }

  /**
   * Called by the next select(): the bytes recv() handed out may be reused now. A
   * key still ready (its callback did not take the result) is listed again, as a
   * level-triggered selector reports it again.
   *
   * @returns Whether the key was listed again.
   */
  release(): boolean {
    this.held = false;
    if (!this.registered) return false;
    this.startInbound();
    return this.#queue.push(this);
  }

  /** Starts the next accept or read if the key wants one and nothing holds it back. */
  startInbound(): void {
    if (
      this.#inFlight || !this.registered || !(this.events & READ) ||
      this.#error || this.#retryTimer
    ) return;
    if (this.#isListener) {
      if (this.#accepted) return;
      const wait = this.#retryAt && this.#retryAt - performance.now();
      if (wait > 0) {
        this.#retryTimer = setTimeout(this.#retry, wait);
        return;
      }
      this.#inFlight = true;
      (this.resource as Deno.Listener).accept().then(
        this.#onAccept,
        this.#onAcceptError,
      );
      return;
    }
    if (
      this.#received !== undefined || this.held || this.#lent > 0 ||
      this.#paused
    ) return;
    if (this.#buf.byteLength !== this.#nextSize) {
      this.#buf = new Uint8Array(this.#nextSize);
      lenders.set(this.#buf.buffer, this);
    }
    this.#inFlight = true;
    (this.resource as Deno.Conn).read(this.#buf).then(
      this.#onRead,
      this.#onReadError,
    );
  }

  /** Drops everything pending; late completions are ignored from now on. */
  cancel(): void {
    this.registered = false;
    clearTimeout(this.#retryTimer);
    this.#retryTimer = undefined;
    this.#accepted?.close(); // accepted by us, never handed out
    this.#accepted = null;
    // A chunk being written stays lent until its write completes.
    this.#dropQueue(this.#writing ? this.#head + 1 : this.#head);
  }

  #onAccept = (conn: Deno.Conn): void => {
    this.#inFlight = false;
    this.#backoffMs = 0;
    this.#retryAt = 0;
    if (!this.registered) return conn.close();
    this.#accepted = conn;
    this.#queue.push(this);
  };

  #onAcceptError = (error: Error): void => {
    this.#inFlight = false;
    if (!this.registered) return;
    if (resourceGone(error)) this.#gone = true;
    else if (!peerLeft(error)) {
      // Out of descriptors, or similar: retrying at once would spin the CPU.
      this.#backoffMs = Math.min(
        MAX_BACKOFF_MS,
        Math.max(MIN_BACKOFF_MS, this.#backoffMs * 2),
      );
      this.#retryAt = performance.now() + this.#backoffMs;
    }
    this.#error = error;
    this.#queue.push(this);
  };

  #retry = (): void => {
    this.#retryTimer = undefined;
    this.#retryAt = 0;
    this.startInbound();
  };

  #onRead = (n: number | null): void => {
    this.#inFlight = false;
    if (!this.registered) return;
    const size = this.#buf.byteLength;
    if (n === size) this.#nextSize = Math.min(MAX_READ, size * 4);
    else if (n !== null && n <= size / 16) this.#nextSize = MIN_READ;
    this.#received = n;
    this.#queue.push(this);
  };

  #onReadError = (error: Error): void => {
    this.#inFlight = false;
    if (this.registered) this.#fail(error);
  };

  #write(): void {
    this.#writing = true;
    (this.resource as Deno.Conn).write(this.#chunks[this.#head]!).then(
      this.#onWrite,
      this.#onWriteError,
    );
  }

  #onWrite = (n: number): void => {
    const chunk = this.#chunks[this.#head]!;
    if (!this.registered) return lenders.get(chunk.buffer)?.lend(-1);
    this.#queued -= n;
    if (n < chunk.byteLength) {
      this.#chunks[this.#head] = chunk.subarray(n); // a partial write: go on with the rest
    } else {
      this.#chunks[this.#head++] = undefined;
      lenders.get(chunk.buffer)?.lend(-1);
    }
    if (this.#paused && this.#queued <= this.#queue.lowWaterMark) {
      this.#paused = false;
      this.startInbound();
    }
    if (this.#head < this.#chunks.length) return this.#write();
    this.#chunks.length = 0;
    this.#head = 0;
    this.#writing = false;
    if (this.events & WRITE) this.#queue.push(this);
  };

  #onWriteError = (error: Error): void => {
    this.#writing = false;
    if (!this.registered) {
      return lenders.get(this.#chunks[this.#head]!.buffer)?.lend(-1);
    }
    this.#dropQueue(this.#head); // nothing more can be written
    this.#fail(error);
  };

  /** Empties the send queue, returning lent buffers from chunk `from` on. */
  #dropQueue(from: number): void {
    for (let i = from; i < this.#chunks.length; i++) {
      lenders.get(this.#chunks[i]!.buffer)?.lend(-1);
    }
    if (from === this.#head) this.#chunks = [];
    else this.#chunks.length = from; // keep the chunk being written
    this.#queued = 0;
  }

  #fail(error: Error): void {
    this.#error ??= error;
    this.#queue.push(this);
  }
}

/**
 * Waits for registered resources to become ready and dispatches their callbacks.
 *
 * Work per event is O(1) however many keys are registered: a completion lists
 * its key and wakes the one waiting `select()`.
 */
export class Selector {
  /** Queued bytes above which a connection stops reading. */
  readonly highWaterMark: number;
  /** Queued bytes at or below which it reads again. */
  readonly lowWaterMark: number;
  readonly #keys = new Map<Resource, Key>();
  #ready: Key[] = []; // keys that may be ready, each once
  #spare: Key[] = []; // the previous ready array, reused
  #held: Key[] = []; // keys reported (or recv()'d) since the last select()
  readonly #events: ReadyEvent[] = [];
  #wake: (() => void) | undefined = undefined; // resolves the waiting select()
  #selecting = false;
  #closed = false;
  readonly #queue: ReadyQueue;

  /**
   * Creates a selector.
   *
   * @param options Backpressure thresholds for `send()`.
   */
  constructor(options: SelectorOptions = {}) {
    const { highWaterMark = 64 * 1024, lowWaterMark = 16 * 1024 } = options;
    if (!(lowWaterMark >= 0 && highWaterMark >= lowWaterMark)) {
      throw new RangeError(
        `Water marks must satisfy 0 <= low <= high: got low ${lowWaterMark}, high ${highWaterMark}`,
      );
    }
    this.highWaterMark = highWaterMark;
    this.lowWaterMark = lowWaterMark;
    this.#queue = {
      highWaterMark,
      lowWaterMark,
      push: (key) => {
        if (key.listed || !key.registered || !(key.readiness & key.events)) {
          return false;
        }
        key.listed = true;
        this.#ready.push(key);
        this.#wakeUp();
        return true;
      },
      hold: (key) => {
        key.held = true;
        this.#held.push(key);
      },
    };
  }

  /** How many resources are registered. */
  get size(): number {
    return this.#keys.size;
  }

  /**
   * Starts watching a resource. With READ interest the dispatcher starts an
   * accept (listener) or a read (connection) right away.
   *
   * @param resource A listener or a connection.
   * @param events {@linkcode READ}, {@linkcode WRITE} (connections), both, or 0.
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
    if (this.#closed) {
      throw new Error("Cannot register: the selector is closed");
    }
    if (this.#keys.has(resource)) {
      throw new Error("Cannot register: the resource is already registered");
    }
    const key = new Key(
      resource,
      checkEvents(resource, events),
      callback,
      data,
      this.#queue,
    );
    this.#keys.set(resource, key);
    key.startInbound();
    this.#queue.push(key);
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
    key.startInbound();
    this.#queue.push(key);
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
    if (this.#keys.size === 0) this.#wakeUp(); // nothing left to wait for
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
    if (this.#selecting) {
      throw new Error("Cannot select: another select() is waiting");
    }
    this.#selecting = true;
    try {
      let relisted = 0; // keys still ready because their callback left the result
      for (const key of this.#held) if (key.release()) relisted++;
      this.#held.length = 0;
      if (relisted > 0 && relisted === this.#ready.length) {
        // Only old events: let Deno poll I/O first, or this loop would starve it.
        await new Promise((resolve) => setTimeout(resolve, 0));
      }
      if (
        this.#ready.length === 0 && !this.#closed && this.#keys.size > 0 &&
        timeout !== 0
      ) {
        await this.#wait(timeout);
      }
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
    while (!this.#closed && this.#keys.size > 0) {
      const events = await this.select();
      for (let i = 0; i < events.length; i++) {
        const [key, mask] = events[i];
        if ((key as Key).registered) key.callback(key, mask);
      }
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
    this.#wakeUp();
  }

  #wakeUp(): void {
    const wake = this.#wake;
    this.#wake = undefined;
    wake?.();
  }

  #keyOf(resource: Resource): Key {
    const key = this.#keys.get(resource);
    if (!key) throw new Error("The resource is not registered");
    return key;
  }

  #wait(timeout: number | undefined): Promise<void> {
    return new Promise<void>((resolve) => {
      if (timeout === undefined) {
        this.#wake = resolve;
        return;
      }
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

  #collect(): ReadyEvent[] {
    const ready = this.#ready;
    this.#ready = this.#spare;
    this.#spare = ready;
    const events = this.#events;
    events.length = 0;
    for (let i = 0; i < ready.length; i++) {
      const key = ready[i];
      key.listed = false;
      const mask = key.readiness & key.events;
      if (!key.registered || mask === 0) continue;
      key.event[1] = mask;
      events.push(key.event);
      if (!key.held) this.#queue.hold(key);
    }
    ready.length = 0;
    return events;
  }
}

/** Checks an interest mask: READ and WRITE bits only, READ only for a listener. */
function checkEvents(resource: Resource, events: number): number {
  const valid = "read" in resource ? READ | WRITE : READ;
  if (!Number.isInteger(events) || (events & ~valid) !== 0) {
    throw new RangeError(
      `Invalid events ${events}: a ${"read" in resource ? "connection" : "listener"} takes ${
        valid === READ ? "READ" : "READ and WRITE"
      }`,
    );
  }
  return events;
}
